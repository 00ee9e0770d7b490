//! The prompt family through the CLI on the embedded model: train (with gradient checkpointing), resume
//! bit-identically, eval, generate, inspect; merge refuses; settings that do not apply are errors.

mod support;

use std::path::Path;
use support::*;

fn train_prompt(out: &Path, extra: &[&str]) -> String {
    let d = data("quickstart-train.jsonl");
    let m = model();
    let mut args = train_args(s(&m), s(&d), s(out), &["--max-steps", "6"]);
    args.extend_from_slice(&[
        "--micro-batch-size",
        "2",
        "--seq-len",
        "128",
        "--learning-rate",
        "1e-2",
        "--num-virtual-tokens",
        "6",
        "--save-steps",
        "3",
        "--validation-split",
        "0.01",
    ]);
    args.extend_from_slice(extra);
    ok(&args)
}

#[test]
fn each_prompt_method_trains_resumes_bit_identically_evaluates_and_generates() {
    for method in [
        &[
            "--peft-type",
            "PROMPT_TUNING",
            "--gradient-checkpointing",
            "true",
        ][..],
        &["--peft-type", "P_TUNING", "--encoder-hidden-size", "24"][..],
        &[
            "--peft-type",
            "P_TUNING",
            "--encoder-reparameterization-type",
            "LSTM",
            "--encoder-hidden-size",
            "16",
            "--encoder-dropout",
            "0.1",
        ][..],
        &[
            "--peft-type",
            "PREFIX_TUNING",
            "--prefix-projection",
            "true",
        ][..],
        &["--peft-type", "PREFIX_TUNING"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let straight = dir.path().join("straight");
        let out = train_prompt(&straight, method);
        assert!(out.contains("trained 6 steps"), "{method:?}: {out}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(straight.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], method[1]);
        assert!(
            cfg.get("r").is_none() && cfg.get("target_modules").is_none(),
            "{cfg}"
        );
        let fresh = dir.path().join("resumed");
        resume_into(&fresh, &straight.join("checkpoint-3"));
        assert_eq!(
            sha(&straight.join("adapter_model.safetensors")),
            sha(&fresh.join("adapter_model.safetensors")),
            "{method:?}: 6 steps straight != 3 + resume 3"
        );
        let valid = data("quickstart-valid.jsonl");
        let base = ok_json(&eval_args(
            &model(),
            None,
            &valid,
            &["--task", "perplexity", "--json"],
        ));
        let tuned = ok_json(&eval_args(
            &model(),
            Some(&straight),
            &valid,
            &["--task", "perplexity", "--json"],
        ));
        let (b, t) = (
            base["perplexity"].as_f64().unwrap(),
            tuned["perplexity"].as_f64().unwrap(),
        );
        assert!(t.is_finite() && t != b, "{method:?}: perplexity {b} -> {t}");
        let em = ok_json(&eval_args(
            &model(),
            Some(&straight),
            &valid,
            &["--task", "exact-match", "--json"],
        ));
        assert!(em["n"].as_u64().unwrap() > 0, "{em}");
        let text = ok(&[
            "generate",
            "--model",
            s(&model()),
            "--adapter",
            s(&straight),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
        ]);
        assert!(text.starts_with("Once upon a time"), "{text}");
        let shown = ok(&["inspect", s(&straight)]);
        assert!(
            shown.contains(method[1]) && shown.contains("num_virtual_tokens: 6"),
            "{shown}"
        );
        let e = fails(&[
            "merge",
            "--model",
            s(&model()),
            "--adapter",
            s(&straight),
            "--output",
            s(&dir.path().join("merged")),
        ]);
        assert!(e.contains("nothing to merge"), "{e}");
    }
}

#[test]
fn text_init_and_bad_prompt_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = train_prompt(
        &dir.path().join("text"),
        &[
            "--peft-type",
            "PROMPT_TUNING",
            "--prompt-tuning-init",
            "TEXT",
            "--prompt-tuning-init-text",
            "Answer the question:",
        ],
    );
    assert!(out.contains("trained 6 steps"), "{out}");
    let d = data("quickstart-train.jsonl");
    let m = model();
    let o = dir.path().join("bad");
    for (extra, want) in [
        (
            &["--peft-type", "PROMPT_TUNING", "--r", "16"][..],
            "`r`: a setting of adapters on linear layers",
        ),
        (
            &["--peft-type", "PROMPT_TUNING", "--num-virtual-tokens", "0"][..],
            "num_virtual_tokens must be at least 1",
        ),
        (
            &[
                "--peft-type",
                "PROMPT_TUNING",
                "--prompt-tuning-init",
                "TEXT",
            ][..],
            "needs prompt_tuning_init_text",
        ),
        (
            &[
                "--peft-type",
                "PROMPT_TUNING",
                "--prompt-tuning-init",
                "TEXT",
                "--prompt-tuning-init-text",
                "",
            ][..],
            "tokenises to nothing",
        ),
        (
            &[
                "--peft-type",
                "PROMPT_TUNING",
                "--prompt-tuning-init",
                "WORDS",
            ][..],
            "expected one of RANDOM, TEXT, SAMPLE_VOCAB",
        ),
        (
            &[
                "--peft-type",
                "P_TUNING",
                "--encoder-reparameterization-type",
                "LSTM",
                "--encoder-num-layers",
                "0",
            ][..],
            "expected at least one layer",
        ),
        (
            &[
                "--peft-type",
                "P_TUNING",
                "--encoder-reparameterization-type",
                "LSTM",
                "--encoder-num-layers",
                "1000000000",
            ][..],
            "with gradients and optimizer state, more than this machine's",
        ),
        (
            &[
                "--peft-type",
                "PREFIX_TUNING",
                "--prefix-projection",
                "true",
                "--encoder-hidden-size",
                "100000000000",
            ][..],
            "with gradients and optimizer state, more than this machine's",
        ),
        (
            &[
                "--peft-type",
                "PREFIX_TUNING",
                "--prompt-tuning-init",
                "TEXT",
            ][..],
            "is a setting of PROMPT_TUNING",
        ),
    ] {
        let mut args = train_args(s(&m), s(&d), s(&o), &["--max-steps", "2"]);
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

#[test]
fn focused_prefix_tuning_contrasts_a_specific_prefix_with_a_general_one() {
    let dir = tempfile::tempdir().unwrap();
    let (general, specific) = (dir.path().join("general"), dir.path().join("specific"));
    train_prompt(&general, &["--peft-type", "PREFIX_TUNING"]);
    let d = data("reverse-train.jsonl");
    let m = model();
    let mut args = train_args(s(&m), s(&d), s(&specific), &["--max-steps", "6"]);
    args.extend_from_slice(&[
        "--peft-type",
        "PREFIX_TUNING",
        "--num-virtual-tokens",
        "6",
        "--learning-rate",
        "1e-2",
        "--seq-len",
        "128",
    ]);
    ok(&args);
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            s(&m),
            "--adapter",
            s(&specific),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
        ];
        a.extend_from_slice(extra);
        ok(&a)
    };
    let plain = gen(&[]);
    let g = s(&general);
    // weight 0 is the specific prefix alone; a positive weight changes what is generated
    assert_eq!(
        gen(&["--contrast-adapter", g, "--contrast-weight", "0"]),
        plain
    );
    let focused = gen(&["--contrast-adapter", g, "--contrast-weight", "1.5"]);
    assert!(
        focused.starts_with("Once upon a time") && focused != plain,
        "{focused} / {plain}"
    );
    // eval under the contrast: weight 0 scores as the specific prefix alone, a positive weight otherwise
    let valid = data("reverse-valid.jsonl");
    let score = |task: &str, extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--model",
            s(&m),
            "--adapter",
            s(&specific),
            "--data",
            s(&valid),
            "--task",
            task,
            "--json",
            "--limit",
            "4",
            "--max-new-tokens",
            "8",
        ];
        a.extend_from_slice(extra);
        ok_json(&a)
    };
    let loss = |j: serde_json::Value| j["loss"].as_f64().unwrap();
    let alone = loss(score("perplexity", &[]));
    let at0 = loss(score(
        "perplexity",
        &["--contrast-adapter", g, "--contrast-weight", "0"],
    ));
    let at1 = loss(score(
        "perplexity",
        &["--contrast-adapter", g, "--contrast-weight", "1"],
    ));
    assert!((at0 - alone).abs() < 1e-4 * alone, "{at0} vs {alone}");
    assert!(
        at1.is_finite() && (at1 - alone).abs() > 1e-3,
        "{at1} vs {alone}"
    );
    let em = |extra: &[&str]| score("exact-match", extra)["exact_match"].as_f64().unwrap();
    assert_eq!(
        em(&["--contrast-adapter", g, "--contrast-weight", "0"]),
        em(&[])
    );
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "x",
        "--contrast-adapter",
        g,
    ]);
    assert!(
        e.contains("needs --adapter to be a prompt-family adapter"),
        "{e}"
    );
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--adapter",
        s(&specific),
        "--prompt",
        "x",
        "--contrast-adapter",
        g,
        "--contrast-weight",
        "nan",
    ]);
    assert!(e.contains("--contrast-weight NaN"), "{e}");
}
