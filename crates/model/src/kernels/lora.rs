//! LoRA linear: y = x Wᵀ + b + s · (m ⊙ x) Aᵀ Bᵀ, W and b frozen, A [r, in] and B [out, r] trainable, m an optional
//! inverted-dropout mask. One graph node instead of six: candle's autograd allocates and zero-fills a buffer per
//! node before accumulating into it, which dominated small LoRA steps. Backward, with g = dY and gB = g B:
//! dX = g W + s · m ⊙ (gB A), dA = s · gBᵀ (m ⊙ x), dB = s · gᵀ ((m ⊙ x) Aᵀ).
//!
//! DoRA runs through the same op: y = c ⊙ y₀ + b with y₀ the bias-free LoRA output and c = mag / ‖W + sBA‖_row
//! (the norm a constant, as in the paper). The magnitude rides as an extra column of the third input ([B | mag]),
//! so the op yields its gradient too, dmag_i = Σ_t g[t,i] y₀[t,i] / norm_i, with y₀ recovered from the op's own
//! output instead of being kept: DoRA then holds one [tokens, out] activation per layer, as LoRA does.

use super::frozen_linear::{cpu_f32_weight, FrozenLinear};
use super::*;

pub(super) struct LoraLinear {
    base: FrozenLinear,
    scale: f64,
    dropout: Option<Dropout>,
    dora: Option<DoraScale>,
    /// h = (m ⊙ x) Aᵀ `[tokens, r]` from the forward, for dB in the backward (r values per token: keeping it
    /// is cheaper than reading x again to recompute it).
    saved_h: std::sync::Mutex<Option<Vec<f32>>>,
}

/// DoRA's part of the op: the detached row norm of `W + sBA` and the bias, added after the magnitude scale.
pub(super) struct DoraScale {
    norm: Tensor,
    bias: Option<Tensor>,
}

/// Below this |mag / norm| the output no longer carries y₀ precisely enough to be divided back out of it, and
/// the backward recomputes y₀ instead.
pub(super) const DORA_RECOVER_MIN: f32 = 1e-3;

impl LoraLinear {
    /// B and, under DoRA, the magnitude, from the third input (`[out, r]`, or `[out, r + 1]` under DoRA).
    pub(super) fn split_b(&self, bm: &Tensor, r: usize) -> Result<(Tensor, Option<Tensor>)> {
        match self.dora {
            None => Ok((bm.clone(), None)),
            Some(_) => Ok((
                bm.narrow(1, 0, r)?.contiguous()?,
                Some(bm.narrow(1, r, 1)?.squeeze(1)?.contiguous()?),
            )),
        }
    }

    /// The LoRA gradients (dX, dA, dB) for an output gradient `g` `[tokens, out]`, computed on the slices in
    /// place: the LoRA part of dX accumulates into the base product's buffer (gemm's `dst += s·gB A`), and
    /// the thin products take the orientation gemm tiles well (dA as dAᵀ = xᵀ gB, `in` rows instead of `r`).
    pub(super) fn lora_grads(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let (n, k) = self.base.w.dims();
        let (m, r) = (g.dim(0)?, a.dim(0)?);
        let s = self.scale as f32;
        let mask = self.dropout.map(|d| d.mask(m * k));
        let saved = self.saved_h.lock().expect("lora-linear lock").take();
        let (dx, da, db) = with_f32_slices([x, a, b, g], "lora-linear backward", |[x, a, b, g]| {
            let gb = gemm_par_new(m, r, n, MatRef::rows(g, n), MatRef::rows(b, r), 1.0);
            let mut dx = self.base.input_grad_vec(g, m)?;
            match &mask {
                None => gemm_par_into(
                    m,
                    k,
                    r,
                    &mut dx,
                    k,
                    true,
                    MatRef::rows(&gb, r),
                    MatRef::rows(a, k),
                    s,
                ),
                Some(mask) => {
                    let part = gemm_par_new(m, k, r, MatRef::rows(&gb, r), MatRef::rows(a, k), s);
                    dx.par_iter_mut()
                        .zip(part.par_iter().zip(mask.par_iter()))
                        .for_each(|(d, (p, mk))| *d += p * mk);
                }
            }
            let xd: std::borrow::Cow<[f32]> = match &mask {
                None => x.into(),
                Some(mask) => x
                    .par_iter()
                    .zip(mask.par_iter())
                    .map(|(x, mk)| x * mk)
                    .collect::<Vec<_>>()
                    .into(),
            };
            let da_t = gemm_par_new(k, r, m, MatRef::transposed(&xd, k), MatRef::rows(&gb, r), s);
            let mut da = vec![0f32; r * k];
            for (j, row) in da_t.chunks(r).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    da[i * k + j] = v;
                }
            }
            let h = match saved {
                Some(h) if h.len() == m * r => h,
                _ => gemm_par_new(m, r, k, MatRef::rows(&xd, k), MatRef::transposed(a, k), 1.0),
            };
            let db = gemm_par_new(n, r, m, MatRef::transposed(g, n), MatRef::rows(&h, r), s);
            Ok((dx, da, db))
        })?;
        let dev = x.device();
        Ok([
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(da, (r, k), dev)?,
            Tensor::from_vec(db, (n, r), dev)?,
        ])
    }

    /// y₀ = x Wᵀ + s (m ⊙ x) Aᵀ Bᵀ from scratch, `[tokens, out]`.
    pub(super) fn recompute_plain(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let k = self.base.w.dims().1;
        let x = x.detach().reshape(((), k))?;
        let xd = match self.dropout {
            Some(d) => (&x * d.mask_like(&x)?)?,
            None => x.clone(),
        };
        let base = frozen_linear(&x, &self.base.w, None)?;
        base + (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut out, shape) = self.base.cpu_fwd(xs, xl)?;
        let (m, k) = last_dim(xl)?;
        let (r, n) = (al.dims()[0], bl.dims()[0]);
        let x_l = Layout::contiguous_with_offset((1, m, k), xl.start_offset());
        let dropped;
        let (x_src, x_lay) = match self.dropout {
            Some(d) => {
                let x = f32_slice(xs, xl, "lora-linear")?;
                let mut xd = d.mask(x.len());
                xd.par_iter_mut()
                    .zip(x.par_iter())
                    .for_each(|(m, x)| *m *= x);
                dropped = CpuStorage::F32(xd);
                (&dropped, Layout::contiguous((1, m, k)))
            }
            None => (xs, x_l),
        };
        // Under DoRA the third input is [B | mag]: B is copied out (out × r, small) and mag kept aside.
        let b_owned;
        let (b_src, b_off, magnitude) = match &self.dora {
            None => (b_s, bl.start_offset(), None),
            Some(_) => {
                let bm = f32_slice(b_s, bl, "lora-linear [B | magnitude]")?;
                if bl.dims() != [n, r + 1] {
                    candle_core::bail!(
                        "lora-linear: [B | magnitude] has shape {:?}, expected [{n}, {}]",
                        bl.dims(),
                        r + 1
                    );
                }
                let b: Vec<f32> = bm
                    .chunks(r + 1)
                    .flat_map(|row| &row[..r])
                    .copied()
                    .collect();
                let mag: Vec<f32> = bm.chunks(r + 1).map(|row| row[r]).collect();
                b_owned = CpuStorage::F32(b);
                (&b_owned, 0, Some(mag))
            }
        };
        // Aᵀ and Bᵀ as strided views: gemm reads them in place, and s·h Bᵀ accumulates into the base
        // product's buffer (no [tokens, out] temporary, no extra pass over it).
        let at_l = Layout::new(Shape::from((1, k, r)), vec![r * k, 1, k], al.start_offset());
        let CpuStorage::F32(h) = x_src.matmul(a_s, (1, m, r, k), &x_lay, &at_l)? else {
            candle_core::bail!("lora-linear: expects f32")
        };
        let b = f32_slice(
            b_src,
            &Layout::contiguous_with_offset((n, r), b_off),
            "lora-linear B",
        )?;
        let CpuStorage::F32(y) = &mut out else {
            candle_core::bail!("lora-linear: expects f32")
        };
        gemm_par_into(
            m,
            n,
            r,
            y,
            n,
            true,
            MatRef::rows(&h, r),
            MatRef::transposed(b, r),
            self.scale as f32,
        );
        *self.saved_h.lock().expect("lora-linear lock") = Some(h);
        if let (Some(dora), Some(mag)) = (&self.dora, magnitude) {
            let norm = dora.norm.to_vec1::<f32>()?;
            let c: Vec<f32> = mag.iter().zip(&norm).map(|(m, nr)| m / nr).collect();
            let bias = dora.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            y.par_chunks_mut(n).for_each(|row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = *v * c[j] + bias.as_ref().map_or(0.0, |b| b[j]);
                }
            });
        }
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, _) = self.base.w.dims();
        let r = a.dims()[0];
        let a = a.detach();
        let (b, magnitude) = self.split_b(&bm.detach(), r)?;
        let g = grad.detach().contiguous()?.reshape(((), n))?;
        let (Some(dora), Some(mag)) = (&self.dora, magnitude) else {
            let [dx, da, db] = self.lora_grads(x, &a, &b, &g)?;
            return Ok((Some(dx), Some(da), Some(db)));
        };
        let c = (&mag / &dora.norm)?;
        let recoverable = c.abs()?.min(0)?.to_scalar::<f32>()? >= DORA_RECOVER_MIN;
        let (gc, dmag) = if recoverable {
            dora_output_grads(&g, &res.detach(), &c, &dora.norm, dora.bias.as_ref())?
        } else {
            let plain = self.recompute_plain(x, &a, &b)?;
            (g.broadcast_mul(&c)?, ((&g * plain)?.sum(0)? / &dora.norm)?)
        };
        let [dx, da, db] = self.lora_grads(x, &a, &b, &gc)?;
        let dbm = Tensor::cat(&[db, dmag.unsqueeze(1)?], 1)?;
        Ok((Some(dx), Some(da), Some(dbm)))
    }
}

/// DoRA's output-side gradients in one pass over `[tokens, out]`: the gradient reaching the LoRA output,
/// `g ⊙ c`, and the magnitude's, `dmag_j = Σ_t g_tj (y_tj − b_j) / (c_j norm_j)` with y₀ = (y − b) / c
/// recovered from the op's output `y`. Rows are summed in fixed chunks, so the result does not depend on
/// thread timing.
pub(super) fn dora_output_grads(
    g: &Tensor,
    y: &Tensor,
    c: &Tensor,
    norm: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const ROWS: usize = 64;
    let n = c.dim(0)?;
    let bias = match bias {
        Some(b) => b.clone(),
        None => c.zeros_like()?,
    };
    let (gc, dmag) = with_f32_slices(
        [g, y, c, norm, &bias],
        "dora backward",
        |[g, y, c, norm, bias]| {
            let mut gc = vec![0f32; g.len()];
            let parts: Vec<Vec<f32>> = gc
                .par_chunks_mut(ROWS * n)
                .zip(g.par_chunks(ROWS * n).zip(y.par_chunks(ROWS * n)))
                .map(|(gcc, (gch, ych))| {
                    let mut part = vec![0f32; n];
                    for ((gcr, gr), yr) in gcc.chunks_mut(n).zip(gch.chunks(n)).zip(ych.chunks(n)) {
                        for j in 0..n {
                            gcr[j] = gr[j] * c[j];
                            part[j] += gr[j] * (yr[j] - bias[j]);
                        }
                    }
                    part
                })
                .collect();
            let mut dmag = vec![0f32; n];
            for part in parts {
                dmag.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
            dmag.iter_mut()
                .zip(c.iter().zip(norm))
                .for_each(|(s, (c, nr))| *s /= c * nr);
            Ok((gc, dmag))
        },
    )?;
    Ok((
        Tensor::from_vec(gc, g.shape(), g.device())?,
        Tensor::from_vec(dmag, n, g.device())?,
    ))
}

/// Whether the fused LoRA kernel applies: CPU f32 operands, contiguous factors.
pub(super) fn lora_fusable(x: &Tensor, w: &BaseWeight, a: &Tensor, b: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    [x, a, b].into_iter().all(f32_cpu)
        && cpu_f32_weight(w)
        && a.is_contiguous()
        && b.is_contiguous()
}

/// `x Wᵀ + b + scale · (mask ⊙ x) Aᵀ Bᵀ` as one op whose backward yields dX, dA and dB only. `None` where
/// the fused kernel does not apply (not CPU f32, non-contiguous factors): the caller then composes plain ops.
pub fn lora_linear(
    x: &Tensor,
    w: &BaseWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Option<Result<Tensor>> {
    if !lora_fusable(x, w, a, b) {
        return None;
    }
    let op = LoraLinear {
        base: FrozenLinear {
            w: w.clone(),
            b: bias.cloned(),
        },
        scale,
        dropout,
        dora: None,
        saved_h: Default::default(),
    };
    Some(x.contiguous().and_then(|x| x.apply_op3(a, b, op)))
}

/// DoRA's layer, `(mag / norm) ⊙ (x Wᵀ + scale · (mask ⊙ x) Aᵀ Bᵀ) + b`, as one op whose backward yields dX,
/// dA, dB and dmag (`norm`, the row norm of `W + sBA`, is a constant). `None` where the kernel does not apply.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(
    x: &Tensor,
    w: &BaseWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    magnitude: &Tensor,
    norm: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Option<Result<Tensor>> {
    if !lora_fusable(x, w, a, b) || !norm.device().is_cpu() {
        return None;
    }
    let op = LoraLinear {
        base: FrozenLinear {
            w: w.clone(),
            b: None,
        },
        scale,
        dropout,
        dora: Some(DoraScale {
            norm: norm.detach(),
            bias: bias.cloned(),
        }),
        saved_h: Default::default(),
    };
    let bm = magnitude
        .unsqueeze(1)
        .and_then(|m| Tensor::cat(&[b, &m], 1));
    Some(bm.and_then(|bm| x.contiguous()?.apply_op3(a, &bm, op)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, rand, Held};
    use candle_core::{Device, Var};

    #[test]
    fn lora_linear_matches_the_composed_ops_with_and_without_dropout() {
        for held in [Held::F32, Held::Nf4, Held::Bf16] {
            lora_linear_case(held);
        }
    }

    #[test]
    fn dora_linear_matches_the_composed_ops() {
        // Magnitudes near the norm recover y₀ from the output; tiny ones make the backward recompute it.
        for (held, mag_scale) in [
            (Held::F32, 1.0),
            (Held::Nf4, 1.0),
            (Held::Bf16, 1.0),
            (Held::F32, 1e-5),
        ] {
            dora_linear_case(held, mag_scale);
        }
    }

    fn dora_linear_case(held: Held, mag_scale: f32) {
        let (w, bias) = (rand(&[24, 16], 31), rand(&[24], 32));
        let base = held.weight(&w);
        let w = base.dense().unwrap();
        let a = Var::from_tensor(&rand(&[4, 16], 33)).unwrap();
        let b = Var::from_tensor(&rand(&[24, 4], 34)).unwrap();
        let norm = (rand(&[24], 35).abs().unwrap() + 0.5).unwrap();
        let mag = rand(&[24], 36).abs().unwrap() + 0.5;
        let mag = Var::from_tensor(&(mag.unwrap() * mag_scale as f64).unwrap()).unwrap();
        let x = Var::from_tensor(&rand(&[2, 5, 16], 37)).unwrap();
        // The reference multiplies by the mask the op draws from the same seed.
        let drop = Dropout { p: 0.3, seed: 8 };
        let mask =
            Tensor::from_vec(dropout_mask(2 * 5 * 16, 0.3, 8), (2, 5, 16), &Device::Cpu).unwrap();
        for (bias, d) in [(None, None), (Some(&bias), Some(drop))] {
            let m = d.map(|_| &mask);
            let fused = dora_linear(
                x.as_tensor(),
                &base,
                bias,
                a.as_tensor(),
                b.as_tensor(),
                mag.as_tensor(),
                &norm,
                0.7,
                d,
            )
            .expect("CPU f32")
            .unwrap();
            let reference = || -> Result<Tensor> {
                let xd = match m {
                    Some(m) => (x.as_tensor() * m)?,
                    None => x.as_tensor().clone(),
                };
                let plain = (x.as_tensor().broadcast_matmul(&w.t()?)?
                    + (xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * 0.7)?)?;
                let y = plain.broadcast_mul(&mag.as_tensor().broadcast_div(&norm)?)?;
                match bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            };
            let reference = reference().unwrap();
            assert!(max_diff(&fused, &reference) < 1e-5);
            let wts = rand(&[2, 5, 24], 38);
            let grads = |y: Tensor| (y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gr) = (grads(fused), grads(reference));
            for v in [&x, &a, &b, &mag] {
                let (f, r) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gr.get(v.as_tensor()).unwrap(),
                );
                let tol = 1e-4 * (1.0 + max_diff(r, &r.zeros_like().unwrap()));
                assert!(
                    max_diff(f, r) < tol,
                    "gradient differs by {}",
                    max_diff(f, r)
                );
            }
            assert!(gf.get(&w).is_none() && gf.get(&norm).is_none());
        }
    }

    fn lora_linear_case(held: Held) {
        let (w, bias) = (rand(&[24, 16], 11), rand(&[24], 12));
        let base = held.weight(&w);
        let w = base.dense().unwrap();
        let a = Var::from_tensor(&rand(&[4, 16], 13)).unwrap();
        let b = Var::from_tensor(&rand(&[24, 4], 14)).unwrap();
        let x = Var::from_tensor(&rand(&[2, 5, 16], 15)).unwrap();
        let drop = Dropout { p: 0.3, seed: 9 };
        let mask =
            Tensor::from_vec(dropout_mask(2 * 5 * 16, 0.3, 9), (2, 5, 16), &Device::Cpu).unwrap();
        for d in [None, Some(drop)] {
            let m = d.map(|_| &mask);
            let fused = lora_linear(
                x.as_tensor(),
                &base,
                Some(&bias),
                a.as_tensor(),
                b.as_tensor(),
                0.7,
                d,
            )
            .expect("CPU f32")
            .unwrap();
            let xd = match m {
                Some(m) => (x.as_tensor() * m).unwrap(),
                None => x.as_tensor().clone(),
            };
            let reference = (x
                .as_tensor()
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                + (xd
                    .broadcast_matmul(&a.t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&b.t().unwrap())
                    .unwrap()
                    * 0.7)
                    .unwrap())
            .unwrap();
            assert!(max_diff(&fused, &reference) < 1e-5);
            // Weighted sums give every output element its own gradient.
            let wts = rand(&[2, 5, 24], 16);
            let gf = (fused * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = (reference * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &a, &b] {
                let (f, r) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gr.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(f, r) < 1e-5,
                    "gradient differs by {}",
                    max_diff(f, r)
                );
            }
            assert!(gf.get(&w).is_none() && gf.get(&bias).is_none());
        }
    }
}
