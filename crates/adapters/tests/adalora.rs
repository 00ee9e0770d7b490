//! AdaLoRA against PEFT 0.21.2 (`scripts/make_fixtures.py build-adalora`): logits, loss with the
//! orthogonality penalty and the gradients of A, E, B; then ten allocator steps whose total kept rank after each
//! step, and final singular values, are PEFT's (ending at the target budget); PEFT's saved adapter, with a
//! module pruned to rank 0, loads; ours saves resized and loads back to the same logits.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use factune_adapters::adalora::{orth_penalty, resized, total_rank, AdaLoraConfig, RankAllocator};
use factune_adapters::{attach, load, trainable, AdapterConfig, TargetModules};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, Model};
use std::collections::HashMap;

fn cfg() -> AdapterConfig {
    AdapterConfig {
        lora_alpha: 12.0,
        method: AdaLoraConfig {
            init_r: 6,
            target_r: 2,
            tinit: 2,
            tfinal: 2,
            deltaT: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: Some(10),
        }
        .into(),
        target_modules: TargetModules::List(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]),
        ..AdapterConfig::default()
    }
}

fn loss(m: &Model, r: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m.forward(&ids, None, &Ctx::default()).unwrap();
    let labels = r["labels"].to_vec2::<i64>().unwrap();
    let (ce, _) = causal_lm_loss(&logits, &labels).unwrap();
    let pen = orth_penalty(m, 0.5).unwrap().unwrap();
    ((ce + pen).unwrap(), logits)
}

#[test]
fn adalora_forward_penalty_gradients_and_allocator_match_peft() {
    let r = candle_core::safetensors::load(
        fixture("llama-adalora-reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    attach(&mut m, &cfg(), 0).unwrap();
    for (k, v) in trainable(&m) {
        v.set(&r[&format!("{k}.value")]).unwrap();
    }
    let (l, logits) = loss(&m, &r);
    assert!(max_abs(&(&logits - &r["logits"]).unwrap()) < 1e-4);
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    assert!(
        (l.to_scalar::<f32>().unwrap() - want).abs() < 1e-5,
        "loss with penalty: {l} vs {want}"
    );
    let g = l.backward().unwrap();
    for (k, v) in trainable(&m) {
        let want = &r[&format!("{k}.grad")];
        let rel =
            max_abs(&(g.get(v.as_tensor()).unwrap() - want).unwrap()) / max_abs(want).max(1e-12);
        assert!(rel < 1e-4, "{k}: gradient differs by {rel}");
    }

    let mut alloc = RankAllocator::new(&cfg(), &m).unwrap();
    for step in 0..10 {
        let (l, _) = loss(&m, &r);
        let g = l.backward().unwrap();
        let grads: HashMap<String, Vec<f32>> = trainable(&m)
            .into_iter()
            .map(|(k, v)| {
                let name = k.trim_start_matches("base_model.model.").to_string();
                (
                    name,
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            })
            .collect();
        let rank = alloc.update_and_allocate(&m, &grads, step).unwrap();
        let want = r[&format!("rank_after_step{step}")]
            .to_vec1::<i64>()
            .unwrap()[0] as usize;
        assert_eq!(rank, want, "total rank after step {step}");
    }
    assert_eq!(
        total_rank(&m).unwrap(),
        2 * 6,
        "final rank = target_r × modules"
    );
    for (k, v) in trainable(&m) {
        if k.ends_with("lora_E") {
            let d = max_abs(&(v.as_tensor() - &r[&format!("{k}.final")]).unwrap());
            assert!(d < 1e-6, "{k}: final singular values differ by {d}");
        }
    }

    // saved as PEFT does (cut to the kept triplets, one module at rank 0) and loaded back: same function
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let trained = m.forward(&ids, None, &Ctx::default()).unwrap();
    let (tensors, pattern) = resized(&m, alloc.final_mask.as_ref().unwrap()).unwrap();
    assert!(
        pattern.values().any(|p| p.rank() == 0),
        "the fixture run prunes a module to rank 0"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.rank_pattern = pattern;
    factune_adapters::peft::write_tensors(&m, &c, tensors, dir.path()).unwrap();
    let mut fresh = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    load(&mut fresh, dir.path(), false).unwrap();
    let d = max_abs(&(fresh.forward(&ids, None, &Ctx::default()).unwrap() - &trained).unwrap());
    assert!(d < 1e-5, "reloaded AdaLoRA differs by {d}");

    // PEFT's own file (same run) loads, rank-0 module included
    let mut theirs = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let (c, report) = load(&mut theirs, &fixture("llama-adalora"), false).unwrap();
    assert!(
        report.unmatched_tensors.is_empty() && report.missing_modules.is_empty(),
        "{report}"
    );
    assert_eq!(c.rank_pattern.values().map(|p| p.rank()).sum::<usize>(), 12);
}
