//! Causal self-attention shared by the architectures: RoPE tables, grouped-query attention, KV cache.

use crate::kernels;
use candle_core::{Device, Result, Tensor, D};
use factune_io::RopeScaling;

/// Precomputed cos/sin tables `[max_pos, head_dim]` (HF's non-interleaved "rotate half" layout).
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        match scaling {
            Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            None => {}
        }
        let mut cos = Vec::with_capacity(max_pos * head_dim);
        let mut sin = Vec::with_capacity(max_pos * head_dim);
        for p in 0..max_pos {
            for _half in 0..2 {
                for f in &inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_pos, head_dim), dev)?,
            sin: Tensor::from_vec(sin, (max_pos, head_dim), dev)?,
        })
    }

    /// Rotates `x: [B, H, T, D]` for positions `offset..offset+T`.
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)?
            .broadcast_add(&rot.broadcast_mul(&sin)?)
    }

    /// Splits a projection's output `x: [B, T, H·D]` into heads `[B, H, T, D]` and rotates them for positions
    /// `offset..offset+T`: one fused op on the CPU.
    pub fn apply_heads(&self, x: &Tensor, heads: usize, offset: usize) -> Result<Tensor> {
        let (b, t, hd) = x.dims3()?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        if let Some(y) = kernels::rope_heads(x, &cos, &sin, heads) {
            return y;
        }
        let x = x
            .reshape((b, t, heads, hd / heads))?
            .transpose(1, 2)?
            .contiguous()?;
        self.apply(&x, offset)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// Keys and values of past positions, per layer.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's `k, v: [B, Hkv, T, D]` and returns the full keys and values.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

/// Causal attention. `q: [B, Hq, T, D]`, `k, v: [B, Hkv, T, D]` (new positions only); `mask` from
/// [`causal_mask`], built once per forward and shared by every layer, used where the fused kernel does not
/// apply (off the CPU). Returns `[B, T, Hq·D]`.
pub fn causal_attention(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    cache: Option<(&mut KvCache, usize)>,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let (k, v) = match cache {
        Some((c, layer)) => c.append(layer, k, v)?,
        None => (k, v),
    };
    if let Some(y) = kernels::attention::causal_attention(q, &k, &v) {
        return y?.reshape((b, t, hq * d));
    }
    let hkv = k.dims()[1];
    let rep = hq / hkv;
    // Heads sharing a KV head are consecutive: fold them into the query length instead of copying K and V.
    let q = q.reshape((b, hkv, rep * t, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores.broadcast_add(mask)?;
    let p = kernels::softmax_last_dim(&scores)?;
    let y = p.matmul(&v.contiguous()?)?; // [B, Hkv, rep*T, D]
    y.reshape((b, hq, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, hq * d))
}

/// `[rep·T, offset + T]` additive mask for `T` new positions after `offset` cached ones, with `rep` query heads
/// per KV head folded into the rows: row i (position offset + i mod T) sees keys at positions ≤ its own.
pub fn causal_mask(t: usize, offset: usize, rep: usize, dev: &Device) -> Result<Tensor> {
    let tk = offset + t;
    let mut m = vec![0f32; rep * t * tk];
    for r in 0..rep * t {
        let pos = offset + r % t;
        for j in (pos + 1)..tk {
            m[r * tk + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (rep * t, tk), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff as diff, rand};
    use candle_core::Var;

    #[test]
    fn fused_rope_heads_match_the_composed_rotation() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 32, 10000.0, None, &dev).unwrap();
        let (b, t, nh, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&rand(&[b, t, nh * d], 5)).unwrap();
        for offset in [0, 7] {
            let fused = rope.apply_heads(x.as_tensor(), nh, offset).unwrap();
            let split = x
                .as_tensor()
                .reshape((b, t, nh, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let composed = rope.apply(&split.contiguous().unwrap(), offset).unwrap();
            assert!(diff(&fused, &composed) < 1e-6);
            let w = rand(&[b, nh, t, d], 6);
            let g = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (g(&fused), g(&composed));
            let (f, c) = (
                gf.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
            );
            assert!(diff(f, c) < 1e-5, "gradient differs by {}", diff(f, c));
        }
    }
}
