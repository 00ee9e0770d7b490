//! Causal softmax attention as one op: `Y = softmax(scale · Q Kᵀ + causal) V`, with grouped-query heads and
//! positions after a KV cache. Neither the scores nor the probabilities are kept for backward: the backward
//! recomputes them tile by tile from Q and K (as FlashAttention does), so attention holds only its output
//! between forward and backward instead of four `[heads, T, T]` tensors, and the causal mask never becomes a
//! tensor (candle would also have computed a gradient for it).
//!
//! Shapes: `q [B, Hq, T, D]`, `k, v [B, Hkv, Tk, D]` (Tk = offset + T), output `[B, T, Hq, D]` (the layout
//! the output projection reads, so no transpose copy). Query row i sits at position `Tk − T + i` and sees keys
//! `0..=Tk − T + i`. Backward, per query tile with P recomputed and Δ_i = Σ_d dY_id Y_id:
//! dV += Pᵀ dY, dP = dY Vᵀ, dS = P ⊙ (dP − Δ), dQ = scale · dS K, dK += scale · dSᵀ Q.

use super::{f32_slice, gemm_into, with_f32_slices, MatRef};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per tile: bounds the recomputed scores to `[TILE, Tk]` per task.
const TILE: usize = 128;

/// dQ, dK and dV of one backward task.
type QkvGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

struct CausalAttention {
    scale: f32,
}

/// The dimensions every pass needs.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    fn from_layouts(ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Self> {
        let (Ok((b, hq, t, d)), Ok((b2, hkv, tk, d2))) = (ql.shape().dims4(), kl.shape().dims4())
        else {
            candle_core::bail!("causal-attention: expects q, k, v of rank 4")
        };
        if b2 != b || d2 != d || vl.dims() != kl.dims() || hkv == 0 || hq % hkv != 0 || tk < t {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?} do not fit together",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        Ok(Dims {
            b,
            hq,
            hkv,
            t,
            tk,
            d,
        })
    }

    fn offset(&self) -> usize {
        self.tk - self.t
    }

    /// One backward task per (batch, KV head): it owns dK, dV of that head and dQ of its query heads.
    fn kv_tasks(&self) -> Vec<(usize, usize)> {
        (0..self.b)
            .flat_map(|bi| (0..self.hkv).map(move |g| (bi, g)))
            .collect()
    }

    /// Keys visible to query rows `r0..r0 + rows`.
    fn keys_for(&self, r0: usize, rows: usize) -> usize {
        (self.offset() + r0 + rows).min(self.tk)
    }
}

/// Masked, scaled softmax of each row of `s` (`[rows, nk]`) in place: row i keeps keys `0..=first + i`.
fn causal_softmax_rows(s: &mut [f32], nk: usize, first: usize, scale: f32) {
    for (i, row) in s.chunks_mut(nk).enumerate() {
        let valid = (first + i + 1).min(nk);
        let (live, dead) = row.split_at_mut(valid);
        let m = super::vmath::max(live) * scale;
        let inv = 1.0 / super::vmath::exp_sum(live, scale, m);
        live.iter_mut().for_each(|x| *x *= inv);
        dead.fill(0.0);
    }
}

impl CausalAttention {
    /// Recomputed probabilities `P [rows, nk]` for one head's query tile.
    fn probs(&self, dm: &Dims, q: &[f32], k: &[f32], r0: usize, rows: usize) -> Vec<f32> {
        let nk = dm.keys_for(r0, rows);
        let mut p = vec![0f32; rows * nk];
        gemm_into(
            rows,
            nk,
            dm.d,
            &mut p,
            nk,
            false,
            MatRef::rows(&q[r0 * dm.d..], dm.d),
            MatRef::transposed(k, dm.d),
            1.0,
        );
        causal_softmax_rows(&mut p, nk, dm.offset() + r0, self.scale);
        p
    }

    /// dQ, dK, dV per (batch, KV head) task of [`Dims::kv_tasks`], from the saved inputs, output and dY.
    /// The query heads sharing a KV head go through each tile together, stacked head-major (`rep · rows`
    /// rows): the products that reduce over query rows (dV, dK) then run once over three times the rows.
    #[allow(clippy::too_many_arguments)]
    fn head_grads(
        &self,
        dm: &Dims,
        qv: &[f32],
        kv: &[f32],
        vv: &[f32],
        yv: &[f32],
        gv: &[f32],
    ) -> Vec<QkvGrads> {
        let Dims {
            hq, hkv, t, tk, d, ..
        } = *dm;
        let rep = hq / hkv;
        dm.kv_tasks()
            .par_iter()
            .map(|&(bi, g)| {
                let base = (bi * hkv + g) * tk * d;
                let (kg, vg) = (&kv[base..base + tk * d], &vv[base..base + tk * d]);
                let (mut dk, mut dv) = (vec![0f32; tk * d], vec![0f32; tk * d]);
                let mut dq = vec![0f32; rep * t * d];
                let heads = g * rep..(g + 1) * rep;
                for r0 in (0..t).step_by(TILE) {
                    let rows = TILE.min(t - r0);
                    let (nk, sr) = (dm.keys_for(r0, rows), rep * rows);
                    // Q, dY and Y of the group's heads for these rows, stacked [sr, d]; dY and Y rows sit
                    // Hq·D apart in the [B, T, Hq, D] layout.
                    let mut qs = Vec::with_capacity(sr * d);
                    let (mut dys, mut ys) =
                        (Vec::with_capacity(sr * d), Vec::with_capacity(sr * d));
                    for h in heads.clone() {
                        qs.extend_from_slice(&qv[((bi * hq + h) * t + r0) * d..][..rows * d]);
                        for i in 0..rows {
                            let at = (bi * t + r0 + i) * hq * d + h * d;
                            dys.extend_from_slice(&gv[at..at + d]);
                            ys.extend_from_slice(&yv[at..at + d]);
                        }
                    }
                    let (qm, dym) = (MatRef::rows(&qs, d), MatRef::rows(&dys, d));
                    let mut p = vec![0f32; sr * nk];
                    gemm_into(
                        sr,
                        nk,
                        d,
                        &mut p,
                        nk,
                        false,
                        qm,
                        MatRef::transposed(kg, d),
                        1.0,
                    );
                    for block in p.chunks_mut(rows * nk) {
                        causal_softmax_rows(block, nk, dm.offset() + r0, self.scale);
                    }
                    gemm_into(
                        nk,
                        d,
                        sr,
                        &mut dv,
                        d,
                        true,
                        MatRef::transposed(&p, nk),
                        dym,
                        1.0,
                    );
                    let mut ds = vec![0f32; sr * nk];
                    gemm_into(
                        sr,
                        nk,
                        d,
                        &mut ds,
                        nk,
                        false,
                        dym,
                        MatRef::transposed(vg, d),
                        1.0,
                    );
                    for (i, (dsr, pr)) in ds.chunks_mut(nk).zip(p.chunks(nk)).enumerate() {
                        let (yr, gr) = (&ys[i * d..][..d], &dys[i * d..][..d]);
                        let delta: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                        dsr.iter_mut()
                            .zip(pr)
                            .for_each(|(s, &p)| *s = p * (*s - delta));
                    }
                    for j in 0..rep {
                        gemm_into(
                            rows,
                            d,
                            nk,
                            &mut dq[(j * t + r0) * d..],
                            d,
                            false,
                            MatRef::rows(&ds[j * rows * nk..], nk),
                            MatRef::rows(kg, d),
                            self.scale,
                        );
                    }
                    gemm_into(
                        nk,
                        d,
                        sr,
                        &mut dk,
                        d,
                        true,
                        MatRef::transposed(&ds, nk),
                        qm,
                        self.scale,
                    );
                }
                (dq, dk, dv)
            })
            .collect()
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = Dims::from_layouts(ql, kl, vl)?;
        let (q, k, v) = (
            f32_slice(qs, ql, "causal-attention q")?,
            f32_slice(ks, kl, "causal-attention k")?,
            f32_slice(vs, vl, "causal-attention v")?,
        );
        let Dims {
            b,
            hq,
            hkv,
            t,
            tk,
            d,
        } = dm;
        let rep = hq / hkv;
        let mut out = vec![0f32; b * t * hq * d];
        // One task per (batch, query head); each writes its own columns of the [B, T, Hq, D] output.
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..hq).map(move |h| (bi, h)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(bi, h)| {
                let qh = &q[(bi * hq + h) * t * d..][..t * d];
                let g = (bi * hkv + h / rep) * tk * d;
                let (kg, vg) = (&k[g..g + tk * d], &v[g..g + tk * d]);
                let mut y = vec![0f32; t * d];
                for r0 in (0..t).step_by(TILE) {
                    let rows = TILE.min(t - r0);
                    let nk = dm.keys_for(r0, rows);
                    let p = self.probs(&dm, qh, kg, r0, rows);
                    gemm_into(
                        rows,
                        d,
                        nk,
                        &mut y[r0 * d..],
                        d,
                        false,
                        MatRef::rows(&p, nk),
                        MatRef::rows(vg, d),
                        1.0,
                    );
                }
                y
            })
            .collect();
        for (&(bi, h), y) in tasks.iter().zip(results) {
            for (i, row) in y.chunks(d).enumerate() {
                let at = ((bi * t + i) * hq + h) * d;
                out[at..at + d].copy_from_slice(row);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, hq, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = |t: &Tensor| t.dims4();
        let ((b, hq, t, d), (_, hkv, tk, _)) = (dims(q)?, dims(k)?);
        let dm = Dims {
            b,
            hq,
            hkv,
            t,
            tk,
            d,
        };
        let rep = hq / hkv;
        let per = with_f32_slices(
            [q, k, v, res, grad],
            "causal-attention backward",
            |[qv, kv, vv, yv, gv]| Ok(self.head_grads(&dm, qv, kv, vv, yv, gv)),
        )?;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; b * hq * t * d],
            vec![0f32; b * hkv * tk * d],
            vec![0f32; b * hkv * tk * d],
        );
        for (&(bi, g), (q_part, k_part, v_part)) in dm.kv_tasks().iter().zip(per) {
            let kb = (bi * hkv + g) * tk * d;
            dk[kb..kb + tk * d].copy_from_slice(&k_part);
            dv[kb..kb + tk * d].copy_from_slice(&v_part);
            let qb = (bi * hq + g * rep) * t * d;
            dq[qb..qb + rep * t * d].copy_from_slice(&q_part);
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Causal attention of `q [B, Hq, T, D]` over `k, v [B, Hkv, Tk, D]` (the last T of the Tk positions are
/// the queries'), as `[B, T, Hq, D]`. `None` off the CPU or for non-f32 inputs (the caller composes ops).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Result<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if ![q, k, v].into_iter().all(f32_cpu) {
        return None;
    }
    let scale = 1.0 / (q.dim(3).ok()? as f32).sqrt();
    Some((|| {
        q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            CausalAttention { scale },
        )
    })())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed definition: scores, additive causal mask, softmax, weighted sum; GQA by repeating K, V.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, hq, t, d) = q.dims4()?;
        let (_, hkv, tk, _) = k.dims4()?;
        let rep = hq / hkv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            x.unsqueeze(2)?
                .broadcast_as((b, hkv, rep, tk, d))?
                .reshape((b, hq, tk, d))
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let mut m = vec![0f32; t * tk];
        for i in 0..t {
            for j in (tk - t + i + 1)..tk {
                m[i * tk + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(m, (t, tk), &Device::Cpu)?;
        let s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        p.matmul(&v)?.transpose(1, 2)?.contiguous()
    }

    #[test]
    fn causal_attention_matches_the_composed_ops() {
        // (B, Hq, Hkv, T, Tk, D): plain, grouped-query after a cache, more rows than one tile.
        for (b, hq, hkv, t, tk, d) in [
            (2, 2, 2, 5, 5, 4),
            (1, 6, 2, 3, 7, 8),
            (1, 3, 1, 300, 300, 4),
        ] {
            let q = Var::from_tensor(&rand(&[b, hq, t, d], 1)).unwrap();
            let k = Var::from_tensor(&rand(&[b, hkv, tk, d], 2)).unwrap();
            let v = Var::from_tensor(&rand(&[b, hkv, tk, d], 3)).unwrap();
            let fused = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor())
                .expect("CPU f32")
                .unwrap();
            let refr = reference(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
            assert!(
                max_diff(&fused, &refr) < 1e-5,
                "output differs by {}",
                max_diff(&fused, &refr)
            );
            let w = rand(fused.dims(), 4);
            let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gr) = (grads(&fused), grads(&refr));
            for x in [&q, &k, &v] {
                let (f, r) = (
                    gf.get(x.as_tensor()).unwrap(),
                    gr.get(x.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(f, r) < 1e-4,
                    "gradient differs by {}",
                    max_diff(f, r)
                );
            }
        }
    }
}
