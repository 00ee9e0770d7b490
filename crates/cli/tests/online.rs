//! Online-LoRA through the CLI: a stream of two embedded tasks, its plateaus, the accuracy matrix and
//! forgetting, the final adapter that holds every pair, a resume that continues exactly, and bad input.

mod support;

use std::path::{Path, PathBuf};
use support::*;

/// The first `n` records of an embedded task's training file, as one segment of a stream.
fn segment(dir: &Path, task: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(data(&format!("{task}-train.jsonl"))).unwrap();
    let p = dir.join(format!("{task}.jsonl"));
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn online_args<'a>(
    first: &'a Path,
    rest: &'a str,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = train_args(
        s_static(&model()),
        s(first),
        s(out),
        &[
            "--method",
            "online_lora",
            "--stream-data",
            rest,
            "--r",
            "4",
            "--target-modules",
            "all-linear",
            "--learning-rate",
            "2e-3",
            "--micro-batch-size",
            "4",
            "--loss-window-mean-threshold",
            "1.0",
            "--loss-window-variance-threshold",
            "0.05",
            "--hard-buffer-size",
            "2",
        ],
    );
    args.extend_from_slice(extra);
    args
}

/// The embedded model's path, leaked for the life of the test process (argument lists borrow it).
fn s_static(p: &Path) -> &'static str {
    Box::leak(p.to_str().unwrap().to_string().into_boxed_str())
}

fn read(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn a_stream_of_two_tasks_consolidates_and_reports_forgetting() {
    let dir = tempfile::tempdir().unwrap();
    let qa = segment(dir.path(), "quickstart", 120);
    let rev = segment(dir.path(), "reverse", 120);
    let out = dir.path().join("run");
    let said = ok(&online_args(&qa, s(&rev), &out, &["--save-steps", "20"]));
    // one pass: 2 × 108 training examples (10% of each file held out) in steps of 4
    assert!(said.contains("trained 54 steps"), "{said}");
    let lines = metrics(&out);
    let plateaus: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "online_plateau")
        .collect();
    assert!(!plateaus.is_empty(), "no plateau on the stream");
    // after a plateau the penalty holds the new pair: it is logged, and positive once the pair moved
    assert!(lines
        .iter()
        .any(|l| l["online_penalty"].as_f64().is_some_and(|p| p > 0.0)));
    let report = read(&out.join("stream.json"));
    let matrix = report["matrix"].as_array().unwrap();
    assert_eq!(matrix.len(), 2, "{report}");
    assert_eq!(matrix[0]["step"], 27);
    assert_eq!(matrix[1]["step"], 54);
    // the QA segment was learned when it ended, and the reverse one had not been seen yet
    let acc = |row: usize, seg: usize| matrix[row]["accuracy"][seg].as_f64().unwrap();
    assert!(acc(0, 0) > acc(0, 1), "{report}");
    let forgetting = report["forgetting"].as_f64().unwrap();
    assert!((forgetting - (acc(0, 0) - acc(1, 0))).abs() < 1e-12);
    let avg = report["average_accuracy"].as_f64().unwrap();
    assert!((avg - (acc(1, 0) + acc(1, 1)) / 2.0).abs() < 1e-12);
    assert!(out.join("stream.png").exists());
    // every checkpoint scores every segment too: at 20 only the QA segment was reached, at 40 both
    let at: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("stream_checkpoint_eval").is_some())
        .collect();
    assert_eq!(at.len(), 2, "{at:?}");
    assert_eq!(
        (at[0]["step"].clone(), at[1]["step"].clone()),
        (20.into(), 40.into())
    );
    let e = &at[1]["stream_checkpoint_eval"];
    assert_eq!(e["segments_reached"], 2);
    let a: Vec<f64> = e["segment_accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!((e["average_accuracy"].as_f64().unwrap() - (a[0] + a[1]) / 2.0).abs() < 1e-12);
    assert_eq!(at[0]["stream_checkpoint_eval"]["segments_reached"], 1);
    // forgetting at 40: the QA segment's best score at its end (step 27) less its score now
    let f = e["forgetting"].as_f64().unwrap();
    assert!((f - (acc(0, 0) - a[0])).abs() < 1e-12, "{e}");
    assert!(at[0]["stream_checkpoint_eval"]["forgetting"].is_null());

    // the adapter holds every pair side by side: rank 4 × (plateaus + 1), on the original base
    let cfg = read(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 4 * (plateaus.len() + 1));
    assert_eq!(cfg["peft_type"], "LORA");
    // and reproduces the trained model on the original base: through eval, its loss on the reverse
    // segment's held-out records is the run's final score of that segment
    let held: Vec<usize> = report["held_out_examples"][1]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let all = std::fs::read_to_string(&rev).unwrap();
    let records: Vec<&str> = all.lines().collect();
    let held_file = dir.path().join("held.jsonl");
    let picked: Vec<&str> = held.iter().map(|&i| records[i]).collect();
    std::fs::write(&held_file, picked.join("\n") + "\n").unwrap();
    let j = ok_json(&eval_args(
        &model(),
        Some(&out),
        &held_file,
        &["--json", "--task", "perplexity"],
    ));
    let loss = j["perplexity"].as_f64().unwrap().ln();
    let want = matrix[1]["loss"][1].as_f64().unwrap();
    assert!(
        (loss - want).abs() < 1e-3 * want.max(1.0),
        "eval {loss} vs run {want}"
    );

    // a resume from a checkpoint after the first plateau continues exactly
    let first = plateaus[0]["step"].as_u64().unwrap();
    let ckpt = [20u64, 40].into_iter().find(|c| *c > first).unwrap();
    let fresh = dir.path().join("resumed");
    std::fs::create_dir_all(&fresh).unwrap();
    ok(&train_args(
        s(&model()),
        s(&qa),
        s(&fresh),
        &["--resume", s(&out.join(format!("checkpoint-{ckpt}")))],
    ));
    assert_eq!(
        sha(&fresh.join("adapter_model.safetensors")),
        sha(&out.join("adapter_model.safetensors"))
    );
    assert_eq!(read(&fresh.join("stream.json")), report);

    // the penalty changes what is learned (its gradient reaches the pair)
    let free = dir.path().join("free");
    ok(&online_args(&qa, s(&rev), &free, &["--mas-weight", "0"]));
    assert_ne!(
        sha(&free.join("adapter_model.safetensors")),
        sha(&out.join("adapter_model.safetensors"))
    );
}

#[test]
fn bad_streams_and_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let qa = segment(dir.path(), "quickstart", 40);
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = dir.path().join("o");
    let e = fails(&online_args(&qa, s(&empty), &out, &[]));
    assert!(e.contains("empty.jsonl"), "{e}");
    let e = fails(&online_args(&qa, s(&qa), &out, &["--max-steps", "500"]));
    assert!(e.contains("max_steps") && e.contains("single pass"), "{e}");
    let e = fails(&online_args(
        &qa,
        s(&qa),
        &out,
        &["--gradient-accumulation-steps", "2"],
    ));
    assert!(e.contains("gradient_accumulation_steps"), "{e}");
    let e = fails(&online_args(&qa, s(&qa), &out, &["--use-dora", "true"]));
    assert!(e.contains("use_dora"), "{e}");
    // Online-LoRA's keys on another method
    let e = fails(&train_args(
        s(&model()),
        s(&qa),
        s(&out),
        &["--mas-weight", "10"],
    ));
    assert!(e.contains("mas_weight") && e.contains("online_lora"), "{e}");
    let e = fails(&train_args(
        s(&model()),
        s(&qa),
        s(&out),
        &["--stream-data", s(&qa)],
    ));
    assert!(e.contains("stream_data"), "{e}");
}

#[test]
fn a_stream_of_text_files_is_packed_and_scored_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = std::fs::read_to_string(data("pretrain.txt")).unwrap();
    let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    let cut = |from: usize| {
        let from = (from..).find(|&i| corpus.is_char_boundary(i)).unwrap();
        let s = &corpus[from..];
        let end = s.char_indices().nth(30_000).map_or(s.len(), |(i, _)| i);
        s[..end].to_string()
    };
    std::fs::write(&a, cut(0)).unwrap();
    std::fs::write(&b, cut(corpus.len() / 2)).unwrap();
    let out = dir.path().join("run");
    ok(&online_args(&a, s(&b), &out, &["--seq-len", "128"]));
    let report = read(&out.join("stream.json"));
    let matrix = report["matrix"].as_array().unwrap();
    assert_eq!(matrix.len(), 2, "{report}");
    for (i, held) in report["held_out_examples"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert!(
            !held.as_array().unwrap().is_empty(),
            "segment {i} holds out blocks"
        );
    }
    // the last row is the end of the stream: every step ran
    let steps = metrics(&out)
        .iter()
        .filter(|l| l.get("loss").is_some())
        .count() as u64;
    assert_eq!(matrix[1]["step"].as_u64().unwrap(), steps);
}
