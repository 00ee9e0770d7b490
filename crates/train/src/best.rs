//! The best evaluation of a run and early stopping on it: transformers' `load_best_model_at_end` and its
//! `EarlyStoppingCallback`, on validation loss, the one metric a run measures. The best values are held in
//! memory (and in each checkpoint), so the best may be any evaluation, not only one that fell on a save.

use crate::config::TrainConfig;
use candle_core::Tensor;
use candle_core::Var;
use factune_adapters::hooks::HookState;
use factune_io::{Error, Result};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};

pub struct Best {
    /// Keep the trainable values of the best evaluation (`load_best_model_at_end`).
    keep: bool,
    /// Evaluations without an improvement larger than `threshold` that stop the run (0: never).
    patience: usize,
    threshold: f64,
    /// The lowest validation loss so far and the step it was measured after.
    pub val_loss: Option<f64>,
    pub step: usize,
    evals_without_improvement: usize,
    /// The trainable values at `step` (when `keep`), in the trainer's parameter order.
    values: Vec<Tensor>,
}

impl Best {
    /// `None` when the run neither keeps the best model nor stops early.
    pub fn new(cfg: &TrainConfig) -> Option<Self> {
        (cfg.load_best_model_at_end || cfg.early_stopping_patience > 0).then(|| Best {
            keep: cfg.load_best_model_at_end,
            patience: cfg.early_stopping_patience,
            threshold: cfg.early_stopping_threshold,
            val_loss: None,
            step: 0,
            evals_without_improvement: 0,
            values: Vec::new(),
        })
    }

    /// Takes the validation loss measured after `step`; returns whether the run stops here (as transformers:
    /// an improvement counts when it beats the previous best by more than the threshold).
    pub fn observe(
        &mut self,
        step: usize,
        val_loss: f64,
        params: &[(String, Var)],
    ) -> Result<bool> {
        let better = self.val_loss.is_none_or(|b| val_loss < b);
        let counts = self
            .val_loss
            .is_none_or(|b| better && b - val_loss > self.threshold);
        if counts {
            self.evals_without_improvement = 0;
        } else {
            self.evals_without_improvement += 1;
        }
        if better {
            self.val_loss = Some(val_loss);
            self.step = step;
            if self.keep {
                self.values = params
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?;
            }
        }
        Ok(self.patience > 0 && self.evals_without_improvement >= self.patience)
    }

    /// Puts the best evaluation's values into the trainable tensors; the note says which step they are from.
    pub fn load_into(&self, params: &[(String, Var)]) -> Result<Option<String>> {
        if !self.keep || self.values.len() != params.len() {
            return Ok(None);
        }
        for ((_, var), value) in params.iter().zip(&self.values) {
            var.set(value)?;
        }
        Ok(self.val_loss.map(|vl| {
            format!(
                "load_best_model_at_end: the result is step {}'s (validation loss {vl:.4}, the lowest)",
                self.step
            )
        }))
    }

    /// The checkpoint's copy: the best values by parameter name, and the counters.
    pub fn state(&self, params: &[(String, Var)]) -> HookState {
        let tensors: BTreeMap<String, Tensor> = params
            .iter()
            .zip(&self.values)
            .map(|((k, _), t)| (k.clone(), t.clone()))
            .collect();
        let meta = json!({
            "val_loss": self.val_loss,
            "step": self.step,
            "evals_without_improvement": self.evals_without_improvement,
        });
        (tensors, meta)
    }

    /// Puts back what [`Best::state`] saved, for the trainable tensors `params`.
    pub fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
        params: &[(String, Var)],
    ) -> Result<()> {
        let bad = |what: &str| Error::config(format!("checkpoint `best` state: {what}"));
        self.val_loss = meta["val_loss"].as_f64();
        self.step = meta["step"].as_u64().ok_or_else(|| bad("missing `step`"))? as usize;
        self.evals_without_improvement = meta["evals_without_improvement"]
            .as_u64()
            .ok_or_else(|| bad("missing `evals_without_improvement`"))?
            as usize;
        self.values = if self.keep && self.val_loss.is_some() {
            params
                .iter()
                .map(|(k, v)| match tensors.get(k) {
                    Some(t) if t.shape() == v.shape() => Ok(t.clone()),
                    _ => Err(bad(&format!("no value of shape {:?} for `{k}`", v.shape()))),
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(())
    }
}
