//! The Fastfood projection (Le et al. 2013) as SAID uses it (Aghajanyan et al. 2021): a structured random map
//! P: R^d → R^D, `P θ = S H G Π H B θ / (√(L Σ G²) · √(D / L))`, with L = 2^⌈log₂ max(d, D)⌉, B random signs,
//! H the (unnormalised) Walsh–Hadamard transform, Π a random permutation, G Gaussian scales and S the first D
//! entries; θ is zero-padded to L. Applying P or Pᵀ costs one full transform of length L: the other one acts
//! on θ's block of length p = 2^⌈log₂ d⌉ alone (H = H_{L/p} ⊗ H_p, so its output is that block's transform
//! repeated, and the permutation reads it through Π(i) mod p), and nothing of size D × d is ever held.
//!
//! B, Π and G are not stored: they are functions of a seed and the index (a counter-based hash; Π a 4-round
//! Feistel bijection on the index's two halves, its round functions tabulated per layer, a few KB; G read from
//! a table of 2^12 normal quantiles at a tabulation hash of the index), so a projection into a 100M-entry weight costs kilobytes. Tests may give
//! them explicitly.
//!
//! [`said_weight`] is the op a SAID layer runs: `W = W₀ + λ · P θ`, differentiable in θ and λ, with W₀ held
//! inside the op (frozen, no gradient).

use super::*;
use std::sync::{Arc, OnceLock};

/// The random parts of one projection.
pub enum Tables {
    /// From a seed (what training uses).
    Hashed(u64),
    /// Given: signs (±1) of length d, `perm[i]` for i < L (`u[i] = v[perm[i]]`), Gaussian scales of length L.
    Explicit {
        signs: Vec<f32>,
        perm: Vec<u32>,
        gauss: Vec<f32>,
    },
}

pub struct Fastfood {
    /// Input length (θ), output length (the weight's entries), padded length L and log₂ L.
    pub d: usize,
    pub dd: usize,
    ll: usize,
    source: Source,
    scale: f32,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hashed tables in the form the inner loops read: one key per stream, and the Feistel round functions
/// tabulated over the half-index (at most 2^⌈log₂ L / 2⌉ entries each, a few KB per layer).
struct Hashed {
    sign_key: u64,
    /// G's quantile index, a tabulation hash of the index's halves: `gauss_hi[hi] ^ gauss_lo[lo]`.
    gauss_hi: Vec<u16>,
    gauss_lo: Vec<u16>,
    lo_bits: u32,
    lo_mask: usize,
    hi_mask: usize,
    rounds: [Vec<u32>; 4],
}

impl Hashed {
    fn new(seed: u64, bits: u32) -> Self {
        let key = |stream: u64| splitmix(seed ^ splitmix(stream));
        let lo_bits = bits / 2;
        let (lo_mask, hi_mask) = ((1usize << lo_bits) - 1, (1usize << (bits - lo_bits)) - 1);
        let rounds = [0, 1, 2, 3].map(|r| {
            // even rounds change the high half from the low one, odd rounds the reverse
            let (from, to) = match r % 2 {
                0 => (lo_mask, hi_mask),
                _ => (hi_mask, lo_mask),
            };
            let k = key(3 + r as u64);
            (0..=from)
                .map(|v| (splitmix(k ^ v as u64) as usize & to) as u32)
                .collect()
        });
        let table = |stream: u64, len: usize| {
            let k = key(stream);
            (0..len)
                .map(|v| (splitmix(k ^ v as u64) >> (64 - QUANTILE_BITS)) as u16)
                .collect()
        };
        Hashed {
            sign_key: key(1),
            gauss_hi: table(2, hi_mask + 1),
            gauss_lo: table(7, lo_mask + 1),
            lo_bits,
            lo_mask,
            hi_mask,
            rounds,
        }
    }

    fn gauss(&self, i: usize) -> f32 {
        let (hi, lo) = ((i >> self.lo_bits) & self.hi_mask, i & self.lo_mask);
        normal_quantiles()[(self.gauss_hi[hi] ^ self.gauss_lo[lo]) as usize]
    }

    fn perm(&self, i: usize) -> usize {
        let (mut hi, mut lo) = ((i >> self.lo_bits) & self.hi_mask, i & self.lo_mask);
        let [r0, r1, r2, r3] = &self.rounds;
        hi ^= r0[lo] as usize;
        lo ^= r1[hi] as usize;
        hi ^= r2[lo] as usize;
        lo ^= r3[hi] as usize;
        (hi << self.lo_bits) | lo
    }
}

enum Source {
    Hashed(Hashed),
    Explicit {
        signs: Vec<f32>,
        perm: Vec<u32>,
        gauss: Vec<f32>,
    },
}

/// Bits of a Gaussian draw: it is one of 2^12 equally likely normal quantiles (a 16 KB table, in L1).
const QUANTILE_BITS: u32 = 12;

/// Φ⁻¹((k + ½) / 2^12) for every k: a Gaussian draw is one table read.
fn normal_quantiles() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let n = 1usize << QUANTILE_BITS;
        (0..n)
            .map(|k| crate::quant::normal_quantile((k as f64 + 0.5) / n as f64) as f32)
            .collect()
    })
}

impl Fastfood {
    /// A projection R^d → R^dd from a seed.
    pub fn new(d: usize, dd: usize, seed: u64) -> Result<Self> {
        Self::with_tables(d, dd, Tables::Hashed(seed))
    }

    /// A projection with given random parts (their lengths are checked against d and L).
    pub fn with_tables(d: usize, dd: usize, tables: Tables) -> Result<Self> {
        if d == 0 || dd == 0 {
            candle_core::bail!("fastfood: dimensions must be positive (d = {d}, D = {dd})");
        }
        let ll = d
            .max(dd)
            .checked_next_power_of_two()
            .ok_or_else(|| candle_core::Error::Msg(format!("fastfood: D = {dd} is too large")))?;
        let bits = ll.trailing_zeros();
        let source = match tables {
            Tables::Hashed(seed) => Source::Hashed(Hashed::new(seed, bits)),
            Tables::Explicit { signs, perm, gauss } => {
                let in_range = perm.iter().all(|&p| (p as usize) < ll);
                if signs.len() != d || perm.len() != ll || gauss.len() != ll || !in_range {
                    candle_core::bail!("fastfood: explicit tables do not match d = {d}, L = {ll}");
                }
                Source::Explicit { signs, perm, gauss }
            }
        };
        let mut ff = Fastfood {
            d,
            dd,
            ll,
            source,
            scale: 1.0,
        };
        let part = (ll / PARTS).max(1);
        let sums: Vec<f64> = (0..ll.div_ceil(part))
            .into_par_iter()
            .map(|c| {
                (c * part..((c + 1) * part).min(ll))
                    .map(|i| (ff.gauss(i) as f64).powi(2))
                    .sum()
            })
            .collect();
        let g2: f64 = sums.iter().sum();
        ff.scale = (1.0 / ((ll as f64 * g2).sqrt() * (dd as f64 / ll as f64).sqrt())) as f32;
        Ok(ff)
    }

    fn sign(&self, j: usize) -> f32 {
        match &self.source {
            Source::Hashed(h) => match splitmix(h.sign_key ^ j as u64) & 1 {
                0 => 1.0,
                _ => -1.0,
            },
            Source::Explicit { signs, .. } => signs[j],
        }
    }

    fn gauss(&self, i: usize) -> f32 {
        match &self.source {
            Source::Hashed(h) => h.gauss(i),
            Source::Explicit { gauss, .. } => gauss[i],
        }
    }

    /// Π(i).
    fn perm(&self, i: usize) -> usize {
        match &self.source {
            Source::Hashed(h) => h.perm(i),
            Source::Explicit { perm, .. } => perm[i] as usize,
        }
    }

    /// `P θ`, length D.
    pub fn project(&self, theta: &[f32]) -> Vec<f32> {
        // H B θ: θ lives in the first block of length p, so H_L = H_{L/p} ⊗ H_p repeats that block's
        // transform w over the whole length, and (H B θ)[j] = w[j mod p]
        let p = self.d.next_power_of_two();
        let mut w = vec![0f32; p];
        for (j, (wj, &t)) in w.iter_mut().zip(theta).enumerate() {
            *wj = self.sign(j) * t;
        }
        fwht(&mut w);
        // G Π: u[i] = G[i] · w[Π(i) mod p], then H; keep the first D
        let mut u = vec![0f32; self.ll];
        u.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            for (k, uk) in chunk.iter_mut().enumerate() {
                let i = c * CHUNK + k;
                *uk = self.gauss(i) * w[self.perm(i) & (p - 1)];
            }
        });
        fwht(&mut u);
        u.truncate(self.dd);
        u.par_iter_mut().for_each(|x| *x *= self.scale);
        u
    }

    /// `Pᵀ g`, length d (g has length D).
    pub fn project_t(&self, g: &[f32]) -> Vec<f32> {
        let mut u = vec![0f32; self.ll];
        u[..self.dd]
            .par_iter_mut()
            .zip(g)
            .for_each(|(x, &gi)| *x = gi * self.scale);
        fwht(&mut u);
        // the first d entries of H Πᵀ G u: with v = Πᵀ G u, (H v)[c] for c < p is H_p of v folded to length p,
        // s[c] = Σ_j v[j] over j ≡ c (mod p), i.e. s[Π(i) mod p] += G[i] u[i]
        let p = self.d.next_power_of_two();
        // per-part sums added in order, so the result does not depend on how threads split the work
        let part = (self.ll / PARTS).max(1);
        let parts: Vec<Vec<f32>> = u
            .par_chunks(part)
            .enumerate()
            .map(|(c, chunk)| {
                let mut s = vec![0f32; p];
                for (k, &uk) in chunk.iter().enumerate() {
                    let i = c * part + k;
                    s[self.perm(i) & (p - 1)] += self.gauss(i) * uk;
                }
                s
            })
            .collect();
        let mut s = vec![0f32; p];
        for q in &parts {
            s.iter_mut().zip(q).for_each(|(x, y)| *x += y);
        }
        fwht(&mut s);
        s.truncate(self.d);
        for (j, x) in s.iter_mut().enumerate() {
            *x *= self.sign(j);
        }
        s
    }
}

/// Entries per parallel task of the permutation passes.
const CHUNK: usize = 1 << 14;
/// Fixed parts of the transposed pass's sum (its threads' split must not change the result).
const PARTS: usize = 16;

/// The unnormalised Walsh–Hadamard transform in place (length a power of two): the stages within blocks that
/// fit in L1 first, then the wider ones one pass each, in parallel.
pub fn fwht(x: &mut [f32]) {
    const BLOCK: usize = 1 << 12;
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let b = n.min(BLOCK);
    x.par_chunks_mut(b).for_each(|blk| {
        let mut h = 1;
        while h < blk.len() {
            for grp in blk.chunks_exact_mut(2 * h) {
                let (lo, hi) = grp.split_at_mut(h);
                butterfly(lo, hi);
            }
            h *= 2;
        }
    });
    let mut h = b;
    while h < n {
        x.par_chunks_mut(2 * h).for_each(|grp| {
            let (lo, hi) = grp.split_at_mut(h);
            lo.par_chunks_mut(BLOCK)
                .zip(hi.par_chunks_mut(BLOCK))
                .for_each(|(l, r)| butterfly(l, r));
        });
        h *= 2;
    }
}

fn butterfly(lo: &mut [f32], hi: &mut [f32]) {
    for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
        let (s, t) = (*a + *b, *a - *b);
        *a = s;
        *b = t;
    }
}

/// `W = W₀ + λ · P θ` on (θ [d], λ [1]); W₀ `[out, in]` f32 is frozen inside the op.
struct SaidWeight {
    w0: Tensor,
    ff: Arc<Fastfood>,
}

impl CustomOp2 for SaidWeight {
    fn name(&self) -> &'static str {
        "said-weight"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let theta = f32_slice(ts, tl, "said-weight θ")?;
        let lambda = f32_slice(ls, ll, "said-weight λ")?[0];
        let mut w = self.ff.project(theta);
        with_f32_slices([&self.w0], "said-weight W₀", |[w0]| {
            w.par_iter_mut()
                .zip(w0)
                .for_each(|(x, &b)| *x = b + lambda * *x);
            Ok(())
        })?;
        Ok((CpuStorage::F32(w), self.w0.shape().clone()))
    }

    fn bwd(
        &self,
        theta: &Tensor,
        lambda: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dθ = λ Pᵀ dW; dλ = ⟨dW, P θ⟩ = ⟨Pᵀ dW, θ⟩
        let t = with_f32_slices([grad], "said-weight dW", |[g]| Ok(self.ff.project_t(g)))?;
        let th = theta.detach().to_vec1::<f32>()?;
        let l = lambda.detach().to_vec1::<f32>()?[0];
        let dl: f64 = t.iter().zip(&th).map(|(&a, &b)| a as f64 * b as f64).sum();
        let dt: Vec<f32> = t.iter().map(|&a| a * l).collect();
        Ok((
            Some(Tensor::from_vec(dt, theta.shape(), theta.device())?),
            Some(Tensor::new(&[dl as f32], lambda.device())?),
        ))
    }
}

/// SAID's weight of one layer, `W₀ + λ · P θ` (`[out, in]` of `w0`), differentiable in `theta` `[d]` and
/// `lambda` `[1]`. CPU only: the transform has no candle-op equivalent.
pub fn said_weight(
    theta: &Tensor,
    lambda: &Tensor,
    w0: &Tensor,
    ff: &Arc<Fastfood>,
) -> Result<Tensor> {
    if !theta.device().is_cpu() {
        candle_core::bail!("SAID's Fastfood projection runs on the CPU only");
    }
    if theta.dims1()? != ff.d || w0.elem_count() != ff.dd || lambda.elem_count() != 1 {
        candle_core::bail!(
            "said-weight: θ {:?}, λ {:?}, W₀ {:?} do not fit a projection {} → {}",
            theta.dims(),
            lambda.dims(),
            w0.dims(),
            ff.d,
            ff.dd
        );
    }
    let op = SaidWeight {
        w0: w0.to_dtype(candle_core::DType::F32)?.contiguous()?,
        ff: ff.clone(),
    };
    theta.contiguous()?.apply_op2(&lambda.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H by its definition, H[i][j] = (−1)^popcount(i & j).
    fn hadamard_reference(x: &[f32]) -> Vec<f32> {
        (0..x.len())
            .map(|i| {
                x.iter()
                    .enumerate()
                    .map(|(j, &v)| if (i & j).count_ones() % 2 == 0 { v } else { -v })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn fwht_matches_the_definition_across_block_sizes() {
        for bits in [0, 1, 3, 12, 13, 14] {
            let n = 1usize << bits;
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let mut y = x.clone();
            fwht(&mut y);
            let r = hadamard_reference(&x);
            let err = y
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= 1e-3 * (n as f32).sqrt(), "n = {n}: {err}");
        }
    }

    #[test]
    fn hashed_permutation_is_a_bijection() {
        for (d, dd) in [(1, 1), (3, 5), (10, 1000), (7, 1 << 13)] {
            let ff = Fastfood::new(d, dd, 42).unwrap();
            let mut seen = vec![false; ff.ll];
            for i in 0..ff.ll {
                let p = ff.perm(i);
                assert!(!seen[p], "Π maps two indices to {p}");
                seen[p] = true;
            }
        }
    }

    #[test]
    fn transpose_is_the_adjoint_and_the_map_keeps_norms_roughly() {
        let (d, dd) = (50, 3000);
        let ff = Fastfood::new(d, dd, 7).unwrap();
        let theta: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..dd).map(|i| (i as f32 * 0.11).cos()).collect();
        let pt = ff.project(&theta);
        let ptg = ff.project_t(&g);
        let lhs: f64 = pt.iter().zip(&g).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = theta.iter().zip(&ptg).map(|(a, b)| (a * b) as f64).sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
        let n = |v: &[f32]| v.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
        let ratio = n(&pt) / n(&theta);
        assert!((0.5..2.0).contains(&ratio), "‖Pθ‖/‖θ‖ = {ratio}");
    }

    #[test]
    fn quantile_table_is_a_standard_normal() {
        let t = normal_quantiles();
        let mean = t.iter().map(|&x| x as f64).sum::<f64>() / t.len() as f64;
        let var = t.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / t.len() as f64;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 2e-3,
            "{mean} {var}"
        );
    }

    #[test]
    fn said_weight_gradients_match_finite_differences() {
        use candle_core::{Device, Var};
        let (d, o, i) = (6, 5, 7);
        let ff = Arc::new(Fastfood::new(d, o * i, 3).unwrap());
        let th: Vec<f32> = (0..d).map(|k| 0.3 * k as f32 - 0.7).collect();
        let w0 = super::super::testing::rand(&[o, i], 1);
        let c = super::super::testing::rand(&[o, i], 2);
        let loss = |th: &[f32], l: f32| -> f64 {
            let t = Tensor::new(th, &Device::Cpu).unwrap();
            let l = Tensor::new(&[l], &Device::Cpu).unwrap();
            let w = said_weight(&t, &l, &w0, &ff).unwrap();
            (w * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (theta, lambda) = (
            Var::new(th.as_slice(), &Device::Cpu).unwrap(),
            Var::new(&[1.3f32], &Device::Cpu).unwrap(),
        );
        let w = said_weight(theta.as_tensor(), lambda.as_tensor(), &w0, &ff).unwrap();
        let grads = (w * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = grads.get(&theta).unwrap().to_vec1::<f32>().unwrap();
        let gl = grads.get(&lambda).unwrap().to_vec1::<f32>().unwrap()[0];
        let eps = 1e-2;
        for j in 0..d {
            let (mut up, mut dn) = (th.clone(), th.clone());
            up[j] += eps;
            dn[j] -= eps;
            let num = (loss(&up, 1.3) - loss(&dn, 1.3)) / (2.0 * eps as f64);
            assert!(
                (num - gt[j] as f64).abs() < 1e-3,
                "dθ[{j}]: {num} vs {}",
                gt[j]
            );
        }
        let num = (loss(&th, 1.3 + eps) - loss(&th, 1.3 - eps)) / (2.0 * eps as f64);
        assert!((num - gl as f64).abs() < 1e-3, "dλ: {num} vs {gl}");
    }
}
