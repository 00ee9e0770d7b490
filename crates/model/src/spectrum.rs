//! Singular-value spectra of weight matrices and of updates `ΔW`: how many directions an update really uses.
//! ReLoRA's claim (a sum of rank-r updates reaching rank > r) and the analysis tools read these numbers.

use crate::Model;
use candle_core::{DType, Tensor};
use factune_io::{Error, Result, Weights};
use serde::Serialize;

/// Singular values of a 2-D tensor, largest first, computed in f64 with faer.
pub fn singular_values(t: &Tensor) -> Result<Vec<f64>> {
    let (m, n) = t.dims2()?;
    crate::linalg::to_faer(t)?.singular_values().map_err(|e| {
        Error::config(format!(
            "SVD of a [{m}, {n}] matrix did not converge: {e:?}"
        ))
    })
}

/// A spectrum and the rank measures derived from it.
#[derive(Debug, Clone, Serialize)]
pub struct Spectrum {
    pub singular_values: Vec<f64>,
}

impl Spectrum {
    pub fn of(t: &Tensor) -> Result<Self> {
        Ok(Spectrum {
            singular_values: singular_values(t)?,
        })
    }

    /// The spectrum of `s·B·A` (`B: [out, r]`, `A: [r, in]`) from its factors: with `B = Q₁R₁` and
    /// `Aᵀ = Q₂R₂`, `s·B·A = Q₁ (s·R₁R₂ᵀ) Q₂ᵀ` has the singular values of the `r × r` core, so a layer costs
    /// O((out + in)·r²) instead of an SVD of `[out, in]`.
    pub fn of_factors(b: &Tensor, a: &Tensor, scale: f64) -> Result<Self> {
        let r1 = crate::linalg::to_faer(b)?.qr().R().to_owned();
        let r2 = crate::linalg::to_faer(&a.t()?)?.qr().R().to_owned();
        let core = (r1 * r2.transpose()) * faer::Scale(scale);
        let svd = core.singular_values().map_err(|e| {
            Error::config(format!(
                "SVD of a rank-{} core did not converge: {e:?}",
                b.dims()[1]
            ))
        })?;
        Ok(Spectrum {
            singular_values: svd,
        })
    }

    /// Number of singular values above `rel_tol · σ₁` (zero for a zero matrix). f32 rounding in `W₁ − W₀`
    /// sits near 1e-7 · σ₁, so a tolerance of 1e-4 counts real directions only.
    pub fn rank(&self, rel_tol: f64) -> usize {
        let top = self.singular_values.first().copied().unwrap_or(0.0);
        if top == 0.0 {
            return 0;
        }
        self.singular_values
            .iter()
            .filter(|&&s| s > rel_tol * top)
            .count()
    }

    /// Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values.
    pub fn effective_rank(&self) -> f64 {
        let total: f64 = self.singular_values.iter().sum();
        if total == 0.0 {
            return 0.0;
        }
        let h: f64 = self
            .singular_values
            .iter()
            .map(|s| s / total)
            .filter(|&p| p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        h.exp()
    }

    /// Fraction of the squared Frobenius norm in the top `k` directions.
    pub fn energy_in_top(&self, k: usize) -> f64 {
        let total: f64 = self.singular_values.iter().map(|s| s * s).sum();
        if total == 0.0 {
            return 1.0;
        }
        self.singular_values
            .iter()
            .take(k)
            .map(|s| s * s)
            .sum::<f64>()
            / total
    }
}

/// The spectra as JSON, per module: rank (at `rel_tol`), effective rank, energy in the top `r` directions and
/// at every rank `1..=r`, and all singular values.
pub fn spectra_json(spectra: &[(String, Spectrum)], r: usize, rel_tol: f64) -> serde_json::Value {
    let rows: Vec<_> = spectra
        .iter()
        .map(|(module, s)| {
            serde_json::json!({
                "module": module,
                "rank": s.rank(rel_tol),
                "effective_rank": s.effective_rank(),
                "energy_in_top_r": s.energy_in_top(r),
                "energy_at_rank": (1..=r).map(|k| s.energy_in_top(k)).collect::<Vec<_>>(),
                "singular_values": s.singular_values,
            })
        })
        .collect();
    serde_json::json!({"rank_rel_tol": rel_tol, "adapter_r": r, "modules": rows})
}

/// The spectrum of `W − W₀` for every linear layer, with `W₀` read from `original` (the checkpoint the model
/// was loaded from). Linear layers must not carry unmerged adapters.
pub fn update_spectra(model: &Model, original: &Weights) -> Result<Vec<(String, Spectrum)>> {
    let mut out = Vec::new();
    for l in model.linears() {
        if l.adapter.is_some() {
            return Err(Error::config(format!(
                "`{}` still has an adapter: merge it before measuring the update",
                l.path
            )));
        }
        let w = l.base.weight.dense()?.to_dtype(DType::F32)?;
        let w0 = l.original_weight(original)?;
        out.push((l.path.clone(), Spectrum::of(&(w - w0)?)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rank_of_a_sum_of_outer_products() {
        // u vᵀ + 0.5 · w zᵀ with orthogonal pieces: singular values exactly 1·|u||v| and 0.5·|w||z|.
        let dev = Device::Cpu;
        let u = Tensor::new(&[[1f32], [0.], [0.], [0.]], &dev).unwrap();
        let v = Tensor::new(&[[0f32, 2., 0.]], &dev).unwrap();
        let w = Tensor::new(&[[0f32], [3.], [0.], [0.]], &dev).unwrap();
        let z = Tensor::new(&[[1f32, 0., 0.]], &dev).unwrap();
        let m = (u.matmul(&v).unwrap() + (w.matmul(&z).unwrap() * 0.5).unwrap()).unwrap();
        let s = Spectrum::of(&m).unwrap();
        assert_eq!(s.singular_values.len(), 3);
        assert!((s.singular_values[0] - 2.0).abs() < 1e-12);
        assert!((s.singular_values[1] - 1.5).abs() < 1e-12);
        assert!(s.singular_values[2].abs() < 1e-12);
        assert_eq!(s.rank(1e-4), 2);
        assert!((s.energy_in_top(1) - 4.0 / 6.25).abs() < 1e-12);
        let p = [2.0 / 3.5, 1.5 / 3.5];
        let want = (-(p[0] * f64::ln(p[0]) + p[1] * f64::ln(p[1]))).exp();
        assert!((s.effective_rank() - want).abs() < 1e-12);
        let zero = Spectrum::of(&Tensor::zeros((2, 2), DType::F32, &dev).unwrap()).unwrap();
        assert_eq!(zero.rank(1e-4), 0);
        // from factors: the same numbers as the dense product, scaled
        let b = Tensor::cat(&[&u, &w], 1).unwrap();
        let a = Tensor::cat(&[&v, &(z * 0.5).unwrap()], 0).unwrap();
        let f = Spectrum::of_factors(&b, &a, 2.0).unwrap();
        assert_eq!(f.singular_values.len(), 2);
        assert!((f.singular_values[0] - 4.0).abs() < 1e-9);
        assert!((f.singular_values[1] - 3.0).abs() < 1e-9);
    }
}
