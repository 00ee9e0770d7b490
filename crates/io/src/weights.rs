//! Memory-mapped safetensors checkpoints (single file or sharded with `model.safetensors.index.json`).
//! Headers are validated on open, so a truncated file or a header that lies about sizes fails before any
//! tensor is read, with the file named.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// The tensors of a checkpoint, by name, read lazily from memory maps.
pub struct Weights {
    shards: Vec<Shard>,
    index: HashMap<String, (usize, TensorInfo)>,
}

fn st_error(path: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::invalid(path, format!("not a valid safetensors file: {e}"))
}

impl Weights {
    /// Opens the weights of a model directory: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            Self::from_files(&[single])
        } else if index.exists() {
            let v: serde_json::Value = crate::error::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::invalid(&index, "missing object `weight_map`"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            let w = Self::from_files(&paths)?;
            for (name, file) in map {
                if !w.index.contains_key(name) {
                    return Err(Error::invalid(
                        &index,
                        format!("tensor `{name}` is listed in shard {file} but that shard does not contain it"),
                    ));
                }
            }
            Ok(w)
        } else {
            Err(Error::invalid(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory (only safetensors checkpoints are supported)",
            ))
        }
    }

    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a checkpoint modified while we train is outside what we support,
            // as with every framework that maps weights.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| st_error(path, e))?;
            for (name, info) in meta.tensors() {
                if index.insert(name.clone(), (i, info.clone())).is_some() {
                    return Err(Error::invalid(
                        path,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + n,
            });
        }
        Ok(Weights { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Shape and stored dtype of a tensor without reading it.
    pub fn info(&self, name: &str) -> Option<(&[usize], StDtype)> {
        self.index
            .get(name)
            .map(|(_, i)| (i.shape.as_slice(), i.dtype))
    }

    /// Counts of stored dtypes, for `inspect`.
    pub fn dtype_summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, info) in self.index.values() {
            *m.entry(format!("{:?}", info.dtype)).or_insert(0) +=
                info.shape.iter().product::<usize>();
        }
        m
    }

    pub fn path_of(&self, name: &str) -> &Path {
        self.index
            .get(name)
            .map(|(i, _)| self.shards[*i].path.as_path())
            .unwrap_or_else(|| {
                self.shards
                    .first()
                    .map(|s| s.path.as_path())
                    .unwrap_or(Path::new("<weights>"))
            })
    }

    /// The stored bytes of a tensor with its dtype and shape (for packed formats such as NF4 codes).
    pub fn raw(&self, name: &str) -> Result<(&[u8], StDtype, &[usize])> {
        let (shard, info) = self.index.get(name).ok_or_else(|| {
            Error::invalid(self.path_of(name), format!("missing tensor `{name}`"))
        })?;
        let shard = &self.shards[*shard];
        let (a, b) = info.data_offsets;
        Ok((
            &shard.mmap[shard.data_start + a..shard.data_start + b],
            info.dtype,
            &info.shape,
        ))
    }

    /// Reads a tensor, converted to `dtype`.
    pub fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (shard, info) = self.index.get(name).ok_or_else(|| {
            Error::invalid(self.path_of(name), format!("missing tensor `{name}`"))
        })?;
        let shard = &self.shards[*shard];
        let (a, b) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + a..shard.data_start + b];
        let shape = info.shape.clone();
        let t = match info.dtype {
            StDtype::F32 => Tensor::from_vec(le_values(bytes, f32::from_le_bytes), shape, device)?,
            StDtype::F16 => Tensor::from_vec(
                le_values(bytes, |b: [u8; 2]| half::f16::from_le_bytes(b)),
                shape,
                device,
            )?,
            StDtype::BF16 => Tensor::from_vec(
                le_values(bytes, |b: [u8; 2]| half::bf16::from_le_bytes(b)),
                shape,
                device,
            )?,
            // integer tensors (sparse indices) are read exactly, as i64
            StDtype::I64 => Tensor::from_vec(le_values(bytes, i64::from_le_bytes), shape, device)?,
            other => {
                return Err(Error::invalid(
                    &shard.path,
                    format!("tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16, I64"),
                ))
            }
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// Reads a tensor and checks it has the shape the model config implies.
    pub fn get_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some((actual, _)) = self.info(name) {
            if actual != shape {
                return Err(Error::invalid(
                    self.path_of(name),
                    format!(
                        "tensor `{name}` has shape {actual:?}, but config.json implies {shape:?}"
                    ),
                ));
            }
        }
        self.get(name, dtype, device)
    }
}

fn le_values<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// Serialises named tensors to safetensors bytes (with optional `__metadata__`), in sorted key order.
/// Refuses floating-point tensors holding NaN or Inf, so no checkpoint, adapter or model is ever written
/// broken.
pub fn to_safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<u8>, Vec<usize>, StDtype)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if t.dtype().is_float() {
            let finite = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                return Err(Error::config(format!(
                    "refusing to write: tensor `{name}` contains NaN or Inf"
                )));
            }
        }
        let (bytes, dt) = match t.dtype() {
            DType::F32 => (
                t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                StDtype::F32,
            ),
            DType::BF16 => (
                t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                StDtype::BF16,
            ),
            DType::F16 => (
                t.flatten_all()?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                StDtype::F16,
            ),
            DType::I64 => (
                t.flatten_all()?
                    .to_vec1::<i64>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                StDtype::I64,
            ),
            DType::U8 => (t.flatten_all()?.to_vec1::<u8>()?, StDtype::U8),
            other => {
                return Err(Error::config(format!(
                    "cannot serialise tensor `{name}` of dtype {other:?}"
                )))
            }
        };
        data.push((name.clone(), bytes, t.dims().to_vec(), dt));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, b, s, d)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::config(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, metadata)
        .map_err(|e| Error::config(format!("safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn sample() -> Vec<u8> {
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_string(),
            Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        );
        to_safetensors_bytes(&m, None).unwrap()
    }

    #[test]
    fn round_trip_and_dtype_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.safetensors", &sample());
        let w = Weights::from_files(&[p]).unwrap();
        let t = w
            .get_shaped("a", &[2, 3], DType::BF16, &Device::Cpu)
            .unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(
            t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            [[0., 1., 2.], [3., 4., 5.]]
        );
    }

    #[test]
    fn truncated_and_lying_headers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = sample();
        let p = write(dir.path(), "trunc.safetensors", &bytes[..bytes.len() - 4]);
        let e = Weights::from_files(&[p]).err().unwrap().to_string();
        assert!(
            e.contains("trunc.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        let p = write(dir.path(), "short.safetensors", &bytes[..5]);
        assert!(Weights::from_files(&[p]).is_err());
        // A header claiming a huge length.
        let mut lying = bytes.clone();
        lying[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let p = write(dir.path(), "lying.safetensors", &lying);
        let e = Weights::from_files(&[p]).err().unwrap().to_string();
        assert!(e.contains("lying.safetensors"), "{e}");
    }

    #[test]
    fn shape_mismatch_and_missing_tensor_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.safetensors", &sample());
        let w = Weights::from_files(&[p]).unwrap();
        let e = w
            .get_shaped("a", &[3, 2], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`a`") && e.contains("[2, 3]") && e.contains("[3, 2]"),
            "{e}"
        );
        let e = w
            .get("nope", DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing tensor `nope`") && e.contains("m.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn non_finite_tensors_are_never_written() {
        let mut m = BTreeMap::new();
        m.insert(
            "w".to_string(),
            Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap(),
        );
        let e = to_safetensors_bytes(&m, None).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("NaN"), "{e}");
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = BTreeMap::new();
        m.insert(
            "ids".to_string(),
            Tensor::new(&[1u8, 2], &Device::Cpu).unwrap(),
        );
        let p = write(
            dir.path(),
            "i.safetensors",
            &to_safetensors_bytes(&m, None).unwrap(),
        );
        let w = Weights::from_files(&[p]).unwrap();
        let e = w
            .get("ids", DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("U8") && e.contains("ids"), "{e}");
    }
}
