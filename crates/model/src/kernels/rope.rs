//! RoPE with the head split: x [B, T, H·D] (a projection's output) → y [B, H, T, D] rotated, HF's "rotate half"
//! layout: for i < D/2, y_i = x_i cos_i − x_{i+D/2} sin_i; for i ≥ D/2, y_i = x_i cos_i + x_{i−D/2} sin_i.
//! One op instead of reshape, transpose copy, two narrows, neg, cat, two products and a sum; backward is the
//! inverse rotation: dx_i = dy_i cos_i + dy_{i+D/2} sin_{i+D/2} (i < D/2), dy_i cos_i − dy_{i−D/2} sin_{i−D/2}.

use super::*;

pub(super) struct RopeHeads {
    /// `[T, D]` tables for the positions of this call.
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
}

impl RopeHeads {
    /// Rotates one head-row: `src` and `dst` hold D values; `inverse` applies the transpose rotation.
    pub(super) fn rotate(&self, src: &[f32], dst: &mut [f32], pos: usize, inverse: bool) {
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
