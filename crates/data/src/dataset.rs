//! Training data: plain text (tokenised and packed into `seq_len` blocks), JSONL alpaca records and JSONL
//! chat conversations (rendered with the tokenizer's chat template). Prompt tokens get label -100 so only
//! responses are learned, unless `train_on_prompt`.

use factune_io::{ChatMessage, Error, Result, TextTokenizer};
use factune_model::loss::IGNORE_INDEX;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;

/// Prompt layout for alpaca records (the Stanford Alpaca template without its preamble).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Alpaca,
    Chat,
}

factune_io::choice! {
    /// How a data file is read: decided from the file (`auto`) or forced.
    pub enum DataFormat for "data_format" {
        Auto = "auto",
        Text = "text",
        Alpaca = "alpaca",
        Chat = "chat",
    }
}

pub struct Dataset {
    pub format: Format,
    pub examples: Vec<Example>,
    /// Examples cut to `seq_len`.
    pub truncated: usize,
}

fn detect(path: &Path, first_line: Option<&str>) -> Format {
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    );
    match first_line.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
        Some(v) if is_jsonl || v.is_object() => {
            if v.get("messages").is_some() {
                Format::Chat
            } else {
                Format::Alpaca
            }
        }
        _ => Format::Text,
    }
}

impl Dataset {
    pub fn load(
        path: &Path,
        format: DataFormat,
        tok: &TextTokenizer,
        seq_len: usize,
        train_on_prompt: bool,
    ) -> Result<Self> {
        let text = factune_io::error::read_to_string(path)?;
        let first = text.lines().find(|l| !l.trim().is_empty());
        let format = match format {
            DataFormat::Auto => detect(path, first),
            DataFormat::Text => Format::Text,
            DataFormat::Alpaca => Format::Alpaca,
            DataFormat::Chat => Format::Chat,
        };
        let mut ds = Dataset {
            format,
            examples: vec![],
            truncated: 0,
        };
        match format {
            Format::Text => ds.examples = pack_text(&text, tok, seq_len)?,
            Format::Alpaca | Format::Chat => {
                for (n, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let where_ = || format!("line {}", n + 1);
                    let v: Value = serde_json::from_str(line).map_err(|e| {
                        Error::invalid(path, format!("{}: malformed JSON: {e}", where_()))
                    })?;
                    let (prompt_spans, full) = if format == Format::Alpaca {
                        alpaca_record(&v, tok)
                            .map_err(|e| Error::invalid(path, format!("{}: {e}", where_())))?
                    } else {
                        chat_record(&v, tok)
                            .map_err(|e| Error::invalid(path, format!("{}: {e}", where_())))?
                    };
                    let mut ex = labelled(tok, &full, &prompt_spans, train_on_prompt)?;
                    if ex.ids.len() > seq_len {
                        ex.ids.truncate(seq_len);
                        ex.labels.truncate(seq_len);
                        ds.truncated += 1;
                    }
                    if ex.labels.iter().skip(1).all(|l| *l == IGNORE_INDEX) {
                        continue; // nothing to learn from (the response was truncated away)
                    }
                    ds.examples.push(ex);
                }
            }
        }
        if ds.examples.is_empty() {
            return Err(Error::invalid(
                path,
                "the dataset is empty (no example with tokens to train on)",
            ));
        }
        Ok(ds)
    }

    /// Splits off a validation set with a seeded shuffle. Keeps at least one example for training.
    pub fn split(mut self, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_5B17);
        self.examples.shuffle(&mut rng);
        let n = self.examples.len();
        let n_val = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(1));
        let val = self.examples.split_off(n - n_val);
        (self.examples, val)
    }
}

/// Tokenises a text file as documents separated by blank lines, each followed by EOS, concatenated into one
/// stream and cut into `seq_len` blocks.
pub fn pack_text(text: &str, tok: &TextTokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let mut ids = Vec::new();
    for doc in text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()) {
        ids.extend(tok.encode(doc, true)?);
        if let Some(eos) = tok.eos_id() {
            ids.push(eos);
        }
    }
    Ok(ids
        .chunks(seq_len)
        .filter(|c| c.len() >= 2)
        .map(|c| Example {
            ids: c.to_vec(),
            labels: c.iter().map(|&x| x as i64).collect(),
        })
        .collect())
}

fn field<'a>(v: &'a Value, k: &str) -> std::result::Result<&'a str, String> {
    match v.get(k) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("`{k}` must be a string")),
        None => Err(format!("missing key `{k}`")),
    }
}

/// (prompt byte spans, full text) of an alpaca record; the response ends with EOS.
fn alpaca_record(
    v: &Value,
    tok: &TextTokenizer,
) -> std::result::Result<(Vec<(usize, usize)>, String), String> {
    let instruction = field(v, "instruction")?;
    let input = v.get("input").and_then(Value::as_str).unwrap_or("");
    let output = field(v, "output")?;
    let prompt = alpaca_prompt(instruction, input);
    let full = format!("{prompt}{output}{}", tok.eos_token.as_deref().unwrap_or(""));
    Ok((vec![(0, prompt.len())], full))
}

/// (spans not produced by the assistant, full text) of a chat record: each assistant turn's span is found by
/// rendering the conversation up to it with and without the generation prompt.
fn chat_record(
    v: &Value,
    tok: &TextTokenizer,
) -> std::result::Result<(Vec<(usize, usize)>, String), String> {
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("missing array `messages`")?;
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        messages.push(ChatMessage {
            role: field(m, "role")
                .map_err(|e| format!("messages[{i}]: {e}"))?
                .to_string(),
            content: field(m, "content")
                .map_err(|e| format!("messages[{i}]: {e}"))?
                .to_string(),
        });
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("conversation has no assistant message to learn".into());
    }
    let full = tok
        .apply_chat_template(&messages, false)
        .map_err(|e| e.to_string())?;
    let mut prompt_spans = Vec::new();
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok
            .apply_chat_template(&messages[..i], true)
            .map_err(|e| e.to_string())?;
        let through = tok
            .apply_chat_template(&messages[..=i], false)
            .map_err(|e| e.to_string())?;
        if !full.starts_with(&before) || !full.starts_with(&through) {
            return Err("chat_template does not render conversations incrementally; cannot locate assistant turns".into());
        }
        prompt_spans.push((cursor, before.len()));
        cursor = through.len();
    }
    prompt_spans.push((cursor, full.len()));
    Ok((prompt_spans, full))
}

/// Token ids of `full` with labels: tokens starting inside a prompt span get -100.
fn labelled(
    tok: &TextTokenizer,
    full: &str,
    prompt: &[(usize, usize)],
    train_on_prompt: bool,
) -> Result<Example> {
    let (ids, starts) = tok.encode_with_offsets(full, true)?;
    let labels = ids
        .iter()
        .zip(&starts)
        .enumerate()
        .map(|(i, (&id, &s))| {
            // Special tokens added by the tokenizer (BOS) carry offset 0 and are never targets.
            let special =
                i == 0 && tok.bos_token.as_deref().and_then(|b| tok.token_id(b)) == Some(id);
            let in_prompt = prompt.iter().any(|&(a, b)| s >= a && s < b);
            if special || (in_prompt && !train_on_prompt) {
                IGNORE_INDEX
            } else {
                id as i64
            }
        })
        .collect();
    Ok(Example { ids, labels })
}

/// The deterministic stream of micro-batches: concatenated seeded permutations of the training set, so
/// micro-batch `j` is a pure function of (`data_seed`, `j`) and resuming needs no saved RNG state.
pub struct Batches {
    n: usize,
    seed: u64,
    mbs: usize,
}

impl Batches {
    pub fn new(n: usize, seed: u64, micro_batch_size: usize) -> Self {
        Batches {
            n,
            seed,
            mbs: micro_batch_size,
        }
    }

    fn permutation(&self, epoch: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.n).collect();
        p.shuffle(&mut ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_add(epoch as u64),
        ));
        p
    }

    /// Example indices of micro-batch `j`.
    pub fn indices(&self, j: usize) -> Vec<usize> {
        let start = j * self.mbs;
        let mut out = Vec::with_capacity(self.mbs);
        let mut cached: Option<(usize, Vec<usize>)> = None;
        for k in start..start + self.mbs {
            let (epoch, pos) = (k / self.n, k % self.n);
            if cached.as_ref().map(|c| c.0) != Some(epoch) {
                cached = Some((epoch, self.permutation(epoch)));
            }
            out.push(cached.as_ref().expect("set above").1[pos]);
        }
        out
    }
}

/// Right-pads a micro-batch to its longest example: ids padded with `pad`, labels with -100. Causal attention
/// never lets a real token see a pad that follows it, so no attention mask is needed.
pub fn collate(examples: &[&Example], pad: u32) -> (Vec<Vec<u32>>, Vec<Vec<i64>>) {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(examples.len());
    let mut labels = Vec::with_capacity(examples.len());
    for e in examples {
        let mut i = e.ids.clone();
        let mut l = e.labels.clone();
        i.resize(t, pad);
        l.resize(t, IGNORE_INDEX);
        ids.push(i);
        labels.push(l);
    }
    (ids, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_and_cover_each_epoch() {
        let b = Batches::new(10, 7, 4);
        let first: Vec<usize> = (0..5).flat_map(|j| b.indices(j)).collect();
        let again: Vec<usize> = (0..5)
            .flat_map(|j| Batches::new(10, 7, 4).indices(j))
            .collect();
        assert_eq!(first, again);
        let mut epoch0: Vec<usize> = first[..10].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
        assert_ne!(first[..10], first[10..20]);
    }

    #[test]
    fn collate_pads_labels_with_ignore() {
        let a = Example {
            ids: vec![1, 2, 3],
            labels: vec![-100, 2, 3],
        };
        let b = Example {
            ids: vec![4],
            labels: vec![4],
        };
        let (ids, labels) = collate(&[&a, &b], 0);
        assert_eq!(ids[1], vec![4, 0, 0]);
        assert_eq!(labels[1], vec![4, -100, -100]);
    }
}
