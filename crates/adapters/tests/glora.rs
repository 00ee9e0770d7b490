//! GLoRA on the fixture GPT-2 (biased layers) and Llama (bias-free): unchanged at step 0, the factored forward
//! equal in values and gradients to the dense `x(W + W·A + B)ᵀ + b + b⊙D + E + W·C`, save/load exact, merge
//! exact where a bias exists; bias parts refused at training time where the architecture has none.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor, Var};
use factune_adapters::glora::GloraConfig;
use factune_adapters::{attach, load, save, trainable, AdapterConfig, TargetModules};
use factune_model::{Ctx, Model};

fn cfg(parts: &str) -> AdapterConfig {
    AdapterConfig {
        r: 2,
        method: GloraConfig {
            glora_parts: parts.into(),
        }
        .into(),
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..AdapterConfig::default()
    }
}

#[test]
fn glora_matches_its_dense_definition_and_merges_where_a_bias_exists() {
    let mut m = Model::load(&fixture("gpt2"), &Device::Cpu).unwrap();
    let before = m.forward(&ids(), None, &Ctx::default()).unwrap();
    attach(&mut m, &cfg("ABCDE"), 1).unwrap();
    assert_eq!(
        max_abs(&(m.forward(&ids(), None, &Ctx::default()).unwrap() - &before).unwrap()),
        0.0
    );
    let params = trainable(&m);
    for (i, (_, v)) in params.iter().enumerate() {
        v.set(&(v.as_tensor() + (0.01 + 0.01 * (i % 3) as f64)).unwrap())
            .unwrap();
    }
    // one layer against the dense definition
    let l = &m.linears()[0];
    let get = |n: &str| {
        params
            .iter()
            .find(|(k, _)| *k == format!("base_model.model.{}.{n}", l.path))
            .unwrap()
            .1
            .clone()
    };
    let (w, b) = (l.base.weight.dense().unwrap(), l.base.bias.clone().unwrap());
    let (out, inp) = w.dims2().unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, inp), &Device::Cpu).unwrap()).unwrap();
    let zero = x
        .as_tensor()
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let y = l
        .adapter
        .as_ref()
        .unwrap()
        .forward(x.as_tensor(), zero, &l.base, &Ctx::default())
        .unwrap();
    let a = get("glora_Au")
        .as_tensor()
        .matmul(get("glora_Ad").as_tensor())
        .unwrap();
    let bb = get("glora_Bu")
        .as_tensor()
        .matmul(get("glora_Bd").as_tensor())
        .unwrap();
    let w2 = ((&w + w.matmul(&a).unwrap()).unwrap() + bb).unwrap();
    let wc = w
        .matmul(&get("glora_C").as_tensor().unsqueeze(1).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    let b2 = (((&b + (&b * get("glora_D").as_tensor()).unwrap()).unwrap()
        + get("glora_E").as_tensor())
    .unwrap()
        + wc)
        .unwrap();
    let want = x
        .as_tensor()
        .matmul(&w2.t().unwrap())
        .unwrap()
        .broadcast_add(&b2)
        .unwrap();
    assert!(max_abs(&(&y - &want).unwrap()) < 1e-4);
    let probe = Tensor::randn(0f32, 1.0, (5, out), &Device::Cpu).unwrap();
    let g1 = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (want * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for n in [
        "glora_Au", "glora_Ad", "glora_Bu", "glora_Bd", "glora_C", "glora_D", "glora_E",
    ] {
        let v = get(n);
        let d =
            max_abs(&(g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap()).unwrap());
        assert!(d < 1e-3, "{n}: gradient differs by {d}");
    }

    let adapted = m.forward(&ids(), None, &Ctx::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(&m, &cfg("ABCDE"), dir.path()).unwrap();
    let mut fresh = Model::load(&fixture("gpt2"), &Device::Cpu).unwrap();
    load(&mut fresh, dir.path(), false).unwrap();
    assert!(
        max_abs(&(fresh.forward(&ids(), None, &Ctx::default()).unwrap() - &adapted).unwrap())
            < 1e-6
    );
    let merged: Vec<_> = fresh
        .linears_mut()
        .into_iter()
        .map(|l| l.merge().unwrap())
        .collect();
    let d = max_abs(&(fresh.forward(&ids(), None, &Ctx::default()).unwrap() - &adapted).unwrap());
    assert!(d < 1e-3, "merged GLoRA differs by {d}");
    for (l, a) in fresh.linears_mut().into_iter().zip(merged) {
        l.unmerge(a.unwrap()).unwrap();
    }
    assert!(
        max_abs(&(fresh.forward(&ids(), None, &Ctx::default()).unwrap() - &adapted).unwrap())
            < 1e-6
    );
}

#[test]
fn glora_bias_terms_are_refused_at_training_time_on_bias_free_layers() {
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let e = attach(&mut m, &cfg("ABE"), 1).unwrap_err().to_string();
    assert!(
        e.contains("has no bias")
            && e.contains("model.layers.0.self_attn.q_proj")
            && e.contains("auto"),
        "{e}"
    );
    // auto: A and B where there is no bias, all five parts where there is one
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    attach(&mut m, &cfg("auto"), 1).unwrap();
    assert!(trainable(&m)
        .iter()
        .all(|(k, _)| k.contains("glora_A") || k.contains("glora_B")));
    let mut g = Model::load(&fixture("gpt2"), &Device::Cpu).unwrap();
    attach(&mut g, &cfg("auto"), 1).unwrap();
    for part in ["glora_C", "glora_D", "glora_E"] {
        assert!(trainable(&g)
            .iter()
            .any(|(k, _)| k.ends_with(&format!("{part}.weight")) || k.contains(part)));
    }
    // without the bias parts the merge goes through
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    attach(&mut m, &cfg("AB"), 1).unwrap();
    for (_, v) in trainable(&m) {
        v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
    }
    let adapted = m.forward(&ids(), None, &Ctx::default()).unwrap();
    for l in m.linears_mut() {
        l.fold().unwrap();
    }
    let d = max_abs(&(m.forward(&ids(), None, &Ctx::default()).unwrap() - &adapted).unwrap());
    assert!(d < 1e-3, "{d}");
    assert_eq!(adapted.dtype(), DType::F32);
}
