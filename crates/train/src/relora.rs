//! ReLoRA's training schedule (Lialin et al.): LoRA factors merged into the weights every `relora_steps`,
//! re-initialised, most of their optimizer state pruned, and the learning rate re-warmed inside one global
//! envelope — a "jagged" schedule — so a sum of rank-r updates can build a high-rank change. An optional
//! full-rank warm start precedes it. The merge itself lives with LoRA (`lora::merge_and_reinit`).

use crate::config::TrainConfig;
use crate::optim::lr_at;
use factune_adapters::hooks::{Moments, StepHook};
use factune_adapters::lora;
use factune_io::Result;
use factune_model::{Model, ParamRole};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Whether adapters are attached once `steps_done` steps have run (the switch from the full-rank warm start
/// happens at the start of step `warm_start_steps`).
pub fn adapters_on(cfg: &TrainConfig, steps_done: usize) -> bool {
    !cfg.is_full() && (cfg.warm_start_steps == 0 || steps_done > cfg.warm_start_steps)
}

/// The restart number `k ≥ 1` if step `step` (0-based) begins with a merge-and-reinit.
pub fn restart_at(cfg: &TrainConfig, step: usize) -> Option<usize> {
    let (w, t) = (cfg.warm_start_steps, cfg.relora_steps);
    (t > 0 && !cfg.is_full() && step > w && (step - w).is_multiple_of(t)).then(|| (step - w) / t)
}

/// The step at which the current cycle began with fresh adapters (a restart or the end of the warm start);
/// `None` in the first cycle of a run without warm start, whose warmup is the global one.
fn cycle_start(cfg: &TrainConfig, step: usize) -> Option<usize> {
    let w = cfg.warm_start_steps;
    if cfg.is_full() || step < w {
        return None;
    }
    let s0 = match (step - w).checked_div(cfg.relora_steps) {
        Some(cycles) => w + cycles * cfg.relora_steps,
        None => w,
    };
    (s0 > 0).then_some(s0)
}

/// Whether the adapters in use at the start of step `step` have already been updated with a positive learning
/// rate: some step since they were (re)initialised (the run's start, the end of the warm start, the last
/// restart) had one. Until then a zero gradient is expected (LoRA's A while B is still zero), after it not.
pub fn updated_before(cfg: &TrainConfig, step: usize) -> bool {
    let since = cycle_start(cfg, step).unwrap_or(0);
    (since..step).any(|s| lr(cfg, s) > 0.0)
}

/// Learning rate at `step`: the configured schedule (the envelope), except during the first
/// `restart_warmup_steps` of a cycle, where it rises linearly from 0 to the envelope's value at the end of
/// that warmup (as ReLoRA's `cosine_restarts`).
pub fn lr(cfg: &TrainConfig, step: usize) -> f64 {
    let envelope = |s: usize| {
        lr_at(
            cfg.lr_scheduler_type,
            s,
            cfg.warmup(),
            cfg.total_steps(),
            cfg.learning_rate,
        )
    };
    let rw = cfg.restart_warmup_steps;
    match cycle_start(cfg, step) {
        Some(s0) if step - s0 < rw => envelope(s0 + rw) * (step - s0) as f64 / rw as f64,
        _ => envelope(step),
    }
}

/// ReLoRA's restarts as a step hook: before each restart step the LoRA factors are merged into the weights
/// and re-drawn, and the moments of both factors pruned.
pub struct Restarts {
    cfg: TrainConfig,
}

impl Restarts {
    pub fn new(cfg: &TrainConfig) -> Self {
        Restarts { cfg: cfg.clone() }
    }
}

impl StepHook for Restarts {
    fn name(&self) -> &'static str {
        "relora"
    }

    fn before_step(
        &mut self,
        model: &mut Model,
        step: usize,
        m: Moments<'_>,
    ) -> Result<Option<serde_json::Value>> {
        let Some(k) = restart_at(&self.cfg, step) else {
            return Ok(None);
        };
        let merged = lora::merge_and_reinit(model, &mut restart_rng(self.cfg.seed, k))?;
        for (i, role) in m.roles.iter().enumerate() {
            if matches!(role, ParamRole::FactorA | ParamRole::FactorB) {
                prune_moments(
                    &mut m.exp_avg[i],
                    &mut m.exp_avg_sq[i],
                    self.cfg.optimizer_prune_ratio,
                );
            }
        }
        Ok(Some(serde_json::json!({
            "event": "relora_restart", "restart": k, "merged_modules": merged
        })))
    }
}

/// The generator that re-draws A at restart `k`: a function of the seed and `k` only, so a resumed run draws
/// the same factors.
pub fn restart_rng(seed: u64, k: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0xA076_1D64_78BD_642F))
}

/// Resets the `ratio` fraction of entries with the smallest first moment |m| — both moments of an entry
/// together (ties at the threshold included; 1 resets all). ReLoRA's reference prunes `m` and `v` each by
/// its own magnitude; that leaves entries with m ≠ 0 but v = 0, whose Adam step m/(√v + ε) explodes right
/// after a restart (measured on the embedded model: gradient norm 1849 and the loss back above its start).
pub fn prune_moments(m: &mut [f32], v: &mut [f32], ratio: f64) {
    let n = m.len();
    let drop = ((ratio * n as f64).round() as usize).min(n);
    if drop == 0 {
        return;
    }
    let threshold = if drop == n {
        f32::INFINITY
    } else {
        let mut mags: Vec<f32> = m.iter().map(|x| x.abs()).collect();
        *mags.select_nth_unstable_by(drop - 1, f32::total_cmp).1
    };
    for (m, v) in m.iter_mut().zip(v.iter_mut()) {
        if m.abs() <= threshold {
            (*m, *v) = (0.0, 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(warm: usize, t: usize, rw: usize) -> TrainConfig {
        TrainConfig {
            max_steps: 100,
            learning_rate: 1.0,
            warmup_steps: 5,
            relora_steps: t,
            restart_warmup_steps: rw,
            warm_start_steps: warm,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn jagged_schedule_rewarms_inside_the_envelope() {
        let c = cfg(0, 20, 4);
        let env = |s| lr_at(crate::optim::SchedulerType::Cosine, s, 5, 100, 1.0);
        // First cycle: the global warmup and envelope only.
        for s in 0..20 {
            assert_eq!(lr(&c, s), env(s), "step {s}");
        }
        // Each restart: 0, then a linear ramp reaching the envelope at s0 + 4, then the envelope.
        for s0 in [20, 40, 60, 80] {
            assert_eq!(lr(&c, s0), 0.0);
            assert!((lr(&c, s0 + 2) - env(s0 + 4) / 2.0).abs() < 1e-12);
            for s in s0 + 4..s0 + 20 {
                assert_eq!(lr(&c, s), env(s));
            }
        }
        assert_eq!(
            (0..100)
                .filter_map(|s| restart_at(&c, s))
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(restart_at(&c, 40), Some(2));
    }

    #[test]
    fn warm_start_switch_and_restarts_count_from_it() {
        let c = cfg(10, 30, 4);
        assert!(!adapters_on(&c, 0) && !adapters_on(&c, 10) && adapters_on(&c, 11));
        assert_eq!(
            lr(&c, 10),
            0.0,
            "fresh adapters re-warm after the warm start"
        );
        assert_eq!(restart_at(&c, 10), None);
        assert_eq!(restart_at(&c, 40), Some(1));
        assert_eq!(restart_at(&c, 70), Some(2));
        assert_eq!(restart_at(&c, 39), None);
        let lora_only = TrainConfig {
            relora_steps: 0,
            ..c
        };
        assert_eq!(restart_at(&lora_only, 40), None);
    }

    #[test]
    fn pruning_keeps_the_largest_first_moments_with_their_second() {
        let mut m = vec![0.1f32, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, -3.0, 0.4, 0.0];
        let mut v: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        prune_moments(&mut m, &mut v, 0.7);
        assert_eq!(m, vec![0.0, -5.0, 0.0, 2.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0]);
        assert_eq!(v, vec![0.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0, 8.0, 0.0, 0.0]);
        let (mut m, mut v) = (vec![1.0f32, -2.0], vec![1.0f32, 1.0]);
        prune_moments(&mut m, &mut v, 1.0);
        assert_eq!((m, v), (vec![0.0, 0.0], vec![0.0, 0.0]));
        let (mut m, mut v) = (vec![1.0f32, -2.0], vec![3.0f32, 4.0]);
        prune_moments(&mut m, &mut v, 0.0);
        assert_eq!((m, v), (vec![1.0, -2.0], vec![3.0, 4.0]));
    }
}
