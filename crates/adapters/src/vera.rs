//! VeRA (`peft_type = "VERA"`): one pair of frozen random projections shared by every adapted layer,
//! `A [r, max_in]` and `B [max_out, r]` (Kaiming-uniform from `projection_prng_key`), and per layer two trainable
//! scaling vectors, `ΔW = Λ_b B Λ_d A` with `A`, `B` sliced to the layer's shape, `λ_d ∈ R^r` (init
//! `d_initial`) and `λ_b ∈ R^out` (init 0, so the model is unchanged at step 0). r + out parameters per layer.
//!
//! On disk, as PEFT: `…<module>.vera_lambda_b` / `vera_lambda_d`, and the projections once as `base_model.vera_A`
//! / `base_model.vera_B` (factune always stores them; PEFT files saved without them cannot be restored here,
//! since their values come from PyTorch's generator).

use crate::config::AdapterConfig;
use crate::kaiming_uniform;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Device, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

crate::keys::method_keys! {
    /// VeRA's keys, PEFT's `VeraConfig` names and defaults.
    pub struct VeraConfig {
        /// VeRA: seed of the shared random projections.
        projection_prng_key: u64 = 0,
        /// VeRA: whether the shared projections are stored in the adapter file (factune always stores them).
        save_projection: bool = true,
        /// VeRA: dropout on the adapter input (training takes lora_dropout unless this is given).
        vera_dropout: f64 = 0.0,
        /// VeRA: initial value of the λ_d scaling vectors.
        d_initial: f64 = 0.1,
        /// VeRA: whether the adapter starts as a no-op (λ_b = 0).
        init_weights: bool = true,
    }
}

pub struct Vera {
    /// `λ_b [out]`, `λ_d [r]`.
    pub lambda_b: Var,
    pub lambda_d: Var,
    /// The shared projections, whole (for saving) and sliced to this layer.
    full: (Tensor, Tensor),
    a: Tensor,
    b: Tensor,
    pub dropout: f64,
}

impl LinearAdapter for Vera {
    fn method(&self) -> &'static str {
        "VERA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        _base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let x = crate::adapter_input(x, self.dropout, ctx)?;
        let inp = *x.dims().last().expect("rank >= 1");
        let h = x.reshape(((), inp))?.matmul(&self.a.t()?)?;
        let h = h.broadcast_mul(self.lambda_d.as_tensor())?;
        let d = h
            .matmul(&self.b.t()?)?
            .broadcast_mul(self.lambda_b.as_tensor())?;
        let d = d.reshape(base_out.shape())?;
        base_out + d
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("vera_lambda_b".into(), self.lambda_b.clone()),
            ("vera_lambda_d".into(), self.lambda_d.clone()),
        ]
    }

    fn delta_weight(&self, _base: &FrozenParts) -> candle_core::Result<Tensor> {
        let b = self
            .b
            .broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?;
        let a = self
            .a
            .broadcast_mul(&self.lambda_d.as_tensor().unsqueeze(1)?)?;
        b.matmul(&a)
    }

    fn shared(&self) -> Vec<(String, Tensor)> {
        vec![
            ("vera_A".into(), self.full.0.clone()),
            ("vera_B".into(), self.full.1.clone()),
        ]
    }
}

pub struct VeraMethod;

fn build(
    cfg: &AdapterConfig,
    layer: &AdaptableLinear,
    shared: &HashMap<String, Tensor>,
    lambdas: (Tensor, Tensor),
) -> Result<Box<dyn LinearAdapter>> {
    let (fa, fb) = (&shared["vera_A"], &shared["vera_B"]);
    let (o, i) = (layer.out_features(), layer.in_features());
    let r = lambdas.1.dims1()?;
    let (ra, ia) = fa.dims2()?;
    let (ob, rb) = fb.dims2()?;
    if ra < r || rb < r || ia < i || ob < o {
        return Err(Error::config(format!(
            "`{}` [{o}, {i}] with r = {r} does not fit the shared projections vera_A [{ra}, {ia}] / vera_B [{ob}, {rb}]",
            layer.path
        )));
    }
    if r != cfg.r {
        return Err(Error::config(format!(
            "`{}`: vera_lambda_d has {r} entries but the config's r is {}: the config does not describe these \
             tensors",
            layer.path, cfg.r
        )));
    }
    if lambdas.0.dims1()? != o {
        return Err(Error::config(format!(
            "`{}`: vera_lambda_b has {} entries, the layer has {o} outputs",
            layer.path,
            lambdas.0.dims1()?
        )));
    }
    Ok(Box::new(Vera {
        a: fa.narrow(0, 0, r)?.narrow(1, 0, i)?.contiguous()?,
        b: fb.narrow(0, 0, o)?.narrow(1, 0, r)?.contiguous()?,
        full: (fa.clone(), fb.clone()),
        lambda_b: Var::from_tensor(&lambdas.0)?,
        lambda_d: Var::from_tensor(&lambdas.1)?,
        dropout: cfg.dropout(),
    }))
}

impl Method for VeraMethod {
    fn peft_type(&self) -> &'static str {
        "VERA"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for VeraMethod {
    fn tensor_names(&self, _cfg: &AdapterConfig) -> Vec<&'static str> {
        vec!["vera_lambda_b", "vera_lambda_d"]
    }

    fn shared_names(&self) -> &'static [&'static str] {
        &["vera_A", "vera_B"]
    }

    fn init_shared(
        &self,
        cfg: &AdapterConfig,
        shapes: &[(usize, usize)],
        dev: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let (max_out, max_in) = shapes
            .iter()
            .fold((0, 0), |(mo, mi), &(o, i)| (mo.max(o), mi.max(i)));
        let own: &VeraConfig = cfg.options()?;
        let mut rng = ChaCha8Rng::seed_from_u64(own.projection_prng_key);
        let r = cfg.r;
        Ok(HashMap::from([
            (
                "vera_A".to_string(),
                kaiming_uniform(&[r, max_in], max_in, &mut rng, dev)?,
            ),
            (
                "vera_B".to_string(),
                kaiming_uniform(&[max_out, r], r, &mut rng, dev)?,
            ),
        ]))
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        rank: usize,
        _alpha: f64,
        _rng: &mut ChaCha8Rng,
        shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        if rank != cfg.r {
            return Err(Error::config(format!(
                "`{}`: VeRA shares one projection pair, so every layer has r = {} (rank_pattern does not apply)",
                layer.path, cfg.r
            )));
        }
        let dev = layer.base.weight.device().clone();
        let own: &VeraConfig = cfg.options()?;
        let d = Tensor::full(own.d_initial as f32, rank, &dev)?;
        let b = Tensor::zeros(layer.out_features(), DType::F32, &dev)?;
        build(cfg, layer, shared, (b, d))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        build(
            cfg,
            layer,
            t,
            (t["vera_lambda_b"].clone(), t["vera_lambda_d"].clone()),
        )
    }
}
