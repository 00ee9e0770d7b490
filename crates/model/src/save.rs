//! Writing a model as a Hugging Face checkpoint directory that transformers loads: `config.json`,
//! `model.safetensors` and the tokenizer files, each written atomically (the directory may also hold a run's
//! metrics, so it is not replaced as a whole).

use crate::Model;
use candle_core::DType;
use factune_io::weights::to_safetensors_bytes;
use factune_io::{atomic, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const TOKENIZER_FILES: &[&str] = &[
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
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::config(e.to_string()))?;
    atomic::write_atomic(&dest.join("config.json"), text.as_bytes())?;
    for f in TOKENIZER_FILES {
        let src = tokenizer_dir.join(f);
        let dst = dest.join(f);
        if src.exists() && src.canonicalize().ok() != dst.canonicalize().ok() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            atomic::write_atomic(&dst, &bytes)?;
        }
    }
    Ok(())
}

/// Writes the checkpoint `src` with every merged linear's weight replaced by the model's (in the stored
/// layout and dtype of the original); all other tensors are copied unchanged, config and tokenizer files too.
pub fn save_merged(model: &Model, src: &factune_io::Weights, dest: &Path) -> Result<()> {
    use safetensors::Dtype as St;
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
        let dtype = match st {
            St::F32 => DType::F32,
            St::F16 => DType::F16,
            St::BF16 => DType::BF16,
            other => {
                return Err(Error::config(format!(
                    "tensor `{name}`: cannot merge into dtype {other:?}"
                )))
            }
        };
        let t = match merged.get(name.as_str()) {
            Some((l,)) => {
                let w = if l.stored_transposed {
                    l.base.weight.t()?
                } else {
                    l.base.weight.clone()
                };
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
    for f in std::iter::once(&"config.json").chain(TOKENIZER_FILES) {
        let from = model.dir.join(f);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            atomic::write_atomic(&dest.join(f), &bytes)?;
        }
    }
    Ok(())
}
