//! Update spectra and intruder dimensions against PEFT's `reduce_intruder_dimension` and torch's SVDs
//! (fixtures from `scripts/make_fixtures.py build-intruders`: a LoRA on the fixture Llama whose layers range
//! from no intruders to four among the top six).

use candle_core::{DType, Device, Tensor};
use factune_adapters::analysis;
use factune_adapters::peft;
use factune_model::Model;
use std::collections::HashMap;

mod common;
use common::{fixture, max_abs};

const TOP_K: usize = 6;
const EPSILON: f64 = 0.5;
const LAMBDA: f64 = 0.3;

fn reference() -> HashMap<String, Tensor> {
    let w = factune_io::Weights::from_files(&[fixture("llama-intruders-reference.safetensors")])
        .unwrap();
    w.names()
        .map(|n| (n.to_string(), w.get(n, DType::F64, &Device::Cpu).unwrap()))
        .collect()
}

fn loaded() -> (Model, factune_adapters::AdapterConfig) {
    let mut model = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    let (cfg, _) = peft::load(&mut model, &fixture("llama-intruders"), false).unwrap();
    (model, cfg)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn similarities_counts_and_spectra_match_torch_and_peft() {
    let want = reference();
    let (model, _) = loaded();
    let pairs = analysis::adapter_pairs(&model).unwrap();
    assert_eq!(pairs.len(), 4);
    let found = analysis::intruders(&pairs, TOP_K).unwrap();
    let spectra = analysis::spectra(&pairs).unwrap();
    let mut with_intruders = 0;
    for ((p, li), (_, s)) in pairs.iter().zip(&found).zip(&spectra) {
        let sim = values(&want[&format!("{}/similarity", p.module)]);
        assert_eq!(li.similarity.len(), sim.len(), "{}", p.module);
        for (a, b) in li.similarity.iter().zip(&sim) {
            assert!(
                (a - b).abs() < 1e-4,
                "{}: {:?} vs {sim:?}",
                p.module,
                li.similarity
            );
        }
        let peft_count = want
            .get(&format!("{}/intruders", p.module))
            .map_or(0, |t| t.to_vec1::<f64>().unwrap()[0] as usize);
        assert_eq!(li.intruders(EPSILON).len(), peft_count, "{}", p.module);
        with_intruders += usize::from(peft_count > 0);
        // LoRA's spectrum comes from its factors; torch's from the dense ΔW
        let sv = values(&want[&format!("{}/delta_singular_values", p.module)]);
        assert!(p.factors.is_some());
        assert_eq!(s.singular_values.len(), 4);
        for (i, (a, b)) in s.singular_values.iter().zip(&sv).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * sv[0],
                "{} σ{i}: {a} vs {b}",
                p.module
            );
        }
        assert!(sv[4..].iter().all(|x| *x < 1e-5 * sv[0]), "ΔW is rank 4");
    }
    assert!(
        (1..4).contains(&with_intruders),
        "the fixture has layers with and without intruders"
    );
}

#[test]
fn reduction_matches_peft() {
    let want = reference();
    let (model, _) = loaded();
    let pairs = analysis::adapter_pairs(&model).unwrap();
    let found = analysis::intruders(&pairs, TOP_K).unwrap();
    let changed = analysis::reduce_lora(&model, &found, &pairs, EPSILON, LAMBDA).unwrap();
    assert_eq!(changed, 3);
    for l in model.linears() {
        let Some(a) = &l.adapter else { continue };
        let (b, a, _) = a.low_rank_factors().unwrap();
        let key = |f: &str| format!("reduced/base_model.model.{}.lora_{f}.weight", l.path);
        let (wb, wa) = (&want[&key("B")], &want[&key("A")]);
        // factors are unique up to the signs of singular pairs: compare products
        let ours = b.matmul(&a).unwrap();
        let theirs = wb.matmul(wa).unwrap().to_dtype(DType::F32).unwrap();
        let scale = max_abs(&theirs);
        let diff = max_abs(&(&ours - &theirs).unwrap());
        assert!(diff <= 1e-4 * scale, "{}: |Δ| {diff} of {scale}", l.path);
    }
}

#[test]
fn a_prompt_adapter_has_no_update_to_analyse() {
    let mut model = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
    peft::load(&mut model, &fixture("llama-prompt"), false).unwrap();
    let e = analysis::adapter_pairs(&model).err().unwrap().to_string();
    assert!(e.contains("virtual tokens") && e.contains("ΔW"), "{e}");
}
