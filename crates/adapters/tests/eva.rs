//! EVA against PEFT 0.21.2 (`scripts/make_fixtures.py build-eva`, one batch): the same rank redistribution
//! (rank and alpha patterns) and the same principal directions as lora_A, row by row.

mod common;
use common::*;

use candle_core::{DType, Device};
use factune_adapters::{eva, trainable, AdapterConfig, RankEntry, TargetModules};
use factune_model::{Ctx, Model};

#[test]
fn eva_init_matches_peft() {
    let r =
        candle_core::safetensors::load(fixture("llama-eva-reference.safetensors"), &Device::Cpu)
            .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama-eva-patterns.json")).unwrap())
            .unwrap();
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let cfg = AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::List(vec![
            "q_proj".into(),
            "o_proj".into(),
            "down_proj".into(),
        ]),
        ..AdapterConfig::default()
    };
    let mut collector = eva::Collector::start(&mut m, &cfg).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let before = m.forward(&ids, None, &Ctx::default()).unwrap();
    let keep: Vec<bool> = r["labels"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&l| l != -100)
        .collect();
    collector.absorb(&keep).unwrap();
    let out = eva::attach(&mut m, &cfg, collector, 2.0, false).unwrap();

    let ranks: serde_json::Map<String, serde_json::Value> = out
        .rank_pattern
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                match v {
                    RankEntry::Rank(n) => (*n).into(),
                    RankEntry::Mask(_) => unreachable!(),
                },
            )
        })
        .collect();
    assert_eq!(serde_json::Value::Object(ranks), want["rank_pattern"]);
    let alphas: serde_json::Map<String, serde_json::Value> = out
        .alpha_pattern
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    assert_eq!(serde_json::Value::Object(alphas), want["alpha_pattern"]);

    // the directions: PEFT's randomised incremental PCA against the exact one, row by row (sign included)
    let mut checked = 0;
    for (k, v) in trainable(&m) {
        if !k.ends_with("lora_A.weight") {
            continue;
        }
        let theirs = &r[&k];
        let ours = v.as_tensor();
        assert_eq!(ours.dims(), theirs.dims(), "{k}");
        let cos = (ours * theirs)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, c) in cos.iter().enumerate() {
            assert!(*c > 0.995, "{k} row {i}: cosine {c} with PEFT's direction");
        }
        checked += 1;
    }
    assert_eq!(checked, 6);
    // B = 0: unchanged at step 0
    let after = m.forward(&ids, None, &Ctx::default()).unwrap();
    let d = (after - before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}
