//! Test helpers shared by the kernel tests, `attention`'s, and the model's attention module.

use crate::linear::BaseWeight;
use candle_core::{Device, Result, Tensor, Var};

pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill, so the test does not depend on candle's RNG.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Compares a fused op and its reference: outputs, and the gradient of a weighted sum w.r.t. the input.
pub fn check(
    fused: impl Fn(&Tensor) -> Result<Tensor>,
    reference: impl Fn(&Tensor) -> Result<Tensor>,
    shape: &[usize],
) {
    let x = Var::from_tensor(&rand(shape, 1)).unwrap();
    let yf = fused(x.as_tensor()).unwrap();
    let yr = reference(x.as_tensor()).unwrap();
    assert!(
        max_diff(&yf, &yr) < 1e-5,
        "forward differs by {}",
        max_diff(&yf, &yr)
    );
    let probe = rand(yf.dims(), 2);
    let gf = (yf * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gr = (yr * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (gf, gr) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
    assert!(
        max_diff(gf, gr) < 1e-4,
        "backward differs by {}",
        max_diff(gf, gr)
    );
}

/// How a test's frozen weight is held.
#[derive(Clone, Copy)]
pub enum Held {
    F32,
    Nf4,
    Bf16,
}

impl Held {
    pub fn weight(self, w: &Tensor) -> BaseWeight {
        match self {
            Held::F32 => BaseWeight::Dense(w.clone()),
            Held::Nf4 => BaseWeight::nf4(w, false).unwrap(),
            Held::Bf16 => BaseWeight::Dense(w.to_dtype(candle_core::DType::BF16).unwrap()),
        }
    }
}
