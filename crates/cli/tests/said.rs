//! SAID through the CLI on the embedded model: `train --peft-type SAID` (one shared θ, per-layer λ, resumed
//! bit for bit, reloaded and merged to the same model) and `analyze said` (its report, and dimensions that do
//! not fit refused before anything trains).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use support::*;

fn read(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Tensor names and lengths of an adapter file.
fn tensors(dir: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect()
}

/// The loss `eval --task perplexity` reports.
fn eval_loss(adapter: Option<&Path>, m: &Path) -> f64 {
    let valid = data("quickstart-valid.jsonl");
    let out = ok(&eval_args(m, adapter, &valid, &["--task", "perplexity"]));
    let line = out.lines().find(|l| l.starts_with("loss ")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// SAID at d = 50 on the quickstart data's q, v and down projections.
fn train_said(out: &Path, steps: &str, extra: &[&str]) -> String {
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let mut args = train_args(s(&m), s(&d), s(out), &["--max-steps", steps]);
    args.extend_from_slice(&[
        "--peft-type",
        "SAID",
        "--intrinsic-dimension",
        "50",
        "--learning-rate",
        "1e-2",
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--micro-batch-size",
        "2",
        "--validation-split",
        "0.01",
    ]);
    args.extend_from_slice(extra);
    ok(&args)
}

#[test]
fn said_trains_one_shared_theta_resumes_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train_said(&a, "6", &["--save-steps", "3"]);
    // one θ of d − m entries for the 12 targeted layers (q, v, down in 4 blocks), one λ per layer
    let t = tensors(&a);
    assert_eq!(t["base_model.said_theta"], vec![50 - 12], "{t:?}");
    let lambdas: Vec<_> = t.keys().filter(|k| k.ends_with(".said_lambda")).collect();
    assert_eq!(lambdas.len(), 12, "{t:?}");
    assert_eq!(t.len(), 13, "{t:?}");
    let j = read(&a.join("adapter_config.json"));
    assert_eq!(j["peft_type"], "SAID");
    assert_eq!(j["intrinsic_dimension"], 50);

    // 6 steps straight = 3 + resume 3
    train_said(&b, "6", &["--save-steps", "3"]);
    std::fs::remove_file(b.join("adapter_model.safetensors")).unwrap();
    resume_into(&b, &b.join("checkpoint-3"));
    assert_eq!(
        sha(&a.join("adapter_model.safetensors")),
        sha(&b.join("adapter_model.safetensors")),
        "6 steps straight != 3 + resume 3"
    );

    // the adapter moved the model, reloads to it, and merges into a plain model that scores the same
    let (base, tuned) = (eval_loss(None, &model()), eval_loss(Some(&a), &model()));
    assert!(tuned < base - 0.02, "SAID did not train: {base} -> {tuned}");
    let merged = dir.path().join("merged");
    let said = ok(&[
        "merge",
        "--model",
        s(&model()),
        "--adapter",
        s(&a),
        "--output",
        s(&merged),
        "--verify",
    ]);
    assert!(said.contains("merged 12 modules"), "{said}");
    assert!((eval_loss(None, &merged) - tuned).abs() < 1e-3);

    // a config that does not match the file's θ (d edited) is refused, naming the tensor
    let cfg_path = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("\"intrinsic_dimension\": 50", "\"intrinsic_dimension\": 60"),
    )
    .unwrap();
    let valid = data("quickstart-valid.jsonl");
    let e = fails(&eval_args(&model(), Some(&a), &valid, &[]));
    assert!(
        e.contains("base_model.said_theta") && e.contains("[48]"),
        "{e}"
    );
}

#[test]
fn plain_intrinsic_dimension_keeps_lambda_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("did");
    train_said(&out, "3", &["--structure-aware", "false"]);
    let t = tensors(&out);
    assert_eq!(t["base_model.said_theta"], vec![50]);
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (k, v) in st.tensors() {
        if k.ends_with(".said_lambda") {
            assert_eq!(v.data(), 1f32.to_le_bytes(), "{k}");
        }
    }
}

/// `analyze said` on the quickstart task, 8 steps per run.
fn analyze_args(out: &Path, dims: &str, extra: &[&str]) -> Vec<String> {
    let (m, train, valid) = (
        model(),
        data("quickstart-train.jsonl"),
        data("quickstart-valid.jsonl"),
    );
    let mut a = vec![
        "analyze",
        "said",
        "--model",
        s(&m),
        "--data",
        s(&train),
        "--eval-data",
        s(&valid),
        "--output",
        s(out),
        "--dims",
        dims,
        "--max-steps",
        "8",
        "--learning-rate",
        "1e-2",
        "--full-learning-rate",
        "1e-3",
    ];
    a.extend_from_slice(extra);
    a.into_iter().map(String::from).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn analyze_said_reports_the_curve_and_d90() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("said");
    let said = ok(&strs(&analyze_args(&out, "3000,20", &[])));
    let j = read(&out.join("said.json"));
    assert!(out.join("said.png").exists());
    let runs = j["runs"].as_array().unwrap();
    // in ascending order of d, each trained into its own directory
    let dims: Vec<u64> = runs
        .iter()
        .map(|r| r["intrinsic_dimension"].as_u64().unwrap())
        .collect();
    assert_eq!(dims, vec![20, 3000]);
    assert!(out.join("d-20/adapter_model.safetensors").exists());
    assert!(out.join("full/model.safetensors").exists());
    let (base, full) = (
        j["base"]["accuracy"].as_f64().unwrap(),
        j["full"]["accuracy"].as_f64().unwrap(),
    );
    assert!(full > base, "the full fine-tune did not learn: {j}");
    let threshold = j["threshold"].as_f64().unwrap();
    assert!((threshold - 0.9 * full).abs() < 1e-12);
    let first = runs
        .iter()
        .find(|r| r["accuracy"].as_f64().unwrap() >= threshold)
        .map(|r| r["intrinsic_dimension"].clone());
    assert_eq!(j["d90"], first.unwrap_or(serde_json::Value::Null), "{j}");
    // each reported score is the saved adapter's
    let loss = runs[1]["loss"].as_f64().unwrap();
    assert!((eval_loss(Some(&out.join("d-3000")), &model()) - loss).abs() < 1e-3);
    assert!(said.contains("full fine-tune accuracy"), "{said}");

    // a second analysis into the same directory is refused, --overwrite replaces it
    let e = fails(&strs(&analyze_args(&out, "20", &[])));
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite"),
        "{e}"
    );
    ok(&strs(&analyze_args(&out, "20", &["--overwrite"])));
}

#[test]
fn dimensions_that_do_not_fit_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("said");
    // the default targets (q_proj, v_proj in 4 blocks) are 8 layers: structure-aware d must exceed 8
    let e = fails(&strs(&analyze_args(&out, "100,5", &[])));
    assert!(
        e.contains("--dims 5") && e.contains("must exceed the 8 targeted layers"),
        "{e}"
    );
    let e = fails(&strs(&analyze_args(&out, "100000000", &[])));
    assert!(e.contains("exceeds the") && e.contains("parameters"), "{e}");
    assert!(!out.join("full").exists(), "a run started before the check");
    let e = fails(&strs(&analyze_args(&out, "100", &["--quantize", "nf4"])));
    assert!(e.contains("4-bit"), "{e}");
    let e = fails(&strs(&analyze_args(&out, "0", &[])));
    assert!(e.contains("positive"), "{e}");
    let e = fails(&strs(&analyze_args(&out, "100", &["--peft-type", "VERA"])));
    assert!(e.contains("leave peft_type unset"), "{e}");
}
