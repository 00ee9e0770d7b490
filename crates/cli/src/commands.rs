//! The subcommands: thin glue from flags to the library crates.

use crate::flags::TrainOverrides;
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use factune_adapters::peft;
use factune_adapters::registry::Attachment;
use factune_eval::{exact_match, generate as gen, multiple_choice, perplexity, GenConfig};
use factune_io::{ChatMessage, TextTokenizer, Weights};
use factune_model::{Ctx, Model, Nf4Options};
use factune_train::pretrain::{init_model, train_tokenizer, ArchSpec, EOS};
use factune_train::{TrainConfig, TrainJob, TrainOutcome};
use serde_json::json;
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

/// The training keys a TOML file sets (aliases as the keys they stand for).
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

/// What `factune eval` was asked for, beside the model.
pub struct EvalSettings<'a> {
    pub data: &'a Path,
    pub task: &'a str,
    pub as_json: bool,
    pub seq_len: usize,
    pub batch: usize,
    pub max_new_tokens: usize,
    pub limit: usize,
    /// Focused prefix tuning: the general prefix and α.
    pub contrast: Option<(PathBuf, f64)>,
}

pub fn eval(args: &ModelArgs, settings: &EvalSettings) -> Result<()> {
    let EvalSettings {
        data,
        task,
        as_json,
        seq_len,
        batch,
        max_new_tokens,
        limit,
        ..
    } = *settings;
    if let Some(named) = args.named_adapters()? {
        if settings.contrast.is_some() {
            bail!("--contrast-adapter takes one --adapter DIR (the specific prefix), not named adapters");
        }
        return crate::routed::eval(args, &named, settings);
    }
    if let Some((general, weight)) = &settings.contrast {
        return eval_focused(args, settings, general, *weight);
    }
    let (model, tok) = load(args)?;
    let data = factune_eval::EvalData::read(data)?;
    let task = factune_eval::task_for(task, &data);
    match task {
        "perplexity" => {
            let p = perplexity(&model, &tok, data, seq_len, batch)?;
            if !p.loss.is_finite() {
                bail!(
                    "the loss is {} over {} tokens: {}",
                    p.loss,
                    p.tokens,
                    non_finite_cause(&model)?
                );
            }
            if let Some(line) = p.truncation.summary(seq_len.min(model.max_positions())) {
                eprintln!("note: {line}");
            }
            if as_json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                let acc = p
                    .token_accuracy
                    .map_or(String::new(), |a| format!("  next-token accuracy {a:.4}"));
                println!(
                    "loss {:.4}  perplexity {:.3}  over {} tokens{acc}",
                    p.loss, p.perplexity, p.tokens
                );
            }
        }
        "mc" => {
            let a = multiple_choice(&model, &tok, data)?;
            if as_json {
                println!(
                    "{}",
                    json!({"accuracy": a.accuracy, "accuracy_norm": a.accuracy_norm, "n": a.n})
                );
            } else {
                println!(
                    "accuracy {:.4}  accuracy_norm {:.4}  over {} questions",
                    a.accuracy, a.accuracy_norm, a.n
                );
            }
        }
        "exact-match" => {
            let e = exact_match(&model, &tok, data, max_new_tokens, limit)?;
            if as_json {
                println!("{}", json!({"exact_match": e.exact_match, "n": e.n}));
            } else {
                println!("exact match {:.4} over {} records", e.exact_match, e.n);
            }
        }
        other => bail!("unknown task `{other}`: expected auto, perplexity, mc or exact-match"),
    }
    Ok(())
}

/// `eval --contrast-adapter`: perplexity or exact match under focused prefix tuning's contrast.
fn eval_focused(args: &ModelArgs, s: &EvalSettings, general: &Path, weight: f64) -> Result<()> {
    let (mut model, tok) = load(args)?;
    let mut general = general_prefix(&mut model, general, weight)?;
    let data = factune_eval::EvalData::read(s.data)?;
    let task = factune_eval::task_for(s.task, &data);
    match task {
        "perplexity" => {
            let p = factune_eval::focused::perplexity(&mut model, &mut general, weight, &tok, data, s.seq_len)?;
            if !p.loss.is_finite() {
                bail!("the contrasted loss is {} over {} tokens", p.loss, p.tokens);
            }
            if s.as_json {
                println!("{}", json!({"loss": p.loss, "perplexity": p.perplexity, "tokens": p.tokens, "contrast_weight": weight}));
            } else {
                println!("loss {:.4}  perplexity {:.3}  over {} tokens (contrast α = {weight})", p.loss, p.perplexity, p.tokens);
            }
        }
        "exact-match" => {
            let e = factune_eval::focused::exact_match(&mut model, &mut general, weight, &tok, data, s.max_new_tokens, s.limit)?;
            if s.as_json {
                println!("{}", json!({"exact_match": e.exact_match, "n": e.n, "contrast_weight": weight}));
            } else {
                println!("exact match {:.4} over {} records (contrast α = {weight})", e.exact_match, e.n);
            }
        }
        other => bail!("task `{other}` with --contrast-adapter: perplexity and exact-match score under the contrast"),
    }
    Ok(())
}

/// Why a model computes non-finite values: the first weight holding NaN or Inf, or else its config.
fn non_finite_cause(model: &Model) -> Result<String> {
    for (name, t) in model.named_tensors() {
        let finite = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            return Ok(format!("tensor `{name}` holds NaN or infinite values"));
        }
    }
    Ok(format!(
        "every weight is finite, so the values in {} (rope_theta, norm epsilon, rope_scaling) are the likely cause",
        model.dir.join("config.json").display()
    ))
}

/// The prompt's token ids (wrapped as a user message with the chat template when `chat`), refused when empty
/// or when it leaves no room in the context.
pub fn prompt_ids(
    model: &Model,
    tok: &TextTokenizer,
    prompt: &str,
    chat: bool,
) -> Result<Vec<u32>> {
    let text = if chat {
        tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
            true,
        )?
    } else {
        prompt.to_string()
    };
    let ids = tok.encode(&text, true)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let context = model.max_positions();
    if ids.len() >= context {
        bail!(
            "the prompt is {} tokens and fills the model's context of {context} positions \
             (max_position_embeddings): nothing can be generated; shorten the prompt",
            ids.len()
        );
    }
    Ok(ids)
}

/// The tokens that end a generation: the model's and tokenizer's EOS, and the extra end-of-turn tokens chat
/// models list in generation_config.json.
pub fn stop_ids(args: &ModelArgs, model: &Model, tok: &TextTokenizer) -> Result<Vec<u32>> {
    let mut stop: Vec<u32> = model.cfg.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    let gen_cfg = args.model.join("generation_config.json");
    if gen_cfg.exists() {
        let v: serde_json::Value = factune_io::error::read_json(&gen_cfg)?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => stop.extend(n.as_u64().map(|x| x as u32)),
            Some(serde_json::Value::Array(a)) => {
                stop.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
            }
            _ => {}
        }
    }
    Ok(stop)
}

pub fn generate(
    args: &ModelArgs,
    prompt: &str,
    chat: bool,
    settings: GenConfig,
    contrast: Option<(PathBuf, f64)>,
) -> Result<()> {
    let max_new_tokens = settings.max_new_tokens;
    let (mut model, tok) = load(args)?;
    let mut general = match &contrast {
        Some((dir, weight)) => Some(general_prefix(&mut model, dir, *weight)?),
        None => None,
    };
    let ids = prompt_ids(&model, &tok, prompt, chat)?;
    let context = model.max_positions();
    let stop = stop_ids(args, &model, &tok)?;
    let gen_cfg = GenConfig {
        stop_ids: stop.clone(),
        ..settings
    };
    let out = match (&mut general, &contrast) {
        (Some(g), Some((_, weight))) => {
            factune_eval::generate_focused(&mut model, g, *weight, &ids, &gen_cfg)?
        }
        _ => gen(&model, &ids, &gen_cfg)?,
    };
    let stopped = out.last().is_some_and(|t| stop.contains(t));
    if !stopped && out.len() < max_new_tokens && ids.len() + out.len() >= context {
        eprintln!(
            "stopped after {} of {max_new_tokens} new tokens: the model's context of {context} positions is full",
            out.len()
        );
    }
    println!(
        "{}{}",
        if chat {
            String::new()
        } else {
            prompt.to_string()
        },
        tok.decode(&out)?
    );
    Ok(())
}

/// Focused prefix tuning's general prefix, loaded from `dir` beside the model's own (specific) one.
fn general_prefix(
    model: &mut Model,
    dir: &Path,
    weight: f64,
) -> Result<Option<Box<dyn factune_model::PromptAdapter>>> {
    if model.prompt.is_none() {
        bail!("--contrast-adapter (focused prefix tuning) needs --adapter to be a prompt-family adapter (the attribute-specific prefix)");
    }
    if !weight.is_finite() || weight < 0.0 {
        bail!("--contrast-weight {weight}: expected a finite number >= 0");
    }
    let cfg = factune_adapters::AdapterConfig::from_file(&dir.join(peft::CONFIG_FILE))?;
    if !cfg.method.method().attachment().is_prompt() {
        bail!(
            "{}: --contrast-adapter must be a prompt-family adapter (the general prefix), not {}",
            dir.display(),
            cfg.peft_type()
        );
    }
    let specific = model.prompt.take();
    let loaded = peft::load(model, dir, false);
    let general = std::mem::replace(&mut model.prompt, specific);
    loaded?;
    Ok(general)
}

fn probe_ids(model: &Model) -> Result<Tensor> {
    let v = model.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 7919 + 11) % v).collect();
    Ok(Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?)
}

pub fn merge(args: &ModelArgs, output: &Path, verify: bool) -> Result<()> {
    if args.adapter()?.is_none() {
        bail!("merge needs --adapter");
    }
    outside_model(output, &args.model)?;
    let mut model = load_model(args)?;
    if let Some(p) = &model.prompt {
        bail!(
            "{} adds {} virtual tokens and changes no weight: there is nothing to merge; use the adapter as \
             --adapter with eval and generate (or PEFT's PeftModel.from_pretrained)",
            p.method(),
            p.num_virtual_tokens()
        );
    }
    let before = if verify {
        Some(model.forward(&probe_ids(&model)?, None, &Ctx::default())?)
    } else {
        None
    };
    // Held in 4 bits: every weight is written as the dequantised one the adapter was trained on.
    let quantized = !model.quantized_keys().is_empty();
    let mut merged = 0;
    for l in model.linears_mut() {
        if l.fold()?.is_some() {
            merged += 1;
        }
    }
    if merged == 0 {
        bail!(
            "no module was merged: the adapter matched no layer of {}",
            args.model.display()
        );
    }
    let weights = Weights::from_model_dir(&args.model)?;
    let into = if quantized {
        "into the 4-bit base as trained: deq(Q) + s·BA in f32, written dense in f32"
    } else {
        "W + s·BA in f32, cast once to the stored dtype"
    };
    if quantized {
        factune_model::save::save_pretrained(&model, output, candle_core::DType::F32, &args.model)?;
    } else {
        factune_model::save::save_merged(&model, &weights, output)?;
    }
    println!("merged {merged} modules ({into}) into {}", output.display());
    if let Some(before) = before {
        let reloaded = Model::load(output, &model.device)?;
        let after = reloaded.forward(&probe_ids(&reloaded)?, None, &Ctx::default())?;
        let d = (after - before)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        println!("verify: max |logits(merged) - logits(base + adapter)| = {d:.3e}");
    }
    Ok(())
}

pub fn quantize(dir: &Path, output: &Path, double_quant: bool) -> Result<()> {
    outside_model(output, dir)?;
    let t0 = std::time::Instant::now();
    let model = Model::load_with(dir, &Device::Cpu, Some(Nf4Options { double_quant }))?;
    let weights = Weights::from_model_dir(dir)?;
    let dense_bytes: usize = model
        .linears()
        .iter()
        .filter_map(|l| weights.info(&l.source_key))
        .map(|(shape, dt)| shape.iter().product::<usize>() * dt.bitsize() / 8)
        .sum();
    factune_model::save::save_quantized(&model, &weights, output)?;
    let (mut bits, mut params) = (0.0, 0usize);
    for l in model.linears() {
        if let Some(q) = l.base.weight.as_nf() {
            bits += q.bits_per_param() * (q.rows * q.cols) as f64;
            params += q.rows * q.cols;
        }
    }
    println!(
        "quantised {} linear weights ({} parameters) to NF4{}: {:.3} bits per weight, {:.1} MB -> {:.1} MB \
         in {:.1}s; embeddings, norms and the LM head kept as stored; written to {}",
        model.quantized_keys().len(),
        peft::thousands(params),
        if double_quant { " with double-quantised scales" } else { "" },
        bits / params.max(1) as f64,
        dense_bytes as f64 / 1e6,
        model.linear_weight_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

pub fn inspect(dir: &Path) -> Result<()> {
    let adapter_cfg = dir.join(peft::CONFIG_FILE);
    if adapter_cfg.exists() {
        let cfg = factune_adapters::AdapterConfig::from_file(&adapter_cfg)?;
        let w = Weights::from_files(&[dir.join(peft::WEIGHTS_FILE)])?;
        // trainable values only: shared projections and sparse indices are not parameters
        let params: usize = w
            .names()
            .filter(|n| !n.starts_with("base_model.vera_") && !n.ends_with("sparse_indices"))
            .filter_map(|n| w.info(n))
            .map(|(s, _)| s.iter().product::<usize>())
            .sum();
        println!("adapter: {}", dir.display());
        match cfg.method.method().attachment() {
            Attachment::Prompt(_) => {
                println!(
                    "  method: {} (adds positions, adapts no weight)",
                    cfg.peft_type()
                );
                let settings: Vec<String> = cfg
                    .method
                    .defaults()
                    .into_iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                println!("  {}", settings.join("  "));
                println!("  trainable params: {params}");
            }
            Attachment::Linear(m) => {
                let modules = match m.tensor_names(&cfg).first() {
                    Some(first) => w.names().filter(|n| n.ends_with(first)).count(),
                    None => 0,
                };
                println!(
                    "  method: {}{}",
                    cfg.peft_type(),
                    if cfg.use_rslora {
                        " (rsLoRA scaling)"
                    } else {
                        ""
                    }
                );
                match &cfg.method {
                    factune_adapters::MethodConfig::Mpo(m) => println!(
                        "  bond_dim: {}  mpo_modes: {}  init_weights: {}  dropout: {}",
                        m.bond_dim, m.mpo_modes, m.init_weights, cfg.lora_dropout
                    ),
                    factune_adapters::MethodConfig::Said(m) => println!(
                        "  intrinsic_dimension: {}  structure_aware: {}  fastfood_seed: {}",
                        m.intrinsic_dimension, m.structure_aware, m.fastfood_seed
                    ),
                    _ => println!(
                        "  r: {}  lora_alpha: {}  lora_dropout: {}",
                        cfg.r, cfg.lora_alpha, cfg.lora_dropout
                    ),
                }
                println!("  target_modules: {:?}", cfg.target_modules);
                println!("  adapted modules: {modules}  trainable params: {params}");
            }
        }
        println!(
            "  base model: {}",
            cfg.base_model_name_or_path.unwrap_or_default()
        );
        return Ok(());
    }
    let cfg = factune_io::ModelConfig::from_file(&dir.join("config.json"))?;
    let w = Weights::from_model_dir(dir)?;
    println!("model: {}", dir.display());
    println!("  architecture: {} ({:?} family)", cfg.model_type, cfg.arch);
    println!(
        "  layers {}  hidden {}  intermediate {}  heads {} (kv {})  head_dim {}  vocab {}  context {}",
        cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        cfg.vocab_size, cfg.max_position_embeddings
    );
    println!(
        "  tied embeddings: {}  parameters: {}",
        cfg.tie_word_embeddings,
        cfg.num_parameters()
    );
    println!("  stored dtypes (elements): {:?}", w.dtype_summary());
    let model = Model::from_weights(cfg, &w, dir, &Device::Cpu, Default::default())?;
    let quantized = model.quantized_keys().len();
    if quantized > 0 {
        let (mut bits, mut n) = (0.0, 0usize);
        for q in model.linears().iter().filter_map(|l| l.base.weight.as_nf()) {
            bits += q.bits_per_param() * (q.rows * q.cols) as f64;
            n += q.rows * q.cols;
        }
        println!(
            "  4-bit NF4 linear weights: {quantized} of {} ({:.3} bits per weight)",
            model.linears().len(),
            bits / n as f64
        );
    }
    let names: std::collections::BTreeSet<String> = model
        .linears()
        .iter()
        .map(|l| l.path.rsplit('.').next().unwrap_or("").to_string())
        .collect();
    println!(
        "  adaptable modules: {}",
        names.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// One PNG comparing a metric across runs: each `LABEL=RUN_DIR` (or a bare directory, labelled by its name)
/// contributes the `key` series of its metrics.jsonl; `exp` plots e^value (perplexity from a loss).
pub fn plot(runs: &[String], key: &str, exp: bool, title: &str, output: &Path) -> Result<()> {
    let mut curves = Vec::new();
    for spec in runs {
        let (label, dir) = match spec.split_once('=') {
            Some((l, d)) => (l.to_string(), PathBuf::from(d)),
            None => {
                let d = PathBuf::from(spec);
                let name = d
                    .file_name()
                    .map_or(spec.clone(), |n| n.to_string_lossy().into_owned());
                (name, d)
            }
        };
        let path = dir.join("metrics.jsonl");
        let mut pts = factune_train::metrics::series(&path, key)?;
        if pts.is_empty() {
            bail!("{}: no `{key}` values", path.display());
        }
        if exp {
            pts.iter_mut().for_each(|p| p.1 = p.1.exp());
        }
        curves.push((label, pts));
    }
    let refs: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(l, c)| (l.as_str(), c.clone()))
        .collect();
    let y = if exp {
        format!("exp({key})")
    } else {
        key.to_string()
    };
    let axes = crate::plot::Axes { x: "step", y: &y };
    crate::plot::plot_curves(output, title, &axes, &refs)?;
    println!("wrote {}", output.display());
    Ok(())
}
