//! LoRA (and rsLoRA, which only changes the scale): `y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ`,
//! `A: [r, in]`, `B: [out, r]`, `s = α/r` (`α/√r` with rsLoRA).

use crate::config::AdapterConfig;
use crate::dora::Dora;
use crate::kaiming_uniform;
use crate::registry::{Attachment, LinearMethod, Method};
use crate::{loftq, pissa};
use candle_core::{Tensor, Var};
use factune_io::{Error, Result};
use factune_model::kernels;
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter, Model};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

crate::keys::method_keys! {
    /// LoRA's own keys: none beyond the ones every method shares ([`AdapterConfig`]'s `r`, `lora_alpha`,
    /// `use_rslora`, `use_dora`, `init_lora_weights`, …), which are PEFT's `LoraConfig`.
    pub struct LoraOptions {}
}

pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// `dropout(x) Aᵀ Bᵀ`, unscaled, shaped like the layer's output.
    pub fn delta(
        &self,
        x: &Tensor,
        out_shape: &candle_core::Shape,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let inp = *x.dims().last().expect("rank >= 1");
        let x = crate::adapter_input(x, self.dropout, ctx)?;
        let h = x.reshape(((), inp))?.matmul(&self.a.t()?)?;
        h.matmul(&self.b.t()?)?.reshape(out_shape)
    }
}

impl Lora {
    /// The dropout the fused kernels apply to the adapter input while training (the mask `adapter_input`
    /// draws, from the same seed), `None` when evaluating or without dropout.
    pub fn train_dropout(&self, ctx: &Ctx) -> Option<kernels::Dropout> {
        (ctx.train && self.dropout > 0.0).then_some(kernels::Dropout {
            p: self.dropout,
            seed: ctx.dropout_seed,
        })
    }
}

impl LinearAdapter for Lora {
    fn method(&self) -> &'static str {
        "LORA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        _base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let d = self.delta(x, base_out.shape(), ctx)?;
        base_out + (d * self.scale)?
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_B.weight".into(), self.b.clone()),
        ]
    }

    fn low_rank_factors(&self) -> Option<(Tensor, Tensor, f64)> {
        Some((
            self.b.as_tensor().clone(),
            self.a.as_tensor().clone(),
            self.scale,
        ))
    }

    fn delta_weight(&self, _base: &FrozenParts) -> candle_core::Result<Tensor> {
        self.b.matmul(self.a.as_tensor())? * self.scale
    }

    fn forward_fused(
        &self,
        x: &Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> Option<candle_core::Result<Tensor>> {
        kernels::lora_linear(
            x,
            &base.weight,
            base.bias.as_ref(),
            self.a.as_tensor(),
            self.b.as_tensor(),
            self.scale,
            self.train_dropout(ctx),
        )
    }
}

pub struct LoraMethod;

/// PEFT's `use_dora`: the same LoRA pair under DoRA's magnitude/direction split.
fn with_dora(
    cfg: &AdapterConfig,
    lora: Lora,
    layer: &AdaptableLinear,
    magnitude: Option<Tensor>,
) -> Result<Box<dyn LinearAdapter>> {
    if !cfg.use_dora {
        return Ok(Box::new(lora));
    }
    let d = Dora::new(lora, &layer.base, magnitude)
        .map_err(|e| Error::config(format!("`{}`: {e}", layer.path)))?;
    Ok(Box::new(d))
}

/// A loaded module's rank `r` (of its tensor `what`) is the one its config gives it (`r`, or its
/// `rank_pattern` entry): a config that does not describe the tensors is refused, as PEFT refuses it.
pub(crate) fn check_config_rank(
    cfg: &AdapterConfig,
    layer: &AdaptableLinear,
    r: usize,
    what: &str,
) -> Result<()> {
    let want = cfg.rank_for(&layer.path);
    if r != want {
        return Err(Error::config(format!(
            "`{}`: {what} has rank {r} but the config gives this module rank {want} (`r`, or its \
             `rank_pattern` entry): the config does not describe these tensors (PEFT refuses such an adapter)",
            layer.path
        )));
    }
    Ok(())
}

pub(crate) fn check_rank(layer: &AdaptableLinear, r: usize) -> Result<()> {
    let (o, i) = (layer.out_features(), layer.in_features());
    if r == 0 || r > o.min(i) {
        return Err(Error::config(format!(
            "rank r={r} is invalid for `{}` of shape [{o}, {i}]: it must be between 1 and {}",
            layer.path,
            o.min(i)
        )));
    }
    Ok(())
}

impl Method for LoraMethod {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for LoraMethod {
    fn tensor_names(&self, cfg: &AdapterConfig) -> Vec<&'static str> {
        let mut n = vec!["lora_A.weight", "lora_B.weight"];
        if cfg.use_dora {
            n.push("lora_magnitude_vector");
        }
        n
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        rank: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
        _shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        check_rank(layer, rank)?;
        let (o, i) = (layer.out_features(), layer.in_features());
        let dev = &layer.base.weight.device().clone();
        let scale = cfg.scaling(rank, alpha);
        let (a, b) = match (&cfg.init_lora_weights, pissa::variant(&cfg.init_lora_weights)?) {
            (_, Some(svd)) => pissa::init(layer, rank, scale, svd)?,
            (serde_json::Value::String(s), _) if s == "loftq" => {
                loftq::init(layer, rank, scale, cfg.loftq_iter()?)?
            }
            (serde_json::Value::Bool(true), _) => (
                kaiming_uniform(&[rank, i], i, rng, dev)?,
                Tensor::zeros((o, rank), candle_core::DType::F32, dev)?,
            ),
            (serde_json::Value::Bool(false), _) => {
                let a = kaiming_uniform(&[rank, i], i, rng, dev)?;
                (a, kaiming_uniform(&[o, rank], rank, rng, dev)?)
            }
            (other, _) => {
                return Err(Error::config(format!(
                    "init_lora_weights: {other} is not implemented here (supported: true, false, \"pissa\", \"pissa_niter_K\", \"loftq\"; \"eva\" reads training data, so the trainer or adapters::eva runs it)"
                )))
            }
        };
        let lora = Lora {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout: cfg.dropout(),
        };
        with_dora(cfg, lora, layer, None)
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let (a, b) = (&t["lora_A.weight"], &t["lora_B.weight"]);
        let (o, i) = (layer.out_features(), layer.in_features());
        let r = a.dims().first().copied().unwrap_or(0);
        if a.dims() != [r, i] || b.dims() != [o, r] {
            return Err(Error::config(format!(
                "`{}`: lora_A {:?} / lora_B {:?} do not fit a layer of shape [{o}, {i}] (expected [r, {i}] and [{o}, r])",
                layer.path,
                a.dims(),
                b.dims()
            )));
        }
        check_rank(layer, r)?;
        check_config_rank(cfg, layer, r, "lora_A")?;
        let scale = cfg.scaling(r, alpha);
        if let Some(svd) = pissa::variant(&cfg.init_lora_weights)? {
            // The saved factors were trained against the residual W − s·B₀A₀: rebuild it.
            pissa::init(layer, r, scale, svd)?;
        }
        if cfg.init_lora_weights == "loftq" {
            // ... and these against LoftQ's Q, which is a deterministic function of W: rebuild it.
            loftq::init(layer, r, scale, cfg.loftq_iter()?)?;
        }
        let lora = Lora {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout: cfg.dropout(),
        };
        with_dora(cfg, lora, layer, t.get("lora_magnitude_vector").cloned())
    }
}

/// ReLoRA's restart: for every LoRA layer, `W ← W + s·BA` (in f32, cast once), then A re-drawn with Kaiming
/// init and B zeroed — in place, in the same `Var`s, so the optimizer keeps addressing them and the model's
/// output is unchanged. Returns the number of layers merged.
pub fn merge_and_reinit(model: &mut Model, rng: &mut ChaCha8Rng) -> Result<usize> {
    let mut merged = 0;
    for layer in model.linears_mut() {
        let Some(adapter) = layer.fold()? else {
            continue;
        };
        let params = adapter.parameters();
        let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        if adapter.method() != "LORA" || names != ["lora_A.weight", "lora_B.weight"] {
            return Err(Error::config(format!(
                "`{}`: ReLoRA restarts need plain LoRA factors (lora_A, lora_B), found {names:?}",
                layer.path
            )));
        }
        let (a, b) = (&params[0].1, &params[1].1);
        let dev = a.device().clone();
        a.set(&kaiming_uniform(a.dims(), layer.in_features(), rng, &dev)?)?;
        b.set(&Tensor::zeros(b.shape(), b.dtype(), &dev)?)?;
        layer.adapter = Some(adapter);
        merged += 1;
    }
    Ok(merged)
}
