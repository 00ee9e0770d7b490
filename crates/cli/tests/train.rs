//! Training through the CLI: deterministic runs in PEFT's file layout, bit-identical resume, non-finite
//! losses, every method end to end, and the benchmark commands.

mod support;

use support::*;

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
        (
            "said",
            &["--method", "said", "--intrinsic-dimension", "100"][..],
        ),
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

/// `bench train --method` runs each method through the trainer's step (AdaLoRA with its rank hook), so a
/// method's benchmark measures what its training runs.
#[test]
fn bench_train_runs_every_method_through_the_trainer_step() {
    for method in [
        "VERA",
        "ADALORA",
        "ROSA",
        "MULTILORA",
        "GLORA",
        "MPO",
        "SAID",
    ] {
        let j = ok_json(&[
            "bench",
            "train",
            "--model",
            s(&model()),
            "--method",
            method,
            "--r",
            "4",
            "--seq-len",
            "16",
            "--batch",
            "1",
            "--steps",
            "1",
        ]);
        assert_eq!(j["method"], method, "{j}");
        let loss = j["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{method}: {j}");
    }
    let e = fails(&[
        "bench",
        "train",
        "--model",
        s(&model()),
        "--method",
        "LORAX",
    ]);
    assert!(e.contains("LORAX") && e.contains("peft_type"), "{e}");
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

/// A resume means what it says: the checkpoint's settings, with only the length and the evaluation/save
/// cadence open to change; other changed settings are refused with the differences listed; a run with
/// nothing left to train is an error, not "train loss NaN"; and the metrics log holds each step once.
#[test]
fn resume_keeps_the_checkpoint_settings_and_logs_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train(&out, "4", &["--save-steps", "2"]);
    let want = sha(&out.join("adapter_model.safetensors"));
    let resume = |ckpt: &str, extra: &[&str]| -> Vec<String> {
        let ckpt = out.join(ckpt);
        let mut args: Vec<String> = train_args(
            s(&model()),
            s(&data("quickstart-train.jsonl")),
            s(&out),
            &["--resume", s(&ckpt)],
        )
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let run = |v: Vec<String>, good: bool| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        if good {
            ok(&v)
        } else {
            fails(&v)
        }
    };
    let e = run(resume("checkpoint-4", &[]), false);
    assert!(
        e.contains("nothing is left to train") && !e.contains("NaN"),
        "{e}"
    );
    let e = run(
        resume("checkpoint-2", &["--r", "16", "--learning-rate", "5e-4"]),
        false,
    );
    assert!(
        e.contains("`r`: 4 in the checkpoint, 16 given") && e.contains("`learning_rate`"),
        "{e}"
    );
    // resumed into the same directory: the same adapter, and steps 3-4 logged once
    run(resume("checkpoint-2", &[]), true);
    assert_eq!(sha(&out.join("adapter_model.safetensors")), want);
    let steps = loss_steps(&out);
    assert_eq!(steps, vec![1, 2, 3, 4]);
    // the data is compared by content: an edited copy is refused, an identical one elsewhere is the same run
    let text = std::fs::read_to_string(data("quickstart-train.jsonl")).unwrap();
    let edited = dir.path().join("edited.jsonl");
    std::fs::write(&edited, text.replacen('a', "b", 1)).unwrap();
    let with_data = |file: &std::path::Path| {
        let ckpt = out.join("checkpoint-2");
        train_args(s(&model()), s(file), s(&out), &["--resume", s(&ckpt)])
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    let e = run(with_data(&edited), false);
    assert!(e.contains("data: the checkpoint trained on"), "{e}");
    let copy = dir.path().join("copy.jsonl");
    std::fs::write(&copy, &text).unwrap();
    run(with_data(&copy), true);
    assert_eq!(sha(&out.join("adapter_model.safetensors")), want);
    // a longer run from the last checkpoint
    run(resume("checkpoint-4", &["--max-steps", "6"]), true);
    let last = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(last.lines().any(|l| l.contains("\"step\":6")), "{last}");
    // a new learning rate only when asked for; later steps then follow the new schedule
    let faster = ["--max-steps", "7", "--learning-rate", "5e-2"];
    let e = run(resume("checkpoint-4", &faster), false);
    assert!(e.contains("--override-schedule"), "{e}");
    let mut asked = faster.to_vec();
    asked.push("--override-schedule");
    run(resume("checkpoint-4", &asked), true);
    let lr7 = metrics(&out)
        .iter()
        .find(|v| v["step"] == 7 && v.get("lr").is_some())
        .map(|v| v["lr"].as_f64().unwrap())
        .unwrap();
    assert!(lr7 > 1e-3, "step 7 ran at {lr7}, not on the new schedule");
}

/// Training into a directory that holds an earlier run is refused (its checkpoints would sit beside the new
/// adapter and a later --resume would pick the wrong run) unless --overwrite, which replaces it.
#[test]
fn an_output_holding_a_run_needs_overwrite_or_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train(&out, "2", &["--save-steps", "1"]);
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let again = train_args(s(&m), s(&d), s(&out), &["--max-steps", "1"]);
    let e = fails(&again);
    assert!(
        e.contains("already holds a training run") && e.contains("--overwrite"),
        "{e}"
    );
    ok(&[&again[..], &["--overwrite"]].concat());
    assert!(!out.join("checkpoint-1").exists() && !out.join("checkpoint-2").exists());
    let logged = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(!logged.contains("\"step\":2"), "{logged}");
}

/// The shapes a safetensors file records, by tensor name (read from its JSON header).
fn shapes(file: &std::path::Path) -> std::collections::BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::from_value(v["shape"].clone()).unwrap(),
            )
        })
        .collect()
}

/// PEFT's rank_pattern gives v_proj its own rank in training, in the saved adapter and its config; the adapter
/// loads back. save_total_limit keeps the newest checkpoints only.
#[test]
fn rank_pattern_and_save_total_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    train(
        &out,
        "4",
        &[
            "--rank-pattern",
            "v_proj=2",
            "--save-steps",
            "1",
            "--save-total-limit",
            "2",
        ],
    );
    let s = shapes(&out.join("adapter_model.safetensors"));
    let a = |m: &str| {
        s.iter()
            .find(|(k, _)| k.contains(&format!("layers.0.self_attn.{m}.lora_A")))
            .map(|(_, v)| v[0])
            .unwrap()
    };
    assert_eq!((a("q_proj"), a("v_proj")), (4, 2), "{s:?}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["rank_pattern"]["v_proj"], 2, "{cfg}");
    let j = ok_json(&eval_args(
        &model(),
        Some(&out),
        &data("quickstart-valid.jsonl"),
        &["--task", "perplexity", "--json"],
    ));
    assert!(j["loss"].as_f64().unwrap().is_finite());
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-") || n.contains(".old."))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-3", "checkpoint-4"]);
}

/// `--print-config` prints the resolved run (TOML file, flags, defaults) and a file with PEFT/TRL habits
/// reads; every training flag's help shows its default.
#[test]
fn print_config_help_defaults_and_peft_trl_keys() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        "task_type = \"CAUSAL_LM\"\nbias = \"none\"\nper_device_train_batch_size = 2\nmax_seq_length = 128\n\
         target_modules = \"q_proj,o_proj\"\nreport_to = \"none\"\n",
    )
    .unwrap();
    let printed = ok(&["train", "--print-config", "--config", s(&toml), "--r", "4"]);
    let c: toml::Table = toml::from_str(&printed).unwrap();
    assert_eq!(c["micro_batch_size"].as_integer(), Some(2));
    assert_eq!(c["seq_len"].as_integer(), Some(128));
    assert_eq!(c["r"].as_integer(), Some(4));
    assert_eq!(c["learning_rate"].as_float(), Some(2e-4));
    assert_eq!(
        c["target_modules"].as_array().unwrap().len(),
        2,
        "a TOML string of names reads as the flag does"
    );
    assert!(!c.contains_key("task_type"));
    std::fs::write(&toml, "optim = \"paged_adamw_8bit\"\n").unwrap();
    let e = fails(&["train", "--print-config", "--config", s(&toml)]);
    assert!(
        e.contains("`optim = \"paged_adamw_8bit\"`") && e.contains("adamw_torch"),
        "{e}"
    );
    let help = ok(&["train", "--help"]);
    for flag in [
        "--learning-rate",
        "--max-steps",
        "--seq-len",
        "--data-format",
        "--save-total-limit",
    ] {
        let line = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag))
            .nth(1)
            .unwrap_or_default();
        assert!(line.contains("[default: "), "{flag}: {line}");
    }
}

/// `num_train_epochs` (transformers' length): without max_steps it gives ceil(epochs × examples / (micro-batch
/// × accumulation)) steps; more epochs on resume extend the run; a positive max_steps overrides it, said so.
#[test]
fn num_train_epochs_sets_the_length_and_extends_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("ten.jsonl");
    let lines: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Count {i}:\", \"completion\": \" {} {}\"}}",
                i + 1,
                i + 2
            )
        })
        .collect();
    std::fs::write(&data_file, lines.join("\n")).unwrap();
    let out = dir.path().join("run");
    let args = |out: &std::path::Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = train_args(s(&model()), s(&data_file), s(out), extra)
            .iter()
            .map(|a| a.to_string())
            .collect();
        v.extend(
            [
                "--micro-batch-size",
                "2",
                "--gradient-accumulation-steps",
                "2",
                "--validation-split",
                "0",
                "--seq-len",
                "32",
            ]
            .map(String::from),
        );
        v
    };
    let run = |v: Vec<String>| {
        let o = factune(&v.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        (String::from_utf8_lossy(&o.stdout).into_owned(), err)
    };
    // 1.5 × 10 examples / 4 per step = 3.75 → 4 steps
    let (stdout, err) = run(args(
        &out,
        &["--num-train-epochs", "1.5", "--save-steps", "2"],
    ));
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    assert!(err.contains("num_train_epochs 1.5: 4 steps"), "{err}");
    assert_eq!(loss_steps(&out), vec![1, 2, 3, 4]);
    // three epochs from checkpoint-2: 30 / 4 → 8 steps
    let ckpt = out.join("checkpoint-2");
    let (stdout, _) = run(args(
        &out,
        &["--resume", s(&ckpt), "--num-train-epochs", "3"],
    ));
    assert!(stdout.contains("trained 8 steps"), "{stdout}");
    assert_eq!(loss_steps(&out), (1..=8).collect::<Vec<_>>());
    // a positive max_steps wins, as in transformers, and the run says so
    let other = dir.path().join("other");
    let (stdout, err) = run(args(
        &other,
        &["--num-train-epochs", "3", "--max-steps", "2"],
    ));
    assert!(stdout.contains("trained 2 steps"), "{stdout}");
    assert!(
        err.contains("num_train_epochs 3 applies only with max_steps = -1"),
        "{err}"
    );
    let e = fails(&train_args(
        s(&model()),
        s(&data_file),
        s(&dir.path().join("x")),
        &["--max-steps", "-1"],
    ));
    assert!(e.contains("set num_train_epochs"), "{e}");
}

/// `load_best_model_at_end`: the result is the evaluation with the lowest validation loss, byte for byte the
/// adapter checkpointed at that step; `early_stopping_patience` stops after that many evaluations without an
/// improvement larger than the threshold.
#[test]
fn best_model_at_end_and_early_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data("quickstart-train.jsonl"));
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut args = train_args(
            s(&m),
            s(&d),
            s(out),
            &["--max-steps", "8", "--micro-batch-size", "2"],
        );
        args.extend_from_slice(&["--r", "4", "--eval-steps", "1", "--validation-split", "0.2"]);
        args.extend_from_slice(extra);
        ok(&args)
    };
    let out = dir.path().join("best");
    // a learning rate this high overshoots: the validation loss falls, then rises
    let stdout = run(
        &out,
        &[
            "--learning-rate",
            "3e-2",
            "--save-steps",
            "1",
            "--load-best-model-at-end",
            "true",
        ],
    );
    let metrics = metrics(&out);
    let vals: Vec<(u64, f64)> = metrics
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("val_loss")?.as_f64()?)))
        .collect();
    let (best_step, best_loss) = vals
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert!(
        best_step < 8,
        "the scenario needs a best before the end: {vals:?}"
    );
    assert_eq!(
        sha(&out.join("adapter_model.safetensors")),
        sha(&out.join(format!("checkpoint-{best_step}/adapter_model.safetensors"))),
        "the result is not step {best_step}'s adapter"
    );
    assert!(
        stdout.contains(&format!("validation loss {best_loss:.4}")),
        "{stdout}"
    );
    // three evaluations: the first sets the best, no later one beats it by 10
    let stop = dir.path().join("stop");
    let stdout = run(
        &stop,
        &[
            "--early-stopping-patience",
            "2",
            "--early-stopping-threshold",
            "10",
        ],
    );
    assert!(stdout.contains("trained 3 steps"), "{stdout}");
    let log = std::fs::read_to_string(stop.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"early_stop\""), "{log}");
    let e = fails(&train_args(
        s(&model()),
        s(&data("quickstart-train.jsonl")),
        s(&dir.path().join("x")),
        &["--load-best-model-at-end", "true"],
    ));
    assert!(e.contains("set eval_steps"), "{e}");
}

/// PEFT's `layers_to_transform` and `exclude_modules` (from a TOML file, as users write them): only the named
/// layers' modules, none excluded; PEFT reads the written config the same way (interop `default-layers`).
#[test]
fn layers_to_transform_and_exclude_modules() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("c.toml");
    std::fs::write(
        &toml,
        "layers_to_transform = 1\nexclude_modules = [\"v_proj\"]\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    train(&out, "1", &["--config", s(&toml)]); // targets q_proj, v_proj, down_proj
    let keys: Vec<String> = shapes(&out.join("adapter_model.safetensors"))
        .into_keys()
        .collect();
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| k.contains(".layers.1.") && !k.contains("o_proj")),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 4, "q_proj and down_proj of layer 1: {keys:?}");
    let e = fails(&train_args(
        s(&model()),
        s(&data("quickstart-train.jsonl")),
        s(&dir.path().join("x")),
        &["--target-modules", ".*q_proj", "--layers-to-transform", "0"],
    ));
    assert!(
        e.contains("cannot be used when target_modules is a regex"),
        "{e}"
    );
}
