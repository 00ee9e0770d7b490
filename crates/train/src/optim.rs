//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments), learning-rate schedules
//! with transformers' formulas, and global-norm gradient clipping. State lives in plain `Vec<f32>` so a
//! checkpoint saves and restores it bit for bit.

use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (bias correction uses it).
    pub t: u64,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(sizes: &[usize], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            exp_avg: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            exp_avg_sq: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// The same optimizer over a new parameter list: moments carried over by name, zero for new names.
    pub fn remapped(&self, old: &[&str], new: &[&str], sizes: &[usize]) -> AdamW {
        let mut out = AdamW::new(sizes, self.beta1, self.beta2, self.eps, self.weight_decay);
        out.t = self.t;
        for (j, name) in new.iter().enumerate() {
            if let Some(i) = old.iter().position(|o| o == name) {
                out.exp_avg[j] = self.exp_avg[i].clone();
                out.exp_avg_sq[j] = self.exp_avg_sq[i].clone();
            }
        }
        out
    }

    /// One update of every parameter, in place. `lr_scale[i]` multiplies `lr` for parameter `i`.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64, lr_scale: &[f64]) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let (b1, b2, eps, wd) = (
            self.beta1 as f32,
            self.beta2 as f32,
            self.eps as f32,
            self.weight_decay,
        );
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let lr = lr * lr_scale[i];
            let step_size = (lr / bc1) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let decay = (1.0 - lr * wd) as f32;
            p.par_iter_mut()
                .zip(g.par_iter())
                .zip(
                    self.exp_avg[i]
                        .par_iter_mut()
                        .zip(self.exp_avg_sq[i].par_iter_mut()),
                )
                .for_each(|((p, &g), (m, v))| {
                    *p *= decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                });
        }
    }
}

factune_io::choice! {
    /// The learning-rate schedule after the linear warmup (transformers' `lr_scheduler_type` names).
    pub enum SchedulerType for "lr_scheduler_type" {
        Cosine = "cosine",
        Linear = "linear",
        Constant = "constant",
    }
}

/// transformers' schedules: linear warmup from 0, then cosine / linear decay to 0 at `total`, or constant.
pub fn lr_at(kind: SchedulerType, step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        SchedulerType::Cosine => {
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0)
        }
        SchedulerType::Linear => peak * (1.0 - progress).max(0.0),
        SchedulerType::Constant => peak,
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (PyTorch's `clip_grad_norm_`); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let c = (max_norm / (norm + 1e-6)) as f32;
        grads
            .iter_mut()
            .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        // With bias correction the first Adam step is lr · g/|g| (up to eps); decay is applied first.
        let mut opt = AdamW::new(&[2], 0.9, 0.999, 1e-8, 0.1);
        let mut p = vec![vec![1.0f32, -1.0]];
        opt.step(&mut p, &[vec![0.5, -2.0]], 0.01, &[1.0]);
        assert!(
            (p[0][0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6,
            "{}",
            p[0][0]
        );
        assert!(
            (p[0][1] - (-(1.0 - 0.001) + 0.01)).abs() < 1e-6,
            "{}",
            p[0][1]
        );
    }

    #[test]
    fn schedule_matches_transformers_formula() {
        assert_eq!(lr_at(SchedulerType::Cosine, 0, 10, 100, 1.0), 0.0);
        assert!((lr_at(SchedulerType::Cosine, 5, 10, 100, 1.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(SchedulerType::Cosine, 55, 10, 100, 1.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(SchedulerType::Cosine, 100, 10, 100, 1.0).abs() < 1e-12);
        assert!((lr_at(SchedulerType::Linear, 55, 10, 100, 1.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn clipping_caps_global_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let after = (g[0][0].powi(2) + g[1][0].powi(2)).sqrt();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
