//! The training configuration: a flat TOML file whose keys are PEFT's and transformers' names, and the same
//! keys as CLI flags (`--learning-rate 1e-4`), generated from one list so the two never drift apart.

use crate::peft_type::PeftType;
use factune_adapters::{AdapterConfig, MethodConfig, TargetModules};
pub use factune_data::DataFormat;
use factune_io::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `target_modules`: `["q_proj", "v_proj"]` in TOML, `q_proj,v_proj` on the command line or as a TOML
/// string (read the same way), `all-linear`, or a regex.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    One(String),
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            One(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "`target_modules` must be a list of module names, a comma-separated string, all-linear or a regex",
            )
        })? {
            Raw::List(l) => Ok(Targets::List(l)),
            Raw::One(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for Targets {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.contains(',') {
            Ok(Targets::List(
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect(),
            ))
        } else if s == "all-linear" || s.contains(['*', '(', '|', '\\']) {
            Ok(Targets::One(s.to_string()))
        } else {
            Ok(Targets::List(vec![s.to_string()]))
        }
    }
}

/// PEFT's `layers_to_transform`: a layer index or a list of them in TOML, `0,2,5` as a flag (empty: every
/// layer).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Layers(pub Vec<usize>);

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(usize),
            List(Vec<usize>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "`layers_to_transform` must be a layer index or a list of them",
            )
        })? {
            Raw::One(i) => Ok(Layers(vec![i])),
            Raw::List(l) => Ok(Layers(l)),
        }
    }
}

impl std::str::FromStr for Layers {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().map_err(|_| format!("`{x}` is not a layer index")))
            .collect::<std::result::Result<_, _>>()
            .map(Layers)
    }
}

/// Values by module-name regex (PEFT's `rank_pattern`, `alpha_pattern`): a TOML table, or `key=value,…` as a
/// flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Patterns<T>(pub BTreeMap<String, T>);

impl<T> Default for Patterns<T> {
    fn default() -> Self {
        Patterns(BTreeMap::new())
    }
}

impl<T: std::str::FromStr> std::str::FromStr for Patterns<T> {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut out = BTreeMap::new();
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected MODULE_REGEX=VALUE"))?;
            let v = v
                .trim()
                .parse()
                .map_err(|_| format!("`{item}`: `{}` is not a valid value", v.trim()))?;
            out.insert(k.trim().to_string(), v);
        }
        Ok(Patterns(out))
    }
}

/// `init_lora_weights`: `true` (Kaiming A, zero B), `false` (random B too), or a named init such as `"pissa"`
/// or `"pissa_niter_4"`; TOML takes a bool or a string, the flag takes the same words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitWeights {
    Flag(bool),
    Named(String),
}

impl std::str::FromStr for InitWeights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "true" => InitWeights::Flag(true),
            "false" => InitWeights::Flag(false),
            other => InitWeights::Named(other.to_string()),
        })
    }
}

/// Expands `$callback!` with the list of training settings (`doc`, name, TOML alias, type, default): the one
/// place a training key is declared. A method's own keys take their defaults from the method's config struct
/// (its module holds them once). [`TrainConfig`] is generated from it here, the CLI's flags in the CLI.
#[macro_export]
macro_rules! with_train_keys {
    ($callback:ident) => {
        $callback! {
        /// Adapter method (PEFT's peft_type), or full for full-parameter training; also accepted as `method`
        /// online_lora for Online-LoRA's task-free continual learning over the data as a stream
        peft_type | "method": $crate::peft_type::PeftType = $crate::peft_type::PeftType::LORA,
        /// Adapter rank
        r: usize = 8,
        /// LoRA alpha (scale = alpha / r)
        lora_alpha: f64 = 16.0,
        /// LoRA: ranks of the modules whose name matches a regex key, others take r (PEFT's rank_pattern;
        /// TOML table `{ v_proj = 4 }`, flag `v_proj=4,o_proj=2`)
        rank_pattern: $crate::config::Patterns<usize> = $crate::config::Patterns::default(),
        /// LoRA: alphas of the modules whose name matches a regex key, others take lora_alpha (PEFT's alpha_pattern)
        alpha_pattern: $crate::config::Patterns<f64> = $crate::config::Patterns::default(),
        /// Dropout on the adapter input
        lora_dropout: f64 = 0.05,
        /// Modules to adapt: names, a regex, or all-linear
        target_modules: $crate::config::Targets = $crate::config::Targets::List(vec!["q_proj".into(), "v_proj".into()]),
        /// Modules never adapted, even when target_modules selects them: names (suffixes) or a regex (PEFT's
        /// exclude_modules)
        exclude_modules: $crate::config::Targets = $crate::config::Targets::List(vec![]),
        /// Adapt only these layer indexes (PEFT's layers_to_transform; with target_modules names or all-linear)
        layers_to_transform: $crate::config::Layers = $crate::config::Layers::default(),
        /// The module-list name before the layer index (PEFT's layers_pattern: layers, h, …; empty: any)
        layers_pattern: String = String::new(),
        /// rsLoRA scaling alpha / sqrt(r)
        use_rslora: bool = false,
        /// DoRA: trainable per-row magnitude over the LoRA-updated direction
        use_dora: bool = false,
        /// true: Kaiming A, zero B (a no-op at step 0); false: random B too; pissa / pissa_niter_K: principal
        /// singular directions of W (exact / randomised SVD with K power iterations), residual frozen
        init_lora_weights: $crate::config::InitWeights = $crate::config::InitWeights::Flag(true),
        /// Peak learning rate
        learning_rate: f64 = 2e-4,
        /// LoRA+: learning rate of every B factor = this × learning_rate (1 = plain LoRA; the paper uses ~16)
        loraplus_lr_ratio: f64 = 1.0,
        /// AdamW beta1
        adam_beta1: f64 = 0.9,
        /// AdamW beta2
        adam_beta2: f64 = 0.999,
        /// AdamW epsilon
        adam_epsilon: f64 = 1e-8,
        /// Decoupled weight decay
        weight_decay: f64 = 0.0,
        /// cosine, linear or constant (after warmup)
        lr_scheduler_type: $crate::optim::SchedulerType = $crate::optim::SchedulerType::Cosine,
        /// Linear warmup steps
        warmup_steps: usize = 0,
        /// Warmup as a fraction of max_steps (used when warmup_steps is 0)
        warmup_ratio: f64 = 0.0,
        /// Optimizer steps to run; -1: as many as num_train_epochs passes over the training examples take (set
        /// when num_train_epochs is given without max_steps; a positive max_steps sets the length, as in
        /// transformers)
        max_steps: i64 = 100,
        /// Passes over the training examples (transformers' name), used when max_steps is -1: the run takes
        /// ceil(epochs × examples / (micro_batch_size × gradient_accumulation_steps)) steps
        num_train_epochs: f64 = 0.0,
        /// Clip the global gradient norm (0 disables)
        max_grad_norm: f64 = 1.0,
        /// Keep activations only at block boundaries and recompute each block in the backward (one extra forward
        /// per step for a fraction of the activation memory; same results)
        gradient_checkpointing: bool = false,
        /// Micro-batches per optimizer step
        gradient_accumulation_steps: usize = 1,
        /// Sequences per micro-batch (transformers: per_device_train_batch_size)
        micro_batch_size | "per_device_train_batch_size": usize = 4,
        /// Tokens per sequence (longer examples are truncated, text is packed to this length; TRL:
        /// max_length, max_seq_length)
        seq_len | "max_length" | "max_seq_length": usize = 256,
        /// Seed of adapter initialisation
        seed: u64 = 42,
        /// Seed of data shuffling and the train/validation split
        data_seed: u64 = 42,
        /// Seed of dropout masks
        dropout_seed: u64 = 42,
        /// Validation loss every N steps (0: only at the end)
        eval_steps: usize = 0,
        /// Checkpoint every N steps (0: none)
        save_steps: usize = 0,
        /// Keep only the newest N checkpoints, deleting older ones as new ones are written (0: keep all)
        save_total_limit: usize = 0,
        /// The result is the trainable values of the evaluation (every eval_steps steps and the end) with the
        /// lowest validation loss, not the last step's
        load_best_model_at_end: bool = false,
        /// What picks the best evaluation and stops early: eval_loss (validation loss, lower is better), the
        /// one metric a run measures
        metric_for_best_model: String = "eval_loss".into(),
        /// Stop after this many evaluations in a row without an improvement larger than
        /// early_stopping_threshold (transformers' EarlyStoppingCallback; 0: never)
        early_stopping_patience: usize = 0,
        /// The improvement of the validation loss over the best so far that resets early_stopping_patience
        early_stopping_threshold: f64 = 0.0,
        /// Fraction of examples held out for validation
        validation_split: f64 = 0.1,
        /// A separate validation file (TRL's eval_dataset), read like the training data: every training example
        /// trains, and validation_split must stay at its default or be 0
        eval_data: String = String::new(),
        /// How the data file is read: auto (from its extension and content), text, jsonl, json, csv, tsv or
        /// parquet; alpaca or chat force the record shape
        data_format: $crate::config::DataFormat = $crate::config::DataFormat::Auto,
        /// Field of a text record (TRL's name)
        dataset_text_field: String = "text".into(),
        /// Field of a prompt/completion record's prompt
        prompt_field: String = "prompt".into(),
        /// Field of a prompt/completion record's completion
        completion_field: String = "completion".into(),
        /// Field of a chat record's list of {role, content} messages
        messages_field: String = "messages".into(),
        /// Skip examples whose every label token lies past seq_len instead of refusing the data
        allow_truncated_labels: bool = false,
        /// Also train on prompt tokens of instruction/chat data
        train_on_prompt: bool = false,
        /// ReLoRA: every N steps merge W ← W + sBA, re-initialise A and B, prune optimizer state (0: off)
        relora_steps: usize = 0,
        /// ReLoRA: linear learning-rate warmup after each restart (inside the global schedule)
        restart_warmup_steps: usize = 10,
        /// ReLoRA: fraction of A/B optimizer moments zeroed at a restart, smallest magnitudes first (1: full reset)
        optimizer_prune_ratio: f64 = 0.99,
        /// Full-rank training for the first N steps, then adapters (ReLoRA's warm start)
        warm_start_steps: usize = 0,
        /// Also train embeddings, norms and the LM head alongside the adapters (output is then a full model)
        train_embeddings_and_norms: bool = false,
        /// `nf4`: hold the frozen linear weights in 4-bit NF4 and train the adapters on top (QLoRA); `mixed`: a
        /// NormalFloat width per weight (NF3/NF4/NF8) chosen to fit `quant_budget_bits` (LQ-LoRA); `none` keeps
        /// them as stored. Weights a checkpoint already stores in 4 bits stay 4-bit either way.
        quantize: $crate::config::Quantize = $crate::config::Quantize::None,
        /// Dtype the frozen linear weights are held in: `float32`, or `bfloat16` for half the memory (the matmuls
        /// convert tiles of rows to f32 on the fly; compute stays f32). Ignored for weights held in 4 bits.
        base_dtype | "torch_dtype": $crate::config::BaseDtype = $crate::config::BaseDtype::Float32,
        /// `quantize = "mixed"`: average stored bits per frozen linear weight, block scales included.
        quant_budget_bits: f64 = 4.0,
        /// Double quantization of the NF4 block scales (8-bit, block 256): ≈ 4.127 instead of 4.5 bits per weight.
        double_quant | "bnb_4bit_use_double_quant": bool = true,
        /// LoftQ (`init_lora_weights = "loftq"`): alternations of quantise / rank-r SVD of the residual.
        loftq_iter: usize = 1,
        /// EVA (`init_lora_weights = "eva"`): micro-batches whose layer inputs give the principal directions.
        eva_batches: usize = 4,
        /// EVA: each layer may take up to round(r · eva_rho) components in the rank redistribution (1: none).
        eva_rho: f64 = 2.0,
        /// EVA: divide each direction by the square root of its singular value.
        eva_whiten: bool = false,
        /// Online-LoRA: further data files after --data, comma-separated, read after it in order as one
        /// stream; each file is a segment whose held-out examples (validation_split of it) measure forgetting
        stream_data: String = String::new(),
        /// Online-LoRA: steps in the loss window whose mean and variance detect a plateau
        loss_window_length: usize = 5,
        /// Online-LoRA: a plateau's window mean is below this
        loss_window_mean_threshold: f64 = 6.0,
        /// Online-LoRA: a plateau's window variance is below this
        loss_window_variance_threshold: f64 = 0.1,
        /// Online-LoRA: the hardest (highest-loss) recent examples replayed with every step
        hard_buffer_size: usize = 4,
        /// Online-LoRA: weight of the importance-weighted penalty (mas_weight / 2) Σ Ω (θ − θ₀)²
        mas_weight: f64 = 2000.0,
        }
    };
}

factune_io::choice! {
    /// How the frozen linear weights are held: as stored, NF4 (QLoRA), or a NormalFloat width per weight.
    pub enum Quantize for "quantize" {
        None = "none",
        Nf4 = "nf4",
        Mixed = "mixed",
    }
}

factune_io::choice! {
    /// The dtype the dense frozen linear weights are held in (compute is f32 either way).
    pub enum BaseDtype for "base_dtype" {
        Float32 = "float32" | "f32",
        Bfloat16 = "bfloat16" | "bf16",
    }
}

impl BaseDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            BaseDtype::Float32 => candle_core::DType::F32,
            BaseDtype::Bfloat16 => candle_core::DType::BF16,
        }
    }
}

/// The methods' own keys in a run config, checked as they are read: each must be some method's key.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct MethodKeys(pub BTreeMap<String, serde_json::Value>);

impl<'de> Deserialize<'de> for MethodKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut keys = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        for (k, v) in &keys {
            if owner_of(k).is_some() {
                continue;
            }
            match crate::foreign::check(k, v) {
                Some(Ok(())) => {}
                Some(Err(why)) => return Err(serde::de::Error::custom(why)),
                None => return Err(serde::de::Error::custom(unknown_key(k))),
            }
        }
        // PEFT/TRL keys whose value is what factune does anyway say nothing more.
        keys.retain(|k, _| owner_of(k).is_some());
        Ok(MethodKeys(keys))
    }
}

/// The method a key belongs to (the first, for a key two methods share).
fn owner_of(key: &str) -> Option<&'static str> {
    MethodConfig::ALL_KEYS
        .iter()
        .find(|(_, keys)| {
            keys.iter()
                .any(|k| k.name == key || k.aliases.contains(&key))
        })
        .map(|(t, _)| *t)
}

/// `unknown key `learning_rat` (did you mean `learning_rate`?)`.
fn unknown_key(key: &str) -> String {
    let known = TrainConfig::KEYS.iter().copied().chain(
        MethodConfig::ALL_KEYS
            .iter()
            .flat_map(|(_, keys)| keys.iter().map(|k| k.name)),
    );
    let best = known
        .map(|k| (edit_distance(key, k), k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 4));
    match best {
        Some((_, k)) => format!("unknown key `{key}` (did you mean `{k}`?)"),
        None => format!("unknown key `{key}`"),
    }
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

macro_rules! train_config {
    ($( $(#[doc = $doc:literal])* $name:ident $(| $alias:literal)* : $ty:ty = $default:expr ),* $(,)?) => {
        /// Every setting of a training run. Unknown keys in a TOML file are errors that name the key.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default)]
        pub struct TrainConfig {
            $( $(#[doc = $doc])* $(#[serde(alias = $alias)])* pub $name: $ty, )*
            /// The method's own keys (`bond_dim`, `d_initial`, …), flat beside the others; declared, with their
            /// defaults, by the method's config struct.
            #[serde(flatten)]
            pub method_keys: MethodKeys,
        }

        impl Default for TrainConfig {
            fn default() -> Self {
                TrainConfig { $( $name: $default, )* method_keys: MethodKeys::default() }
            }
        }

        impl TrainConfig {
            /// The training keys (the method's own come from `MethodConfig::ALL_KEYS`).
            pub const KEYS: &'static [&'static str] = &[$( stringify!($name) ),*];
            /// Other spellings a TOML file may use, with the key each stands for.
            pub const ALIASES: &'static [(&'static str, &'static str)] =
                &[$( $( ($alias, stringify!($name)), )* )*];
        }
    };
}

with_train_keys!(train_config);

impl TrainConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        Ok(Self::from_toml_file_with_keys(path)?.0)
    }

    /// The config a TOML file gives, and the keys it names (aliases as the keys they stand for).
    pub fn from_toml_file_with_keys(path: &Path) -> Result<(Self, Vec<String>)> {
        let text = factune_io::error::read_to_string(path)?;
        let invalid =
            |e: toml::de::Error| Error::invalid(path, format!("invalid training config: {e}"));
        let table: toml::Table = toml::from_str(&text).map_err(invalid)?;
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(invalid)?;
        let keys: Vec<String> = table
            .keys()
            .map(|k| {
                Self::ALIASES
                    .iter()
                    .find(|(alias, _)| alias == k)
                    .map_or(k.clone(), |(_, key)| key.to_string())
            })
            .collect();
        cfg.settle_length(&keys);
        Ok((cfg, keys))
    }

    /// The fully resolved config as TOML: every training key and the method's own keys, defaults included
    /// (`factune train --print-config`); reading it back gives the same run.
    pub fn resolved_toml(&self) -> Result<String> {
        let mut c = self.clone();
        if !self.is_full() {
            // The values the run uses: given, implied by a training key (vera_dropout), or defaults.
            for (k, v) in self.adapter_config()?.method.defaults() {
                c.method_keys.0.entry(k).or_insert(v);
            }
        }
        toml::to_string(&c)
            .map_err(|e| Error::config(format!("cannot write the config as TOML: {e}")))
    }

    /// The adapter method's `peft_type` (Online-LoRA trains LoRA pairs; a full run has LoRA's config).
    pub fn method_type(&self) -> &'static str {
        self.peft_type.adapter()
    }

    /// `peft_type = "online_lora"`: Online-LoRA's task-free continual learning over the data as a stream.
    pub fn is_online(&self) -> bool {
        self.peft_type == PeftType::OnlineLora
    }

    /// Online-LoRA's settings.
    pub fn online_settings(&self) -> crate::online::OnlineSettings {
        crate::online::OnlineSettings {
            loss_window_length: self.loss_window_length,
            loss_window_mean_threshold: self.loss_window_mean_threshold,
            loss_window_variance_threshold: self.loss_window_variance_threshold,
            hard_buffer_size: self.hard_buffer_size,
            mas_weight: self.mas_weight,
            micro_batch_size: self.micro_batch_size,
            seed: self.seed,
        }
    }

    /// Online-LoRA's keys: in range, and only with `peft_type = "online_lora"`, which trains plain LoRA pairs
    /// one micro-batch of the stream at a time and merges them into dense weights.
    fn check_online(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::config(format!("`{k}`: {why}")));
        let d = TrainConfig::default();
        let keys = [
            ("stream_data", self.stream_data != d.stream_data),
            (
                "loss_window_length",
                self.loss_window_length != d.loss_window_length,
            ),
            (
                "loss_window_mean_threshold",
                self.loss_window_mean_threshold != d.loss_window_mean_threshold,
            ),
            (
                "loss_window_variance_threshold",
                self.loss_window_variance_threshold != d.loss_window_variance_threshold,
            ),
            (
                "hard_buffer_size",
                self.hard_buffer_size != d.hard_buffer_size,
            ),
            ("mas_weight", self.mas_weight != d.mas_weight),
        ];
        if !self.is_online() {
            return match keys.iter().find(|(_, given)| *given) {
                Some((k, _)) => bad(
                    k,
                    &format!(
                        "a setting of Online-LoRA (peft_type = \"online_lora\"), not of \"{}\"",
                        self.peft_type
                    ),
                ),
                None => Ok(()),
            };
        }
        if self.loss_window_length == 0 {
            return bad("loss_window_length", "must be at least 1");
        }
        for (k, x) in [
            (
                "loss_window_mean_threshold",
                self.loss_window_mean_threshold,
            ),
            (
                "loss_window_variance_threshold",
                self.loss_window_variance_threshold,
            ),
            ("mas_weight", self.mas_weight),
        ] {
            if !(x.is_finite() && x >= 0.0) {
                return bad(
                    k,
                    &format!("{x} is out of range: must be a finite number >= 0"),
                );
            }
        }
        let conflicts = [
            ("gradient_accumulation_steps", self.gradient_accumulation_steps != 1, "the stream updates after every micro-batch; must be 1"),
            ("eval_data", !self.eval_data.is_empty(), "each stream file holds out its own validation examples (validation_split); give no eval_data"),
            ("use_dora", self.use_dora, "Online-LoRA merges plain LoRA pairs into the weights; DoRA's magnitude has no such merge"),
            ("relora_steps", self.relora_steps > 0, "Online-LoRA merges at loss plateaus, not on a schedule"),
            ("warm_start_steps", self.warm_start_steps > 0, "Online-LoRA starts with LoRA pairs on the stream"),
            ("train_embeddings_and_norms", self.train_embeddings_and_norms, "Online-LoRA trains LoRA pairs only"),
            ("quantize", self.quantize != Quantize::None, "the pairs are merged into dense weights; a 4-bit base would be re-quantised at every plateau"),
            ("rank_pattern", !self.rank_pattern.0.is_empty(), "the final adapter stacks every pair at one rank; give r only"),
            ("alpha_pattern", !self.alpha_pattern.0.is_empty(), "the final adapter stacks every pair at one alpha; give lora_alpha only"),
            ("init_lora_weights", matches!(self.init_lora_weights, InitWeights::Named(_)), "each new pair starts as plain LoRA (true or false); a data- or SVD-based init would rebuild the base"),
            ("validation_split", self.validation_split == 0.0, "every stream file needs held-out examples to measure forgetting; must be > 0"),
        ];
        match conflicts.iter().find(|(_, c, _)| *c) {
            Some((k, _, why)) => bad(k, why),
            None => Ok(()),
        }
    }

    /// `peft_type = "full"`: every weight is trained (pre-training, baselines).
    pub fn is_full(&self) -> bool {
        self.peft_type == PeftType::Full
    }

    /// Whether training changes the base model's own tensors, so the result is a full model, not an adapter.
    pub fn changes_base(&self) -> bool {
        self.is_full()
            || self.is_online()
            || self.relora_steps > 0
            || self.warm_start_steps > 0
            || self.train_embeddings_and_norms
    }

    /// How the frozen linears are held in 4 bits, if they are.
    pub fn nf4_options(&self) -> Option<factune_model::Nf4Options> {
        (self.quantize != Quantize::None).then_some(factune_model::Nf4Options {
            double_quant: self.double_quant,
        })
    }

    /// How the model loads: 4-bit (unless `defer_quantize`: an init that reads the dense weights, or a
    /// mixed-precision plan, quantises after it) and the dtype of the dense frozen weights.
    pub fn load_options(&self, defer_quantize: bool) -> factune_model::LoadOptions {
        factune_model::LoadOptions::planned(
            self.nf4_options(),
            defer_quantize,
            self.base_dtype.dtype(),
        )
    }

    /// The memory budget of a mixed-precision base, if the base is mixed.
    pub fn mixed_budget(&self) -> Option<f64> {
        (self.quantize == Quantize::Mixed).then_some(self.quant_budget_bits)
    }

    /// LoftQ computes the 4-bit base from the full-precision weight, so the model loads unquantised.
    pub fn is_loftq(&self) -> bool {
        matches!(&self.init_lora_weights, InitWeights::Named(s) if s == "loftq")
    }

    /// Keeps only the keys of the run's own method: configs saved before the methods' configs were typed
    /// (checkpoints, run.json) hold every method's keys at their defaults.
    pub fn retain_own_method_keys(&mut self) {
        if let Ok(method) = MethodConfig::named(self.method_type()) {
            let own = method.keys();
            self.method_keys.0.retain(|key, _| {
                own.iter()
                    .any(|k| k.name == key || k.aliases.contains(&key.as_str()))
            });
        } else {
            self.method_keys.0.clear();
        }
    }

    /// How the data file becomes examples.
    pub fn data_options(&self) -> factune_data::DataOptions {
        factune_data::DataOptions {
            format: self.data_format,
            fields: factune_data::Fields {
                text: self.dataset_text_field.clone(),
                prompt: self.prompt_field.clone(),
                completion: self.completion_field.clone(),
                messages: self.messages_field.clone(),
            },
            seq_len: self.seq_len,
            train_on_prompt: self.train_on_prompt,
            allow_truncated_labels: self.allow_truncated_labels,
        }
    }

    /// `rank_pattern`/`alpha_pattern`: plain LoRA only (the other methods and inits size their factors from
    /// `r`), keys that compile as regexes, ranks > 0 and finite alphas.
    fn check_patterns(&self) -> Result<()> {
        let given: [(&str, Vec<&String>); 2] = [
            ("rank_pattern", self.rank_pattern.0.keys().collect()),
            ("alpha_pattern", self.alpha_pattern.0.keys().collect()),
        ];
        let plain_lora = (self.method_type() == "LORA")
            && matches!(self.init_lora_weights, InitWeights::Flag(_))
            && self.relora_steps == 0;
        for (key, patterns) in given {
            if !patterns.is_empty() && !plain_lora {
                return Err(Error::config(format!(
                    "`{key}` applies to peft_type = \"LORA\" with init_lora_weights true or false and no ReLoRA"
                )));
            }
            for p in patterns {
                if let Err(e) = regex::Regex::new(p) {
                    return Err(Error::config(format!("`{key}`: `{p}` is not a regex: {e}")));
                }
            }
        }
        if let Some((k, _)) = self.rank_pattern.0.iter().find(|(_, r)| **r == 0) {
            return Err(Error::config(format!(
                "`rank_pattern`: `{k}` has rank 0; leave the module out of target_modules instead"
            )));
        }
        if let Some((k, a)) = self.alpha_pattern.0.iter().find(|(_, a)| !a.is_finite()) {
            return Err(Error::config(format!(
                "`alpha_pattern`: `{k}` = {a} is not a finite number"
            )));
        }
        Ok(())
    }

    /// The run's length in optimizer steps (0 while it is still to come from `num_train_epochs`).
    pub fn total_steps(&self) -> usize {
        usize::try_from(self.max_steps).unwrap_or(0)
    }

    /// `max_steps` positive, or -1 with `num_train_epochs` to give the length.
    fn check_length(&self) -> Result<()> {
        let e = self.num_train_epochs;
        if !(e.is_finite() && e >= 0.0) {
            return Err(Error::config(format!(
                "`num_train_epochs`: {e} is out of range: must be a finite number >= 0"
            )));
        }
        match self.max_steps {
            -1 if e == 0.0 => Err(Error::config(
                "`max_steps = -1` trains for num_train_epochs passes over the data; set num_train_epochs (transformers' default is 3) or a positive max_steps",
            )),
            -1 => Ok(()),
            n if n > 0 => Ok(()),
            n => Err(Error::config(format!(
                "`max_steps`: {n} is out of range: must be > 0, or -1 for num_train_epochs"
            ))),
        }
    }

    /// `load_best_model_at_end` and early stopping: validation loss, evaluations during the run, and
    /// trainable values that mean the same at the end as when they were measured.
    fn check_best(&self) -> Result<()> {
        if !["eval_loss", "loss", "val_loss"].contains(&self.metric_for_best_model.as_str()) {
            return Err(Error::config(format!(
                "`metric_for_best_model`: `{}` is not measured; a run measures eval_loss (validation loss)",
                self.metric_for_best_model
            )));
        }
        let t = self.early_stopping_threshold;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::config(format!(
                "`early_stopping_threshold`: {t} is out of range: must be a finite number >= 0"
            )));
        }
        let key = if self.load_best_model_at_end {
            "load_best_model_at_end"
        } else if self.early_stopping_patience > 0 {
            "early_stopping_patience"
        } else {
            return Ok(());
        };
        let why = if self.eval_steps == 0 {
            "needs evaluations during the run: set eval_steps"
        } else if self.validation_split == 0.0 && self.eval_data.is_empty() {
            "needs validation data: validation_split > 0 or eval_data"
        } else if self.load_best_model_at_end
            && (self.relora_steps > 0
                || self.warm_start_steps > 0
                || self.peft_type == PeftType::Adapter("ADALORA"))
        {
            "cannot go back to an earlier step's values when ReLoRA merges, a warm start switches or AdaLoRA \
             prunes ranks during the run"
        } else {
            return Ok(());
        };
        Err(Error::config(format!("`{key}` {why}")))
    }

    /// The length the keys `given` (TOML keys, flags) ask for: `num_train_epochs` given without `max_steps`
    /// sets the length, as in transformers, where `max_steps` defaults to -1.
    pub fn settle_length(&mut self, given: &[String]) {
        let has = |k: &str| given.iter().any(|g| g == k);
        if has("num_train_epochs") && !has("max_steps") {
            self.max_steps = -1;
        }
        // a stream is read once: its length sets the run's unless max_steps cuts it short
        if self.is_online() && !has("max_steps") {
            self.max_steps = -1;
            if !has("num_train_epochs") {
                self.num_train_epochs = 1.0;
            }
        }
    }

    /// Fixes `max_steps` from `num_train_epochs` once the training examples are counted; returns what the run
    /// then does, or why the length cannot be met.
    pub fn resolve_length(&mut self, train_examples: usize) -> Result<Option<String>> {
        if self.is_online() {
            let pass = train_examples.div_ceil(self.micro_batch_size.max(1));
            if self.max_steps == -1 && self.num_train_epochs != 1.0 {
                return Err(Error::config(format!(
                    "`num_train_epochs`: {}: Online-LoRA reads the stream once (1)",
                    self.num_train_epochs
                )));
            }
            if self.max_steps > pass as i64 {
                return Err(Error::config(format!(
                    "`max_steps`: {} is more than the stream's single pass of {pass} steps ({train_examples} examples, \
                     micro_batch_size {}); Online-LoRA reads the stream once",
                    self.max_steps, self.micro_batch_size
                )));
            }
            if self.max_steps == -1 {
                self.max_steps = pass as i64;
            }
            return Ok(Some(format!(
                "Online-LoRA: {} steps over a stream of {train_examples} examples, in order",
                self.max_steps
            )));
        }
        if self.max_steps != -1 {
            return Ok((self.num_train_epochs > 0.0).then(|| {
                format!(
                    "max_steps {} sets the run's length; num_train_epochs {} applies only with max_steps = -1",
                    self.max_steps, self.num_train_epochs
                )
            }));
        }
        let per_step = (self.micro_batch_size * self.gradient_accumulation_steps) as f64;
        let steps = (self.num_train_epochs * train_examples as f64 / per_step).ceil();
        if !(1.0..i64::MAX as f64).contains(&steps) {
            return Err(Error::config(format!(
                "num_train_epochs {} over {train_examples} training examples gives {steps} steps of {per_step} examples: nothing to train or out of range",
                self.num_train_epochs
            )));
        }
        self.max_steps = steps as i64;
        Ok(Some(format!(
            "num_train_epochs {}: {} steps of {} examples (micro_batch_size × gradient_accumulation_steps) over {train_examples} training examples",
            self.num_train_epochs, self.max_steps, per_step
        )))
    }

    /// What the shared training step reads.
    pub fn step_settings(&self) -> crate::step::StepSettings {
        crate::step::StepSettings {
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            gradient_checkpointing: self.gradient_checkpointing,
            max_grad_norm: self.max_grad_norm,
            loraplus_lr_ratio: self.loraplus_lr_ratio,
            dropout_seed: self.dropout_seed,
        }
    }

    pub fn warmup(&self) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * self.total_steps() as f64).ceil() as usize
        }
    }

    /// Checks the settings together, before anything is loaded: a run that cannot do what they say fails
    /// here, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::config(format!("`{k}`: {why}")));
        // Numbers a run multiplies by or divides through: NaN and infinities never mean anything here, and
        // a value out of its range trains something other than what was asked.
        let in_range = [
            (
                "lora_alpha",
                self.lora_alpha,
                f64::MIN,
                f64::MAX,
                "a finite number",
            ),
            (
                "lora_dropout",
                self.lora_dropout,
                0.0,
                1.0 - f64::EPSILON,
                "in [0, 1)",
            ),
            (
                "adam_beta1",
                self.adam_beta1,
                0.0,
                1.0 - f64::EPSILON,
                "in [0, 1)",
            ),
            (
                "adam_beta2",
                self.adam_beta2,
                0.0,
                1.0 - f64::EPSILON,
                "in [0, 1)",
            ),
            (
                "adam_epsilon",
                self.adam_epsilon,
                f64::MIN_POSITIVE,
                f64::MAX,
                "a positive number",
            ),
            (
                "weight_decay",
                self.weight_decay,
                0.0,
                f64::MAX,
                "a finite number >= 0",
            ),
            ("warmup_ratio", self.warmup_ratio, 0.0, 1.0, "in [0, 1]"),
            (
                "max_grad_norm",
                self.max_grad_norm,
                0.0,
                f64::MAX,
                "a finite number >= 0 (0 disables clipping)",
            ),
        ];
        for (k, x, lo, hi, what) in in_range {
            if !(x.is_finite() && (lo..=hi).contains(&x)) {
                return bad(k, &format!("{x} is out of range: must be {what}"));
            }
        }
        if !self.is_full() {
            self.adapter_config()?;
            let method = MethodConfig::named(self.method_type())?;
            for key in self.method_keys.0.keys() {
                if !method
                    .keys()
                    .iter()
                    .any(|k| k.name == key || k.aliases.contains(&key.as_str()))
                {
                    let owner = owner_of(key).unwrap_or("another method");
                    return bad(
                        key,
                        &format!(
                            "is a setting of {owner}, not of peft_type = \"{}\"",
                            self.peft_type
                        ),
                    );
                }
            }
            self.check_prompt_keys(&method)?;
        }
        self.check_patterns()?;
        self.check_length()?;
        self.check_best()?;
        if self.micro_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad(
                "micro_batch_size/gradient_accumulation_steps",
                "must be > 0",
            );
        }
        if self.seq_len < 2 {
            return bad("seq_len", "must be at least 2");
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return bad("validation_split", "must be in [0, 1)");
        }
        if !self.eval_data.is_empty() && ![0.0, 0.1].contains(&self.validation_split) {
            return bad(
                "validation_split",
                "validation comes from eval_data; set one of validation_split and eval_data, not both",
            );
        }
        if !(self.loraplus_lr_ratio.is_finite() && self.loraplus_lr_ratio > 0.0) {
            return bad("loraplus_lr_ratio", "must be a finite positive number");
        }
        if self.is_full() && self.loraplus_lr_ratio != 1.0 {
            return bad(
                "loraplus_lr_ratio",
                "applies to LoRA-shaped adapters, not to full-parameter training",
            );
        }
        self.check_online()?;
        if self.relora_steps > 0 {
            if self.is_full() || self.is_online() || self.method_type() != "LORA" {
                return bad(
                    "relora_steps",
                    &format!("ReLoRA merges and re-initialises LoRA factors; it needs peft_type = \"LORA\", not \"{}\"", self.peft_type),
                );
            }
            if self.use_dora {
                return bad(
                    "relora_steps",
                    "ReLoRA's merge W ← W + sBA has no DoRA form (the magnitude would be merged too); set use_dora = false",
                );
            }
            if self.restart_warmup_steps >= self.relora_steps {
                return bad(
                    "restart_warmup_steps",
                    "must be smaller than relora_steps (the warmup happens inside each cycle)",
                );
            }
        }
        if !(0.0..=1.0).contains(&self.optimizer_prune_ratio) {
            return bad(
                "optimizer_prune_ratio",
                "must be in [0, 1] (1 resets the moments)",
            );
        }
        if self.warm_start_steps > 0 && self.is_full() {
            return bad(
                "warm_start_steps",
                "switches from full-rank training to adapters; it needs an adapter peft_type, not \"full\"",
            );
        }
        if self.max_steps > 0
            && self.warm_start_steps >= self.total_steps()
            && self.warm_start_steps > 0
        {
            return bad("warm_start_steps", "must be smaller than max_steps");
        }
        if self.quantize == Quantize::Mixed
            && !(self.quant_budget_bits.is_finite() && self.quant_budget_bits > 0.0)
        {
            return bad(
                "quant_budget_bits",
                "must be a positive number of bits per weight",
            );
        }
        if self.quantize != Quantize::None
            && (self.is_full() || self.relora_steps > 0 || self.warm_start_steps > 0)
        {
            return bad(
                "quantize",
                "a 4-bit base is frozen: full-parameter training, ReLoRA merges and warm starts need it in \
                 full precision (set quantize = \"none\")",
            );
        }
        if self.is_loftq() && self.quantize == Quantize::None {
            return bad(
                "init_lora_weights",
                "\"loftq\" initialises the adapter against a quantised base; set quantize = \"nf4\" or \"mixed\"",
            );
        }
        if self.use_dora && self.method_type() != "LORA" {
            return bad(
                "use_dora",
                &format!(
                    "DoRA splits LoRA factors into magnitude and direction; `{}` has none",
                    self.peft_type
                ),
            );
        }
        if self.init_lora_weights == InitWeights::Named("eva".into())
            && (self.eva_batches == 0
                || self.eva_rho.is_nan()
                || self.eva_rho < 1.0
                || self.method_type() != "LORA")
        {
            return bad(
                "init_lora_weights",
                "\"eva\" needs peft_type = \"LORA\", eva_batches >= 1 and eva_rho >= 1",
            );
        }
        if self.is_loftq() && self.loftq_iter == 0 {
            return bad("loftq_iter", "must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad("learning_rate", "must be a finite non-negative number");
        }
        Ok(())
    }

    /// The prompt family adapts no linear layer: a linear adapter's setting moved off its default would be
    /// ignored, so it is an error naming the key.
    fn check_prompt_keys(&self, method: &MethodConfig) -> Result<()> {
        if !method.method().attachment().is_prompt() {
            return Ok(());
        }
        let d = TrainConfig::default();
        let set = [
            ("r", self.r != d.r),
            ("lora_alpha", self.lora_alpha != d.lora_alpha),
            ("lora_dropout", self.lora_dropout != d.lora_dropout),
            ("target_modules", self.target_modules != d.target_modules),
            ("exclude_modules", self.exclude_modules != d.exclude_modules),
            (
                "layers_to_transform",
                self.layers_to_transform != d.layers_to_transform,
            ),
            ("layers_pattern", self.layers_pattern != d.layers_pattern),
            ("use_rslora", self.use_rslora != d.use_rslora),
            ("use_dora", self.use_dora != d.use_dora),
            (
                "init_lora_weights",
                self.init_lora_weights != d.init_lora_weights,
            ),
            (
                "loraplus_lr_ratio",
                self.loraplus_lr_ratio != d.loraplus_lr_ratio,
            ),
            (
                "warm_start_steps",
                self.warm_start_steps != d.warm_start_steps,
            ),
        ];
        match set.iter().find(|(_, changed)| *changed) {
            Some((k, _)) => Err(Error::config(format!(
                "`{k}`: a setting of adapters on linear layers; peft_type = \"{}\" adds virtual tokens and adapts no layer",
                method.peft_type()
            ))),
            None => Ok(()),
        }
    }

    /// The adapter part: the shared PEFT keys and the method's own config (its keys as given, defaults for
    /// the rest), from this run's settings. A full run (`peft_type = "full"`) attaches no adapter; it gets
    /// LoRA's config, which the trainer reads only to attach adapters and their hooks, never for a full run.
    pub fn adapter_config(&self) -> Result<AdapterConfig> {
        let peft_type = self.method_type();
        let defaults = MethodConfig::named(peft_type)?;
        let mut own = serde_json::Map::new();
        own.insert("peft_type".into(), peft_type.into());
        for k in defaults.keys() {
            for name in std::iter::once(&k.name).chain(k.aliases) {
                if let Some(v) = self.method_keys.0.get(*name) {
                    own.insert(name.to_string(), v.clone());
                }
            }
        }
        // Training's own values where the method has a key for them and none was given.
        let implied = [
            ("VERA", "vera_dropout", serde_json::json!(self.lora_dropout)),
            ("ADALORA", "total_step", serde_json::json!(self.max_steps)),
        ];
        for (method, key, value) in implied {
            // a length still to come from num_train_epochs is set once the data is read
            if peft_type == method && value.as_i64() != Some(-1) {
                own.entry(key).or_insert(value);
            }
        }
        let method: MethodConfig = serde_json::from_value(serde_json::Value::Object(own))
            .map_err(|e| Error::config(e.to_string()))?;
        Ok(AdapterConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: match &self.target_modules {
                Targets::List(l) => TargetModules::List(l.clone()),
                Targets::One(s) => TargetModules::Pattern(s.clone()),
            },
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            init_lora_weights: match &self.init_lora_weights {
                InitWeights::Flag(b) => serde_json::Value::Bool(*b),
                InitWeights::Named(s) => serde_json::Value::String(s.clone()),
            },
            loftq_config: if self.is_loftq() {
                serde_json::json!({"loftq_bits": 4, "loftq_iter": self.loftq_iter})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            } else {
                Default::default()
            },
            rank_pattern: self
                .rank_pattern
                .0
                .iter()
                .map(|(k, r)| (k.clone(), factune_adapters::RankEntry::Rank(*r)))
                .collect(),
            alpha_pattern: self.alpha_pattern.0.clone(),
            exclude_modules: match &self.exclude_modules {
                Targets::List(l) if l.is_empty() => None,
                Targets::List(l) => Some(TargetModules::List(l.clone())),
                Targets::One(s) => Some(TargetModules::Pattern(s.clone())),
            },
            layers_to_transform: (!self.layers_to_transform.0.is_empty())
                .then(|| serde_json::json!(self.layers_to_transform.0)),
            layers_pattern: (!self.layers_pattern.is_empty())
                .then(|| serde_json::json!(self.layers_pattern)),
            method,
            ..AdapterConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_give_the_length_unless_max_steps_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let file = |text: &str| {
            let p = dir.path().join("c.toml");
            std::fs::write(&p, text).unwrap();
            TrainConfig::from_toml_file(&p).unwrap()
        };
        let mut c = file("num_train_epochs = 2\nmicro_batch_size = 3");
        assert_eq!(c.max_steps, -1);
        c.validate().unwrap();
        assert!(c.resolve_length(10).unwrap().unwrap().contains("7 steps"));
        assert_eq!(c.max_steps, 7); // ceil(2 × 10 / 3)
        assert_eq!(file("num_train_epochs = 2\nmax_steps = 5").max_steps, 5);
        assert!(file("max_steps = -1").validate().is_err());
        let mut c = file("num_train_epochs = 0.01");
        c.resolve_length(10).unwrap();
        assert_eq!(c.max_steps, 1, "a part of an epoch is at least one step");
        assert!(file("num_train_epochs = -1").validate().is_err());
    }

    #[test]
    fn method_is_an_alias_of_peft_type() {
        let c: TrainConfig = toml::from_str("method = \"full\"").unwrap();
        assert!(c.is_full());
    }

    #[test]
    fn method_keys_belong_to_the_method_and_unknown_ones_are_named() {
        let c: TrainConfig = toml::from_str("peft_type = \"MPO\"\nbond_dim = 4").unwrap();
        c.validate().unwrap();
        let a = c.adapter_config().unwrap();
        let mpo: &factune_adapters::mpo::MpoConfig = a.options().unwrap();
        assert_eq!((mpo.bond_dim, mpo.mpo_modes), (4, 3));
        let c: TrainConfig = toml::from_str("bond_dim = 4").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("bond_dim") && e.contains("MPO") && e.contains("LORA"),
            "{e}"
        );
        let e = toml::from_str::<TrainConfig>("bond_dims = 4")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `bond_dims` (did you mean `bond_dim`?)"),
            "{e}"
        );
    }

    #[test]
    fn saved_configs_with_every_methods_keys_keep_their_own() {
        // a checkpoint written before the method configs were typed: every method's keys at their defaults
        let mut c: TrainConfig = serde_json::from_str(
            r#"{"peft_type": "VERA", "d_initial": 0.2, "bond_dim": 8, "sparse_init": "weight", "deltaT": 1}"#,
        )
        .unwrap();
        c.retain_own_method_keys();
        c.validate().unwrap();
        let a = c.adapter_config().unwrap();
        let v: &factune_adapters::vera::VeraConfig = a.options().unwrap();
        assert_eq!(v.d_initial, 0.2);
        assert_eq!(c.method_keys.0.len(), 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = toml::from_str::<TrainConfig>("learning_rat = 1.0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rat"), "{e}");
    }

    #[test]
    fn non_finite_and_out_of_range_numbers_are_named() {
        for (toml, key) in [
            ("max_grad_norm = inf", "max_grad_norm"),
            ("learning_rate = nan", "learning_rate"),
            ("adam_beta1 = 1.5", "adam_beta1"),
            ("adam_epsilon = -1.0", "adam_epsilon"),
            ("warmup_ratio = 2.0", "warmup_ratio"),
            ("lora_dropout = 1.0", "lora_dropout"),
        ] {
            let c: TrainConfig = toml::from_str(toml).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        TrainConfig::default().validate().unwrap();
    }

    /// PEFT's and TRL's keys: aliases where factune has the setting, accepted where the value is what factune
    /// does, refused with what to write where not.
    #[test]
    fn peft_and_trl_keys_are_mapped_accepted_or_refused_by_name() {
        let c: TrainConfig = toml::from_str(
            "per_device_train_batch_size = 2\nmax_seq_length = 64\ntask_type = \"CAUSAL_LM\"\nbias = \"none\"\n\
             optim = \"adamw_torch\"\nreport_to = \"none\"\npacking = false\nlogging_steps = 1\n\
             modules_to_save = []\nbf16 = false",
        )
        .unwrap();
        assert_eq!((c.micro_batch_size, c.seq_len), (2, 64));
        assert!(c.method_keys.0.is_empty(), "{:?}", c.method_keys);
        c.validate().unwrap();
        let c: TrainConfig = toml::from_str("max_length = 32").unwrap();
        assert_eq!(c.seq_len, 32);
        for (text, says) in [
            ("bias = \"all\"", "bias = \"none\" is the only value"),
            (
                "optim = \"adamw_8bit\"",
                "8-bit and other optimizers are not supported",
            ),
            (
                "report_to = \"wandb\"",
                "TensorBoard and W&B are not supported",
            ),
            ("packing = true", "not supported yet"),
            (
                "modules_to_save = [\"lm_head\"]",
                "train_embeddings_and_norms",
            ),
            ("bf16 = true", "base_dtype"),
            ("task_type = \"SEQ_CLS\"", "causal language models"),
        ] {
            let e = toml::from_str::<TrainConfig>(text).unwrap_err().to_string();
            let key = text.split(' ').next().unwrap();
            assert!(
                e.contains(&format!("`{key} = ")) && e.contains(says),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn rank_and_alpha_patterns_reach_the_adapter_config_and_are_checked() {
        let c: TrainConfig = toml::from_str(
            "r = 8\nrank_pattern = { v_proj = 2 }\nalpha_pattern = { \"q_proj\" = 4.0 }",
        )
        .unwrap();
        c.validate().unwrap();
        let a = c.adapter_config().unwrap();
        assert_eq!(a.rank_for("model.layers.0.self_attn.v_proj"), 2);
        assert_eq!(a.rank_for("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(a.alpha_for("model.layers.0.self_attn.q_proj"), 4.0);
        let flag: Patterns<usize> = "v_proj=2, o_proj=4".parse().unwrap();
        assert_eq!(flag.0.len(), 2);
        assert!("v_proj".parse::<Patterns<usize>>().is_err());
        for (text, says) in [
            ("rank_pattern = { v_proj = 0 }", "rank 0"),
            ("rank_pattern = { \"(\" = 2 }", "is not a regex"),
            (
                "peft_type = \"VERA\"\nrank_pattern = { v_proj = 2 }",
                "applies to peft_type = \"LORA\"",
            ),
            (
                "init_lora_weights = \"pissa\"\nalpha_pattern = { v_proj = 2.0 }",
                "applies to peft_type",
            ),
        ] {
            let c: TrainConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_resolved_config_reads_back_as_the_same_run() {
        for text in [
            "",
            "peft_type = \"VERA\"\nr = 32\nrank_pattern = {}",
            "rank_pattern = { v_proj = 2 }\nr = 4",
        ] {
            let c: TrainConfig = toml::from_str(text).unwrap();
            let printed = c.resolved_toml().unwrap();
            assert!(printed.contains("learning_rate = 0.0002"), "{printed}");
            let back: TrainConfig = toml::from_str(&printed).unwrap();
            back.validate().unwrap();
            assert_eq!(
                serde_json::to_value(back.adapter_config().unwrap()).unwrap(),
                serde_json::to_value(c.adapter_config().unwrap()).unwrap(),
                "{printed}"
            );
            assert_eq!(back.resolved_toml().unwrap(), printed);
        }
        let vera: TrainConfig = toml::from_str("peft_type = \"VERA\"").unwrap();
        assert!(vera.resolved_toml().unwrap().contains("d_initial"));
    }

    #[test]
    fn a_toml_target_string_reads_as_the_flag_does() {
        let c: TrainConfig = toml::from_str("target_modules = \"q_proj,v_proj\"").unwrap();
        assert_eq!(
            c.target_modules,
            Targets::List(vec!["q_proj".into(), "v_proj".into()])
        );
        let c: TrainConfig = toml::from_str("target_modules = \"o_proj\"").unwrap();
        assert_eq!(c.target_modules, Targets::List(vec!["o_proj".into()]));
        let c: TrainConfig = toml::from_str("target_modules = \".*\\\\.0\\\\..*q_proj\"").unwrap();
        assert!(matches!(c.target_modules, Targets::One(_)));
        let e = toml::from_str::<TrainConfig>("target_modules = 3")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("comma-separated") && !e.contains("untagged"),
            "{e}"
        );
    }
}
