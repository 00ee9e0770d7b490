//! Evaluation with several adapters loaded at once, each record scored under the adapter its `adapter` field
//! names (absent or null: the base alone). Perplexity batches rows of different adapters together through
//! the routed path of `factune_adapters::multi`; exact match switches adapters record by record (generation
//! runs one sequence at a time anyway).

use crate::tasks::{records, Answerer, EvalData, ExactMatch};
use factune_adapters::multi::AdapterSet;
use factune_data::source::Contents;
use factune_data::{collate, to_tensor, DataOptions, Dataset, Example, Record};
use factune_io::{Error, Result, TextTokenizer};
use factune_model::{Ctx, Model};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The field naming a record's adapter.
pub const FIELD: &str = "adapter";

/// The adapter a record's or prompt's `adapter` value names, checked against the loaded names (absent or
/// null: the base alone); the error says what was found.
pub fn choice(
    value: Option<Value>,
    set: &AdapterSet,
) -> std::result::Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) if set.names().contains(&name) => Ok(Some(name)),
        Some(Value::String(name)) => Err(format!(
            "`{FIELD}: {name}` is not among the loaded adapters ({})",
            set.names().join(", ")
        )),
        Some(other) => Err(format!(
            "`{FIELD}` is {other}, expected an adapter name or null"
        )),
    }
}

/// Takes a record's adapter choice out of it (so the record's shape is read without it).
pub(crate) fn take_choice(r: &mut Record, set: &AdapterSet, file: &Path) -> Result<Option<String>> {
    choice(r.fields.remove(FIELD), set).map_err(|e| Error::invalid(file, format!("{}: {e}", r.at)))
}

#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

impl Scored {
    fn from_sum(sum: f64, tokens: usize) -> Self {
        let loss = sum / tokens.max(1) as f64;
        Scored {
            loss,
            perplexity: loss.exp(),
            tokens,
        }
    }
}

/// Perplexity over all records, and per adapter (`base` for records without one).
#[derive(Debug, Clone, Serialize)]
pub struct RoutedPerplexity {
    pub all: Scored,
    pub by_adapter: BTreeMap<String, Scored>,
}

pub fn perplexity(
    model: &Model,
    set: &AdapterSet,
    tok: &TextTokenizer,
    data: EvalData,
    seq_len: usize,
    batch: usize,
) -> Result<RoutedPerplexity> {
    let file = data.path.clone();
    let mut groups: BTreeMap<Option<String>, Vec<Record>> = BTreeMap::new();
    for mut r in records(data, "per-record adapters")? {
        let choice = take_choice(&mut r, set, &file)?;
        groups.entry(choice).or_default().push(r);
    }
    let opts = DataOptions::eval(seq_len.min(model.max_positions()));
    let mut queues: Vec<(Option<String>, std::vec::IntoIter<Example>)> = Vec::new();
    for (choice, recs) in groups {
        let ds = Dataset::from_contents(Contents::Records(recs), &file, &opts, tok)?;
        queues.push((choice, ds.examples.into_iter()));
    }
    // rows of every adapter interleaved, so batches mix them
    let mut rows: Vec<(Option<String>, Example)> = Vec::new();
    loop {
        let before = rows.len();
        for (choice, q) in &mut queues {
            if let Some(e) = q.next() {
                rows.push((choice.clone(), e));
            }
        }
        if rows.len() == before {
            break;
        }
    }
    let pad = tok.eos_id().unwrap_or(0);
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for chunk in rows.chunks(batch.max(1)) {
        let names: Vec<Option<&str>> = chunk.iter().map(|(c, _)| c.as_deref()).collect();
        set.route_rows(&names)?;
        let refs: Vec<&Example> = chunk.iter().map(|(_, e)| e).collect();
        let (ids, labels) = collate(&refs, pad);
        let hidden = model
            .forward_hidden(&to_tensor(&ids, &model.device)?, None, &Ctx::default())?
            .detach();
        let mut seen: Vec<Option<&str>> = names.clone();
        seen.sort();
        seen.dedup();
        for who in seen {
            let own: Vec<Vec<i64>> = labels
                .iter()
                .zip(&names)
                .map(|(l, n)| {
                    if *n == who {
                        l.clone()
                    } else {
                        vec![-100; l.len()]
                    }
                })
                .collect();
            let (loss, n) = model.lm_loss(&hidden, &own)?;
            if n == 0 {
                continue;
            }
            let e = sums.entry(who.unwrap_or("base").to_string()).or_default();
            e.0 += loss.to_scalar::<f32>()? as f64 * n as f64;
            e.1 += n;
        }
    }
    set.set_adapter(None)?;
    let (sum, tokens) = sums
        .values()
        .fold((0.0, 0), |(s, t), (a, b)| (s + a, t + b));
    Ok(RoutedPerplexity {
        all: Scored::from_sum(sum, tokens),
        by_adapter: sums
            .into_iter()
            .map(|(k, (s, t))| (k, Scored::from_sum(s, t)))
            .collect(),
    })
}

/// Exact match with each record answered by the adapter it names.
pub fn exact_match(
    model: &Model,
    set: &AdapterSet,
    tok: &TextTokenizer,
    data: EvalData,
    max_new_tokens: usize,
    limit: usize,
) -> Result<ExactMatch> {
    let file = data.path.clone();
    let mut recs = records(data, "exact match")?;
    let choices = recs
        .iter_mut()
        .map(|r| take_choice(r, set, &file))
        .collect::<Result<Vec<_>>>()?;
    let answer = Answerer {
        tok,
        eos: &model.cfg.eos_token_ids,
        max_new_tokens,
        limit,
    };
    let out = answer.score(
        recs,
        &file,
        |i, _| set.set_adapter(choices[i].as_deref()),
        |ids, cfg| crate::generate(model, ids, cfg),
    );
    set.set_adapter(None)?;
    out
}
