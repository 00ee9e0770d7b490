//! `--model org/name` as Hugging Face users write it: resolved to the snapshot the local Hub cache holds
//! (what `huggingface-cli download` or transformers left there). factune never downloads; a model not in
//! the cache is an error that shows the download command.

use std::path::{Path, PathBuf};

/// The Hub cache directory, as `huggingface_hub` finds it: `HF_HUB_CACHE`, `HF_HOME/hub`,
/// `XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`.
fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// Whether `s` reads as a Hub id (`org/name`): two non-empty parts of the characters the Hub allows.
fn is_hub_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// The snapshot of `id` in `cache`: the one `refs/main` points to, else the only one.
fn snapshot(cache: &Path, id: &str) -> Result<PathBuf, String> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|_| {
            format!(
                "`{id}` is not in the Hugging Face cache ({})",
                cache.display()
            )
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("the Hugging Face cache holds no snapshot of `{id}` ({})", snapshots.display())),
        _ => Err(format!(
            "the Hugging Face cache holds {} snapshots of `{id}` and no refs/main: pass one of them as --model ({})",
            found.len(),
            snapshots.display()
        )),
    }
}

/// `--model`: an existing path as given, else a Hub id found in the local cache.
pub fn resolve_model(arg: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(arg);
    if path.exists() || !is_hub_id(arg) {
        return Ok(path);
    }
    let found = match cache_dir() {
        Some(cache) => snapshot(&cache, arg),
        None => Err("no HOME or HF_HOME to find the Hugging Face cache in".into()),
    };
    found.map_err(|e| {
        format!(
            "no directory {arg}, and {e}. factune does not download models: fetch it with \
             `huggingface-cli download {arg}` (it lands in the cache) or pass a local directory"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_resolve_to_the_cached_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--HuggingFaceTB--SmolLM2-135M");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        let e = snapshot(cache.path(), "HuggingFaceTB/SmolLM2-135M").unwrap_err();
        assert!(e.contains("2 snapshots"), "{e}");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "def456\n").unwrap();
        assert_eq!(
            snapshot(cache.path(), "HuggingFaceTB/SmolLM2-135M").unwrap(),
            repo.join("snapshots/def456")
        );
        assert!(snapshot(cache.path(), "org/missing")
            .unwrap_err()
            .contains("not in the Hugging Face cache"));
        assert!(
            is_hub_id("Qwen/Qwen2.5-0.5B")
                && !is_hub_id("./a/b")
                && !is_hub_id("a/b/c")
                && !is_hub_id("/abs")
        );
        let e = resolve_model("no-such-org-xyz/no-such-model").unwrap_err();
        assert!(
            e.contains("huggingface-cli download no-such-org-xyz/no-such-model"),
            "{e}"
        );
        assert_eq!(
            resolve_model("plain-missing-dir").unwrap(),
            PathBuf::from("plain-missing-dir")
        );
    }
}
