//! SAID (`peft_type = "SAID"`; Aghajanyan et al. 2021, "Intrinsic dimensionality explains the effectiveness of
//! language model fine-tuning"): every targeted weight becomes `W = W₀ + λ_i · P_i θ`, with one trainable θ
//! shared by all m targeted layers, `P_i` a Fastfood projection of the layer's own (seeded by `fastfood_seed`
//! and the module path; `factune_model::kernels::fastfood`) and `λ_i` one trainable scale per layer (init 1).
//! `intrinsic_dimension` d counts every trained value, so θ has d − m entries; `structure_aware = false` fixes
//! λ at 1 and gives θ all d (the paper's plain DID). θ starts at zero: the model is unchanged at step 0.
//!
//! Where it differs from the paper: only the targeted linear weights are projected (`target_modules`, as for
//! LoRA); embeddings, norms and biases stay frozen. Not a PEFT method: saved in PEFT's layout under factune's
//! own type, θ once as `base_model.said_theta` and `…<module>.said_lambda` per layer; `factune merge` turns
//! it into a plain model.

use crate::config::AdapterConfig;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Device, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::kernels::{said_weight, Fastfood};
use factune_model::{AdaptableLinear, BaseWeight, Ctx, FrozenParts, LinearAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

crate::keys::method_keys! {
    /// SAID's keys (factune's names: PEFT has no SAID).
    pub struct SaidConfig {
        /// SAID: the intrinsic dimension d, every trained value (θ and the per-layer scales λ).
        intrinsic_dimension: usize = 1000,
        /// SAID: one trained scale λ per projected layer (structure-aware); false trains θ alone (DID).
        structure_aware: bool = true,
        /// SAID: seed of the Fastfood projections' signs, permutations and Gaussian scales.
        fastfood_seed: u64 = 0,
    }
}

const THETA: &str = "said_theta";
const LAMBDA: &str = "said_lambda";

pub struct Said {
    /// θ, the one variable every layer's adapter holds.
    theta: Var,
    /// λ `[1]`: trained (structure-aware) or fixed at 1.
    lambda: Var,
    trained_lambda: bool,
    ff: Arc<Fastfood>,
}

impl Said {
    fn weight(&self, w0: &Tensor) -> candle_core::Result<Tensor> {
        said_weight(self.theta.as_tensor(), &self.lambda(), w0, &self.ff)
    }

    fn lambda(&self) -> Tensor {
        match self.trained_lambda {
            true => self.lambda.as_tensor().clone(),
            false => self.lambda.as_detached_tensor(),
        }
    }
}

impl LinearAdapter for Said {
    fn method(&self) -> &'static str {
        "SAID"
    }

    /// Over a base that is not dense (never built: SAID refuses a 4-bit base); kept for the trait's fallback.
    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        base: &FrozenParts,
        _ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let inp = *x.dims().last().expect("rank >= 1");
        let d = x
            .reshape(((), inp))?
            .matmul(&self.delta_weight(base)?.t()?)?
            .reshape(base_out.shape())?;
        base_out + d
    }

    /// One matmul with the projected weight: `x (W₀ + λ P θ)ᵀ (+ b)`.
    fn forward_fused(
        &self,
        x: &Tensor,
        base: &FrozenParts,
        _ctx: &Ctx,
    ) -> Option<candle_core::Result<Tensor>> {
        let BaseWeight::Dense(w0) = &base.weight else {
            return None;
        };
        Some((|| {
            let w = self.weight(w0)?;
            let mut dims = x.dims().to_vec();
            let inp = dims.pop().expect("rank >= 1");
            dims.push(w.dims()[0]);
            let y = x.reshape(((), inp))?.matmul(&w.t()?)?;
            let y = match &base.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                None => y,
            };
            y.reshape(dims)
        })())
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        match self.trained_lambda {
            true => vec![(LAMBDA.into(), self.lambda.clone())],
            false => Vec::new(),
        }
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        match self.trained_lambda {
            true => Vec::new(),
            false => vec![(LAMBDA.into(), self.lambda.as_detached_tensor())],
        }
    }

    fn shared_parameters(&self) -> Vec<(String, Var)> {
        vec![(THETA.into(), self.theta.clone())]
    }

    fn delta_weight(&self, base: &FrozenParts) -> candle_core::Result<Tensor> {
        let (o, i) = base.weight.dims();
        let zero = Tensor::zeros((o, i), DType::F32, self.theta.device())?;
        self.weight(&zero)
    }
}

/// FNV-1a of the module path: each layer's projection differs, and is the same wherever the model is loaded.
fn path_seed(seed: u64, path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn build(
    cfg: &AdapterConfig,
    layer: &AdaptableLinear,
    theta: &Tensor,
    lambda: &Tensor,
) -> Result<Box<dyn LinearAdapter>> {
    let own: &SaidConfig = cfg.options()?;
    if !matches!(layer.base.weight, BaseWeight::Dense(_)) {
        return Err(Error::config(format!(
            "`{}`: SAID projects into the dense weight; a 4-bit (NF4) base cannot hold W₀ + λ·Pθ",
            layer.path
        )));
    }
    if lambda.elem_count() != 1 {
        return Err(Error::config(format!(
            "`{}`: {LAMBDA} has shape {:?}, expected [1]",
            layer.path,
            lambda.dims()
        )));
    }
    let d = theta.dims1()?;
    let dd = layer.out_features() * layer.in_features();
    let ff = Fastfood::new(d, dd, path_seed(own.fastfood_seed, &layer.path))?;
    Ok(Box::new(Said {
        theta: Var::from_tensor(theta)?,
        lambda: Var::from_tensor(&lambda.reshape(1)?)?,
        trained_lambda: own.structure_aware,
        ff: Arc::new(ff),
    }))
}

/// θ's length for layers of `shapes` (d less one scale per layer, structure-aware), or why d does not fit.
pub fn theta_len(own: &SaidConfig, shapes: &[(usize, usize)]) -> Result<usize> {
    let (d, m) = (own.intrinsic_dimension, shapes.len());
    let total: usize = shapes.iter().map(|&(o, i)| o * i).sum();
    if d > total {
        return Err(Error::config(format!(
            "intrinsic_dimension {d} exceeds the {total} parameters of the {m} targeted layers it projects into"
        )));
    }
    match own.structure_aware {
        true if d <= m => Err(Error::config(format!(
            "intrinsic_dimension {d} must exceed the {m} targeted layers: structure-aware SAID trains one scale \
             per layer out of d (set structure_aware = false for θ alone, or target fewer modules)"
        ))),
        true => Ok(d - m),
        false => Ok(d),
    }
}

pub struct SaidMethod;

impl Method for SaidMethod {
    fn peft_type(&self) -> &'static str {
        "SAID"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for SaidMethod {
    fn tensor_names(&self, _cfg: &AdapterConfig) -> Vec<&'static str> {
        vec![LAMBDA]
    }

    fn shared_names(&self) -> &'static [&'static str] {
        &[THETA]
    }

    fn trains_shared(&self) -> bool {
        true
    }

    /// θ's length is d less one scale per targeted layer: a file whose θ does not match its own config (or
    /// that is loaded onto other layers) is refused.
    fn check_shared(
        &self,
        cfg: &AdapterConfig,
        shapes: &[(usize, usize)],
        shared: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let want = theta_len(cfg.options()?, shapes)?;
        let got = shared[THETA].dims();
        if got != [want] {
            return Err(Error::config(format!(
                "base_model.{THETA} has shape {got:?}; intrinsic_dimension {} over {} targeted layers needs [{want}]",
                cfg.options::<SaidConfig>()?.intrinsic_dimension,
                shapes.len()
            )));
        }
        Ok(())
    }

    /// θ at zero, as one variable; d checked against the layers it projects into.
    fn init_shared(
        &self,
        cfg: &AdapterConfig,
        shapes: &[(usize, usize)],
        dev: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let theta_len = theta_len(cfg.options()?, shapes)?;
        let theta = Var::zeros(theta_len, DType::F32, dev)?;
        Ok(HashMap::from([(
            THETA.to_string(),
            theta.as_tensor().clone(),
        )]))
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _rank: usize,
        _alpha: f64,
        _rng: &mut ChaCha8Rng,
        shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let one = Tensor::ones(1, DType::F32, layer.base.weight.device())?;
        build(cfg, layer, &shared[THETA], &one)
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        build(cfg, layer, &t[THETA], &t[LAMBDA])
    }
}
