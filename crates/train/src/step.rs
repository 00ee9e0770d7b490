//! The one training step: every run (`train`, `pretrain`, `bench train`) updates its parameters through
//! [`Trainer::step`], so what the benchmark measures is what users run.

use crate::optim::{clip_grad_norm, AdamW};
use candle_core::{Tensor, Var};
use factune_adapters::hooks::{Moments, StepHook};
use factune_io::{Error, Result};
use factune_model::{take_grads, Ctx, Model, ParamRole};
use std::collections::HashMap;

/// The trainable tensors of a phase, by name, in a fixed order (the optimizer's).
pub type Params = Vec<(String, Var)>;

/// A micro-batch: token ids `[batch, seq]` and their labels (-100 where nothing is learned).
pub type MicroBatch = (Tensor, Vec<Vec<i64>>);

/// The settings a step reads.
#[derive(Debug, Clone)]
pub struct StepSettings {
    pub gradient_accumulation_steps: usize,
    pub gradient_checkpointing: bool,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// LoRA+: learning-rate multiplier of the parameters the method calls "B" factors.
    pub loraplus_lr_ratio: f64,
    pub dropout_seed: u64,
}

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Mean loss over the micro-batches (penalty included).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step's micro-batches.
    pub tokens: usize,
    /// What the hooks logged with the step's metrics.
    pub logged: Vec<(&'static str, serde_json::Value)>,
    /// Events the hooks reported before the step (a ReLoRA restart).
    pub events: Vec<serde_json::Value>,
}

/// Parameters, optimizer state and the gradient checks between steps.
pub struct Trainer {
    pub params: Params,
    /// Each parameter's role, from its method (base tensors are `Other`).
    pub roles: Vec<ParamRole>,
    pub opt: AdamW,
    pub settings: StepSettings,
    /// Whether the all-zero-gradient check has run since the parameters last changed role.
    checked_grads: bool,
    /// Whether some step has already updated the parameters with a positive learning rate.
    updated_with_lr: bool,
}

impl Trainer {
    /// `roles`: the adapters' parameter roles by name (`factune_adapters::peft::roles`); other parameters
    /// are `Other`. `updated`: the parameters as they are already went through an update with a positive
    /// learning rate (a resumed run past its first real step), so gradients are checked at the first step.
    pub fn new(
        params: Params,
        roles: &HashMap<String, ParamRole>,
        opt: AdamW,
        settings: StepSettings,
        updated: bool,
    ) -> Self {
        Trainer {
            roles: roles_of(&params, roles),
            params,
            opt,
            settings,
            checked_grads: false,
            updated_with_lr: updated,
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// New trainable tensors (a phase change: warm start over): optimizer moments follow their names, and
    /// the gradient checks start again.
    pub fn replace_params(&mut self, next: Params, roles: &HashMap<String, ParamRole>) {
        self.roles = roles_of(&next, roles);
        let sizes = sizes(&next);
        let names: Vec<&str> = next.iter().map(|(k, _)| k.as_str()).collect();
        self.opt = self.opt.remapped(&self.names(), &names, &sizes);
        self.params = next;
        (self.checked_grads, self.updated_with_lr) = (false, false);
    }

    /// Optimizer step `step` (0-based) at learning rate `lr`: the hooks' `before_step`, then `batch(j)` yields
    /// micro-batch `j` of the run (`step · accumulation + micro`), whose gradients are averaged, checked,
    /// clipped and applied with AdamW; the hooks' penalties join the loss and their `after_update` follows.
    pub fn step(
        &mut self,
        model: &mut Model,
        step: usize,
        lr: f64,
        batch: &mut dyn FnMut(usize) -> Result<MicroBatch>,
        hooks: &mut [Box<dyn StepHook>],
    ) -> Result<StepReport> {
        let s = self.settings.clone();
        let mut events = Vec::new();
        for h in hooks.iter_mut() {
            let moments = Moments {
                roles: &self.roles,
                exp_avg: &mut self.opt.exp_avg,
                exp_avg_sq: &mut self.opt.exp_avg_sq,
            };
            if let Some(event) = h.before_step(model, step, moments)? {
                // the hook re-initialised parameters: their gradients are checked afresh
                (self.checked_grads, self.updated_with_lr) = (false, false);
                events.push(event);
            }
        }
        let dev = model.device.clone();
        let mut acc: Vec<Vec<f32>> = sizes(&self.params).iter().map(|&n| vec![0.0; n]).collect();
        let mut got = vec![false; self.params.len()];
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for micro in 0..s.gradient_accumulation_steps {
            let j = step * s.gradient_accumulation_steps + micro;
            let (ids, labels) = batch(j)?;
            tokens += ids.elem_count();
            let ctx = Ctx {
                train: true,
                dropout_seed: s
                    .dropout_seed
                    .wrapping_mul(0x2545_F491_4F6C_DD1D)
                    .wrapping_add(j as u64),
            };
            let wanted: Vec<&Tensor> = self.params.iter().map(|(_, v)| v.as_tensor()).collect();
            let (loss, _, mut grads) =
                model.loss_and_grads(&ids, &labels, &ctx, s.gradient_checkpointing, &wanted)?;
            let mut loss = loss;
            for h in hooks.iter() {
                if let Some(p) = h.penalty(model)? {
                    take_grads(p.backward()?, &wanted, &mut grads)?;
                    loss = (loss + p.detach())?;
                }
            }
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(Error::config(format!("loss is {l} at step {}", step + 1)));
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
        let k = s.gradient_accumulation_steps as f32;
        acc.iter_mut()
            .for_each(|g| g.iter_mut().for_each(|x| *x /= k));
        let names: Vec<&str> = self.params.iter().map(|(k, _)| k.as_str()).collect();
        let check_zero = self.updated_with_lr && !self.checked_grads;
        if let Some(problem) = gradient_problem(&names, &got, &acc, check_zero) {
            return Err(Error::config(problem));
        }
        let grad_norm = clip_grad_norm(&mut acc, s.max_grad_norm);
        let mut values: Vec<Vec<f32>> = self
            .params
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let scales = lr_scales(&self.roles, s.loraplus_lr_ratio);
        self.opt.step(&mut values, &acc, lr, &scales);
        for ((_, var), val) in self.params.iter().zip(values) {
            var.set(&Tensor::from_vec(val, var.shape(), &dev)?)?;
        }
        let mut logged = Vec::new();
        for h in hooks.iter_mut() {
            logged.extend(h.after_update(model, &names, &acc, step)?);
        }
        self.checked_grads |= check_zero;
        self.updated_with_lr |= lr > 0.0;
        Ok(StepReport {
            loss: loss_sum / s.gradient_accumulation_steps as f64,
            grad_norm,
            tokens,
            logged,
            events,
        })
    }
}

/// Each tensor's element count, in order (the optimizer's moment sizes).
pub fn sizes(params: &[(String, Var)]) -> Vec<usize> {
    params.iter().map(|(_, v)| v.elem_count()).collect()
}

fn roles_of(params: &Params, roles: &HashMap<String, ParamRole>) -> Vec<ParamRole> {
    params
        .iter()
        .map(|(k, _)| roles.get(k).copied().unwrap_or(ParamRole::Other))
        .collect()
}

/// Per-parameter learning-rate multipliers: LoRA+ gives every B factor `ratio` × the base rate.
pub fn lr_scales(roles: &[ParamRole], loraplus_lr_ratio: f64) -> Vec<f64> {
    roles
        .iter()
        .map(|r| match r {
            ParamRole::FactorB => loraplus_lr_ratio,
            _ => 1.0,
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

#[cfg(test)]
mod tests {
    use super::{gradient_problem, lr_scales};
    use factune_model::ParamRole;

    #[test]
    fn loraplus_scales_only_b() {
        let roles = [ParamRole::FactorA, ParamRole::FactorB, ParamRole::Other];
        assert_eq!(lr_scales(&roles, 16.0), vec![1.0, 16.0, 1.0]);
        assert_eq!(lr_scales(&roles, 1.0), vec![1.0, 1.0, 1.0]);
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
