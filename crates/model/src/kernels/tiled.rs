//! Frozen weights read as f32 rows converted on the fly (NF4 codes, bf16 values): tiles for gemm, direct
//! products for a few rows, and the input gradient through such a weight.

use super::*;

/// Rows of an NF4 or bf16 weight converted at a time: a tile `[TILE_ROWS, in]` stays in cache while gemm
/// reads it, and no f32 copy of the whole weight ever exists.
pub(super) const TILE_ROWS: usize = 256;

/// Up to this many input rows (decoding), the product reads the stored weight directly instead of converting
/// tiles for gemm: with so few rows the conversion, not the arithmetic, is the cost.
pub(super) const DIRECT_ROWS: usize = 4;

/// A frozen weight the ops read as f32 rows converted on the fly, so no f32 copy of it exists: NF4 codes
/// (QLoRA), or bf16 values (a base held at half its f32 size, compute in f32).
#[derive(Clone, Copy)]
pub(super) enum Tiled<'a> {
    Nf(&'a NfMatrix),
    Bf16 {
        data: &'a [half::bf16],
        rows: usize,
        cols: usize,
    },
}

/// bf16 → f32 is exact: the bf16 bits are the f32's high half (a shift the compiler vectorises).
pub(super) fn bf16_to_f32(b: half::bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

impl Tiled<'_> {
    pub(super) fn dims(&self) -> (usize, usize) {
        match *self {
            Tiled::Nf(q) => (q.rows, q.cols),
            Tiled::Bf16 { rows, cols, .. } => (rows, cols),
        }
    }

    /// Rows `start..start + out.len() / cols` into `out`, row-major.
    pub(super) fn fill(&self, start: usize, out: &mut [f32]) {
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
    pub(super) fn matmul_t_small(&self, x: &[f32], m: usize) -> Vec<f32> {
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
    pub(super) fn for_each_tile(&self, mut f: impl FnMut(usize, &[f32])) {
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
    pub(super) fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
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
    pub(super) fn matmul(&self, g: &[f32], m: usize) -> Vec<f32> {
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
pub(super) enum Stored<'a> {
    F32(&'a Tensor),
    Tiled(Tiled<'a>),
}

/// Runs `f` on the weight as the ops read it (a bf16 weight's storage stays locked meanwhile).
pub(super) fn with_stored<R>(w: &BaseWeight, f: impl FnOnce(Stored) -> Result<R>) -> Result<R> {
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
pub(super) struct TiledInputGrad(pub(super) BaseWeight);

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
