//! RMSNorm: y = x · r · w, r = 1/√(mean(x²) + eps). Backward: dx = r (g − x r² mean(g x)), g = dy ⊙ w.

use super::*;

pub(super) struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.w.to_vec1::<f32>()?;
        map_rows(s, l, "rms-norm", |xr, yr| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / xr.len() as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(&w) {
                *yv = xv * r * wv;
            }
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

pub(super) struct RmsNormBwd {
    w: Tensor,
    eps: f32,
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
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
        map_rows2((s1, l1), (s2, l2), "rms-norm-bwd", |xr, dyr, dxr| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            let gx = xr
                .iter()
                .zip(dyr)
                .zip(&w)
                .map(|((x, d), w)| x * d * w)
                .sum::<f32>()
                / n as f32;
            let c = r * r * gx;
            for i in 0..n {
                dxr[i] = r * (dyr[i] * w[i] - xr[i] * c);
            }
        })
    }
}

/// RMSNorm over the last dim with a frozen scale `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(RmsNorm {
            w: w.clone(),
            eps: eps as f32,
        });
    }
    rms_norm_reference(x, w, eps)
}

/// Unfused RMSNorm, used off-CPU and as the reference in tests.
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check, rand};

    #[test]
    fn rms_norm_matches_reference() {
        let w = rand(&[32], 6);
        check(
            |x| rms_norm(x, &w, 1e-5),
            |x| rms_norm_reference(x, &w, 1e-5),
            &[3, 4, 32],
        );
    }
}
