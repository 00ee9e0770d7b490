//! `factune analyze said`: the intrinsic dimension of a fine-tuning task (Aghajanyan et al. 2021). A full
//! fine-tune sets the score to reach; then, for each d, only a d-dimensional θ projected into the weights
//! (`peft_type = "SAID"`, `factune_adapters::said`) is trained with the same data and schedule; d90 is the
//! smallest d whose held-out next-token accuracy reaches 90% of the full fine-tune's.

use crate::commands::{outside_model, readable_data, resolve_config, run_training};
use crate::flags::TrainOverrides;
use crate::plot::{plot_curves, Axes};
use anyhow::{bail, Context, Result};
use factune_adapters::{peft, said::SaidConfig, AdapterConfig, MethodConfig};
use factune_data::{evaluate_loss_and_accuracy, pad_id, Example};
use factune_io::{atomic, TextTokenizer};
use factune_model::Model;
use factune_train::{PeftType, TrainConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct SaidArgs {
    /// The pre-trained model
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// Training data, as `factune train --data` (held-out examples: --eval-data, else validation_split)
    #[arg(long)]
    pub data: PathBuf,
    /// Directory for said.json, said.png and every run (full/, d-N/)
    #[arg(long)]
    pub output: PathBuf,
    /// Replace runs an earlier analysis left in --output
    #[arg(long)]
    pub overwrite: bool,
    /// The intrinsic dimensions d to train (comma-separated)
    #[arg(long, value_delimiter = ',', default_values_t = [10, 30, 100, 300, 1000, 3000])]
    pub dims: Vec<usize>,
    /// Learning rate of the full fine-tune [default: learning_rate]; the projected runs use learning_rate
    #[arg(long)]
    pub full_learning_rate: Option<f64>,
    /// The share of the full fine-tune's accuracy a dimension must reach (0.9 gives d90)
    #[arg(long, default_value_t = 0.9)]
    pub fraction: f64,
    /// A TOML training config, as `factune train --config` (settings for every run)
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: TrainOverrides,
}

/// Held-out loss and next-token accuracy of one model.
#[derive(Clone, Copy)]
struct Score {
    loss: f64,
    accuracy: f64,
}

fn score(model: &Model, val: &[Example], batch: usize, pad: u32) -> Result<Score> {
    let (loss, accuracy, n) = evaluate_loss_and_accuracy(model, val, batch, pad)?;
    if n == 0 || !loss.is_finite() {
        bail!("the held-out examples have no labelled tokens to score (loss {loss}, {n} tokens)");
    }
    Ok(Score { loss, accuracy })
}

/// One run's settings: SAID at `d`, or the full fine-tune.
fn run_config(base: &TrainConfig, d: Option<usize>, full_lr: Option<f64>) -> TrainConfig {
    let mut c = base.clone();
    match d {
        Some(d) => {
            c.peft_type = PeftType::Adapter("SAID");
            c.method_keys
                .0
                .insert("intrinsic_dimension".into(), json!(d));
        }
        None => {
            c.peft_type = PeftType::Full;
            c.learning_rate = full_lr.unwrap_or(c.learning_rate);
        }
    }
    c
}

fn run_dir(out: &Path, d: Option<usize>) -> PathBuf {
    match d {
        Some(d) => out.join(format!("d-{d}")),
        None => out.join("full"),
    }
}

pub fn said(a: &SaidArgs) -> Result<()> {
    if a.dims.is_empty() || a.dims.contains(&0) {
        bail!("--dims needs positive intrinsic dimensions, e.g. 10,100,1000");
    }
    if !(a.fraction > 0.0 && a.fraction <= 1.0) {
        bail!("--fraction {} is outside (0, 1]", a.fraction);
    }
    if let Some(lr) = a.full_learning_rate {
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--full-learning-rate {lr} must be a positive number");
        }
    }
    let mut dims = a.dims.clone();
    dims.sort_unstable();
    dims.dedup();
    let (mut cfg, _) = resolve_config(a.config.as_deref(), &a.overrides)?;
    if cfg.peft_type != PeftType::LORA {
        bail!(
            "peft_type `{}`: analyze said trains SAID and a full fine-tune itself; leave peft_type unset",
            cfg.peft_type
        );
    }
    cfg.peft_type = PeftType::Adapter("SAID");
    if cfg.load_options(false).quantize.is_some() || cfg.mixed_budget().is_some() {
        bail!(
            "quantize: SAID projects into dense weights (W₀ + λ·Pθ); a 4-bit base cannot hold them"
        );
    }
    // every run's settings are checked before any weight loads
    let runs: Vec<Option<usize>> = std::iter::once(None)
        .chain(dims.iter().map(|&d| Some(d)))
        .collect();
    for &d in &runs {
        run_config(&cfg, d, a.full_learning_rate).validate()?;
    }
    readable_data(&a.data)?;
    if !cfg.eval_data.is_empty() {
        readable_data(Path::new(&cfg.eval_data))?;
    }
    outside_model(&a.output, &a.model)?;
    for &d in &runs {
        let dir = run_dir(&a.output, d);
        if factune_train::holds_run(&dir) {
            if !a.overwrite {
                bail!(
                    "{} already holds a run of an earlier analysis: pass --overwrite to replace it, or another --output",
                    dir.display()
                );
            }
            factune_train::clear_run(&dir)?;
        }
    }
    let tok = TextTokenizer::from_dir(&a.model)?;
    let val = factune_train::load_run_data(&cfg, &a.data, &tok)?.val;
    if val.is_empty() {
        bail!("no held-out examples to score: give --eval-data or a validation_split above 0");
    }
    let (batch, pad) = (cfg.micro_batch_size, pad_id(&tok));
    let load = || -> Result<Model> {
        Ok(Model::load_with(
            &a.model,
            &candle_core::Device::Cpu,
            cfg.load_options(false),
        )?)
    };
    // the dimensions are checked against the targeted layers before anything trains
    let probe = load()?;
    let adapter = cfg.adapter_config()?;
    let said = said_options(&adapter)?;
    let shapes = peft::targeted_shapes(&probe, &adapter)?;
    for &d in &dims {
        let own = SaidConfig {
            intrinsic_dimension: d,
            ..said.clone()
        };
        factune_adapters::said::theta_len(&own, &shapes).with_context(|| format!("--dims {d}"))?;
    }
    let base = score(&probe, &val, batch, pad)?;
    drop(probe);
    eprintln!(
        "base model: held-out accuracy {:.4}, loss {:.4} over {} examples",
        base.accuracy,
        base.loss,
        val.len()
    );
    let mut results = Vec::new();
    for &d in &runs {
        let c = run_config(&cfg, d, a.full_learning_rate);
        let dir = run_dir(&a.output, d);
        let label = d.map_or("full fine-tune".to_string(), |d| format!("SAID d = {d}"));
        eprintln!("{label}: training into {}", dir.display());
        let mut model = load()?;
        let t0 = Instant::now();
        let outcome = run_training(&mut model, &tok, c, &a.data, &dir, (None, false))?;
        let s = score(&model, &val, batch, pad)?;
        eprintln!(
            "{label}: held-out accuracy {:.4}, loss {:.4} ({} steps, {:.1}s)",
            s.accuracy,
            s.loss,
            outcome.steps,
            t0.elapsed().as_secs_f64()
        );
        results.push((
            d,
            s,
            outcome.seconds,
            outcome.tokens as f64 / outcome.seconds,
        ));
    }
    let full = results[0].1;
    let threshold = a.fraction * full.accuracy;
    let d90 = results[1..]
        .iter()
        .find(|(_, s, _, _)| s.accuracy >= threshold)
        .and_then(|(d, ..)| *d);
    let doc = json!({
        "model": a.model.display().to_string(),
        "data": a.data.display().to_string(),
        "held_out_examples": val.len(),
        "metric": "held-out next-token accuracy (answer tokens of records)",
        "fraction": a.fraction,
        "threshold": threshold,
        "d90": d90,
        "base": {"accuracy": base.accuracy, "loss": base.loss},
        "full": {"accuracy": full.accuracy, "loss": full.loss, "seconds": results[0].2,
                  "learning_rate": a.full_learning_rate.unwrap_or(cfg.learning_rate)},
        "runs": results[1..].iter().map(|(d, s, secs, tps)| json!({
            "intrinsic_dimension": d, "accuracy": s.accuracy, "loss": s.loss,
            "seconds": secs, "tokens_per_s": tps,
        })).collect::<Vec<_>>(),
        "learning_rate": cfg.learning_rate,
        "structure_aware": said.structure_aware,
    });
    std::fs::create_dir_all(&a.output)?;
    atomic::write_atomic(
        &a.output.join("said.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?;
    plot(&a.output.join("said.png"), &results, base, threshold)?;
    let verdict = match d90 {
        Some(d) => format!("d{} = {d}", (a.fraction * 100.0).round()),
        None => format!(
            "no d up to {} reached {:.0}% of the full fine-tune",
            dims[dims.len() - 1],
            a.fraction * 100.0
        ),
    };
    let note = match base.accuracy >= threshold {
        true => " (the base model already reaches the threshold: the task needs no fine-tuning by this measure)",
        false => "",
    };
    println!(
        "{verdict}{note}: full fine-tune accuracy {:.4}, threshold {threshold:.4}, base {:.4}; said.json and said.png in {}",
        full.accuracy,
        base.accuracy,
        a.output.display()
    );
    Ok(())
}

fn said_options(cfg: &AdapterConfig) -> Result<SaidConfig> {
    match &cfg.method {
        MethodConfig::Said(s) => Ok(s.clone()),
        other => bail!("expected SAID settings, got {}", other.peft_type()),
    }
}

/// Accuracy against log₁₀ d, with the full fine-tune, its threshold and the base as levels.
fn plot(
    png: &Path,
    results: &[(Option<usize>, Score, f64, f64)],
    base: Score,
    threshold: f64,
) -> Result<()> {
    let pts: Vec<(f64, f64)> = results[1..]
        .iter()
        .filter_map(|(d, s, ..)| d.map(|d| ((d as f64).log10(), s.accuracy)))
        .collect();
    let (x0, x1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1e-3));
    let level = |y: f64| vec![(x0, y), (x1, y)];
    plot_curves(
        png,
        "SAID: held-out accuracy against the intrinsic dimension",
        &Axes {
            x: "log10 d",
            y: "held-out next-token accuracy",
        },
        &[
            ("SAID", pts.clone()),
            ("full fine-tune", level(results[0].1.accuracy)),
            ("threshold", level(threshold)),
            ("base", level(base.accuracy)),
        ],
    )?;
    Ok(())
}
