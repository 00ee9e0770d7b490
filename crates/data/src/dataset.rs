//! Training data: a file's records (or plain text) tokenised into labelled examples. Prompt tokens get label
//! -100 so only responses are learned, unless `train_on_prompt`. What truncation to `seq_len` cuts away is
//! counted, and an example left with nothing to learn is an error unless the run allows it.

use crate::shape::{Fields, Shape};
use crate::source::{self, Contents, DataFormat, Locator};
use factune_io::{Error, Result, TextTokenizer};
use factune_model::loss::IGNORE_INDEX;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens the loss learns: labelled positions after the first (position 0 has no prediction).
    fn learned(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|l| **l != IGNORE_INDEX)
            .count()
    }
}

/// How a data file is turned into examples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub format: DataFormat,
    pub fields: Fields,
    pub seq_len: usize,
    pub train_on_prompt: bool,
    /// Skip (and count) examples whose every label token lies past `seq_len` instead of refusing the file.
    pub allow_truncated_labels: bool,
}

impl DataOptions {
    /// Reading for evaluation: the file's own format, default fields, responses only.
    pub fn eval(seq_len: usize) -> Self {
        DataOptions {
            format: DataFormat::Auto,
            fields: Fields::default(),
            seq_len,
            train_on_prompt: false,
            allow_truncated_labels: true,
        }
    }
}

/// What cutting examples to `seq_len` removed, reported in the run summary and `run.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Truncation {
    /// Examples longer than `seq_len`.
    pub examples_cut: usize,
    /// Examples that lost label tokens (part of their answer).
    pub examples_losing_labels: usize,
    /// Examples left with no label token, skipped (only with `allow_truncated_labels`).
    pub examples_skipped: usize,
    /// Label tokens of every example before truncation, and how many of them were cut away.
    pub label_tokens: usize,
    pub label_tokens_dropped: usize,
    /// Records so long that their text was cut before tokenising (memory stays O(seq_len), not O(record));
    /// their label tokens past that cut are not in the counts above.
    pub examples_cut_before_tokenizing: usize,
}

impl Truncation {
    /// Both counts together: what cutting removed from two datasets read as one (a stream of files).
    pub fn add(&mut self, o: &Truncation) {
        self.examples_cut += o.examples_cut;
        self.examples_losing_labels += o.examples_losing_labels;
        self.examples_skipped += o.examples_skipped;
        self.label_tokens += o.label_tokens;
        self.label_tokens_dropped += o.label_tokens_dropped;
        self.examples_cut_before_tokenizing += o.examples_cut_before_tokenizing;
    }

    /// One line for the run summary, if anything was cut.
    pub fn summary(&self, seq_len: usize) -> Option<String> {
        (self.examples_cut > 0).then(|| {
            format!(
                "{} examples were longer than seq_len {seq_len} and were cut: {} lost label tokens \
                 ({:.1}% of all label tokens dropped){}",
                self.examples_cut,
                self.examples_losing_labels,
                100.0 * self.label_tokens_dropped as f64 / self.label_tokens.max(1) as f64,
                if self.examples_skipped > 0 {
                    format!(", {} kept no label token and were skipped", self.examples_skipped)
                } else {
                    String::new()
                }
            ) + &if self.examples_cut_before_tokenizing > 0 {
                format!(
                    "; {} were so long that their text was cut before tokenising (their label tokens past \
                     that cut are not counted)",
                    self.examples_cut_before_tokenizing
                )
            } else {
                String::new()
            }
        })
    }
}

pub struct Dataset {
    pub shape: Shape,
    pub examples: Vec<Example>,
    pub truncation: Truncation,
}

impl Dataset {
    pub fn load(path: &Path, opts: &DataOptions, tok: &TextTokenizer) -> Result<Self> {
        Self::from_contents(source::read(path, opts.format)?, path, opts, tok)
    }

    /// The examples of contents already read from `path` (named in errors).
    pub fn from_contents(
        contents: Contents,
        path: &Path,
        opts: &DataOptions,
        tok: &TextTokenizer,
    ) -> Result<Self> {
        let records = match contents {
            // `read` returns text only for `auto` or `text`; the forced record formats refuse prose.
            Contents::Text(text) => {
                return non_empty(
                    path,
                    Dataset {
                        shape: Shape::Text,
                        examples: pack_text(&text, tok, opts.seq_len)?,
                        truncation: Truncation::default(),
                    },
                );
            }
            Contents::Records(r) => r,
        };
        let first = records
            .first()
            .ok_or_else(|| Error::invalid(path, "the file holds no records"))?;
        let shape = match opts.format {
            DataFormat::Alpaca => Shape::Alpaca,
            DataFormat::Chat => Shape::Chat,
            _ => Shape::detect(first, &opts.fields)
                .map_err(|e| Error::invalid(path, format!("{}: {e}", first.at)))?,
        };
        let mut ds = Dataset {
            shape,
            examples: Vec::with_capacity(records.len()),
            truncation: Truncation::default(),
        };
        let mut emptied: Vec<Locator> = Vec::new();
        let token_bytes = tok.max_token_bytes();
        for r in &records {
            let bad = |e: String| Error::invalid(path, format!("{}: {e}", r.at));
            let found = Shape::detect(r, &opts.fields).map_err(bad)?;
            if found != shape && opts.format == DataFormat::Auto {
                return Err(bad(format!(
                    "a {} record, but the first ({}) is {}: every record must have one shape",
                    found.name(),
                    first.at,
                    shape.name()
                )));
            }
            let sample = shape.sample(r, &opts.fields, tok).map_err(bad)?;
            let (mut ex, cut_text) =
                labelled_prefix(tok, &sample.full, &sample.prompt_spans, opts, token_bytes)?;
            ds.truncation.examples_cut_before_tokenizing += usize::from(cut_text);
            let before = ex.learned();
            if before == 0 {
                return Err(bad(
                    "nothing to learn: no token of the record is a label".into()
                ));
            }
            ds.truncation.label_tokens += before;
            if ex.ids.len() > opts.seq_len {
                ex.ids.truncate(opts.seq_len);
                ex.labels.truncate(opts.seq_len);
                let after = ex.learned();
                let t = &mut ds.truncation;
                t.examples_cut += 1;
                t.label_tokens_dropped += before - after;
                t.examples_losing_labels += usize::from(after < before);
                if after == 0 {
                    t.examples_skipped += 1;
                    emptied.push(r.at.clone());
                    continue;
                }
            }
            ds.examples.push(ex);
        }
        if !emptied.is_empty() && !opts.allow_truncated_labels {
            let shown: Vec<String> = emptied.iter().take(3).map(ToString::to_string).collect();
            return Err(Error::invalid(
                path,
                format!(
                    "{} of {} examples keep no label token at seq_len {} ({}{}): everything they teach lies past \
                     the cut. Raise seq_len, shorten their prompts, or pass --allow-truncated-labels to skip them",
                    emptied.len(),
                    records.len(),
                    opts.seq_len,
                    shown.join(", "),
                    if emptied.len() > 3 { ", …" } else { "" }
                ),
            ));
        }
        non_empty(path, ds)
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

fn non_empty(path: &Path, ds: Dataset) -> Result<Dataset> {
    if ds.examples.is_empty() {
        return Err(Error::invalid(
            path,
            "the dataset is empty (no example with tokens to train on)",
        ));
    }
    Ok(ds)
}

/// Documents longer than this are tokenised in pieces, so the tokenizer's working memory (~100 bytes per
/// token) stays bounded whatever a document's length.
const PIECE_BYTES: usize = 1 << 20;

/// `doc` in pieces of at most about `max` bytes, each cut after a line break (or else before a whitespace),
/// where tokenisation restarts as it would at that point of the whole text (for byte-level BPE tokenizers; a
/// SentencePiece-style tokenizer may tokenise the first word of a piece differently).
fn pieces(doc: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = doc;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let head = &rest[..end];
        let end = head
            .rfind('\n')
            .map(|i| i + 1)
            .or_else(|| head.rfind(char::is_whitespace))
            .filter(|&i| i > 0)
            .unwrap_or(end);
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out.push(rest);
    out
}

/// Tokenises a text file as documents separated by blank lines, each followed by EOS, concatenated into one
/// stream and cut into `seq_len` blocks.
pub fn pack_text(text: &str, tok: &TextTokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let mut ids = Vec::new();
    for doc in text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()) {
        for (i, piece) in pieces(doc, PIECE_BYTES).into_iter().enumerate() {
            // the special tokens (BOS) of the document, once
            ids.extend(tok.encode(piece, i == 0)?);
        }
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

/// [`labelled`] of as much of `full` as its first `seq_len` tokens can come from: a record far longer than
/// that is cut first (after the last whitespace before `seq_len` × the longest token's bytes, so the words
/// kept tokenise as in the whole text), and the cut moves further out while fewer than `seq_len` tokens come
/// back (a normaliser that drops characters). Says whether the text was cut.
fn labelled_prefix(
    tok: &TextTokenizer,
    full: &str,
    prompt: &[(usize, usize)],
    opts: &DataOptions,
    token_bytes: usize,
) -> Result<(Example, bool)> {
    let mut cap = opts
        .seq_len
        .saturating_mul(token_bytes)
        .saturating_add(4096);
    loop {
        if full.len() <= cap {
            return Ok((labelled(tok, full, prompt, opts.train_on_prompt)?, false));
        }
        let mut end = cap;
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        let end = full[..end]
            .rfind(char::is_whitespace)
            .filter(|&i| i > 0)
            .unwrap_or(end);
        let ex = labelled(tok, &full[..end], prompt, opts.train_on_prompt)?;
        if ex.ids.len() > opts.seq_len {
            return Ok((ex, true));
        }
        cap = cap.saturating_mul(2);
    }
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
