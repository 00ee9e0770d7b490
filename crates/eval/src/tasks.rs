//! Evaluation tasks: perplexity on text, multiple-choice by log-likelihood (plain and length-normalised, as
//! lm-evaluation-harness's acc / acc_norm), and exact match of generated answers.

use crate::generate::{generate, GenConfig};
use candle_core::{Tensor, D};
use factune_data::source::{self, Contents, Record};
use factune_data::{
    evaluate_loss, evaluate_loss_and_accuracy, DataFormat, DataOptions, Dataset, Fields, Shape,
    Truncation,
};
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
    /// Next-token accuracy over the learned tokens, for records (instruction and chat data); text is scored
    /// by its loss only (its logits over a long packed block would be large).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_accuracy: Option<f64>,
    /// What cutting examples to the context removed (examples left with no label token are not scored).
    pub truncation: Truncation,
}

/// Token-weighted loss and perplexity of a text file (packed into `seq_len` blocks) or of the responses of
/// an instruction or chat data file.
pub fn perplexity(
    model: &Model,
    tok: &TextTokenizer,
    data: EvalData,
    seq_len: usize,
    batch: usize,
) -> Result<Perplexity> {
    let seq_len = seq_len.min(model.max_positions());
    let ds = Dataset::from_contents(data.contents, &data.path, &DataOptions::eval(seq_len), tok)?;
    let pad = tok.eos_id().unwrap_or(0);
    let (loss, tokens, token_accuracy) = match ds.shape {
        Shape::Text => {
            let (loss, tokens) = evaluate_loss(model, &ds.examples, batch, pad)?;
            (loss, tokens, None)
        }
        _ => {
            let (loss, acc, tokens) = evaluate_loss_and_accuracy(model, &ds.examples, batch, pad)?;
            (loss, tokens, Some(acc))
        }
    };
    Ok(Perplexity {
        loss,
        perplexity: loss.exp(),
        tokens,
        token_accuracy,
        truncation: ds.truncation,
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

/// An evaluation file, read once: its contents and where they came from (named in errors).
#[derive(Clone)]
pub struct EvalData {
    pub path: std::path::PathBuf,
    pub contents: Contents,
}

impl EvalData {
    pub fn read(path: &Path) -> Result<Self> {
        Ok(EvalData {
            path: path.to_path_buf(),
            contents: source::read(path, DataFormat::Auto)?,
        })
    }
}

/// The records of an evaluation file (JSON lines, JSON array, CSV or Parquet), named in the error if it is text.
pub(crate) fn records(data: EvalData, task: &str) -> Result<Vec<Record>> {
    let file = &data.path;
    match data.contents {
        Contents::Records(r) if !r.is_empty() => Ok(r),
        Contents::Records(_) => Err(Error::invalid(file, "no records")),
        Contents::Text(_) => Err(Error::invalid(
            file,
            format!(
                "plain text, but {task} reads records (JSON lines, a JSON array, CSV or Parquet)"
            ),
        )),
    }
}

/// The task asked for: `task` itself, or for `auto` the one the data suggests ([`detect_task`]).
pub fn task_for<'a>(task: &'a str, data: &EvalData) -> &'a str {
    if task == "auto" {
        detect_task(data)
    } else {
        task
    }
}

/// The task a file's first record suggests: `choices` → multiple choice, a prompt with an answer →
/// exact match, anything else (text included) → perplexity.
pub fn detect_task(data: &EvalData) -> &'static str {
    match &data.contents {
        Contents::Records(r) => match r.first() {
            Some(first) if first.fields.contains_key("choices") => "mc",
            Some(first)
                if matches!(
                    Shape::detect(first, &Fields::default()),
                    Ok(Shape::Alpaca | Shape::PromptCompletion)
                ) =>
            {
                "exact-match"
            }
            _ => "perplexity",
        },
        Contents::Text(_) => "perplexity",
    }
}

/// The index of the right choice: `answer` (or `label`) as an index, a letter (`"B"`, `"b"`), a digit string
/// or the choice's text.
fn answer_index(r: &Record, choices: &[&str]) -> std::result::Result<usize, String> {
    let (key, v) = ["answer", "label"]
        .iter()
        .find_map(|k| r.fields.get(*k).map(|v| (*k, v)))
        .ok_or("missing `answer`")?;
    let index = match v {
        Value::Number(n) => n.as_u64().map(|i| i as usize),
        Value::String(s) => {
            let s = s.trim();
            let letter = (s.len() == 1 && s.as_bytes()[0].is_ascii_alphabetic())
                .then(|| (s.as_bytes()[0].to_ascii_uppercase() - b'A') as usize);
            s.parse::<usize>()
                .ok()
                .or(choices.iter().position(|c| c.trim() == s))
                .or(letter)
        }
        _ => None,
    };
    match index {
        Some(i) if i < choices.len() => Ok(i),
        _ => Err(format!(
            "`{key}` {v} is neither an index, a letter nor the text of one of the {} choices",
            choices.len()
        )),
    }
}

/// Multiple-choice records: `{"question": …, "choices": [...], "answer": …}` (answer as an index, a letter or
/// the choice text). Each choice is scored as the continuation `" " + choice` of the question;
/// `accuracy_norm` divides by the choice's byte length.
pub fn multiple_choice(model: &Model, tok: &TextTokenizer, data: EvalData) -> Result<Accuracy> {
    let (mut n, mut hit, mut hit_norm) = (0usize, 0usize, 0usize);
    let file = data.path.clone();
    for r in records(data, "multiple choice")? {
        let bad = |what: String| Error::invalid(&file, format!("{}: {what}", r.at));
        let q = r
            .fields
            .get("question")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing string `question`".into()))?;
        let choices: Vec<&str> = match r.fields.get("choices") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|c| {
                    c.as_str()
                        .ok_or_else(|| bad("`choices` must hold strings".into()))
                })
                .collect::<Result<_>>()?,
            _ => return Err(bad("missing array `choices`".into())),
        };
        if choices.len() < 2 {
            return Err(bad("needs at least two choices".into()));
        }
        let answer = answer_index(&r, &choices).map_err(bad)?;
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

/// Records with a prompt and an answer (alpaca, prompt/completion, chat: the last assistant turn): generates
/// greedily after the prompt and compares the first line of the answer (trimmed) with the expected one.
pub fn exact_match(
    model: &Model,
    tok: &TextTokenizer,
    data: EvalData,
    max_new_tokens: usize,
    limit: usize,
) -> Result<ExactMatch> {
    let file = data.path.clone();
    let records = records(data, "exact match")?;
    let answer = Answerer {
        tok,
        eos: &model.cfg.eos_token_ids,
        max_new_tokens,
        limit,
    };
    answer.score(
        records,
        &file,
        |_, _| Ok(()),
        |ids, cfg| generate(model, ids, cfg),
    )
}

/// How [`exact_match`] answers: greedy generation up to `max_new_tokens`, stopping at an EOS.
pub(crate) struct Answerer<'a> {
    pub tok: &'a TextTokenizer,
    pub eos: &'a [u32],
    pub max_new_tokens: usize,
    pub limit: usize,
}

impl Answerer<'_> {
    /// Exact match over records already read: `before(i, record)` runs before record `i` is answered (to choose
    /// its adapter), `generate(prompt, cfg)` answers it.
    pub(crate) fn score(
        &self,
        records: Vec<Record>,
        file: &Path,
        mut before: impl FnMut(usize, &Record) -> Result<()>,
        mut generate: impl FnMut(&[u32], &GenConfig) -> Result<Vec<u32>>,
    ) -> Result<ExactMatch> {
        let (tok, max_new_tokens, limit) = (self.tok, self.max_new_tokens, self.limit);
        let fields = Fields::default();
        let shape = Shape::detect(&records[0], &fields)
            .map_err(|e| Error::invalid(file, format!("{}: {e}", records[0].at)))?;
        let mut stop = tok.eos_id().into_iter().collect::<Vec<_>>();
        stop.extend(self.eos.iter().copied());
        let cfg = GenConfig {
            max_new_tokens,
            stop_ids: stop,
            ..GenConfig::default()
        };
        let (mut n, mut hit, mut samples) = (0usize, 0usize, Vec::new());
        for (i, r) in records
            .iter()
            .enumerate()
            .take(if limit > 0 { limit } else { usize::MAX })
        {
            before(i, r)?;
            let bad = |what: String| Error::invalid(file, format!("{}: {what}", r.at));
            let (prompt, want) = shape.question(r, &fields, tok).map_err(bad)?;
            let want = want.trim().to_string();
            let ids = tok.encode(&prompt, true)?;
            let out = generate(&ids, &cfg)?;
            let got_full = tok.decode(&out)?;
            let got = got_full.lines().next().unwrap_or("").trim().to_string();
            n += 1;
            hit += (got == want) as usize;
            if samples.len() < 3 {
                samples.push((prompt, want, got_full));
            }
        }
        Ok(ExactMatch {
            exact_match: hit as f64 / n as f64,
            n,
            samples,
        })
    }
}
