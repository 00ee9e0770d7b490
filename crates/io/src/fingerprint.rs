//! What identifies a run's inputs across a resume: the data by the SHA-256 of every byte, the model by its
//! config, tokenizer and the safetensors headers plus evenly spaced samples of the tensor bytes (a full hash of
//! a 7B checkpoint would add minutes to every start; a changed header, size or sample means another model).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bytes sampled from each weight file, in this many evenly spaced blocks.
const SAMPLES: u64 = 64;
const SAMPLE_BYTES: u64 = 64 * 1024;

/// The files of `path`: itself, or a directory's files — every one under it when `recursive` (a Hub
/// dataset's `data/…parquet`) — in path order.
fn files(path: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(|e| Error::io(&d, e))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() && recursive {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hex(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 over every byte of a file, or of a directory's files in name order (a Parquet dataset).
pub fn data_sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for f in files(path, true)? {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(&f, e))?;
    }
    Ok(hex(h))
}

/// The model directory's identity: its JSON and tokenizer files whole, each `.safetensors` file's length,
/// header and sampled tensor bytes.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for f in files(dir, false)? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        if name.ends_with(".json") || name.ends_with(".model") {
            h.update(name.as_bytes());
            std::io::copy(&mut file, &mut h).map_err(|e| Error::io(&f, e))?;
        } else if name.ends_with(".safetensors") {
            h.update(name.as_bytes());
            sample(&mut file, &mut h).map_err(|e| Error::io(&f, e))?;
        }
    }
    Ok(hex(h))
}

/// A safetensors file's length, its header (names, dtypes, shapes, offsets), and `SAMPLES` blocks of its
/// bytes spread over the whole file.
fn sample(file: &mut std::fs::File, h: &mut Sha256) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    h.update(len.to_le_bytes());
    let mut n = [0u8; 8];
    file.read_exact(&mut n)?;
    let header = u64::from_le_bytes(n).min(len.saturating_sub(8));
    std::io::copy(&mut file.by_ref().take(header), h)?;
    let mut buf = vec![0u8; SAMPLE_BYTES as usize];
    for i in 0..SAMPLES {
        let at = (len.saturating_sub(SAMPLE_BYTES)) * i / (SAMPLES - 1);
        file.seek(SeekFrom::Start(at))?;
        let got = file.read(&mut buf)?;
        h.update(&buf[..got]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_byte_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("model.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(&st, &bytes).unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let a = model_fingerprint(dir.path()).unwrap();
        assert_eq!(a, model_fingerprint(dir.path()).unwrap());
        *bytes.last_mut().unwrap() = 1;
        std::fs::write(&st, &bytes).unwrap();
        assert_ne!(a, model_fingerprint(dir.path()).unwrap(), "tensor bytes");
        std::fs::write(dir.path().join("config.json"), "{\"a\":1}").unwrap();
        let d = dir.path().join("config.json");
        let before = data_sha256(&d).unwrap();
        std::fs::write(&d, "{\"a\":2}").unwrap();
        assert_ne!(before, data_sha256(&d).unwrap());
        // a dataset directory: files in subdirectories count
        let ds = dir.path().join("ds");
        std::fs::create_dir_all(ds.join("data")).unwrap();
        std::fs::write(ds.join("data/train.parquet"), "1").unwrap();
        let before = data_sha256(&ds).unwrap();
        std::fs::write(ds.join("data/train.parquet"), "2").unwrap();
        assert_ne!(before, data_sha256(&ds).unwrap());
    }
}
