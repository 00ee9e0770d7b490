//! Combinations of LoRA adapters against PEFT's `add_weighted_adapter` (fixtures from
//! `scripts/make_fixtures.py build-merges`): the same tensors (the same products for the SVD types, whose
//! factors are unique only up to signs) and the same loss of the base with the combined adapter.

use candle_core::{DType, Device, Tensor};
use factune_adapters::weighted::{self, Combination, MajoritySign, Weighting};
use factune_adapters::{load, peft};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, Model};
use std::collections::HashMap;

mod common;
use common::{fixture, max_abs};

struct Case {
    name: &'static str,
    sources: &'static str,
    combination: Combination,
    weights: &'static [f64],
    density: Option<f64>,
    sign: Option<MajoritySign>,
    svd_rank: Option<usize>,
}

const fn case(
    name: &'static str,
    sources: &'static str,
    combination: Combination,
    weights: &'static [f64],
    density: Option<f64>,
) -> Case {
    Case {
        name,
        sources,
        combination,
        weights,
        density,
        sign: None,
        svd_rank: None,
    }
}

/// The merges `MERGES` in scripts/make_fixtures.py made with PEFT.
fn cases() -> Vec<Case> {
    use Combination::*;
    vec![
        case("linear", "ab", Linear, &[0.7, 0.5], None),
        case("linear-negative", "ab", Linear, &[0.8, -0.4], None),
        case("cat", "ab", Cat, &[0.7, 0.5], None),
        case("ties", "ab", Ties, &[0.7, 0.5], Some(0.5)),
        Case {
            sign: Some(MajoritySign::Frequency),
            ..case("ties-frequency", "ab", Ties, &[0.7, -0.5], Some(0.6))
        },
        case(
            "magnitude_prune",
            "ab",
            MagnitudePrune,
            &[0.7, 0.5],
            Some(0.4),
        ),
        case("cat-ranks", "cd", Cat, &[1.0, 0.6], None),
        case("svd", "cd", Svd, &[1.0, 0.6], None),
        Case {
            svd_rank: Some(3),
            ..case("svd-rank", "cd", Svd, &[1.0, -0.6], None)
        },
        case("ties_svd", "cd", TiesSvd, &[1.0, 0.6], Some(0.5)),
        case(
            "magnitude_prune_svd",
            "cd",
            MagnitudePruneSvd,
            &[1.0, 0.6],
            Some(0.5),
        ),
        case("dora-linear", "ef", Linear, &[0.7, 0.5], None),
        case("dora-cat", "ef", Cat, &[0.7, 0.5], None),
    ]
}

fn combined(model: &mut Model, c: &Case) -> weighted::Combined {
    let sources: Vec<_> = c
        .sources
        .chars()
        .map(|s| {
            let dir = fixture(&format!("llama-merge-{s}"));
            let cfg = weighted::source_config(&dir).unwrap();
            weighted::read_source(model, &dir, cfg).unwrap()
        })
        .collect();
    let spec = Weighting {
        combination: c.combination,
        weights: c.weights.to_vec(),
        density: c.density,
        majority_sign_method: c.sign,
        svd_rank: c.svd_rank,
        svd_clamp: None,
        seed: 0,
    };
    weighted::combine(model, &sources, &spec).unwrap()
}

#[test]
fn every_deterministic_combination_matches_peft() {
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("llama-merge-reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let labels = r["labels"].to_vec2::<i64>().unwrap();
    let mut model = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for c in cases() {
        let got = combined(&mut model, &c);
        let prefix = format!("{}/", c.name);
        let want: HashMap<&str, &Tensor> = r
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k, v)))
            .filter(|(k, _)| *k != "loss")
            .collect();
        let mut keys: Vec<&str> = got.tensors.keys().map(String::as_str).collect();
        let mut want_keys: Vec<&str> = want.keys().copied().collect();
        keys.sort();
        want_keys.sort();
        assert_eq!(keys, want_keys, "{}: tensor names", c.name);
        let svd = c.combination.as_str().ends_with("svd");
        for (k, t) in &got.tensors {
            let w = want[k.as_str()];
            assert_eq!(t.dims(), w.dims(), "{}: {k}", c.name);
            if svd && !k.ends_with("lora_magnitude_vector") {
                continue;
            }
            let d = max_abs(&(t - w).unwrap());
            assert!(d < 1e-5, "{}: {k} differs from PEFT's by {d}", c.name);
        }
        if svd {
            for k in got.tensors.keys().filter(|k| k.ends_with(".lora_A.weight")) {
                let bk = k.replace(".lora_A.", ".lora_B.");
                let ours = got.tensors[&bk].matmul(&got.tensors[k]).unwrap();
                let theirs = want[bk.as_str()].matmul(want[k.as_str()]).unwrap();
                let d = max_abs(&(&ours - &theirs).unwrap());
                assert!(
                    d < 1e-5,
                    "{}: B·A of {k} differs from PEFT's by {d}",
                    c.name
                );
            }
        }
        // the written adapter loads and gives PEFT's loss
        let out = dir.path().join(c.name);
        std::fs::create_dir_all(&out).unwrap();
        peft::write_built(&got.config, got.tensors, &out).unwrap();
        let (cfg, report) = load(&mut model, &out, false).unwrap();
        assert!(
            report.missing_modules.is_empty() && report.unmatched_tensors.is_empty(),
            "{report}"
        );
        assert!(
            !cfg.use_rslora && cfg.lora_alpha == cfg.r as f64,
            "{}",
            c.name
        );
        let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
        let loss = causal_lm_loss(&logits, &labels)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap();
        let want_loss = r[&format!("{}/loss", c.name)].to_vec1::<f32>().unwrap()[0];
        assert!(
            (loss - want_loss).abs() < 1e-4,
            "{}: loss {loss} against PEFT's {want_loss}",
            c.name
        );
        peft::detach(&mut model);
    }
}

#[test]
fn sources_that_do_not_combine_are_refused_naming_them() {
    let mut model = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let read = |model: &mut Model, s: &str| {
        let dir = fixture(s);
        let cfg = weighted::source_config(&dir).unwrap();
        weighted::read_source(model, &dir, cfg).unwrap()
    };
    let spec = |c, weights: &[f64]| Weighting {
        combination: c,
        weights: weights.to_vec(),
        density: None,
        majority_sign_method: None,
        svd_rank: None,
        svd_clamp: None,
        seed: 0,
    };
    // ranks 4 and 2 for a type on the factors
    let (c, d) = (
        read(&mut model, "llama-merge-c"),
        read(&mut model, "llama-merge-d"),
    );
    let err = weighted::combine(&model, &[c, d], &spec(Combination::Linear, &[1.0, 1.0]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("needs adapters of one rank") && err.contains("llama-merge-d"),
        "{err}"
    );
    // DoRA with plain LoRA
    let (a, e) = (
        read(&mut model, "llama-merge-a"),
        read(&mut model, "llama-merge-e"),
    );
    let err = weighted::combine(&model, &[a, e], &spec(Combination::Cat, &[1.0, 1.0]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("DoRA") && err.contains("llama-merge-e"),
        "{err}"
    );
    // an SVD rank past the update's size
    let (c, d) = (
        read(&mut model, "llama-merge-c"),
        read(&mut model, "llama-merge-d"),
    );
    let mut s = spec(Combination::Svd, &[1.0, 1.0]);
    s.svd_rank = Some(65);
    let err = weighted::combine(&model, &[c, d], &s)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("svd_rank 65 exceeds"), "{err}");
    // a method that is not LoRA
    let err = weighted::source_config(&fixture("llama-vera"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("VERA adapter: only LoRA adapters"), "{err}");
}
