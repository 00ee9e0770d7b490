//! Prompt tuning (Lester et al. 2021; `peft_type = "PROMPT_TUNING"`): `num_virtual_tokens` trainable
//! embeddings placed before every input's, at positions `0..n`; no weight of the model changes. Starts as
//! PEFT does: `RANDOM` (N(0, 1) rows), `TEXT` (the vocabulary embeddings of `prompt_tuning_init_text`'s
//! tokens, repeated or cut to `num_virtual_tokens`) or `SAMPLE_VOCAB` (embeddings of random vocabulary
//! tokens). Saved as PEFT's `prompt_embeddings` `[num_virtual_tokens, hidden]`.

use crate::config::AdapterConfig;
use crate::prompt_learning::{check_shape, random_table, Output, Prompt};
use crate::registry::{Attachment, Method, PromptMethod};
use candle_core::{Tensor, Var};
use factune_io::{Error, Result, TextTokenizer};
use factune_model::{Model, PromptAdapter};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

factune_io::choice! {
    /// How prompt-tuning embeddings start.
    pub enum PromptTuningInit for "prompt_tuning_init" {
        Random = "RANDOM",
        Text = "TEXT",
        SampleVocab = "SAMPLE_VOCAB",
    }
}

crate::prompt_learning::prompt_method_keys! {
    /// Prompt tuning's keys, PEFT's `PromptTuningConfig` names.
    pub struct PromptTuningConfig {
        /// Prompt tuning: RANDOM, TEXT (from prompt_tuning_init_text) or SAMPLE_VOCAB.
        prompt_tuning_init: PromptTuningInit = PromptTuningInit::Random,
        /// Prompt tuning: the text whose token embeddings start the prompt (with prompt_tuning_init = TEXT).
        prompt_tuning_init_text: Option<String> = None,
        /// Prompt tuning: a local tokenizer directory for the init text (default: the model's).
        tokenizer_name_or_path: Option<String> = None,
    }
}

pub struct PromptTuningMethod;

impl Method for PromptTuningMethod {
    fn peft_type(&self) -> &'static str {
        "PROMPT_TUNING"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Prompt(self)
    }
}

fn checked<'a>(cfg: &'a AdapterConfig, model: &Model) -> Result<&'a PromptTuningConfig> {
    let c: &PromptTuningConfig = cfg.options()?;
    crate::prompt_learning::check_submodules(cfg, c.num_transformer_submodules)?;
    check_shape(
        cfg,
        model,
        c.num_virtual_tokens,
        [
            ("token_dim", c.token_dim, model.cfg.hidden_size),
            (
                "num_attention_heads",
                c.num_attention_heads,
                model.cfg.num_heads,
            ),
            ("num_layers", c.num_layers, model.cfg.num_layers),
        ],
    )?;
    Ok(c)
}

impl PromptMethod for PromptTuningMethod {
    fn init(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn PromptAdapter>> {
        let c = checked(cfg, model)?;
        let n = c.num_virtual_tokens;
        let table = match c.prompt_tuning_init {
            PromptTuningInit::Random => random_table(n, model.cfg.hidden_size, rng, model)?,
            PromptTuningInit::SampleVocab => {
                let ids: Vec<u32> = (0..n)
                    .map(|_| rng.random_range(0..model.cfg.vocab_size as u32))
                    .collect();
                Var::from_tensor(&model.token_embeddings(&ids)?)?
            }
            PromptTuningInit::Text => {
                Var::from_tensor(&model.token_embeddings(&text_ids(c, model)?)?)?
            }
        };
        Ok(Box::new(Prompt {
            lstm: None,
            method: "PROMPT_TUNING",
            output: Output::Embeddings,
            table,
            encoder: Vec::new(),
        }))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn PromptAdapter>> {
        let c = checked(cfg, model)?;
        Ok(Box::new(Prompt::from_tensors(
            "PROMPT_TUNING",
            Output::Embeddings,
            c.num_virtual_tokens,
            model,
            &[],
            model.cfg.hidden_size,
            t,
        )?))
    }
}

/// The init text's token ids (special tokens included, as PEFT's tokenizer call adds them), repeated or cut
/// to `num_virtual_tokens`.
fn text_ids(c: &PromptTuningConfig, model: &Model) -> Result<Vec<u32>> {
    let text = c.prompt_tuning_init_text.as_deref().ok_or_else(|| {
        Error::config(
            "prompt_tuning_init = TEXT needs prompt_tuning_init_text (the text whose embeddings start the prompt)",
        )
    })?;
    let dir = c
        .tokenizer_name_or_path
        .as_deref()
        .map_or(model.dir.as_path(), Path::new);
    let tok = TextTokenizer::from_dir(dir)?;
    let ids = tok.encode(text, true)?;
    if tok.encode(text, false)?.is_empty() {
        return Err(Error::config(format!(
            "prompt_tuning_init_text {text:?} tokenises to nothing with the tokenizer in {}",
            dir.display()
        )));
    }
    Ok(ids
        .iter()
        .cycle()
        .take(c.num_virtual_tokens)
        .copied()
        .collect())
}
