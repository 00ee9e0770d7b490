//! `factune eval` and `factune generate`: scoring a model (with adapters) on data, and generating from it.

use crate::commands::load;
use crate::ModelArgs;
use anyhow::{bail, Result};
use factune_adapters::peft;
use factune_eval::{exact_match, generate as gen, multiple_choice, perplexity, GenConfig};
use factune_io::{ChatMessage, TextTokenizer};
use factune_model::Model;
use serde_json::json;
use std::path::{Path, PathBuf};

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
