//! The training loop: micro-batches with gradient accumulation, clipping, AdamW, schedule, validation,
//! atomic checkpoints that resume bit-identically, progress bar, JSONL metrics and a loss-curve PNG.

use crate::config::TrainConfig;
use crate::data::{collate, Batches, Dataset, Example};
use crate::metrics::{plot_curves, series, MetricsLog, LOSS_AXES};
use crate::optim::{clip_grad_norm, AdamW};
use crate::relora;
use candle_core::{Device, Tensor, Var};
use factune_adapters::adalora::{orth_penalty, resized, RankAllocator};
use factune_adapters::peft::thousands;
use factune_adapters::{attach, lora, peft, trainable, trainable_summary};
use factune_io::weights::to_safetensors_bytes;
use factune_io::{atomic, Error, Result, TextTokenizer, Weights};
use factune_model::spectrum::update_spectra;
use factune_model::{take_grads, Ctx, Model};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

const STATE_FILE: &str = "trainer_state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";
/// Every model tensor, for runs that change the base (full, ReLoRA, warm start, trained embeddings).
const MODEL_STATE_FILE: &str = "model.safetensors";
const ADALORA_FILE: &str = "adalora_state.safetensors";

/// The trainable tensors of a phase, by name, in a fixed order (the optimizer's).
type Params = Vec<(String, Var)>;

/// A line above the progress bar, or on stderr when there is no bar (not a terminal).
fn say(bar: &ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}

fn names_of(params: &[(String, Var)]) -> Vec<&str> {
    params.iter().map(|(k, _)| k.as_str()).collect()
}

fn sizes(params: &[(String, Var)]) -> Vec<usize> {
    params.iter().map(|(_, v)| v.elem_count()).collect()
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
    /// Draw the progress bar (off in tests).
    pub progress: bool,
}

fn to_tensor(ids: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
    Ok(Tensor::from_vec(ids.concat(), (b, t), dev)?)
}

fn pad_id(tok: &TextTokenizer) -> u32 {
    tok.eos_id().unwrap_or(0)
}

/// Mean loss over `examples`, weighted by counted tokens; no dropout.
pub fn evaluate_loss(
    model: &Model,
    examples: &[Example],
    batch: usize,
    pad: u32,
) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, labels) = collate(&refs, pad);
        let hidden =
            model.forward_hidden(&to_tensor(&ids, &model.device)?, None, &Ctx::default())?;
        let (loss, n) = model.lm_loss(&hidden.detach(), &labels)?;
        sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    Ok((sum / count.max(1) as f64, count))
}

/// The configuration and step count a checkpoint recorded (a resumed run continues with its own config).
pub fn checkpoint_state(ckpt: &Path) -> Result<(TrainConfig, usize)> {
    let state: serde_json::Value = factune_io::error::read_json(&ckpt.join(STATE_FILE))?;
    let config = serde_json::from_value(state["config"].clone())
        .map_err(|e| Error::invalid(ckpt.join(STATE_FILE), format!("bad config: {e}")))?;
    let step = state["step"]
        .as_u64()
        .ok_or_else(|| Error::invalid(ckpt.join(STATE_FILE), "missing `step`"))?;
    Ok((config, step as usize))
}

impl TrainJob<'_> {
    pub fn run(mut self) -> Result<TrainOutcome> {
        let started = Instant::now();
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        let mut start_step = 0usize;
        if let Some(ckpt) = self.resume.clone() {
            (self.config, start_step) = checkpoint_state(&ckpt)?;
        }
        let cfg = self.config.clone();
        cfg.validate()?;
        if cfg.seq_len > self.model.max_positions() {
            return Err(Error::config(format!(
                "seq_len {} exceeds the model's context of {} positions (max_position_embeddings)",
                cfg.seq_len,
                self.model.max_positions()
            )));
        }
        let ds = Dataset::load(
            &self.data,
            &cfg.data_format,
            self.tokenizer,
            cfg.seq_len,
            cfg.train_on_prompt,
        )?;
        let (fmt, truncated) = (ds.format, ds.truncated);
        let (train, val) = ds.split(cfg.validation_split, cfg.data_seed);
        if truncated > 0 {
            tracing::warn!(
                "{truncated} examples were longer than seq_len {} and were truncated",
                cfg.seq_len
            );
        }
        let mut adapter_cfg = cfg.adapter_config();
        if let Some(budget) = cfg.mixed_budget() {
            let t0 = Instant::now();
            let layout =
                factune_adapters::lqlora::plan(self.model, &adapter_cfg, budget, cfg.double_quant)?;
            self.report_layout(&layout, budget, t0.elapsed().as_secs_f64())?;
        }
        let mut params = match self.resume.clone() {
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
        eprintln!("{summary}");
        if !self.model.quantized_keys().is_empty() {
            eprintln!(
                "base: {} linear weights quantised, {:.1} MB",
                self.model.quantized_keys().len(),
                self.model.linear_weight_bytes() as f64 / 1e6
            );
        }
        eprintln!(
            "data: {} ({fmt:?}): {} training / {} validation examples",
            self.data.display(),
            train.len(),
            val.len()
        );
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
        // AdaLoRA's rank schedule is the trainer's job: no user hook to forget.
        let mut allocator = if adapter_cfg.peft_type == "ADALORA" {
            let mut a = RankAllocator::new(&adapter_cfg, self.model)?;
            if let Some(ckpt) = &self.resume {
                let w = Weights::from_files(&[ckpt.join(ADALORA_FILE)])?;
                let tensors: HashMap<String, Tensor> = w
                    .names()
                    .map(|n| {
                        Ok((
                            n.to_string(),
                            w.get(n, candle_core::DType::F32, &Device::Cpu)?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                let meta: serde_json::Value = factune_io::error::read_json(&ckpt.join(STATE_FILE))?;
                a.restore(&tensors, &meta["adalora"])?;
            }
            Some(a)
        } else {
            None
        };
        let metrics_path = self.out.join("metrics.jsonl");
        let mut log = MetricsLog::open(&metrics_path, self.resume.is_none())?;
        self.write_run_metadata(&train, &val)?;

        let batches = Batches::new(train.len(), cfg.data_seed, cfg.micro_batch_size);
        let pad = pad_id(self.tokenizer);
        let dev = self.model.device.clone();
        let bar = if self.progress {
            ProgressBar::new(cfg.max_steps as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("static template"),
        );
        bar.set_position(start_step as u64);
        let mut checked_grads = false;
        let mut updated_with_lr = start_step > 0;
        let (mut last_loss, mut last_val, mut total_tokens) = (f64::NAN, None, 0usize);
        for step in start_step..cfg.max_steps {
            if cfg.warm_start_steps > 0 && step == cfg.warm_start_steps {
                let (next, used) = self.switch_to_adapters(&train)?;
                adapter_cfg = used;
                opt = opt.remapped(&names_of(&params), &names_of(&next), &sizes(&next));
                params = next;
                (checked_grads, updated_with_lr) = (false, false);
                say(
                    &bar,
                    format!(
                        "step {step}: warm start over, training adapters: {}",
                        self.summary(&params)
                    ),
                );
                log.write(&json!({"step": step, "event": "warm_start_end"}))?;
            }
            if let Some(k) = relora::restart_at(&cfg, step) {
                let merged =
                    lora::merge_and_reinit(self.model, &mut relora::restart_rng(cfg.seed, k))?;
                for (i, (name, _)) in params.iter().enumerate() {
                    if name.contains(".lora_A.") || name.contains(".lora_B.") {
                        relora::prune_moments(
                            &mut opt.exp_avg[i],
                            &mut opt.exp_avg_sq[i],
                            cfg.optimizer_prune_ratio,
                        );
                    }
                }
                log.write(&json!({"step": step, "event": "relora_restart", "restart": k, "merged_modules": merged}))?;
            }
            let t0 = Instant::now();
            let lr = relora::lr(&cfg, step);
            let names = names_of(&params);
            let sizes = sizes(&params);
            let mut acc: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            let mut got: Vec<bool> = vec![false; params.len()];
            let (mut loss_sum, mut tokens) = (0f64, 0usize);
            for micro in 0..cfg.gradient_accumulation_steps {
                let j = step * cfg.gradient_accumulation_steps + micro;
                let exs: Vec<&Example> =
                    batches.indices(j).into_iter().map(|i| &train[i]).collect();
                let (ids, labels) = collate(&exs, pad);
                tokens += ids.iter().map(Vec::len).sum::<usize>();
                let ctx = Ctx {
                    train: true,
                    dropout_seed: cfg
                        .dropout_seed
                        .wrapping_mul(0x2545_F491_4F6C_DD1D)
                        .wrapping_add(j as u64),
                };
                let wanted: Vec<&Tensor> = params.iter().map(|(_, v)| v.as_tensor()).collect();
                let (loss, _, mut grads) = self.model.loss_and_grads(
                    &to_tensor(&ids, &dev)?,
                    &labels,
                    &ctx,
                    cfg.gradient_checkpointing,
                    &wanted,
                )?;
                let penalty = match allocator {
                    Some(_) => orth_penalty(self.model, cfg.orth_reg_weight)?,
                    None => None,
                };
                let loss = match penalty {
                    Some(p) => {
                        take_grads(p.backward()?, &wanted, &mut grads)?;
                        (loss + p.detach())?
                    }
                    None => loss,
                };
                let l = loss.to_scalar::<f32>()? as f64;
                if !l.is_finite() {
                    return Err(Error::config(format!(
                        "loss is {l} at step {} — stopping; the last good checkpoint (if any) in {} is kept",
                        step + 1,
                        self.out.display()
                    )));
                }
                loss_sum += l;
                for (i, g) in grads.iter().enumerate() {
                    if let Some(g) = g {
                        got[i] = true;
                        let g = g.flatten_all()?.to_vec1::<f32>()?;
                        acc[i].iter_mut().zip(g).for_each(|(a, g)| *a += g);
                    }
                }
            }
            let k = cfg.gradient_accumulation_steps as f32;
            acc.iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x /= k));
            let check_zero = updated_with_lr && !checked_grads;
            checked_grads |= check_zero;
            if let Some(problem) = gradient_problem(&names, &got, &acc, check_zero) {
                return Err(Error::config(problem));
            }
            let norm = clip_grad_norm(&mut acc, cfg.max_grad_norm);
            let mut values: Vec<Vec<f32>> = params
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
                .collect::<candle_core::Result<_>>()?;
            opt.step(
                &mut values,
                &acc,
                lr,
                &lr_scales(&names, cfg.loraplus_lr_ratio),
            );
            for ((_, var), val) in params.iter().zip(values) {
                var.set(&Tensor::from_vec(val, var.shape(), &dev)?)?;
            }
            let rank = match &mut allocator {
                Some(a) => {
                    let grads: HashMap<String, Vec<f32>> = names
                        .iter()
                        .zip(&acc)
                        .map(|(n, g)| {
                            (
                                n.trim_start_matches("base_model.model.").to_string(),
                                g.clone(),
                            )
                        })
                        .collect();
                    Some(a.update_and_allocate(self.model, &grads, step)?)
                }
                None => None,
            };
            updated_with_lr |= lr > 0.0;
            last_loss = loss_sum / cfg.gradient_accumulation_steps as f64;
            total_tokens += tokens;
            let tps = tokens as f64 / t0.elapsed().as_secs_f64();
            let mut entry = json!({"step": step + 1, "loss": last_loss, "lr": lr, "grad_norm": norm, "tokens": tokens, "tokens_per_s": tps});
            if let Some(r) = rank {
                entry["rank"] = r.into();
            }
            log.write(&entry)?;
            bar.set_message(format!("loss {last_loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            bar.inc(1);
            let done = step + 1 == cfg.max_steps;
            if !val.is_empty() && ((cfg.eval_steps > 0 && (step + 1) % cfg.eval_steps == 0) || done)
            {
                let (vl, _) = evaluate_loss(self.model, &val, cfg.micro_batch_size, pad)?;
                log.write(&json!({"step": step + 1, "val_loss": vl}))?;
                say(&bar, format!("step {}: val_loss {vl:.4}", step + 1));
                last_val = Some(vl);
            }
            if cfg.save_steps > 0 && (step + 1) % cfg.save_steps == 0 {
                self.save_checkpoint(step + 1, &opt, &params, &adapter_cfg, allocator.as_ref())?;
            }
        }
        bar.finish_and_clear();
        if let Some(a) = &allocator {
            // as PEFT saves a finished AdaLoRA run: cut to the kept triplets, rank_pattern in the config
            let (tensors, pattern) = resized(self.model, &a.current_mask(self.model)?)?;
            let total: usize = pattern.values().map(|p| p.rank()).sum();
            let mut c = adapter_cfg.clone();
            c.rank_pattern = pattern;
            peft::write_tensors(self.model, &c, tensors, &self.out)?;
            eprintln!("AdaLoRA: {total} singular values kept over all modules (rank_pattern in adapter_config.json)");
        } else if cfg.changes_base() {
            self.save_full_model()?;
        } else {
            let written = peft::save_portable(self.model, &adapter_cfg, &self.out)?;
            if self.out.join(peft::LOFTQ_BASE_DIR).exists() {
                eprintln!(
                    "LoftQ: the adapter belongs on its 4-bit base, written to {} (use it as --model)",
                    self.out.join(peft::LOFTQ_BASE_DIR).display()
                );
            } else if written.r != adapter_cfg.r {
                eprintln!(
                    "PiSSA adapter saved as a rank-{} LoRA relative to the original weights (loads onto the unmodified base in factune and PEFT)",
                    written.r
                );
            }
        }
        let train_curve = series(&metrics_path, "loss")?;
        let val_curve = series(&metrics_path, "val_loss")?;
        plot_curves(
            &self.out.join("loss.png"),
            "factune training loss",
            &LOSS_AXES,
            &[("train loss", train_curve), ("validation loss", val_curve)],
        )?;
        Ok(TrainOutcome {
            steps: cfg.max_steps,
            final_train_loss: last_loss,
            final_val_loss: last_val,
            seconds: started.elapsed().as_secs_f64(),
            tokens: total_tokens,
            trainable_summary: summary,
            full_model: cfg.changes_base(),
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
        eprintln!(
            "mixed precision for {budget} bits/weight: {} → {:.3} bits/weight on average (planned in {secs:.1}s; \
             layout in quant_layout.json)",
            widths.join(", "),
            bits / total.max(1) as f64
        );
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
        eprintln!(
            "LoftQ ({} iterations): ‖W − (deq(Q) + sBA)‖ = {:.4e} over {} layers, plain quantisation {:.4e} ({:+.1}%)",
            self.config.loftq_iter,
            loftq.sqrt(),
            rows.len(),
            nf4.sqrt(),
            100.0 * (loftq.sqrt() / nf4.sqrt() - 1.0)
        );
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
        let mut cfg = self.config.adapter_config();
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
        eprintln!(
            "adapters: {wrapped} modules initialised in {:.2}s",
            t0.elapsed().as_secs_f64()
        );
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
        eprintln!(
            "EVA: ranks from {} batches (rho {}): min {} / max {} over {} modules",
            c.eva_batches,
            c.eva_rho,
            ranks.iter().min().unwrap_or(&0),
            ranks.iter().max().unwrap_or(&0),
            ranks.len()
        );
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
        crate::diagnostics::write_update_spectra(&self.out, &spectra, self.config.r)?;
        let tokenizer_dir = self.model.dir.clone();
        factune_model::save::save_pretrained(
            self.model,
            &self.out,
            candle_core::DType::F32,
            &tokenizer_dir,
        )
    }

    fn write_run_metadata(&self, train: &[Example], val: &[Example]) -> Result<()> {
        let c = &self.config;
        let meta = json!({
            "factune_version": env!("CARGO_PKG_VERSION"),
            "model": self.model.dir.display().to_string(),
            "data": self.data.display().to_string(),
            "train_examples": train.len(),
            "validation_examples": val.len(),
            "seeds": {"init": c.seed, "data": c.data_seed, "dropout": c.dropout_seed},
            "resumed_from": self.resume.as_ref().map(|p| p.display().to_string()),
            "config": c,
        });
        let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::config(e.to_string()))?;
        atomic::write_atomic(&self.out.join("run.json"), text.as_bytes())
    }

    /// `OUT/checkpoint-N/`: adapter, optimizer moments, step and config, published as a whole directory.
    fn save_checkpoint(
        &self,
        step: usize,
        opt: &AdamW,
        params: &[(String, Var)],
        adapter_cfg: &factune_adapters::AdapterConfig,
        allocator: Option<&RankAllocator>,
    ) -> Result<()> {
        let dest = self.out.join(format!("checkpoint-{step}"));
        let staging = self
            .out
            .join(format!(".checkpoint-{step}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        if self.model.linears().iter().any(|l| l.adapter.is_some()) {
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
        let mut state = json!({"step": step, "optimizer_t": opt.t, "config": self.config});
        if let Some(a) = allocator {
            let (tensors, meta) = a.state()?;
            atomic::write_atomic(
                &staging.join(ADALORA_FILE),
                &to_safetensors_bytes(&tensors, None)?,
            )?;
            state["adalora"] = meta;
        }
        let text =
            serde_json::to_string_pretty(&state).map_err(|e| Error::config(e.to_string()))?;
        atomic::write_atomic(&staging.join(STATE_FILE), text.as_bytes())?;
        atomic::publish_dir(&staging, &dest)
    }
}

/// Per-parameter learning-rate multipliers: LoRA+ gives every B factor (`lora_B.*`) `ratio` × the base rate.
pub fn lr_scales(names: &[&str], loraplus_lr_ratio: f64) -> Vec<f64> {
    names
        .iter()
        .map(|n| {
            if n.contains(".lora_B.") {
                loraplus_lr_ratio
            } else {
                1.0
            }
        })
        .collect()
}

/// Missing gradients are a problem at every step; all-zero ones are checked once, at the first step after a
/// real update (LoRA's A legitimately gets a zero gradient while B is still zero).
pub fn gradient_problem(
    names: &[&str],
    got: &[bool],
    grads: &[Vec<f32>],
    check_zero: bool,
) -> Option<String> {
    let bad: Vec<&str> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| !got[*i] || (check_zero && grads[*i].iter().all(|x| *x == 0.0)))
        .map(|(_, n)| *n)
        .collect();
    bad.first().map(|first| {
        format!(
            "{} of {} adapter tensors received no gradient (first: `{first}`)",
            bad.len(),
            names.len()
        )
    })
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
    use super::{gradient_problem, lr_scales};

    #[test]
    fn loraplus_scales_only_b() {
        let names = ["m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"];
        assert_eq!(lr_scales(&names, 16.0), vec![1.0, 16.0]);
        assert_eq!(lr_scales(&names, 1.0), vec![1.0, 1.0]);
    }

    #[test]
    fn missing_and_zero_gradients_are_reported() {
        let names = ["a", "b", "c"];
        let g = vec![vec![0.0f32; 2], vec![1.0, 0.0], vec![0.0; 2]];
        assert_eq!(
            gradient_problem(&names, &[true, true, true], &g, false),
            None
        );
        let e = gradient_problem(&names, &[true, false, true], &g, false).unwrap();
        assert_eq!(
            e,
            "1 of 3 adapter tensors received no gradient (first: `b`)"
        );
        let e = gradient_problem(&names, &[true, true, true], &g, true).unwrap();
        assert!(e.starts_with("2 of 3") && e.contains("`a`"), "{e}");
    }
}
