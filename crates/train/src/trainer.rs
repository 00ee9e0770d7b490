//! The training run around the shared step: data, phases (warm start, ReLoRA restarts), schedule,
//! validation, atomic checkpoints that resume bit-identically, JSONL metrics and the saved result.

use crate::best::Best;
use crate::config::TrainConfig;
use crate::metrics::MetricsLog;
use crate::online::{stream_files, Consolidation, Replay, Stream, StreamReport};
use crate::optim::AdamW;
use crate::progress::Progress;
use crate::relora;
use crate::step::{sizes, MicroBatch, Params, Trainer};
use candle_core::{Device, Tensor, Var};
use factune_adapters::hooks::StepHook;
use factune_adapters::peft::thousands;
use factune_adapters::{attach, peft, trainable, trainable_summary};
use factune_data::{
    collate, evaluate_loss, pad_id, to_tensor, Batches, Dataset, Example, Truncation,
};
use factune_io::weights::to_safetensors_bytes;
use factune_io::{atomic, Error, Result, TextTokenizer, Weights};
use factune_model::spectrum::update_spectra;
use factune_model::{Ctx, Model};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

const STATE_FILE: &str = "trainer_state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";
/// Every model tensor, for runs that change the base (full, ReLoRA, warm start, trained embeddings).
const MODEL_STATE_FILE: &str = "model.safetensors";

/// An Online-LoRA run's accuracy matrix, average accuracy and forgetting over its stream's segments.
pub const STREAM_FILE: &str = "stream.json";

/// The state name of the best evaluation (`best_state.safetensors`).
const BEST: &str = "best";

/// The checkpoint file of a method hook's tensors (`adalora_state.safetensors`).
fn hook_file(name: &str) -> String {
    format!("{name}_state.safetensors")
}

/// Refuses a resume whose data, eval_data or model differ in content from those the checkpoint trained on
/// (checkpoints written before inputs were recorded are not compared).
fn same_inputs(ckpt: &Path, now: &serde_json::Value) -> Result<()> {
    let state: serde_json::Value = factune_io::error::read_json(&ckpt.join(STATE_FILE))?;
    let Some(then) = state.get("inputs") else {
        return Ok(());
    };
    let diffs: Vec<String> = ["data", "eval_data", "model"]
        .into_iter()
        .filter(|k| {
            let id = |v: &serde_json::Value| {
                v.get(*k).map(|x| {
                    let stream: Vec<_> = x["stream"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| s["sha256"].clone())
                        .collect();
                    (
                        x.get("sha256").cloned(),
                        x.get("fingerprint").cloned(),
                        stream,
                    )
                })
            };
            id(then) != id(now)
        })
        .map(|k| {
            let path = |v: &serde_json::Value| v[k]["path"].as_str().unwrap_or("none").to_string();
            format!(
                "{k}: the checkpoint trained on {}, this run reads {} with other contents",
                path(then),
                path(now)
            )
        })
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::config(format!(
        "cannot resume {}: {} (a resume continues the same run; start a new one with another --output)",
        ckpt.display(),
        diffs.join("; ")
    )))
}

/// A hook's (or the best evaluation's) checkpointed tensors and its entry in `trainer_state.json`.
fn read_state(ckpt: &Path, name: &str) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let w = Weights::from_files(&[ckpt.join(hook_file(name))])?;
    let tensors = w
        .names()
        .map(|n| {
            Ok((
                n.to_string(),
                w.get(n, candle_core::DType::F32, &Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta: serde_json::Value = factune_io::error::read_json(&ckpt.join(STATE_FILE))?;
    Ok((tensors, meta[name].clone()))
}

/// The JSON lines of a metrics file.
fn metric_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = factune_io::error::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub steps: usize,
    pub final_train_loss: f64,
    pub final_val_loss: Option<f64>,
    pub seconds: f64,
    pub tokens: usize,
    pub trainable_summary: String,
    /// The output is a full model (the run changed base tensors), not an adapter.
    pub full_model: bool,
}

pub struct TrainJob<'a> {
    pub model: &'a mut Model,
    pub tokenizer: &'a TextTokenizer,
    pub config: TrainConfig,
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: Option<PathBuf>,
    /// A resume may change the learning-rate schedule (`resume::SCHEDULE`).
    pub override_schedule: bool,
    /// Where the run reports its steps and notes.
    pub progress: &'a dyn Progress,
}

/// The configuration and step count a checkpoint recorded (a resumed run continues with its own config).
pub fn checkpoint_state(ckpt: &Path) -> Result<(TrainConfig, usize)> {
    let state: serde_json::Value = factune_io::error::read_json(&ckpt.join(STATE_FILE))?;
    let mut config: TrainConfig = serde_json::from_value(state["config"].clone())
        .map_err(|e| Error::invalid(ckpt.join(STATE_FILE), format!("bad config: {e}")))?;
    config.retain_own_method_keys();
    let step = state["step"]
        .as_u64()
        .ok_or_else(|| Error::invalid(ckpt.join(STATE_FILE), "missing `step`"))?;
    Ok((config, step as usize))
}

/// Whether `out` holds a training run (its `run.json` or a checkpoint), which a new run would mix with.
pub fn holds_run(out: &Path) -> bool {
    out.join("run.json").exists()
        || run_files(out).iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
}

/// What a training run writes into its output directory, as found there: checkpoints, the adapter or full
/// model, metrics, plots and reports.
fn run_files(out: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return vec![];
    };
    let named = [
        "run.json",
        "metrics.jsonl",
        "loss.png",
        peft::CONFIG_FILE,
        peft::WEIGHTS_FILE,
        "update_spectrum.json",
        "update_spectrum.png",
        STREAM_FILE,
        "stream.png",
        "quant_layout.json",
        "loftq_errors.json",
        peft::LOFTQ_BASE_DIR,
        "config.json",
        "model.safetensors",
    ];
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| {
                n.starts_with("checkpoint-")
                    || named.contains(&n.as_str())
                    || factune_model::save::TOKENIZER_FILES.contains(&n.as_str())
            })
        })
        .collect()
}

/// Removes an earlier run from `out` (`--overwrite`): only what a run writes there, and only where `out`
/// holds a run; returns how many entries went.
pub fn clear_run(out: &Path) -> Result<usize> {
    if !holds_run(out) {
        return Ok(0);
    }
    let files = run_files(out);
    for p in &files {
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        gone.map_err(|e| Error::io(p, e))?;
    }
    Ok(files.len())
}

/// What a run trains on and is validated with, as `train` reads it.
pub struct RunData {
    /// The (first) file's record shape, and what cutting to `seq_len` removed.
    pub shape: factune_data::Shape,
    pub truncation: Truncation,
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    /// An Online-LoRA run's stream (its training examples are `train`, in order).
    pub stream: Option<Stream>,
}

/// `data` split by `validation_split` (drawn with `data_seed`) unless `eval_data` is given; an Online-LoRA
/// run's stream of files, each holding out its own share.
pub fn load_run_data(cfg: &TrainConfig, data: &Path, tok: &TextTokenizer) -> Result<RunData> {
    let (stream, ds) = match cfg.is_online() {
        true => {
            let files = stream_files(data, &cfg.stream_data);
            let (st, ds) = Stream::load(
                &files,
                &cfg.data_options(),
                tok,
                cfg.validation_split,
                cfg.data_seed,
            )?;
            (Some(st), ds)
        }
        false => (None, Dataset::load(data, &cfg.data_options(), tok)?),
    };
    let (shape, truncation) = (ds.shape, ds.truncation.clone());
    let (train, val) = match &stream {
        Some(st) => (ds.examples, st.held_out()),
        None if cfg.eval_data.is_empty() => ds.split(cfg.validation_split, cfg.data_seed),
        None => {
            let eval = Dataset::load(Path::new(&cfg.eval_data), &cfg.data_options(), tok)?;
            (ds.examples, eval.examples)
        }
    };
    Ok(RunData {
        shape,
        truncation,
        train,
        val,
        stream,
    })
}

impl TrainJob<'_> {
    pub fn run(mut self) -> Result<TrainOutcome> {
        let started = Instant::now();
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        // One run per output directory; what killed runs left half-written there goes first.
        let _lock = atomic::OutputLock::acquire(&self.out)?;
        let cleaned = atomic::clean_leftovers(&self.out)?;
        if cleaned > 0 {
            self.progress.note(&format!(
                "removed {cleaned} half-written checkpoint or temporary file(s) left by runs that were killed"
            ));
        }
        let mut start_step = 0usize;
        if let Some(ckpt) = self.resume.clone() {
            // The caller resolves what may change (`resume::resumed_config`); nothing else may differ.
            let (saved, steps) = checkpoint_state(&ckpt)?;
            crate::resume::check_same(&saved, &self.config, self.override_schedule)?;
            start_step = steps;
        }
        let inputs = self.inputs()?;
        if let Some(ckpt) = &self.resume {
            same_inputs(ckpt, &inputs)?;
        }
        self.config.validate()?;
        let cfg = self.config.clone();
        if cfg.seq_len > self.model.max_positions() {
            return Err(Error::config(format!(
                "seq_len {} exceeds the model's context of {} positions (max_position_embeddings)",
                cfg.seq_len,
                self.model.max_positions()
            )));
        }
        let RunData {
            shape,
            truncation,
            train,
            val,
            stream,
        } = load_run_data(&cfg, &self.data, self.tokenizer)?;
        let train = Rc::new(train);
        let length_note = self.config.resolve_length(train.len())?;
        self.config.validate()?; // what depends on the length (warm start, AdaLoRA's schedule)
        let cfg = self.config.clone();
        if start_step >= cfg.total_steps() {
            return Err(Error::config(format!(
                "the checkpoint is at step {start_step} and the run is {} steps long: nothing is left to train",
                cfg.max_steps
            )));
        }
        check_activation_memory(&cfg, &self.model.cfg, &train)?;
        if let Some(line) = check_work(&cfg, train.len())? {
            self.progress.note(&line);
        }
        let mut adapter_cfg = cfg.adapter_config()?;
        if let Some(budget) = cfg.mixed_budget() {
            let t0 = Instant::now();
            let layout =
                factune_adapters::lqlora::plan(self.model, &adapter_cfg, budget, cfg.double_quant)?;
            self.report_layout(&layout, budget, t0.elapsed().as_secs_f64())?;
        }
        let params = match self.resume.clone() {
            Some(ckpt) => {
                let (params, saved) = self.restore(&ckpt, start_step)?;
                // EVA's redistributed ranks live in the checkpoint's config, not in the run's settings
                if let Some(saved) = saved.filter(|_| adapter_cfg.init_lora_weights == "eva") {
                    adapter_cfg = saved;
                }
                params
            }
            None if relora::adapters_on(&cfg, 0) => {
                let (params, used) = self.switch_to_adapters(&train)?;
                adapter_cfg = used;
                params
            }
            None => self.model.set_trainable(&|_| true)?,
        };
        if cfg.is_loftq() && self.resume.is_none() {
            self.report_loftq()?;
        }
        if let Some(o) = cfg.nf4_options() {
            self.model.quantize_linears(o)?;
        }
        let summary = self.summary(&params);
        self.progress.note(&summary);
        if !self.model.quantized_keys().is_empty() {
            self.progress.note(&format!(
                "base: {} linear weights quantised, {:.1} MB",
                self.model.quantized_keys().len(),
                self.model.linear_weight_bytes() as f64 / 1e6
            ));
        }
        self.progress.note(&format!(
            "data: {} ({}): {} training / {} validation examples",
            self.data.display(),
            shape.name(),
            train.len(),
            val.len()
        ));
        if let Some(line) = truncation.summary(cfg.seq_len) {
            self.progress.note(&line);
        }
        if let Some(line) = length_note.filter(|_| start_step == 0) {
            self.progress.note(&line);
        }
        let mut opt = AdamW::new(
            &sizes(&params),
            cfg.adam_beta1,
            cfg.adam_beta2,
            cfg.adam_epsilon,
            cfg.weight_decay,
        );
        if let Some(ckpt) = &self.resume {
            load_optimizer(&mut opt, &params, &ckpt.join(OPTIM_FILE))?;
        }
        // What the method adds to each step (AdaLoRA's rank schedule) and ReLoRA's restarts, with their state
        // when resuming.
        let mut hooks: Vec<Box<dyn StepHook>> = Vec::new();
        hooks.extend(
            adapter_cfg
                .method
                .method()
                .step_hook(&adapter_cfg, self.model)?,
        );
        if cfg.relora_steps > 0 {
            hooks.push(Box::new(relora::Restarts::new(&cfg)));
        }
        let pad = pad_id(self.tokenizer);
        let replay: Replay = Rc::default();
        if cfg.is_online() {
            hooks.push(Box::new(Consolidation::new(
                cfg.online_settings(),
                train.clone(),
                pad,
                replay.clone(),
            )));
        }
        if let Some(ckpt) = &self.resume {
            for h in hooks.iter_mut() {
                if h.state()?.is_some() {
                    // (ReLoRA's restarts are a function of the step: nothing to restore)
                    let (tensors, meta) = read_state(ckpt, h.name())?;
                    h.restore(&tensors, &meta)?;
                }
            }
        }
        let metrics_path = self.out.join("metrics.jsonl");
        let mut log = match self.resume {
            Some(_) => MetricsLog::resume(&metrics_path, start_step)?,
            None => MetricsLog::open(&metrics_path, true)?,
        };
        self.write_run_metadata(&train, &val, &truncation, &inputs)?;
        let mut stream_report = match (&stream, &self.resume) {
            (Some(_), Some(_)) => StreamReport::from_metrics(&metric_lines(&metrics_path)?),
            _ => StreamReport::default(),
        };

        let batches = Batches::new(train.len(), cfg.data_seed, cfg.micro_batch_size);
        let dev = self.model.device.clone();
        let mut micro_batch = |j: usize| -> Result<MicroBatch> {
            // a stream in order, with the hard buffer replayed (one micro-batch per step); else shuffled
            let picked: Vec<usize> = match &stream {
                Some(st) => st
                    .step_range(j, cfg.micro_batch_size)
                    .chain(replay.borrow().iter().copied())
                    .collect(),
                None => batches.indices(j),
            };
            let exs: Vec<&Example> = picked.into_iter().map(|i| &train[i]).collect();
            let (ids, labels) = collate(&exs, pad);
            Ok((to_tensor(&ids, &dev)?, labels))
        };
        let mut trainer = Trainer::new(
            params,
            &peft::roles(self.model),
            opt,
            cfg.step_settings(),
            relora::updated_before(&cfg, start_step),
        );
        let mut best = Best::new(&cfg);
        if let (Some(b), Some(ckpt)) = (best.as_mut(), &self.resume) {
            let (tensors, meta) = read_state(ckpt, BEST)?;
            b.restore(&tensors, &meta, &trainer.params)?;
        }
        self.progress.start(cfg.total_steps(), start_step);
        let (mut last_loss, mut last_val, mut total_tokens) = (f64::NAN, None, 0usize);
        let mut steps_run = cfg.total_steps();
        for step in start_step..cfg.total_steps() {
            if cfg.warm_start_steps > 0 && step == cfg.warm_start_steps {
                let (next, used) = self.switch_to_adapters(&train)?;
                adapter_cfg = used;
                trainer.replace_params(next, &peft::roles(self.model));
                self.progress.note(&format!(
                    "step {step}: warm start over, training adapters: {}",
                    self.summary(&trainer.params)
                ));
                log.write(&json!({"step": step, "event": "warm_start_end"}))?;
            }
            let t0 = Instant::now();
            let lr = relora::lr(&cfg, step);
            let report = trainer
                .step(self.model, step, lr, &mut micro_batch, &mut hooks)
                .map_err(|e| match e {
                    Error::Config(m) if m.starts_with("loss is") => Error::config(format!(
                        "{m} — stopping; the last good checkpoint (if any) in {} is kept",
                        self.out.display()
                    )),
                    e => e,
                })?;
            for mut event in report.events {
                event["step"] = step.into();
                log.write(&event)?;
            }
            last_loss = report.loss;
            total_tokens += report.tokens;
            let tps = report.tokens as f64 / t0.elapsed().as_secs_f64();
            let mut entry = json!({"step": step + 1, "loss": last_loss, "lr": lr, "grad_norm": report.grad_norm, "tokens": report.tokens, "tokens_per_s": tps});
            for (key, value) in report.logged {
                entry[key] = value;
            }
            log.write(&entry)?;
            self.progress.step(step + 1, last_loss, lr, tps);
            if let Some(st) = &stream {
                let mut ended = st.ending_in(step, cfg.micro_batch_size);
                if ended.is_empty() && step + 1 == cfg.total_steps() {
                    // max_steps cut the stream short: score where it stopped
                    let last = st.step_range(step, cfg.micro_batch_size).end;
                    ended = st
                        .segments
                        .iter()
                        .position(|g| g.end >= last)
                        .into_iter()
                        .collect();
                }
                for seg in ended {
                    let line = stream_report.record(
                        self.model,
                        st,
                        (step + 1, seg),
                        cfg.micro_batch_size,
                        pad,
                    )?;
                    log.write(&line)?;
                    self.progress.note(&format!(
                        "step {}: stream segment {} ({}) done; held-out accuracy per segment {}",
                        step + 1,
                        seg + 1,
                        st.segments[seg].name,
                        stream_report.last_accuracies()
                    ));
                }
            }
            let done = step + 1 == cfg.total_steps();
            let mut stop = false;
            if !val.is_empty() && ((cfg.eval_steps > 0 && (step + 1) % cfg.eval_steps == 0) || done)
            {
                let (vl, _) = evaluate_loss(self.model, &val, cfg.micro_batch_size, pad)?;
                log.write(&json!({"step": step + 1, "val_loss": vl}))?;
                self.progress
                    .note(&format!("step {}: val_loss {vl:.4}", step + 1));
                last_val = Some(vl);
                if let Some(b) = best.as_mut() {
                    stop = b.observe(step + 1, vl, &trainer.params)? && !done;
                }
            }
            if cfg.save_steps > 0 && (step + 1) % cfg.save_steps == 0 {
                if let Some(st) = &stream {
                    log.write(&stream_report.checkpoint_line(
                        self.model,
                        st,
                        (step + 1, cfg.micro_batch_size),
                        cfg.micro_batch_size,
                        pad,
                    )?)?;
                }
                self.save_checkpoint(
                    step + 1,
                    &trainer.opt,
                    &trainer.params,
                    &adapter_cfg,
                    (&hooks, best.as_ref(), &inputs),
                )?;
            }
            if stop {
                log.write(&json!({"step": step + 1, "event": "early_stop"}))?;
                self.progress.note(&format!(
                    "step {}: early stopping: {} evaluations without an improvement over {:.4} (step {})",
                    step + 1,
                    cfg.early_stopping_patience,
                    best.as_ref().and_then(|b| b.val_loss).unwrap_or(f64::NAN),
                    best.as_ref().map_or(0, |b| b.step)
                ));
                steps_run = step + 1;
                break;
            }
        }
        self.progress.finish();
        if let Some(b) = &best {
            if let Some(note) = b.load_into(&trainer.params)? {
                log.write(
                    &json!({"step": b.step, "event": "best_loaded", "val_loss": b.val_loss}),
                )?;
                self.progress.note(&note);
                last_val = b.val_loss;
            }
        }
        if let Some(st) = &stream {
            let summary = stream_report.summary(st);
            let text =
                serde_json::to_string_pretty(&summary).map_err(|e| Error::config(e.to_string()))?;
            atomic::write_atomic(&self.out.join(STREAM_FILE), text.as_bytes())?;
            self.progress.note(&format!(
                "stream of {} segments: average held-out accuracy {:.4}, forgetting {} ({STREAM_FILE})",
                st.segments.len(),
                summary["average_accuracy"].as_f64().unwrap_or(f64::NAN),
                summary["forgetting"]
                    .as_f64()
                    .map_or("n/a (one segment)".into(), |f| format!("{f:.4}"))
            ));
        }
        let mut last = None;
        for h in &hooks {
            if last.is_none() {
                last = h.final_adapter(self.model, &adapter_cfg)?;
            }
        }
        let full_model = last.is_none() && cfg.changes_base();
        if let Some((tensors, c, note)) = last {
            peft::write_tensors(self.model, &c, tensors, &self.out)?;
            self.progress.note(&note);
        } else if full_model {
            self.save_full_model()?;
        } else {
            let written = peft::save_portable(self.model, &adapter_cfg, &self.out)?;
            if self.out.join(peft::LOFTQ_BASE_DIR).exists() {
                self.progress.note(&format!(
                    "LoftQ: the adapter belongs on its 4-bit base, written to {} (use it as --model)",
                    self.out.join(peft::LOFTQ_BASE_DIR).display()
                ));
            } else if written.r != adapter_cfg.r {
                self.progress.note(&format!(
                    "PiSSA adapter saved as a rank-{} LoRA relative to the original weights (loads onto the unmodified base in factune and PEFT)",
                    written.r
                ));
            }
        }
        Ok(TrainOutcome {
            steps: steps_run,
            final_train_loss: last_loss,
            final_val_loss: last_val,
            seconds: started.elapsed().as_secs_f64(),
            tokens: total_tokens,
            trainable_summary: summary,
            full_model,
        })
    }

    /// The mixed-precision layout: widths chosen, printed in summary and written to `quant_layout.json`.
    fn report_layout(
        &self,
        layout: &[factune_adapters::lqlora::Choice],
        budget: f64,
        secs: f64,
    ) -> Result<()> {
        let total: usize = layout.iter().map(|c| c.params).sum();
        let bits: f64 = layout
            .iter()
            .map(|c| c.bits_per_param * c.params as f64)
            .sum();
        let mut counts = std::collections::BTreeMap::new();
        for c in layout {
            *counts.entry(c.bits).or_insert(0) += 1;
        }
        let widths: Vec<String> = counts.iter().map(|(b, n)| format!("{n}× NF{b}")).collect();
        self.progress.note(&format!(
            "mixed precision for {budget} bits/weight: {} → {:.3} bits/weight on average (planned in {secs:.1}s; \
             layout in quant_layout.json)",
            widths.join(", "),
            bits / total.max(1) as f64
        ));
        let text = serde_json::to_string_pretty(&json!({
            "budget_bits_per_weight": budget,
            "bits_per_weight": bits / total.max(1) as f64,
            "layers": layout,
        }))
        .map_err(|e| Error::config(e.to_string()))?;
        atomic::write_atomic(&self.out.join("quant_layout.json"), text.as_bytes())
    }

    /// LoftQ's reconstruction error per layer against plain NF4, printed in summary and written to
    /// `loftq_errors.json`.
    fn report_loftq(&self) -> Result<()> {
        let original = Weights::from_model_dir(&self.model.dir)?;
        let mut rows = Vec::new();
        let (mut nf4, mut loftq) = (0.0, 0.0);
        for l in self.model.linears() {
            if l.adapter.is_none() {
                continue;
            }
            let e = factune_adapters::loftq::error(l, &l.original_weight(&original)?)?;
            nf4 += e.nf4 * e.nf4;
            loftq += e.loftq * e.loftq;
            rows.push(json!({"module": l.path, "nf4_error": e.nf4, "loftq_error": e.loftq}));
        }
        self.progress.note(&format!(
            "LoftQ ({} iterations): ‖W − (deq(Q) + sBA)‖ = {:.4e} over {} layers, plain quantisation {:.4e} ({:+.1}%)",
            self.config.loftq_iter,
            loftq.sqrt(),
            rows.len(),
            nf4.sqrt(),
            100.0 * (loftq.sqrt() / nf4.sqrt() - 1.0)
        ));
        let text = serde_json::to_string_pretty(&rows).map_err(|e| Error::config(e.to_string()))?;
        atomic::write_atomic(&self.out.join("loftq_errors.json"), text.as_bytes())
    }

    /// Freezes the linear weights (keeping embeddings and norms trainable when configured), attaches fresh
    /// adapters, and returns the trainable tensors: base tensors first, then adapters in module order.
    /// Also returns the adapter config in use (EVA's redistributes the ranks).
    fn switch_to_adapters(
        &mut self,
        train: &[Example],
    ) -> Result<(Params, factune_adapters::AdapterConfig)> {
        let mut params = self.freeze_linears()?;
        let t0 = Instant::now();
        let mut cfg = self.config.adapter_config()?;
        if cfg.init_lora_weights == "eva" {
            cfg = self.eva_init(&cfg, train)?;
        } else {
            attach(self.model, &cfg, self.config.seed)?;
        }
        let wrapped = self
            .model
            .linears()
            .iter()
            .filter(|l| l.adapter.is_some())
            .count();
        let what = match &self.model.prompt {
            Some(p) => format!("{}: {} virtual tokens", p.method(), p.num_virtual_tokens()),
            None => format!("{wrapped} modules"),
        };
        self.progress.note(&format!(
            "adapters: {what} initialised in {:.2}s",
            t0.elapsed().as_secs_f64()
        ));
        params.extend(trainable(self.model));
        Ok((params, cfg))
    }

    /// EVA: the targeted layers' inputs over the first `eva_batches` micro-batches of the training order
    /// (positions with labels), then A from their principal directions.
    fn eva_init(
        &mut self,
        cfg: &factune_adapters::AdapterConfig,
        train: &[Example],
    ) -> Result<factune_adapters::AdapterConfig> {
        let c = self.config.clone();
        let mut collector = factune_adapters::eva::Collector::start(self.model, cfg)?;
        let batches = Batches::new(train.len(), c.data_seed, c.micro_batch_size);
        let pad = pad_id(self.tokenizer);
        let dev = self.model.device.clone();
        for j in 0..c.eva_batches {
            let exs: Vec<&Example> = batches.indices(j).into_iter().map(|i| &train[i]).collect();
            let (ids, labels) = collate(&exs, pad);
            let keep: Vec<bool> = labels.iter().flatten().map(|&l| l != -100).collect();
            self.model
                .forward(&to_tensor(&ids, &dev)?, None, &Ctx::default())?;
            collector.absorb(&keep)?;
        }
        let out =
            factune_adapters::eva::attach(self.model, cfg, collector, c.eva_rho, c.eva_whiten)?;
        let ranks: Vec<usize> = self
            .model
            .linears()
            .iter()
            .filter(|l| cfg.target_modules_match(&l.path))
            .map(|l| out.rank_for(&l.path) * usize::from(l.adapter.is_some()))
            .collect();
        self.progress.note(&format!(
            "EVA: ranks from {} batches (rho {}): min {} / max {} over {} modules",
            c.eva_batches,
            c.eva_rho,
            ranks.iter().min().unwrap_or(&0),
            ranks.iter().max().unwrap_or(&0),
            ranks.len()
        ));
        Ok(out)
    }

    /// The adapter phase's base trainables: embeddings and norms when configured, never linear weights.
    fn freeze_linears(&mut self) -> Result<Vec<(String, Var)>> {
        let linear_keys: BTreeSet<String> = self
            .model
            .linears()
            .iter()
            .flat_map(|l| [format!("{}.weight", l.path), format!("{}.bias", l.path)])
            .collect();
        let keep = self.config.train_embeddings_and_norms;
        self.model
            .set_trainable(&|k| keep && !linear_keys.contains(k))
    }

    /// Puts the model in the state checkpoint `ckpt` recorded after `steps_done` steps and returns the
    /// trainable tensors in the same order a straight run has them.
    /// Also returns the adapter config the checkpoint holds, if it holds an adapter.
    fn restore(
        &mut self,
        ckpt: &Path,
        steps_done: usize,
    ) -> Result<(Params, Option<factune_adapters::AdapterConfig>)> {
        let cfg = self.config.clone();
        if cfg.changes_base() {
            let w = Weights::from_files(&[ckpt.join(MODEL_STATE_FILE)])?;
            self.model.load_state(&w)?;
        }
        if !relora::adapters_on(&cfg, steps_done) {
            return Ok((self.model.set_trainable(&|_| true)?, None));
        }
        let mut params = self.freeze_linears()?;
        let (saved, _) = peft::load(self.model, ckpt, false)?;
        params.extend(trainable(self.model));
        Ok((params, Some(saved)))
    }

    /// PEFT's trainable-parameter line, or its full-model form when base tensors train too.
    fn summary(&self, params: &[(String, Var)]) -> String {
        let adapters: usize = trainable(self.model)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let all: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        if all == adapters {
            return trainable_summary(self.model);
        }
        let total = self.model.num_base_parameters() + adapters;
        format!(
            "trainable params: {} ({} in adapters, {} in base tensors) || all params: {} || trainable%: {:.4}",
            thousands(all),
            thousands(adapters),
            thousands(all - adapters),
            thousands(total),
            100.0 * all as f64 / total as f64
        )
    }

    /// The end of a run that changed the base: adapters merged, the spectrum of each linear layer's total
    /// update `W − W₀` measured (ReLoRA's rank diagnostic), and a full Hugging Face checkpoint written.
    fn save_full_model(&mut self) -> Result<()> {
        for l in self.model.linears_mut() {
            l.fold()?;
        }
        let original = Weights::from_model_dir(&self.model.dir)?;
        let spectra = update_spectra(self.model, &original)?;
        drop(original);
        if let Some(line) =
            crate::diagnostics::write_update_spectra(&self.out, &spectra, self.config.r)?
        {
            self.progress.note(&line);
        }
        let tokenizer_dir = self.model.dir.clone();
        factune_model::save::save_pretrained(
            self.model,
            &self.out,
            candle_core::DType::F32,
            &tokenizer_dir,
        )
    }

    fn write_run_metadata(
        &self,
        train: &[Example],
        val: &[Example],
        truncation: &Truncation,
        inputs: &serde_json::Value,
    ) -> Result<()> {
        let c = &self.config;
        let meta = json!({
            "factune_version": env!("CARGO_PKG_VERSION"),
            "model": self.model.dir.display().to_string(),
            "data": self.data.display().to_string(),
            "train_examples": train.len(),
            "validation_examples": val.len(),
            "truncation": truncation,
            "inputs": inputs,
            "seeds": {"init": c.seed, "data": c.data_seed, "dropout": c.dropout_seed},
            "resumed_from": self.resume.as_ref().map(|p| p.display().to_string()),
            "config": c,
        });
        let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::config(e.to_string()))?;
        atomic::write_atomic(&self.out.join("run.json"), text.as_bytes())
    }

    /// What the run reads, by content: the data (and eval_data) by SHA-256, the model by its fingerprint.
    fn inputs(&self) -> Result<serde_json::Value> {
        use factune_io::fingerprint::{data_sha256, model_fingerprint};
        let mut v = json!({
            "data": {"path": self.data.display().to_string(), "sha256": data_sha256(&self.data)?},
            "model": {"path": self.model.dir.display().to_string(), "fingerprint": model_fingerprint(&self.model.dir)?},
        });
        if !self.config.eval_data.is_empty() {
            let p = Path::new(&self.config.eval_data);
            v["eval_data"] = json!({"path": p.display().to_string(), "sha256": data_sha256(p)?});
        }
        if self.config.is_online() {
            // the rest of the stream is the run's data as much as --data is
            let more = stream_files(&self.data, &self.config.stream_data);
            let ids = more[1..]
                .iter()
                .map(|p| Ok(json!({"path": p.display().to_string(), "sha256": data_sha256(p)?})))
                .collect::<Result<Vec<_>>>()?;
            v["data"]["stream"] = ids.into();
        }
        Ok(v)
    }

    /// `OUT/checkpoint-N/`: adapter, optimizer moments, step and config, published as a whole directory.
    fn save_checkpoint(
        &self,
        step: usize,
        opt: &AdamW,
        params: &[(String, Var)],
        adapter_cfg: &factune_adapters::AdapterConfig,
        (hooks, best, inputs): (&[Box<dyn StepHook>], Option<&Best>, &serde_json::Value),
    ) -> Result<()> {
        let dest = self.out.join(format!("checkpoint-{step}"));
        let staging = self
            .out
            .join(format!(".checkpoint-{step}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        if self.model.prompt.is_some() || self.model.linears().iter().any(|l| l.adapter.is_some()) {
            let mut cfg = adapter_cfg.clone();
            if self.config.changes_base() {
                // model.safetensors holds the current base (a PiSSA residual included): the adapter is plain
                // LoRA on top of it, and loading must not re-derive an init from that base.
                cfg.init_lora_weights = serde_json::Value::Bool(true);
            }
            peft::save(self.model, &cfg, &staging)?;
        }
        if self.config.changes_base() {
            let state: BTreeMap<String, Tensor> = self.model.named_tensors().into_iter().collect();
            atomic::write_atomic(
                &staging.join(MODEL_STATE_FILE),
                &to_safetensors_bytes(&state, None)?,
            )?;
        }
        let mut tensors = BTreeMap::new();
        for (i, (k, v)) in params.iter().enumerate() {
            let shape = v.shape().clone();
            tensors.insert(
                format!("{k}.exp_avg"),
                Tensor::from_vec(opt.exp_avg[i].clone(), &shape, &Device::Cpu)?,
            );
            tensors.insert(
                format!("{k}.exp_avg_sq"),
                Tensor::from_vec(opt.exp_avg_sq[i].clone(), &shape, &Device::Cpu)?,
            );
        }
        atomic::write_atomic(
            &staging.join(OPTIM_FILE),
            &to_safetensors_bytes(&tensors, None)?,
        )?;
        let mut state =
            json!({"step": step, "optimizer_t": opt.t, "config": self.config, "inputs": inputs});
        let mut states = Vec::new();
        for h in hooks {
            states.extend(h.state()?.map(|s| (h.name(), s)));
        }
        states.extend(best.map(|b| (BEST, b.state(params))));
        for (name, (tensors, meta)) in states {
            atomic::write_atomic(
                &staging.join(hook_file(name)),
                &to_safetensors_bytes(&tensors, None)?,
            )?;
            state[name] = meta;
        }
        let text =
            serde_json::to_string_pretty(&state).map_err(|e| Error::config(e.to_string()))?;
        atomic::write_atomic(&staging.join(STATE_FILE), text.as_bytes())?;
        atomic::publish_dir(&staging, &dest)?;
        self.prune_checkpoints()
    }

    /// `save_total_limit`: removes all but the newest N `checkpoint-STEP` directories.
    fn prune_checkpoints(&self) -> Result<()> {
        let limit = self.config.save_total_limit;
        if limit == 0 {
            return Ok(());
        }
        let mut steps: Vec<usize> = std::fs::read_dir(&self.out)
            .map_err(|e| Error::io(&self.out, e))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_unstable();
        for step in &steps[..steps.len().saturating_sub(limit)] {
            atomic::retire_dir(&self.out.join(format!("checkpoint-{step}")))?;
        }
        Ok(())
    }
}

/// Refuses a micro-batch whose activations cannot fit in this machine's memory, before the first step
/// allocates them (which would abort the process). The bound is a floor, so no run that fits is refused: the
/// residual stream kept at every block boundary, f32, even with gradient checkpointing.
fn check_activation_memory(
    cfg: &TrainConfig,
    model: &factune_io::ModelConfig,
    train: &[Example],
) -> Result<()> {
    let Some(total) = factune_io::memory::physical_bytes() else {
        return Ok(());
    };
    let longest = train.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let floor = (cfg.micro_batch_size as u128)
        * longest.min(cfg.seq_len) as u128
        * model.hidden_size as u128
        * model.num_layers as u128
        * 4;
    if floor > total as u128 {
        return Err(Error::config(format!(
            "micro_batch_size {} × {} tokens needs at least {:.1} GB of activations ({} layers × hidden {}), \
             more than this machine's {:.1} GB: lower micro_batch_size (and raise gradient_accumulation_steps for \
             the same batch) or seq_len",
            cfg.micro_batch_size,
            longest.min(cfg.seq_len),
            floor as f64 / 1e9,
            model.num_layers,
            model.hidden_size,
            total as f64 / 1e9
        )));
    }
    Ok(())
}

/// Refuses settings whose work has no sensible end on this data (a step or EVA's statistics reading the
/// data many times over) and says how many passes over the data the run makes when that is many.
fn check_work(cfg: &TrainConfig, examples: usize) -> Result<Option<String>> {
    let n = examples.max(1) as f64;
    let per_step = cfg.micro_batch_size as f64 * cfg.gradient_accumulation_steps as f64;
    if per_step > 100.0 * n {
        return Err(Error::config(format!(
            "one step of micro_batch_size {} × gradient_accumulation_steps {} reads {per_step:.0} examples, {:.0} \
             passes over the {examples} training examples: lower gradient_accumulation_steps",
            cfg.micro_batch_size,
            cfg.gradient_accumulation_steps,
            per_step / n
        )));
    }
    let eva = cfg.eva_batches as f64 * cfg.micro_batch_size as f64;
    if cfg.init_lora_weights == crate::config::InitWeights::Named("eva".into())
        && eva > n + cfg.micro_batch_size as f64
    {
        return Err(Error::config(format!(
            "eva_batches {} reads {eva:.0} examples, more than one pass over the {examples} training examples \
             (PEFT's EVA stops at the end of the data): at most {} batches of {}",
            cfg.eva_batches,
            examples.div_ceil(cfg.micro_batch_size),
            cfg.micro_batch_size
        )));
    }
    let epochs = cfg.total_steps() as f64 * per_step / n;
    Ok((epochs > 1000.0).then(|| {
        format!(
            "the run reads the {examples} training examples {epochs:.3e} times ({} steps of {per_step:.0}); \
             the progress line shows the time it takes",
            cfg.total_steps()
        )
    }))
}

fn load_optimizer(opt: &mut AdamW, params: &[(String, Var)], path: &Path) -> Result<()> {
    let w = Weights::from_files(&[path.to_path_buf()])?;
    for (i, (k, _)) in params.iter().enumerate() {
        let read = |name: String| -> Result<Vec<f32>> {
            Ok(w.get(&name, candle_core::DType::F32, &Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        opt.exp_avg[i] = read(format!("{k}.exp_avg"))?;
        opt.exp_avg_sq[i] = read(format!("{k}.exp_avg_sq"))?;
    }
    let state: serde_json::Value = factune_io::error::read_json(&path.with_file_name(STATE_FILE))?;
    opt.t = state["optimizer_t"]
        .as_u64()
        .ok_or_else(|| Error::invalid(path.with_file_name(STATE_FILE), "missing `optimizer_t`"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_without_a_sensible_end_is_refused_or_named() {
        let cfg = |toml: &str| -> TrainConfig { toml::from_str(toml).unwrap() };
        let e = check_work(&cfg("gradient_accumulation_steps = 1000000000000"), 100).unwrap_err();
        assert!(
            e.to_string().contains("lower gradient_accumulation_steps"),
            "{e}"
        );
        let e = check_work(
            &cfg("init_lora_weights = \"eva\"\neva_batches = 1000000000"),
            100,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at most 25 batches of 4"), "{e}");
        let note = check_work(&cfg("max_steps = 1000000000000000"), 100).unwrap();
        assert!(note.unwrap().contains("4.000e13 times"));
        assert_eq!(check_work(&cfg("max_steps = 100"), 100).unwrap(), None);
    }
}
