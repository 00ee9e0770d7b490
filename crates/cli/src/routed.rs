//! `factune eval --adapter NAME=DIR …`: several adapters on one base, each record scored by the adapter its
//! `adapter` field names (`factune_eval::routed`).

use crate::commands::load;
use crate::ModelArgs;
use anyhow::{bail, Result};
use factune_adapters::multi::AdapterSet;
use factune_eval::routed;
use serde_json::json;
use std::path::{Path, PathBuf};

pub struct EvalSettings<'a> {
    pub data: &'a Path,
    pub task: &'a str,
    pub as_json: bool,
    pub seq_len: usize,
    pub batch: usize,
    pub max_new_tokens: usize,
    pub limit: usize,
}

pub fn eval(args: &ModelArgs, named: &[(String, PathBuf)], s: &EvalSettings) -> Result<()> {
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
    let data = factune_eval::EvalData::read(s.data)?;
    let task = if s.task == "auto" {
        factune_eval::detect_task(&data)
    } else {
        s.task
    };
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
