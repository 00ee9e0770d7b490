//! 4-bit NormalFloat (NF4) weights as QLoRA defines them and bitsandbytes stores them, so a checkpoint
//! quantised here loads there and the reverse.
//!
//! Layout (bitsandbytes' convention): the row-major weight is cut into blocks of 64 values; each block is
//! scaled by its absmax into [−1, 1] and every value replaced by the index of the nearest of the 16 NF4 levels;
//! two indices per byte, the first value in the high nibble. With double quantization the per-block absmax
//! (f32) are themselves quantised: their mean is subtracted (the offset) and the rest is blockwise 8-bit
//! quantised (block 256) against bitsandbytes' signed dynamic map, so a block costs 8 + 32/256 bits instead of 32.

use candle_core::{Device, Tensor};
use factune_io::{Error, Result, Weights};
use rayon::prelude::*;

/// The 16 NF4 levels: quantiles of N(0, 1) normalised to [−1, 1] with an exact zero (QLoRA, appendix E;
/// bitsandbytes' `get_4bit_type("nf4")`).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

pub const NF4_BLOCK: usize = 64;
pub const ABSMAX_BLOCK: usize = 256;

/// The per-block scales of an NF4 tensor: plain f32, or double-quantised.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    F32(Vec<f32>),
    Double {
        /// 8-bit code of `absmax − offset` per NF4 block.
        codes: Vec<u8>,
        /// f32 absmax of each group of [`ABSMAX_BLOCK`] codes.
        absmax: Vec<f32>,
        offset: f32,
        /// The 256-entry map the codes index (bitsandbytes' signed dynamic map; read back from files as stored).
        map: Vec<f32>,
    },
}

impl Scales {
    /// The f32 absmax of NF4 block `b`.
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Scales::F32(v) => v[b],
            Scales::Double {
                codes,
                absmax,
                offset,
                map,
            } => map[codes[b] as usize] * absmax[b / ABSMAX_BLOCK] + offset,
        }
    }

    fn len(&self) -> usize {
        match self {
            Scales::F32(v) => v.len(),
            Scales::Double { codes, .. } => codes.len(),
        }
    }
}

/// A weight matrix `[rows, cols]` in NormalFloat with `bits` per value (NF4 by default; 2 to 8 for mixed
/// precision).
#[derive(Clone, Debug, PartialEq)]
pub struct NfMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    /// Level indices as a bit stream, most significant bit first: for NF4 two per byte, the first value in the
    /// high nibble (bitsandbytes' layout). Padded with zero-level codes to a whole byte.
    pub packed: Vec<u8>,
    pub scales: Scales,
    levels: Vec<f32>,
}

/// Φ⁻¹(p), the standard normal quantile (Acklam's rational approximation, relative error below 1.2e−9).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The 2^bits NormalFloat levels, QLoRA's construction for any width: 2^(bits−1) quantiles of N(0, 1) on the
/// positive side and 2^(bits−1) − 1 on the negative, equally spaced in probability from `offset` to ½, an
/// exact zero, all divided by the largest. `offset` sits halfway between the outermost quantiles of
/// 2^bits − 1 and 2^bits equal bins (0.9677 for 4 bits). For 4 bits the result is [`NF4_LEVELS`] (tested).
pub fn nf_levels(bits: u8) -> Vec<f32> {
    let n = 1usize << bits;
    let offset = 1.0 - 0.5 * (1.0 / (2.0 * (n - 1) as f64) + 1.0 / (2.0 * n as f64));
    let side = |count: usize| -> Vec<f64> {
        (0..count)
            .map(|i| normal_quantile(offset + (0.5 - offset) * i as f64 / count as f64))
            .collect()
    };
    let mut v: Vec<f64> = side(n / 2);
    v.extend(side(n / 2 - 1).into_iter().map(|x| -x));
    v.push(0.0);
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let mut out: Vec<f32> = v.into_iter().map(|x| (x / max) as f32).collect();
    out.sort_by(f32::total_cmp);
    out
}

/// The levels a `bits`-wide matrix indexes: bitsandbytes' exact NF4 table for 4 bits.
fn levels_for(bits: u8) -> Vec<f32> {
    if bits == 4 {
        NF4_LEVELS.to_vec()
    } else {
        nf_levels(bits)
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: 8-bit codes with a dynamic exponent (powers of ten from
/// 1e−6 to 1) and a linear fraction, plus 0 and 1, sorted. Computed in f64 and rounded once: bitsandbytes
/// builds it with torch's f32 `linspace`, whose rounding depends on the CPU's vector width, so its table
/// differs from this one by at most an ulp per entry and from machine to machine. Files carry the table they
/// were quantised with, and loading uses that one.
pub fn dynamic_map() -> Vec<f32> {
    const BITS: i32 = 7; // non-sign bits; all of them may be exponent
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..BITS {
        let items = 2usize.pow(i as u32) + 1;
        let step = 0.9 / (items - 1) as f64;
        let scale = 10f64.powi(-(BITS - 1) + i);
        for k in 0..items - 1 {
            let mean = 0.1 + step * (k as f64 + 0.5);
            data.push((scale * mean) as f32);
            data.push((-scale * mean) as f32);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

/// Index of the nearest level: the count of midpoints strictly below `v` (ties go to the lower level, as
/// bitsandbytes' `bucketize`).
fn level_code(v: f32, mids: &[f32]) -> u8 {
    mids.partition_point(|&m| m < v) as u8
}

/// Blockwise 8-bit quantisation against a sorted map (nearest entry, ties to the lower): codes and the
/// absmax of every block.
fn quantize_blockwise_8bit(x: &[f32], map: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for (xb, cb) in x.chunks(block).zip(codes.chunks_mut(block)) {
        let am = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        absmax.push(am);
        let inv = if am > 0.0 { 1.0 / am } else { 0.0 };
        for (v, c) in xb.iter().zip(cb) {
            let v = (v * inv).clamp(-1.0, 1.0);
            let hi = map.partition_point(|&m| m < v).min(map.len() - 1);
            let lo = hi.saturating_sub(1);
            *c = if (map[hi] - v).abs() < (v - map[lo]).abs() {
                hi
            } else {
                lo
            } as u8;
        }
    }
    (codes, absmax)
}

impl NfMatrix {
    /// Quantises a row-major `[rows, cols]` matrix to NF4; `double_quant` also quantises the block scales
    /// (against [`dynamic_map`]).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, double_quant: bool) -> Result<Self> {
        Self::quantize_with(w, rows, cols, double_quant.then(dynamic_map))
    }

    /// [`NfMatrix::quantize`] with the block scales double-quantised against a given 256-entry map, or kept in
    /// f32 without one.
    pub fn quantize_with(
        w: &[f32],
        rows: usize,
        cols: usize,
        scale_map: Option<Vec<f32>>,
    ) -> Result<Self> {
        Self::quantize_bits(w, rows, cols, 4, scale_map)
    }

    /// Quantises to `bits`-wide NormalFloat (2 to 8), block scales as in [`NfMatrix::quantize_with`].
    pub fn quantize_bits(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u8,
        scale_map: Option<Vec<f32>>,
    ) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::config(format!(
                "NormalFloat width {bits} bits: expected 2 to 8"
            )));
        }
        if w.len() != rows * cols {
            return Err(Error::config(format!(
                "NF{bits}: {} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::config(format!(
                "NF4: value {} at index {i} of a [{rows}, {cols}] matrix is not finite",
                w[i]
            )));
        }
        let levels = levels_for(bits);
        let mids: Vec<f32> = levels.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
        let blocks: Vec<(f32, Vec<u8>)> = w
            .par_chunks(NF4_BLOCK)
            .map(|b| {
                let am = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let inv = 1.0 / am.max(1e-38);
                let codes = b
                    .iter()
                    .map(|v| level_code((v * inv).clamp(-1.0, 1.0), &mids))
                    .collect();
                (am, codes)
            })
            .collect();
        let mut absmax = Vec::with_capacity(blocks.len());
        let mut codes = Vec::with_capacity(w.len() + 1);
        for (am, c) in blocks {
            absmax.push(am);
            codes.extend(c);
        }
        // the last byte's spare bits hold a zero code, as bitsandbytes pads NF4's odd last value
        let bytes = (codes.len() * bits as usize).div_ceil(8);
        while codes.len() * (bits as usize) < bytes * 8 {
            codes.push(level_code(0.0, &mids));
        }
        let mut packed = vec![0u8; bytes];
        for (i, &c) in codes.iter().enumerate() {
            let bit = i * bits as usize;
            let word = (c as u16) << (16 - bits as usize - bit % 8);
            let Some(first) = packed.get_mut(bit / 8) else {
                break;
            };
            *first |= (word >> 8) as u8;
            if let Some(next) = packed.get_mut(bit / 8 + 1) {
                *next |= word as u8;
            }
        }
        let scales = if let Some(map) = scale_map {
            let offset =
                (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
            let (codes, nested) = quantize_blockwise_8bit(&centred, &map, ABSMAX_BLOCK);
            Scales::Double {
                codes,
                absmax: nested,
                offset,
                map,
            }
        } else {
            Scales::F32(absmax)
        };
        Self::from_parts_bits(rows, cols, bits, packed, scales)
    }

    /// Rebuilds an NF4 matrix from stored parts, checking that they fit together.
    pub fn from_parts(rows: usize, cols: usize, packed: Vec<u8>, scales: Scales) -> Result<Self> {
        Self::from_parts_bits(rows, cols, 4, packed, scales)
    }

    fn from_parts_bits(
        rows: usize,
        cols: usize,
        bits: u8,
        packed: Vec<u8>,
        scales: Scales,
    ) -> Result<Self> {
        let n = rows * cols;
        let blocks = n.div_ceil(NF4_BLOCK);
        let bytes = (n * bits as usize).div_ceil(8);
        if packed.len() != bytes {
            return Err(Error::config(format!(
                "NF{bits} [{rows}, {cols}]: {} packed bytes, expected {bytes}",
                packed.len(),
            )));
        }
        if scales.len() != blocks {
            return Err(Error::config(format!(
                "NF4 [{rows}, {cols}]: {} block scales, expected {blocks} (block size {NF4_BLOCK})",
                scales.len()
            )));
        }
        if let Scales::Double { absmax: a, map, .. } = &scales {
            if map.len() != 256 || a.len() != blocks.div_ceil(ABSMAX_BLOCK) {
                return Err(Error::config(format!(
                    "NF4 [{rows}, {cols}]: double-quantised scales need a 256-entry map and {} nested \
                     absmax, got {} and {}",
                    blocks.div_ceil(ABSMAX_BLOCK),
                    map.len(),
                    a.len()
                )));
            }
        }
        Ok(NfMatrix {
            rows,
            cols,
            bits,
            packed,
            scales,
            levels: levels_for(bits),
        })
    }

    /// The level index of element `i` (row-major).
    pub fn code(&self, i: usize) -> u8 {
        let (b, bit) = (self.bits as usize, i * self.bits as usize);
        let hi = (self.packed[bit / 8] as u16) << 8;
        let lo = self.packed.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
        (((hi | lo) >> (16 - b - bit % 8)) & ((1 << b) - 1)) as u8
    }

    /// The level table the codes index.
    pub fn levels(&self) -> &[f32] {
        &self.levels
    }

    /// Dequantises rows `start..start + out.len() / cols` into `out` (row-major), a block's scale decoded
    /// once per block.
    pub fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        let base = start * self.cols;
        let mut j = 0;
        while j < out.len() {
            let i = base + j;
            let block = i / NF4_BLOCK;
            let end = ((block + 1) * NF4_BLOCK - base).min(out.len());
            let scale = self.scales.get(block);
            for (k, o) in out[j..end].iter_mut().enumerate() {
                *o = self.levels[self.code(i + k) as usize] * scale;
            }
            j = end;
        }
    }

    /// `x [m, cols] · Wᵀ → [m, rows]` straight from the codes, for a few rows of x (decoding): each block's
    /// dot product runs over the unscaled levels, two codes per byte, and is scaled once. No dequantised copy.
    pub fn matmul_t_small(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let rows: Vec<Vec<f32>> = (0..n)
            .into_par_iter()
            .map(|r| {
                let mut acc = vec![0f32; m];
                let (start, end) = (r * k, (r + 1) * k);
                let mut i = start;
                while i < end {
                    let block = i / NF4_BLOCK;
                    let stop = ((block + 1) * NF4_BLOCK).min(end);
                    let scale = self.scales.get(block);
                    for (t, a) in acc.iter_mut().enumerate() {
                        let xr = &x[t * k + (i - start)..t * k + (stop - start)];
                        let mut part = 0f32;
                        if self.bits == 4 && i % 2 == 0 && (stop - i) % 2 == 0 {
                            for (pair, &b) in xr.chunks_exact(2).zip(&self.packed[i / 2..stop / 2])
                            {
                                part += pair[0] * NF4_LEVELS[(b >> 4) as usize]
                                    + pair[1] * NF4_LEVELS[(b & 0x0F) as usize];
                            }
                        } else {
                            for (j, xv) in xr.iter().enumerate() {
                                part += xv * self.levels[self.code(i + j) as usize];
                            }
                        }
                        *a += scale * part;
                    }
                    i = stop;
                }
                acc
            })
            .collect();
        for (r, acc) in rows.into_iter().enumerate() {
            for (t, v) in acc.into_iter().enumerate() {
                y[t * n + r] = v;
            }
        }
        y
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_rows(r, row));
        out
    }

    /// Storage cost per weight in bits, scales and maps included.
    pub fn bits_per_param(&self) -> f64 {
        let scale_bits = match &self.scales {
            Scales::F32(v) => 32 * v.len(),
            Scales::Double {
                codes, absmax, map, ..
            } => 8 * codes.len() + 32 * (absmax.len() + map.len() + 1),
        };
        let bits = 8 * self.packed.len() + scale_bits + 32 * self.levels.len();
        bits as f64 / (self.rows * self.cols) as f64
    }

    /// Bytes held in memory (packed codes and scales).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.scales {
                Scales::F32(v) => 4 * v.len(),
                Scales::Double { codes, absmax, .. } => codes.len() + 4 * absmax.len() + 1024,
            }
    }
}

/// The tensors bitsandbytes (through transformers' `save_pretrained`) stores for a 4-bit weight `key`:
/// the packed codes as `[⌈n/2⌉, 1]` u8, the scales, the level map and a JSON blob of the rest.
pub fn to_bnb_tensors(q: &NfMatrix, key: &str) -> Result<Vec<(String, Tensor)>> {
    if q.bits != 4 {
        return Err(Error::config(format!(
            "`{key}` is held in NF{}; bitsandbytes' format stores NF4 only",
            q.bits
        )));
    }
    let dev = &Device::Cpu;
    let mut out = vec![
        (
            key.to_string(),
            Tensor::from_vec(q.packed.clone(), (q.packed.len(), 1), dev)?,
        ),
        (
            format!("{key}.quant_map"),
            Tensor::new(&NF4_LEVELS[..], dev)?,
        ),
    ];
    let mut state = serde_json::json!({
        "quant_type": "nf4",
        "blocksize": NF4_BLOCK,
        "dtype": "float32",
        "shape": [q.rows, q.cols],
    });
    match &q.scales {
        Scales::F32(v) => out.push((format!("{key}.absmax"), Tensor::new(&v[..], dev)?)),
        Scales::Double {
            codes,
            absmax,
            offset,
            map,
        } => {
            out.push((format!("{key}.absmax"), Tensor::new(&codes[..], dev)?));
            out.push((
                format!("{key}.nested_absmax"),
                Tensor::new(&absmax[..], dev)?,
            ));
            out.push((
                format!("{key}.nested_quant_map"),
                Tensor::new(&map[..], dev)?,
            ));
            state["nested_blocksize"] = ABSMAX_BLOCK.into();
            state["nested_dtype"] = "float32".into();
            state["nested_offset"] = (*offset as f64).into();
        }
    }
    let blob = serde_json::to_vec(&state).map_err(|e| Error::config(e.to_string()))?;
    let n = blob.len();
    out.push((
        format!("{key}.quant_state.bitsandbytes__nf4"),
        Tensor::from_vec(blob, n, dev)?,
    ));
    Ok(out)
}

/// Reads the 4-bit weight `key` of shape `[rows, cols]` if the checkpoint stores it in bitsandbytes' layout
/// (`None` when `key` is an ordinary float tensor).
pub fn read_bnb(w: &Weights, key: &str, rows: usize, cols: usize) -> Result<Option<NfMatrix>> {
    let Some((_, dtype)) = w.info(key) else {
        return Ok(None);
    };
    if dtype != safetensors::Dtype::U8 {
        return Ok(None);
    }
    let file = w.path_of(key).to_path_buf();
    let bad = |msg: String| Error::invalid(&file, format!("4-bit weight `{key}`: {msg}"));
    let state_key = format!("{key}.quant_state.bitsandbytes__nf4");
    if !w.contains(&state_key) {
        let other = format!("{key}.quant_state.bitsandbytes__fp4");
        return Err(bad(if w.contains(&other) {
            "stored as FP4; only NF4 is supported".into()
        } else {
            format!("missing `{state_key}`")
        }));
    }
    let state: serde_json::Value = serde_json::from_slice(w.raw(&state_key)?.0)
        .map_err(|e| bad(format!("`{state_key}` is not JSON: {e}")))?;
    let blocksize = state["blocksize"].as_u64();
    if state["quant_type"] != "nf4" || blocksize != Some(NF4_BLOCK as u64) {
        return Err(bad(format!(
            "quant_type {} with blocksize {}; supported: nf4 with blocksize {NF4_BLOCK}",
            state["quant_type"], state["blocksize"]
        )));
    }
    let shape: Vec<u64> = serde_json::from_value(state["shape"].clone())
        .map_err(|_| bad(format!("bad shape {}", state["shape"])))?;
    if shape != [rows as u64, cols as u64] {
        return Err(bad(format!(
            "shape {shape:?}, but config.json implies [{rows}, {cols}]"
        )));
    }
    let f32s = |name: &str| -> Result<Vec<f32>> {
        let (bytes, dt, _) = w.raw(name)?;
        if dt != safetensors::Dtype::F32 {
            return Err(bad(format!("`{name}` has dtype {dt:?}, expected F32")));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    };
    let map = f32s(&format!("{key}.quant_map"))?;
    if map
        .iter()
        .zip(NF4_LEVELS)
        .any(|(a, b)| (a - b).abs() > 1e-6)
        || map.len() != 16
    {
        return Err(bad("`quant_map` is not the NF4 level table".into()));
    }
    let absmax_key = format!("{key}.absmax");
    let scales = if let Some(off) = state.get("nested_offset") {
        let offset = off.as_f64().ok_or_else(|| {
            bad(format!(
                "`{state_key}`: nested_offset {off} is not a number"
            ))
        })?;
        Scales::Double {
            codes: w.raw(&absmax_key)?.0.to_vec(),
            absmax: f32s(&format!("{key}.nested_absmax"))?,
            offset: offset as f32,
            map: f32s(&format!("{key}.nested_quant_map"))?,
        }
    } else {
        Scales::F32(f32s(&absmax_key)?)
    };
    NfMatrix::from_parts(rows, cols, w.raw(key)?.0.to_vec(), scales)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random(), rng.random());
                ((-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.02) as f32
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_bounded_by_half_the_widest_level_gap() {
        for double in [false, true] {
            let w = gaussian(96 * 130, 1);
            let q = NfMatrix::quantize(&w, 96, 130, double).unwrap();
            let d = q.dequantize();
            for (b, (wb, db)) in w.chunks(NF4_BLOCK).zip(d.chunks(NF4_BLOCK)).enumerate() {
                let am = wb.iter().fold(0f32, |a, v| a.max(v.abs()));
                // widest gap is between −1 and the next level; the double-quantised scale adds its own error
                let tol = am * 0.152 + if double { am * 0.02 } else { 1e-7 };
                for (x, y) in wb.iter().zip(db) {
                    assert!((x - y).abs() <= tol, "block {b}: {x} vs {y}");
                }
            }
            // quantising the dequantised matrix again gives the same codes (the levels are fixed points)
            if !double {
                let again = NfMatrix::quantize(&d, 96, 130, false).unwrap();
                assert_eq!(again.packed, q.packed);
            }
        }
    }

    #[test]
    fn double_quantization_costs_about_4_127_bits_per_parameter() {
        let w = gaussian(1024 * 1024, 2);
        let plain = NfMatrix::quantize(&w, 1024, 1024, false).unwrap();
        let double = NfMatrix::quantize(&w, 1024, 1024, true).unwrap();
        assert!(
            (plain.bits_per_param() - 4.5).abs() < 0.01,
            "{}",
            plain.bits_per_param()
        );
        assert!(
            (double.bits_per_param() - 4.127).abs() < 0.01,
            "{}",
            double.bits_per_param()
        );
    }

    #[test]
    fn normalfloat_construction_reproduces_the_nf4_table() {
        for (a, b) in nf_levels(4).iter().zip(NF4_LEVELS) {
            assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        }
        for bits in 2..=8 {
            let l = nf_levels(bits);
            assert_eq!(l.len(), 1 << bits);
            assert!(
                l.windows(2).all(|p| p[0] < p[1]),
                "NF{bits} levels not increasing"
            );
            assert_eq!((l[0], l[l.len() - 1]), (-1.0, 1.0));
            assert!(l.contains(&0.0));
        }
    }

    #[test]
    fn every_width_round_trips_and_error_falls_with_bits() {
        let w = gaussian(33 * 70, 3);
        let mut last = f64::INFINITY;
        for bits in [2u8, 3, 4, 5, 8] {
            let q = NfMatrix::quantize_bits(&w, 33, 70, bits, None).unwrap();
            assert_eq!(q.packed.len(), (33 * 70 * bits as usize).div_ceil(8));
            // codes are the nearest levels: quantising the dequantised matrix again changes nothing
            let d = q.dequantize();
            let again = NfMatrix::quantize_bits(&d, 33, 70, bits, None).unwrap();
            assert_eq!(again.packed, q.packed, "NF{bits}");
            let err: f64 = w
                .iter()
                .zip(&d)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            assert!(err < last, "NF{bits}: error {err} not below {last}");
            last = err;
        }
    }

    #[test]
    fn bad_input_is_named() {
        let e = NfMatrix::quantize(&[0.0, f32::NAN], 1, 2, true).unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
        let e = NfMatrix::from_parts(4, 64, vec![0; 10], Scales::F32(vec![1.0; 4])).unwrap_err();
        assert!(e.to_string().contains("packed bytes"), "{e}");
    }
}
