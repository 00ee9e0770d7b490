//! Evaluation tasks: perplexity on text, multiple-choice by log-likelihood (plain and length-normalised, as
//! lm-evaluation-harness's acc / acc_norm), and exact match of generated answers.

use crate::generate::{generate, GenConfig};
use candle_core::{Tensor, D};
use factune_data::{alpaca_prompt, evaluate_loss, Dataset};
use factune_io::{Error, Result, TextTokenizer};
use factune_model::{Ctx, Model};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Token-weighted loss and perplexity of a text file (packed into `seq_len` blocks) or of the responses of
/// an alpaca/chat JSONL file.
pub fn perplexity(
    model: &Model,
    tok: &TextTokenizer,
    file: &Path,
    seq_len: usize,
    batch: usize,
) -> Result<Perplexity> {
    let seq_len = seq_len.min(model.max_positions());
    let ds = Dataset::load(file, factune_data::DataFormat::Auto, tok, seq_len, false)?;
    let (loss, tokens) = evaluate_loss(model, &ds.examples, batch, tok.eos_id().unwrap_or(0))?;
    Ok(Perplexity {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub accuracy: f64,
    pub accuracy_norm: f64,
    pub n: usize,
}

/// Sum of log-probabilities of `cont` after `ctx`.
fn continuation_logprob(model: &Model, ctx: &[u32], cont: &[u32]) -> Result<f64> {
    let all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    if all.len() > model.max_positions() {
        return Err(Error::config(format!(
            "question + choice is {} tokens, longer than the model's context of {}",
            all.len(),
            model.max_positions()
        )));
    }
    let ids = Tensor::new(all.as_slice(), &model.device)?.unsqueeze(0)?;
    let logits = model.forward(&ids, None, &Ctx::default())?.squeeze(0)?;
    let lsm = log_softmax(&logits)?;
    let mut total = 0f64;
    for (k, &t) in cont.iter().enumerate() {
        let pos = ctx.len() + k - 1;
        total += lsm.get(pos)?.get(t as usize)?.to_scalar::<f32>()? as f64;
    }
    Ok(total)
}

fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let s = x.broadcast_sub(&m)?;
    s.broadcast_sub(&s.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Multiple-choice JSONL: `{"question": …, "choices": [...], "answer": index}`. Each choice is scored as the
/// continuation `" " + choice` of the question; `accuracy_norm` divides by the choice's byte length.
pub fn multiple_choice(model: &Model, tok: &TextTokenizer, file: &Path) -> Result<Accuracy> {
    let text = factune_io::error::read_to_string(file)?;
    let (mut n, mut hit, mut hit_norm) = (0usize, 0usize, 0usize);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| Error::invalid(file, format!("line {}: {what}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let q = v
            .get("question")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing string `question`".into()))?;
        let choices: Vec<&str> = v
            .get("choices")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .ok_or_else(|| bad("missing array `choices`".into()))?;
        let answer = v
            .get("answer")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("missing integer `answer`".into()))? as usize;
        if answer >= choices.len() || choices.len() < 2 {
            return Err(bad(format!(
                "`answer` {answer} must index one of at least two choices"
            )));
        }
        let ctx = tok.encode(q, true)?;
        if ctx.is_empty() {
            return Err(bad("empty question".into()));
        }
        let mut best = (f64::NEG_INFINITY, 0);
        let mut best_norm = (f64::NEG_INFINITY, 0);
        for (c, choice) in choices.iter().enumerate() {
            let full = tok.encode(&format!("{q} {choice}"), true)?;
            // Tokens of the choice are those after the shared prefix with the question alone.
            let shared = ctx
                .iter()
                .zip(&full)
                .take_while(|(a, b)| a == b)
                .count()
                .max(1);
            let lp = continuation_logprob(model, &full[..shared], &full[shared..])?;
            if lp > best.0 {
                best = (lp, c);
            }
            let norm = lp / (choice.len().max(1) as f64);
            if norm > best_norm.0 {
                best_norm = (norm, c);
            }
        }
        n += 1;
        hit += (best.1 == answer) as usize;
        hit_norm += (best_norm.1 == answer) as usize;
    }
    if n == 0 {
        return Err(Error::invalid(file, "no multiple-choice records"));
    }
    Ok(Accuracy {
        accuracy: hit as f64 / n as f64,
        accuracy_norm: hit_norm as f64 / n as f64,
        n,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ExactMatch {
    pub exact_match: f64,
    pub n: usize,
    /// (prompt, expected, generated) of the first records, for display.
    pub samples: Vec<(String, String, String)>,
}

/// Alpaca JSONL: generates greedily after the alpaca prompt and compares the first line of the answer
/// (trimmed) with `output`.
pub fn exact_match(
    model: &Model,
    tok: &TextTokenizer,
    file: &Path,
    max_new_tokens: usize,
    limit: usize,
) -> Result<ExactMatch> {
    let text = factune_io::error::read_to_string(file)?;
    let mut stop = tok.eos_id().into_iter().collect::<Vec<_>>();
    stop.extend(model.cfg.eos_token_ids.iter().copied());
    let cfg = GenConfig {
        max_new_tokens,
        stop_ids: stop,
        ..GenConfig::default()
    };
    let (mut n, mut hit, mut samples) = (0usize, 0usize, Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || (limit > 0 && n >= limit) {
            continue;
        }
        let bad = |what: String| Error::invalid(file, format!("line {}: {what}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let get = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("missing string `{k}`")))
        };
        let prompt = alpaca_prompt(
            get("instruction")?,
            v.get("input").and_then(Value::as_str).unwrap_or(""),
        );
        let want = get("output")?.trim().to_string();
        let ids = tok.encode(&prompt, true)?;
        let out = generate(model, &ids, &cfg)?;
        let got_full = tok.decode(&out)?;
        let got = got_full.lines().next().unwrap_or("").trim().to_string();
        n += 1;
        hit += (got == want) as usize;
        if samples.len() < 3 {
            samples.push((prompt, want, got_full));
        }
    }
    if n == 0 {
        return Err(Error::invalid(file, "no records"));
    }
    Ok(ExactMatch {
        exact_match: hit as f64 / n as f64,
        n,
        samples,
    })
}
