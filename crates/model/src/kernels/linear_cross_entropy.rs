//! LM head fused with the cross-entropy: loss = Σ_i w_i (lse(h_i Wᵀ) − h_i·W_{t_i}) / count over rows of h [N, d],
//! W [V, d]. The logits exist only for a block of rows × a slice of the vocabulary at a time (never [N × V]).
//! The softmax runs online over the slices, as flash attention does over keys: each row keeps its running
//! maximum m and Σ exp(x − m), and dH accumulates E W (E = exp(x − m) of the slice) rescaled whenever m
//! grows; at the end dH = (w/count)·(E W / Σ − W_t). So the forward leaves the head's gradients ready and
//! backward only scales them by the incoming gradient. Slicing the vocabulary instead of chunking rows lets
//! both products run on every row at once (170-row chunks of a 49k vocabulary kept gemm at 265–330 GFLOP/s;
//! 2,048 rows × 4,096-column slices reach 430–445). A trained head (dW += Pᵀ H) needs the final m and Σ
//! before any slice's P is known: it takes a second pass that recomputes the slices.

use super::*;

pub(super) struct LinearCrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: f32,
    /// Rows per block and vocabulary columns per slice: `[rows, cols]` logits at a time.
    block: (usize, usize),
    want_dh: bool,
    want_dw: bool,
    /// dH and dW for an upstream gradient of 1, filled by the forward.
    grads: std::sync::Mutex<Option<HeadGrads>>,
}

/// dH `[N, d]` and, when the head is trained, dW `[V, d]`.
pub(super) type HeadGrads = (Vec<f32>, Option<Vec<f32>>);

/// Logit elements per block × slice: 8M f32 (32 MB) whatever the vocabulary.
pub(super) const LCE_CHUNK_ELEMS: usize = 8 << 20;
/// Vocabulary columns per slice (fewer when the vocabulary is smaller).
pub(super) const LCE_SLICE_COLS: usize = 4096;

/// One row's running softmax statistics: maximum, Σ exp(x − max), and its target's logit.
#[derive(Clone, Copy)]
pub(super) struct RowStats {
    max: f32,
    sum: f32,
    target: f32,
}

/// `[rows, cols]` logits of the hidden rows `r0..` against the vocabulary slice `c0..` of the head W `[V, d]`.
pub(super) fn slice_logits(
    h: &[f32],
    w: &[f32],
    d: usize,
    (r0, rows): (usize, usize),
    (c0, cols): (usize, usize),
    out: &mut [f32],
) {
    gemm_par_into(
        rows,
        cols,
        d,
        out,
        cols,
        false,
        MatRef::rows(&h[r0 * d..], d),
        MatRef::transposed(&w[c0 * d..], d),
        1.0,
    );
}

/// `dh [rows, d] += e [rows, cols] · W[c0..c0 + cols]`: a slice's share of the hidden gradient.
pub(super) fn add_slice_product(
    e: &[f32],
    w: &[f32],
    d: usize,
    (c0, cols): (usize, usize),
    dh: &mut [f32],
) {
    gemm_par_into(
        e.len() / cols,
        d,
        cols,
        dh,
        d,
        true,
        MatRef::rows(e, cols),
        MatRef::rows(&w[c0 * d..], d),
        1.0,
    );
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = last_dim(hl)?;
        let v = wl.dims()[0];
        if wl.dims() != [v, d] {
            candle_core::bail!(
                "linear-cross-entropy: expects hidden [{n}, {d}] and head [V, {d}], got {:?}",
                wl.dims()
            );
        }
        let (h, w) = (
            f32_slice(hs, hl, "linear-cross-entropy")?,
            f32_slice(ws, wl, "linear-cross-entropy")?,
        );
        if self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= v) {
            candle_core::bail!(
                "linear-cross-entropy: targets do not fit [{n}] rows over {v} classes"
            );
        }
        let mut dh = vec![0f32; if self.want_dh { n * d } else { 0 }];
        let mut dw = self.want_dw.then(|| vec![0f32; v * d]);
        // Without a trained head, dH is gathered online in the first pass.
        let online_dh = self.want_dh && !self.want_dw;
        let (block_rows, slice_cols) = self.block;
        let mut logits = vec![0f32; block_rows.min(n) * slice_cols.min(v)];
        let mut stats = vec![
            RowStats {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                target: 0.0
            };
            n
        ];
        for r0 in (0..n).step_by(block_rows) {
            let rows = block_rows.min(n - r0);
            let (tg, wg) = (&self.targets[r0..r0 + rows], &self.weights[r0..r0 + rows]);
            if wg.iter().all(|&w| w == 0.0) {
                continue;
            }
            let st = &mut stats[r0..r0 + rows];
            for c0 in (0..v).step_by(slice_cols) {
                let cols = slice_cols.min(v - c0);
                let buf = &mut logits[..rows * cols];
                slice_logits(h, w, d, (r0, rows), (c0, cols), buf);
                let mut dh_rows: Vec<Option<&mut [f32]>> = if online_dh {
                    dh[r0 * d..(r0 + rows) * d]
                        .chunks_mut(d)
                        .map(Some)
                        .collect()
                } else {
                    (0..rows).map(|_| None).collect()
                };
                buf.par_chunks_mut(cols)
                    .zip(st.par_iter_mut())
                    .zip(tg.par_iter().zip(wg.par_iter()))
                    .zip(dh_rows.par_iter_mut())
                    .for_each(|(((row, s), (&t, &wt)), dh_row)| {
                        if wt == 0.0 {
                            // Contributes nothing to dH's product.
                            row.fill(0.0);
                            return;
                        }
                        if (c0..c0 + cols).contains(&(t as usize)) {
                            s.target = row[t as usize - c0];
                        }
                        let m = s.max.max(vmath::max(row));
                        if m > s.max && s.max > f32::NEG_INFINITY {
                            let a = (s.max - m).exp();
                            s.sum *= a;
                            if let Some(dr) = dh_row.as_deref_mut() {
                                dr.iter_mut().for_each(|x| *x *= a);
                            }
                        }
                        s.max = m;
                        s.sum += vmath::exp_sum(row, 1.0, m);
                    });
                drop(dh_rows);
                if online_dh {
                    add_slice_product(buf, w, d, (c0, cols), &mut dh[r0 * d..]);
                }
            }
            if online_dh {
                dh[r0 * d..(r0 + rows) * d]
                    .par_chunks_mut(d)
                    .zip(st.par_iter().zip(tg.par_iter().zip(wg.par_iter())))
                    .for_each(|(dr, (s, (&t, &wt)))| {
                        if wt == 0.0 {
                            return;
                        }
                        let cf = wt / self.count;
                        let (scale, wt_row) =
                            (cf / s.sum, &w[t as usize * d..(t as usize + 1) * d]);
                        for (x, &wv) in dr.iter_mut().zip(wt_row) {
                            *x = *x * scale - cf * wv;
                        }
                    });
            }
            let Some(dw) = dw.as_mut() else { continue };
            // The trained head's second pass: each slice's P = (softmax − onehot)·w/count, now exact.
            for c0 in (0..v).step_by(slice_cols) {
                let cols = slice_cols.min(v - c0);
                let buf = &mut logits[..rows * cols];
                slice_logits(h, w, d, (r0, rows), (c0, cols), buf);
                buf.par_chunks_mut(cols)
                    .zip(st.par_iter().zip(tg.par_iter().zip(wg.par_iter())))
                    .for_each(|(row, (s, (&t, &wt)))| {
                        if wt == 0.0 {
                            row.fill(0.0);
                            return;
                        }
                        let cf = wt / self.count;
                        vmath::exp_sum(row, 1.0, s.max);
                        let c = cf / s.sum;
                        row.iter_mut().for_each(|x| *x *= c);
                        if (c0..c0 + cols).contains(&(t as usize)) {
                            row[t as usize - c0] -= cf;
                        }
                    });
                if self.want_dh {
                    add_slice_product(buf, w, d, (c0, cols), &mut dh[r0 * d..]);
                }
                gemm_par_into(
                    cols,
                    d,
                    rows,
                    &mut dw[c0 * d..],
                    d,
                    true,
                    MatRef::transposed(buf, cols),
                    MatRef::rows(&h[r0 * d..], d),
                    1.0,
                );
            }
        }
        let total: f64 = stats
            .iter()
            .zip(&self.weights)
            .filter(|(_, &wt)| wt != 0.0)
            .map(|(s, &wt)| (wt * (s.max + s.sum.ln() - s.target)) as f64)
            .sum();
        *self.grads.lock().expect("linear-cross-entropy lock") = Some((dh, dw));
        Ok((
            CpuStorage::F32(vec![(total / self.count as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_scalar::<f32>()? as f64;
        let Some((dh, dw)) = self.grads.lock().expect("linear-cross-entropy lock").take() else {
            candle_core::bail!("linear-cross-entropy: backward ran twice or without a forward")
        };
        let dh = if self.want_dh {
            Some((Tensor::from_vec(dh, h.shape(), h.device())? * g)?)
        } else {
            None
        };
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, w.shape(), w.device())? * g)
            .transpose()?;
        Ok((dh, dw))
    }
}

/// Mean cross-entropy of the logits `h Wᵀ` (`h: [N, d]`, `W: [V, d]`) against `targets`, rows weighted by
/// `weights` (0 = ignored) and divided by `count`, without ever holding all `[N, V]` logits. A scalar in the
/// autograd graph; gradients for h, and for W only where W is trained.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: usize,
) -> Result<Tensor> {
    let cols = LCE_SLICE_COLS.min(w.dim(0)?.max(1));
    linear_cross_entropy_blocked(
        h,
        w,
        targets,
        weights,
        count,
        ((LCE_CHUNK_ELEMS / cols).max(1), cols),
    )
}

/// [`linear_cross_entropy`] with `block = (rows, vocabulary columns)` of logits at a time.
pub(super) fn linear_cross_entropy_blocked(
    h: &Tensor,
    w: &Tensor,
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: usize,
    block: (usize, usize),
) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(h) && f32_cpu(w)) {
        let logits = h.matmul(&w.t()?)?;
        return cross_entropy(&logits, targets, weights, count);
    }
    let op = LinearCrossEntropy {
        targets,
        weights,
        count: count.max(1) as f32,
        block,
        want_dh: h.track_op(),
        want_dw: w.track_op(),
        grads: std::sync::Mutex::new(None),
    };
    h.contiguous()?.apply_op2(&w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, rand};
    use candle_core::Var;

    #[test]
    fn linear_cross_entropy_matches_the_head_then_the_loss() {
        let targets = vec![3, 0, 6, 2, 5, 1, 4];
        let weights = vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        // 7 rows in blocks of 3 (a partial last block, a block holding an ignored row) against 9 classes in
        // slices of 4 (a partial last slice), one block and slice, and single columns; logits scaled up so
        // the running maximum moves between slices and the online rescaling is exercised.
        for (trained_head, block) in [
            (false, (3, 4)),
            (true, (3, 4)),
            (false, (7, 9)),
            (true, (2, 1)),
        ] {
            let h = Var::from_tensor(&(rand(&[7, 5], 41) * 8.0).unwrap()).unwrap();
            let w = rand(&[9, 5], 42);
            let wv = Var::from_tensor(&w).unwrap();
            let w = if trained_head {
                wv.as_tensor().clone()
            } else {
                w
            };
            let fused = linear_cross_entropy_blocked(
                h.as_tensor(),
                &w,
                targets.clone(),
                weights.clone(),
                5,
                block,
            )
            .unwrap();
            let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let reference =
                cross_entropy_reference(&logits, targets.clone(), weights.clone(), 5).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-5);
            let (gf, gr) = (
                (fused * 0.7).unwrap().backward().unwrap(),
                (reference * 0.7).unwrap().backward().unwrap(),
            );
            let (f, r) = (
                gf.get(h.as_tensor()).unwrap(),
                gr.get(h.as_tensor()).unwrap(),
            );
            assert!(max_diff(f, r) < 1e-5, "dH differs by {}", max_diff(f, r));
            match trained_head {
                true => {
                    let (f, r) = (gf.get(&w).unwrap(), gr.get(&w).unwrap());
                    assert!(max_diff(f, r) < 1e-5, "dW differs by {}", max_diff(f, r));
                }
                false => assert!(gf.get(&w).is_none()),
            }
        }
    }
}
