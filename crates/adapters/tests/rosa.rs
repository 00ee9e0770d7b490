//! Sparse + low-rank adapters on the fixture Llama: the support is the largest |W| entries, the model is
//! unchanged at step 0, the sparse values get exactly the full weight gradient at their positions, and
//! save/load and merge are exact.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use factune_adapters::rosa::RosaConfig;
use factune_adapters::{attach, load, save, trainable, AdapterConfig, TargetModules};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, Model};

fn cfg() -> AdapterConfig {
    AdapterConfig {
        r: 2,
        lora_alpha: 4.0,
        method: RosaConfig {
            sparse_density: 0.02,
            ..Default::default()
        }
        .into(),
        target_modules: TargetModules::List(vec!["q_proj".into(), "down_proj".into()]),
        ..AdapterConfig::default()
    }
}

fn loss(m: &Model) -> Tensor {
    let logits = m.forward(&ids(), None, &Ctx::default()).unwrap();
    let labels = vec![ids()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()[0]
        .clone()];
    causal_lm_loss(&logits, &labels).unwrap().0
}

#[test]
fn sparse_values_train_exactly_the_full_gradient_at_the_largest_weights() {
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let before = m.forward(&ids(), None, &Ctx::default()).unwrap();
    attach(&mut m, &cfg(), 0).unwrap();
    assert_eq!(
        max_diff(&m.forward(&ids(), None, &Ctx::default()).unwrap(), &before),
        0.0
    );

    // the same loss with every weight trainable: its gradient at the support is the sparse values' gradient
    let mut full = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let vars = full.set_trainable(&|_| true).unwrap();
    let gfull = loss(&full).backward().unwrap();
    let g = loss(&m).backward().unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(&m, &cfg(), dir.path()).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut checked = 0;
    for l in m.linears().iter().filter(|l| l.adapter.is_some()) {
        let key = format!("base_model.model.{}", l.path);
        let idx: Vec<i64> = st[&format!("{key}.sparse_indices")].to_vec1().unwrap();
        let w: Vec<f32> = l
            .base
            .weight
            .dense()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let k = idx.len();
        assert_eq!(k, (0.02 * w.len() as f64).ceil() as usize, "{}", l.path);
        // support = the k largest |W|
        let smallest_in = idx
            .iter()
            .map(|&i| w[i as usize].abs())
            .fold(f32::INFINITY, f32::min);
        let largest_out = (0..w.len() as i64)
            .filter(|i| !idx.contains(i))
            .map(|i| w[i as usize].abs())
            .fold(0f32, f32::max);
        assert!(
            smallest_in >= largest_out,
            "{}: support is not the top-|W| set",
            l.path
        );
        let values = trainable(&m)
            .into_iter()
            .find(|(n, _)| *n == format!("{key}.sparse_values"))
            .unwrap()
            .1;
        let gv: Vec<f32> = g.get(values.as_tensor()).unwrap().to_vec1().unwrap();
        let wvar = &vars
            .iter()
            .find(|(n, _)| *n == format!("{}.weight", l.path))
            .unwrap()
            .1;
        let gw: Vec<f32> = gfull
            .get(wvar.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (j, &i) in idx.iter().enumerate() {
            let want = gw[i as usize];
            assert!(
                (gv[j] - want).abs() <= 1e-5 + 1e-4 * want.abs(),
                "{}[{i}]: {} vs {want}",
                l.path,
                gv[j]
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn sparse_lora_saves_loads_and_merges_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    attach(&mut m, &cfg(), 0).unwrap();
    for (_, v) in trainable(&m) {
        v.set(&(v.as_tensor() + 0.05).unwrap()).unwrap();
    }
    let want = m.forward(&ids(), None, &Ctx::default()).unwrap();
    save(&m, &cfg(), dir.path()).unwrap();
    let mut fresh = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let (c, report) = load(&mut fresh, dir.path(), false).unwrap();
    assert_eq!(c.peft_type(), "ROSA");
    assert!(
        report.unmatched_tensors.is_empty() && report.missing_modules.is_empty(),
        "{report}"
    );
    assert!(
        max_diff(
            &fresh.forward(&ids(), None, &Ctx::default()).unwrap(),
            &want
        ) < 1e-6
    );
    for l in fresh.linears_mut() {
        l.merge().unwrap();
    }
    let d = max_diff(
        &fresh.forward(&ids(), None, &Ctx::default()).unwrap(),
        &want,
    );
    assert!(d < 1e-4, "merged differs by {d}");
}
