//! What an update did to a model's weights, layer by layer: the tuned weight beside the pre-trained one (from
//! an adapter on its base, or a fully tuned model beside its base), the update's spectrum and the tuned
//! weight's intruder dimensions, and PEFT's intruder reduction written back as an adapter or a model.

use candle_core::{DType, Tensor};
use factune_io::{Error, Result};
use factune_model::intruders::LayerIntruders;
use factune_model::spectrum::Spectrum;
use factune_model::Model;
use rayon::prelude::*;

/// One linear layer before and after tuning.
pub struct LayerPair {
    pub module: String,
    /// `W₀` `[out, in]`, f32.
    pub original: Tensor,
    /// `W₀ + ΔW`.
    pub tuned: Tensor,
    /// `ΔW = s·B·A` as `(B, A, s)` when the update is plain LoRA.
    pub factors: Option<(Tensor, Tensor, f64)>,
}

impl LayerPair {
    fn delta(&self) -> Result<Tensor> {
        Ok((&self.tuned - &self.original)?)
    }
}

/// The adapted layers of `model` (an adapter loaded onto its base). An adapter that adds positions rather
/// than weight updates (prompt tuning and its family) has none and is refused.
pub fn adapter_pairs(model: &Model) -> Result<Vec<LayerPair>> {
    let mut out = Vec::new();
    for l in model.linears() {
        let Some(a) = &l.adapter else { continue };
        let original = l.base.weight.dense()?.to_dtype(DType::F32)?;
        let delta = a.delta_weight(&l.base)?;
        out.push(LayerPair {
            module: l.path.clone(),
            tuned: (&original + delta)?,
            original,
            factors: a.low_rank_factors(),
        });
    }
    if out.is_empty() {
        let what = match &model.prompt {
            Some(p) => format!(
                "a {} adapter adds virtual tokens, not weight updates",
                p.method()
            ),
            None => "the adapter adapts no linear layer".to_string(),
        };
        return Err(Error::config(format!(
            "nothing to analyse: {what} (spectra and intruder dimensions are properties of ΔW)"
        )));
    }
    Ok(out)
}

/// Every linear layer of `tuned` beside the same layer of `base`; the two must be the same architecture with
/// the same shapes. Layers whose weight did not change are left out (an untouched layer has no update).
pub fn model_pairs(base: &Model, tuned: &Model) -> Result<Vec<LayerPair>> {
    let (b, t) = (base.linears(), tuned.linears());
    let names = |ls: &[&factune_model::AdaptableLinear]| -> Vec<String> {
        ls.iter().map(|l| l.path.clone()).collect()
    };
    if names(&b) != names(&t) {
        let missing: Vec<String> = names(&b)
            .into_iter()
            .filter(|n| !names(&t).contains(n))
            .take(3)
            .collect();
        return Err(Error::config(format!(
            "the tuned model ({}) is not the base's architecture ({}): {} linear layers against {}{}",
            tuned.dir.display(),
            base.dir.display(),
            t.len(),
            b.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; missing there: {}", missing.join(", "))
            }
        )));
    }
    let mut out = Vec::new();
    for (lb, lt) in b.iter().zip(&t) {
        if lb.base.weight.dims() != lt.base.weight.dims() {
            return Err(Error::config(format!(
                "`{}`: the tuned model's weight is {:?}, the base's {:?} (not the same model shape)",
                lb.path,
                lt.base.weight.dims(),
                lb.base.weight.dims()
            )));
        }
        let original = lb.base.weight.dense()?.to_dtype(DType::F32)?;
        let tuned_w = lt.base.weight.dense()?.to_dtype(DType::F32)?;
        let changed = (&tuned_w - &original)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            > 0.0;
        if changed {
            out.push(LayerPair {
                module: lb.path.clone(),
                original,
                tuned: tuned_w,
                factors: None,
            });
        }
    }
    if out.is_empty() {
        return Err(Error::config(format!(
            "the tuned model {} has the same linear weights as the base {}: no update to analyse",
            tuned.dir.display(),
            base.dir.display()
        )));
    }
    Ok(out)
}

/// Each layer's update spectrum (from LoRA's factors where it has them), in parallel across layers.
pub fn spectra(pairs: &[LayerPair]) -> Result<Vec<(String, Spectrum)>> {
    pairs
        .par_iter()
        .map(|p| {
            let s = match &p.factors {
                Some((b, a, s)) => Spectrum::of_factors(b, a, *s)?,
                None => Spectrum::of(&p.delta()?)?,
            };
            Ok((p.module.clone(), s))
        })
        .collect()
}

/// Each layer's comparison over the tuned weight's top `top_k` singular vectors, in parallel across layers.
pub fn intruders(pairs: &[LayerPair], top_k: usize) -> Result<Vec<LayerIntruders>> {
    pairs
        .par_iter()
        .map(|p| LayerIntruders::of(&p.original, &p.tuned, top_k))
        .collect()
}

/// The layers with intruders at `epsilon`, each with its comparison.
fn intruded<'a>(
    pairs: &'a [LayerPair],
    found: &'a [LayerIntruders],
    epsilon: f64,
) -> impl Iterator<Item = (&'a LayerPair, &'a LayerIntruders)> {
    pairs
        .iter()
        .zip(found)
        .filter(move |(_, li)| !li.intruders(epsilon).is_empty())
}

/// PEFT's `reduce_intruder_dimension` on a loaded LoRA adapter: per layer, the intruders of `W₀ + ΔW` (at
/// `epsilon`) scaled by `lambda`, and the factors re-fitted to the result at the layer's rank, `B = U√S`,
/// `A = √S Vᵀ` of the reduced `ΔW / s`. Layers without intruders keep their factors. Returns how many
/// layers changed.
pub fn reduce_lora(
    model: &Model,
    found: &[LayerIntruders],
    pairs: &[LayerPair],
    epsilon: f64,
    lambda: f64,
) -> Result<usize> {
    let mut changed = 0;
    for (p, li) in intruded(pairs, found, epsilon) {
        let Some((b, _, scale)) = &p.factors else {
            return Err(Error::config(format!(
                "`{}`: intruder reduction rewrites plain LoRA factors; merge this adapter (factune merge) and \
                 give the merged model as --tuned to reduce it there",
                p.module
            )));
        };
        let rank = b.dims()[1];
        let delta = ((li.reduced(epsilon, lambda)? - &p.original)? / *scale)?;
        let svd = factune_model::linalg::svd_top(&delta, rank)?;
        let root: Vec<f32> = svd.s.iter().map(|s| s.sqrt() as f32).collect();
        let root = Tensor::from_vec(root, rank, delta.device())?;
        let new_b = svd.u.broadcast_mul(&root.unsqueeze(0)?)?;
        let new_a = svd.vt.broadcast_mul(&root.unsqueeze(1)?)?;
        let layer = model
            .linears()
            .into_iter()
            .find(|l| l.path == p.module)
            .and_then(|l| l.adapter.as_ref().map(|a| a.parameters()))
            .ok_or_else(|| Error::config(format!("`{}` has no adapter", p.module)))?;
        for (name, var) in layer {
            match name.as_str() {
                "lora_A.weight" => var.set(&new_a)?,
                "lora_B.weight" => var.set(&new_b)?,
                _ => {}
            }
        }
        changed += 1;
    }
    Ok(changed)
}

/// The same reduction on a fully tuned model: each layer's weight replaced by its reduced one. Returns how
/// many layers changed.
pub fn reduce_model(
    tuned: &mut Model,
    found: &[LayerIntruders],
    pairs: &[LayerPair],
    epsilon: f64,
    lambda: f64,
) -> Result<usize> {
    let mut changed = 0;
    for (p, li) in intruded(pairs, found, epsilon) {
        let w = li.reduced(epsilon, lambda)?;
        let l = tuned
            .linears_mut()
            .into_iter()
            .find(|l| l.path == p.module)
            .ok_or_else(|| Error::config(format!("`{}` is not in the tuned model", p.module)))?;
        l.base.weight =
            factune_model::linear::BaseWeight::Dense(w.to_device(l.base.weight.device())?);
        changed += 1;
    }
    Ok(changed)
}
