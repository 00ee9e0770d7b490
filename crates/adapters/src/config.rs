//! `adapter_config.json` as PEFT writes it. Field names are PEFT's, so users keep their habits and files move
//! between the two tools.

use crate::method_config::MethodConfig;
use factune_io::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// `target_modules`: a list of module-name suffixes, a regex (full match), or `all-linear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
    }
}

/// A `rank_pattern` value: a rank (LoRA), or AdaLoRA's mask of the singular values kept (keyed by
/// `<module>.lora_E`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RankEntry {
    Rank(usize),
    Mask(Vec<bool>),
}

impl RankEntry {
    pub fn rank(&self) -> usize {
        match self {
            RankEntry::Rank(r) => *r,
            RankEntry::Mask(m) => m.iter().filter(|&&b| b).count(),
        }
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_task() -> String {
    "CAUSAL_LM".into()
}
fn default_true() -> Value {
    Value::Bool(true)
}

/// `adapter_config.json`: the keys every method shares (PEFT's `LoraConfig`/`PeftConfig` names), and the
/// method with its own keys, tagged by `peft_type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "default_task")]
    pub task_type: String,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// `true` (Kaiming A, zero B), `false` (random B too: not a no-op), or a named init PEFT knows.
    #[serde(default = "default_true")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's module exclusions (a list of names or a regex); not written when unset, for PEFT < 0.14.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, RankEntry>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default = "default_true")]
    pub inference_mode: Value,
    #[serde(default)]
    pub revision: Option<String>,
    /// PEFT's `LoftQConfig`: `loftq_bits` (4) and `loftq_iter`, used by `init_lora_weights = "loftq"`.
    #[serde(default)]
    pub loftq_config: Map<String, Value>,
    /// The method (`peft_type`) and its own keys.
    #[serde(flatten)]
    pub method: MethodConfig,
}

/// Keys of PEFT features factune does not implement: read when they hold their default (null, empty,
/// false), refused otherwise (the adapter would not be what PEFT builds).
const FEATURES_OFF: &[&str] = &[
    "megatron_config",
    "lora_bias",
    "eva_config",
    "corda_config",
    "layer_replication",
    "use_qalora",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "ensure_weight_tying",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
];

/// Keys PEFT writes that describe, not define, the adapter: the version that wrote it, the class mapping of a
/// custom model, Megatron's module path and QALoRA's group size (used only with `use_qalora`).
const METADATA: &[&str] = &[
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
];

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({"peft_type": "LORA"}))
            .expect("all fields have defaults")
    }
}

impl AdapterConfig {
    /// PEFT's name of the method.
    pub fn peft_type(&self) -> &'static str {
        self.method.peft_type()
    }

    /// This method's own settings, typed (`let v: &VeraConfig = cfg.options()?`).
    pub fn options<'a, T>(&'a self) -> Result<&'a T>
    where
        &'a T: TryFrom<&'a MethodConfig, Error = Error>,
    {
        <&T>::try_from(&self.method)
    }

    /// Effective scale `s` for rank `r`: `α/r`, or `α/√r` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Whether the init derives the adapter (and a new frozen base) from the full-precision weight — PiSSA,
    /// LoftQ, DoTA — so a 4-bit base must be quantised after it, not before.
    pub fn init_reads_base(&self) -> bool {
        let named =
            |p: &str| matches!(&self.init_lora_weights, Value::String(s) if s.starts_with(p));
        match &self.method {
            MethodConfig::Mpo(m) => m.init_weights == crate::mpo::MpoInit::Dota,
            _ => named("pissa") || named("loftq"),
        }
    }

    /// Whether `target_modules` selects the module at `path`.
    pub fn target_modules_match(&self, path: &str) -> bool {
        crate::targets::TargetMatcher::for_config(self).is_ok_and(|m| m.matches(path))
    }

    /// The dropout on the adapter's input: `vera_dropout` for VeRA, `lora_dropout` otherwise.
    pub fn dropout(&self) -> f64 {
        match &self.method {
            MethodConfig::Vera(v) => v.vera_dropout,
            _ => self.lora_dropout,
        }
    }

    /// LoftQ's iteration count from `loftq_config` (default 1); only 4-bit LoftQ is implemented.
    pub fn loftq_iter(&self) -> Result<usize> {
        let c = &self.loftq_config;
        if let Some(bits) = c.get("loftq_bits") {
            if bits.as_u64() != Some(4) {
                return Err(Error::config(format!(
                    "loftq_config.loftq_bits = {bits}: only 4-bit (NF4) LoftQ is implemented"
                )));
            }
        }
        match c.get("loftq_iter") {
            None => Ok(1),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::config(format!(
                        "loftq_config.loftq_iter = {v}: expected a positive integer"
                    ))
                }),
        }
    }

    /// The rank of the module at `path`: its `rank_pattern` entry, else `r`.
    pub fn rank_for(&self, path: &str) -> usize {
        crate::targets::pattern_lookup(&self.rank_pattern, path)
            .map(RankEntry::rank)
            .unwrap_or(self.r)
    }

    /// The α of the module at `path`: its `alpha_pattern` entry, else `lora_alpha`.
    pub fn alpha_for(&self, path: &str) -> f64 {
        crate::targets::pattern_lookup(&self.alpha_pattern, path)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// Reads an `adapter_config.json`: unknown keys are ignored with a warning, features factune does not
    /// implement are errors (never silently dropped).
    pub fn from_file(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        if !path.exists() && dir.join("config.json").exists() {
            return Err(Error::invalid(
                dir,
                "a full model (config.json, no adapter_config.json), not an adapter: pass it as --model",
            ));
        }
        let raw: Value = factune_io::error::read_json(path)?;
        let Value::Object(map) = &raw else {
            return Err(Error::invalid(path, "expected a JSON object"));
        };
        // PEFT writes `null` for every optional field left unset (`"task_type": null` whenever no task type
        // was given): null means "unset", so such keys take factune's default.
        let mut set: Map<String, Value> = map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // PEFT's default method
        set.entry("peft_type")
            .or_insert_with(|| Value::String("LORA".into()));
        if let Some(Value::String(t)) = set.get("peft_type") {
            MethodConfig::named(t).map_err(|e| Error::invalid(path, e.to_string()))?;
        }
        let cfg: AdapterConfig = serde_json::from_value(Value::Object(set))
            .map_err(|e| Error::invalid(path, format!("invalid adapter config: {e}")))?;
        let mut own: Vec<String> = match serde_json::to_value(AdapterConfig::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => vec![],
        };
        for k in cfg.method.keys() {
            own.push(k.name.to_string());
            own.extend(k.aliases.iter().map(|a| a.to_string()));
        }
        // skipped when unset, so not among the default's keys
        own.push("exclude_modules".into());
        for (k, v) in map {
            if own.contains(k) || METADATA.contains(&k.as_str()) {
                continue;
            }
            if FEATURES_OFF.contains(&k.as_str()) {
                if is_default(v) {
                    continue;
                }
                return Err(Error::invalid(
                    path,
                    format!("`{k}: {v}` is not supported by factune yet"),
                ));
            }
            tracing::warn!("{}: ignoring unknown key `{k}`", path.display());
        }
        cfg.check(path)?;
        Ok(cfg)
    }

    pub fn check(&self, path: &Path) -> Result<()> {
        if self.bias != "none" {
            return Err(Error::invalid(
                path,
                format!("bias `{}` is not supported; use bias: none", self.bias),
            ));
        }
        crate::targets::TargetMatcher::for_config(self)
            .map_err(|e| Error::invalid(path, e.to_string()))?;
        if self.modules_to_save.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(Error::invalid(path, "modules_to_save is not supported yet"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::invalid(
                path,
                format!("lora_dropout must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        if self.r == 0 {
            return Err(Error::invalid(path, "r must be > 0"));
        }
        Ok(())
    }

    /// The JSON factune writes: only keys PEFT >= 0.10 accepts for the method (a VeRA config has no LoRA keys).
    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self)
            .map_err(|e| Error::config(format!("adapter config: {e}")))?;
        // LoRA's own keys, which VeRA lacks; the prompt family also lacks the linear layers' keys
        const LORA: &[&str] = &[
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "use_dora",
            "init_lora_weights",
            "rank_pattern",
            "alpha_pattern",
            "loftq_config",
        ];
        const LINEAR: &[&str] = &[
            "r",
            "target_modules",
            "bias",
            "fan_in_fan_out",
            "layers_to_transform",
            "layers_pattern",
            "exclude_modules",
        ];
        let drop: Vec<&str> = if self.method.method().attachment().is_prompt() {
            LORA.iter().chain(LINEAR).copied().collect()
        } else if matches!(self.method, MethodConfig::Vera(_)) {
            LORA.to_vec()
        } else {
            Vec::new()
        };
        if let Value::Object(m) = &mut v {
            for k in drop {
                m.remove(k);
            }
        }
        serde_json::to_string_pretty(&v).map_err(|e| Error::config(format!("adapter config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<AdapterConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("adapter_config.json");
        std::fs::write(&p, json).unwrap();
        AdapterConfig::from_file(&p)
    }

    #[test]
    fn peft_metadata_reads_and_features_in_use_are_refused() {
        let cfg = read(
            r#"{"peft_type": "LORA", "r": 4, "peft_version": "0.21.2", "megatron_core": "megatron.core",
                "qalora_group_size": 16, "exclude_modules": null, "use_qalora": false}"#,
        )
        .unwrap();
        assert_eq!(cfg.r, 4);
        let err = read(r#"{"peft_type": "LORA", "use_qalora": true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`use_qalora: true` is not supported"), "{err}");
        let err = read(r#"{"peft_type": "LORA", "trainable_token_indices": [1, 2]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("trainable_token_indices"), "{err}");
    }
}
