//! One error type for the whole library stack, so every failure can name the file, tensor or key at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message and deliberately not a `source`: printing the chain (`{:#}`)
    /// would say it twice.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The file exists but its content is not what was expected; `what` says what was.
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    /// Bad user input not tied to one file (a config value, a flag).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            cause: source,
        }
    }

    pub fn config(what: impl Into<String>) -> Self {
        Error::Config(what.into())
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Parses a JSON file, naming it (and serde's line/column) in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("invalid JSON: {e}")))
}

/// Runs a third-party reader that may panic on malformed input (`tokenizers` on some BPE merges), turning a
/// panic into an error naming `path`. The panic hook is silenced meanwhile, so no panic message reaches the
/// user (the hook is process-wide: a panic on another thread in that moment would go unreported).
pub fn guarded<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    out.map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("malformed contents");
        Error::invalid(path, format!("cannot be read: {why}"))
    })
}
