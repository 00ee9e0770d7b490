//! The architecture description read from a Hugging Face `config.json`, normalised over the model families
//! factune supports so the model code sees one shape of config.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// Llama, Mistral, Qwen2, SmolLM: RMSNorm, RoPE, grouped-query attention, SwiGLU.
    Llama,
    /// GPT-2: learned positions, LayerNorm, GELU-tanh, `Conv1D` weights stored `[in, out]`.
    Gpt2,
}

/// RoPE frequency scaling as in transformers' `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    /// `model_type` as written in the file (llama, mistral, qwen2, gpt2).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always, Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Mistral / Qwen2 sliding-window attention span, when the model uses one.
    pub sliding_window: Option<usize>,
    /// The parsed file, kept so a merged checkpoint can write it back unchanged.
    pub raw: Value,
}

fn get_usize(v: &Value, path: &Path, key: &str) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| {
            Error::invalid(
                path,
                format!("key `{key}` must be a non-negative integer, got {x}"),
            )
        }),
        None => Err(Error::invalid(path, format!("missing key `{key}`"))),
    }
}

fn opt_usize(v: &Value, path: &Path, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => get_usize(v, path, key).map(Some),
    }
}

fn opt_f64(v: &Value, path: &Path, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::invalid(path, format!("key `{key}` must be a number, got {x}"))),
    }
}

/// A boolean key; absent or `null` is `None`, anything else but a bool is an error naming the key.
fn opt_bool(v: &Value, path: &Path, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(x) => Err(Error::invalid(
            path,
            format!("key `{key}` must be true or false, got {x}"),
        )),
    }
}

/// One token id: a non-negative integer that fits the tokenizer's u32 ids.
fn token_id(x: &Value, path: &Path, key: &str) -> Result<u32> {
    x.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            Error::invalid(
                path,
                format!("key `{key}` must hold token ids (integers below 2^32), got {x}"),
            )
        })
}

/// `eos_token_id`: one id or a list of ids.
fn token_ids(v: &Value, path: &Path, key: &str) -> Result<Vec<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(|x| token_id(x, path, key)).collect(),
        Some(x) => Ok(vec![token_id(x, path, key)?]),
    }
}

fn opt_token_id(v: &Value, path: &Path, key: &str) -> Result<Option<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => token_id(x, path, key).map(Some),
    }
}

/// The largest `max_position_embeddings` accepted: RoPE tables are precomputed for every position.
pub const MAX_POSITIONS: usize = 1 << 20;

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: Value = crate::error::read_json(path)?;
        Self::from_value(raw, path)
    }

    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(path, "missing key `model_type`"))?
            .to_string();
        let cfg = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => Self::llama_family(&raw, path, &model_type)?,
            "gpt2" => Self::gpt2(&raw, path)?,
            other => {
                return Err(Error::invalid(
                    path,
                    format!("unsupported architecture `model_type: {other}`; supported: llama, mistral, qwen2, gpt2"),
                ))
            }
        };
        cfg.validate(path)?;
        Ok(ModelConfig { raw, ..cfg })
    }

    fn llama_family(v: &Value, path: &Path, model_type: &str) -> Result<Self> {
        // The MLP is SwiGLU: an activation other than SiLU would be computed wrongly, not approximately.
        match v.get("hidden_act") {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if a == "silu" || a == "swish" => {}
            Some(a) => {
                return Err(Error::invalid(
                    path,
                    format!("unsupported `hidden_act: {a}` for {model_type}; supported: silu"),
                ))
            }
        }
        let hidden_size = get_usize(v, path, "hidden_size")?;
        let num_heads = get_usize(v, path, "num_attention_heads")?;
        let num_kv_heads = opt_usize(v, path, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 {
            return Err(Error::invalid(path, "`num_attention_heads` must be > 0"));
        }
        let head_dim = opt_usize(v, path, "head_dim")?.unwrap_or(hidden_size / num_heads);
        // transformers >= 5 nests RoPE settings in `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|x| x.is_object());
        let rope_theta = match rope_params {
            Some(p) => opt_f64(p, path, "rope_theta")?,
            None => None,
        }
        .or(opt_f64(v, path, "rope_theta")?)
        .unwrap_or(10000.0);
        let scaling_obj = v
            .get("rope_scaling")
            .filter(|x| x.is_object())
            .or(rope_params);
        let rope_scaling = match scaling_obj {
            Some(s) => Self::rope_scaling(s, path)?,
            None => None,
        };
        let attention_bias = opt_bool(v, path, "attention_bias")?.unwrap_or(false);
        let qwen = model_type == "qwen2";
        let uses_window = match model_type {
            "mistral" => true,
            "qwen2" => opt_bool(v, path, "use_sliding_window")?.unwrap_or(false),
            _ => false,
        };
        Ok(ModelConfig {
            sliding_window: if uses_window {
                opt_usize(v, path, "sliding_window")?
            } else {
                None
            },
            arch: Arch::Llama,
            model_type: model_type.to_string(),
            vocab_size: get_usize(v, path, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, path, "intermediate_size")?,
            num_layers: get_usize(v, path, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: opt_usize(v, path, "max_position_embeddings")?.unwrap_or(2048),
            norm_eps: opt_f64(v, path, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: opt_bool(v, path, "tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: qwen || attention_bias,
            o_bias: !qwen && attention_bias,
            mlp_bias: opt_bool(v, path, "mlp_bias")?.unwrap_or(false),
            bos_token_id: opt_token_id(v, path, "bos_token_id")?,
            eos_token_ids: token_ids(v, path, "eos_token_id")?,
            raw: Value::Null,
        })
    }

    fn rope_scaling(s: &Value, path: &Path) -> Result<Option<RopeScaling>> {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = || -> Result<f64> {
            opt_f64(s, path, "factor")?.ok_or_else(|| {
                Error::invalid(path, format!("rope scaling `{kind}` needs `factor`"))
            })
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
            "llama3" => Ok(Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: opt_f64(s, path, "low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: opt_f64(s, path, "high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: opt_usize(
                    s,
                    path,
                    "original_max_position_embeddings",
                )?
                .unwrap_or(8192),
            })),
            other => Err(Error::invalid(
                path,
                format!(
                    "unsupported rope scaling type `{other}`; supported: default, linear, llama3"
                ),
            )),
        }
    }

    fn gpt2(v: &Value, path: &Path) -> Result<Self> {
        let hidden_size = get_usize(v, path, "n_embd")?;
        let num_heads = get_usize(v, path, "n_head")?;
        if num_heads == 0 {
            return Err(Error::invalid(path, "`n_head` must be > 0"));
        }
        let act = v
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(Error::invalid(
                path,
                format!("unsupported `activation_function: {act}` for gpt2; supported: gelu_new"),
            ));
        }
        Ok(ModelConfig {
            arch: Arch::Gpt2,
            model_type: "gpt2".into(),
            vocab_size: get_usize(v, path, "vocab_size")?,
            hidden_size,
            intermediate_size: opt_usize(v, path, "n_inner")?
                .unwrap_or(hidden_size.saturating_mul(4)),
            num_layers: get_usize(v, path, "n_layer")?,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: hidden_size / num_heads,
            max_position_embeddings: get_usize(v, path, "n_positions")?,
            norm_eps: opt_f64(v, path, "layer_norm_epsilon")?.unwrap_or(1e-5),
            rope_theta: 0.0,
            rope_scaling: None,
            tie_word_embeddings: opt_bool(v, path, "tie_word_embeddings")?.unwrap_or(true),
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            bos_token_id: opt_token_id(v, path, "bos_token_id")?,
            eos_token_ids: token_ids(v, path, "eos_token_id")?,
            sliding_window: None,
            raw: Value::Null,
        })
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (k, x) in nonzero {
            if x == 0 {
                return Err(Error::invalid(path, format!("`{k}` must be > 0")));
            }
        }
        // Bounds well above any released model, checked before anything is sized from them (a config with
        // 10^9 layers would otherwise ask for the memory of a terabyte model).
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("num_hidden_layers", self.num_layers, 1 << 12),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 14),
        ];
        for (k, x, max) in bounded {
            if x > max {
                return Err(Error::invalid(
                    path,
                    format!("`{k}` = {x} exceeds {max}: not a model factune can hold"),
                ));
            }
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(Error::invalid(
                path,
                format!(
                    "`max_position_embeddings` = {} exceeds {MAX_POSITIONS} (factune precomputes position tables)",
                    self.max_position_embeddings
                ),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::invalid(
                path,
                format!(
                    "the norm epsilon (rms_norm_eps / layer_norm_epsilon) must be a positive number, got {}",
                    self.norm_eps
                ),
            ));
        }
        if self.arch == Arch::Llama && !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::invalid(
                path,
                format!(
                    "`rope_theta` must be a positive number, got {}",
                    self.rope_theta
                ),
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::invalid(
                path,
                format!(
                    "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if self.arch == Arch::Llama && !self.head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                path,
                format!("head_dim {} must be even for RoPE", self.head_dim),
            ));
        }
        Ok(())
    }

    /// Number of parameters implied by the config (counting a tied head once); saturates instead of
    /// overflowing, so an absurd config reads as "too many" rather than wrapping around.
    pub fn num_parameters(&self) -> usize {
        let n = |x: usize| x as u128;
        let (h, i, v) = (
            n(self.hidden_size),
            n(self.intermediate_size),
            n(self.vocab_size),
        );
        let q = n(self.num_heads) * n(self.head_dim);
        let kv = n(self.num_kv_heads) * n(self.head_dim);
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        let layers = n(self.num_layers);
        let total: u128 = match self.arch {
            Arch::Llama => {
                let attn = h * q
                    + 2 * h * kv
                    + q * h
                    + if self.qkv_bias { q + 2 * kv } else { 0 }
                    + if self.o_bias { h } else { 0 };
                let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
                v * h + layers * (attn + mlp + 2 * h) + h + head
            }
            Arch::Gpt2 => {
                let attn = 3 * h * h + 3 * h + h * h + h;
                let mlp = 2 * h * i + i + h;
                v * h
                    + n(self.max_position_embeddings) * h
                    + layers * (attn + mlp + 4 * h)
                    + 2 * h
                    + head
            }
        };
        usize::try_from(total).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(v, Path::new("config.json"))
    }

    #[test]
    fn llama3_rope_scaling_and_gqa() {
        let c = parse(json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 500000.0, "eos_token_id": [1, 2],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 2);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
    }

    #[test]
    fn transformers5_rope_parameters() {
        let c = parse(json!({
            "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}
        }))
        .unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.qkv_bias && !c.o_bias);
        assert!(c.rope_scaling.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(json!({"model_type": "bert"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains("bert") && e.contains("supported"),
            "{e}"
        );
        let e = parse(json!({"model_type": "llama", "hidden_size": 64}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = parse(json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of num_key_value_heads"), "{e}");
    }

    #[test]
    fn values_that_would_panic_abort_or_compute_wrongly_are_refused() {
        let base = json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4
        });
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            parse(c).unwrap_err().to_string()
        };
        for (k, v, want) in [
            ("max_position_embeddings", json!(0), "must be > 0"),
            ("max_position_embeddings", json!(u64::MAX), "exceeds"),
            ("max_position_embeddings", json!(10_000_000), "exceeds"),
            ("num_hidden_layers", json!(1_000_000_000), "exceeds"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("attention_bias", json!("yes"), "attention_bias"),
            ("eos_token_id", json!(4_294_967_296u64), "eos_token_id"),
            ("eos_token_id", json!([1, -2]), "eos_token_id"),
            ("rope_theta", json!(0.0), "rope_theta"),
            ("rms_norm_eps", json!(-1e-6), "rms_norm_eps"),
        ] {
            let e = with(k, v.clone());
            assert!(e.contains(want) && e.contains(k), "{k} = {v}: {e}");
        }
        let mut c = base.clone();
        c["hidden_act"] = json!("silu");
        c["eos_token_id"] = json!(2);
        assert_eq!(parse(c).unwrap().eos_token_ids, vec![2]);
    }
}
