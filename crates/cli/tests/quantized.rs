//! 4-bit and bf16 bases: QLoRA, LoftQ, QDoTA, LQ-LoRA mixed precision and bf16 frozen weights.

mod support;

use std::path::Path;
use support::*;

#[test]
fn qlora_trains_on_a_4bit_base_resumes_and_merges_into_what_was_trained() {
    let dir = tempfile::tempdir().unwrap();
    let qlora = ["--quantize", "nf4", "--save-steps", "3"];
    let straight = dir.path().join("straight");
    train(&straight, "6", &qlora);
    // resuming reads the checkpoint's config and quantises the base again, identically
    let fresh = dir.path().join("resumed");
    resume_into(&fresh, &straight.join("checkpoint-3"));
    let adapter = |d: &Path| sha(&d.join("adapter_model.safetensors"));
    assert_eq!(
        adapter(&straight),
        adapter(&fresh),
        "QLoRA: 6 steps straight != 3 + resume 3"
    );

    // a checkpoint written by `factune quantize` trains exactly like quantising on the fly
    let q = dir.path().join("q");
    let out = ok(&["quantize", s(&model()), "--output", s(&q)]);
    assert!(out.contains("bits per weight"), "{out}");
    let on_disk = dir.path().join("on-disk");
    train_on(&q, &on_disk, "6", &[]);
    assert_eq!(
        adapter(&straight),
        adapter(&on_disk),
        "pre-quantised base trains differently"
    );

    // merging: into deq(Q) + ΔW by default (what was trained), into the full-precision W on request
    let merge = |into: &str, out: &Path| {
        ok(&[
            "merge",
            "--model",
            s(&model()),
            "--adapter",
            s(&straight),
            "--output",
            s(out),
            "--verify",
            "--merge-into",
            into,
        ])
    };
    let (mq, mo) = (dir.path().join("mq"), dir.path().join("mo"));
    let said = merge("quantized", &mq);
    assert!(said.contains("deq(Q)"), "{said}");
    let said = merge("original", &mo);
    assert!(said.contains("W + s·BA"), "{said}");
    assert_ne!(
        sha(&mq.join("model.safetensors")),
        sha(&mo.join("model.safetensors"))
    );
    // the quantised checkpoint merges to the same model as the on-the-fly quantised base
    let mdq = dir.path().join("mdq");
    ok(&[
        "merge",
        "--model",
        s(&q),
        "--adapter",
        s(&straight),
        "--output",
        s(&mdq),
    ]);
    assert_eq!(
        sha(&mq.join("model.safetensors")),
        sha(&mdq.join("model.safetensors"))
    );
}

/// A base held in bf16 trains, and evaluates to the f32 base's perplexity up to bf16 rounding of weights
/// stored in f32.
#[test]
fn bf16_base_trains_and_evaluates_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train(&out, "2", &["--base-dtype", "bfloat16"]);
    assert!(out.join("adapter_model.safetensors").exists());
    let ppl = |dtype: &str| {
        let j = ok_json(&eval_args(
            &model(),
            Some(&out),
            &data("pretrain.txt"),
            &[
                "--json",
                "--seq-len",
                "128",
                "--limit",
                "8",
                "--base-dtype",
                dtype,
            ],
        ));
        j["perplexity"].as_f64().unwrap()
    };
    let (full, half) = (ppl("float32"), ppl("bfloat16"));
    assert!(
        half != full && (half / full - 1.0).abs() < 0.01,
        "perplexity f32 {full} vs bf16 {half}"
    );
    let e = fails(&train_args(
        s(&model()),
        s(&data("quickstart-train.jsonl")),
        s(&dir.path().join("bad")),
        &["--base-dtype", "int8"],
    ));
    assert!(e.contains("base_dtype") && e.contains("int8"), "{e}");
}

#[test]
fn loftq_beats_plain_nf4_resumes_and_ships_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let loftq = [
        "--quantize",
        "nf4",
        "--init-lora-weights",
        "loftq",
        "--loftq-iter",
        "2",
        "--save-steps",
        "3",
    ];
    train(&straight, "6", &loftq);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(straight.join("loftq_errors.json")).unwrap())
            .unwrap();
    assert_eq!(
        rows.len(),
        12,
        "q_proj, v_proj, down_proj in each of 4 layers"
    );
    for r in &rows {
        let (l, n) = (
            r["loftq_error"].as_f64().unwrap(),
            r["nf4_error"].as_f64().unwrap(),
        );
        assert!(
            l < n,
            "{}: LoftQ {l} is not below plain NF4 {n}",
            r["module"]
        );
    }
    // resuming rebuilds LoftQ's base from W exactly
    let fresh = dir.path().join("resumed");
    resume_into(&fresh, &straight.join("checkpoint-3"));
    let adapter = |d: &Path| sha(&d.join("adapter_model.safetensors"));
    assert_eq!(
        adapter(&straight),
        adapter(&fresh),
        "LoftQ: 6 steps straight != 3 + resume 3"
    );
    // the adapter goes with its own 4-bit base, and a quantisation of the original is refused
    let valid = data("quickstart-valid.jsonl");
    let e = fails(&eval_args(&model(), Some(&straight), &valid, &[]));
    assert!(e.contains("loftq-base"), "{e}");
    let base = straight.join("loftq-base");
    let out = ok(&eval_args(&base, Some(&straight), &valid, &[]));
    assert!(out.contains("exact match"), "{out}");
}

#[test]
fn qdota_trains_resumes_bit_identically_and_evaluates_on_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let qdota = [
        "--method",
        "mpo",
        "--bond-dim",
        "4",
        "--quantize",
        "nf4",
        "--save-steps",
        "3",
    ];
    train(&straight, "6", &qdota);
    let fresh = dir.path().join("resumed");
    resume_into(&fresh, &straight.join("checkpoint-3"));
    let adapter = |d: &Path| sha(&d.join("adapter_model.safetensors"));
    assert_eq!(
        adapter(&straight),
        adapter(&fresh),
        "QDoTA: 6 steps straight != 3 + resume 3"
    );
    let out = ok(&["inspect", s(&straight)]);
    assert!(out.contains("MPO") && out.contains("bond_dim: 4"), "{out}");
    let valid = data("quickstart-valid.jsonl");
    let out = ok(&eval_args(&model(), Some(&straight), &valid, &[]));
    assert!(out.contains("exact match"), "{out}");
}

#[test]
fn mixed_precision_fits_the_budget_and_lq_lora_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let layout = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("quant_layout.json")).unwrap())
            .unwrap()
    };
    let error = |l: &serde_json::Value| -> f64 {
        l["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["relative_error"].as_f64().unwrap().powi(2))
            .sum()
    };
    let (tight, loose) = (dir.path().join("tight"), dir.path().join("loose"));
    train(
        &tight,
        "1",
        &["--quantize", "mixed", "--quant-budget-bits", "3.6"],
    );
    train(
        &loose,
        "1",
        &["--quantize", "mixed", "--quant-budget-bits", "5"],
    );
    let (t, l) = (layout(&tight), layout(&loose));
    for (x, budget) in [(&t, 3.6), (&l, 5.0)] {
        let avg = x["bits_per_weight"].as_f64().unwrap();
        assert!(
            avg <= budget && avg > budget - 1.0,
            "{avg} bits for a budget of {budget}"
        );
    }
    assert!(
        error(&l) < error(&t),
        "a larger budget must lower the error"
    );

    // LQ-LoRA: LoftQ at each layer's width; the plan and the base are rebuilt on resume
    let straight = dir.path().join("lq");
    let lq = [
        "--quantize",
        "mixed",
        "--quant-budget-bits",
        "3.6",
        "--init-lora-weights",
        "loftq",
        "--save-steps",
        "3",
    ];
    train(&straight, "6", &lq);
    let fresh = dir.path().join("lq-resumed");
    resume_into(&fresh, &straight.join("checkpoint-3"));
    let adapter = |d: &Path| sha(&d.join("adapter_model.safetensors"));
    assert_eq!(
        adapter(&straight),
        adapter(&fresh),
        "LQ-LoRA: 6 steps straight != 3 + resume 3"
    );
    let valid = data("quickstart-valid.jsonl");
    ok(&eval_args(&model(), Some(&straight), &valid, &[]));

    let run = dir.path().join("impossible");
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let e = fails(&train_args(
        s(&m),
        s(&d),
        s(&run),
        &[
            "--max-steps",
            "1",
            "--quantize",
            "mixed",
            "--quant-budget-bits",
            "2",
        ],
    ));
    assert!(e.contains("quant_budget_bits") && e.contains("NF3"), "{e}");
}
