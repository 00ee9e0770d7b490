//! PiSSA (`init_lora_weights = "pissa"` or `"pissa_niter_K"`): LoRA factors initialised from the top-r
//! singular triplets of W, `A = √(S_r/s) V_rᵀ`, `B = U_r √(S_r/s)`, and the frozen weight replaced by the
//! residual `W − s·BA`, so the model is unchanged at step 0 but training moves the principal directions.
//!
//! On disk, as PEFT: the native form keeps `init_lora_weights` and the trained A/B, and loading recomputes
//! the residual from the base weight (exact SVD is deterministic; the randomised sketch is seeded by the
//! layer's index, so factune reproduces its own). The portable form, written at the end of training, is a
//! plain LoRA of rank 2r relative to the original W: `ΔW = s(B'A' − B₀A₀) = s[B' −B₀][A'; A₀]`.

use crate::config::AdapterConfig;
use candle_core::{DType, Tensor};
use factune_io::{Error, Result};
use factune_model::linalg::{svd_top, svd_top_randomized};
use factune_model::AdaptableLinear;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// How the top singular triplets are found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Svd {
    Exact,
    Randomized { niter: usize },
}

/// The PiSSA variant `init_lora_weights` names, `None` when it names no PiSSA init.
pub fn variant(init: &Value) -> Result<Option<Svd>> {
    let Value::String(s) = init else {
        return Ok(None);
    };
    if s == "pissa" {
        return Ok(Some(Svd::Exact));
    }
    match s.strip_prefix("pissa_niter_") {
        Some(k) => k
            .parse()
            .map(|niter| Some(Svd::Randomized { niter }))
            .map_err(|_| {
                Error::config(format!(
                    "init_lora_weights `{s}`: expected pissa_niter_<number of power iterations>"
                ))
            }),
        None => Ok(None),
    }
}

/// Computes PiSSA's factors for `layer` (rank `r`, scale `s`), replaces its weight with the residual and
/// returns `(A [r, in], B [out, r])`.
pub fn init(
    layer: &mut AdaptableLinear,
    r: usize,
    scale: f64,
    svd: Svd,
) -> Result<(Tensor, Tensor)> {
    let w = layer.base.weight.dense()?.to_dtype(DType::F32)?;
    let t = match svd {
        Svd::Exact => svd_top(&w, r)?,
        Svd::Randomized { niter } => {
            let mut rng = ChaCha8Rng::seed_from_u64(0x9155A ^ layer.index as u64);
            svd_top_randomized(&w, r, niter, &mut rng)?
        }
    };
    let dev = w.device();
    let root: Vec<f32> = t.s.iter().map(|&s| (s / scale).sqrt() as f32).collect();
    let root_col = Tensor::from_vec(root.clone(), (r, 1), dev)?;
    let root_row = Tensor::from_vec(root, (1, r), dev)?;
    let a = t.vt.broadcast_mul(&root_col)?;
    let b = t.u.broadcast_mul(&root_row)?;
    let residual = (&w - (b.matmul(&a)? * scale)?)?;
    layer.base.replace_weight(residual)?;
    Ok((a, b))
}

/// The portable form of a trained PiSSA adapter: rank-2r LoRA factors relative to the original weight, and
/// the config PEFT writes for it (`init_lora_weights = true`, r and α doubled — √2·α under rsLoRA — so the
/// scale is unchanged). `initial` are the factors PiSSA started from.
pub fn to_lora(
    trained: (&Tensor, &Tensor),
    initial: (&Tensor, &Tensor),
) -> Result<(Tensor, Tensor)> {
    let a = Tensor::cat(&[trained.0, initial.0], 0)?;
    let b = Tensor::cat(&[trained.1, &initial.1.neg()?], 1)?;
    Ok((a, b))
}

pub fn lora_config(cfg: &AdapterConfig) -> AdapterConfig {
    let mut out = cfg.clone();
    out.init_lora_weights = Value::Bool(true);
    out.r *= 2;
    let f = if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
    out.lora_alpha *= f;
    for r in out.rank_pattern.values_mut() {
        if let crate::config::RankEntry::Rank(n) = r {
            *n *= 2;
        }
    }
    out.alpha_pattern.values_mut().for_each(|a| *a *= f);
    out
}
