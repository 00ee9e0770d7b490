//! EVA (`init_lora_weights = "eva"`): LoRA whose A starts as the top principal directions of each layer's own
//! inputs over a few batches of the training data (positions with labels only), B = 0, so the model is unchanged
//! at step 0 and the first updates move along the directions the data actually excites. Ranks are redistributed
//! across layers by explained variance: every layer offers up to `round(r·rho)` components, the `r × layers`
//! with the largest explained-variance ratios are kept, and α is scaled with the new rank so each layer's
//! `α/r` stays (PEFT's `adjust_scaling_factors`). A layer left with rank 0 gets no adapter.
//!
//! PEFT runs an incremental PCA (randomised SVD) over batches until the components stop moving; factune takes
//! the exact PCA of the inputs of `eva_batches` batches, from their streamed moments (centred covariance,
//! eigendecomposed in f64, each component's sign set so its largest entry is positive, as sklearn's
//! `svd_flip`). From one batch both are that batch's PCA (tested against PEFT). The adapter is saved as a plain
//! LoRA with `rank_pattern`/`alpha_pattern`.

use crate::config::{AdapterConfig, RankEntry};
use crate::lora::Lora;
use crate::targets::TargetMatcher;
use candle_core::{DType, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::linalg::pca_from_moments;
use factune_model::linear::Capture;
use factune_model::Model;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One layer's input moments over the labelled positions seen so far (`[in, in]` Gram, sum, count): memory
/// bounded by the layer width, not by the number of tokens.
pub struct Moments {
    gram: Vec<f64>,
    sum: Vec<f64>,
    n: usize,
}

/// Capture buffers on the targeted layers and their running moments, by module path.
pub struct Collector {
    layers: BTreeMap<String, (Capture, Moments)>,
}

impl Collector {
    /// Starts capturing the inputs of the layers `cfg` targets.
    pub fn start(model: &mut Model, cfg: &AdapterConfig) -> Result<Self> {
        let matcher = TargetMatcher::new(&cfg.target_modules)?;
        let mut layers = BTreeMap::new();
        for l in model.linears_mut() {
            if matcher.matches(&l.path) {
                let buf = Arc::new(Mutex::new(Vec::new()));
                l.capture = Some(buf.clone());
                let d = l.in_features();
                let m = Moments {
                    gram: vec![0.0; d * d],
                    sum: vec![0.0; d],
                    n: 0,
                };
                layers.insert(l.path.clone(), (buf, m));
            }
        }
        Ok(Collector { layers })
    }

    /// Folds the inputs captured by one forward pass into the moments, rows where `keep` is false dropped.
    pub fn absorb(&mut self, keep: &[bool]) -> Result<()> {
        for (path, (buf, m)) in &mut self.layers {
            let rows = std::mem::take(&mut *buf.lock().expect("capture lock"));
            let x = Tensor::cat(&rows, 0)?;
            if x.dim(0)? != keep.len() {
                return Err(Error::config(format!(
                    "EVA: `{path}` saw {} input rows, the label mask has {}",
                    x.dim(0)?,
                    keep.len()
                )));
            }
            let idx: Vec<u32> = keep
                .iter()
                .enumerate()
                .filter(|(_, &k)| k)
                .map(|(i, _)| i as u32)
                .collect();
            let n = idx.len();
            let x = x
                .index_select(&Tensor::from_vec(idx, n, x.device())?, 0)?
                .to_dtype(DType::F64)?;
            let g = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f64>()?;
            let s = x.sum(0)?.to_vec1::<f64>()?;
            m.gram.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            m.sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            m.n += n;
        }
        Ok(())
    }
}

/// Layer ranks from explained-variance ratios: the `budget` largest ratios over all layers (each offering its
/// first `max_k`), counted per layer, ties to the earlier layer.
pub fn distribute(layers: &[(String, Vec<f64>)], budget: usize) -> BTreeMap<String, usize> {
    let mut all: Vec<(f64, usize)> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, (_, r))| r.iter().map(move |&v| (v, i)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut counts: BTreeMap<String, usize> = layers.iter().map(|(p, _)| (p.clone(), 0)).collect();
    for (_, i) in all.into_iter().take(budget) {
        *counts.get_mut(&layers[i].0).expect("listed") += 1;
    }
    counts
}

/// Attaches EVA-initialised LoRA adapters from the collected moments, stops the capture, and returns the
/// config with the rank and alpha patterns the redistribution produced.
pub fn attach(
    model: &mut Model,
    cfg: &AdapterConfig,
    collector: Collector,
    rho: f64,
    whiten: bool,
) -> Result<AdapterConfig> {
    let max_k = ((cfg.r as f64) * rho).round() as usize;
    let mut comps = BTreeMap::new();
    let mut ratios = Vec::new();
    for l in model.linears() {
        let Some((_, m)) = collector.layers.get(&l.path) else {
            continue;
        };
        let k = max_k.min(l.in_features()).min(m.n.saturating_sub(1));
        if k == 0 {
            return Err(Error::config(format!(
                "EVA needs more labelled positions than components: {} for `{}` (raise eva_batches)",
                m.n, l.path
            )));
        }
        let (rows, values, total) = pca_from_moments(&m.gram, &m.sum, m.n, k)?;
        ratios.push((
            l.path.clone(),
            values
                .iter()
                .map(|v| v / total.max(f64::MIN_POSITIVE))
                .collect(),
        ));
        comps.insert(l.path.clone(), (rows, values));
    }
    let ranks = distribute(&ratios, cfg.r * ratios.len());
    let mut out = cfg.clone();
    out.init_lora_weights = serde_json::Value::Bool(true);
    for l in model.linears_mut() {
        l.capture = None;
        let (Some((rows, values)), Some(&k)) = (comps.get(&l.path), ranks.get(&l.path)) else {
            continue;
        };
        if k == 0 {
            // no adapter here; the pattern says so, so loading does not look for one
            out.rank_pattern.insert(l.path.clone(), RankEntry::Rank(0));
            continue;
        }
        let a: Vec<f32> = rows[..k]
            .iter()
            .zip(values)
            .flat_map(|(r, v)| {
                // whitening divides by √(singular value) = eigenvalue^¼
                let w = if whiten {
                    1.0 / v.powf(0.25).max(1e-12)
                } else {
                    1.0
                };
                r.iter().map(move |x| (x * w) as f32)
            })
            .collect();
        let alpha = cfg.alpha_for(&l.path) * k as f64 / cfg.r as f64;
        if k != cfg.r {
            out.rank_pattern.insert(l.path.clone(), RankEntry::Rank(k));
            out.alpha_pattern.insert(l.path.clone(), alpha);
        }
        let dev = l.base.weight.device().clone();
        let i = l.in_features();
        l.adapter = Some(Box::new(Lora {
            a: Var::from_tensor(&Tensor::from_vec(a, (k, i), &dev)?)?,
            b: Var::from_tensor(&Tensor::zeros((l.out_features(), k), DType::F32, &dev)?)?,
            scale: out.scaling(k, alpha),
            dropout: cfg.dropout(),
        }));
    }
    Ok(out)
}
