//! Atomic file writes: a crash or a full disk never leaves a half-written checkpoint or adapter behind.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Publishes a fully written directory: `staging` is renamed to `dest`, replacing an older `dest` only after the
/// new one is complete, so readers see either the old or the new directory, never a mix.
pub fn publish_dir(staging: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let old = dest.with_extension(format!("old.{}", std::process::id()));
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
        std::fs::rename(staging, dest).map_err(|e| Error::io(dest, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(staging, dest).map_err(|e| Error::io(dest, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
    }

    #[test]
    fn publish_dir_swaps_whole_directory() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        for content in ["v1", "v2"] {
            let staging = dir.path().join(format!("staging-{content}"));
            std::fs::create_dir(&staging).unwrap();
            std::fs::write(staging.join("f"), content).unwrap();
            publish_dir(&staging, &dest).unwrap();
        }
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "v2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
