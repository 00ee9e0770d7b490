//! `factune eval` and `factune generate` with `--adapter NAME=DIR …`: several adapters on one base, each record
//! or prompt served by the adapter its `adapter` field names (`factune_eval::routed`).

use crate::commands::load;
use crate::evaluate::EvalSettings;
use crate::ModelArgs;
use anyhow::{bail, Result};
use factune_adapters::multi::AdapterSet;
use factune_eval::routed;
use serde_json::json;
use std::path::{Path, PathBuf};

pub fn eval(args: &ModelArgs, named: &[(String, PathBuf)], s: &EvalSettings) -> Result<()> {
    let (model, tok, set) = with_adapters(args, named)?;
    let data = factune_eval::EvalData::read(s.data)?;
    let task = factune_eval::task_for(s.task, &data);
    match task {
        "perplexity" => {
            let p = routed::perplexity(&model, &set, &tok, data, s.seq_len, s.batch)?;
            if !p.all.loss.is_finite() {
                bail!("the loss is {} over {} tokens", p.all.loss, p.all.tokens);
            }
            if s.as_json {
                println!(
                    "{}",
                    json!({"loss": p.all.loss, "perplexity": p.all.perplexity, "tokens": p.all.tokens,
                           "by_adapter": p.by_adapter})
                );
            } else {
                println!(
                    "loss {:.4}  perplexity {:.3}  over {} tokens",
                    p.all.loss, p.all.perplexity, p.all.tokens
                );
                for (name, r) in &p.by_adapter {
                    println!(
                        "  {name}: loss {:.4}  perplexity {:.3}  over {} tokens",
                        r.loss, r.perplexity, r.tokens
                    );
                }
            }
        }
        "exact-match" => {
            let e = routed::exact_match(&model, &set, &tok, data, s.max_new_tokens, s.limit)?;
            if s.as_json {
                println!("{}", json!({"exact_match": e.exact_match, "n": e.n}));
            } else {
                println!("exact match {:.4} over {} records", e.exact_match, e.n);
            }
        }
        other => bail!(
            "task `{other}` with several adapters: perplexity and exact-match choose an adapter per record"
        ),
    }
    Ok(())
}

/// `generate --adapter NAME=DIR … --prompts FILE`: one JSON object per line (`prompt`, and `adapter` naming a
/// loaded adapter or null for the base); one JSON line out per prompt (`prompt`, `adapter`, `completion`).
/// The adapters stay loaded; each prompt switches to its own.
pub fn generate(
    args: &ModelArgs,
    named: &[(String, PathBuf)],
    prompts: &Path,
    chat: bool,
    settings: factune_eval::GenConfig,
) -> Result<()> {
    let (model, tok, set) = with_adapters(args, named)?;
    let stop = crate::evaluate::stop_ids(args, &model, &tok)?;
    let cfg = factune_eval::GenConfig {
        stop_ids: stop,
        ..settings
    };
    let text = factune_io::error::read_to_string(prompts)?;
    let mut asks = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", prompts.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let Some(prompt) = v.get("prompt").and_then(|p| p.as_str()) else {
            bail!("{}: expected a string `prompt`", at());
        };
        let adapter = routed::choice(v.get(routed::FIELD).cloned(), &set)
            .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        asks.push((prompt.to_string(), adapter));
    }
    if asks.is_empty() {
        bail!("{}: no prompts", prompts.display());
    }
    for (prompt, adapter) in asks {
        set.set_adapter(adapter.as_deref())?;
        let ids = crate::evaluate::prompt_ids(&model, &tok, &prompt, chat)?;
        let out = factune_eval::generate(&model, &ids, &cfg)?;
        println!(
            "{}",
            json!({"prompt": prompt, "adapter": adapter, "completion": tok.decode(&out)?})
        );
    }
    set.set_adapter(None)?;
    Ok(())
}

/// The base (no adapter) with every named adapter loaded into one set.
fn with_adapters(
    args: &ModelArgs,
    named: &[(String, PathBuf)],
) -> Result<(factune_model::Model, factune_io::TextTokenizer, AdapterSet)> {
    let base = ModelArgs {
        adapters: Vec::new(),
        ..args.clone()
    };
    let (mut model, tok) = load(&base)?;
    let mut set = AdapterSet::default();
    for (name, dir) in named {
        let (cfg, report) = set.load_adapter(&mut model, name, dir)?;
        eprintln!(
            "adapter {name} = {} ({}, r={}): {report}",
            dir.display(),
            cfg.peft_type(),
            cfg.r
        );
    }
    Ok((model, tok, set))
}
