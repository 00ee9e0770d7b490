//! The prompt family against PEFT 0.21.2 (`scripts/make_fixtures.py build-prompt`) on the fixture Llama (GQA)
//! and GPT-2: PEFT-saved adapters load with PEFT's logits and loss; rebuilt from PEFT's trainable tensors
//! (encoders included) they give PEFT's gradients, with and without gradient checkpointing; greedy decoding
//! through the KV cache gives PEFT's tokens; a saved adapter loads back to the same logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_diff};
use factune_adapters::registry::Attachment;
use factune_adapters::{load, peft, trainable};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, KvCache, Model};
use std::collections::HashMap;

const CASES: &[&str] = &["prompt", "ptuning", "ptuning-lstm", "prefix", "prefix-proj"];
/// Adapters PEFT saved that factune loads (an LSTM-trained P-tuning adapter is its output table).
const LOADABLE: &[&str] = &["prompt", "ptuning", "ptuning-lstm", "prefix", "prefix-proj"];

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("{name}-reference.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn labels(r: &HashMap<String, Tensor>) -> Vec<Vec<i64>> {
    r["labels"].to_dtype(DType::I64).unwrap().to_vec2().unwrap()
}

fn ids(r: &HashMap<String, Tensor>, key: &str) -> Tensor {
    r[key].to_dtype(DType::U32).unwrap()
}

/// PEFT's name of each of our trainable tensors (`prompt_embeddings` is PEFT's `embedding.weight` in
/// training).
fn peft_name(ours: &str) -> String {
    match ours {
        "prompt_embeddings" => "prompt_encoder.embedding.weight".into(),
        other => other.into(),
    }
}

#[test]
fn peft_prompt_adapters_load_with_peft_logits_and_loss() {
    for base in ["llama", "gpt2"] {
        for case in LOADABLE {
            let name = format!("{base}-{case}");
            let r = reference(&name);
            let mut m = Model::load(&fixture(base), &Device::Cpu).unwrap();
            let (cfg, report) = load(&mut m, &fixture(&name), false).unwrap();
            assert_eq!(report.matched_tensors, 1, "{name}: {report}");
            assert!(cfg.method.method().attachment().is_prompt());
            let logits = m
                .forward(&ids(&r, "input_ids"), None, &Ctx::default())
                .unwrap();
            let d = max_diff(&logits, &r["logits"]);
            assert!(d < 1e-4, "{name}: logits differ from PEFT's by {d}");
            let (loss, _) = causal_lm_loss(&logits, &labels(&r)).unwrap();
            let d = max_diff(&loss.reshape(1).unwrap(), &r["loss"]);
            assert!(d < 1e-5, "{name}: loss differs from PEFT's by {d}");
        }
    }
}

#[test]
fn every_label_kept_the_last_virtual_token_predicts_the_first_real_one_as_in_peft() {
    for base in ["llama", "gpt2"] {
        for case in ["prompt", "ptuning"] {
            let name = format!("{base}-{case}");
            let r = reference(&format!("{name}-unmasked"));
            let mut m = Model::load(&fixture(base), &Device::Cpu).unwrap();
            load(&mut m, &fixture(&name), false).unwrap();
            let (loss, n) = m
                .loss(&ids(&r, "input_ids"), &labels(&r), &Ctx::default())
                .unwrap();
            let d = max_diff(&loss.reshape(1).unwrap(), &r["loss"]);
            assert!(
                d < 1e-5,
                "{name}: loss with every label differs from PEFT's by {d}"
            );
            // the first label of each row is counted too: T per row, not T − 1
            let (b, t) = r["input_ids"].dims2().unwrap();
            assert_eq!(n, b * t, "{name}");
        }
    }
}

#[test]
fn prompt_gradients_match_peft_with_and_without_checkpointing() {
    for base in ["llama", "gpt2"] {
        for case in CASES {
            let name = format!("{base}-{case}");
            let r = reference(&name);
            let mut m = Model::load(&fixture(base), &Device::Cpu).unwrap();
            let cfg =
                factune_adapters::AdapterConfig::from_file(&fixture(&name).join(peft::CONFIG_FILE))
                    .unwrap();
            // the training form: PEFT's trainable tensors under factune's checkpoint names
            let mut tensors = HashMap::new();
            for (k, v) in &r {
                if k.starts_with("prompt_encoder.") && !k.ends_with(".grad") {
                    tensors.insert(k.clone(), v.clone());
                }
            }
            if tensors.len() == 1 {
                let t = tensors.remove("prompt_encoder.embedding.weight").unwrap();
                tensors.insert("prompt_embeddings".into(), t);
            }
            let Attachment::Prompt(method) = cfg.method.method().attachment() else {
                panic!("{name}: not a prompt method")
            };
            m.prompt = Some(method.load_tensors(&cfg, &m, &tensors).unwrap());
            let params = trainable(&m);
            assert_eq!(params.len(), tensors.len(), "{name}");
            let wanted: Vec<&Tensor> = params.iter().map(|(_, v)| v.as_tensor()).collect();
            for checkpoint in [false, true] {
                let (loss, _, grads) = m
                    .loss_and_grads(
                        &ids(&r, "input_ids"),
                        &labels(&r),
                        &Ctx::default(),
                        checkpoint,
                        &wanted,
                    )
                    .unwrap();
                let d = max_diff(&loss.reshape(1).unwrap(), &r["loss"]);
                assert!(d < 1e-5, "{name}: loss differs by {d}");
                for ((n, _), g) in params.iter().zip(&grads) {
                    let want = &r[&format!("{}.grad", peft_name(n))];
                    let g = g
                        .as_ref()
                        .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
                    let d = max_diff(g, want);
                    assert!(
                        d < 1e-5,
                        "{name} (checkpoint {checkpoint}): gradient of {n} differs from PEFT's by {d}"
                    );
                }
            }
        }
    }
}

fn greedy(m: &Model, prompt: &Tensor, steps: usize) -> Vec<u32> {
    let mut cache = KvCache::new(m.cfg.num_layers);
    let mut input = prompt.clone();
    let mut out = Vec::new();
    for _ in 0..steps {
        let logits = m
            .forward(&input, Some(&mut cache), &Ctx::default())
            .unwrap();
        let last = logits.squeeze(0).unwrap();
        let next = last
            .get(last.dim(0).unwrap() - 1)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(next);
        input = Tensor::new(&[[next]], &Device::Cpu).unwrap();
    }
    out
}

#[test]
fn greedy_decoding_through_the_cache_matches_peft_generate() {
    for base in ["llama", "gpt2"] {
        for case in LOADABLE {
            let name = format!("{base}-{case}");
            let r = reference(&name);
            let mut m = Model::load(&fixture(base), &Device::Cpu).unwrap();
            load(&mut m, &fixture(&name), false).unwrap();
            let want: Vec<u32> = ids(&r, "greedy_tokens")
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = greedy(&m, &ids(&r, "greedy_prompt"), want.len());
            assert_eq!(got, want, "{name}: greedy tokens differ from PEFT's");
        }
    }
}

#[test]
fn saved_prompt_adapters_load_back_to_the_same_logits() {
    let r = reference("llama-prefix-proj");
    let input = ids(&r, "input_ids");
    for case in CASES {
        let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
        let cfg = factune_adapters::AdapterConfig::from_file(
            &fixture(&format!("llama-{case}")).join(peft::CONFIG_FILE),
        )
        .unwrap();
        // fresh adapters (with their encoders), saved in PEFT's form
        let cfg = factune_adapters::AdapterConfig {
            inference_mode: serde_json::Value::Bool(false),
            ..cfg
        };
        factune_adapters::attach(&mut m, &cfg, 5).unwrap();
        let before = m.forward(&input, None, &Ctx::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        peft::save_portable(&m, &cfg, dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(peft::CONFIG_FILE)).unwrap();
        assert!(
            !text.contains("lora_alpha") && !text.contains("target_modules"),
            "{text}"
        );
        let mut back = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
        load(&mut back, dir.path(), false).unwrap();
        let after = back.forward(&input, None, &Ctx::default()).unwrap();
        assert!(
            max_diff(&before, &after) < 1e-6,
            "{case}: reloaded logits differ"
        );
    }
}

#[test]
fn bad_prompt_configs_and_tensors_are_errors_naming_them() {
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let mut cfg = factune_adapters::AdapterConfig::from_file(
        &fixture("llama-prefix").join(peft::CONFIG_FILE),
    )
    .unwrap();
    let set = |cfg: &mut factune_adapters::AdapterConfig, key: &str, v: serde_json::Value| {
        let mut j = serde_json::to_value(&cfg.method).unwrap();
        j[key] = v;
        cfg.method = serde_json::from_value(j).unwrap();
    };
    set(&mut cfg, "num_virtual_tokens", 0.into());
    let e = factune_adapters::attach(&mut m, &cfg, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_virtual_tokens must be at least 1"), "{e}");
    set(&mut cfg, "num_virtual_tokens", 64.into());
    let e = factune_adapters::attach(&mut m, &cfg, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("64") && e.contains("context"), "{e}");
    set(&mut cfg, "num_virtual_tokens", 4.into());
    set(&mut cfg, "num_layers", 3.into());
    let e = factune_adapters::attach(&mut m, &cfg, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_layers = 3") && e.contains("has 2"), "{e}");
    // a prefix made for another model's shape
    set(&mut cfg, "num_layers", serde_json::Value::Null);
    let wrong = HashMap::from([(
        "prompt_embeddings".to_string(),
        Tensor::zeros((4, 100), DType::F32, &Device::Cpu).unwrap(),
    )]);
    let Attachment::Prompt(method) = cfg.method.method().attachment() else {
        unreachable!()
    };
    let e = method
        .load_tensors(&cfg, &m, &wrong)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("prompt_embeddings") && e.contains("[4, 100]") && e.contains("[4, 128]"),
        "{e}"
    );
    // prompt + sequence past the context
    factune_adapters::attach(&mut m, &cfg, 1).unwrap();
    let long = Tensor::zeros((1, 61), DType::U32, &Device::Cpu).unwrap();
    let e = m
        .forward(&long, None, &Ctx::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("65 tokens") && e.contains("4 virtual tokens"),
        "{e}"
    );
    assert_eq!(m.max_positions(), 60);
}
