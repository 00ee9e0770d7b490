//! MultiLoRA on the fixture Llama: unchanged at step 0, branches decorrelated at init, the stacked forward
//! equal (values and gradients) to the branches computed one by one, save/load and merge exact.

mod common;
use common::*;

use candle_core::{Device, Tensor};
use factune_adapters::multilora::MultiLoraConfig;
use factune_adapters::{attach, load, save, trainable, AdapterConfig, TargetModules};
use factune_model::{Ctx, Model};

fn cfg() -> AdapterConfig {
    AdapterConfig {
        r: 3,
        lora_alpha: 6.0,
        method: MultiLoraConfig {
            multilora_branches: 3,
        }
        .into(),
        target_modules: TargetModules::List(vec!["q_proj".into(), "down_proj".into()]),
        ..AdapterConfig::default()
    }
}

#[test]
fn multilora_is_the_sum_of_its_scaled_branches() {
    let ids = Tensor::new(&[[3u32, 17, 42, 99, 5, 250, 31, 8]], &Device::Cpu).unwrap();
    let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let before = m.forward(&ids, None, &Ctx::default()).unwrap();
    attach(&mut m, &cfg(), 4).unwrap();
    assert_eq!(
        max_abs(&(m.forward(&ids, None, &Ctx::default()).unwrap() - &before).unwrap()),
        0.0
    );
    let params = trainable(&m);
    let get = |suffix: &str, path: &str| {
        params
            .iter()
            .find(|(n, _)| *n == format!("base_model.model.{path}.{suffix}"))
            .unwrap()
            .1
            .clone()
    };
    let path = "model.layers.0.self_attn.q_proj";
    // decorrelated branches: rows of different branches are orthogonal
    let (a0, a1, a2) = (
        get("lora_A.0.weight", path),
        get("lora_A.1.weight", path),
        get("lora_A.2.weight", path),
    );
    for (x, y) in [(&a0, &a1), (&a0, &a2), (&a1, &a2)] {
        let c = max_abs(&x.as_tensor().matmul(&y.as_tensor().t().unwrap()).unwrap());
        assert!(c < 1e-5, "branch rows overlap: {c}");
    }
    // perturb everything, then compare one layer's update with the branches taken one at a time
    for (i, (_, v)) in params.iter().enumerate() {
        v.set(&(v.as_tensor() + (0.02 * (i % 5) as f64 + 0.01)).unwrap())
            .unwrap();
    }
    let l = m.linears().into_iter().find(|l| l.path == path).unwrap();
    let x =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap())
            .unwrap();
    let zero = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = l
        .adapter
        .as_ref()
        .unwrap()
        .forward(x.as_tensor(), zero, &l.base, &Ctx::default())
        .unwrap();
    let mut want = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    for k in 0..3 {
        let (a, b, s) = (
            get(&format!("lora_A.{k}.weight"), path),
            get(&format!("lora_B.{k}.weight"), path),
            get(&format!("lora_scale.{k}"), path),
        );
        let branch = x
            .as_tensor()
            .matmul(&a.as_tensor().t().unwrap())
            .unwrap()
            .matmul(&b.as_tensor().t().unwrap())
            .unwrap();
        want = (want + branch.broadcast_mul(s.as_tensor()).unwrap() * 2.0).unwrap();
        // α/r = 2
    }
    assert!(max_abs(&(&y - &want).unwrap()) < 1e-5);
    let g1 = y.sum_all().unwrap().backward().unwrap();
    let g2 = want.sum_all().unwrap().backward().unwrap();
    for k in 0..3 {
        for n in [
            format!("lora_A.{k}.weight"),
            format!("lora_B.{k}.weight"),
            format!("lora_scale.{k}"),
        ] {
            let v = get(&n, path);
            let d = max_abs(
                &(g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap()).unwrap(),
            );
            assert!(d < 1e-4, "gradient of {n} differs by {d}");
        }
    }

    let want = m.forward(&ids, None, &Ctx::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(&m, &cfg(), dir.path()).unwrap();
    let mut fresh = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let (_, report) = load(&mut fresh, dir.path(), false).unwrap();
    assert!(
        report.unmatched_tensors.is_empty() && report.missing_modules.is_empty(),
        "{report}"
    );
    assert!(
        max_abs(&(fresh.forward(&ids, None, &Ctx::default()).unwrap() - &want).unwrap()) < 1e-6
    );
    for l in fresh.linears_mut() {
        l.merge().unwrap();
    }
    let d = max_abs(&(fresh.forward(&ids, None, &Ctx::default()).unwrap() - &want).unwrap());
    assert!(d < 1e-4, "merged differs by {d}");
}
