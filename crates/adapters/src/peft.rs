//! Attaching adapters to a model, and the PEFT on-disk format: `adapter_config.json` +
//! `adapter_model.safetensors` with keys `base_model.model.<module path>.<tensor name>`.

use crate::config::AdapterConfig;
use crate::pissa;
use crate::registry::{Attachment, LinearMethod, PromptMethod};
use crate::targets::TargetMatcher;
use candle_core::{DType, Tensor, Var};
use factune_io::weights::to_safetensors_bytes;
use factune_io::{atomic, Error, Result, Weights};
use factune_model::{AdaptableLinear, Model, ParamRole};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const KEY_PREFIX: &str = "base_model.model.";

/// Wraps every targeted linear layer with a freshly initialised adapter, or gives the model a prompt adapter.
/// The RNG is seeded here, before any adapter is created, so the same seed gives the same adapter. Returns the
/// wrapped module paths (none for a prompt adapter).
pub fn attach(model: &mut Model, cfg: &AdapterConfig, seed: u64) -> Result<Vec<String>> {
    cfg.check(Path::new("adapter config"))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match cfg.method.method().attachment() {
        Attachment::Linear(m) => attach_linear(model, cfg, m, &mut rng),
        Attachment::Prompt(m) => {
            model.prompt = Some(m.init(cfg, model, &mut rng)?);
            Ok(Vec::new())
        }
    }
}

/// `[out, in]` of every linear layer `cfg` targets, in module order.
pub fn targeted_shapes(model: &Model, cfg: &AdapterConfig) -> Result<Vec<(usize, usize)>> {
    let matcher = TargetMatcher::for_config(cfg)?;
    Ok(model
        .linears()
        .iter()
        .filter(|l| matcher.matches(&l.path))
        .map(|l| (l.out_features(), l.in_features()))
        .collect())
}

fn attach_linear(
    model: &mut Model,
    cfg: &AdapterConfig,
    m: &dyn LinearMethod,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<String>> {
    let matcher = TargetMatcher::for_config(cfg)?;
    let paths: Vec<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    matcher.check_all_used(&paths.iter().map(String::as_str).collect::<Vec<_>>())?;
    let shared = m.init_shared(cfg, &targeted_shapes(model, cfg)?, &model.device.clone())?;
    let mut wrapped = Vec::new();
    for layer in model.linears_mut() {
        if !matcher.matches(&layer.path) {
            continue;
        }
        let (r, alpha) = (cfg.rank_for(&layer.path), cfg.alpha_for(&layer.path));
        layer.adapter = Some(m.init(cfg, layer, r, alpha, rng, &shared)?);
        wrapped.push(layer.path.clone());
    }
    Ok(wrapped)
}

/// Trainable tensors under their PEFT keys (a prompt adapter's under its own names, as PEFT saves them), in
/// module order.
pub fn trainable(model: &Model) -> Vec<(String, Var)> {
    named_parameters(model)
        .into_iter()
        .map(|(k, v, _)| (k, v))
        .collect()
}

/// The role of every adapter parameter, by the name [`trainable`] gives it (its method decides).
pub fn roles(model: &Model) -> HashMap<String, ParamRole> {
    named_parameters(model)
        .into_iter()
        .map(|(k, _, role)| (k, role))
        .collect()
}

fn named_parameters(model: &Model) -> Vec<(String, Var, ParamRole)> {
    let mut out = Vec::new();
    let mut shared = BTreeSet::new();
    for l in model.linears() {
        if let Some(a) = &l.adapter {
            for (name, v) in a.shared_parameters() {
                if shared.insert(name.clone()) {
                    out.push((format!("base_model.{name}"), v, ParamRole::Other));
                }
            }
            for (name, v) in a.parameters() {
                let role = a.role(&name);
                out.push((format!("{KEY_PREFIX}{}.{name}", l.path), v, role));
            }
        }
    }
    if let Some(p) = &model.prompt {
        for (name, v) in p.parameters() {
            let role = p.role(&name);
            out.push((name, v, role));
        }
    }
    out
}

/// PEFT's `print_trainable_parameters` line.
pub fn trainable_summary(model: &Model) -> String {
    let t: usize = trainable(model).iter().map(|(_, v)| v.elem_count()).sum();
    let all = model.num_base_parameters() + t;
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(t),
        thousands(all),
        100.0 * t as f64 / all as f64
    )
}

/// `1234567` → `1,234,567`, as PEFT prints counts.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The config as saved: the targets actually wrapped (sorted), GPT-2's `fan_in_fan_out`, the base path.
pub fn saved_config(model: &Model, cfg: &AdapterConfig) -> AdapterConfig {
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut any_transposed = false;
    for l in model.linears() {
        if l.adapter.is_some() {
            names.insert(l.path.rsplit('.').next().unwrap_or(&l.path).to_string());
            any_transposed |= l.stored_transposed;
        }
    }
    let mut out = cfg.clone();
    out.target_modules = crate::config::TargetModules::List(names.into_iter().collect());
    out.fan_in_fan_out = any_transposed;
    out.base_model_name_or_path = Some(model.dir.display().to_string());
    out.inference_mode = serde_json::Value::Bool(true);
    out
}

/// Serialised adapter tensors (the writer refuses NaN/Inf, so a broken adapter never reaches disk).
pub fn adapter_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut tensors = BTreeMap::new();
    for (k, v) in trainable(model) {
        tensors.insert(k, v.as_tensor().clone());
    }
    // fixed per-module tensors beside the parameters; shared ones once, at the top level (PEFT's
    // `base_model.vera_A`)
    for l in model.linears() {
        if let Some(a) = &l.adapter {
            for (name, t) in a.buffers() {
                tensors.insert(format!("{KEY_PREFIX}{}.{name}", l.path), t);
            }
            for (name, t) in a.shared() {
                tensors.entry(format!("base_model.{name}")).or_insert(t);
            }
        }
    }
    tensors_bytes(tensors)
}

fn tensors_bytes(tensors: BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| match t.dtype() {
            DType::I64 => Ok((k, t)),
            _ => Ok((k, t.to_dtype(DType::F32)?)),
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    to_safetensors_bytes(&tensors, Some(meta))
}

/// Writes given adapter tensors (PEFT keys) with `cfg`, for forms other than the live parameters (AdaLoRA's
/// resized final adapter).
pub fn write_tensors(
    model: &Model,
    cfg: &AdapterConfig,
    tensors: BTreeMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    write(model, cfg, &tensors_bytes(tensors)?, dir)
}

/// The pair is never mixed: an earlier config goes first and the new one is published last, so a process
/// killed in between leaves weights without a config (refused as incomplete), never new weights beside an
/// old config.
fn write(model: &Model, cfg: &AdapterConfig, bytes: &[u8], dir: &Path) -> Result<()> {
    write_pair(&saved_config(model, cfg).to_json()?, bytes, dir)
}

/// Writes an adapter built outside a model (a combination of adapters): `cfg` as given, then the tensors.
pub fn write_built(
    cfg: &AdapterConfig,
    tensors: BTreeMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    write_pair(&cfg.to_json()?, &tensors_bytes(tensors)?, dir)
}

fn write_pair(config: &str, bytes: &[u8], dir: &Path) -> Result<()> {
    let old = dir.join(CONFIG_FILE);
    if old.exists() {
        std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
    }
    atomic::write_atomic(&dir.join(WEIGHTS_FILE), bytes)?;
    atomic::write_atomic(&old, config.as_bytes())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, each atomically, in the method's
/// native form (what `load` restores exactly; checkpoints use it).
pub fn save(model: &Model, cfg: &AdapterConfig, dir: &Path) -> Result<()> {
    write(model, cfg, &adapter_bytes(model)?, dir)
}

/// Where a LoftQ run's final 4-bit base goes, inside the adapter directory.
pub const LOFTQ_BASE_DIR: &str = "loftq-base";

/// Writes the adapter in the form PEFT users load: the native form, except for PiSSA on a full-precision
/// base, converted to a rank-2r LoRA relative to the original weights (as PEFT's
/// `path_initial_model_for_weight_conversion`), and LoftQ, a plain LoRA with its 4-bit base in
/// [`LOFTQ_BASE_DIR`]. Returns the config written.
pub fn save_portable(model: &Model, cfg: &AdapterConfig, dir: &Path) -> Result<AdapterConfig> {
    if let Some(p) = &model.prompt {
        // PEFT saves what a prompt encoder produces, not the encoder (the form it loads for inference)
        let tensors = p.portable()?.into_iter().collect();
        write_tensors(model, cfg, tensors, dir)?;
        return Ok(cfg.clone());
    }
    let all_nf4 = model
        .linears()
        .iter()
        .all(|l| l.base.weight.as_nf().is_none_or(|q| q.bits == 4));
    if cfg.init_lora_weights == "loftq" && !all_nf4 {
        tracing::warn!("LoftQ on a mixed-precision base (LQ-LoRA) is saved natively: bitsandbytes' format has no NF3/NF8, and factune rebuilds the base from the original weights when it loads the adapter");
        save(model, cfg, dir)?;
        return Ok(cfg.clone());
    }
    if cfg.init_lora_weights == "loftq" {
        // Trained against LoftQ's Q, not NF4(W): a plain LoRA, with Q written beside it as the base to load.
        let mut plain = cfg.clone();
        plain.init_lora_weights = serde_json::Value::Bool(true);
        plain.loftq_config.clear();
        save(model, &plain, dir)?;
        let original = Weights::from_model_dir(&model.dir)?;
        factune_model::save::save_quantized(model, &original, &dir.join(LOFTQ_BASE_DIR))?;
        return Ok(plain);
    }
    let Some(svd) = pissa::variant(&cfg.init_lora_weights)? else {
        save(model, cfg, dir)?;
        return Ok(cfg.clone());
    };
    if !model.quantized_keys().is_empty() {
        tracing::warn!("PiSSA on a 4-bit base: the residual was quantised, so no plain LoRA on the original W reproduces the trained model; the adapter is saved natively (loads in factune onto the same base and quantisation)");
        save(model, cfg, dir)?;
        return Ok(cfg.clone());
    }
    if cfg.use_dora {
        tracing::warn!("PiSSA + DoRA has no plain-LoRA form: the adapter is saved natively (loads in factune and PEFT onto the same base)");
        save(model, cfg, dir)?;
        return Ok(cfg.clone());
    }
    let original = Weights::from_model_dir(&model.dir)?;
    let mut tensors = BTreeMap::new();
    for l in model.linears() {
        let Some(adapter) = &l.adapter else { continue };
        let p = adapter.parameters();
        let (a, b) = (p[0].1.as_tensor(), p[1].1.as_tensor());
        let r = a.dims()[0];
        let alpha = cfg.alpha_for(&l.path);
        let mut initial = AdaptableLinear::new(
            l.path.clone(),
            l.index,
            factune_model::BaseWeight::Dense(l.original_weight(&original)?),
            None,
            l.source_key.clone(),
            l.stored_transposed,
        );
        let (a0, b0) = pissa::init(&mut initial, r, cfg.scaling(r, alpha), svd)?;
        let (a2, b2) = pissa::to_lora((a, b), (&a0, &b0))?;
        tensors.insert(format!("{KEY_PREFIX}{}.lora_A.weight", l.path), a2);
        tensors.insert(format!("{KEY_PREFIX}{}.lora_B.weight", l.path), b2);
    }
    let converted = pissa::lora_config(cfg);
    write(model, &converted, &tensors_bytes(tensors)?, dir)?;
    Ok(converted)
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub matched_modules: usize,
    pub matched_tensors: usize,
    /// Tensors in the file that map to no module of the model.
    pub unmatched_tensors: Vec<String>,
    /// Targeted modules for which the file lacks tensors.
    pub missing_modules: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensors matched into {} modules; {} unmatched tensors; {} targeted modules without tensors",
            self.matched_tensors,
            self.matched_modules,
            self.unmatched_tensors.len(),
            self.missing_modules.len()
        )
    }
}

/// Loads a PEFT-format adapter directory onto the model. Strict by default: a tensor that maps to no module,
/// or a targeted module without its tensors, is an error unless `allow_partial`.
pub fn load(
    model: &mut Model,
    dir: &Path,
    allow_partial: bool,
) -> Result<(AdapterConfig, LoadReport)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg = AdapterConfig::from_file(&cfg_path)?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        return Err(Error::invalid(
            &wpath,
            "missing adapter weights (adapter_model.bin is not supported: convert to safetensors)",
        ));
    }
    let weights = Weights::from_files(std::slice::from_ref(&wpath))?;
    let report = match cfg.method.method().attachment() {
        Attachment::Linear(m) => load_linear(model, &cfg, m, &weights, &wpath, allow_partial)?,
        Attachment::Prompt(m) => load_prompt(model, &cfg, m, &weights, &wpath)?,
    };
    Ok((cfg, report))
}

/// A prompt adapter from every tensor of its file (the method checks the names and shapes).
fn load_prompt(
    model: &mut Model,
    cfg: &AdapterConfig,
    m: &dyn PromptMethod,
    weights: &Weights,
    wpath: &Path,
) -> Result<LoadReport> {
    let dev = model.device.clone();
    let tensors = weights
        .names()
        .map(|n| Ok((n.to_string(), weights.get(n, DType::F32, &dev)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let adapter = m
        .load_tensors(cfg, model, &tensors)
        .map_err(|e| Error::invalid(wpath, e.to_string()))?;
    model.prompt = Some(adapter);
    Ok(LoadReport {
        matched_modules: 1,
        matched_tensors: tensors.len(),
        ..Default::default()
    })
}

fn load_linear(
    model: &mut Model,
    cfg: &AdapterConfig,
    m: &dyn LinearMethod,
    weights: &Weights,
    wpath: &Path,
    allow_partial: bool,
) -> Result<LoadReport> {
    // Group tensors by module path.
    let mut by_module: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut report = LoadReport::default();
    let dev = model.device.clone();
    let mut shared = HashMap::new();
    for name in m.shared_names() {
        let key = format!("base_model.{name}");
        if !weights.contains(&key) {
            return Err(Error::invalid(
                wpath,
                format!(
                    "missing the shared tensor `{key}` ({} adapters saved with save_projection = false rely on \
                     PyTorch's random generator, which factune cannot reproduce: save them with \
                     save_projection = true)",
                    cfg.peft_type()
                ),
            ));
        }
        let t = weights.get(&key, DType::F32, &dev)?;
        // one variable for every layer, so the layers keep sharing it when it is trained further
        let t = match m.trains_shared() {
            true => Var::from_tensor(&t)?.as_tensor().clone(),
            false => t,
        };
        shared.insert(name.to_string(), t);
    }
    if !shared.is_empty() {
        m.check_shared(cfg, &targeted_shapes(model, cfg)?, &shared)
            .map_err(|e| Error::invalid(wpath, e.to_string()))?;
    }
    for key in weights.names() {
        if m.shared_names()
            .iter()
            .any(|n| key == format!("base_model.{n}"))
        {
            continue;
        }
        let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
        match m
            .tensor_names(cfg)
            .iter()
            .find(|n| rest.ends_with(&format!(".{n}")))
        {
            Some(n) => {
                let module = &rest[..rest.len() - n.len() - 1];
                by_module
                    .entry(module.to_string())
                    .or_default()
                    .insert(n.to_string(), key.to_string());
            }
            None => report.unmatched_tensors.push(key.to_string()),
        }
    }
    let matcher = TargetMatcher::for_config(cfg)?;
    let mut seen = BTreeSet::new();
    for layer in model.linears_mut() {
        let Some(names) = by_module.get(&layer.path) else {
            // a module a rank redistribution left at rank 0 (EVA) has no tensors by design
            if matcher.matches(&layer.path) && cfg.rank_for(&layer.path) > 0 {
                report.missing_modules.push(layer.path.clone());
            }
            continue;
        };
        seen.insert(layer.path.clone());
        let optional = m.optional_names();
        let required = m
            .tensor_names(cfg)
            .iter()
            .filter(|n| !optional.contains(n))
            .count();
        if names
            .keys()
            .filter(|n| !optional.contains(&n.as_str()))
            .count()
            < required
        {
            report.missing_modules.push(layer.path.clone());
            continue;
        }
        let mut tensors = shared.clone();
        for (n, key) in names {
            let integer = weights
                .info(key)
                .is_some_and(|(_, d)| d == safetensors::Dtype::I64);
            let dtype = if integer { DType::I64 } else { DType::F32 };
            tensors.insert(n.clone(), weights.get(key, dtype, &dev)?);
        }
        let alpha = cfg.alpha_for(&layer.path);
        layer.adapter = Some(
            m.load_tensors(cfg, layer, alpha, &tensors)
                .map_err(|e| Error::invalid(wpath, e.to_string()))?,
        );
        report.matched_modules += 1;
        report.matched_tensors += names.len();
    }
    for (module, names) in &by_module {
        if !seen.contains(module) {
            report.unmatched_tensors.extend(names.values().cloned());
        }
    }
    report.unmatched_tensors.sort();
    if report.matched_modules == 0 {
        return Err(Error::invalid(
            wpath,
            format!("no tensor of this adapter matches a module of the model ({report})"),
        ));
    }
    if !allow_partial
        && (!report.unmatched_tensors.is_empty() || !report.missing_modules.is_empty())
    {
        let mut what = report.to_string();
        if let Some(t) = report.unmatched_tensors.first() {
            what += &format!("; first unmatched tensor: `{t}`");
        }
        if let Some(mm) = report.missing_modules.first() {
            what += &format!("; first module without tensors: `{mm}`");
        }
        return Err(Error::invalid(
            wpath,
            format!("{what} (pass --allow-partial to load anyway)"),
        ));
    }
    Ok(report)
}

/// Removes every adapter from the model.
pub fn detach(model: &mut Model) {
    for l in model.linears_mut() {
        l.adapter = None;
    }
    model.prompt = None;
}

/// Helper for tests and tools: the adapter tensor under a PEFT key.
pub fn tensor(model: &Model, key: &str) -> Option<Tensor> {
    trainable(model)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_tensor().clone())
}
