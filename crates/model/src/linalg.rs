//! Dense linear algebra on weight matrices through faer (in f64): exact and randomised truncated SVD, for
//! spectra and for inits built from principal components (PiSSA, EVA, LoftQ).

use candle_core::{DType, Device, Tensor};
use factune_io::{Error, Result};
use faer::{Mat, MatRef};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub(crate) fn to_faer(t: &Tensor) -> Result<Mat<f64>> {
    let (m, n) = t.dims2()?;
    let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat::from_fn(m, n, |i, j| data[i * n + j]))
}

fn to_tensor(m: MatRef<'_, f64>, dev: &Device) -> Result<Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)] as f32);
        }
    }
    Ok(Tensor::from_vec(v, (r, c), dev)?)
}

/// The top `r` singular triplets of a matrix `[m, n]`: `u: [m, r]`, `s` (largest first), `vt: [r, n]`.
pub struct TruncatedSvd {
    pub u: Tensor,
    pub s: Vec<f64>,
    pub vt: Tensor,
}

fn svd_err(m: usize, n: usize, e: impl std::fmt::Debug) -> Error {
    Error::config(format!(
        "SVD of a [{m}, {n}] matrix did not converge: {e:?}"
    ))
}

fn truncate(
    u: MatRef<'_, f64>,
    s: Vec<f64>,
    v: MatRef<'_, f64>,
    r: usize,
    dev: &Device,
) -> Result<TruncatedSvd> {
    Ok(TruncatedSvd {
        u: to_tensor(u.subcols(0, r), dev)?,
        s: s[..r].to_vec(),
        vt: to_tensor(v.subcols(0, r).transpose(), dev)?,
    })
}

/// Exact thin SVD, truncated to `r`.
pub fn svd_top(t: &Tensor, r: usize) -> Result<TruncatedSvd> {
    let a = to_faer(t)?;
    let (m, n) = (a.nrows(), a.ncols());
    let svd = a.thin_svd().map_err(|e| svd_err(m, n, e))?;
    let s: Vec<f64> = (0..m.min(n)).map(|i| svd.S()[i]).collect();
    truncate(svd.U(), s, svd.V(), r.min(m.min(n)), t.device())
}

/// Randomised truncated SVD (Halko, Martinsson & Tropp): a range sketch of `r + 8` random directions refined
/// by `niter` power iterations (each re-orthonormalised), then an exact SVD of the small projected matrix.
/// Costs O(m·n·(r+8)·(2·niter+2)) instead of a full SVD; accurate when the spectrum decays past `r`.
pub fn svd_top_randomized(
    t: &Tensor,
    r: usize,
    niter: usize,
    rng: &mut ChaCha8Rng,
) -> Result<TruncatedSvd> {
    let a = to_faer(t)?;
    let (m, n) = (a.nrows(), a.ncols());
    let q = (r + 8).min(m.min(n));
    let omega = Mat::<f64>::from_fn(n, q, |_, _| rng.random_range(-1.0..1.0));
    let orth = |x: Mat<f64>| x.qr().compute_thin_Q();
    let mut basis = orth(&a * &omega);
    for _ in 0..niter {
        let z = orth(a.transpose() * &basis);
        basis = orth(&a * &z);
    }
    let small = basis.transpose() * &a;
    let svd = small.thin_svd().map_err(|e| svd_err(m, n, e))?;
    let u = &basis * svd.U();
    let s: Vec<f64> = (0..q).map(|i| svd.S()[i]).collect();
    truncate(u.as_ref(), s, svd.V(), r.min(q), t.device())
}

/// Principal components from streamed second moments: `gram = Σ xxᵀ` (`[dim, dim]`, row-major), `sum = Σ x`
/// over `n` samples. The scatter `gram − n·μμᵀ` is eigendecomposed (f64); returns the top `k` directions as
/// rows (sign: largest-magnitude entry positive), their eigenvalues (squared singular values of the centred
/// data) and the total (the trace), so that `eigenvalue / total` is the explained-variance ratio.
pub fn pca_from_moments(
    gram: &[f64],
    sum: &[f64],
    n: usize,
    k: usize,
) -> Result<(Vec<Vec<f64>>, Vec<f64>, f64)> {
    let dim = sum.len();
    let mean: Vec<f64> = sum.iter().map(|s| s / n.max(1) as f64).collect();
    let scatter = Mat::<f64>::from_fn(dim, dim, |i, j| {
        gram[i * dim + j] - n as f64 * mean[i] * mean[j]
    });
    let total: f64 = (0..dim).map(|i| scatter[(i, i)]).sum();
    let evd = scatter.self_adjoint_eigen(faer::Side::Lower).map_err(|e| {
        Error::config(format!(
            "eigendecomposition of a [{dim}, {dim}] covariance failed: {e:?}"
        ))
    })?;
    let (u, s) = (evd.U(), evd.S());
    // eigenvalues ascending: the top k are the last k
    let mut rows = Vec::with_capacity(k);
    let mut values = Vec::with_capacity(k);
    for c in (0..dim).rev().take(k) {
        let mut v: Vec<f64> = (0..dim).map(|r| u[(r, c)]).collect();
        let big = v
            .iter()
            .cloned()
            .fold(0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
        rows.push(v);
        values.push(s[c].max(0.0));
    }
    Ok((rows, values, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A [40, 30] matrix with singular values 2^-i, built from random orthonormal factors.
    fn decaying() -> (Tensor, Vec<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let g = |r, c, rng: &mut ChaCha8Rng| {
            Mat::<f64>::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0))
        };
        let u = g(40, 30, &mut rng).qr().compute_thin_Q();
        let v = g(30, 30, &mut rng).qr().compute_thin_Q();
        let s: Vec<f64> = (0..30).map(|i| 0.5f64.powi(i)).collect();
        let d = Mat::<f64>::from_fn(30, 30, |i, j| if i == j { s[i] } else { 0.0 });
        let a = &u * &d * v.transpose();
        (to_tensor(a.as_ref(), &Device::Cpu).unwrap(), s)
    }

    fn reconstruct(svd: &TruncatedSvd) -> Tensor {
        let s = Tensor::from_vec(
            svd.s.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            (1, svd.s.len()),
            &Device::Cpu,
        )
        .unwrap();
        svd.u.broadcast_mul(&s).unwrap().matmul(&svd.vt).unwrap()
    }

    #[test]
    fn exact_and_randomised_recover_the_top_directions() {
        let (a, s) = decaying();
        let exact = svd_top(&a, 4).unwrap();
        for (got, want) in exact.s.iter().zip(&s) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let fast = svd_top_randomized(&a, 4, 2, &mut rng).unwrap();
        let (e, f) = (reconstruct(&exact), reconstruct(&fast));
        let d = (e - f)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max(1)
            .unwrap();
        let d = d.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        // Both are the best rank-4 approximation; they agree far below the 5th singular value (1/16).
        assert!(d < 1e-4, "randomised rank-4 approximation off by {d}");
    }
}
