//! Several adapters on one base: a batch whose rows use different adapters (and the base alone) gives each row
//! what its adapter alone gives; adapters switch and unload without reloading the base.

use candle_core::{Device, Tensor};
use factune_adapters::load;
use factune_adapters::multi::AdapterSet;
use factune_model::{Ctx, Model};

mod common;
use common::{fixture, max_diff};

fn base() -> Model {
    Model::load(&fixture("llama"), &Device::Cpu).unwrap()
}

fn ids() -> Tensor {
    let rows: Vec<u32> = (0..4 * 9).map(|i| (i * 37 + 11) % 256).collect();
    Tensor::from_vec(rows, (4, 9), &Device::Cpu).unwrap()
}

fn logits(model: &Model, ids: &Tensor) -> Tensor {
    model.forward(ids, None, &Ctx::default()).unwrap()
}

/// Row `i`'s logits from a fresh model with only `adapter` (or none).
fn alone(adapter: Option<&str>, ids: &Tensor, i: usize) -> Tensor {
    let mut m = base();
    if let Some(a) = adapter {
        load(&mut m, &fixture(a), false).unwrap();
    }
    logits(&m, &ids.narrow(0, i, 1).unwrap())
        .squeeze(0)
        .unwrap()
}

#[test]
fn a_mixed_batch_matches_each_adapter_alone() {
    let mut model = base();
    let mut set = AdapterSet::default();
    // LoRA on q/v, LoRA on q/k, DoRA on v/down: different modules, one of them DoRA
    for (name, dir) in [
        ("a", "llama-merge-a"),
        ("b", "llama-merge-b"),
        ("e", "llama-merge-f"),
    ] {
        set.load_adapter(&mut model, name, &fixture(dir)).unwrap();
    }
    let ids = ids();
    let plan = [Some("b"), None, Some("a"), Some("e")];
    let dirs = [
        Some("llama-merge-b"),
        None,
        Some("llama-merge-a"),
        Some("llama-merge-f"),
    ];
    set.route_rows(&plan).unwrap();
    let mixed = logits(&model, &ids);
    for (i, dir) in dirs.iter().enumerate() {
        let d = max_diff(&mixed.get(i).unwrap(), &alone(*dir, &ids, i));
        assert!(
            d < 1e-5,
            "row {i} ({dir:?}) differs from its adapter alone by {d}"
        );
    }
    // a row count that does not match the routing is an error, not a guess
    set.route_rows(&plan[..2]).unwrap();
    assert!(model.forward(&ids, None, &Ctx::default()).is_err());
}

#[test]
fn adapters_switch_and_unload_on_one_base() {
    let mut model = base();
    let ids = ids();
    let plain = logits(&model, &ids);
    let mut set = AdapterSet::default();
    set.load_adapter(&mut model, "a", &fixture("llama-merge-a"))
        .unwrap();
    set.load_adapter(&mut model, "b", &fixture("llama-merge-b"))
        .unwrap();
    // loaded but not chosen: the base
    assert!(max_diff(&logits(&model, &ids), &plain) == 0.0);
    set.set_adapter(Some("b")).unwrap();
    let b = logits(&model, &ids);
    assert!(max_diff(&b.get(0).unwrap(), &alone(Some("llama-merge-b"), &ids, 0)) < 1e-5);
    assert!(max_diff(&b, &plain) > 1e-3);
    set.unload(&mut model, "a").unwrap();
    set.set_adapter(Some("b")).unwrap();
    assert!(max_diff(&logits(&model, &ids), &b) < 1e-6);
    let err = set.set_adapter(Some("a")).unwrap_err().to_string();
    assert!(
        err.contains("no adapter named `a`") && err.contains("loaded: b"),
        "{err}"
    );
    let err = set
        .load_adapter(&mut model, "b", &fixture("llama-merge-a"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already loaded"), "{err}");
    let err = set
        .load_adapter(&mut model, "p", &fixture("llama-prompt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt-family"), "{err}");
    set.unload(&mut model, "b").unwrap();
    assert!(max_diff(&logits(&model, &ids), &plain) == 0.0);
    assert!(model.linears().iter().all(|l| l.adapter.is_none()));
}
