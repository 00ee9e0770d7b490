//! Helpers shared by the adapter test binaries (each uses some of them, hence the allow).
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::path::PathBuf;

/// A file or directory under tests/fixtures (e.g. `llama`, `llama-vera`, `nf4-reference.safetensors`).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Fixed token ids inside every fixture model's vocabulary.
pub fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 99, 5, 250, 31, 8]], &Device::Cpu).unwrap()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}
