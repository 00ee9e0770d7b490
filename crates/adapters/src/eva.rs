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
use candle_core::{DType, Tensor, TensorId, Var};
use factune_io::{Error, Result};
use factune_model::linalg::pca_from_moments;
use factune_model::linear::Capture;
use factune_model::Model;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Top components (rows), their variances, and the total variance, of one group's inputs.
type Pca = (Vec<Vec<f64>>, Vec<f64>, f64);

/// One layer's input moments over the labelled positions seen so far (`[in, in]` Gram, sum, count): memory
/// bounded by the layer width, not by the number of tokens.
pub struct Moments {
    gram: Vec<f64>,
    sum: Vec<f64>,
    n: usize,
}

/// Capture buffers on the targeted layers and the running moments of their inputs. Layers fed the same
/// tensor (q/k/v, gate/up) share one set of moments and later one eigendecomposition: their inputs are equal.
pub struct Collector {
    layers: BTreeMap<String, Capture>,
    /// Each layer's index into `groups`, fixed by the first batch.
    group_of: BTreeMap<String, usize>,
    groups: Vec<Moments>,
}

impl Collector {
    /// Starts capturing the inputs of the layers `cfg` targets.
    pub fn start(model: &mut Model, cfg: &AdapterConfig) -> Result<Self> {
        let matcher = TargetMatcher::for_config(cfg)?;
        let mut layers = BTreeMap::new();
        for l in model.linears_mut() {
            if matcher.matches(&l.path) {
                let buf = Arc::new(Mutex::new(Vec::new()));
                l.capture = Some(buf.clone());
                layers.insert(l.path.clone(), buf);
            }
        }
        Ok(Collector {
            layers,
            group_of: BTreeMap::new(),
            groups: Vec::new(),
        })
    }

    /// Folds the inputs captured by one forward pass into the moments, rows where `keep` is false dropped.
    pub fn absorb(&mut self, keep: &[bool]) -> Result<()> {
        let mut taken: BTreeMap<String, (Vec<TensorId>, Vec<Tensor>)> = BTreeMap::new();
        for (path, buf) in &self.layers {
            let entries = std::mem::take(&mut *buf.lock().expect("capture lock"));
            taken.insert(path.clone(), entries.into_iter().unzip());
        }
        if let Some((path, _)) = taken.iter().find(|(_, (ids, _))| ids.is_empty()) {
            return Err(Error::config(format!(
                "EVA: no inputs were captured for `{path}` (it never ran in the forward pass)"
            )));
        }
        if self.group_of.is_empty() {
            let mut by_input: HashMap<&[TensorId], usize> = HashMap::new();
            for (path, (ids, rows)) in &taken {
                let next = by_input.len();
                let g = *by_input.entry(ids.as_slice()).or_insert(next);
                if g == self.groups.len() {
                    let d = rows[0].dim(1)?;
                    self.groups.push(Moments {
                        gram: vec![0.0; d * d],
                        sum: vec![0.0; d],
                        n: 0,
                    });
                }
                self.group_of.insert(path.clone(), g);
            }
        }
        let mut done = vec![false; self.groups.len()];
        for (path, (ids, rows)) in &taken {
            let g = self.group_of[path];
            let first = self
                .group_of
                .iter()
                .find(|(_, &h)| h == g)
                .expect("listed")
                .0;
            if taken[first].0 != *ids {
                return Err(Error::config(format!(
                    "EVA: `{path}` and `{first}` shared an input in the first batch but not in this one"
                )));
            }
            if std::mem::replace(&mut done[g], true) {
                continue;
            }
            let x = Tensor::cat(rows, 0)?;
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
            // One batch's Gram in f32 (the gemm's fast path), accumulated over batches in f64.
            let x = x
                .index_select(&Tensor::from_vec(idx, n, x.device())?, 0)?
                .to_dtype(DType::F32)?;
            let gram = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let s = x.to_dtype(DType::F64)?.sum(0)?.to_vec1::<f64>()?;
            let m = &mut self.groups[g];
            m.gram
                .iter_mut()
                .zip(gram)
                .for_each(|(a, b)| *a += b as f64);
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
    let mut pcas: HashMap<usize, Pca> = HashMap::new();
    for l in model.linears() {
        let Some(&g) = collector.group_of.get(&l.path) else {
            continue;
        };
        let m = &collector.groups[g];
        let k = max_k.min(l.in_features()).min(m.n.saturating_sub(1));
        if k == 0 {
            return Err(Error::config(format!(
                "EVA needs more labelled positions than components: {} for `{}` (raise eva_batches)",
                m.n, l.path
            )));
        }
        let pca = match pcas.entry(g) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(pca_from_moments(&m.gram, &m.sum, m.n, k)?),
        };
        let (rows, values, total) = pca.clone();
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
