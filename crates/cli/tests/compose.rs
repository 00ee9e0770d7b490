//! `factune merge-adapters` through the CLI: adapters trained on the embedded model combined, and bad input
//! refused before any work.

mod support;

use std::path::Path;
use support::*;

fn perplexity(adapter: &Path) -> f64 {
    let text = adapter.with_extension("txt");
    let all = std::fs::read_to_string(data("pretrain.txt")).unwrap();
    std::fs::write(&text, all.chars().take(2000).collect::<String>()).unwrap();
    let j = ok_json(&eval_args(
        &model(),
        Some(adapter),
        &text,
        &["--json", "--seq-len", "64"],
    ));
    j["perplexity"].as_f64().unwrap()
}

/// A LoRA (r = 4) trained for `steps` on an embedded task's training file (`quickstart`, `reverse`).
fn task_adapter(dir: &Path, task: &str, steps: &str, extra: &[&str]) -> std::path::PathBuf {
    let out = dir.join(task);
    let mut args = vec!["--max-steps", steps, "--r", "4", "--learning-rate", "3e-3"];
    args.extend_from_slice(extra);
    ok(&train_args(
        s(&model()),
        s(&data(&format!("{task}-train.jsonl"))),
        s(&out),
        &args,
    ));
    out
}

fn merge(adapters: &str, weights: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "merge-adapters",
        "--model",
        s(&model()),
        "--adapters",
        adapters,
        "--weights",
        weights,
        "--output",
        s(out),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|e| e.to_string()));
    args
}

fn run(args: &[String]) -> String {
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn refused(args: &[String]) -> String {
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn combined_adapters_load_and_reduce_to_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train(&a, "3", &[]);
    train(&b, "3", &["--seed", "7"]);
    let ab = format!("{},{}", s(&a), s(&b));
    // cat with weights (1, 0) is adapter a itself; so is a single adapter at weight 1
    let cat = dir.path().join("cat");
    let said = run(&merge(&ab, "1,-0", &cat, &["--combination", "cat"]));
    assert!(said.contains("by cat") && said.contains("r = 8"), "{said}");
    let one = dir.path().join("one");
    run(&merge(
        s(&a),
        "1",
        &one,
        &["--combination", "ties", "--density", "0.5"],
    ));
    let alone = perplexity(&a);
    for p in [perplexity(&cat), perplexity(&one)] {
        assert!((p - alone).abs() < 1e-4 * alone, "{p} against {alone}");
    }
    // an equal-weight mix differs from both sources; DARE with the same seed is reproducible
    let mix = dir.path().join("mix");
    run(&merge(
        &ab,
        "0.5,0.5",
        &mix,
        &[
            "--combination",
            "dare_ties",
            "--density",
            "0.7",
            "--seed",
            "3",
        ],
    ));
    let again = dir.path().join("again");
    run(&merge(
        &ab,
        "0.5,0.5",
        &again,
        &[
            "--combination",
            "dare_ties",
            "--density",
            "0.7",
            "--seed",
            "3",
        ],
    ));
    let f = "adapter_model.safetensors";
    assert_eq!(sha(&mix.join(f)), sha(&again.join(f)));
    assert!((perplexity(&mix) - alone).abs() > 1e-6);
    // the output is never written over
    let err = refused(&merge(&ab, "0.5,0.5", &mix, &["--combination", "linear"]));
    assert!(err.contains("already holds an adapter"), "{err}");
    let err = refused(&merge(&ab, "0.5,0.5", &a, &["--combination", "linear"]));
    assert!(err.contains("is the source adapter"), "{err}");

    // bad input, each named
    let out = dir.path().join("bad");
    let cases: [(&str, &str, &[&str], &str); 6] = [
        (&ab, "1", &[], "1 weights for 2 adapters"),
        (
            &ab,
            "1,1",
            &["--combination", "ties", "--density", "1.5"],
            "density 1.5",
        ),
        (&ab, "1,1", &["--combination", "ties"], "needs `density`"),
        (
            &ab,
            "1,1",
            &["--combination", "cat", "--svd-rank", "4"],
            "not by cat",
        ),
        (
            &ab,
            "1,1",
            &["--combination", "average"],
            "expected one of linear, cat, svd",
        ),
        (&ab, "1,nan", &[], "expected a finite number"),
    ];
    for (adapters, weights, extra, want) in cases {
        let err = refused(&merge(adapters, weights, &out, extra));
        assert!(err.contains(want), "{want}: {err}");
    }
    // an adapter of another base (by its config), and one of another method
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(b.join(f), other.join(f)).unwrap();
    }
    let cfg = other.join("adapter_config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    j["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B".into();
    std::fs::write(&cfg, j.to_string()).unwrap();
    let err = refused(&merge(
        &format!("{},{}", s(&a), s(&other)),
        "1,1",
        &out,
        &[],
    ));
    assert!(
        err.contains("was trained on") && err.contains("Qwen2.5-0.5B"),
        "{err}"
    );
    let vera = dir.path().join("vera");
    train(&vera, "2", &["--method", "vera"]);
    let err = refused(&merge(&format!("{},{}", s(&a), s(&vera)), "1,1", &out, &[]));
    assert!(err.contains("a VERA adapter: only LoRA adapters"), "{err}");
    assert!(!out.exists(), "nothing written for refused input");
}

#[test]
fn lorahub_weighs_the_adapter_of_the_task_and_writes_what_it_scored() {
    let dir = tempfile::tempdir().unwrap();
    let qv = ["--target-modules", "q_proj,v_proj"];
    let (qs, rev) = (
        task_adapter(dir.path(), "quickstart", "30", &qv),
        task_adapter(dir.path(), "reverse", "30", &qv),
    );
    let few = dir.path().join("few.jsonl");
    let valid = std::fs::read_to_string(data("reverse-valid.jsonl")).unwrap();
    std::fs::write(&few, valid.lines().take(5).collect::<Vec<_>>().join("\n")).unwrap();
    let hub = |out: &Path| {
        ok(&[
            "lorahub",
            "--model",
            s(&model()),
            "--adapters",
            &format!("{},{}", s(&qs), s(&rev)),
            "--data",
            s(&few),
            "--output",
            s(out),
            "--budget",
            "16",
            "--seed",
            "1",
        ]);
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("lorahub.json")).unwrap())
                .unwrap();
        j
    };
    let (out, again) = (dir.path().join("hub"), dir.path().join("again"));
    let j = hub(&out);
    let evals = j["evaluations"].as_array().unwrap();
    assert_eq!(evals.len(), 16);
    let best = j["objective"].as_f64().unwrap();
    assert!(evals
        .iter()
        .all(|e| e["objective"].as_f64().unwrap() >= best));
    let w: Vec<f64> = j["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(w.iter().all(|x| x.abs() <= 1.5), "{w:?}");
    assert!(
        w[1] > w[0],
        "the reversal adapter should weigh more on reversal examples: {w:?}"
    );
    // the written composition scores what the search scored, and beats the base
    let ppl = |adapter: Option<&Path>| {
        ok_json(&eval_args(
            &model(),
            adapter,
            &few,
            &["--json", "--task", "perplexity"],
        ))["loss"]
            .as_f64()
            .unwrap()
    };
    let loss = j["loss"].as_f64().unwrap();
    assert!(
        (ppl(Some(&out)) - loss).abs() < 1e-4 * loss,
        "{} vs {loss}",
        ppl(Some(&out))
    );
    assert!(loss < ppl(None));
    // the same seed finds the same weights
    assert_eq!(hub(&again)["weights"], j["weights"]);
    let err = fails(&[
        "lorahub",
        "--model",
        s(&model()),
        "--adapters",
        s(&qs),
        "--data",
        s(&few),
        "--output",
        s(&dir.path().join("one")),
    ]);
    assert!(err.contains("at least two adapters"), "{err}");
}

#[test]
fn ziplora_keeps_each_adapter_closer_to_itself_than_their_sum() {
    let dir = tempfile::tempdir().unwrap();
    let mut adapters = Vec::new();
    let mut few = Vec::new();
    for task in ["quickstart", "reverse"] {
        let out = task_adapter(
            dir.path(),
            task,
            "30",
            &["--target-modules", "q_proj,v_proj"],
        );
        let f = dir.path().join(format!("{task}.jsonl"));
        let all = std::fs::read_to_string(data(&format!("{task}-train.jsonl"))).unwrap();
        std::fs::write(&f, all.lines().take(12).collect::<Vec<_>>().join("\n")).unwrap();
        adapters.push(out);
        few.push(f);
    }
    let both = format!("{},{}", s(&adapters[0]), s(&adapters[1]));
    let zip = dir.path().join("zip");
    let said = ok(&[
        "ziplora",
        "--model",
        s(&model()),
        "--adapters",
        &both,
        "--data-a",
        s(&few[0]),
        "--data-b",
        s(&few[1]),
        "--output",
        s(&zip),
        "--steps",
        "60",
    ]);
    assert!(said.contains("r = 8"), "{said}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(zip.join("ziplora.json")).unwrap()).unwrap();
    let h = j["history"].as_array().unwrap();
    assert_eq!(h.len(), 61);
    let diff = |i: usize| h[i]["difference"].as_f64().unwrap();
    assert!(diff(60) < 0.5 * diff(0), "{} -> {}", diff(0), diff(60));
    // the plain sum of the two (cat, weights 1, 1) is where ZipLoRA starts; on each task's data the merged
    // adapter is closer to that task's adapter
    let sum = dir.path().join("sum");
    ok(&[
        "merge-adapters",
        "--model",
        s(&model()),
        "--adapters",
        &both,
        "--weights",
        "1,1",
        "--combination",
        "cat",
        "--output",
        s(&sum),
    ]);
    let loss = |adapter: &Path, d: &Path| {
        ok_json(&eval_args(
            &model(),
            Some(adapter),
            d,
            &["--json", "--task", "perplexity"],
        ))["loss"]
            .as_f64()
            .unwrap()
    };
    for f in &few {
        assert!(loss(&zip, f) < loss(&sum, f), "{}", f.display());
    }
    let err = fails(&[
        "ziplora",
        "--model",
        s(&model()),
        "--adapters",
        s(&adapters[0]),
        "--data-a",
        s(&few[0]),
        "--data-b",
        s(&few[1]),
        "--output",
        s(&dir.path().join("one")),
    ]);
    assert!(err.contains("exactly two adapters"), "{err}");
}

#[test]
fn eval_with_several_adapters_scores_each_record_by_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut adapters = Vec::new();
    let mut records: Vec<Vec<serde_json::Value>> = Vec::new();
    for task in ["quickstart", "reverse"] {
        let out = task_adapter(dir.path(), task, "20", &[]);
        adapters.push(out);
        let valid = std::fs::read_to_string(data(&format!("{task}-valid.jsonl"))).unwrap();
        records.push(
            valid
                .lines()
                .take(5)
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        );
    }
    // one file, records interleaved: quickstart ones for `qs`, reverse ones for `rev`, some for the base
    let write = |name: &str, rows: Vec<serde_json::Value>| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            rows.iter()
                .map(|r| r.to_string() + "\n")
                .collect::<String>(),
        )
        .unwrap();
        p
    };
    let tagged = |r: &serde_json::Value, a: serde_json::Value| {
        let mut r = r.clone();
        r["adapter"] = a;
        r
    };
    let mut mixed = Vec::new();
    for (i, (q, r)) in records[0].iter().zip(&records[1]).enumerate() {
        mixed.push(tagged(q, "qs".into()));
        mixed.push(tagged(r, "rev".into()));
        if i < 2 {
            mixed.push(tagged(q, serde_json::Value::Null));
        }
    }
    let mixed = write("mixed.jsonl", mixed);
    let alone = [
        write("qs.jsonl", records[0].clone()),
        write("rev.jsonl", records[1].clone()),
        write("base.jsonl", records[0][..2].to_vec()),
    ];
    let named = [
        format!("qs={}", s(&adapters[0])),
        format!("rev={}", s(&adapters[1])),
    ];
    let base = model();
    let several = |file: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            s(&base),
            "--adapter",
            &named[0],
            "--adapter",
            &named[1],
        ];
        args.extend(["--data", s(file), "--json", "--batch-size", "4"]);
        args.extend_from_slice(extra);
        ok_json(&args)
    };
    let j = several(&mixed, &["--task", "perplexity"]);
    let single = |adapter: Option<&Path>, file: &Path| {
        ok_json(&eval_args(
            &model(),
            adapter,
            file,
            &["--json", "--task", "perplexity"],
        ))
    };
    for (name, adapter, file) in [
        ("qs", Some(adapters[0].as_path()), &alone[0]),
        ("rev", Some(adapters[1].as_path()), &alone[1]),
        ("base", None, &alone[2]),
    ] {
        let want = single(adapter, file);
        let got = &j["by_adapter"][name];
        assert_eq!(got["tokens"], want["tokens"], "{name}");
        let (g, w) = (
            got["loss"].as_f64().unwrap(),
            want["loss"].as_f64().unwrap(),
        );
        assert!(
            (g - w).abs() < 1e-5 * w,
            "{name}: {g} in the mixed batches, {w} alone"
        );
    }
    // exact match: the records of one adapter score as that adapter alone scores them
    let qs_only = write(
        "qs-tagged.jsonl",
        records[0].iter().map(|r| tagged(r, "qs".into())).collect(),
    );
    let em = several(&qs_only, &["--task", "exact-match"]);
    let want = ok_json(&eval_args(
        &model(),
        Some(&adapters[0]),
        &alone[0],
        &["--json", "--task", "exact-match"],
    ));
    assert_eq!(em, want);
    // names that are not loaded, unnamed adapters among named ones, and other commands
    let bad = write("bad.jsonl", vec![tagged(&records[0][0], "other".into())]);
    let err = fails(&[
        "eval",
        "--model",
        s(&model()),
        "--adapter",
        &named[0],
        "--data",
        s(&bad),
        "--task",
        "perplexity",
    ]);
    assert!(
        err.contains("`adapter: other` is not among the loaded adapters (qs)"),
        "{err}"
    );
    let err = fails(&[
        "eval",
        "--model",
        s(&model()),
        "--adapter",
        &named[0],
        "--adapter",
        s(&adapters[1]),
        "--data",
        s(&mixed),
    ]);
    assert!(err.contains("name every adapter"), "{err}");
    let err = fails(&[
        "merge",
        "--model",
        s(&model()),
        "--adapter",
        &named[0],
        "--output",
        s(&dir.path().join("m")),
    ]);
    assert!(err.contains("read by eval only"), "{err}");
}

#[test]
fn generate_answers_each_prompt_with_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let a = task_adapter(dir.path(), "quickstart", "30", &[]);
    let ask = "### Instruction:\nAnswer the question.\n\n### Input:\nWhat is a cup used for?\n\n### Response:\n";
    let prompts = [
        (ask, serde_json::json!("a")),
        ("The cat is", serde_json::Value::Null),
        ("Mia has a red", serde_json::json!("a")),
    ];
    let file = dir.path().join("prompts.jsonl");
    let lines: String = prompts
        .iter()
        .map(|(p, a)| serde_json::json!({"prompt": p, "adapter": a}).to_string() + "\n")
        .collect();
    std::fs::write(&file, lines).unwrap();
    let named = format!("a={}", s(&a));
    let out = ok(&[
        "generate",
        "--model",
        s(&model()),
        "--adapter",
        &named,
        "--prompts",
        s(&file),
        "--max-new-tokens",
        "8",
    ]);
    let got: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 3);
    let base = model();
    for ((p, adapter), g) in prompts.iter().zip(&got) {
        let mut args = vec![
            "generate",
            "--model",
            s(&base),
            "--prompt",
            p,
            "--max-new-tokens",
            "8",
        ];
        if !adapter.is_null() {
            args.extend(["--adapter", s(&a)]);
        }
        let alone = ok(&args);
        assert_eq!(
            format!("{p}{}", g["completion"].as_str().unwrap()),
            alone.trim_end_matches('\n')
        );
        assert_eq!(&g["adapter"], adapter);
    }
    // with and without the adapter the answers differ, so the choice mattered
    let with_base = ok(&[
        "generate",
        "--model",
        s(&model()),
        "--prompt",
        ask,
        "--max-new-tokens",
        "8",
    ]);
    let with_adapter = format!("{ask}{}", got[0]["completion"].as_str().unwrap());
    assert_ne!(with_adapter.trim_end(), with_base.trim_end());
    std::fs::write(&file, "{\"prompt\": \"x\", \"adapter\": \"b\"}\n").unwrap();
    let err = fails(&[
        "generate",
        "--model",
        s(&model()),
        "--adapter",
        &named,
        "--prompts",
        s(&file),
    ]);
    assert!(err.contains("not among the loaded adapters (a)"), "{err}");
}
