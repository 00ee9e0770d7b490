//! Run metrics as JSONL: one object per line, appended as training goes (the CLI draws them).

use factune_io::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending (a resumed run continues the same log).
    pub fn open(path: &Path, truncate: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues the log of a run resumed after `steps` steps: what was logged past the checkpoint is dropped
    /// first (it is logged again as the resumed run redoes those steps), so no step appears twice.
    pub fn resume(path: &Path, steps: usize) -> Result<Self> {
        if path.exists() {
            let text = factune_io::error::read_to_string(path)?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    let Ok(v) = serde_json::from_str::<Value>(l) else {
                        return false;
                    };
                    let step = v.get("step").and_then(Value::as_u64).unwrap_or(u64::MAX);
                    // an event at step N happens before step N + 1 runs, a metric after step N
                    if v.get("event").is_some() {
                        step < steps as u64
                    } else {
                        step <= steps as u64
                    }
                })
                .map(|l| format!("{l}\n"))
                .collect();
            factune_io::atomic::write_atomic(path, kept.as_bytes())?;
        }
        Self::open(path, false)
    }

    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads (step, value) series for `key` from a metrics JSONL file.
pub fn series(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = factune_io::error::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect())
}
