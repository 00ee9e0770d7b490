//! End-to-end tests of every user-facing command on the embedded default model, including the promises about
//! determinism, resuming, atomic outputs and clear errors on bad input.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> PathBuf {
    repo().join("assets/default-model")
}

fn data(name: &str) -> PathBuf {
    repo().join("assets/data").join(name)
}

fn factune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_factune"))
        .args(args)
        .output()
        .expect("run factune")
}

fn ok(args: &[&str]) -> String {
    let o = factune(args);
    assert!(
        o.status.success(),
        "factune {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `eval` arguments: the model, an adapter if any, the data, then `extra`.
fn eval_args<'a>(
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
fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--model", model, "--data", data, "--output", out];
    args.extend_from_slice(extra);
    args
}

/// [`ok`] for a command that prints one JSON object.
fn ok_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(ok(args).trim()).unwrap()
}

fn fails(args: &[&str]) -> String {
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sha(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

/// A short LoRA run on the quickstart data.
fn train(out: &Path, steps: &str, extra: &[&str]) -> String {
    train_on(&model(), out, steps, extra)
}

/// [`train`] on another base model directory (e.g. a 4-bit copy).
fn train_on(m: &Path, out: &Path, steps: &str, extra: &[&str]) -> String {
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

#[test]
fn train_is_deterministic_and_writes_peft_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train(&a, "4", &[]);
    train(&b, "4", &[]);
    let (ha, hb) = (
        sha(&a.join("adapter_model.safetensors")),
        sha(&b.join("adapter_model.safetensors")),
    );
    assert_eq!(ha, hb, "two runs with the same config differ");
    for f in [
        "adapter_config.json",
        "metrics.jsonl",
        "loss.png",
        "run.json",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "q_proj", "v_proj"])
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["seeds"]["init"], 42);
    let lines = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(lines.lines().filter(|l| l.contains("\"loss\"")).count() == 4);
}

#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    train(&straight, "20", &["--save-steps", "10"]);
    train(&split, "20", &["--save-steps", "10"]);
    // Re-run the second half from the checkpoint of the split run.
    std::fs::remove_file(split.join("adapter_model.safetensors")).unwrap();
    let ckpt = split.join("checkpoint-10");
    assert!(
        ckpt.join("optimizer.safetensors").exists() && ckpt.join("trainer_state.json").exists()
    );
    resume_into(&split, &ckpt);
    assert_eq!(
        sha(&straight.join("adapter_model.safetensors")),
        sha(&split.join("adapter_model.safetensors")),
        "20 steps straight != 10 + resume 10"
    );
}

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

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let m = s(&model()).to_string();
    let run = |data: &Path, extra: &[&str]| {
        let mut a = train_args(&m, s(data), s(&out), &["--max-steps", "1"]);
        a.extend_from_slice(extra);
        fails(&a)
    };
    let bad = d.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{not json\n",
    )
    .unwrap();
    let e = run(&bad, &[]);
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    assert!(run(&empty, &[]).contains("empty"));
    let train = data("quickstart-train.jsonl");
    let e = run(&train, &["--target-modules", "query"]);
    assert!(e.contains("`query`") && e.contains("q_proj"), "{e}");
    let e = run(&train, &["--r", "4096"]);
    assert!(e.contains("r=4096") && e.contains("must be between"), "{e}");
    let e = run(&train, &["--seq-len", "100000"]);
    assert!(e.contains("exceeds the model's context"), "{e}");
    let cfg = d.join("run.toml");
    std::fs::write(&cfg, "learning_rat = 1e-3\n").unwrap();
    let e = fails(&train_args(&m, s(&train), s(&out), &["--config", s(&cfg)]));
    assert!(e.contains("run.toml") && e.contains("learning_rat"), "{e}");
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "nothing written on failure"
    );

    // Broken checkpoints: missing directory, truncated weights, unknown architecture, missing tensor.
    let e = fails(&["inspect", s(&d.join("nope"))]);
    assert!(e.contains("nope"), "{e}");
    let broken = d.join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model().join(f), broken.join(f)).unwrap();
    }
    let w = std::fs::read(model().join("model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let e = fails(&eval_args(
        &broken,
        None,
        &data("quickstart-valid.jsonl"),
        &[],
    ));
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let cfg_text = std::fs::read_to_string(model().join("config.json")).unwrap();
    std::fs::write(
        broken.join("config.json"),
        cfg_text.replace("\"llama\"", "\"mamba\""),
    )
    .unwrap();
    let e = fails(&["inspect", s(&broken)]);
    assert!(e.contains("mamba") && e.contains("supported"), "{e}");
    std::fs::write(
        broken.join("config.json"),
        cfg_text.replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5"),
    )
    .unwrap();
    std::fs::write(broken.join("model.safetensors"), &w).unwrap();
    let e = fails(&eval_args(
        &broken,
        None,
        &data("quickstart-valid.jsonl"),
        &[],
    ));
    assert!(e.contains("missing tensor `model.layers.4"), "{e}");

    // An adapter with a tensor for a module the model lacks: strict by default, --allow-partial opts out.
    let run_dir = d.join("run");
    let _ = std::fs::remove_dir_all(&out);
    ok(&train_args(
        &m,
        s(&train),
        s(&run_dir),
        &["--max-steps", "1", "--micro-batch-size", "1"],
    ));
    let cfg_path = run_dir.join("adapter_config.json");
    let c = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, c.replace("\"v_proj\"", "\"v_proj\", \"k_proj\"")).unwrap();
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--adapter",
        s(&run_dir),
        "--data",
        s(&data("quickstart-valid.jsonl")),
        "--limit",
        "1",
    ]);
    assert!(
        e.contains("targeted modules without tensors") && e.contains("--allow-partial"),
        "{e}"
    );
    ok(&[
        "eval",
        "--model",
        &m,
        "--adapter",
        s(&run_dir),
        "--allow-partial",
        "--data",
        s(&data("quickstart-valid.jsonl")),
        "--limit",
        "1",
    ]);
}

#[test]
fn non_finite_loss_stops_with_the_step_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let nan_model = dir.path().join("nan-model");
    std::fs::create_dir(&nan_model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model().join(f), nan_model.join(f)).unwrap();
    }
    // Poison the final norm: every logit becomes NaN.
    let src = model().join("model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "model.norm.weight" {
            data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        owned.push((name, data, view.shape().to_vec()));
    }
    for (name, data, shape) in &owned {
        tensors.push((
            name.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .unwrap(),
        ));
    }
    std::fs::write(
        nan_model.join("model.safetensors"),
        safetensors::tensor::serialize(tensors, None).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("out");
    let e = fails(&train_args(
        s(&nan_model),
        s(&data("quickstart-train.jsonl")),
        s(&out),
        &["--max-steps", "3"],
    ));
    assert!(e.contains("loss is NaN at step 1"), "{e}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

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

fn resume_into(fresh: &Path, ckpt: &Path) {
    std::fs::create_dir_all(fresh).unwrap();
    ok(&train_args(
        s(&model()),
        s(&data("quickstart-train.jsonl")),
        s(fresh),
        &["--resume", s(ckpt)],
    ));
}

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

#[test]
fn relora_conflicting_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let out = dir.path().join("x");
    let base = [
        "train",
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--output",
        s(&out),
    ];
    for (extra, want) in [
        (
            &["--relora-steps", "5", "--use-dora", "true"][..],
            "use_dora",
        ),
        (
            &["--relora-steps", "5", "--peft-type", "full"][..],
            "peft_type",
        ),
        (
            &["--relora-steps", "5", "--restart-warmup-steps", "5"][..],
            "restart_warmup_steps",
        ),
        (
            &["--optimizer-prune-ratio", "1.5"][..],
            "optimizer_prune_ratio",
        ),
        (
            &["--warm-start-steps", "10", "--peft-type", "full"][..],
            "warm_start_steps",
        ),
    ] {
        let err = fails(&[&base[..], extra].concat());
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

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
fn quantization_bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let base = [
        "train",
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--output",
        s(&run),
        "--max-steps",
        "2",
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let e = fails(&with(&base, &["--quantize", "nf3"]));
    assert!(e.contains("quantize") && e.contains("nf3"), "{e}");
    let e = fails(&with(&base, &["--quantize", "nf4", "--method", "full"]));
    assert!(e.contains("quantize") && e.contains("full"), "{e}");
    let e = fails(&with(&base, &["--init-lora-weights", "loftq"]));
    assert!(e.contains("loftq") && e.contains("nf4"), "{e}");

    // a 4-bit checkpoint missing its quant state: the file and the tensor are named
    let q = dir.path().join("q");
    ok(&["quantize", s(&model()), "--output", s(&q)]);
    let file = q.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4";
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != gone)
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&file, out).unwrap();
    let e = fails(&eval_args(&q, None, &data("quickstart-valid.jsonl"), &[]));
    assert!(e.contains(gone) && e.contains("model.safetensors"), "{e}");
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
fn tensor_adapter_bad_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let base = [
        "train",
        "--model",
        s(&m),
        "--data",
        s(&d),
        "--output",
        s(&run),
        "--max-steps",
        "2",
        "--method",
        "mpo",
    ];
    for (extra, want) in [
        (&["--use-dora", "true"][..], "DoRA"),
        (&["--init-weights", "svd"][..], "init_weights `svd`"),
        (&["--mpo-modes", "7"][..], "mpo_modes = 7"),
        (&["--bond-dim", "0"][..], "bond_dim"),
        (
            &["--mpo-factors", "192x192=8*8*4/8*8*3"][..],
            "do not factor",
        ),
        (
            &["--mpo-factors", "512x192=8*8*8"][..],
            "mpo_factors `512x192=8*8*8`",
        ),
    ] {
        let e = fails(&[&base[..], extra].concat());
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    // factors given for one shape are used for it; the other shapes are factored automatically
    ok(&[
        &base[..],
        &[
            "--mpo-factors",
            "512x192=2*16*16/3*8*8",
            "--bond-dim",
            "4",
            "--target-modules",
            "all-linear",
        ],
    ]
    .concat());
    let bytes = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let core = |m: &str| {
        st.tensor(&format!("base_model.model.model.layers.0.{m}.mpo_cores.0"))
            .unwrap()
            .shape()
            .to_vec()
    };
    assert_eq!(core("mlp.up_proj"), vec![1, 2, 3, 4]);
    assert_eq!(core("mlp.down_proj"), vec![1, 8, 8, 4]);
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

#[test]
fn unknown_methods_are_named_in_files_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    train(&adapter, "1", &[]);
    let cfg_path = adapter.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"LORA\"", "\"IA3\"")).unwrap();
    let e = fails(&eval_args(
        &model(),
        Some(&adapter),
        &data("quickstart-valid.jsonl"),
        &[],
    ));
    assert!(
        e.contains("adapter_config.json") && e.contains("IA3") && e.contains("VERA"),
        "{e}"
    );
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let out = dir.path().join("run");
    let e = fails(&train_args(s(&m), s(&d), s(&out), &["--method", "boft"]));
    assert!(e.contains("BOFT") && e.contains("supported"), "{e}");
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

#[test]
fn every_method_trains_saves_and_evaluates_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("vera", &["--method", "vera"][..]),
        (
            "rosa",
            &["--method", "rosa", "--sparse-density", "0.01"][..],
        ),
        ("multilora", &["--method", "multilora"][..]),
        ("glora", &["--method", "glora"][..]),
        ("mpo", &["--method", "mpo", "--bond-dim", "4"][..]),
        ("dora", &["--use-dora", "true"][..]),
        (
            "rslora",
            &["--use-rslora", "true", "--loraplus-lr-ratio", "16"][..],
        ),
    ] {
        let out = dir.path().join(name);
        // every adapter tensor must get a gradient (the trainer checks), on a bias-free Llama too
        train(&out, "2", extra);
        let said = ok(&eval_args(
            &model(),
            Some(&out),
            &data("quickstart-valid.jsonl"),
            &[],
        ));
        assert!(said.contains("exact match"), "{name}: {said}");
    }
}

/// The factune side of `bench/run.sh` at toy sizes (the full benchmark stays out of CI): each command prints
/// its JSON line, and the training side's model-FLOPs count is the accounting docs/performance.md writes
/// out, recomputed here from config.json.
#[test]
fn bench_commands_report_on_the_embedded_model() {
    let m = model();
    let train = ok_json(&[
        "bench",
        "train",
        "--model",
        s(&m),
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let c = |k: &str| cfg[k].as_u64().unwrap() as f64;
    let (d, inter, layers, vocab) = (
        c("hidden_size"),
        c("intermediate_size"),
        c("num_hidden_layers"),
        c("vocab_size"),
    );
    let (q, kv) = (
        c("num_attention_heads") * c("head_dim"),
        c("num_key_value_heads") * c("head_dim"),
    );
    // (in, out) of every linear in a block; LoRA r = 16 on all of them; the tied head is frozen.
    let shapes = [
        (d, q),
        (d, kv),
        (d, kv),
        (q, d),
        (d, inter),
        (d, inter),
        (inter, d),
    ];
    let frozen: f64 = layers * shapes.iter().map(|(i, o)| i * o).sum::<f64>() + vocab * d;
    let trainable: f64 = layers * shapes.iter().map(|(i, o)| 16.0 * (i + o)).sum::<f64>();
    let attention = 3.0 * layers * 2.0 * 32.0 * q;
    let want = 4.0 * frozen + 6.0 * trainable + attention;
    assert_eq!(train["flops_per_token"].as_f64().unwrap(), want);
    let (tps, loss) = (
        train["tokens_per_s"].as_f64().unwrap(),
        train["loss"].as_f64().unwrap(),
    );
    assert!(
        tps > 0.0 && tps.is_finite() && loss.is_finite() && loss > 0.0,
        "{train}"
    );
    let gflops = train["gflops"].as_f64().unwrap();
    assert!(
        (gflops - want * tps / 1e9).abs() <= 1e-6 * gflops,
        "{train}"
    );

    let infer = ok_json(&[
        "bench",
        "infer",
        "--model",
        s(&m),
        "--prompt-len",
        "16",
        "--new-tokens",
        "4",
        "--reps",
        "1",
    ]);
    assert_eq!(infer["tokens"].as_array().unwrap().len(), 4, "{infer}");
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(infer[key].as_f64().unwrap() > 0.0, "{infer}");
    }
    let peak = ok_json(&["bench", "peak", "--tokens", "64", "--reps", "1"]);
    let best = peak["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["gflops"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        best > 0.0 && peak["peak_gflops"].as_f64().unwrap() == best,
        "{peak}"
    );
}
