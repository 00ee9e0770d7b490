//! Exports factune-made adapters and factune's logits so Python PEFT can check them:
//!
//!     cargo test -p factune --test interop -- --ignored
//!     python scripts/make_fixtures.py verify --model assets/default-model \
//!         --adapter target/peft-interop/default/adapter --expect target/peft-interop/default/expect.safetensors
//!     (and likewise for target/peft-interop/default-pissa, default-vera, default-prompt, default-ptuning, default-ptuning-lstm, default-prefix, default-dora, default-patterns, default-layers, default-eva, default-adalora and default-merge-ties on assets/default-model,
//!     llama-merge-dora-svd on tests/fixtures/llama, and tests/fixtures/llama and tests/fixtures/gpt2 with target/peft-interop/{llama,gpt2});
//!     (and tests/fixtures/{llama,gpt2} with target/peft-interop/{llama,gpt2}-{prompt,prefix}_tuning);
//!     python scripts/make_fixtures.py verify --model target/peft-interop/gpt2/merged \
//!         --expect target/peft-interop/gpt2/expect.safetensors      (a merged checkpoint, transformers alone)
//!     python scripts/make_fixtures.py verify --model target/peft-interop/default-nf4/model \
//!         --adapter target/peft-interop/default-nf4/adapter --expect target/peft-interop/default-nf4/expect.safetensors
//!         (a `factune quantize` checkpoint, loaded by transformers + bitsandbytes, with a QLoRA adapter; likewise
//!         gpt2-nf4 without an adapter)

use candle_core::{DType, Device, Tensor};
use factune_adapters::{attach, peft, AdapterConfig, TargetModules};
use factune_io::weights::to_safetensors_bytes;
use factune_model::{Ctx, Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write_expect(model: &Model, dir: &Path) {
    let v = model.cfg.vocab_size as i64;
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % v).collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&t.to_dtype(DType::U32).unwrap(), None, &Ctx::default())
        .unwrap();
    let mut m = BTreeMap::new();
    m.insert("input_ids".to_string(), t);
    m.insert("logits".to_string(), logits);
    std::fs::write(
        dir.join("expect.safetensors"),
        to_safetensors_bytes(&m, None).unwrap(),
    )
    .unwrap();
}

#[test]
#[ignore = "writes files for `scripts/make_fixtures.py verify` (needs Python with torch + peft)"]
fn export_for_peft() {
    let out = repo().join("target/peft-interop");
    // 1. Adapters trained by `factune train` on the embedded model, on every linear layer: plain LoRA, and
    //    PiSSA (written as a rank-2r LoRA relative to the original weights).
    for (sub, extra) in [
        ("default", &[][..]),
        (
            "default-pissa",
            &["--init-lora-weights", "pissa_niter_2"][..],
        ),
        ("default-vera", &["--method", "vera"][..]),
        (
            "default-prompt",
            &["--peft-type", "PROMPT_TUNING", "--num-virtual-tokens", "8"][..],
        ),
        (
            "default-ptuning",
            &["--peft-type", "P_TUNING", "--num-virtual-tokens", "8"][..],
        ),
        (
            "default-ptuning-lstm",
            &[
                "--peft-type",
                "P_TUNING",
                "--num-virtual-tokens",
                "8",
                "--encoder-reparameterization-type",
                "LSTM",
            ][..],
        ),
        (
            "default-prefix",
            &[
                "--peft-type",
                "PREFIX_TUNING",
                "--num-virtual-tokens",
                "8",
                "--prefix-projection",
                "true",
            ][..],
        ),
        ("default-dora", &["--use-dora", "true"][..]),
        (
            "default-patterns",
            &[
                "--rank-pattern",
                "v_proj=2,down_proj=4",
                "--alpha-pattern",
                "o_proj=4",
            ][..],
        ),
        (
            "default-layers",
            &[
                "--layers-to-transform",
                "0",
                "--exclude-modules",
                "down_proj",
            ][..],
        ),
        ("default-eva", &["--init-lora-weights", "eva"][..]),
        (
            "default-adalora",
            &[
                "--method",
                "adalora",
                "--init-r",
                "6",
                "--target-r",
                "2",
                "--tinit",
                "5",
                "--tfinal",
                "5",
            ][..],
        ),
    ] {
        let dir = out.join(sub);
        let adapter = dir.join("adapter");
        let _ = std::fs::remove_dir_all(&dir);
        let status = Command::new(env!("CARGO_BIN_EXE_factune"))
            .args(["train", "--model"])
            .arg(repo().join("assets/default-model"))
            .arg("--data")
            .arg(repo().join("assets/data/quickstart-train.jsonl"))
            .arg("--output")
            .arg(&adapter)
            .args(["--max-steps", "20", "--learning-rate", "5e-3"])
            // the prompt family adapts no linear layer
            .args(if extra.contains(&"--peft-type") {
                &[][..]
            } else {
                &["--target-modules", "all-linear", "--r", "8"][..]
            })
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success());
        let mut model = Model::load(&repo().join("assets/default-model"), &Device::Cpu).unwrap();
        peft::load(&mut model, &adapter, false).unwrap();
        write_expect(&model, &dir);
    }

    // 1b. Combinations by `factune merge-adapters`: two of the adapters above, one limited to layer 0 (so the
    //     combined targets are written as a regex of the module paths), and PEFT's DoRA fixtures.
    let fixtures = repo().join("tests/fixtures");
    for (sub, base, sources, extra) in [
        (
            "default-merge-ties",
            repo().join("assets/default-model"),
            [
                out.join("default-layers/adapter"),
                out.join("default/adapter"),
            ],
            &[
                "--combination",
                "ties",
                "--density",
                "0.6",
                "--weights",
                "0.8,-0.5",
            ][..],
        ),
        (
            "llama-merge-dora-svd",
            fixtures.join("llama"),
            [
                fixtures.join("llama-merge-e"),
                fixtures.join("llama-merge-f"),
            ],
            &["--combination", "svd", "--weights", "0.7,0.5"][..],
        ),
    ] {
        let dir = out.join(sub);
        let _ = std::fs::remove_dir_all(&dir);
        let adapters = format!("{},{}", sources[0].display(), sources[1].display());
        let status = Command::new(env!("CARGO_BIN_EXE_factune"))
            .args(["merge-adapters", "--model"])
            .arg(&base)
            .args(["--adapters", &adapters])
            .arg("--output")
            .arg(dir.join("adapter"))
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success());
        let mut model = Model::load(&base, &Device::Cpu).unwrap();
        peft::load(&mut model, &dir.join("adapter"), false).unwrap();
        write_expect(&model, &dir);
    }

    // 2. Adapters with random B (PEFT's init_lora_weights=False) on the fixture Llama (rsLoRA) and GPT-2.
    for (name, rslora) in [("llama", true), ("gpt2", false)] {
        let dir = out.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut model =
            Model::load(&repo().join("tests/fixtures").join(name), &Device::Cpu).unwrap();
        let cfg = AdapterConfig {
            r: 4,
            lora_alpha: 8.0,
            use_rslora: rslora,
            init_lora_weights: serde_json::Value::Bool(false),
            target_modules: TargetModules::Pattern("all-linear".into()),
            ..AdapterConfig::default()
        };
        attach(&mut model, &cfg, 7).unwrap();
        peft::save(&model, &cfg, &dir.join("adapter")).unwrap();
        write_expect(&model, &dir);
        let status = Command::new(env!("CARGO_BIN_EXE_factune"))
            .args(["merge", "--verify", "--model"])
            .arg(repo().join("tests/fixtures").join(name))
            .arg("--adapter")
            .arg(dir.join("adapter"))
            .arg("--output")
            .arg(dir.join("merged"))
            .status()
            .unwrap();
        assert!(status.success());
    }

    // 2b. Fresh prompt-family adapters (random prefixes) on the fixture Llama (GQA) and GPT-2.
    for name in ["llama", "gpt2"] {
        for peft_type in ["PROMPT_TUNING", "PREFIX_TUNING"] {
            let dir = out.join(format!("{name}-{}", peft_type.to_lowercase()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut model =
                Model::load(&repo().join("tests/fixtures").join(name), &Device::Cpu).unwrap();
            let method = serde_json::from_value(
                serde_json::json!({"peft_type": peft_type, "num_virtual_tokens": 5}),
            )
            .unwrap();
            let cfg = AdapterConfig {
                method,
                ..AdapterConfig::default()
            };
            attach(&mut model, &cfg, 7).unwrap();
            peft::save_portable(&model, &cfg, &dir.join("adapter")).unwrap();
            write_expect(&model, &dir);
        }
    }

    // 3. 4-bit checkpoints written by `factune quantize` (bitsandbytes' layout), one with a QLoRA adapter
    //    trained on it.
    for (name, src, train) in [
        ("default-nf4", repo().join("assets/default-model"), true),
        ("gpt2-nf4", repo().join("tests/fixtures/gpt2"), false),
    ] {
        let dir = out.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let q = dir.join("model");
        let factune = |args: &[&str]| {
            let status = Command::new(env!("CARGO_BIN_EXE_factune"))
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "factune {args:?}");
        };
        factune(&[
            "quantize",
            src.to_str().unwrap(),
            "--output",
            q.to_str().unwrap(),
        ]);
        let mut model = Model::load(&q, &Device::Cpu).unwrap();
        if train {
            let adapter = dir.join("adapter");
            let data = repo().join("assets/data/quickstart-train.jsonl");
            factune(&[
                "train",
                "--model",
                q.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--output",
                adapter.to_str().unwrap(),
                "--max-steps",
                "20",
                "--target-modules",
                "all-linear",
                "--learning-rate",
                "5e-3",
            ]);
            peft::load(&mut model, &adapter, false).unwrap();
        }
        write_expect(&model, &dir);
    }
}
