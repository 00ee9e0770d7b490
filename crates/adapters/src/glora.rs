//! GLoRA (`peft_type = "GLORA"`): a generalised prompt module, `W' = W + W·A + B` and
//! `b' = b + b⊙D + E + W·C`, with the LoRA-shaped choice for each part: `A = A_u A_d` (`[in, r]·[r, in]`) and
//! `B = B_u B_d` (`[out, r]·[r, in]`) low-rank, `C ∈ R^in`, `D, E ∈ R^out` vectors. `glora_parts` picks which
//! parts train (default all of `ABCDE`). Init: `A_u`, `B_u`, C, D, E zero, `A_d`, `B_d` Kaiming, so the model is
//! unchanged at step 0. PEFT has no GLoRA: PEFT's layout with factune's own `peft_type` —
//! `glora_Au`, `glora_Ad`, `glora_Bu`, `glora_Bd`, `glora_C`, `glora_D`, `glora_E`.
//!
//! Forward without forming W': `x(W·A)ᵀ = ((x A_dᵀ) A_uᵀ) Wᵀ` goes through the frozen linear, `W·C` is the
//! frozen linear of C. A layer without a bias (Llama's) has no `b⊙D` term (and no D), and no bias to hold E or
//! W·C when merged: the default `glora_parts = "auto"` trains all five parts where the layer has a bias and A, B
//! where it has none, and a selection naming C or E is refused at training time on bias-free layers (the
//! adapter could never be merged).

use crate::config::AdapterConfig;
use crate::kaiming_uniform;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::kernels::frozen_linear;
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

crate::keys::method_keys! {
    /// GLoRA's keys (factune's own `peft_type = "GLORA"`).
    pub struct GloraConfig {
        /// GLoRA: the parts that train, a selection of `ABCDE` (W·A, B, W·C, b⊙D, E); auto: all five on layers
        /// with a bias, A and B on layers without one (the parts that can be merged).
        glora_parts: String = "auto".into(),
    }
}

const NAMES: [&str; 7] = [
    "glora_Au", "glora_Ad", "glora_Bu", "glora_Bd", "glora_C", "glora_D", "glora_E",
];

/// Each part's letter and its tensors.
const PARTS: [(char, &[&str]); 5] = [
    ('A', &["glora_Au", "glora_Ad"]),
    ('B', &["glora_Bu", "glora_Bd"]),
    ('C', &["glora_C"]),
    ('D', &["glora_D"]),
    ('E', &["glora_E"]),
];

pub struct Glora {
    /// `(A_u [in, r], A_d [r, in])`, `(B_u [out, r], B_d [r, in])`, `C [in]`, `D [out]`, `E [out]`.
    a: Option<(Var, Var)>,
    b: Option<(Var, Var)>,
    c: Option<Var>,
    d: Option<Var>,
    e: Option<Var>,
    dropout: f64,
}

impl Glora {
    /// `b⊙D + E + W·C`, the bias update `[out]`.
    fn bias_delta(&self, base: &FrozenParts) -> candle_core::Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        let mut add = |t: Tensor| -> candle_core::Result<()> {
            acc = Some(match acc.take() {
                Some(a) => (a + t)?,
                None => t,
            });
            Ok(())
        };
        if let (Some(d), Some(b)) = (&self.d, &base.bias) {
            add((b * d.as_tensor())?)?;
        }
        if let Some(e) = &self.e {
            add(e.as_tensor().clone())?;
        }
        if let Some(c) = &self.c {
            add(frozen_linear(&c.as_tensor().unsqueeze(0)?, &base.weight, None)?.squeeze(0)?)?;
        }
        Ok(acc)
    }
}

impl LinearAdapter for Glora {
    fn method(&self) -> &'static str {
        "GLORA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let x = crate::adapter_input(x, self.dropout, ctx)?;
        let inp = *x.dims().last().expect("rank >= 1");
        let x2 = x.reshape(((), inp))?;
        let mut y = base_out.reshape(((), base_out.dim(candle_core::D::Minus1)?))?;
        if let Some((u, d)) = &self.a {
            let v = x2.matmul(&d.t()?)?.matmul(&u.t()?)?;
            y = (y + frozen_linear(&v, &base.weight, None)?)?;
        }
        if let Some((u, d)) = &self.b {
            y = (y + x2.matmul(&d.t()?)?.matmul(&u.t()?)?)?;
        }
        if let Some(db) = self.bias_delta(base)? {
            y = y.broadcast_add(&db)?;
        }
        y.reshape(base_out.shape())
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = Vec::new();
        let mut push = |k: usize, v: &Var| p.push((NAMES[k].to_string(), v.clone()));
        if let Some((u, d)) = &self.a {
            push(0, u);
            push(1, d);
        }
        if let Some((u, d)) = &self.b {
            push(2, u);
            push(3, d);
        }
        for (k, v) in [(4, &self.c), (5, &self.d), (6, &self.e)] {
            if let Some(v) = v {
                push(k, v);
            }
        }
        p
    }

    fn delta_weight(&self, base: &FrozenParts) -> candle_core::Result<Tensor> {
        let w = base.weight.dense()?.to_dtype(DType::F32)?;
        let mut delta = w.zeros_like()?;
        if let Some((u, d)) = &self.a {
            delta = (delta + w.matmul(&u.as_tensor().matmul(d.as_tensor())?)?)?;
        }
        if let Some((u, d)) = &self.b {
            delta = (delta + u.as_tensor().matmul(d.as_tensor())?)?;
        }
        Ok(delta)
    }

    fn delta_bias(&self, base: &FrozenParts) -> candle_core::Result<Option<Tensor>> {
        self.bias_delta(base)
    }
}

pub struct GloraMethod;

/// The selection as written (`auto` or letters), checked.
fn parts(cfg: &AdapterConfig) -> Result<String> {
    let own: &GloraConfig = cfg.options()?;
    let p = own.glora_parts.clone();
    if p != "auto" && (p.is_empty() || !p.chars().all(|c| "ABCDE".contains(c))) {
        return Err(Error::config(format!(
            "glora_parts `{p}`: expected auto or a non-empty selection of the letters A, B, C, D, E"
        )));
    }
    Ok(p)
}

/// The parts a layer has: `auto` resolved by whether it has a bias, D only with a bias.
fn layer_parts(cfg: &AdapterConfig, layer: &AdaptableLinear) -> Result<String> {
    let has_bias = layer.base.bias.is_some();
    Ok(match parts(cfg)?.as_str() {
        "auto" if has_bias => "ABCDE".into(),
        "auto" => "AB".into(),
        p if has_bias => p.into(),
        p => p.replace('D', ""),
    })
}

impl Method for GloraMethod {
    fn peft_type(&self) -> &'static str {
        "GLORA"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for GloraMethod {
    /// The vector parts depend on the layer's bias (`load_tensors` checks each layer has its parts).
    fn optional_names(&self) -> &'static [&'static str] {
        &["glora_C", "glora_D", "glora_E"]
    }

    fn tensor_names(&self, cfg: &AdapterConfig) -> Vec<&'static str> {
        let p = parts(cfg)
            .map(|p| if p == "auto" { "ABCDE".into() } else { p })
            .unwrap_or_default();
        let mut n = Vec::new();
        for (letter, names) in PARTS {
            if p.contains(letter) {
                n.extend_from_slice(names);
            }
        }
        n
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        rank: usize,
        _alpha: f64,
        rng: &mut ChaCha8Rng,
        _shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        crate::lora::check_rank(layer, rank)?;
        let p = layer_parts(cfg, layer)?;
        if layer.base.bias.is_none() && p.contains(['C', 'E']) {
            return Err(Error::config(format!(
                "glora_parts `{}`: C and E train a bias update, and `{}` has no bias, so the adapter could never \
                 be merged into the model; use glora_parts = \"auto\" (A and B on bias-free layers) or a \
                 selection of A, B",
                parts(cfg)?,
                layer.path
            )));
        }
        let (o, i) = (layer.out_features(), layer.in_features());
        let dev = layer.base.weight.device().clone();
        let zeros = |shape: &[usize]| Var::from_tensor(&Tensor::zeros(shape, DType::F32, &dev)?);
        let mut kaiming = |shape: &[usize], fan: usize| {
            Var::from_tensor(&kaiming_uniform(shape, fan, rng, &dev)?)
        };
        let a = if p.contains('A') {
            Some((zeros(&[i, rank])?, kaiming(&[rank, i], i)?))
        } else {
            None
        };
        let b = if p.contains('B') {
            Some((zeros(&[o, rank])?, kaiming(&[rank, i], i)?))
        } else {
            None
        };
        let vec_part = |letter: char, n: usize| -> candle_core::Result<Option<Var>> {
            p.contains(letter).then(|| zeros(&[n])).transpose()
        };
        Ok(Box::new(Glora {
            a,
            b,
            c: vec_part('C', i)?,
            // b⊙D needs a bias: a bias-free layer (Llama's) has no D to train
            d: if layer.base.bias.is_some() {
                vec_part('D', o)?
            } else {
                None
            },
            e: vec_part('E', o)?,
            dropout: cfg.dropout(),
        }))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let p = layer_parts(cfg, layer)?;
        let (o, i) = (layer.out_features(), layer.in_features());
        // every part the layer has is in the file (a C or E beyond it loads: adapters trained before auto)
        for (letter, names) in PARTS {
            if let Some(n) = names
                .iter()
                .find(|n| p.contains(letter) && !t.contains_key(**n))
            {
                return Err(Error::config(format!(
                    "`{}`: missing {n} (glora_parts `{}`)",
                    layer.path,
                    parts(cfg)?
                )));
            }
        }
        let r = t
            .get("glora_Ad")
            .or(t.get("glora_Bd"))
            .map(|x| x.dims()[0])
            .unwrap_or(0);
        let expect: [(&str, Vec<usize>); 7] = [
            ("glora_Au", vec![i, r]),
            ("glora_Ad", vec![r, i]),
            ("glora_Bu", vec![o, r]),
            ("glora_Bd", vec![r, i]),
            ("glora_C", vec![i]),
            ("glora_D", vec![o]),
            ("glora_E", vec![o]),
        ];
        for (n, shape) in &expect {
            if let Some(x) = t.get(*n) {
                if x.dims() != shape.as_slice() {
                    return Err(Error::config(format!(
                        "`{}`: {n} has shape {:?}, expected {shape:?}",
                        layer.path,
                        x.dims()
                    )));
                }
            }
        }
        if t.contains_key("glora_Ad") || t.contains_key("glora_Bd") {
            crate::lora::check_config_rank(cfg, layer, r, "glora_Ad / glora_Bd")?;
        }
        let var = |n: &str| t.get(n).map(Var::from_tensor).transpose();
        let pair = |x: &str, y: &str, letter: char| -> candle_core::Result<Option<(Var, Var)>> {
            if !p.contains(letter) {
                return Ok(None);
            }
            Ok(var(x)?.zip(var(y)?))
        };
        Ok(Box::new(Glora {
            a: pair("glora_Au", "glora_Ad", 'A')?,
            b: pair("glora_Bu", "glora_Bd", 'B')?,
            c: var("glora_C")?,
            d: var("glora_D")?,
            e: var("glora_E")?,
            dropout: cfg.dropout(),
        }))
    }
}
