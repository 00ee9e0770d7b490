//! Matrix product operators (tensor trains of a matrix): `W [out, in]` with `out = ∏ j_k`, `in = ∏ i_k` as a
//! chain of cores `T_k [χ_{k−1}, j_k, i_k, χ_k]`, `χ_0 = χ_N = 1`, so that
//! `W[(j_1…j_N), (i_1…i_N)] = Σ_χ T_1[1, j_1, i_1, ·] T_2[·, j_2, i_2, ·] … T_N[·, j_N, i_N, 1]`.
//!
//! TT-SVD builds the cores by sequential truncated SVDs of the remainder (left-orthonormal cores, the
//! singular values carried right), so the squared Frobenius error is exactly the sum of the squared singular
//! values discarded at each step. Contraction takes an input through the cores one mode at a time, never
//! forming the `[out, in]` matrix.

use crate::linalg::to_faer;
use candle_core::{DType, Device, Tensor};
use factune_io::{Error, Result};
use faer::Mat;

/// How a matrix is split into modes: `out = ∏ out_modes`, `in = ∏ in_modes`, one (j_k, i_k) pair per core.
#[derive(Debug, Clone, PartialEq)]
pub struct Modes {
    pub out: Vec<usize>,
    pub inp: Vec<usize>,
}

/// `n` as a product of `k` factors as equal as possible (smallest ratio of largest to smallest factor, found
/// by a search over divisors), in descending order. A prime `n` gives `[n, 1, …]`.
pub fn balanced_factors(n: usize, k: usize) -> Vec<usize> {
    fn search(
        n: usize,
        k: usize,
        cap: usize,
        acc: &mut Vec<usize>,
        best: &mut Option<(f64, Vec<usize>)>,
    ) {
        if k == 1 {
            if n <= cap {
                acc.push(n);
                let ratio = acc[0] as f64 / n.max(1) as f64;
                if best.as_ref().is_none_or(|(r, _)| ratio < *r) {
                    *best = Some((ratio, acc.clone()));
                }
                acc.pop();
            }
            return;
        }
        // the largest remaining factor is at least the k-th root of what is left
        for d in (1..=cap.min(n)).rev().filter(|&d| n.is_multiple_of(d)) {
            if (d as f64) < (n as f64).powf(1.0 / k as f64) - 1e-9 {
                break;
            }
            acc.push(d);
            search(n / d, k - 1, d, acc, best);
            acc.pop();
        }
    }
    let k = k.max(1);
    let mut best = None;
    search(n, k, n, &mut Vec::with_capacity(k), &mut best);
    best.map(|(_, f)| f).unwrap_or_else(|| {
        let mut f = vec![1; k];
        f[0] = n;
        f
    })
}

impl Modes {
    /// Balanced `k`-mode factorisations of both sides.
    pub fn balanced(out: usize, inp: usize, k: usize) -> Self {
        Modes {
            out: balanced_factors(out, k),
            inp: balanced_factors(inp, k),
        }
    }

    /// Modes given explicitly (config), checked against the layer shape.
    pub fn given(out: usize, inp: usize, out_modes: &[usize], in_modes: &[usize]) -> Result<Self> {
        let (po, pi) = (
            out_modes.iter().product::<usize>(),
            in_modes.iter().product::<usize>(),
        );
        if po != out || pi != inp || out_modes.len() != in_modes.len() || out_modes.is_empty() {
            return Err(Error::config(format!(
                "MPO modes {out_modes:?} × {in_modes:?} do not factor a [{out}, {inp}] matrix (need products \
                 {out} and {inp}, same number of modes)"
            )));
        }
        Ok(Modes {
            out: out_modes.to_vec(),
            inp: in_modes.to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Bond dimensions `χ_1 … χ_{N−1}` under a cap: each is also bounded by the sizes on either side.
    pub fn bonds(&self, cap: usize) -> Vec<usize> {
        let d: Vec<usize> = self.out.iter().zip(&self.inp).map(|(j, i)| j * i).collect();
        (1..d.len())
            .map(|k| {
                let left: usize = d[..k].iter().product();
                let right: usize = d[k..].iter().product();
                cap.min(left).min(right)
            })
            .collect()
    }

    /// Core shapes `[χ_{k−1}, j_k, i_k, χ_k]` under a bond cap.
    pub fn core_shapes(&self, cap: usize) -> Vec<[usize; 4]> {
        let mut b = vec![1];
        b.extend(self.bonds(cap));
        b.push(1);
        (0..self.len())
            .map(|k| [b[k], self.out[k], self.inp[k], b[k + 1]])
            .collect()
    }
}

/// A truncated MPO with the squared singular values TT-SVD dropped (the squared Frobenius error).
pub struct Mpo {
    pub cores: Vec<Tensor>,
    pub discarded: f64,
}

/// TT-SVD of `w [out, in]` into cores with bonds capped at `chi` (in f64, cores returned in f32).
pub fn tt_svd(w: &Tensor, modes: &Modes, chi: usize) -> Result<Mpo> {
    let (out, inp) = w.dims2()?;
    let n = modes.len();
    if modes.out.iter().product::<usize>() != out || modes.inp.iter().product::<usize>() != inp {
        return Err(Error::config(format!(
            "MPO modes {:?} × {:?} do not factor a [{out}, {inp}] matrix",
            modes.out, modes.inp
        )));
    }
    let a = to_faer(w)?;
    // Reorder W[(j_1…j_N), (i_1…i_N)] to M[(j_1 i_1), …, (j_N i_N)], row-major.
    let d: Vec<usize> = modes
        .out
        .iter()
        .zip(&modes.inp)
        .map(|(j, i)| j * i)
        .collect();
    let mut stride = vec![1usize; n];
    for k in (0..n.saturating_sub(1)).rev() {
        stride[k] = stride[k + 1] * d[k + 1];
    }
    let mut m = vec![0f64; out * inp];
    for o in 0..out {
        for c in 0..inp {
            let (mut oo, mut cc, mut pos) = (o, c, 0);
            for k in (0..n).rev() {
                let (jk, ik) = (oo % modes.out[k], cc % modes.inp[k]);
                oo /= modes.out[k];
                cc /= modes.inp[k];
                pos += (jk * modes.inp[k] + ik) * stride[k];
            }
            m[pos] = a[(o, c)];
        }
    }
    let dev = w.device();
    let mut cores = Vec::with_capacity(n);
    let mut discarded = 0.0;
    let (mut rest, mut prev) = (m, 1usize);
    for (k, &dk) in d.iter().enumerate().take(n - 1) {
        let rows = prev * dk;
        let cols = rest.len() / rows;
        let mat = Mat::<f64>::from_fn(rows, cols, |r, c| rest[r * cols + c]);
        let svd = mat.thin_svd().map_err(|e| {
            Error::config(format!(
                "TT-SVD: SVD of a [{rows}, {cols}] unfolding failed: {e:?}"
            ))
        })?;
        let s: Vec<f64> = (0..rows.min(cols)).map(|i| svd.S()[i]).collect();
        let keep = chi.min(s.len());
        discarded += s[keep..].iter().map(|x| x * x).sum::<f64>();
        let u = svd.U();
        let core: Vec<f32> = (0..rows)
            .flat_map(|r| (0..keep).map(move |c| (r, c)))
            .map(|(r, c)| u[(r, c)] as f32)
            .collect();
        cores.push(Tensor::from_vec(
            core,
            (prev, modes.out[k], modes.inp[k], keep),
            dev,
        )?);
        let v = svd.V();
        rest = (0..keep)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| s[r] * v[(c, r)])
            .collect();
        prev = keep;
    }
    let last: Vec<f32> = rest.iter().map(|&x| x as f32).collect();
    cores.push(Tensor::from_vec(
        last,
        (prev, modes.out[n - 1], modes.inp[n - 1], 1),
        dev,
    )?);
    Ok(Mpo { cores, discarded })
}

/// `x [.., in] → [.., out]`, `y = x ΔWᵀ` with ΔW the MPO, contracted mode by mode (differentiable in the
/// cores). The running tensor is `[m, J, χ, I]`: output modes done, bond, input modes to go.
pub fn contract(x: &Tensor, cores: &[Tensor], modes: &Modes) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().expect("rank >= 1");
    let m = x.elem_count() / inp;
    let mut z = x.reshape((m, 1, 1, inp))?;
    let mut done = 1;
    for (k, core) in cores.iter().enumerate() {
        let (cp, jk, ik, cn) = core.dims4()?;
        let after: usize = modes.inp[k + 1..].iter().product();
        let zk = z
            .reshape((m, done, cp, ik, after))?
            .permute((0, 1, 4, 2, 3))?
            .contiguous()?
            .reshape((m * done * after, cp * ik))?;
        let ck = core
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((cp * ik, jk * cn))?;
        z = zk
            .matmul(&ck)?
            .reshape((m, done, after, jk, cn))?
            .permute((0, 1, 3, 4, 2))?
            .contiguous()?
            .reshape((m, done * jk, cn, after))?;
        done *= jk;
    }
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = done;
    z.reshape(out_dims)
}

/// The dense `[out, in]` matrix of an MPO (for merging and tests).
pub fn dense(cores: &[Tensor], modes: &Modes, dev: &Device) -> candle_core::Result<Tensor> {
    let inp: usize = modes.inp.iter().product();
    let eye = Tensor::eye(inp, DType::F32, dev)?;
    contract(&eye, cores, modes)?.t()?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn fro2(t: &Tensor) -> f64 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    #[test]
    fn balanced_factors_multiply_back() {
        assert_eq!(balanced_factors(576, 3), vec![9, 8, 8]);
        assert_eq!(balanced_factors(1536, 3), vec![16, 12, 8]);
        for (n, k) in [(576, 4), (1536, 5), (257, 3), (49152, 4), (1, 3)] {
            let f = balanced_factors(n, k);
            assert_eq!(f.len(), k);
            assert_eq!(f.iter().product::<usize>(), n, "{n} in {k}: {f:?}");
        }
    }

    #[test]
    fn full_bond_dimension_reconstructs_and_truncation_error_is_the_discarded_energy() {
        let w = rand((24, 36), 1);
        let modes = Modes::balanced(24, 36, 3);
        let full = tt_svd(&w, &modes, usize::MAX).unwrap();
        let back = dense(&full.cores, &modes, &Device::Cpu).unwrap();
        assert!(
            fro2(&(&back - &w).unwrap()) < 1e-9,
            "full χ must reconstruct W"
        );
        let mut last = f64::INFINITY;
        for chi in [1, 2, 4, 8, 16] {
            let t = tt_svd(&w, &modes, chi).unwrap();
            let err = fro2(&(dense(&t.cores, &modes, &Device::Cpu).unwrap() - &w).unwrap());
            assert!(
                err <= last + 1e-6,
                "error grew from {last} to {err} at χ = {chi}"
            );
            assert!(
                (err - t.discarded).abs() <= 1e-4 * t.discarded.max(1.0),
                "χ = {chi}: {err} vs {}",
                t.discarded
            );
            let shapes: Vec<Vec<usize>> = t.cores.iter().map(|c| c.dims().to_vec()).collect();
            let want: Vec<Vec<usize>> = modes.core_shapes(chi).iter().map(|s| s.to_vec()).collect();
            assert_eq!(shapes, want);
            last = err;
        }
    }

    #[test]
    fn contraction_equals_the_dense_product() {
        let w = rand((30, 20), 2);
        let modes = Modes::balanced(30, 20, 3);
        let t = tt_svd(&w, &modes, 3).unwrap();
        let x = rand((7, 20), 3).reshape((1, 7, 20)).unwrap();
        let y = contract(&x, &t.cores, &modes).unwrap();
        let d = dense(&t.cores, &modes, &Device::Cpu).unwrap();
        let want = x.broadcast_matmul(&d.t().unwrap()).unwrap();
        let diff = (y - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
