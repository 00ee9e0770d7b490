//! Fused CPU kernels as candle `CustomOp`s, each with its backward written beside its forward.
//!
//! Why they exist: candle's autograd computes a gradient for every operand of every op. For a frozen weight
//! that is wasted work and memory (see PERF-NOTES: a frozen linear's backward costs as much as a trainable
//! one's). The ops here hold their frozen operands inside the op, so autograd sees only the activation and
//! the backward yields dX alone. On non-CPU devices each entry point falls back to plain candle ops (correct,
//! without those savings).

pub mod attention;
mod cross_entropy;
mod dropout;
pub mod fastfood;
mod frozen_linear;
mod layer_norm;
mod linear_cross_entropy;
mod lora;
mod matmul;
mod rms_norm;
mod rope;
mod softmax;
mod sparse;
mod swiglu;
#[cfg(test)]
pub(crate) mod testing;
mod tiled;
mod vmath;

pub use cross_entropy::{cross_entropy, cross_entropy_reference};
pub use dropout::{dropout_mask, Dropout};
pub use fastfood::{said_weight, Fastfood};
pub use frozen_linear::frozen_linear;
pub use layer_norm::{layer_norm, layer_norm_reference};
pub use linear_cross_entropy::linear_cross_entropy;
pub use lora::{dora_linear, lora_linear};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::rope_heads;
pub use softmax::{softmax_last_dim, softmax_reference};
pub use sparse::{sparse_dense, sparse_linear};
pub use swiglu::swiglu;

// What the ops share: slice access, row maps, gemm wrappers and frozen weights read in tiles.
use matmul::*;
use tiled::*;

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
