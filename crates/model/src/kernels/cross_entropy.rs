//! Cross-entropy over rows of logits [N, V] with per-row targets and weights (0 for ignored rows), averaged
//! over `count`: loss = Σ_i w_i (lse_i − x_i[t_i]) / count. Backward: dx_i = g · w_i (softmax(x_i) − onehot(t_i))
//! / count, written into one buffer (the unfused graph keeps several [N, V] temporaries alive).

use super::*;

pub(super) struct CrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: f32,
}

pub(super) fn log_sum_exp(row: &[f32]) -> f32 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "cross-entropy")?;
        let (n, v) = last_dim(l)?;
        if self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: targets do not fit logits [{n}, {v}]");
        }
        let total: f64 = x
            .par_chunks(v)
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .filter(|(_, (_, w))| **w != 0.0)
            .map(|(row, (&t, &w))| (w * (log_sum_exp(row) - row[t as usize])) as f64)
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / self.count as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_scalar::<f32>()?;
        let (n, v) = arg.dims2()?;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; n * v];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .for_each(|((d, row), (&t, &w))| {
                if w == 0.0 {
                    return;
                }
                let c = g * w / self.count;
                let lse = log_sum_exp(row);
                for (dv, xv) in d.iter_mut().zip(row) {
                    *dv = c * (xv - lse).exp();
                }
                d[t as usize] -= c;
            });
        Ok(Some(Tensor::from_vec(dx, (n, v), arg.device())?))
    }
}

/// Mean cross-entropy of `logits: [N, V]` against `targets`, rows weighted by `weights` (0 = ignored), divided
/// by `count`. Returns a scalar in the autograd graph.
pub fn cross_entropy(
    logits: &Tensor,
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: usize,
) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        let op = CrossEntropy {
            targets,
            weights,
            count: count.max(1) as f32,
        };
        return logits.contiguous()?.apply_op1(op);
    }
    cross_entropy_reference(logits, targets, weights, count)
}

pub fn cross_entropy_reference(
    logits: &Tensor,
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: usize,
) -> Result<Tensor> {
    let n = targets.len();
    let dev = logits.device();
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&Tensor::from_vec(targets, (n, 1), dev)?, 1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    (nll * Tensor::from_vec(weights, n, dev)?)?.sum_all()? / count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::check;

    #[test]
    fn cross_entropy_matches_reference() {
        let targets = vec![3u32, 0, 6, 2, 5, 1];
        let weights = vec![1f32, 0.0, 1.0, 1.0, 0.0, 1.0];
        check(
            |x| cross_entropy(&x.reshape((6, 7))?, targets.clone(), weights.clone(), 4),
            |x| cross_entropy_reference(&x.reshape((6, 7))?, targets.clone(), weights.clone(), 4),
            &[2, 3, 7],
        );
    }
}
