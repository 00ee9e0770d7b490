//! Several LoRA adapters made into one PEFT-format adapter: `factune merge-adapters` (PEFT's
//! `add_weighted_adapter`, `factune_adapters::weighted`) and `factune lorahub` (weights searched on a few
//! examples, `factune_eval::lorahub`) and `factune ziplora` (per-column coefficients learned on each adapter's
//! data, `factune_train::ziplora`).

use crate::commands::outside_model;
use anyhow::{bail, Result};
use candle_core::Device;
use factune_adapters::peft;
use factune_adapters::weighted::{self, Combination, MajoritySign, Weighting};
use factune_adapters::AdapterConfig;
use factune_model::Model;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct MergeAdaptersArgs {
    /// The base model the adapters were trained on (their shapes are checked against it)
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// The LoRA adapter directories, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated, in the adapters' order (negative subtracts)
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        allow_negative_numbers = true
    )]
    pub weights: Vec<f64>,
    /// PEFT's combination_type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune, magnitude_prune_svd (PEFT's default: svd)
    #[arg(long, default_value = "svd")]
    pub combination: Combination,
    /// Fraction of entries kept by the ties, dare_* and magnitude_prune* types, in (0, 1]
    #[arg(long)]
    pub density: Option<f64>,
    /// How ties and dare_ties elect signs: total or frequency [default: total]
    #[arg(long)]
    pub majority_sign_method: Option<MajoritySign>,
    /// Rank of the svd types' result [default: the largest source rank]
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp the svd types' factors at this quantile of their entries, in [0, 1]
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// Seed of the dare types' random masks
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for the combined adapter (adapter_config.json + adapter_model.safetensors)
    #[arg(long)]
    pub output: PathBuf,
}

pub fn merge_adapters(args: &MergeAdaptersArgs) -> Result<()> {
    let spec = Weighting {
        combination: args.combination,
        weights: args.weights.clone(),
        density: args.density,
        majority_sign_method: args.majority_sign_method,
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        seed: args.seed,
    };
    spec.check(args.adapters.len())?;
    let configs = checked_sources(&args.adapters, &args.model, &args.output)?;
    let c = spec.effective(args.adapters.len());
    if c != args.combination {
        eprintln!(
            "one adapter: combined linearly (as PEFT does), not by {}",
            args.combination
        );
    }
    let mut model = Model::load(&args.model, &Device::Cpu)?;
    let mut sources = Vec::new();
    for (dir, cfg) in args.adapters.iter().zip(configs) {
        sources.push(weighted::read_source(&mut model, dir, cfg)?);
    }
    let combined = weighted::combine(&model, &sources, &spec)?;
    let (modules, rank, dora) = (
        combined.modules,
        combined.config.r,
        combined.config.use_dora,
    );
    std::fs::create_dir_all(&args.output).map_err(|e| factune_io::Error::io(&args.output, e))?;
    peft::write_built(&combined.config, combined.tensors, &args.output)?;
    // what was written loads back onto the base
    peft::load(&mut model, &args.output, false)?;
    println!(
        "combined {} adapters by {} (weights {}) into {}: {modules} modules, r = {rank}{}",
        args.adapters.len(),
        combined.combination,
        args.weights
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        args.output.display(),
        if dora {
            ", DoRA magnitudes ‖W‖ per row (as PEFT's)"
        } else {
            ""
        }
    );
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Adapters whose configs name different base models (by the last path component, so moved copies of one
/// base agree) are refused: their updates were learned against different weights.
fn same_base(dirs: &[PathBuf], configs: &[AdapterConfig]) -> Result<()> {
    let name = |c: &AdapterConfig| {
        c.base_model_name_or_path.as_deref().and_then(|p| {
            Path::new(p.trim_end_matches('/'))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
    };
    let named: Vec<(usize, String)> = configs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| name(c).map(|n| (i, n)))
        .collect();
    if let Some((i, n)) = named.iter().find(|(_, n)| *n != named[0].1) {
        bail!(
            "{} was trained on `{}` but {} on `{n}` (base_model_name_or_path): adapters combine only on the \
             base they were trained on",
            dirs[named[0].0].display(),
            named[0].1,
            dirs[*i].display()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LorahubArgs {
    /// The base model the adapters were trained on
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// The LoRA adapters to weigh (same modules, rank and lora_alpha), comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<PathBuf>,
    /// The new task's few examples (any training data format; the loss counts their answers)
    #[arg(long)]
    pub data: PathBuf,
    /// Directory for the composed adapter and lorahub.json
    #[arg(long)]
    pub output: PathBuf,
    /// Objective evaluations (each one forward pass over the examples)
    #[arg(long, default_value_t = 40)]
    pub budget: usize,
    /// Weight of the L1 penalty on the weights, l1 · mean|w|
    #[arg(long, default_value_t = 0.05)]
    pub l1: f64,
    /// Weights stay within [-bound, bound]
    #[arg(long, default_value_t = 1.5)]
    pub bound: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
}

pub fn lorahub(args: &LorahubArgs) -> Result<()> {
    use factune_eval::lorahub::{search, HubOptions};
    let opts = HubOptions {
        budget: args.budget,
        l1: args.l1,
        bound: args.bound,
        seed: args.seed,
        batch: args.batch_size,
    };
    if args.adapters.len() < 2 {
        bail!("--adapters: LoraHub weighs at least two adapters");
    }
    let configs = checked_sources(&args.adapters, &args.model, &args.output)?;
    let tok = factune_io::TextTokenizer::from_dir(&args.model)?;
    let mut model = Model::load(&args.model, &Device::Cpu)?;
    let data = factune_data::Dataset::load(
        &args.data,
        &factune_data::DataOptions::eval(args.seq_len.min(model.max_positions())),
        &tok,
    )?;
    let mut sources = Vec::new();
    for (dir, cfg) in args.adapters.iter().zip(configs) {
        sources.push(weighted::read_source(&mut model, dir, cfg)?);
    }
    let bar = evaluation_bar(args.budget, "evaluations");
    let pad = factune_data::pad_id(&tok);
    let (best, evals, factors) = search(
        &mut model,
        &sources,
        &data.examples,
        pad,
        &opts,
        |i, e, b| {
            let line = format!(
                "loss {:.4} best {:.4} (objective {:.4})",
                e.loss, b.loss, b.objective
            );
            if bar.is_hidden() {
                eprintln!("evaluation {}/{}: {line}", i + 1, args.budget);
            }
            bar.set_message(line);
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    let mut cfg = sources[0].config.clone();
    cfg.inference_mode = serde_json::Value::Bool(true);
    std::fs::create_dir_all(&args.output).map_err(|e| factune_io::Error::io(&args.output, e))?;
    peft::write_built(&cfg, weighted::factor_tensors(factors), &args.output)?;
    let record = serde_json::json!({
        "adapters": args.adapters,
        "weights": best.weights,
        "loss": best.loss,
        "objective": best.objective,
        "examples": data.examples.len(),
        "budget": args.budget, "l1": args.l1, "bound": args.bound, "seed": args.seed,
        "evaluations": evals,
    });
    factune_io::atomic::write_atomic(
        &args.output.join("lorahub.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    println!(
        "LoraHub over {} adapters, {} evaluations on {} examples: loss {:.4} with weights [{}]; composed adapter in {}",
        sources.len(),
        evals.len(),
        data.examples.len(),
        best.loss,
        best.weights.iter().map(|w| format!("{w:.3}")).collect::<Vec<_>>().join(", "),
        args.output.display()
    );
    Ok(())
}

/// The sources' configs, and the output, checked before any weight is read: each source combines, they name
/// one base, and the output is fresh.
fn checked_sources(
    adapters: &[PathBuf],
    model: &Path,
    output: &Path,
) -> Result<Vec<AdapterConfig>> {
    let configs = adapters
        .iter()
        .map(|d| weighted::source_config(d))
        .collect::<factune_io::Result<Vec<_>>>()?;
    same_base(adapters, &configs)?;
    fresh_output(output, model, adapters)?;
    Ok(configs)
}

/// The output may not be the model, a source, or a directory already holding an adapter.
fn fresh_output(output: &Path, model: &Path, adapters: &[PathBuf]) -> Result<()> {
    outside_model(output, model)?;
    if let Some(a) = adapters.iter().find(|a| same_dir(a, output)) {
        bail!(
            "--output {} is the source adapter {}: write the result elsewhere",
            output.display(),
            a.display()
        );
    }
    if output.join(peft::CONFIG_FILE).exists() || output.join(peft::WEIGHTS_FILE).exists() {
        bail!(
            "--output {} already holds an adapter: choose another directory or remove it",
            output.display()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ZiploraArgs {
    /// The base model the adapters were trained on
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// The two LoRA adapters, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<PathBuf>,
    /// Examples of the first adapter's task (any training data format)
    #[arg(long)]
    pub data_a: PathBuf,
    /// Examples of the second adapter's task
    #[arg(long)]
    pub data_b: PathBuf,
    /// Directory for the merged adapter and ziplora.json
    #[arg(long)]
    pub output: PathBuf,
    /// Adam steps over the merge coefficients
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Weight λ of |cos(m₁, m₂)| per module
    #[arg(long, default_value_t = 0.01)]
    pub lambda: f64,
    #[arg(long, default_value_t = 0.01)]
    pub learning_rate: f64,
    /// Input rows (tokens) kept per module and dataset
    #[arg(long, default_value_t = 4096)]
    pub max_rows: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
}

pub fn ziplora(args: &ZiploraArgs) -> Result<()> {
    use factune_train::ziplora::{scaled_sources, zip, ZipOptions};
    let [a, b] = args.adapters.as_slice() else {
        bail!(
            "--adapters: ZipLoRA merges exactly two adapters, {} given",
            args.adapters.len()
        );
    };
    let [ca, cb]: [AdapterConfig; 2] = checked_sources(&args.adapters, &args.model, &args.output)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("two adapters"))?;
    let tok = factune_io::TextTokenizer::from_dir(&args.model)?;
    let mut model = Model::load(&args.model, &Device::Cpu)?;
    let opts = factune_data::DataOptions::eval(args.seq_len.min(model.max_positions()));
    let data_a = factune_data::Dataset::load(&args.data_a, &opts, &tok)?;
    let data_b = factune_data::Dataset::load(&args.data_b, &opts, &tok)?;
    let sa = weighted::read_source(&mut model, a, ca)?;
    let sb = weighted::read_source(&mut model, b, cb)?;
    let zip_opts = ZipOptions {
        steps: args.steps,
        lambda: args.lambda,
        learning_rate: args.learning_rate,
        max_rows: args.max_rows,
    };
    let bar = evaluation_bar(args.steps + 1, "steps");
    let zipped = zip(
        &mut model,
        [&sa, &sb],
        [&data_a.examples, &data_b.examples],
        &zip_opts,
        |s| {
            let line = format!("difference {:.3e} Σ|cos| {:.4}", s.difference, s.cosine);
            if bar.is_hidden() && (s.step % 10 == 0 || s.step == args.steps) {
                eprintln!("step {}/{}: {line}", s.step, args.steps);
            }
            bar.set_message(line);
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    let scaled = scaled_sources([&sa, &sb], &zipped)?;
    let cat = Weighting {
        combination: Combination::Cat,
        weights: vec![1.0, 1.0],
        density: None,
        majority_sign_method: None,
        svd_rank: None,
        svd_clamp: None,
        seed: 0,
    };
    let combined = weighted::combine(&model, &scaled, &cat)?;
    std::fs::create_dir_all(&args.output).map_err(|e| factune_io::Error::io(&args.output, e))?;
    peft::write_built(&combined.config, combined.tensors, &args.output)?;
    let (first, last) = (
        &zipped.history[0],
        zipped.history.last().expect("step 0 is recorded"),
    );
    let record = serde_json::json!({
        "adapters": args.adapters,
        "data": [args.data_a, args.data_b],
        "steps": args.steps, "lambda": args.lambda, "learning_rate": args.learning_rate,
        "max_rows": args.max_rows,
        "history": zipped.history,
        "coefficients": zipped.coefficients.iter().map(|(p, (m1, m2))| (p.clone(), serde_json::json!({
            "m1_mean": m1.iter().map(|&x| x as f64).sum::<f64>() / m1.len() as f64,
            "m2_mean": m2.iter().map(|&x| x as f64).sum::<f64>() / m2.len() as f64,
        }))).collect::<serde_json::Map<_, _>>(),
    });
    factune_io::atomic::write_atomic(
        &args.output.join("ziplora.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    println!(
        "ZipLoRA over {} shared modules: output difference {:.3e} -> {:.3e}, Σ|cos(m1, m2)| {:.3} -> {:.3}; \
         merged adapter (r = {}) in {}",
        zipped.coefficients.len(),
        first.difference,
        last.difference,
        first.cosine,
        last.cosine,
        combined.config.r,
        args.output.display()
    );
    Ok(())
}

/// A bar on a terminal, hidden otherwise (the caller prints plain lines then).
fn evaluation_bar(total: usize, unit: &str) -> indicatif::ProgressBar {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .expect("static template"),
    );
    bar
}
