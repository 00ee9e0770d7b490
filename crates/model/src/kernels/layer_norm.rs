//! LayerNorm: y = x̂ w + b, x̂ = (x − μ) rstd. Backward: dx = rstd (g − mean(g) − x̂ mean(g x̂)), g = dy ⊙ w.

use super::*;

pub(super) struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

pub(super) fn ln_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let n = xr.len() as f32;
    let mu = xr.iter().sum::<f32>() / n;
    let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / n;
    (mu, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.w.to_vec1::<f32>()?;
        let b = self.b.to_vec1::<f32>()?;
        map_rows(s, l, "layer-norm", |xr, yr| {
            let (mu, rstd) = ln_stats(xr, self.eps);
            for i in 0..xr.len() {
                yr[i] = (xr[i] - mu) * rstd * w[i] + b[i];
            }
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = LayerNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

pub(super) struct LayerNormBwd {
    w: Tensor,
    eps: f32,
}

impl CustomOp2 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = self.w.to_vec1::<f32>()?;
        let n = w.len();
        map_rows2((s1, l1), (s2, l2), "layer-norm-bwd", |xr, dyr, dxr| {
            let (mu, rstd) = ln_stats(xr, self.eps);
            let (mut mg, mut mgx) = (0f32, 0f32);
            for i in 0..n {
                let g = dyr[i] * w[i];
                mg += g;
                mgx += g * (xr[i] - mu) * rstd;
            }
            mg /= n as f32;
            mgx /= n as f32;
            for i in 0..n {
                let xh = (xr[i] - mu) * rstd;
                dxr[i] = rstd * (dyr[i] * w[i] - mg - xh * mgx);
            }
        })
    }
}

/// LayerNorm over the last dim with frozen scale `w` and shift `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(LayerNorm {
            w: w.clone(),
            b: b.clone(),
            eps: eps as f32,
        });
    }
    layer_norm_reference(x, w, b, eps)
}

pub fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check, rand};

    #[test]
    fn layer_norm_matches_reference() {
        let (w, b) = (rand(&[32], 7), rand(&[32], 8));
        check(
            |x| layer_norm(x, &w, &b, 1e-5),
            |x| layer_norm_reference(x, &w, &b, 1e-5),
            &[3, 4, 32],
        );
    }
}
