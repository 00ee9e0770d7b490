//! eval, generate, merge and inspect on a trained adapter.

mod support;

use support::*;

#[test]
fn eval_generate_merge_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train(&out, "3", &[]);
    let j = ok_json(&eval_args(
        &model(),
        None,
        &data("pretrain.txt"),
        &["--json", "--seq-len", "128", "--limit", "0"],
    ));
    assert!(j["perplexity"].as_f64().unwrap() > 1.0 && j["tokens"].as_u64().unwrap() > 1000);
    let j = ok_json(&eval_args(
        &model(),
        Some(&out),
        &data("quickstart-valid.jsonl"),
        &["--json", "--limit", "5", "--max-new-tokens", "6"],
    ));
    assert_eq!(j["n"], 5);
    let mc = dir.path().join("mc.jsonl");
    std::fs::write(&mc, "{\"question\": \"Tom has a red ball. The ball is\", \"choices\": [\"red.\", \"in the\"], \"answer\": 1}\n").unwrap();
    let j = ok_json(&eval_args(&model(), None, &mc, &["--json"]));
    assert_eq!(j["n"], 1);
    assert!(j["accuracy"].as_f64().is_some() && j["accuracy_norm"].as_f64().is_some());
    let g = ok(&[
        "generate",
        "--model",
        s(&model()),
        "--prompt",
        "Tom has a",
        "--max-new-tokens",
        "8",
    ]);
    assert!(g.starts_with("Tom has a") && g.len() > "Tom has a".len());
    let merged = dir.path().join("merged");
    let m = ok(&[
        "merge",
        "--model",
        s(&model()),
        "--adapter",
        s(&out),
        "--output",
        s(&merged),
        "--verify",
    ]);
    let diff: f64 = m.split("= ").last().unwrap().trim().parse().unwrap();
    assert!(diff < 1e-4, "{m}");
    assert!(merged.join("tokenizer.json").exists() && merged.join("config.json").exists());
    let i = ok(&["inspect", s(&out)]);
    assert!(i.contains("method: LORA") && i.contains("r: 4"), "{i}");
    let i = ok(&["inspect", s(&model())]);
    assert!(
        i.contains("architecture: llama") && i.contains("q_proj"),
        "{i}"
    );
}
