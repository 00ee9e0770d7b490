//! P-tuning (Liu et al. 2021; `peft_type = "P_TUNING"`): prompt tuning's virtual embeddings, produced by a
//! prompt encoder each forward, PEFT's MLP: `Linear(hidden, h) → ReLU → Linear(h, h) → ReLU → Linear(h,
//! hidden)` over a `[num_virtual_tokens, hidden]` table (h = `encoder_hidden_size`, default the hidden size).
//! With `encoder_reparameterization_type = "LSTM"`, PEFT's other encoder: a bidirectional LSTM of
//! `encoder_num_layers` layers (hidden size h, dropout `encoder_dropout` between layers) followed by
//! `Linear(2h, 2h) → ReLU → Linear(2h, hidden)`. Saved as PEFT does, the encoder's output as
//! `prompt_embeddings`.

use crate::config::AdapterConfig;
use crate::prompt_learning::{
    check_encoder_memory, check_shape, random_table, Activation, Layer, LayerSpec, Lstm, LstmSpec,
    Output, Prompt,
};
use crate::registry::{Attachment, Method, PromptMethod};
use candle_core::Tensor;
use factune_io::{Error, Result};
use factune_model::{Model, PromptAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

factune_io::choice! {
    /// P-tuning's prompt encoder.
    pub enum EncoderType for "encoder_reparameterization_type" {
        Mlp = "MLP",
        Lstm = "LSTM",
    }
}

crate::prompt_learning::prompt_method_keys! {
    /// P-tuning's keys, PEFT's `PromptEncoderConfig` names.
    pub struct PTuningConfig {
        /// P-tuning: the prompt encoder, MLP or LSTM.
        encoder_reparameterization_type: EncoderType = EncoderType::Mlp,
        /// P-tuning / prefix projection: the encoder's hidden size (default: the model's, as PEFT).
        encoder_hidden_size: Option<usize> = None,
        /// P-tuning: LSTM layers (the MLP always has PEFT's three linear layers).
        encoder_num_layers: usize = 2,
        /// P-tuning: dropout inside the LSTM encoder.
        encoder_dropout: f64 = 0.0,
    }
}

pub struct PTuningMethod;

impl Method for PTuningMethod {
    fn peft_type(&self) -> &'static str {
        "P_TUNING"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Prompt(self)
    }
}

/// The config, checked against the model: virtual tokens, the LSTM (if that is the encoder) and the linear
/// layers after it (name, `[out, in]`, activation).
type Plan = (usize, Option<LstmSpec>, Vec<LayerSpec>);

fn plan(cfg: &AdapterConfig, model: &Model) -> Result<Plan> {
    let c: &PTuningConfig = cfg.options()?;
    crate::prompt_learning::check_submodules(cfg, c.num_transformer_submodules)?;
    let hs = model.cfg.hidden_size;
    check_shape(
        cfg,
        model,
        c.num_virtual_tokens,
        [
            ("token_dim", c.token_dim, hs),
            (
                "num_attention_heads",
                c.num_attention_heads,
                model.cfg.num_heads,
            ),
            ("num_layers", c.num_layers, model.cfg.num_layers),
        ],
    )?;
    let h = c.encoder_hidden_size.unwrap_or(hs);
    if h == 0 {
        return Err(Error::config(
            "P_TUNING: encoder_hidden_size must be at least 1",
        ));
    }
    let relu = Some(Activation::Relu);
    let plan = match c.encoder_reparameterization_type {
        EncoderType::Mlp => (
            c.num_virtual_tokens,
            None,
            vec![
                ("mlp_head.0".to_string(), (h, hs), relu),
                ("mlp_head.2".to_string(), (h, h), relu),
                ("mlp_head.4".to_string(), (hs, h), None),
            ],
        ),
        EncoderType::Lstm => {
            if c.encoder_num_layers == 0 || !(0.0..1.0).contains(&c.encoder_dropout) {
                return Err(Error::config(format!(
                    "P_TUNING: encoder_num_layers {} and encoder_dropout {}: expected at least one layer and a \
                     dropout in [0, 1)",
                    c.encoder_num_layers, c.encoder_dropout
                )));
            }
            let lstm = LstmSpec {
                input: hs,
                hidden: h,
                layers: c.encoder_num_layers,
                dropout: c.encoder_dropout,
            };
            (
                c.num_virtual_tokens,
                Some(lstm),
                vec![
                    ("mlp_head.0".to_string(), (2 * h, 2 * h), relu),
                    ("mlp_head.2".to_string(), (hs, 2 * h), None),
                ],
            )
        }
    };
    check_encoder_memory(cfg, &plan.2, plan.1.as_ref())?;
    Ok(plan)
}

impl PromptMethod for PTuningMethod {
    fn init(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn PromptAdapter>> {
        let (n, lstm, layers) = plan(cfg, model)?;
        let table = random_table(n, model.cfg.hidden_size, rng, model)?;
        let lstm = lstm.map(|spec| Lstm::new(spec, rng, model)).transpose()?;
        let encoder = layers
            .into_iter()
            .map(|(name, shape, act)| Layer::new(name, shape, act, rng, model))
            .collect::<Result<_>>()?;
        Ok(Box::new(Prompt {
            method: "P_TUNING",
            output: Output::Embeddings,
            table,
            lstm,
            encoder,
        }))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn PromptAdapter>> {
        let (n, lstm, layers) = plan(cfg, model)?;
        Ok(Box::new(Prompt::from_tensors_with(
            "P_TUNING",
            Output::Embeddings,
            n,
            model,
            (lstm, &layers),
            model.cfg.hidden_size,
            t,
        )?))
    }
}
