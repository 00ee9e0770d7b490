//! What the subcommands share (device, model with adapters, run config, output checks) and the training
//! subcommands, `train` and `pretrain`; evaluation, export and inspection have their own modules.

use crate::flags::TrainOverrides;
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use factune_adapters::peft;
use factune_io::{TextTokenizer, Weights};
use factune_model::{Model, Nf4Options};
use factune_train::pretrain::{init_model, train_tokenizer, ArchSpec, EOS};
use factune_train::{TrainConfig, TrainJob, TrainOutcome};
use std::path::{Path, PathBuf};

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        d if d.starts_with("cuda") => {
            let idx = d
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .context("cuda:N takes a number")?
                .unwrap_or(0);
            Device::new_cuda(idx)
                .with_context(|| format!("device `{d}` (is factune built with --features cuda?)"))
        }
        other => bail!("unknown device `{other}`: expected cpu or cuda[:N]"),
    }
}

/// How the base's linear weights are held: `--quantize` if given, else as the adapter's training run held
/// them (its `run.json` records the config), said out loud when it matters. The second value is the budget of
/// a mixed-precision base, whose layout is planned again from the full-precision weights.
fn base_quantization(args: &ModelArgs) -> Result<(Option<Nf4Options>, Option<f64>)> {
    let trained = args
        .adapter()?
        .map(|a| a.join("run.json"))
        .filter(|p| p.exists())
        .map(|p| -> Result<TrainConfig> {
            let meta: serde_json::Value = factune_io::error::read_json(&p)?;
            let cfg: TrainConfig = serde_json::from_value(meta["config"].clone())
                .with_context(|| format!("{}: bad `config`", p.display()))?;
            let base = p.with_file_name(peft::LOFTQ_BASE_DIR);
            let four_bit = Weights::from_model_dir(&args.model)?.dtype_summary().contains_key("U8");
            if base.exists() && !four_bit && args.quantize.as_deref() != Some("none") {
                bail!(
                    "the adapter was trained with LoftQ against its own 4-bit base, not a quantisation of {}: \
                     use --model {}",
                    args.model.display(),
                    base.display()
                );
            }
            Ok(cfg)
        })
        .transpose()?;
    let nf4 = trained.as_ref().and_then(|c| c.nf4_options());
    let mixed = trained.as_ref().and_then(|c| c.mixed_budget());
    Ok(match args.quantize.as_deref() {
        Some("nf4") => (Some(nf4.unwrap_or(Nf4Options { double_quant: true })), None),
        Some(_) => (None, None),
        None => {
            if nf4.is_some() {
                eprintln!(
                    "the adapter was trained on a quantised base (its run.json): quantising the base the same \
                     way (--quantize none for full precision)"
                );
            }
            (nf4, mixed)
        }
    })
}

/// Loads the base model and (optionally) an adapter, reporting what the adapter matched.
pub fn load_model(args: &ModelArgs) -> Result<Model> {
    let dev = device(&args.device)?;
    let (quantize, mixed) = base_quantization(args)?;
    // As in training: an init built from the full-precision weights, and a mixed-precision plan, run before
    // the base is quantised.
    let adapter_cfg = match args.adapter()? {
        Some(a) => Some(factune_adapters::AdapterConfig::from_file(
            &a.join(peft::CONFIG_FILE),
        )?),
        None => None,
    };
    let after_init = adapter_cfg.as_ref().is_some_and(|c| c.init_reads_base()) || mixed.is_some();
    let opts = factune_model::LoadOptions::planned(
        quantize,
        after_init,
        factune_model::LoadOptions::dtype_named(&args.base_dtype)
            .unwrap_or(candle_core::DType::F32),
    );
    let mut model = Model::load_with(&args.model, &dev, opts)?;
    if let (Some(budget), Some(c), Some(o)) = (mixed, &adapter_cfg, quantize) {
        factune_adapters::lqlora::plan(&mut model, c, budget, o.double_quant)?;
    }
    if let Some(a) = args.adapter()? {
        let (cfg, report) = peft::load(&mut model, a, args.allow_partial)?;
        if let Some(o) = quantize {
            model.quantize_linears(o)?;
        }
        let shape = match (&model.prompt, &cfg.method) {
            (Some(p), _) => format!("{} virtual tokens", p.num_virtual_tokens()),
            (None, factune_adapters::MethodConfig::Said(s)) => {
                format!("d={}", s.intrinsic_dimension)
            }
            (None, _) => format!("r={}", cfg.r),
        };
        eprintln!(
            "adapter {} ({}, {shape}): {report}",
            a.display(),
            cfg.peft_type()
        );
    }
    Ok(model)
}

/// [`load_model`] plus the model's tokenizer.
pub fn load(args: &ModelArgs) -> Result<(Model, TextTokenizer)> {
    let model = load_model(args)?;
    Ok((model, TextTokenizer::from_dir(&args.model)?))
}

/// Runs a training job with the terminal's progress bar, then draws the run's plots.
pub fn run_training(
    model: &mut Model,
    tokenizer: &TextTokenizer,
    config: TrainConfig,
    data: &Path,
    out: &Path,
    (resume, override_schedule): (Option<PathBuf>, bool),
) -> Result<TrainOutcome> {
    let bar = crate::progress::Bar::for_stderr();
    let outcome = TrainJob {
        model,
        tokenizer,
        config,
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        resume,
        override_schedule,
        progress: &bar,
    }
    .run()?;
    crate::plot::run_plots(out)?;
    Ok(outcome)
}

/// The TOML file and flags over the defaults, and the keys they name.
pub(crate) fn resolve_config(
    config: Option<&Path>,
    overrides: &TrainOverrides,
) -> Result<(TrainConfig, Vec<String>)> {
    let (mut cfg, mut given) = match config {
        Some(p) => TrainConfig::from_toml_file_with_keys(p)?,
        None => (TrainConfig::default(), vec![]),
    };
    overrides.apply(&mut cfg);
    given.extend(overrides.given());
    cfg.settle_length(&given);
    Ok((cfg, given))
}

/// `train --print-config`: the config a run would use, as TOML.
pub fn print_config(config: Option<&Path>, overrides: &TrainOverrides) -> Result<()> {
    let (cfg, _) = resolve_config(config, overrides)?;
    cfg.validate()?;
    print!("{}", cfg.resolved_toml()?);
    Ok(())
}

pub fn train(
    model_dir: &Path,
    data: &Path,
    config: Option<&Path>,
    (output, overwrite): (&Path, bool),
    (resume, override_schedule): (Option<PathBuf>, bool),
    dev: &str,
    overrides: &TrainOverrides,
) -> Result<()> {
    let (mut cfg, given) = resolve_config(config, overrides)?;
    if let Some(ckpt) = &resume {
        // The checkpoint's settings, with what may change (length, cadence) taken from this command.
        let (saved, steps) = factune_train::checkpoint_state(ckpt)?;
        cfg =
            factune_train::resume::resumed_config(&saved, &cfg, &given, steps, override_schedule)?;
        let length = match cfg.max_steps {
            -1 => format!("num_train_epochs {}", cfg.num_train_epochs),
            n => format!("{n} steps"),
        };
        eprintln!(
            "resuming {} at step {steps} ({length}) with its saved settings",
            ckpt.display()
        );
    }
    // Everything that can be checked without the weights is checked before they load.
    cfg.validate()?;
    readable_data(data)?;
    if !cfg.eval_data.is_empty() {
        readable_data(Path::new(&cfg.eval_data))?;
    }
    outside_model(output, model_dir)?;
    if resume.is_none() && factune_train::holds_run(output) {
        if !overwrite {
            bail!(
                "{} already holds a training run (run.json, checkpoint-N): pass --resume {}/checkpoint-N to \
                 continue it, --overwrite to replace it, or another --output",
                output.display(),
                output.display()
            );
        }
        let n = factune_train::clear_run(output)?;
        eprintln!(
            "--overwrite: removed the earlier run in {} ({n} entries)",
            output.display()
        );
    }
    // Quantise while loading, so the dense weights never sit in memory all at once; inits built from the
    // full-precision weights (PiSSA, LoftQ, DoTA) need them dense, and the trainer quantises after them.
    let opts =
        cfg.load_options(cfg.adapter_config()?.init_reads_base() || cfg.mixed_budget().is_some());
    let mut model = Model::load_with(model_dir, &device(dev)?, opts)?;
    let tok = TextTokenizer::from_dir(model_dir)?;
    let outcome = run_training(
        &mut model,
        &tok,
        cfg,
        data,
        output,
        (resume, override_schedule),
    )?;
    println!(
        "trained {} steps in {:.1}s ({:.0} tokens/s): train loss {:.4}{}",
        outcome.steps,
        outcome.seconds,
        outcome.tokens as f64 / outcome.seconds,
        outcome.final_train_loss,
        outcome
            .final_val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default()
    );
    let what = if outcome.full_model {
        "full model (base tensors were trained)"
    } else {
        "adapter"
    };
    println!(
        "{what} written to {}; peak RSS {:.0} MB",
        output.display(),
        crate::bench::peak_rss_mb()
    );
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PretrainFile {
    model: ArchSpec,
    training: TrainConfig,
    #[serde(default)]
    tokenizer_vocab_size: Option<usize>,
}

pub fn pretrain(
    config: &Path,
    data: &Path,
    output: &Path,
    overrides: &TrainOverrides,
) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut file: PretrainFile = toml::from_str(&text)
        .with_context(|| format!("{}: invalid pretrain config", config.display()))?;
    // Pre-training is full-rank unless the file picks an adapter method (LoRA / ReLoRA pre-training).
    let raw: toml::Value = toml::from_str(&text)
        .with_context(|| format!("{}: invalid pretrain config", config.display()))?;
    let mut given: Vec<String> = raw
        .get("training")
        .and_then(|t| t.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    if !given.iter().any(|k| k == "peft_type") {
        file.training.peft_type = factune_train::PeftType::Full;
    }
    overrides.apply(&mut file.training);
    given.extend(overrides.given());
    file.training.settle_length(&given);
    file.training.validate()?;
    // pre-training reads one text corpus (its tokenizer is trained on it)
    if !data.is_file() {
        readable_data(data)?;
        bail!(
            "{}: pre-training reads one text file, not a directory",
            data.display()
        );
    }
    let vocab = file.tokenizer_vocab_size.unwrap_or(file.model.vocab_size);
    let actual = train_tokenizer(data, vocab, output)?;
    file.model.vocab_size = actual;
    let tok = TextTokenizer::from_dir(output)?;
    let eos = tok
        .token_id(EOS)
        .context("trained tokenizer lacks its EOS token")?;
    init_model(&file.model, eos, file.training.seed, output)?;
    let mut model = Model::load(output, &Device::Cpu)?;
    eprintln!(
        "tokenizer: {actual} tokens; model: {} parameters",
        model.num_base_parameters()
    );
    let outcome = run_training(&mut model, &tok, file.training, data, output, (None, false))?;
    println!(
        "pre-trained {} steps in {:.0}s: train loss {:.4}{}; peak RSS {:.0} MB; model written to {}",
        outcome.steps,
        outcome.seconds,
        outcome.final_train_loss,
        outcome
            .final_val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        crate::bench::peak_rss_mb(),
        output.display()
    );
    Ok(())
}

/// An output directory that is not the model's and does not contain it: writing there would replace the base
/// model's own files (a full fine-tune or a merge writes `model.safetensors`).
pub fn outside_model(output: &Path, model: &Path) -> Result<()> {
    // Where the output would be once created: its nearest existing ancestor, resolved, plus the rest.
    fn resolved(p: &Path) -> PathBuf {
        let mut missing = Vec::new();
        let mut cur = p.to_path_buf();
        loop {
            if let Ok(real) = cur.canonicalize() {
                return missing.iter().rev().fold(real, |acc, part| acc.join(part));
            }
            match (cur.file_name().map(|n| n.to_os_string()), cur.parent()) {
                (Some(name), Some(parent)) => {
                    missing.push(name);
                    cur = if parent.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        parent.to_path_buf()
                    };
                }
                _ => return p.to_path_buf(),
            }
        }
    }
    let (out, model) = (resolved(output), resolved(model));
    if model.starts_with(&out) {
        bail!(
            "--output {} is the model directory {} or contains it: the run would overwrite the base model; \
             choose another output directory",
            output.display(),
            model.display()
        );
    }
    Ok(())
}

/// Training data that exists: a file, or a directory of Parquet files; named in the error otherwise.
pub(crate) fn readable_data(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.is_dir() => Ok(()),
        Ok(_) => bail!(
            "{}: not a file (expected the training data)",
            path.display()
        ),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}
