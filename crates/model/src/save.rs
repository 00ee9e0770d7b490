//! Writing a model as a Hugging Face checkpoint directory that transformers loads: `config.json`,
//! `model.safetensors` and the tokenizer files, each written atomically (the directory may also hold a run's
//! metrics, so it is not replaced as a whole).

use crate::Model;
use candle_core::DType;
use factune_io::weights::to_safetensors_bytes;
use factune_io::{atomic, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Saves `model` to `dest` with weights cast once to `dtype`; tokenizer files are copied from `tokenizer_dir`.
pub fn save_pretrained(
    model: &Model,
    dest: &Path,
    dtype: DType,
    tokenizer_dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let mut tensors = BTreeMap::new();
    for (k, t) in model.named_tensors() {
        tensors.insert(k, t.to_dtype(dtype)?.contiguous()?);
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_atomic(
        &dest.join("model.safetensors"),
        &to_safetensors_bytes(&tensors, Some(meta))?,
    )?;
    let mut cfg = model.cfg.raw.clone();
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    if let Some(o) = cfg.as_object_mut() {
        o.insert("dtype".into(), dtype_name.into());
        o.remove("torch_dtype");
        // every weight is written dense, 4-bit ones dequantised
        o.remove("quantization_config");
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::config(e.to_string()))?;
    atomic::write_atomic(&dest.join("config.json"), text.as_bytes())?;
    copy_tokenizer(tokenizer_dir, dest)
}

/// Writes `model` as a 4-bit checkpoint in bitsandbytes' layout (what transformers saves for
/// `load_in_4bit`): each NF4 linear weight as packed codes, scales and quant state; every other tensor copied
/// as `src` stores it; `config.json` with the matching `quantization_config`.
pub fn save_quantized(model: &Model, src: &factune_io::Weights, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let mut tensors = BTreeMap::new();
    let mut double_quant = true;
    let mut quantized_keys = Vec::new();
    for l in model.linears() {
        let Some(q) = l.base.weight.as_nf() else {
            continue;
        };
        double_quant &= matches!(q.scales, crate::quant::Scales::Double { .. });
        quantized_keys.push(l.source_key.clone());
        for (k, t) in crate::quant::to_bnb_tensors(q, &l.source_key)? {
            tensors.insert(k, t);
        }
    }
    let names: Vec<String> = src.names().map(String::from).collect();
    for name in names {
        // a stored 4-bit weight's own parts are rewritten above
        let part_of_quantized = quantized_keys.iter().any(|k| {
            name == *k
                || name
                    .strip_prefix(k.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        });
        if part_of_quantized {
            continue;
        }
        let (_, st) = src.info(&name).expect("listed name");
        let dtype = stored_dtype(&name, st)?;
        tensors.insert(
            name.clone(),
            src.get(&name, dtype, &candle_core::Device::Cpu)?,
        );
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_atomic(
        &dest.join("model.safetensors"),
        &to_safetensors_bytes(&tensors, Some(meta))?,
    )?;
    let mut cfg = model.cfg.raw.clone();
    if let Some(o) = cfg.as_object_mut() {
        o.insert(
            "quantization_config".into(),
            serde_json::json!({
                "quant_method": "bitsandbytes",
                "load_in_4bit": true,
                "load_in_8bit": false,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": double_quant,
                "bnb_4bit_compute_dtype": "float32",
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": null,
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                "_load_in_4bit": true,
                "_load_in_8bit": false,
            }),
        );
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::config(e.to_string()))?;
    atomic::write_atomic(&dest.join("config.json"), text.as_bytes())?;
    copy_tokenizer(&model.dir, dest)
}

fn stored_dtype(name: &str, st: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as St;
    Ok(match st {
        St::F32 => DType::F32,
        St::F16 => DType::F16,
        St::BF16 => DType::BF16,
        other => {
            return Err(Error::config(format!(
                "tensor `{name}`: dtype {other:?} where a float tensor was expected"
            )))
        }
    })
}

/// Writes the checkpoint `src` with every merged linear's weight replaced by the model's (in the stored
/// layout and dtype of the original); all other tensors are copied unchanged, config and tokenizer files too.
pub fn save_merged(model: &Model, src: &factune_io::Weights, dest: &Path) -> Result<()> {
    if model.cfg.raw.get("quantization_config").is_some() {
        // A 4-bit checkpoint: the merged model is written dense, every weight dequantised.
        return save_pretrained(model, dest, DType::F32, &model.dir);
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let merged: HashMap<&str, (&crate::AdaptableLinear,)> = model
        .linears()
        .into_iter()
        .map(|l| (l.source_key.as_str(), (l,)))
        .collect();
    let mut tensors = BTreeMap::new();
    let names: Vec<String> = src.names().map(String::from).collect();
    for name in names {
        let (_, st) = src.info(&name).expect("listed name");
        let dtype = stored_dtype(&name, st)?;
        let t = match merged.get(name.as_str()) {
            Some((l,)) => {
                let w = l.base.weight.dense()?;
                let w = if l.stored_transposed { w.t()? } else { w };
                w.to_dtype(dtype)?.contiguous()?
            }
            None => src.get(&name, dtype, &candle_core::Device::Cpu)?,
        };
        tensors.insert(name, t);
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_atomic(
        &dest.join("model.safetensors"),
        &to_safetensors_bytes(&tensors, Some(meta))?,
    )?;
    let config = model.dir.join("config.json");
    let bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    atomic::write_atomic(&dest.join("config.json"), &bytes)?;
    copy_tokenizer(&model.dir, dest)
}

/// Copies the tokenizer files `from` holds into `dest` (none when they are the same directory).
fn copy_tokenizer(from: &Path, dest: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        let dst = dest.join(f);
        if src.exists() && src.canonicalize().ok() != dst.canonicalize().ok() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            atomic::write_atomic(&dst, &bytes)?;
        }
    }
    Ok(())
}
