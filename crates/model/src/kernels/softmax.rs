//! Softmax over the last dim. Backward: dx = y (dy − Σ dy y).

use super::*;

pub(super) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_rows(s, l, "softmax", |xr, yr| {
            yr.copy_from_slice(xr);
            let sum = vmath::exp_sum(yr, 1.0, vmath::max(xr));
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|v| *v *= inv);
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?,
        ))
    }
}

pub(super) struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_rows2((s1, l1), (s2, l2), "softmax-bwd", |yr, dyr, dxr| {
            let dot = yr.iter().zip(dyr).map(|(a, b)| a * b).sum::<f32>();
            for i in 0..yr.len() {
                dxr[i] = yr[i] * (dyr[i] - dot);
            }
        })
    }
}

pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(Softmax);
    }
    softmax_reference(x)
}

pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::check;

    #[test]
    fn softmax_matches_reference() {
        check(softmax_last_dim, softmax_reference, &[2, 3, 7, 9]);
    }
}
