//! Parameter-efficient adapters for factune models, in PEFT's layout: one file per method family
//! (config, init, forward, merge), a registry by `peft_type`, and the PEFT on-disk format.

pub mod adalora;
pub mod analysis;
pub mod config;
pub mod dora;
pub mod eva;
pub mod glora;
pub mod hooks;
pub mod keys;
pub mod loftq;
pub mod lora;
pub mod lqlora;
pub mod method_config;
pub mod mpo;
pub mod multi;
pub mod multilora;
pub mod p_tuning;
pub mod peft;
pub mod pissa;
pub mod prefix_tuning;
pub mod prompt_learning;
pub mod prompt_tuning;
pub mod registry;
pub mod rosa;
pub mod said;
pub mod targets;
pub mod vera;
pub mod weighted;

pub use config::{AdapterConfig, RankEntry, TargetModules};
pub use method_config::MethodConfig;
pub use peft::{attach, load, save, trainable, trainable_summary, LoadReport};

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// PyTorch's `kaiming_uniform_(a=√5)` as `nn.Linear` uses it: U(−1/√fan_in, 1/√fan_in).
pub(crate) fn kaiming_uniform(
    shape: &[usize],
    fan_in: usize,
    rng: &mut ChaCha8Rng,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(v, shape, dev)
}

/// Inverted dropout with a seeded mask (the fused LoRA kernel regenerates the same one), so training runs are
/// reproducible bit for bit.
pub(crate) fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    x.mul(&factune_model::kernels::Dropout { p, seed }.mask_like(x)?)
}

/// The adapter path's input: `x` with dropout `p` while training, `x` itself otherwise.
pub(crate) fn adapter_input(
    x: &Tensor,
    p: f64,
    ctx: &factune_model::Ctx,
) -> candle_core::Result<Tensor> {
    if ctx.train && p > 0.0 {
        dropout(x, p, ctx.dropout_seed)
    } else {
        Ok(x.clone())
    }
}

/// `N(0, std²)` values by Box–Muller from the seeded generator.
pub(crate) fn normal(
    shape: &[usize],
    std: f32,
    rng: &mut ChaCha8Rng,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    use rand::Rng;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u, w): (f32, f32) = (rng.random::<f32>().max(f32::MIN_POSITIVE), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * w).cos() * std
        })
        .collect();
    Tensor::from_vec(v, shape, dev)
}
