//! Fused CPU kernels as candle `CustomOp`s, each with its backward written beside its forward.
//!
//! Why they exist: candle's autograd computes a gradient for every operand of every op. For a frozen weight
//! that is wasted work and memory (see PERF-NOTES: a frozen linear's backward costs as much as a trainable
//! one's). The ops here hold their frozen operands inside the op, so autograd sees only the activation and
//! the backward yields dX alone. On non-CPU devices each entry point falls back to plain candle ops (correct,
//! without those savings).

pub mod attention;
mod vmath;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::linear::BaseWeight;
use crate::quant::NfMatrix;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: expects f32 input, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expects a contiguous input"),
    }
}

/// Runs `f` on the f32 data of CPU tensors, borrowed in place (made contiguous first where they are not):
/// backward passes read their saved tensors without copying them out.
fn with_f32_slices<const N: usize, R>(
    ts: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let cont = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = cont.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (s, l) in &guards {
        let Storage::Cpu(c) = &**s else {
            candle_core::bail!("{op}: expects CPU tensors")
        };
        slices.push(f32_slice(c, l, op)?);
    }
    f(slices.try_into().expect("one slice per tensor"))
}

/// Applies `f(x_row, y_row)` to every row (last dim) of a contiguous f32 input, in parallel.
fn map_rows(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = f32_slice(s, l, op)?;
    let (_, n) = last_dim(l)?;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yr, xr)| f(xr, yr));
    Ok((CpuStorage::F32(y), l.shape().clone()))
}

/// Applies `f(a_row, b_row, out_row)` to every row of two contiguous f32 inputs of one shape (backward ops:
/// saved input or output, and the incoming gradient).
fn map_rows2(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    op: &str,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let a = f32_slice(s1, l1, op)?;
    let b = f32_slice(s2, l2, op)?;
    if a.len() != b.len() {
        candle_core::bail!("{op}: operands differ in size");
    }
    let (_, n) = last_dim(l1)?;
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(n)
        .zip(a.par_chunks(n).zip(b.par_chunks(n)))
        .for_each(|(o, (ar, br))| f(ar, br, o));
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

fn last_dim(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.dims();
    let n = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("scalar input".into()))?;
    Ok((l.shape().elem_count() / n.max(1), n))
}

// ---------------------------------------------------------------------------------------------------------
// Frozen linear: y = x Wᵀ + b, x [.., in], W [out, in] frozen, b [out] frozen. Backward: dX = dY W only.

struct FrozenLinear {
    w: BaseWeight,
    b: Option<Tensor>,
}

/// Rows of an NF4 or bf16 weight converted at a time: a tile `[TILE_ROWS, in]` stays in cache while gemm
/// reads it, and no f32 copy of the whole weight ever exists.
const TILE_ROWS: usize = 256;

/// Up to this many input rows (decoding), the product reads the stored weight directly instead of converting
/// tiles for gemm: with so few rows the conversion, not the arithmetic, is the cost.
const DIRECT_ROWS: usize = 4;

fn gemm_parallelism() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// A read-only f32 matrix in a slice: element (i, j) at `i · rs + j · cs`.
#[derive(Clone, Copy)]
struct MatRef<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major rows `rs` apart.
    fn rows(data: &'a [f32], rs: usize) -> Self {
        MatRef { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `rs` apart.
    fn transposed(data: &'a [f32], rs: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: rs,
        }
    }

    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst [m, n] (rows dst_rs apart) = (dst if acc else 0) + beta · lhs [m, k] · rhs [k, n]`, on the calling
/// thread (callers parallelise over heads or rows).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) {
    gemm_with(
        gemm::Parallelism::None,
        m,
        n,
        k,
        dst,
        dst_rs,
        acc,
        lhs,
        rhs,
        beta,
    )
}

/// [`gemm_into`] on all of rayon's threads: one large product.
#[allow(clippy::too_many_arguments)]
fn gemm_par_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) {
    gemm_with(
        gemm_parallelism(),
        m,
        n,
        k,
        dst,
        dst_rs,
        acc,
        lhs,
        rhs,
        beta,
    )
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(
    par: gemm::Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) {
    assert!(
        lhs.fits(m, k) && rhs.fits(k, n) && (m == 0 || (m - 1) * dst_rs + n <= dst.len()),
        "gemm_into: operands out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assertion above keeps every element gemm reads or writes inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// `beta · lhs [m, k] · rhs [k, n]` as a new row-major `[m, n]`, on all of rayon's threads.
fn gemm_par_new(m: usize, n: usize, k: usize, lhs: MatRef, rhs: MatRef, beta: f32) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    gemm_par_into(m, n, k, &mut out, n, false, lhs, rhs, beta);
    out
}

/// A frozen weight the ops read as f32 rows converted on the fly, so no f32 copy of it exists: NF4 codes
/// (QLoRA), or bf16 values (a base held at half its f32 size, compute in f32).
#[derive(Clone, Copy)]
enum Tiled<'a> {
    Nf(&'a NfMatrix),
    Bf16 {
        data: &'a [half::bf16],
        rows: usize,
        cols: usize,
    },
}

/// bf16 → f32 is exact: the bf16 bits are the f32's high half (a shift the compiler vectorises).
fn bf16_to_f32(b: half::bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

impl Tiled<'_> {
    fn dims(&self) -> (usize, usize) {
        match *self {
            Tiled::Nf(q) => (q.rows, q.cols),
            Tiled::Bf16 { rows, cols, .. } => (rows, cols),
        }
    }

    /// Rows `start..start + out.len() / cols` into `out`, row-major.
    fn fill(&self, start: usize, out: &mut [f32]) {
        match *self {
            Tiled::Nf(q) => q.dequantize_rows(start, out),
            Tiled::Bf16 { data, cols, .. } => {
                let src = &data[start * cols..start * cols + out.len()];
                for (o, &b) in out.iter_mut().zip(src) {
                    *o = bf16_to_f32(b);
                }
            }
        }
    }

    /// `x [m, k] · Wᵀ` for a few rows of x, reading each weight element once where it is stored.
    fn matmul_t_small(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (data, n, k) = match *self {
            Tiled::Nf(q) => return q.matmul_t_small(x, m),
            Tiled::Bf16 { data, rows, cols } => (data, rows, cols),
        };
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(m)
            .zip(data.par_chunks(k))
            .for_each(|(out, w)| {
                for (o, xr) in out.iter_mut().zip(x.chunks(k)) {
                    // Eight partial sums: one long chain would not vectorise.
                    let mut acc = [0f32; 8];
                    let (wc, xc) = (w.chunks_exact(8), xr.chunks_exact(8));
                    let tail: f32 = wc
                        .remainder()
                        .iter()
                        .zip(xc.remainder())
                        .map(|(&w, x)| bf16_to_f32(w) * x)
                        .sum();
                    for (w8, x8) in wc.zip(xc) {
                        for i in 0..8 {
                            acc[i] += bf16_to_f32(w8[i]) * x8[i];
                        }
                    }
                    *o = acc.iter().sum::<f32>() + tail;
                }
            });
        let mut y = vec![0f32; m * n];
        for (r, row) in yt.chunks(m).enumerate() {
            for (t, v) in row.iter().enumerate() {
                y[t * n + r] = *v;
            }
        }
        y
    }

    /// Calls `f(first_row, tile)` for consecutive tiles of rows, converted in parallel.
    fn for_each_tile(&self, mut f: impl FnMut(usize, &[f32])) {
        let (rows, k) = self.dims();
        let mut tile = vec![0f32; TILE_ROWS.min(rows) * k];
        for r0 in (0..rows).step_by(TILE_ROWS) {
            let n = TILE_ROWS.min(rows - r0);
            let t = &mut tile[..n * k];
            t.par_chunks_mut(k)
                .enumerate()
                .for_each(|(i, row)| self.fill(r0 + i, row));
            f(r0, t);
        }
    }

    /// `x [m, k] · Wᵀ → [m, n]`.
    fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        if m <= DIRECT_ROWS {
            return self.matmul_t_small(x, m);
        }
        let (n, k) = self.dims();
        let mut y = vec![0f32; m * n];
        self.for_each_tile(|r0, tile| {
            // Columns r0.. of y take x times the tile [rows, k] read as its transpose.
            let rows = tile.len() / k;
            gemm_par_into(
                m,
                rows,
                k,
                &mut y[r0..],
                n,
                false,
                MatRef::rows(x, k),
                MatRef::transposed(tile, k),
                1.0,
            );
        });
        y
    }

    /// `g [m, n] · W → [m, k]`: the input gradient, accumulated tile by tile.
    fn matmul(&self, g: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = self.dims();
        let mut dx = vec![0f32; m * k];
        self.for_each_tile(|r0, tile| {
            // g's columns r0..r0 + rows times the tile [rows, k].
            let rows = tile.len() / k;
            gemm_par_into(
                m,
                k,
                rows,
                &mut dx,
                k,
                r0 > 0,
                MatRef::rows(&g[r0..], n),
                MatRef::rows(tile, k),
                1.0,
            );
        });
        dx
    }
}

/// A frozen weight as the ops read it: in place (dense f32), or converted in tiles.
enum Stored<'a> {
    F32(&'a Tensor),
    Tiled(Tiled<'a>),
}

/// Runs `f` on the weight as the ops read it (a bf16 weight's storage stays locked meanwhile).
fn with_stored<R>(w: &BaseWeight, f: impl FnOnce(Stored) -> Result<R>) -> Result<R> {
    match w {
        BaseWeight::Nf(q, _) => f(Stored::Tiled(Tiled::Nf(q))),
        BaseWeight::Dense(t) if t.dtype() == candle_core::DType::BF16 => {
            let (rows, cols) = t.dims2()?;
            let (s, l) = t.storage_and_layout();
            let (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) = (&*s, l.contiguous_offsets())
            else {
                candle_core::bail!("a bf16 frozen weight must be contiguous and on the CPU")
            };
            f(Stored::Tiled(Tiled::Bf16 {
                data: &v[a..b],
                rows,
                cols,
            }))
        }
        BaseWeight::Dense(t) => f(Stored::F32(t)),
    }
}

/// The input gradient through a converted-on-the-fly weight, as an op of its own (it is never
/// differentiated again).
struct TiledInputGrad(BaseWeight);

impl CustomOp1 for TiledInputGrad {
    fn name(&self) -> &'static str {
        "tiled-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "tiled-input-grad")?;
        let (m, _) = last_dim(l)?;
        let (_, k) = self.0.dims();
        let dx = with_stored(&self.0, |w| match w {
            Stored::Tiled(t) => Ok(t.matmul(g, m)),
            Stored::F32(_) => candle_core::bail!("tiled-input-grad: the weight is dense f32"),
        })?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = k;
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

impl FrozenLinear {
    /// `g [m, out] · W → [m, in]` on slices, for ops that go on writing into the result.
    fn input_grad_vec(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
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
    fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
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
fn cpu_f32_weight(w: &BaseWeight) -> bool {
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

// ---------------------------------------------------------------------------------------------------------
// LoRA linear: y = x Wᵀ + b + s · (m ⊙ x) Aᵀ Bᵀ, W and b frozen, A [r, in] and B [out, r] trainable, m an optional
// inverted-dropout mask. One graph node instead of six: candle's autograd allocates and zero-fills a buffer per
// node before accumulating into it, which dominated small LoRA steps. Backward, with g = dY and gB = g B:
// dX = g W + s · m ⊙ (gB A), dA = s · gBᵀ (m ⊙ x), dB = s · gᵀ ((m ⊙ x) Aᵀ).
//
// DoRA runs through the same op: y = c ⊙ y₀ + b with y₀ the bias-free LoRA output and c = mag / ‖W + sBA‖_row
// (the norm a constant, as in the paper). The magnitude rides as an extra column of the third input ([B | mag]),
// so the op yields its gradient too, dmag_i = Σ_t g[t,i] y₀[t,i] / norm_i, with y₀ recovered from the op's own
// output instead of being kept: DoRA then holds one [tokens, out] activation per layer, as LoRA does.

struct LoraLinear {
    base: FrozenLinear,
    scale: f64,
    dropout: Option<Dropout>,
    dora: Option<DoraScale>,
    /// h = (m ⊙ x) Aᵀ `[tokens, r]` from the forward, for dB in the backward (r values per token: keeping it
    /// is cheaper than reading x again to recompute it).
    saved_h: std::sync::Mutex<Option<Vec<f32>>>,
}

/// Inverted dropout on the adapter input, as the seed of its mask: the op draws the mask in forward and again
/// in backward instead of keeping a `[tokens, in]` tensor between them.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    fn mask(&self, n: usize) -> Vec<f32> {
        dropout_mask(n, self.p, self.seed)
    }

    /// The mask as a tensor shaped like `x` (the composed adapter path and backward's tensor ops use it).
    pub fn mask_like(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_vec(self.mask(x.elem_count()), x.shape(), x.device())
    }
}

/// DoRA's part of the op: the detached row norm of `W + sBA` and the bias, added after the magnitude scale.
struct DoraScale {
    norm: Tensor,
    bias: Option<Tensor>,
}

/// Below this |mag / norm| the output no longer carries y₀ precisely enough to be divided back out of it, and
/// the backward recomputes y₀ instead.
const DORA_RECOVER_MIN: f32 = 1e-3;

impl LoraLinear {
    /// B and, under DoRA, the magnitude, from the third input (`[out, r]`, or `[out, r + 1]` under DoRA).
    fn split_b(&self, bm: &Tensor, r: usize) -> Result<(Tensor, Option<Tensor>)> {
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
    fn lora_grads(&self, x: &Tensor, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<[Tensor; 3]> {
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
    fn recompute_plain(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
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
fn dora_output_grads(
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
fn lora_fusable(x: &Tensor, w: &BaseWeight, a: &Tensor, b: &Tensor) -> bool {
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

// ---------------------------------------------------------------------------------------------------------
// Sparse update: y = x Sᵀ with S [out, in] holding k trainable values at fixed (row, col) positions. Backward:
// dX[m, col] += g[m, row] · v, dv = Σ_m g[m, row] · x[m, col]. Work is O(tokens · k), never O(out · in).

struct SparseLinear {
    rows: std::sync::Arc<Vec<u32>>,
    cols: std::sync::Arc<Vec<u32>>,
    out: usize,
}

impl SparseLinear {
    fn check(&self, k_in: usize, v_len: usize) -> Result<()> {
        if v_len != self.rows.len() {
            candle_core::bail!(
                "sparse-linear: {v_len} values for {} positions",
                self.rows.len()
            );
        }
        if self.cols.iter().any(|&c| c as usize >= k_in)
            || self.rows.iter().any(|&r| r as usize >= self.out)
        {
            candle_core::bail!(
                "sparse-linear: a position lies outside [{}, {k_in}]",
                self.out
            );
        }
        Ok(())
    }
}

impl CustomOp2 for SparseLinear {
    fn name(&self) -> &'static str {
        "sparse-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "sparse-linear")?;
        let v = f32_slice(vs, vl, "sparse-linear values")?;
        let (_, k) = last_dim(xl)?;
        self.check(k, v.len())?;
        let mut y = vec![0f32; x.len() / k * self.out];
        y.par_chunks_mut(self.out)
            .zip(x.par_chunks(k))
            .for_each(|(yr, xr)| {
                for ((&r, &c), &val) in self.rows.iter().zip(self.cols.iter()).zip(v) {
                    yr[r as usize] += val * xr[c as usize];
                }
            });
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let k = *x.dims().last().expect("rank >= 1");
        let x2 = x
            .detach()
            .contiguous()?
            .reshape(((), k))?
            .to_vec2::<f32>()?;
        let g2 = grad
            .detach()
            .contiguous()?
            .reshape(((), self.out))?
            .to_vec2::<f32>()?;
        let vals = v.detach().to_vec1::<f32>()?;
        let dx: Vec<f32> = g2
            .par_iter()
            .flat_map_iter(|gr| {
                let mut d = vec![0f32; k];
                for ((&r, &c), &val) in self.rows.iter().zip(self.cols.iter()).zip(&vals) {
                    d[c as usize] += gr[r as usize] * val;
                }
                d
            })
            .collect();
        let dv: Vec<f32> = self
            .rows
            .par_iter()
            .zip(self.cols.par_iter())
            .map(|(&r, &c)| {
                g2.iter()
                    .zip(&x2)
                    .map(|(g, xr)| g[r as usize] * xr[c as usize])
                    .sum()
            })
            .collect();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

/// `x Sᵀ` for a sparse `S [out, in]` whose `values` sit at `(rows[j], cols[j])`; differentiable in x and the
/// values. Off the CPU, S is scattered into a dense matrix first.
pub fn sparse_linear(
    x: &Tensor,
    values: &Tensor,
    rows: &std::sync::Arc<Vec<u32>>,
    cols: &std::sync::Arc<Vec<u32>>,
    out: usize,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        let op = SparseLinear {
            rows: rows.clone(),
            cols: cols.clone(),
            out,
        };
        return x.contiguous()?.apply_op2(&values.contiguous()?, op);
    }
    let inp = *x.dims().last().expect("rank >= 1");
    let dense = sparse_dense(values, rows, cols, out, inp)?;
    x.broadcast_matmul(&dense.t()?)
}

/// The dense `[out, in]` matrix of a sparse one (differentiable in the values).
pub fn sparse_dense(
    values: &Tensor,
    rows: &[u32],
    cols: &[u32],
    out: usize,
    inp: usize,
) -> Result<Tensor> {
    let flat: Vec<u32> = rows
        .iter()
        .zip(cols)
        .map(|(&r, &c)| r * inp as u32 + c)
        .collect();
    let idx = Tensor::from_vec(flat, rows.len(), values.device())?;
    Tensor::zeros(out * inp, values.dtype(), values.device())?
        .index_add(&idx, values, 0)?
        .reshape((out, inp))
}

/// Elements per independently seeded block of a dropout mask.
const DROPOUT_BLOCK: usize = 1 << 16;

/// Inverted-dropout multipliers (0 or 1/(1−p)) for `n` elements from a seeded generator, so a mask can be
/// regenerated exactly and runs are reproducible bit for bit. Blocks of the mask come from separate ChaCha
/// streams of the same seed and are drawn in parallel (the mask is the same whatever the thread count); a
/// serial draw cost about as much as the adapter matmuls it masks.
pub fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let keep = 1.0 / (1.0 - p) as f32;
    // P(u32 < threshold) = p, to within 2^-32.
    let threshold = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u64;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(DROPOUT_BLOCK)
        .enumerate()
        .for_each(|(i, block)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            for m in block {
                *m = if (rng.random::<u32>() as u64) < threshold {
                    0.0
                } else {
                    keep
                };
            }
        });
    mask
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm: y = x · r · w, r = 1/√(mean(x²) + eps). Backward: dx = r (g − x r² mean(g x)), g = dy ⊙ w.

struct RmsNorm {
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

struct RmsNormBwd {
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

// ---------------------------------------------------------------------------------------------------------
// LayerNorm: y = x̂ w + b, x̂ = (x − μ) rstd. Backward: dx = rstd (g − mean(g) − x̂ mean(g x̂)), g = dy ⊙ w.

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

fn ln_stats(xr: &[f32], eps: f32) -> (f32, f32) {
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

struct LayerNormBwd {
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

// ---------------------------------------------------------------------------------------------------------
// Softmax over the last dim. Backward: dx = y (dy − Σ dy y).

struct Softmax;

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

struct SoftmaxBwd;

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

// ---------------------------------------------------------------------------------------------------------
// SwiGLU: y = silu(g) ⊙ u with silu(g) = g σ(g). One op keeps g and u (the projections' outputs) and no
// silu(g) buffer. Backward: dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g))), du = dy ⊙ silu(g).

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        map_rows2((gs, gl), (us, ul), "swiglu", vmath::swiglu)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32_slices([g, u, grad], "swiglu backward", |[gv, uv, dy]| {
            let mut dg = vec![0f32; gv.len()];
            let mut du = vec![0f32; gv.len()];
            dg.par_chunks_mut(4096)
                .zip(du.par_chunks_mut(4096))
                .enumerate()
                .for_each(|(c, (dgc, duc))| {
                    let at = c * 4096..c * 4096 + dgc.len();
                    vmath::swiglu_grads(&gv[at.clone()], &uv[at.clone()], &dy[at], dgc, duc);
                });
            Ok((dg, du))
        })?;
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// `silu(gate) ⊙ up` as one op (composed ops off the CPU or for non-f32 inputs).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if f32_cpu(gate) && f32_cpu(up) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

// ---------------------------------------------------------------------------------------------------------
// RoPE with the head split: x [B, T, H·D] (a projection's output) → y [B, H, T, D] rotated, HF's "rotate half"
// layout: for i < D/2, y_i = x_i cos_i − x_{i+D/2} sin_i; for i ≥ D/2, y_i = x_i cos_i + x_{i−D/2} sin_i.
// One op instead of reshape, transpose copy, two narrows, neg, cat, two products and a sum; backward is the
// inverse rotation: dx_i = dy_i cos_i + dy_{i+D/2} sin_{i+D/2} (i < D/2), dy_i cos_i − dy_{i−D/2} sin_{i−D/2}.

struct RopeHeads {
    /// `[T, D]` tables for the positions of this call.
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
}

impl RopeHeads {
    /// Rotates one head-row: `src` and `dst` hold D values; `inverse` applies the transpose rotation.
    fn rotate(&self, src: &[f32], dst: &mut [f32], pos: usize, inverse: bool) {
        let d = src.len();
        let h = d / 2;
        let (c, s) = (&self.cos[pos * d..][..d], &self.sin[pos * d..][..d]);
        for i in 0..h {
            let (a, b) = (src[i], src[i + h]);
            if inverse {
                dst[i] = a * c[i] + b * s[i + h];
                dst[i + h] = b * c[i + h] - a * s[i];
            } else {
                dst[i] = a * c[i] - b * s[i];
                dst[i + h] = b * c[i + h] + a * s[i + h];
            }
        }
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope-heads")?;
        let (b, t, hd) = l.shape().dims3()?;
        let (nh, d) = (self.heads, hd / self.heads);
        if nh * d != hd || d % 2 != 0 || self.cos.len() != t * d {
            candle_core::bail!("rope-heads: [{b}, {t}, {hd}] does not split into {nh} even-sized heads over the tables");
        }
        let mut y = vec![0f32; x.len()];
        // y is [B, H, T, D]: each (b, h) block of T rows reads rows of x D·H apart.
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, blk)| {
            let (bi, h) = (bh / nh, bh % nh);
            for (p, row) in blk.chunks_mut(d).enumerate() {
                let src = &x[(bi * t + p) * hd + h * d..][..d];
                self.rotate(src, row, p, false);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, nh, t, d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, hd) = arg.dims3()?;
        let (nh, d) = (self.heads, hd / self.heads);
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; g.len()];
        dx.par_chunks_mut(hd).enumerate().for_each(|(bt, row)| {
            let (bi, p) = (bt / t, bt % t);
            for h in 0..nh {
                let src = &g[((bi * nh + h) * t + p) * d..][..d];
                self.rotate(src, &mut row[h * d..(h + 1) * d], p, true);
            }
        });
        Ok(Some(Tensor::from_vec(dx, (b, t, hd), arg.device())?))
    }
}

/// Splits `x [B, T, H·D]` into heads `[B, H, T, D]` and applies RoPE with the `[T, D]` tables `cos`, `sin`
/// (already narrowed to this call's positions). `None` off the CPU or for non-f32 input.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Option<Result<Tensor>> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return None;
    }
    let run = || {
        let op = RopeHeads {
            cos: cos.flatten_all()?.to_vec1::<f32>()?,
            sin: sin.flatten_all()?.to_vec1::<f32>()?,
            heads,
        };
        x.contiguous()?.apply_op1(op)
    };
    Some(run())
}

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy over rows of logits [N, V] with per-row targets and weights (0 for ignored rows), averaged
// over `count`: loss = Σ_i w_i (lse_i − x_i[t_i]) / count. Backward: dx_i = g · w_i (softmax(x_i) − onehot(t_i))
// / count, written into one buffer (the unfused graph keeps several [N, V] temporaries alive).

struct CrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: f32,
}

fn log_sum_exp(row: &[f32]) -> f32 {
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

// ---------------------------------------------------------------------------------------------------------
// LM head fused with the cross-entropy: loss = Σ_i w_i (lse(h_i Wᵀ) − h_i·W_{t_i}) / count over rows of h [N, d],
// W [V, d]. The logits exist only for a block of rows × a slice of the vocabulary at a time (never [N × V]).
// The softmax runs online over the slices, as flash attention does over keys: each row keeps its running
// maximum m and Σ exp(x − m), and dH accumulates E W (E = exp(x − m) of the slice) rescaled whenever m
// grows; at the end dH = (w/count)·(E W / Σ − W_t). So the forward leaves the head's gradients ready and
// backward only scales them by the incoming gradient. Slicing the vocabulary instead of chunking rows lets
// both products run on every row at once (170-row chunks of a 49k vocabulary kept gemm at 265–330 GFLOP/s;
// 2,048 rows × 4,096-column slices reach 430–445). A trained head (dW += Pᵀ H) needs the final m and Σ
// before any slice's P is known: it takes a second pass that recomputes the slices.

struct LinearCrossEntropy {
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
type HeadGrads = (Vec<f32>, Option<Vec<f32>>);

/// Logit elements per block × slice: 8M f32 (32 MB) whatever the vocabulary.
const LCE_CHUNK_ELEMS: usize = 8 << 20;
/// Vocabulary columns per slice (fewer when the vocabulary is smaller).
const LCE_SLICE_COLS: usize = 4096;

/// One row's running softmax statistics: maximum, Σ exp(x − max), and its target's logit.
#[derive(Clone, Copy)]
struct RowStats {
    max: f32,
    sum: f32,
    target: f32,
}

/// `[rows, cols]` logits of the hidden rows `r0..` against the vocabulary slice `c0..` of the head W `[V, d]`.
fn slice_logits(
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
fn add_slice_product(e: &[f32], w: &[f32], d: usize, (c0, cols): (usize, usize), dh: &mut [f32]) {
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
fn linear_cross_entropy_blocked(
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

/// Test helpers shared by the kernel tests here, in `attention`, and in the model's attention module.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random fill, so the test does not depend on candle's RNG.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Var};

    /// Compares a fused op and its reference: outputs, and the gradient of a weighted sum w.r.t. the input.
    fn check(
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        reference: impl Fn(&Tensor) -> Result<Tensor>,
        shape: &[usize],
    ) {
        let x = Var::from_tensor(&rand(shape, 1)).unwrap();
        let yf = fused(x.as_tensor()).unwrap();
        let yr = reference(x.as_tensor()).unwrap();
        assert!(
            max_diff(&yf, &yr) < 1e-5,
            "forward differs by {}",
            max_diff(&yf, &yr)
        );
        let probe = rand(yf.dims(), 2);
        let gf = (yf * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (yr * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gf, gr) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
        assert!(
            max_diff(gf, gr) < 1e-4,
            "backward differs by {}",
            max_diff(gf, gr)
        );
    }

    #[test]
    fn sparse_linear_matches_the_dense_matrix_in_values_and_gradients() {
        let (out, inp) = (7, 11);
        let rows = std::sync::Arc::new(vec![0u32, 3, 3, 6, 2]);
        let cols = std::sync::Arc::new(vec![10u32, 0, 5, 5, 7]);
        let v = Var::from_tensor(&rand(&[5], 31)).unwrap();
        let x = Var::from_tensor(&rand(&[2, 3, inp], 32)).unwrap();
        let y = sparse_linear(x.as_tensor(), v.as_tensor(), &rows, &cols, out).unwrap();
        let dense = sparse_dense(v.as_tensor(), &rows, &cols, out, inp).unwrap();
        let want = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-6);
        let probe = rand(&[2, 3, out], 33);
        let g1 = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), v.as_tensor()] {
            assert!(max_diff(g1.get(t).unwrap(), g2.get(t).unwrap()) < 1e-5);
        }
    }

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

    #[test]
    fn lora_linear_matches_the_composed_ops_with_and_without_dropout() {
        for held in [Held::F32, Held::Nf4, Held::Bf16] {
            lora_linear_case(held);
        }
    }

    /// How a test's frozen weight is held.
    #[derive(Clone, Copy)]
    enum Held {
        F32,
        Nf4,
        Bf16,
    }

    impl Held {
        fn weight(self, w: &Tensor) -> BaseWeight {
            match self {
                Held::F32 => BaseWeight::Dense(w.clone()),
                Held::Nf4 => BaseWeight::nf4(w, false).unwrap(),
                Held::Bf16 => BaseWeight::Dense(w.to_dtype(candle_core::DType::BF16).unwrap()),
            }
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

    #[test]
    fn rms_norm_matches_reference() {
        let w = rand(&[32], 6);
        check(
            |x| rms_norm(x, &w, 1e-5),
            |x| rms_norm_reference(x, &w, 1e-5),
            &[3, 4, 32],
        );
    }

    #[test]
    fn layer_norm_matches_reference() {
        let (w, b) = (rand(&[32], 7), rand(&[32], 8));
        check(
            |x| layer_norm(x, &w, &b, 1e-5),
            |x| layer_norm_reference(x, &w, &b, 1e-5),
            &[3, 4, 32],
        );
    }

    #[test]
    fn dropout_masks_are_reproducible_across_thread_counts_and_keep_the_right_share() {
        let n = 5 * DROPOUT_BLOCK + 123;
        let m = dropout_mask(n, 0.25, 7);
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| dropout_mask(n, 0.25, 7));
        assert_eq!(m, one_thread);
        assert_ne!(m, dropout_mask(n, 0.25, 8));
        let keep = 1.0 / 0.75f32;
        assert!(m.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // 327k draws: the share's standard deviation is below 0.001.
        assert!((dropped - 0.25).abs() < 0.005, "dropped share {dropped}");
        // Blocks draw from different streams, not copies of the first.
        assert_ne!(m[..DROPOUT_BLOCK], m[DROPOUT_BLOCK..2 * DROPOUT_BLOCK]);
    }

    #[test]
    fn swiglu_matches_the_composed_ops() {
        let g = Var::from_tensor(&(rand(&[3, 7, 10], 51) * 4.0).unwrap()).unwrap();
        let u = Var::from_tensor(&rand(&[3, 7, 10], 52)).unwrap();
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let reference = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-6);
        let w = rand(&[3, 7, 10], 53);
        let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gr) = (grads(&fused), grads(&reference));
        for v in [&g, &u] {
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
    }

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

    #[test]
    fn softmax_matches_reference() {
        check(softmax_last_dim, softmax_reference, &[2, 3, 7, 9]);
    }
}
