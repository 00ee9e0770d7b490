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

/// `--model org/name` is found in the local Hugging Face cache (HF_HOME), never downloaded.
#[test]
fn a_hub_id_resolves_to_the_cached_snapshot() {
    let home = tempfile::tempdir().unwrap();
    let snap = home.path().join("hub/models--acme--tiny/snapshots/r1");
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(model(), &snap).unwrap();
    let run = |hf_home: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_factune"))
            .args([
                "generate",
                "--model",
                "acme/tiny",
                "--prompt",
                "Tom has",
                "--max-new-tokens",
                "3",
            ])
            .env("HF_HOME", hf_home)
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
    };
    let o = run(home.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let direct = ok(&[
        "generate",
        "--model",
        s(&model()),
        "--prompt",
        "Tom has",
        "--max-new-tokens",
        "3",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), direct);
    let o = run(&home.path().join("elsewhere"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(e.contains("huggingface-cli download acme/tiny"), "{e}");
}
