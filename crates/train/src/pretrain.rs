//! Pre-training from scratch: a byte-level BPE tokenizer trained on the corpus with the `tokenizers` crate,
//! and a Llama-architecture model with GPT-2-style random init, written as a Hugging Face directory that the
//! full-parameter training loop then trains.

use candle_core::{Device, Tensor};
use factune_io::weights::to_safetensors_bytes;
use factune_io::{atomic, Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_normal::normal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
};

pub const EOS: &str = "<|endoftext|>";

/// The architecture of a model to pre-train (the `[model]` table of a pretrain config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_theta() -> f64 {
    10000.0
}
fn default_true() -> bool {
    true
}

/// Trains a byte-level BPE tokenizer on `corpus` and writes `tokenizer.json` + `tokenizer_config.json`.
pub fn train_tokenizer(corpus: &Path, vocab_size: usize, dir: &Path) -> Result<usize> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok: tokenizers::TokenizerImpl<
        BPE,
        tokenizers::NormalizerWrapper,
        ByteLevel,
        ByteLevel,
        ByteLevel,
    > = tokenizers::TokenizerImpl::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    let corpus_s = corpus
        .to_str()
        .ok_or_else(|| Error::invalid(corpus, "path is not UTF-8"))?;
    tok.train_from_files(&mut trainer, vec![corpus_s.to_string()])
        .map_err(|e| Error::invalid(corpus, format!("tokenizer training failed: {e}")))?;
    let mut wrapped = Tokenizer::new(ModelWrapper::BPE(tok.get_model().clone()));
    wrapped.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(
        ByteLevel::default().add_prefix_space(false),
    )));
    wrapped.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    wrapped.with_post_processor(Some(PostProcessorWrapper::ByteLevel(
        ByteLevel::default().trim_offsets(false),
    )));
    wrapped
        .add_special_tokens([AddedToken::from(EOS, true)])
        .map_err(|e| Error::config(format!("tokenizer: {e}")))?;
    let json = wrapped
        .to_string(true)
        .map_err(|e| Error::config(format!("tokenizer: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    atomic::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "chat_template": factune_io::tokenizer::DEFAULT_CHAT_TEMPLATE,
    });
    atomic::write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
    )?;
    Ok(wrapped.get_vocab_size(true))
}

/// Writes `config.json` and a randomly initialised `model.safetensors` (N(0, 0.02); output projections
/// scaled by 1/√(2·layers); norms 1) for a Llama-architecture model.
pub fn init_model(spec: &ArchSpec, eos_id: u32, seed: u64, dir: &Path) -> Result<()> {
    let (h, i, v, n) = (
        spec.hidden_size,
        spec.intermediate_size,
        spec.vocab_size,
        spec.num_hidden_layers,
    );
    if spec.num_attention_heads == 0 || h % spec.num_attention_heads != 0 {
        return Err(Error::config(format!(
            "hidden_size {h} must be a multiple of num_attention_heads"
        )));
    }
    let d = h / spec.num_attention_heads;
    let kv = spec.num_key_value_heads * d;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut t = BTreeMap::new();
    let mut randn = |shape: &[usize], std: f64| -> Result<Tensor> {
        let len: usize = shape.iter().product();
        Ok(Tensor::from_vec(normal(&mut rng, len, std), shape, &dev)?)
    };
    let out_std = 0.02 / (2.0 * n as f64).sqrt();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&[v, h], 0.02)?,
    );
    for l in 0..n {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            randn(&[h, h], 0.02)?,
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            randn(&[kv, h], 0.02)?,
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            randn(&[kv, h], 0.02)?,
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            randn(&[h, h], out_std)?,
        );
        t.insert(format!("{p}.mlp.gate_proj.weight"), randn(&[i, h], 0.02)?);
        t.insert(format!("{p}.mlp.up_proj.weight"), randn(&[i, h], 0.02)?);
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            randn(&[h, i], out_std)?,
        );
        t.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        );
    }
    t.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, candle_core::DType::F32, &dev)?,
    );
    if !spec.tie_word_embeddings {
        t.insert("lm_head.weight".to_string(), randn(&[v, h], 0.02)?);
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": v,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": n,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": d,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "dtype": "float32",
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    atomic::write_atomic(
        &dir.join("model.safetensors"),
        &to_safetensors_bytes(&t, None)?,
    )?;
    atomic::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("json")
            .as_bytes(),
    )
}

mod rand_distr_normal {
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    /// Box–Muller normal samples (avoids a dependency for one distribution).
    pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let th = 2.0 * std::f64::consts::PI * u2;
            out.push((r * th.cos()) as f32);
            out.push((r * th.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}
