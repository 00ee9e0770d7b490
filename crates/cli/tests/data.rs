//! Data files as PEFT/TRL users bring them: containers, record shapes and truncation, through `train` and
//! `eval`.

mod support;
use support::*;

fn fixture(name: &str) -> std::path::PathBuf {
    repo().join("tests/fixtures/data").join(name)
}

/// One step on the embedded model (`MODEL` outlives the argument list).
fn short_run<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    static MODEL: std::sync::LazyLock<std::path::PathBuf> = std::sync::LazyLock::new(model);
    let mut args = train_args(s(&MODEL), data, out, &["--max-steps", "1"]);
    args.extend_from_slice(&["--micro-batch-size", "2", "--validation-split", "0"]);
    args.extend_from_slice(extra);
    args
}

/// The same records as JSON lines and as the Parquet file `datasets` wrote train to the same adapter.
#[test]
fn parquet_and_jsonl_train_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let pc = fixture("pc.jsonl");
    let pq = fixture("pc.parquet");
    ok(&short_run(s(&pc), s(&a), &[]));
    ok(&short_run(s(&pq), s(&b), &[]));
    let name = "adapter_model.safetensors";
    assert_eq!(sha(&a.join(name)), sha(&b.join(name)));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["train_examples"], 3);
    assert_eq!(run["truncation"]["examples_cut"], 0);
}

#[test]
fn truncated_labels_are_refused_or_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("long.jsonl");
    let prompt = "word ".repeat(60);
    std::fs::write(
        &data,
        format!(
            "{{\"prompt\": \"{prompt}\", \"completion\": \" yes\"}}\n{{\"prompt\": \"Q:\", \"completion\": \" yes\"}}\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let e = fails(&short_run(s(&data), s(&out), &["--seq-len", "32"]));
    assert!(
        e.contains("1 of 2 examples keep no label token at seq_len 32 (line 1)"),
        "{e}"
    );
    let o = factune(&short_run(
        s(&data),
        s(&out),
        &[
            "--seq-len",
            "32",
            "--allow-truncated-labels",
            "true",
            "--overwrite",
        ],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("1 examples were longer than seq_len 32")
            && err.contains("1 kept no label token"),
        "{err}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["truncation"]["examples_skipped"], 1);
    assert_eq!(run["train_examples"], 1);
}

/// Exact match reads prompt/completion and chat records (the last assistant turn is the answer); multiple
/// choice takes the answer as an index, a letter or the choice text, from any container.
#[test]
fn eval_reads_the_shapes_and_answer_forms() {
    let dir = tempfile::tempdir().unwrap();
    let j = ok_json(&eval_args(
        &model(),
        None,
        &fixture("pc.parquet"),
        &["--json"],
    ));
    assert_eq!(j["n"], 3, "{j}");
    assert!(
        j.get("exact_match").is_some(),
        "prompt/completion is detected as exact match: {j}"
    );
    let j = ok_json(&eval_args(
        &model(),
        None,
        &fixture("chat.parquet"),
        &["--task", "exact-match", "--json"],
    ));
    assert_eq!(j["n"], 2, "{j}");
    let j = ok_json(&eval_args(
        &model(),
        None,
        &fixture("chat.parquet"),
        &["--json"],
    ));
    assert!(j["perplexity"].as_f64().unwrap().is_finite(), "{j}");
    let q = "Tom has a red ball. The ball is";
    let mut scores = Vec::new();
    for answer in ["1", "\"B\"", "\"in the\"", "\"1\""] {
        let mc = dir.path().join("mc.jsonl");
        std::fs::write(
            &mc,
            format!("{{\"question\": \"{q}\", \"choices\": [\"red.\", \"in the\"], \"answer\": {answer}}}\n"),
        )
        .unwrap();
        scores.push(ok_json(&eval_args(&model(), None, &mc, &["--json"]))["accuracy"].clone());
    }
    assert!(scores.iter().all(|a| *a == scores[0]), "{scores:?}");
    let csv = dir.path().join("mc.csv");
    std::fs::write(&csv, "question,choices,answer\nQ,x,1\n").unwrap();
    let e = fails(&eval_args(&model(), None, &csv, &["--task", "mc"]));
    assert!(e.contains("row 1: missing array `choices`"), "{e}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{{\"question\": \"{q}\", \"choices\": [\"red.\", \"in the\"], \"answer\": \"E\"}}\n"
        ),
    )
    .unwrap();
    let e = fails(&eval_args(&model(), None, &bad, &[]));
    assert!(
        e.contains("line 1: `answer` \"E\" is neither an index"),
        "{e}"
    );
}

/// `--eval-data`: every training example trains and validation comes from the file.
#[test]
fn a_separate_validation_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let m = model();
    let (train, valid) = (
        data("quickstart-train.jsonl"),
        data("quickstart-valid.jsonl"),
    );
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    let mut args = train_args(
        s(&m),
        s(&train),
        s(&out),
        &["--max-steps", "1", "--eval-data", s(&valid)],
    );
    ok(&args);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["train_examples"], lines(&train));
    assert_eq!(run["validation_examples"], lines(&valid));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("val_loss"), "{metrics}");
    args.extend(["--validation-split", "0.2", "--overwrite"]);
    let e = fails(&args);
    assert!(
        e.contains("set one of validation_split and eval_data"),
        "{e}"
    );
}
