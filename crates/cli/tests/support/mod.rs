//! What the CLI tests share: the embedded model and data, running the binary, argument lists and checks.
// Each test binary uses its own share of these.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model() -> PathBuf {
    repo().join("assets/default-model")
}

pub fn data(name: &str) -> PathBuf {
    repo().join("assets/data").join(name)
}

pub fn factune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_factune"))
        .args(args)
        .output()
        .expect("run factune")
}

pub fn ok(args: &[&str]) -> String {
    let o = factune(args);
    assert!(
        o.status.success(),
        "factune {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `eval` arguments: the model, an adapter if any, the data, then `extra`.
pub fn eval_args<'a>(
    model: &'a Path,
    adapter: Option<&'a Path>,
    data: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["eval", "--model", s(model)];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    args.extend(["--data", s(data)]);
    args.extend_from_slice(extra);
    args
}

/// `train` arguments: the model, the data, the output directory, then `extra`.
pub fn train_args<'a>(
    model: &'a str,
    data: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["train", "--model", model, "--data", data, "--output", out];
    args.extend_from_slice(extra);
    args
}

/// [`ok`] for a command that prints one JSON object.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(ok(args).trim()).unwrap()
}

pub fn fails(args: &[&str]) -> String {
    let o = factune(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "factune {args:?} should fail");
    assert_eq!(
        o.status.code(),
        Some(1),
        "clean error exit, not a panic: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn sha(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

/// A short LoRA run on the quickstart data.
pub fn train(out: &Path, steps: &str, extra: &[&str]) -> String {
    train_on(&model(), out, steps, extra)
}

/// [`train`] on another base model directory (e.g. a 4-bit copy).
pub fn train_on(m: &Path, out: &Path, steps: &str, extra: &[&str]) -> String {
    let d = data("quickstart-train.jsonl");
    let mut args = train_args(s(m), s(&d), s(out), &["--max-steps", steps]);
    args.extend_from_slice(&[
        "--micro-batch-size",
        "2",
        "--seq-len",
        "256",
        "--r",
        "4",
        "--lora-dropout",
        "0.1",
    ]);
    args.extend_from_slice(&[
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--learning-rate",
        "1e-3",
    ]);
    args.extend_from_slice(&["--validation-split", "0.01"]);
    args.extend_from_slice(extra);
    ok(&args)
}

pub fn resume_into(fresh: &Path, ckpt: &Path) {
    std::fs::create_dir_all(fresh).unwrap();
    ok(&train_args(
        s(&model()),
        s(&data("quickstart-train.jsonl")),
        s(fresh),
        &["--resume", s(ckpt)],
    ));
}

/// The entries of a run's `metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The steps `metrics.jsonl` logs a training loss for, in order.
pub fn loss_steps(out: &Path) -> Vec<u64> {
    metrics(out)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}
