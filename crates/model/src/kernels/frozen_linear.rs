//! Frozen linear: y = x Wᵀ + b, x [.., in], W [out, in] frozen, b [out] frozen. Backward: dX = dY W only.

use super::*;

pub(super) struct FrozenLinear {
    pub(super) w: BaseWeight,
    pub(super) b: Option<Tensor>,
}

impl FrozenLinear {
    /// `g [m, out] · W → [m, in]` on slices, for ops that go on writing into the result.
    pub(super) fn input_grad_vec(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = self.w.dims();
        with_stored(&self.w, |w| match w {
            Stored::Tiled(t) => Ok(t.matmul(g, m)),
            Stored::F32(w) => with_f32_slices([w], "frozen-linear weight", |[w]| {
                Ok(gemm_par_new(
                    m,
                    k,
                    n,
                    MatRef::rows(g, n),
                    MatRef::rows(w, k),
                    1.0,
                ))
            }),
        })
    }

    /// `dY W`, the only gradient a frozen linear passes back.
    pub(super) fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match &self.w {
            BaseWeight::Dense(w) if w.dtype() == candle_core::DType::F32 => g.matmul(w),
            w => g.contiguous()?.apply_op1_no_bwd(&TiledInputGrad(w.clone())),
        }
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = last_dim(l)?;
        let (n, k2) = self.w.dims();
        if k != k2 {
            candle_core::bail!("frozen-linear: input has {k} features, weight expects {k2}");
        }
        if !l.is_contiguous() {
            candle_core::bail!("frozen-linear: expects a contiguous input");
        }
        let mut out = with_stored(&self.w, |w| match w {
            Stored::Tiled(t) => Ok(CpuStorage::F32(
                t.matmul_t(f32_slice(s, l, "frozen-linear")?, m),
            )),
            Stored::F32(w) => {
                let x_l = Layout::contiguous_with_offset((1, m, k), l.start_offset());
                let (ws, wl) = w.storage_and_layout();
                let Storage::Cpu(ws) = &*ws else {
                    candle_core::bail!("frozen-linear: weight is not on the CPU")
                };
                if !wl.is_contiguous() {
                    candle_core::bail!("frozen-linear: weight must be contiguous");
                }
                // Wᵀ as a strided view: gemm reads it in place, no transposed copy.
                let wt_l =
                    Layout::new(Shape::from((1, k, n)), vec![n * k, 1, k], wl.start_offset());
                s.matmul(ws, (1, m, n, k), &x_l, &wt_l)
            }
        })?;
        if let Some(b) = &self.b {
            let (bs, bl) = b.storage_and_layout();
            let Storage::Cpu(bs) = &*bs else {
                candle_core::bail!("frozen-linear: bias is not on the CPU")
            };
            let bias = f32_slice(bs, bl, "frozen-linear bias")?;
            if let CpuStorage::F32(y) = &mut out {
                y.par_chunks_mut(n).for_each(|row| {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                });
            }
        }
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, _) = self.w.dims();
        let g = grad.contiguous()?.reshape(((), n))?;
        Ok(Some(self.input_grad(&g)?.reshape(arg.shape())?))
    }
}

/// Whether the fused CPU ops take this weight: dense f32 or bf16, or NF4, on the CPU.
pub(super) fn cpu_f32_weight(w: &BaseWeight) -> bool {
    w.device().is_cpu()
        && match w {
            BaseWeight::Dense(t) => {
                matches!(
                    t.dtype(),
                    candle_core::DType::F32 | candle_core::DType::BF16
                )
            }
            BaseWeight::Nf(..) => true,
        }
}

/// `x Wᵀ + b` where W and b never receive a gradient. Off the CPU an NF4 weight is dequantised for the
/// product (a transient dense copy).
pub fn frozen_linear(x: &Tensor, w: &BaseWeight, b: Option<&Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && cpu_f32_weight(w) {
        let op = FrozenLinear {
            w: w.clone(),
            b: b.cloned(),
        };
        return x.contiguous()?.apply_op1(op);
    }
    let w = w.dense()?.to_dtype(x.dtype())?;
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check, max_diff, rand, Held};
    use candle_core::Var;

    #[test]
    fn frozen_linear_matches_matmul_and_gives_no_weight_gradient() {
        let w = rand(&[24, 16], 3);
        let b = rand(&[24], 4);
        let dense = BaseWeight::Dense(w.clone());
        check(
            |x| frozen_linear(x, &dense, Some(&b)),
            |x| x.broadcast_matmul(&w.t()?)?.broadcast_add(&b),
            &[2, 5, 16],
        );
        // The weight is not part of the graph: backward from the output reaches only x.
        let x = Var::from_tensor(&rand(&[3, 16], 5)).unwrap();
        let y = frozen_linear(x.as_tensor(), &dense, Some(&b)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        assert!(grads.get_ids().all(|id| *id != w.id() && *id != b.id()));
    }

    #[test]
    fn converted_weights_match_the_matmul_with_the_converted_weight() {
        // 600 rows span three conversion tiles (the last one partial); 1×2 inputs take the direct path for
        // decoding, 3×5 the tiled one; 37 columns put NF4 block edges mid-row and leave a tail after the
        // bf16 path's eight-wide chunks.
        for held in [Held::Nf4, Held::Bf16] {
            for ((rows, cols), x_shape) in [
                ((600, 40), [3, 5]),
                ((7, 37), [3, 5]),
                ((600, 40), [1, 2]),
                ((7, 37), [1, 1]),
            ] {
                let w = rand(&[rows, cols], 21);
                // NF4 with double-quantised block scales here (the LoRA tests use plain scales).
                let base = match held {
                    Held::Nf4 => BaseWeight::nf4(&w, true).unwrap(),
                    _ => held.weight(&w),
                };
                // The reference weight: NF4's own dequantisation (tested against bitsandbytes elsewhere),
                // candle's bf16 → f32 conversion (not the kernel's).
                let converted = match held {
                    Held::Bf16 => w
                        .to_dtype(candle_core::DType::BF16)
                        .and_then(|h| h.to_dtype(candle_core::DType::F32))
                        .unwrap(),
                    _ => base.dense().unwrap(),
                };
                assert!(max_diff(&converted, &w) > 0.0, "the weight is rounded");
                let b = rand(&[rows], 22);
                check(
                    |x| frozen_linear(x, &base, Some(&b)),
                    |x| x.broadcast_matmul(&converted.t()?)?.broadcast_add(&b),
                    &[x_shape[0], x_shape[1], cols],
                );
            }
        }
    }
}
