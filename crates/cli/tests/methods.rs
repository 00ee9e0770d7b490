//! Methods whose init or schedule lives in the trainer: PiSSA, AdaLoRA and EVA, each resumed bit-identically.

mod support;

use std::path::Path;
use support::*;

#[test]
fn pissa_resumes_bit_identically_and_saves_a_portable_lora() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let pissa = ["--init-lora-weights", "pissa_niter_2", "--save-steps", "3"];
    train(&straight, "6", &pissa);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(straight.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    // r = 4 trained, written as rank 8 relative to the original weights.
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(8), Some(32.0))
    );
    assert_eq!(cfg["init_lora_weights"], true);
    let ckpt: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(straight.join("checkpoint-3/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ckpt["init_lora_weights"], "pissa_niter_2");
    let fresh = dir.path().join("resumed");
    resume_into(&fresh, &straight.join("checkpoint-3"));
    assert_eq!(
        sha(&straight.join("adapter_model.safetensors")),
        sha(&fresh.join("adapter_model.safetensors")),
        "PiSSA: 6 steps straight != 3 + resume 3"
    );
    let out = ok(&[
        "merge",
        "--model",
        s(&model()),
        "--adapter",
        s(&straight),
        "--output",
        s(&dir.path().join("merged")),
        "--verify",
    ]);
    assert!(out.contains("max"), "{out}");
}

#[test]
fn adalora_reaches_its_budget_logs_the_rank_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let ada = [
        "--method",
        "adalora",
        "--init-r",
        "6",
        "--target-r",
        "2",
        "--tinit",
        "2",
        "--tfinal",
        "2",
        "--lora-alpha",
        "12",
        "--save-steps",
        "4",
    ];
    train(&straight, "10", &ada);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(straight.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "ADALORA");
    let pattern = cfg["rank_pattern"].as_object().unwrap();
    let modules = pattern.len();
    let kept: usize = pattern
        .values()
        .map(|m| {
            m.as_array()
                .unwrap()
                .iter()
                .filter(|b| b == &&serde_json::Value::Bool(true))
                .count()
        })
        .sum();
    assert_eq!(
        (modules, kept),
        (12, 2 * 12),
        "final total rank = target_r × modules"
    );
    let ranks: Vec<u64> = std::fs::read_to_string(straight.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["rank"].as_u64())
        .collect();
    assert_eq!(
        (ranks.len(), ranks[0], ranks[9]),
        (10, 72, 24),
        "rank logged every step: {ranks:?}"
    );
    assert!(ranks.windows(2).all(|w| w[1] <= w[0]), "{ranks:?}");
    // checkpoint-4 lies inside the pruning phase: the importance EMAs travel with it
    let fresh = dir.path().join("resumed");
    resume_into(&fresh, &straight.join("checkpoint-4"));
    let adapter = |d: &Path| sha(&d.join("adapter_model.safetensors"));
    assert_eq!(
        adapter(&straight),
        adapter(&fresh),
        "AdaLoRA: 10 steps straight != 4 + resume 6"
    );
    let out = ok(&eval_args(
        &model(),
        Some(&straight),
        &data("quickstart-valid.jsonl"),
        &[],
    ));
    assert!(out.contains("exact match"), "{out}");
}

#[test]
fn eva_redistributes_ranks_within_the_budget_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    train(
        &straight,
        "6",
        &[
            "--init-lora-weights",
            "eva",
            "--eva-batches",
            "2",
            "--save-steps",
            "3",
        ],
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(straight.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["init_lora_weights"], true,
        "saved as plain LoRA with patterns"
    );
    let ranks = cfg["rank_pattern"].as_object().unwrap();
    assert!(
        !ranks.is_empty(),
        "the redistribution moved some ranks: {cfg}"
    );
    // q_proj, v_proj, down_proj in 4 layers at r = 4: the budget is 48 however it is spread
    let modules = 12;
    let total: u64 = ranks.values().map(|v| v.as_u64().unwrap()).sum::<u64>()
        + 4 * (modules - ranks.len() as u64);
    assert_eq!(total, 48, "{ranks:?}");
    let fresh = dir.path().join("resumed");
    resume_into(&fresh, &straight.join("checkpoint-3"));
    let adapter = |d: &Path| sha(&d.join("adapter_model.safetensors"));
    assert_eq!(
        adapter(&straight),
        adapter(&fresh),
        "EVA: 6 steps straight != 3 + resume 3"
    );
}
