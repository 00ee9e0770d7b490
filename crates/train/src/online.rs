//! Online-LoRA (Wei et al. 2024): task-free online continual learning. The data is a stream, read once in
//! order and never shuffled, with no task boundaries given to the learner. A LoRA pair trains on each
//! micro-batch of the stream together with a small buffer of the hardest recent examples; when the loss
//! settles on a plateau (a window of recent losses with a low mean and a low variance, after a rise), the
//! pair's importance is estimated from the buffer (diagonal Fisher), the pair is merged into the frozen
//! weights and a fresh pair starts, held near its start by the importance-weighted penalty
//! `(mas_weight / 2) Σ Ω ⊙ (θ − θ₀)²`.
//!
//! The stream is made of segments (the files given, in order); the learner never sees where they change,
//! but each segment's held-out examples are scored whenever the stream passes the end of one, which gives
//! the accuracy matrix continual learning is judged by: average final accuracy and forgetting.

use candle_core::{DType, Tensor};
use factune_adapters::hooks::{FinalAdapter, HookState, Moments, StepHook};
use factune_adapters::{lora, peft, AdapterConfig};
use factune_data::{
    collate, evaluate_loss_and_accuracy, to_tensor, DataOptions, Dataset, Example, Truncation,
};
use factune_io::{Error, Result, TextTokenizer};
use factune_model::{Ctx, Model, ParamRole};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Online-LoRA's settings (the reference implementation's names and defaults).
#[derive(Debug, Clone)]
pub struct OnlineSettings {
    pub loss_window_length: usize,
    pub loss_window_mean_threshold: f64,
    pub loss_window_variance_threshold: f64,
    pub hard_buffer_size: usize,
    pub mas_weight: f64,
    pub micro_batch_size: usize,
    pub seed: u64,
}

/// One file of the stream: where its training examples end in the stream, and its held-out examples.
pub struct Segment {
    pub name: String,
    pub end: usize,
    pub held_out: Vec<Example>,
    /// Positions of the held-out examples among the file's (for a records file, the record numbers).
    pub held_out_positions: Vec<usize>,
}

/// Where the training stream's files begin and end, and what each holds out.
pub struct Stream {
    /// Training examples in the stream (they live in the run's dataset, in stream order).
    pub len: usize,
    pub segments: Vec<Segment>,
}

/// Stream positions of step `step`'s examples in a stream of `len` read `per_step` at a time.
pub fn step_range(len: usize, step: usize, per_step: usize) -> std::ops::Range<usize> {
    (step * per_step).min(len)..((step + 1) * per_step).min(len)
}

impl Stream {
    /// Reads `files` in order; from each, a `validation_split` fraction of examples (drawn with `seed`) is
    /// held out and the rest keeps its order in the stream. The dataset returned holds the stream's
    /// training examples in order, the first file's record shape and what truncation removed over all files.
    pub fn load(
        files: &[PathBuf],
        opts: &DataOptions,
        tok: &TextTokenizer,
        validation_split: f64,
        seed: u64,
    ) -> Result<(Stream, Dataset)> {
        let (mut examples, mut segments) = (Vec::new(), Vec::new());
        let (mut shape, mut truncation) = (None, Truncation::default());
        for (i, f) in files.iter().enumerate() {
            let ds = Dataset::load(f, opts, tok)?;
            shape.get_or_insert(ds.shape);
            truncation.add(&ds.truncation);
            let n = ds.examples.len();
            let n_val = ((n as f64 * validation_split).round() as usize).min(n.saturating_sub(1));
            if validation_split > 0.0 && n_val == 0 {
                return Err(Error::invalid(
                    f,
                    format!(
                        "{n} example(s): validation_split {validation_split} holds out none, and every segment \
                         of the stream needs held-out examples to measure forgetting"
                    ),
                ));
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ i as u64));
            let mut held: Vec<usize> = order[..n_val].to_vec();
            held.sort_unstable();
            let mut held_out = Vec::with_capacity(n_val);
            for (j, e) in ds.examples.into_iter().enumerate() {
                if held.binary_search(&j).is_ok() {
                    held_out.push(e);
                } else {
                    examples.push(e);
                }
            }
            segments.push(Segment {
                name: f.display().to_string(),
                end: examples.len(),
                held_out,
                held_out_positions: held,
            });
        }
        let stream = Stream {
            len: examples.len(),
            segments,
        };
        let ds = Dataset {
            shape: shape.expect("at least one file"),
            examples,
            truncation,
        };
        Ok((stream, ds))
    }

    /// The steps a single pass takes at `per_step` examples each.
    pub fn steps(&self, per_step: usize) -> usize {
        self.len.div_ceil(per_step.max(1))
    }

    /// Stream positions of step `step`'s examples.
    pub fn step_range(&self, step: usize, per_step: usize) -> std::ops::Range<usize> {
        step_range(self.len, step, per_step)
    }

    /// The segments whose last training example is in step `step`.
    pub fn ending_in(&self, step: usize, per_step: usize) -> Vec<usize> {
        let r = self.step_range(step, per_step);
        (0..self.segments.len())
            .filter(|&i| {
                let e = self.segments[i].end;
                e > r.start && e <= r.end
            })
            .collect()
    }

    pub fn held_out(&self) -> Vec<Example> {
        self.segments
            .iter()
            .flat_map(|s| s.held_out.iter().cloned())
            .collect()
    }
}

/// Mean loss and next-token accuracy of a segment's held-out examples.
fn score(model: &Model, examples: &[Example], batch: usize, pad: u32) -> Result<(f64, f64)> {
    let (loss, acc, count) = evaluate_loss_and_accuracy(model, examples, batch, pad)?;
    if count == 0 {
        return Err(Error::config(
            "a stream segment's held-out examples have no labelled tokens to score",
        ));
    }
    Ok((loss, acc))
}

fn score_segments(
    model: &Model,
    stream: &Stream,
    batch: usize,
    pad: u32,
) -> Result<Vec<(f64, f64)>> {
    stream
        .segments
        .iter()
        .map(|s| score(model, &s.held_out, batch, pad))
        .collect()
}

/// Mean over the segments scored in an `earlier` row at or after their end of the best earlier accuracy
/// less the accuracy `now` (with `acc` false: the loss now less the best earlier loss); `None` before any
/// segment has ended.
fn forgetting(earlier: &[StreamRow], now: &[(f64, f64)], acc: bool) -> Option<f64> {
    let per: Vec<f64> = (0..now.len())
        .filter_map(|i| {
            let seen: Vec<f64> = earlier
                .iter()
                .filter(|r| r.1 >= i)
                .map(|r| if acc { r.2[i].1 } else { r.2[i].0 })
                .collect();
            if seen.is_empty() {
                return None;
            }
            Some(if acc {
                seen.iter().cloned().fold(f64::MIN, f64::max) - now[i].1
            } else {
                now[i].0 - seen.iter().cloned().fold(f64::MAX, f64::min)
            })
        })
        .collect();
    (!per.is_empty()).then(|| per.iter().sum::<f64>() / per.len() as f64)
}

/// A row of the accuracy matrix: the step, the segment that ended there, and every segment's held-out
/// (loss, accuracy).
pub type StreamRow = (usize, usize, Vec<(f64, f64)>);

/// The accuracy matrix of a stream: after each segment ended, every segment's held-out score.
#[derive(Default)]
pub struct StreamReport {
    pub rows: Vec<StreamRow>,
}

impl StreamReport {
    /// Scores every segment after step `step` (1-based), where segment `ended` ended; returns the metrics
    /// line to log.
    pub fn record(
        &mut self,
        model: &Model,
        stream: &Stream,
        (step, ended): (usize, usize),
        batch: usize,
        pad: u32,
    ) -> Result<serde_json::Value> {
        let scores = score_segments(model, stream, batch, pad)?;
        // a metric of step `step` (kept by a resume from it), not an event before it
        let line = json!({"step": step, "stream_eval": {
            "after_segment": ended,
            "segment_loss": scores.iter().map(|s| s.0).collect::<Vec<_>>(),
            "segment_accuracy": scores.iter().map(|s| s.1).collect::<Vec<_>>(),
        }});
        self.rows.push((step, ended, scores));
        Ok(line)
    }

    /// Every segment's held-out loss and accuracy at a checkpoint after `step` steps of `per_step` examples,
    /// with the average accuracy over the segments the stream has reached and the forgetting since their
    /// ends: a metrics line of its own, not a row of the matrix (which holds the scores where segments end).
    pub fn checkpoint_line(
        &self,
        model: &Model,
        stream: &Stream,
        (step, per_step): (usize, usize),
        batch: usize,
        pad: u32,
    ) -> Result<serde_json::Value> {
        let scores = score_segments(model, stream, batch, pad)?;
        let reached = step_range(stream.len, step.saturating_sub(1), per_step).start;
        let mut start = 0;
        let mut seen = Vec::new();
        for (g, sc) in stream.segments.iter().zip(&scores) {
            if start <= reached {
                seen.push(sc.1);
            }
            start = g.end;
        }
        Ok(json!({"step": step, "stream_checkpoint_eval": {
            "segment_loss": scores.iter().map(|s| s.0).collect::<Vec<_>>(),
            "segment_accuracy": scores.iter().map(|s| s.1).collect::<Vec<_>>(),
            "segments_reached": seen.len(),
            "average_accuracy": seen.iter().sum::<f64>() / seen.len().max(1) as f64,
            "forgetting": forgetting(&self.rows, &scores, true),
        }}))
    }

    /// The latest row's accuracies, for a progress line.
    pub fn last_accuracies(&self) -> String {
        let Some((_, _, s)) = self.rows.last() else {
            return String::new();
        };
        let a: Vec<String> = s.iter().map(|x| format!("{:.3}", x.1)).collect();
        format!("[{}]", a.join(", "))
    }

    /// Rows recorded before a resume, read back from the run's metrics lines.
    pub fn from_metrics(lines: &[serde_json::Value]) -> Self {
        let rows = lines
            .iter()
            .filter(|l| l.get("stream_eval").is_some())
            .map(|l| {
                let e = &l["stream_eval"];
                let v = |k: &str| -> Vec<f64> {
                    e[k].as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_f64())
                        .collect()
                };
                let scores = v("segment_loss")
                    .into_iter()
                    .zip(v("segment_accuracy"))
                    .collect();
                (
                    l["step"].as_u64().unwrap_or(0) as usize,
                    e["after_segment"].as_u64().unwrap_or(0) as usize,
                    scores,
                )
            })
            .collect();
        StreamReport { rows }
    }

    /// Average final accuracy over segments, and forgetting: over the segments before the last, the mean of
    /// (best accuracy after an earlier segment ended − final accuracy); the same for loss (final − best).
    pub fn summary(&self, stream: &Stream) -> serde_json::Value {
        let names: Vec<&str> = stream.segments.iter().map(|g| g.name.as_str()).collect();
        let Some((_, _, last)) = self.rows.last() else {
            return json!({});
        };
        let n = last.len();
        let avg = |f: &dyn Fn(&(f64, f64)) -> f64| last.iter().map(f).sum::<f64>() / n as f64;
        let earlier = &self.rows[..self.rows.len() - 1];
        let forget = |acc: bool| forgetting(earlier, last, acc);
        json!({
            "segments": names,
            "held_out_examples": stream.segments.iter().map(|g| &g.held_out_positions).collect::<Vec<_>>(),
            "average_accuracy": avg(&|s| s.1),
            "average_loss": avg(&|s| s.0),
            "forgetting": forget(true),
            "forgetting_loss": forget(false),
            "matrix": self.rows.iter().map(|(step, ended, s)| json!({
                "step": step, "after_segment": ended,
                "accuracy": s.iter().map(|x| x.1).collect::<Vec<_>>(),
                "loss": s.iter().map(|x| x.0).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The loss-plateau detector of Aljundi et al. (task-free continual learning), as Online-LoRA uses it: a
/// plateau is a full window whose mean and variance are under their thresholds, once the loss has risen
/// (a new peak) since the last plateau; the first plateau needs no rise.
#[derive(Debug, Clone, PartialEq)]
struct Plateaus {
    window: VecDeque<f64>,
    peak: bool,
    last: (f64, f64),
    count: usize,
}

impl Plateaus {
    fn new() -> Self {
        Plateaus {
            window: VecDeque::new(),
            peak: true,
            last: (0.0, 0.0),
            count: 0,
        }
    }

    /// Adds a step's loss; true when it completes a plateau.
    fn observe(&mut self, loss: f64, s: &OnlineSettings) -> bool {
        self.window.push_back(loss);
        if self.window.len() > s.loss_window_length {
            self.window.pop_front();
        }
        let n = self.window.len() as f64;
        let mean = self.window.iter().sum::<f64>() / n;
        let var = self.window.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        if !self.peak && mean > self.last.0 + self.last.1.sqrt() {
            self.peak = true;
        }
        let full = self.window.len() == s.loss_window_length;
        if full
            && self.peak
            && mean < s.loss_window_mean_threshold
            && var < s.loss_window_variance_threshold
        {
            (self.last, self.peak) = ((mean, var), false);
            self.count += 1;
            return true;
        }
        false
    }

    fn to_json(&self) -> serde_json::Value {
        json!({"window": self.window, "peak": self.peak, "last": [self.last.0, self.last.1], "count": self.count})
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        Some(Plateaus {
            window: v["window"]
                .as_array()?
                .iter()
                .filter_map(|x| x.as_f64())
                .collect(),
            peak: v["peak"].as_bool()?,
            last: (v["last"][0].as_f64()?, v["last"][1].as_f64()?),
            count: v["count"].as_u64()? as usize,
        })
    }
}

/// Stream positions replayed with the current step (the hard buffer as it was before the step), shared
/// between the consolidation hook, which sets them, and the run's micro-batches, which read them.
pub type Replay = Rc<RefCell<Vec<usize>>>;

/// Online-LoRA's training-time behaviour as a step hook.
pub struct Consolidation {
    s: OnlineSettings,
    stream: Rc<Vec<Example>>,
    pad: u32,
    plateaus: Plateaus,
    /// The hard buffer: stream positions of the highest-loss examples seen at the last step.
    buffer: Vec<usize>,
    replay: Replay,
    /// Importance Ω and start θ₀ of each LoRA tensor (PEFT key), from the last plateau on.
    omega: BTreeMap<String, Tensor>,
    anchor: BTreeMap<String, Tensor>,
    /// The pairs merged at each plateau so far (PEFT key → tensor), kept for the final adapter.
    merged: Vec<BTreeMap<String, Tensor>>,
}

impl Consolidation {
    pub fn new(s: OnlineSettings, stream: Rc<Vec<Example>>, pad: u32, replay: Replay) -> Self {
        Consolidation {
            s,
            stream,
            pad,
            plateaus: Plateaus::new(),
            buffer: Vec::new(),
            replay,
            omega: BTreeMap::new(),
            anchor: BTreeMap::new(),
            merged: Vec::new(),
        }
    }

    /// Each example's mean loss, from one batched forward (rows are padded at the end, which a causal model
    /// never attends to, and each row's loss is taken apart from the final hidden states).
    fn losses_of(&self, model: &Model, picked: &[usize]) -> Result<Vec<f64>> {
        let exs: Vec<&Example> = picked.iter().map(|&i| &self.stream[i]).collect();
        let (ids, labels) = collate(&exs, self.pad);
        let hidden =
            model.forward_hidden(&to_tensor(&ids, &model.device)?, None, &Ctx::default())?;
        (0..exs.len())
            .map(|r| {
                let (l, _) = model.lm_loss(&hidden.narrow(0, r, 1)?, &labels[r..r + 1])?;
                Ok(l.to_scalar::<f32>()? as f64)
            })
            .collect()
    }

    /// Σ over the buffer of the squared gradients of the LoRA tensors, each example's loss taken against
    /// the model's own argmax predictions (the Fisher at the mode, as the reference does).
    fn fisher(&self, model: &Model) -> Result<BTreeMap<String, Tensor>> {
        let params = peft::trainable(model);
        let wanted: Vec<&Tensor> = params.iter().map(|(_, v)| v.as_tensor()).collect();
        let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
        for &i in &self.buffer {
            let (ids, labels) = collate(&[&self.stream[i]], self.pad);
            let ids_t = to_tensor(&ids, &model.device)?;
            let logits = model.forward(&ids_t, None, &Ctx::default())?;
            let pred: Vec<Vec<u32>> = logits.argmax(candle_core::D::Minus1)?.to_vec2()?;
            let pseudo: Vec<Vec<i64>> = labels
                .iter()
                .zip(&pred)
                .map(|(l, p)| {
                    (0..l.len())
                        .map(|t| {
                            if t > 0 && l[t] >= 0 {
                                p[t - 1] as i64
                            } else {
                                -100
                            }
                        })
                        .collect()
                })
                .collect();
            let (_, _, grads) =
                model.loss_and_grads(&ids_t, &pseudo, &Ctx::default(), false, &wanted)?;
            for ((name, _), g) in params.iter().zip(grads) {
                let Some(g) = g else { continue };
                let g2 = g.sqr()?;
                let next = match sum.remove(name) {
                    Some(acc) => (acc + g2)?,
                    None => g2,
                };
                sum.insert(name.clone(), next);
            }
        }
        Ok(sum)
    }

    /// At a plateau: Ω becomes the running average of the Fisher estimates, the pair is recorded and merged,
    /// fresh factors start (θ₀) and their optimizer moments are reset.
    fn consolidate(&mut self, model: &mut Model, m: Moments<'_>) -> Result<usize> {
        let fisher = self.fisher(model)?;
        let k = self.plateaus.count as f64;
        for (name, f) in fisher {
            let next = match self.omega.remove(&name) {
                Some(old) => ((f / k)? + (old * (1.0 - 1.0 / k))?)?,
                None => f,
            };
            self.omega.insert(name, next);
        }
        let pair: BTreeMap<String, Tensor> = peft::trainable(model)
            .into_iter()
            .map(|(k, v)| Ok((k, frozen_copy(v.as_tensor())?)))
            .collect::<Result<_>>()?;
        self.merged.push(pair);
        let mut rng = crate::relora::restart_rng(self.s.seed, self.plateaus.count);
        let n = lora::merge_and_reinit(model, &mut rng)?;
        for (i, role) in m.roles.iter().enumerate() {
            if matches!(role, ParamRole::FactorA | ParamRole::FactorB) {
                m.exp_avg[i].iter_mut().for_each(|x| *x = 0.0);
                m.exp_avg_sq[i].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        self.anchor = peft::trainable(model)
            .into_iter()
            .map(|(k, v)| Ok((k, frozen_copy(v.as_tensor())?)))
            .collect::<Result<_>>()?;
        Ok(n)
    }
}

impl StepHook for Consolidation {
    fn name(&self) -> &'static str {
        "online_lora"
    }

    /// Scores the step's new examples and the buffer before the update: their mean is the step's point in
    /// the loss window (a plateau consolidates here, before the step trains), the buffer is replayed with
    /// the step, and the hardest of them become the next buffer.
    fn before_step(
        &mut self,
        model: &mut Model,
        step: usize,
        m: Moments<'_>,
    ) -> Result<Option<serde_json::Value>> {
        let per = self.s.micro_batch_size;
        let fresh = step_range(self.stream.len(), step, per);
        let seen: Vec<usize> = fresh.chain(self.buffer.iter().copied()).collect();
        let losses = self.losses_of(model, &seen)?;
        let mean = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        let mut event = None;
        if self.plateaus.observe(mean, &self.s) {
            let merged = self.consolidate(model, m)?;
            event = Some(json!({
                "event": "online_plateau", "plateau": self.plateaus.count,
                "window_mean": self.plateaus.last.0, "window_variance": self.plateaus.last.1,
                "merged_modules": merged,
            }));
        }
        *self.replay.borrow_mut() = self.buffer.clone();
        let mut order: Vec<usize> = (0..seen.len()).collect();
        order.sort_by(|&a, &b| losses[b].total_cmp(&losses[a]).then(seen[a].cmp(&seen[b])));
        let mut next: Vec<usize> = Vec::new();
        for i in order {
            if next.len() == self.s.hard_buffer_size {
                break;
            }
            if !next.contains(&seen[i]) {
                next.push(seen[i]);
            }
        }
        self.buffer = next;
        Ok(event)
    }

    /// Logs the penalty after the update, so the step's loss (penalty included) can be read apart.
    fn after_update(
        &mut self,
        model: &mut Model,
        _names: &[&str],
        _grads: &[Vec<f32>],
        _step: usize,
    ) -> Result<Option<(&'static str, serde_json::Value)>> {
        Ok(match self.penalty(model)? {
            Some(p) => Some(("online_penalty", (p.to_scalar::<f32>()? as f64).into())),
            None => None,
        })
    }

    fn penalty(&self, model: &Model) -> Result<Option<Tensor>> {
        if self.omega.is_empty() || self.s.mas_weight == 0.0 {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        for (name, v) in peft::trainable(model) {
            let (Some(o), Some(a)) = (self.omega.get(&name), self.anchor.get(&name)) else {
                continue;
            };
            let term = (o * (v.as_tensor() - a)?.sqr()?)?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        Ok(match total {
            Some(t) => Some((t * (self.s.mas_weight / 2.0))?),
            None => None,
        })
    }

    fn state(&self) -> Result<Option<HookState>> {
        let mut tensors = BTreeMap::new();
        for (k, t) in &self.omega {
            tensors.insert(format!("omega/{k}"), t.clone());
        }
        for (k, t) in &self.anchor {
            tensors.insert(format!("anchor/{k}"), t.clone());
        }
        for (i, pair) in self.merged.iter().enumerate() {
            for (k, t) in pair {
                tensors.insert(format!("merged{i}/{k}"), t.clone());
            }
        }
        let meta = json!({
            "plateaus": self.plateaus.to_json(), "buffer": self.buffer, "merged": self.merged.len(),
        });
        Ok(Some((tensors, meta)))
    }

    fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()> {
        let bad = || Error::config("the checkpoint's online_lora state is incomplete");
        self.plateaus = Plateaus::from_json(&meta["plateaus"]).ok_or_else(bad)?;
        self.buffer = meta["buffer"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as usize))
            .filter(|&i| i < self.stream.len())
            .collect();
        let merged = meta["merged"].as_u64().ok_or_else(bad)? as usize;
        self.merged = vec![BTreeMap::new(); merged];
        for (k, t) in tensors {
            if let Some(name) = k.strip_prefix("omega/") {
                self.omega.insert(name.to_string(), t.clone());
            } else if let Some(name) = k.strip_prefix("anchor/") {
                self.anchor.insert(name.to_string(), t.clone());
            } else if let Some((i, name)) = k.strip_prefix("merged").and_then(|r| r.split_once('/'))
            {
                let i: usize = i.parse().map_err(|_| bad())?;
                self.merged
                    .get_mut(i)
                    .ok_or_else(bad)?
                    .insert(name.to_string(), t.clone());
            }
        }
        Ok(())
    }

    /// Every pair the run trained, side by side as one LoRA on the original base: `B = [B₁ … Bₖ B]`,
    /// `A = [A₁; …; Aₖ; A]`, whose product is the sum of the merged updates and the live one; rank and alpha
    /// grow so the scale `alpha / r` (or `alpha / √r` for rsLoRA) stays the pairs'.
    fn final_adapter(&self, model: &Model, cfg: &AdapterConfig) -> Result<Option<FinalAdapter>> {
        let live: BTreeMap<String, Tensor> = peft::trainable(model)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let mut tensors = BTreeMap::new();
        for (k, t) in &live {
            let dim = if k.contains(".lora_A.") { 0 } else { 1 };
            let mut parts: Vec<&Tensor> = Vec::new();
            for pair in &self.merged {
                parts.push(pair.get(k).ok_or_else(|| {
                    Error::config(format!("online_lora: merged pair without `{k}`"))
                })?);
            }
            parts.push(t);
            tensors.insert(k.clone(), Tensor::cat(&parts, dim)?.to_dtype(DType::F32)?);
        }
        let pairs = self.merged.len() + 1;
        let mut c = cfg.clone();
        c.r = cfg.r * pairs;
        c.lora_alpha = match cfg.use_rslora {
            true => cfg.lora_alpha * (pairs as f64).sqrt(),
            false => cfg.lora_alpha * pairs as f64,
        };
        let note = format!(
            "Online-LoRA: {} plateau(s) merged; the adapter holds all {pairs} pairs side by side (r = {}, \
             lora_alpha = {}) on the original base",
            self.merged.len(),
            c.r,
            c.lora_alpha
        );
        Ok(Some((tensors, c, note)))
    }
}

/// A copy of a parameter's current values that neither follows its later updates (own storage) nor passes
/// gradients back to it (candle's `copy` is differentiable: `θ − copy(θ)` would have no gradient).
fn frozen_copy(t: &Tensor) -> Result<Tensor> {
    Ok(t.copy()?.detach())
}

/// The stream's files: `--data`, then `stream_data` (comma-separated) in order.
pub fn stream_files(data: &Path, more: &str) -> Vec<PathBuf> {
    std::iter::once(data.to_path_buf())
        .chain(
            more.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OnlineSettings {
        OnlineSettings {
            loss_window_length: 3,
            loss_window_mean_threshold: 1.0,
            loss_window_variance_threshold: 0.01,
            hard_buffer_size: 2,
            mas_weight: 1.0,
            micro_batch_size: 1,
            seed: 0,
        }
    }

    #[test]
    fn a_plateau_needs_a_full_low_window_and_then_a_rise_before_the_next() {
        let s = settings();
        let mut p = Plateaus::new();
        // high losses, falling: no plateau until three in a row sit low and flat
        let fired: Vec<bool> = [3.0, 2.0, 0.5, 0.5, 0.5, 0.5, 0.5]
            .iter()
            .map(|&l| p.observe(l, &s))
            .collect();
        assert_eq!(fired, [false, false, false, false, true, false, false]);
        // flat again: no second plateau without a rise above mean + std of the last one
        assert!(!p.observe(0.5, &s));
        // a shift (new task) raises the loss, then it settles again: the second plateau
        let fired: Vec<bool> = [2.0, 2.5, 0.6, 0.6, 0.6, 0.6]
            .iter()
            .map(|&l| p.observe(l, &s))
            .collect();
        assert_eq!(fired, [false, false, false, false, true, false]);
        assert_eq!(p.count, 2);
        assert_eq!(Plateaus::from_json(&p.to_json()), Some(p));
    }

    #[test]
    fn forgetting_is_the_drop_from_the_best_earlier_score() {
        let mut r = StreamReport::default();
        r.rows.push((10, 0, vec![(1.0, 0.8), (3.0, 0.1)]));
        r.rows.push((20, 1, vec![(2.0, 0.5), (1.0, 0.9)]));
        let seg = |name: &str, positions: Vec<usize>| Segment {
            name: name.into(),
            end: 0,
            held_out: vec![],
            held_out_positions: positions,
        };
        let stream = Stream {
            len: 0,
            segments: vec![seg("a", vec![1, 4]), seg("b", vec![0])],
        };
        let s = r.summary(&stream);
        assert_eq!(s["held_out_examples"], json!([[1, 4], [0]]));
        assert!((s["average_accuracy"].as_f64().unwrap() - 0.7).abs() < 1e-12);
        // only segment 0 had ended before the last row: 0.8 → 0.5
        assert!((s["forgetting"].as_f64().unwrap() - 0.3).abs() < 1e-12);
        assert!((s["forgetting_loss"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    }
}
