//! Writing a model as a Hugging Face checkpoint directory that transformers loads: `config.json`,
//! `model.safetensors` and the tokenizer files, published atomically as a whole directory.

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
pub fn save_pretrained(model: &Model, dest: &Path, dtype: DType, tokenizer_dir: &Path) -> Result<()> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dest.file_name().ok_or_else(|| Error::invalid(dest, "not a directory path"))?;
    let staging = parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let mut tensors = BTreeMap::new();
    for (k, t) in model.named_tensors() {
        let t = t.to_dtype(DType::F32)?;
        let finite = t.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
        if !finite {
            return Err(Error::config(format!("refusing to write the model: tensor `{k}` contains NaN or Inf")));
        }
        tensors.insert(k, t.to_dtype(dtype)?.contiguous()?);
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_atomic(&staging.join("model.safetensors"), &to_safetensors_bytes(&tensors, Some(meta))?)?;
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
    atomic::write_atomic(&staging.join("config.json"), text.as_bytes())?;
    for f in TOKENIZER_FILES {
        let src = tokenizer_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, staging.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    atomic::publish_dir(&staging, dest)
}
