//! Atomic file writes: a crash or a full disk never leaves a half-written checkpoint or adapter behind.

use crate::error::{Error, Result};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary files of this process get distinct names.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced, then renamed over `path`.
/// The temporary file is created exclusively (`O_EXCL`): a file or symlink already at its name is never
/// written through, another name is tried instead.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(path, "not a file path"))?;
    let (tmp, mut f) = (0..64)
        .find_map(|_| {
            let tmp = dir.join(format!(
                ".{}.{}.{}.tmp",
                file_name.to_string_lossy(),
                std::process::id(),
                NEXT_TMP.fetch_add(1, Ordering::Relaxed)
            ));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => Some(Ok((tmp, f))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(Error::io(&tmp, e))),
            }
        })
        .unwrap_or_else(|| {
            Err(Error::invalid(
                dir,
                "cannot create a temporary file: every candidate name is taken",
            ))
        })?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
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

/// Removes a published directory as one step: it is renamed aside first (`NAME.old.PID`, which
/// [`clean_leftovers`] finishes if the process is killed), so no half-deleted directory is ever left under its
/// name.
pub fn retire_dir(dir: &Path) -> Result<()> {
    let old = dir.with_extension(format!("old.{}", std::process::id()));
    std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
}

/// Whether process `pid` is running (Linux: `/proc`). Elsewhere every process counts as running, so nothing
/// of another process is ever removed.
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// The PID a staging or replaced directory was left by: `.checkpoint-N.partial-PID`, `checkpoint-N.old.PID`.
fn leftover_pid(name: &str) -> Option<u32> {
    let (_, pid) = name
        .rsplit_once(".partial-")
        .or_else(|| name.rsplit_once(".old."))?;
    pid.parse().ok()
}

/// Removes the staging and replaced directories (and temporary files) that processes no longer running
/// left in `dir` when they were killed mid-write; returns how many.
pub fn clean_leftovers(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = leftover_pid(&name).or_else(|| {
            // `.NAME.PID.N.tmp`
            let stem = name.strip_prefix('.')?.strip_suffix(".tmp")?;
            let mut parts = stem.rsplit('.');
            parts.next()?;
            parts.next()?.parse().ok()
        });
        if pid.is_some_and(|p| p != std::process::id() && !alive(p)) {
            let path = e.path();
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            gone.map_err(|err| Error::io(&path, err))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// One writer per output directory: `DIR/.lock` holds the writer's PID while it runs. A second run into the
/// same directory fails at once; a lock left by a process that is gone is taken over.
pub struct OutputLock {
    path: std::path::PathBuf,
}

impl OutputLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(".lock");
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
                    return Ok(OutputLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if alive(pid) => {
                            return Err(Error::invalid(
                                dir,
                                format!(
                                    "another factune run (PID {pid}) is writing to this directory; wait for it \
                                     or choose another output"
                                ),
                            ))
                        }
                        // stale: its writer is gone (or the file is not a lock factune wrote)
                        _ => std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?,
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::invalid(
            &path,
            "cannot take the output directory's lock",
        ))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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

    #[cfg(unix)]
    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        // the names the next temporary files of this process would take (and the older per-process name)
        let pid = std::process::id();
        let next = NEXT_TMP.load(Ordering::Relaxed);
        let planted = (next..next + 4)
            .map(|n| format!(".a.json.{pid}.{n}.tmp"))
            .chain([format!(".a.json.{pid}.tmp")]);
        for name in planted {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        write_atomic(&dir.path().join("a.json"), b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(dir.path().join("a.json")).unwrap(), b"new");
    }

    /// PIDs above the kernel's maximum (2^22) never run.
    const DEAD: u32 = 4_194_305;

    #[cfg(target_os = "linux")]
    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        for name in [
            format!(".checkpoint-4.partial-{DEAD}"),
            format!("checkpoint-8.old.{DEAD}"),
            format!(".checkpoint-4.partial-{me}"),
            "checkpoint-4".to_string(),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join(format!(".a.json.{DEAD}.0.tmp")), b"x").unwrap();
        assert_eq!(clean_leftovers(dir.path()).unwrap(), 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![format!(".checkpoint-4.partial-{me}"), "checkpoint-4".into()]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_second_writer_is_refused_and_a_stale_lock_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".lock"), DEAD.to_string()).unwrap();
        let lock = OutputLock::acquire(dir.path()).unwrap();
        let e = OutputLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(e.contains("another factune run"), "{e}");
        drop(lock);
        assert!(!dir.path().join(".lock").exists());
        OutputLock::acquire(dir.path()).unwrap();
    }
}
