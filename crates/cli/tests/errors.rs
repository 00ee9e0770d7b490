//! Bad inputs get clear errors that name the file, key or value, with exit code 1 and nothing half-written.

mod support;

use std::path::Path;
use support::*;

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
    let e = fails(&eval_args(&model(), Some(&model()), &train, &[]));
    assert!(
        e.contains("a full model") && e.contains("pass it as --model"),
        "{e}"
    );
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

/// A bad run config fails before any weight is read: the model directory here does not exist, so an error
/// that names the key (and not the model) shows that the config was checked first.
#[test]
fn bad_run_configs_fail_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-model");
    let train_data = data("quickstart-train.jsonl");
    let cases: &[(&str, &[&str])] = &[
        (
            "lr_scheduler_type = \"cosin\"",
            &["lr_scheduler_type", "cosin", "cosine, linear, constant"],
        ),
        ("learning_rat = 1e-3", &["learning_rat"]),
        ("r = \"eight\"", &["r = \"eight\"", "invalid type"]),
        ("peft_type = \"LORAX\"", &["peft_type", "LORAX", "LORA"]),
        (
            "quantize = \"nf5\"",
            &["quantize", "nf5", "none, nf4, mixed"],
        ),
        (
            "data_format = \"xlsx\"",
            &[
                "data_format",
                "xlsx",
                "auto, text, jsonl, json, csv, tsv, parquet, alpaca, chat",
            ],
        ),
        (
            "base_dtype = \"int8\"",
            &["base_dtype", "int8", "float32, bfloat16"],
        ),
        (
            "peft_type = \"MPO\"\nmpo_factors = \"nonsense\"",
            &["mpo_factors"],
        ),
    ];
    for (i, (toml, want)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("run{i}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let e = fails(&train_args(
            s(&missing),
            s(&train_data),
            s(&out),
            &["--config", s(&cfg)],
        ));
        for w in *want {
            assert!(e.contains(w), "{toml}: `{w}` missing from: {e}");
        }
        assert!(
            !e.contains("no-model"),
            "{toml}: the model was read first: {e}"
        );
    }
    let e = fails(&train_args(
        s(&missing),
        s(&train_data),
        s(&dir.path().join("flags")),
        &["--lr-scheduler-type", "cosin"],
    ));
    assert!(
        e.contains("lr_scheduler_type") && e.contains("cosine, linear, constant"),
        "{e}"
    );
}

/// `eval` never exits 0 printing a NaN loss: a model whose weights hold NaN fails, naming the tensor.
#[test]
fn eval_with_non_finite_weights_fails_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("model");
    std::fs::create_dir(&broken).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model().join(f), broken.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(model().join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let meta: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let norm = &meta["model.norm.weight"];
    assert_eq!(norm["dtype"], "F32", "{norm}");
    let start = 8 + header + norm["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(broken.join("model.safetensors"), bytes).unwrap();
    let e = fails(&eval_args(
        &broken,
        None,
        &data("quickstart-valid.jsonl"),
        &["--task", "perplexity"],
    ));
    assert!(e.contains("NaN") && e.contains("model.norm.weight"), "{e}");
}

/// Training, merging or quantising into the model's own directory (or one that contains it) is refused
/// before anything is written there.
#[test]
fn output_into_the_model_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(model()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m.join(f.file_name().unwrap())).unwrap();
    }
    let before = sha(&m.join("model.safetensors"));
    let d = data("quickstart-train.jsonl");
    for out in [m.clone(), dir.path().to_path_buf(), m.join(".")] {
        let e = fails(&train_args(
            s(&m),
            s(&d),
            s(&out),
            &["--peft-type", "full", "--max-steps", "1"],
        ));
        assert!(
            e.contains("overwrite the base model"),
            "{}: {e}",
            out.display()
        );
        let e = fails(&["quantize", s(&m), "--output", s(&out)]);
        assert!(
            e.contains("overwrite the base model"),
            "{}: {e}",
            out.display()
        );
    }
    assert_eq!(sha(&m.join("model.safetensors")), before);
    // a fresh directory beside the model is fine
    ok(&["quantize", s(&m), "--output", s(&dir.path().join("q"))]);
}

/// A run into a directory another live run is writing to fails at once; half-written checkpoints left by
/// killed runs are removed when the next run starts there.
#[test]
fn output_directory_lock_and_cleanup_of_killed_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir(&out).unwrap();
    // this test process is alive: its PID in the lock stands for a run in progress
    std::fs::write(out.join(".lock"), std::process::id().to_string()).unwrap();
    let e = fails(&train_args(
        s(&model()),
        s(&data("quickstart-train.jsonl")),
        s(&out),
        &["--max-steps", "1"],
    ));
    assert!(e.contains("another factune run"), "{e}");
    // a lock whose writer is gone (no PID above 2^22 runs) is taken over; the killed run's staging goes
    std::fs::write(out.join(".lock"), "4194305").unwrap();
    let partial = out.join(".checkpoint-3.partial-4194305");
    std::fs::create_dir(&partial).unwrap();
    train(&out, "1", &[]);
    assert!(!partial.exists() && !out.join(".lock").exists());
    assert!(out.join("adapter_model.safetensors").exists());
}

/// Generation never returns nothing with exit 0: a prompt that fills the context is an error naming it.
#[test]
fn a_prompt_that_fills_the_context_is_an_error() {
    let long = "the pen is in the drawer. ".repeat(200);
    let m = model();
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--max-new-tokens",
        "40",
        "--prompt",
        &long,
    ]);
    assert!(
        e.contains("fills the model's context of 256 positions"),
        "{e}"
    );
}

/// A micro-batch whose activations cannot fit is refused before the first step allocates it; an OS error
/// is printed once.
#[test]
fn an_impossible_micro_batch_is_refused_and_os_errors_print_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let d = data("quickstart-train.jsonl");
    let e = fails(&train_args(
        s(&model()),
        s(&d),
        s(&out),
        &["--max-steps", "1", "--micro-batch-size", "10000000"],
    ));
    assert!(
        e.contains("micro_batch_size 10000000") && e.contains("GB of activations"),
        "{e}"
    );
    let missing = dir.path().join("missing.toml");
    let e = fails(&["train", "--print-config", "--config", s(&missing)]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}

#[test]
fn weights_larger_than_this_machine_are_refused_before_loading() {
    // a checkpoint claiming one 10¹²-element tensor: a sparse file, so nothing of it is on disk
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/llama/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let n: u64 = 1_000_000;
    let mut header = serde_json::json!({"model.embed_tokens.weight":
        {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}})
    .to_string()
    .into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&header);
    let file = dir.path().join("model.safetensors");
    std::fs::write(&file, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(bytes.len() as u64 + 4 * n * n)
        .unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello").unwrap();
    for (extra, held, instead) in [
        (
            &[][..],
            "in f32 take at least 4000.0 GB",
            "--base-dtype bfloat16",
        ),
        (
            &["--base-dtype", "bfloat16"][..],
            "in bf16 take at least 2000.0 GB",
            "--quantize nf4",
        ),
    ] {
        let mut args = vec!["eval", "--model", s(dir.path()), "--data", s(&text)];
        args.extend_from_slice(extra);
        let err = fails(&args);
        assert!(err.contains(held) && err.contains(instead), "{err}");
    }
}

/// Every rank-carrying method's adapter is checked against its config's `r` when loaded, as LoRA's is: an
/// edited rank is refused, not run at the scale the tensors happen to imply.
#[test]
fn adapters_whose_config_rank_does_not_match_their_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("vera", &["--method", "vera"][..]),
        (
            "rosa",
            &["--method", "rosa", "--sparse-density", "0.01"][..],
        ),
        ("multilora", &["--method", "multilora"][..]),
        ("glora", &["--method", "glora"][..]),
    ] {
        let out = dir.path().join(name);
        train(&out, "1", extra);
        let cfg_path = out.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        assert!(text.contains("\"r\": 4"), "{name}: {text}");
        std::fs::write(&cfg_path, text.replace("\"r\": 4", "\"r\": 2")).unwrap();
        let e = fails(&eval_args(
            &model(),
            Some(&out),
            &data("quickstart-valid.jsonl"),
            &[],
        ));
        assert!(
            e.contains("the config does not describe these tensors"),
            "{name}: {e}"
        );
    }
}
