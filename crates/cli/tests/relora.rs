//! ReLoRA through the CLI: resume across the warm start and restarts, and the rank its update reaches.

mod support;

use std::path::Path;
use support::*;

const RELORA: &[&str] = &[
    "--relora-steps",
    "4",
    "--restart-warmup-steps",
    "1",
    "--warm-start-steps",
    "3",
    "--train-embeddings-and-norms",
    "true",
    "--save-steps",
    "3",
];

#[test]
fn relora_resume_is_bit_identical_across_warm_start_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let out = train(&straight, "14", RELORA);
    assert!(out.contains("full model"), "{out}");
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let restarts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("relora_restart"))
        .collect();
    // Warm start ends before step 3; restarts at 7 and 11.
    assert!(metrics.contains("warm_start_end"));
    assert_eq!(restarts.len(), 2, "{restarts:?}");
    let want = sha(&straight.join("model.safetensors"));
    // checkpoint-3: still full-rank (the switch is the next step); -6: adapters, before restart 1;
    // -9: after restart 1.
    for n in [3, 6, 9] {
        let fresh = dir.path().join(format!("from-{n}"));
        resume_into(&fresh, &straight.join(format!("checkpoint-{n}")));
        assert_eq!(
            sha(&fresh.join("model.safetensors")),
            want,
            "14 steps straight != resume from checkpoint-{n}"
        );
    }
}

fn update_ranks(out: &Path) -> Vec<u64> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("update_spectrum.json")).unwrap())
            .unwrap();
    j["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["rank"].as_u64().unwrap())
        .collect()
}

#[test]
fn relora_update_exceeds_the_adapter_rank_where_lora_stays_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, relora) = (dir.path().join("lora"), dir.path().join("relora"));
    let common = [
        "--train-embeddings-and-norms",
        "true",
        "--restart-warmup-steps",
        "1",
    ];
    train(&lora, "12", &common);
    train(
        &relora,
        "12",
        &[&common[..], &["--relora-steps", "3"]].concat(),
    );
    let (l, rl) = (update_ranks(&lora), update_ranks(&relora));
    // Adapters (r = 4) on q_proj, v_proj, down_proj of 4 layers; the other linears never change.
    assert_eq!(l.iter().filter(|&&r| r > 0).count(), 12, "{l:?}");
    assert!(l.iter().all(|&r| r <= 4), "LoRA update above r: {l:?}");
    let changed: Vec<u64> = rl.into_iter().filter(|&r| r > 0).collect();
    assert_eq!(changed.len(), 12);
    assert!(
        changed.iter().all(|&r| r > 4),
        "ReLoRA (4 cycles of rank 4) did not exceed r: {changed:?}"
    );
}

/// Resuming works from every checkpoint of a short run, and ends where the straight run ends: inside the
/// learning-rate warmup (the adapters have not moved yet, so A's gradient is still zero), and at and just
/// after each ReLoRA restart (the factors were just re-drawn).
#[test]
fn resume_from_every_checkpoint_matches_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let every = ["--save-steps", "1"];
    let with = |flags: &'static [&'static str]| -> Vec<&'static str> {
        flags.iter().chain(&every).copied().collect()
    };
    let cases: Vec<(&str, Vec<&str>, usize)> = vec![
        ("lora-warmup", with(&["--warmup-steps", "3"]), 5),
        (
            "relora",
            with(&["--relora-steps", "3", "--restart-warmup-steps", "1"]),
            8,
        ),
        // every method, and the schedules and step settings a resume must restore
        ("vera", with(&["--method", "vera"]), 4),
        (
            "rosa",
            with(&["--method", "rosa", "--sparse-density", "0.01"]),
            4,
        ),
        ("multilora", with(&["--method", "multilora"]), 4),
        ("glora", with(&["--method", "glora"]), 4),
        ("mpo", with(&["--method", "mpo", "--bond-dim", "4"]), 4),
        ("dora", with(&["--use-dora", "true"]), 4),
        (
            "rslora-loraplus",
            with(&["--use-rslora", "true", "--loraplus-lr-ratio", "16"]),
            4,
        ),
        (
            "linear-accumulation",
            with(&[
                "--lr-scheduler-type",
                "linear",
                "--warmup-ratio",
                "0.5",
                "--gradient-accumulation-steps",
                "2",
            ]),
            4,
        ),
        (
            "constant-checkpointing",
            with(&[
                "--lr-scheduler-type",
                "constant",
                "--gradient-checkpointing",
                "true",
                "--weight-decay",
                "0.1",
            ]),
            4,
        ),
        (
            "best-early-stop",
            with(&[
                "--eval-steps",
                "1",
                "--load-best-model-at-end",
                "true",
                "--early-stopping-patience",
                "3",
            ]),
            4,
        ),
        (
            "embeddings-norms",
            with(&["--train-embeddings-and-norms", "true"]),
            4,
        ),
    ];
    for (name, extra, steps) in cases {
        let straight = dir.path().join(name);
        train(&straight, &steps.to_string(), &extra);
        let result = ["adapter_model.safetensors", "model.safetensors"]
            .into_iter()
            .find(|f| straight.join(f).exists())
            .unwrap();
        let want = sha(&straight.join(result));
        for n in 1..steps {
            let fresh = dir.path().join(format!("{name}-from-{n}"));
            resume_into(&fresh, &straight.join(format!("checkpoint-{n}")));
            assert_eq!(
                sha(&fresh.join(result)),
                want,
                "{name}: {steps} steps straight != resumed from checkpoint-{n}"
            );
        }
    }
}
