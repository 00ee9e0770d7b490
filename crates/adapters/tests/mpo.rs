//! Tensor-train (MPO) adapters on the fixture Llama and GPT-2: DoTA leaves the model unchanged at step 0 (in
//! full precision, and with the residual in NF4 up to that quantisation), the random init too (last core
//! zero); gradients reach the cores and nothing frozen; merge and unmerge are exact; an adapter saved here
//! loads back to the same logits, rebuilding DoTA's residual from W.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use factune_adapters::mpo::MpoConfig;
use factune_adapters::{attach, load, save, trainable, AdapterConfig, TargetModules};
use factune_model::{Ctx, Model, Nf4Options};

fn logits(m: &Model) -> Tensor {
    m.forward(&ids(), None, &Ctx::default()).unwrap()
}

fn cfg(init: &str, chi: usize) -> AdapterConfig {
    AdapterConfig {
        method: MpoConfig {
            bond_dim: chi,
            mpo_modes: 3,
            init_weights: init.parse().unwrap(),
            ..Default::default()
        }
        .into(),
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..AdapterConfig::default()
    }
}

#[test]
fn dota_and_random_init_leave_the_model_unchanged_and_train_only_the_cores() {
    for name in ["llama", "gpt2"] {
        let mut model = Model::load(&fixture(name), &Device::Cpu).unwrap();
        let before = logits(&model);
        for init in ["dota", "random"] {
            let mut m = Model::load(&fixture(name), &Device::Cpu).unwrap();
            attach(&mut m, &cfg(init, 4), 1).unwrap();
            let d = max_diff(&logits(&m), &before);
            assert!(d < 1e-4, "{name} {init}: step-0 logits moved by {d}");
            // trainable count = the sum of the core sizes, each shaped as the modes say
            let params = trainable(&m);
            assert!(params.iter().all(|(k, _)| k.contains(".mpo_cores.")));
            let n: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
            let expect: usize = m
                .linears()
                .iter()
                .map(|l| {
                    factune_model::mpo::Modes::balanced(l.out_features(), l.in_features(), 3)
                        .core_shapes(4)
                        .iter()
                        .map(|s| s.iter().product::<usize>())
                        .sum::<usize>()
                })
                .sum();
            assert_eq!(n, expect, "{name} {init}");
            // gradients: every core of DoTA gets one; nothing frozen is in the graph
            let loss = logits(&m).sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            let with_grad = params
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                .count();
            if init == "dota" {
                assert_eq!(
                    with_grad,
                    params.len(),
                    "{name}: some DoTA core has no gradient"
                );
            }
            for l in m.linears() {
                assert!(grads.get(&l.base.weight.dense().unwrap()).is_none());
            }
        }
        // merge / unmerge are exact
        attach(&mut model, &cfg("random", 4), 2).unwrap();
        for (_, v) in trainable(&model) {
            v.set(&(v.as_tensor() + 0.05).unwrap()).unwrap();
        }
        let adapted = logits(&model);
        assert!(
            max_diff(&adapted, &before) > 1e-3,
            "perturbed cores must change the output"
        );
        let weights: Vec<Tensor> = model
            .linears()
            .iter()
            .map(|l| l.base.weight.dense().unwrap())
            .collect();
        let merged: Vec<_> = model
            .linears_mut()
            .into_iter()
            .map(|l| l.merge().unwrap())
            .collect();
        let d = max_diff(&logits(&model), &adapted);
        assert!(d < 1e-4, "{name}: merged logits differ by {d}");
        for (l, a) in model.linears_mut().into_iter().zip(merged) {
            l.unmerge(a.unwrap()).unwrap();
        }
        for (l, w) in model.linears().iter().zip(weights) {
            assert!(
                max_diff(&l.base.weight.dense().unwrap(), &w) < 1e-5,
                "{name}: unmerge"
            );
        }
    }
}

#[test]
fn qdota_holds_the_residual_in_nf4_and_starts_at_the_quantised_model() {
    let dir = fixture("llama");
    // QDoTA: cores from the full-precision W, residual W − MPO(W) quantised after the init
    let mut m = Model::load(&dir, &Device::Cpu).unwrap();
    attach(&mut m, &cfg("dota", 4), 1).unwrap();
    m.quantize_linears(Nf4Options { double_quant: true })
        .unwrap();
    assert_eq!(m.quantized_keys().len(), m.linears().len());
    let full = logits(&Model::load(&dir, &Device::Cpu).unwrap());
    let plain_nf4 = logits(
        &Model::load_with(&dir, &Device::Cpu, Some(Nf4Options { double_quant: true })).unwrap(),
    );
    // quantising the residual costs less than quantising W (the MPO carries W's largest directions)
    let (dq, dn) = (max_diff(&logits(&m), &full), max_diff(&plain_nf4, &full));
    assert!(
        dq > 0.0 && dq < dn,
        "QDoTA moved logits by {dq}, plain NF4 by {dn}"
    );
}

#[test]
fn saved_mpo_adapters_load_back_to_the_same_logits() {
    for init in ["dota", "random"] {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
        let c = cfg(init, 3);
        attach(&mut m, &c, 5).unwrap();
        for (_, v) in trainable(&m) {
            v.set(&(v.as_tensor() * 1.1).unwrap().affine(1.0, 0.01).unwrap())
                .unwrap();
        }
        let want = logits(&m);
        save(&m, &c, dir.path()).unwrap();
        let mut fresh = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
        let (loaded, report) = load(&mut fresh, dir.path(), false).unwrap();
        assert_eq!(loaded.peft_type(), "MPO");
        assert!(
            report.missing_modules.is_empty() && report.unmatched_tensors.is_empty(),
            "{report}"
        );
        let d = max_diff(&logits(&fresh), &want);
        assert!(d < 1e-5, "{init}: reloaded logits differ by {d}");
        assert_eq!(want.dtype(), DType::F32);
    }
}
