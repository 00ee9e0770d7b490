//! Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
//! high-ranking singular vectors of a tuned weight that resemble none of the pre-trained weight's. Low-rank
//! updates make them, full fine-tuning mostly does not, and they go with forgetting; scaling them down (the
//! paper's remedy, PEFT's `reduce_intruder_dimension`) trades some task accuracy for recovered knowledge.

use crate::linalg::to_faer;
use candle_core::Tensor;
use factune_io::{Error, Result};
use faer::Mat;

/// One layer's comparison of a tuned weight `W` with its pre-trained `W₀`.
#[derive(Debug, Clone)]
pub struct LayerIntruders {
    /// For each of `W`'s top-k left singular vectors (largest singular value first): its largest absolute
    /// cosine similarity with any left singular vector of `W₀`.
    pub similarity: Vec<f64>,
    /// `W`'s top-k singular values.
    pub singular_values: Vec<f64>,
    /// `W`'s top-k singular triplets, for [`LayerIntruders::reduced`].
    u: Mat<f64>,
    v: Mat<f64>,
    w: Mat<f64>,
}

fn thin_svd(m: &Mat<f64>) -> Result<faer::linalg::solvers::Svd<f64>> {
    m.thin_svd().map_err(|e| {
        Error::config(format!(
            "SVD of a [{}, {}] matrix did not converge: {e:?}",
            m.nrows(),
            m.ncols()
        ))
    })
}

impl LayerIntruders {
    /// Compares `tuned` with `original` (both `[out, in]`) over `tuned`'s top `top_k` singular vectors (at
    /// most `min(out, in)` of them).
    pub fn of(original: &Tensor, tuned: &Tensor, top_k: usize) -> Result<Self> {
        if original.dims() != tuned.dims() {
            return Err(Error::config(format!(
                "tuned weight {:?} and pre-trained weight {:?} differ in shape",
                tuned.dims(),
                original.dims()
            )));
        }
        let (w0, w) = (to_faer(original)?, to_faer(tuned)?);
        let base = thin_svd(&w0)?;
        let svd = thin_svd(&w)?;
        let k = top_k.min(w.nrows().min(w.ncols()));
        let (u, v) = (svd.U().subcols(0, k), svd.V().subcols(0, k));
        let cos = u.transpose() * base.U();
        let similarity = (0..k)
            .map(|i| (0..cos.ncols()).fold(0f64, |m, j| m.max(cos[(i, j)].abs())))
            .collect();
        Ok(LayerIntruders {
            similarity,
            singular_values: (0..k).map(|i| svd.S()[i]).collect(),
            u: u.to_owned(),
            v: v.to_owned(),
            w,
        })
    }

    /// Positions (among the top k) of the intruders at threshold `epsilon`.
    pub fn intruders(&self, epsilon: f64) -> Vec<usize> {
        (0..self.similarity.len())
            .filter(|&i| self.similarity[i] < epsilon)
            .collect()
    }

    /// The tuned weight with each intruder's singular value scaled by `lambda` (PEFT's
    /// `mitigation_lambda`: 1 keeps it, 0 removes it): `W + (λ − 1) Σ σᵢ uᵢ vᵢᵀ` over the intruders.
    pub fn reduced(&self, epsilon: f64, lambda: f64) -> Result<Tensor> {
        let mut w = self.w.clone();
        for i in self.intruders(epsilon) {
            let c = (lambda - 1.0) * self.singular_values[i];
            let (u, v) = (self.u.col(i), self.v.col(i));
            w += Mat::<f64>::from_fn(w.nrows(), w.ncols(), |r, s| c * u[r] * v[s]);
        }
        let (m, n) = (w.nrows(), w.ncols());
        let data: Vec<f32> = (0..m * n).map(|x| w[(x / n, x % n)] as f32).collect();
        Ok(Tensor::from_vec(data, (m, n), &candle_core::Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_new_direction_is_an_intruder_and_a_rescaled_one_is_not() {
        let dev = Device::Cpu;
        // W₀ = diag(3, 2, 1) on the first three coordinates of a 4 × 4 space; the tuned weight adds a strong
        // direction e₄ e₄ᵀ (new) and grows e₁ (kept).
        let w0 = Tensor::new(
            &[
                [3f32, 0., 0., 0.],
                [0., 2., 0., 0.],
                [0., 0., 1., 0.],
                [0., 0., 0., 0.],
            ],
            &dev,
        )
        .unwrap();
        let w = Tensor::new(
            &[
                [4f32, 0., 0., 0.],
                [0., 2., 0., 0.],
                [0., 0., 1., 0.],
                [0., 0., 0., 5.],
            ],
            &dev,
        )
        .unwrap();
        // W₀'s fourth left singular vector is e₄ too (the null space completes the basis), so compare against
        // a W₀ whose null direction is mixed: rotate coordinates 3 and 4 of W₀ by 45°.
        let s = std::f32::consts::FRAC_1_SQRT_2;
        let rot = Tensor::new(
            &[
                [1f32, 0., 0., 0.],
                [0., 1., 0., 0.],
                [0., 0., s, -s],
                [0., 0., s, s],
            ],
            &dev,
        )
        .unwrap();
        let w0 = rot.matmul(&w0).unwrap().matmul(&rot.t().unwrap()).unwrap();
        let li = LayerIntruders::of(&w0, &w, 2).unwrap();
        assert_eq!(li.singular_values.len(), 2);
        assert!((li.singular_values[0] - 5.0).abs() < 1e-9);
        // the top vector e₄ meets W₀'s rotated basis at cos 1/√2 at best; the second (e₁) matches exactly
        assert!(
            (li.similarity[0] - s as f64).abs() < 1e-6,
            "{:?}",
            li.similarity
        );
        assert!((li.similarity[1] - 1.0).abs() < 1e-9);
        assert_eq!(li.intruders(0.8), vec![0]);
        assert!(li.intruders(0.5).is_empty());
        let r = li.reduced(0.8, 0.2).unwrap();
        let r: Vec<Vec<f32>> = r.to_vec2().unwrap();
        assert!((r[3][3] - 1.0).abs() < 1e-6 && (r[0][0] - 4.0).abs() < 1e-6);
        assert!(LayerIntruders::of(&w0, &w.narrow(0, 0, 3).unwrap(), 2).is_err());
    }
}
