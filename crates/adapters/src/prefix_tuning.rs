//! Prefix tuning (Li & Liang 2021; `peft_type = "PREFIX_TUNING"`): per layer, `num_virtual_tokens` trainable
//! keys and values placed before that attention layer's own, as past keys/values (used as stored, no RoPE;
//! the real tokens take positions `n..`), grouped-query attention as in transformers (kv-heads wide). With
//! `prefix_projection`, trained through PEFT's reparameterisation `Linear(d, h) → tanh → Linear(h, layers ·
//! 2 · d)` over a `[n, d]` table (d = kv_heads · head_dim, h = `encoder_hidden_size`). Saved as PEFT does:
//! the prefixes themselves, `prompt_embeddings` `[n, layers · 2 · kv_heads · head_dim]`.

use crate::config::AdapterConfig;
use crate::prompt_learning::{check_shape, random_table, Activation, Layer, Output, Prompt};
use crate::registry::{Attachment, Method, PromptMethod};
use candle_core::{Tensor, Var};
use factune_io::{Error, Result};
use factune_model::{Model, PromptAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

crate::prompt_learning::prompt_method_keys! {
    /// Prefix tuning's keys, PEFT's `PrefixTuningConfig` names.
    pub struct PrefixTuningConfig {
        /// Prefix tuning: train the prefixes through PEFT's two-layer tanh MLP (saved projected).
        prefix_projection: bool = false,
        /// P-tuning / prefix projection: the encoder's hidden size (default: the model's, as PEFT).
        encoder_hidden_size: Option<usize> = None,
        /// Prefix tuning: `zero` starts the prefixes (or the projection's last layer) at zero.
        init_weights: Option<String> = None,
    }
}

pub struct PrefixTuningMethod;

impl Method for PrefixTuningMethod {
    fn peft_type(&self) -> &'static str {
        "PREFIX_TUNING"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Prompt(self)
    }
}

/// The checked settings: virtual tokens, the table's width, the projection's layers (none without one).
type Plan = (
    usize,
    usize,
    Vec<(String, (usize, usize), Option<Activation>)>,
    bool,
);

fn plan(cfg: &AdapterConfig, model: &Model) -> Result<Plan> {
    let c: &PrefixTuningConfig = cfg.options()?;
    crate::prompt_learning::check_submodules(cfg, c.num_transformer_submodules)?;
    let m = &model.cfg;
    let d = m.num_kv_heads * m.head_dim;
    check_shape(
        cfg,
        model,
        c.num_virtual_tokens,
        [
            ("token_dim", c.token_dim, d),
            ("num_attention_heads", c.num_attention_heads, m.num_kv_heads),
            ("num_layers", c.num_layers, m.num_layers),
        ],
    )?;
    let zero = match c.init_weights.as_deref() {
        None => false,
        Some("zero") => true,
        Some(other) => {
            return Err(Error::config(format!(
                "PREFIX_TUNING: init_weights `{other}`: expected zero or unset"
            )))
        }
    };
    let width = m.num_layers * 2 * d;
    if !c.prefix_projection {
        return Ok((c.num_virtual_tokens, width, Vec::new(), zero));
    }
    let h = c.encoder_hidden_size.unwrap_or(d);
    if h == 0 {
        return Err(Error::config(
            "PREFIX_TUNING: encoder_hidden_size must be at least 1",
        ));
    }
    let layers = vec![
        ("transform.0".to_string(), (h, d), Some(Activation::Tanh)),
        ("transform.2".to_string(), (width, h), None),
    ];
    crate::prompt_learning::check_encoder_memory(cfg, &layers, None)?;
    Ok((c.num_virtual_tokens, d, layers, zero))
}

impl PromptMethod for PrefixTuningMethod {
    fn init(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn PromptAdapter>> {
        let (n, width, layers, zero) = plan(cfg, model)?;
        let mut table = random_table(n, width, rng, model)?;
        let mut encoder: Vec<Layer> = layers
            .into_iter()
            .map(|(name, shape, act)| Layer::new(name, shape, act, rng, model))
            .collect::<Result<_>>()?;
        if zero {
            // PEFT zeroes the last layer that produces the prefixes
            let zeros = |v: &Var| Var::from_tensor(&v.as_tensor().zeros_like()?);
            match encoder.last_mut() {
                Some(last) => {
                    last.weight = zeros(&last.weight)?;
                    last.bias = zeros(&last.bias)?;
                }
                None => table = zeros(&table)?,
            }
        }
        Ok(Box::new(Prompt {
            lstm: None,
            method: "PREFIX_TUNING",
            output: Output::kv_prefix(model),
            table,
            encoder,
        }))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn PromptAdapter>> {
        let (n, width, layers, _) = plan(cfg, model)?;
        Ok(Box::new(Prompt::from_tensors(
            "PREFIX_TUNING",
            Output::kv_prefix(model),
            n,
            model,
            &layers,
            width,
            t,
        )?))
    }
}
