//! LoRA against Python PEFT: adapters saved by PEFT load here and give PEFT's logits, loss and LoRA
//! gradients; adapters saved here load back identically; merge/unmerge are exact.

use candle_core::{DType, Device, Tensor};
use factune_adapters::{attach, load, save, trainable, AdapterConfig, TargetModules};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, LoadOptions, Model};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("{name}-reference.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn labels(r: &HashMap<String, Tensor>) -> Vec<Vec<i64>> {
    r["labels"].to_vec2::<i64>().unwrap()
}

fn with_peft_adapter(name: &str) -> Model {
    with_adapter(name, "lora")
}

fn with_adapter(name: &str, kind: &str) -> Model {
    with_adapter_loaded(name, kind, LoadOptions::default())
}

fn with_adapter_loaded(name: &str, kind: &str, opts: LoadOptions) -> Model {
    let mut model = Model::load_with(&fixtures().join(name), &Device::Cpu, opts).unwrap();
    let (_, report) = load(
        &mut model,
        &fixtures().join(format!("{name}-{kind}")),
        false,
    )
    .unwrap();
    assert!(
        report.unmatched_tensors.is_empty() && report.missing_modules.is_empty(),
        "{report}"
    );
    model
}

fn check_against_peft(name: &str) {
    check_kind(name, "lora", name);
}

/// Logits, loss and every trainable tensor's gradient against PEFT's reference file `ref_name`.
fn check_kind(name: &str, kind: &str, ref_name: &str) {
    check_kind_loaded(name, kind, ref_name, LoadOptions::default());
}

fn check_kind_loaded(name: &str, kind: &str, ref_name: &str, opts: LoadOptions) {
    let model = with_adapter_loaded(name, kind, opts);
    let r = reference(ref_name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
    let d = max_abs(&(&logits - &r["logits"]).unwrap());
    assert!(d < 1e-4, "{name}: logits differ from PEFT by {d}");

    let (loss, _) = causal_lm_loss(&logits, &labels(&r)).unwrap();
    let ref_loss = r["loss"].to_vec1::<f32>().unwrap()[0];
    let l = loss.to_scalar::<f32>().unwrap();
    assert!(
        (l - ref_loss).abs() < 1e-5,
        "{name}: loss {l} vs PEFT {ref_loss}"
    );

    let grads = loss.backward().unwrap();
    let params = trainable(&model);
    let mut checked = 0;
    for (key, var) in &params {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let want = &r[&format!("{key}.grad")];
        let rel = max_abs(&(g - want).unwrap()) / max_abs(want).max(1e-12);
        assert!(
            rel < 1e-4,
            "{name}: gradient of {key} differs from PEFT by {rel} (relative)"
        );
        checked += 1;
    }
    let expected = r.keys().filter(|k| k.ends_with(".grad")).count();
    assert_eq!(
        checked, expected,
        "{name}: every PEFT gradient has a counterpart"
    );
}

#[test]
fn llama_lora_matches_peft() {
    check_against_peft("llama");
}

#[test]
fn qwen2_rslora_matches_peft() {
    check_against_peft("qwen2");
}

/// The Qwen2 fixture is stored in bf16: held that way (tiles converted in the fused ops), training computes
/// what PEFT computes in f32 from the same weights.
#[test]
fn qwen2_rslora_on_a_bf16_base_matches_peft() {
    let opts = LoadOptions {
        base_dtype: DType::BF16,
        ..Default::default()
    };
    check_kind_loaded("qwen2", "lora", "qwen2", opts);
}

#[test]
fn gpt2_lora_matches_peft() {
    check_against_peft("gpt2");
}

#[test]
fn llama_dora_matches_peft() {
    check_kind("llama", "dora", "llama-dora");
}

#[test]
fn gpt2_dora_matches_peft() {
    check_kind("gpt2", "dora", "gpt2-dora");
}

#[test]
fn dora_merge_equals_adapted_forward_and_init_is_a_no_op() {
    let mut model = with_adapter("llama", "dora");
    let r = reference("llama-dora");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    for l in model.linears_mut() {
        l.merge().unwrap();
    }
    let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
    let d = max_abs(&(&logits - &r["logits"]).unwrap());
    assert!(
        d < 1e-4,
        "merged DoRA differs from PEFT's adapted logits by {d}"
    );
    // Fresh DoRA (B = 0, m = ‖W‖): the model is unchanged.
    let mut fresh = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    let base = fresh.forward(&ids, None, &Ctx::default()).unwrap();
    let cfg = AdapterConfig {
        use_dora: true,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    attach(&mut fresh, &cfg, 3).unwrap();
    let d = max_abs(&(fresh.forward(&ids, None, &Ctx::default()).unwrap() - base).unwrap());
    assert!(d < 1e-5, "DoRA at init changed the output by {d}");
}

#[test]
fn save_then_load_round_trips_exactly() {
    let model = with_peft_adapter("llama");
    let dir = tempfile::tempdir().unwrap();
    let cfg = AdapterConfig::from_file(&fixtures().join("llama-lora/adapter_config.json")).unwrap();
    save(&model, &cfg, dir.path()).unwrap();
    let mut again = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    load(&mut again, dir.path(), false).unwrap();
    for ((k1, v1), (k2, v2)) in trainable(&model).iter().zip(trainable(&again).iter()) {
        assert_eq!(k1, k2);
        assert_eq!(
            max_abs(&(v1.as_tensor() - v2.as_tensor()).unwrap()),
            0.0,
            "{k1}"
        );
    }
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["peft_type"], "LORA");
    assert_eq!(written["r"], 4);
}

#[test]
fn merge_then_unmerge_restores_weights() {
    let mut model = with_peft_adapter("gpt2");
    let r = reference("gpt2");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let before: Vec<Tensor> = model
        .linears()
        .iter()
        .map(|l| l.base.weight.dense().unwrap().copy().unwrap())
        .collect();
    let mut merged = Vec::new();
    for l in model.linears_mut() {
        merged.push(l.merge().unwrap());
        // A merged weight that kept the adapter's graph would pin the old W and ΔW's temporaries.
        let w = l.base.weight.dense().unwrap();
        assert!(
            !w.track_op(),
            "{}: the merged weight tracks the adapter's graph",
            l.path
        );
    }
    let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
    let d = max_abs(&(&logits - &r["logits"]).unwrap());
    assert!(
        d < 1e-4,
        "merged logits differ from PEFT's adapted logits by {d}"
    );
    for (l, a) in model.linears_mut().into_iter().zip(merged) {
        l.unmerge(a.unwrap()).unwrap();
    }
    for (l, w0) in model.linears().iter().zip(before) {
        let d = max_abs(&(&l.base.weight.dense().unwrap() - &w0).unwrap());
        assert!(d < 1e-6, "{}: merge+unmerge changed W by {d}", l.path);
    }
}

#[test]
fn frozen_weights_get_no_gradient_in_a_training_step() {
    let mut model = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    let cfg = AdapterConfig {
        r: 2,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    attach(&mut model, &cfg, 0).unwrap();
    // A batch whose activation shapes differ from every weight shape, so a size match means a weight gradient.
    let ids = Tensor::new(&[[5u32, 6, 7, 8, 9, 10, 11]], &Device::Cpu).unwrap();
    let logits = model
        .forward(
            &ids,
            None,
            &Ctx {
                train: true,
                dropout_seed: 1,
            },
        )
        .unwrap();
    let (loss, _) = causal_lm_loss(&logits, &[vec![5, 6, 7, 8, 9, 10, 11]]).unwrap();
    let grads = loss.backward().unwrap();
    let frozen: Vec<Vec<usize>> = model
        .linears()
        .iter()
        .map(|l| {
            let (o, i) = l.base.weight.dims();
            vec![o, i]
        })
        .collect();
    let params = trainable(&model);
    for (k, v) in &params {
        assert!(grads.get(v).is_some(), "{k} has no gradient");
    }
    for l in model.linears() {
        assert!(
            grads.get(&l.base.weight.dense().unwrap()).is_none(),
            "{} got a gradient",
            l.path
        );
    }
    // Every gradient left in the store (candle keeps those of graph leaves): none has a frozen weight's size.
    let sizes: Vec<usize> = frozen.iter().map(|d| d.iter().product()).collect();
    for id in grads.get_ids() {
        let s = grads.get_id(*id).unwrap().elem_count();
        assert!(
            !sizes.contains(&s),
            "a gradient of {s} elements (the size of a frozen weight) was allocated"
        );
    }
}

#[test]
fn relora_restart_keeps_the_output_and_redraws_the_factors() {
    // PEFT's adapter has B ≠ 0, so the merge is not trivial: the output must not move (ReLoRA, issue 7).
    let mut model = with_peft_adapter("llama");
    let ids = reference("llama")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap();
    let before = model.forward(&ids, None, &Ctx::default()).unwrap();
    let a_before = trainable(&model)[0].1.as_tensor().copy().unwrap();
    let adapted = model
        .linears()
        .iter()
        .filter(|l| l.adapter.is_some())
        .count();
    let mut rng = rand_chacha::rand_core::SeedableRng::seed_from_u64(7);
    let n = factune_adapters::lora::merge_and_reinit(&mut model, &mut rng).unwrap();
    assert_eq!(n, adapted);
    let after = model.forward(&ids, None, &Ctx::default()).unwrap();
    let d = max_abs(&(&after - &before).unwrap());
    assert!(d < 1e-5, "output moved by {d} across a ReLoRA merge");
    for (k, v) in trainable(&model) {
        let m = max_abs(v.as_tensor());
        if k.contains("lora_B") {
            assert_eq!(m, 0.0, "{k} not zeroed");
        } else {
            assert!(m > 0.0, "{k} not re-drawn");
        }
    }
    let a_after = trainable(&model)[0].1.as_tensor().copy().unwrap();
    assert!(max_abs(&(&a_after - &a_before).unwrap()) > 1e-3);
}

fn pissa_cfg(init: &str) -> AdapterConfig {
    AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::List(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]),
        init_lora_weights: serde_json::Value::String(init.into()),
        ..AdapterConfig::default()
    }
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

#[test]
fn pissa_init_matches_peft() {
    let mut model = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    attach(&mut model, &pissa_cfg("pissa"), 0).unwrap();
    let r = reference("llama-pissa");
    let mut checked = 0;
    for l in model.linears() {
        let Some(a) = &l.adapter else { continue };
        // s·BA and the residual are free of the singular vectors' sign ambiguity, so they compare directly.
        let delta = a.delta_weight(&l.base).unwrap();
        let d = rel_diff(&delta, &r[&format!("{}.init_delta", l.path)]);
        assert!(d < 1e-4, "{}: s·B₀A₀ differs from PEFT's by {d}", l.path);
        let d = rel_diff(
            &l.base.weight.dense().unwrap(),
            &r[&format!("{}.residual", l.path)],
        );
        assert!(d < 1e-5, "{}: residual differs from PEFT's by {d}", l.path);
        checked += 1;
    }
    assert_eq!(checked, 6);
    let base = reference("llama");
    let ids = base["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
    let d = max_abs(&(&logits - &base["base_logits"]).unwrap());
    assert!(d < 1e-4, "PiSSA init changed the model's output by {d}");
}

#[test]
fn llama_pissa_matches_peft() {
    // PEFT's native PiSSA file (trained factors + init_lora_weights = "pissa") on the original base.
    check_kind("llama", "pissa", "llama-pissa");
}

#[test]
fn pissa_portable_form_is_the_trained_model_on_the_original_base() {
    let r = reference("llama-pissa");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits_of = |m: &Model| m.forward(&ids, None, &Ctx::default()).unwrap();
    // PEFT's own conversion loads here as a plain rank-8 LoRA.
    let d =
        max_abs(&(logits_of(&with_adapter("llama", "pissa-converted")) - &r["logits"]).unwrap());
    assert!(d < 1e-4, "PEFT-converted PiSSA adapter: logits off by {d}");
    // Ours: the native adapter written portably, then loaded onto a fresh base.
    let trained = with_adapter("llama", "pissa");
    let dir = tempfile::tempdir().unwrap();
    let written =
        factune_adapters::peft::save_portable(&trained, &pissa_cfg("pissa"), dir.path()).unwrap();
    assert_eq!((written.r, written.lora_alpha), (8, 16.0));
    assert_eq!(written.init_lora_weights, serde_json::Value::Bool(true));
    let mut fresh = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    load(&mut fresh, dir.path(), false).unwrap();
    let d = max_abs(&(logits_of(&fresh) - &r["logits"]).unwrap());
    assert!(d < 1e-4, "portable PiSSA adapter: logits off by {d}");
}

#[test]
fn randomised_pissa_is_a_no_op_at_init_and_captures_the_top_directions() {
    let energy = |init: &str| {
        let mut model = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
        attach(&mut model, &pissa_cfg(init), 0).unwrap();
        let base = reference("llama");
        let ids = base["input_ids"].to_dtype(DType::U32).unwrap();
        let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
        let d = max_abs(&(&logits - &base["base_logits"]).unwrap());
        assert!(d < 1e-4, "{init}: init changed the output by {d}");
        model
            .linears()
            .iter()
            .filter_map(|l| l.adapter.as_ref().map(|a| a.delta_weight(&l.base).unwrap()))
            .map(|d| {
                d.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum::<f32>()
    };
    let (exact, fast) = (energy("pissa"), energy("pissa_niter_4"));
    assert!(
        fast > 0.97 * exact && fast <= exact * 1.0001,
        "randomised top-4 energy {fast} vs exact {exact}"
    );
}

#[test]
fn llama_vera_matches_peft() {
    check_kind("llama", "vera", "llama-vera");
}

#[test]
fn gpt2_vera_matches_peft() {
    check_kind("gpt2", "vera", "gpt2-vera");
}

#[test]
fn vera_init_is_a_no_op_saves_its_projections_once_and_merges_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    let r = reference("llama-vera");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let base = model.forward(&ids, None, &Ctx::default()).unwrap();
    let cfg = AdapterConfig {
        r: 8,
        target_modules: TargetModules::Pattern("all-linear".into()),
        method: factune_adapters::vera::VeraConfig {
            projection_prng_key: 3,
            d_initial: 0.1,
            ..Default::default()
        }
        .into(),
        ..AdapterConfig::default()
    };
    attach(&mut model, &cfg, 0).unwrap();
    let d = max_abs(&(model.forward(&ids, None, &Ctx::default()).unwrap() - &base).unwrap());
    assert!(
        d == 0.0,
        "λ_b = 0 must leave the model unchanged, moved by {d}"
    );
    // r + out parameters per layer
    let n: usize = trainable(&model).iter().map(|(_, v)| v.elem_count()).sum();
    let want: usize = model.linears().iter().map(|l| 8 + l.out_features()).sum();
    assert_eq!(n, want);
    for (_, v) in trainable(&model) {
        v.set(&(v.as_tensor() + 0.3).unwrap()).unwrap();
    }
    let adapted = model.forward(&ids, None, &Ctx::default()).unwrap();
    save(&model, &cfg, dir.path()).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let (a, b) = (&st["base_model.vera_A"], &st["base_model.vera_B"]);
    assert_eq!(
        (a.dims(), b.dims()),
        (&[8, 96][..], &[96, 8][..]),
        "one pair sized to the largest layer"
    );
    let json = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    assert!(
        json.contains("\"peft_type\": \"VERA\"") && !json.contains("lora_alpha"),
        "{json}"
    );
    let mut fresh = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    load(&mut fresh, dir.path(), false).unwrap();
    let d = max_abs(&(fresh.forward(&ids, None, &Ctx::default()).unwrap() - &adapted).unwrap());
    assert!(d < 1e-6, "reloaded VeRA differs by {d}");
    for l in fresh.linears_mut() {
        l.merge().unwrap();
    }
    let d = max_abs(&(fresh.forward(&ids, None, &Ctx::default()).unwrap() - &adapted).unwrap());
    assert!(d < 1e-4, "merged VeRA differs by {d}");
}

/// PEFT writes `null` for optional fields left unset (`task_type` whenever none was given): such a file loads
/// with those fields unset and gives PEFT's logits.
#[test]
fn peft_config_with_null_fields_loads() {
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-untyped/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let nulls: Vec<&String> = raw
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k)
        .collect();
    assert!(
        raw["task_type"].is_null(),
        "fixture lost its null task_type"
    );
    assert!(nulls.len() > 5, "{nulls:?}");
    let model = with_adapter("llama", "untyped");
    let r = reference("llama-untyped");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, None, &Ctx::default()).unwrap();
    let d = max_abs(&(logits - &r["logits"]).unwrap());
    assert!(d < 1e-4, "max |logits - PEFT| = {d}");
}

#[test]
fn a_rank_pattern_that_does_not_match_the_tensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("llama-lora").join(f), dir.path().join(f)).unwrap();
    }
    let p = dir.path().join("adapter_config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j["rank_pattern"] = serde_json::json!({"v_proj": 2});
    std::fs::write(&p, j.to_string()).unwrap();
    let mut model = Model::load(&fixtures().join("llama"), &Device::Cpu).unwrap();
    let err = load(&mut model, dir.path(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("v_proj`: lora_A has rank 4 but the config gives this module rank 2"),
        "{err}"
    );
}
