//! ZipLoRA (Shah et al. 2023): two LoRA adapters merged with learned per-column coefficients, so that each keeps
//! doing on its own data what it did alone while the two stop competing for the same columns.
//!
//! The loss, exactly as implemented. For every module both adapters adapt, with updates `ΔW₁ = s₁B₁A₁` and
//! `ΔW₂ = s₂B₂A₂` (`[out, in]`) and coefficient vectors `m₁, m₂ ∈ R^in` (initialised to 1), the merged update is
//! `ΔW = ΔW₁·diag(m₁) + ΔW₂·diag(m₂)` (column j of each update scaled by its coefficient). With `X₁` the
//! module's inputs on data A while adapter 1 is applied alone (rows = tokens, at most `max_rows`), and `X₂`
//! likewise for data B and adapter 2:
//!
//! `L = Σ_modules [ mean((X₁ΔWᵀ − X₁ΔW₁ᵀ)²) + mean((X₂ΔWᵀ − X₂ΔW₂ᵀ)²) + λ·|cos(m₁, m₂)| ]`
//!
//! (the frozen `W₀x` cancels in each difference; the means run over rows and output features). It is
//! minimised by Adam over the coefficients only, for `steps` full-batch steps. The paper states the
//! difference on the whole model's outputs for a diffusion model; here it is taken per layer, on the inputs each
//! adapter's own model gives that layer, which keeps every module's problem small and independent. A module
//! only one adapter adapts keeps that adapter's update (coefficients 1). The merged adapter is written exactly,
//! as a LoRA of rank r₁ + r₂: `A = [s₁A₁·diag(m₁); s₂A₂·diag(m₂)]`, `B = [B₁ B₂]`.

use crate::optim::AdamW;
use candle_core::{Tensor, Var};
use factune_adapters::weighted::{self, Source};
use factune_data::{to_tensor, Example};
use factune_io::{Error, Result};
use factune_model::linear::Capture;
use factune_model::{Ctx, Model};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct ZipOptions {
    pub steps: usize,
    /// λ, the weight of `|cos(m₁, m₂)|`.
    pub lambda: f64,
    pub learning_rate: f64,
    /// Input rows kept per module and dataset.
    pub max_rows: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ZipStep {
    pub step: usize,
    /// The output-difference part of the loss, summed over modules.
    pub difference: f64,
    /// `Σ |cos(m₁, m₂)|` over modules.
    pub cosine: f64,
}

/// The learned coefficients per module, and the loss along the way (step 0: before any update).
pub struct Zipped {
    pub coefficients: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    pub history: Vec<ZipStep>,
}

/// Each adapted module's inputs `[rows, in]` when `source` alone is applied to the model, over `examples`.
fn layer_inputs(
    model: &mut Model,
    source: &Source,
    examples: &[Example],
    max_rows: usize,
) -> Result<BTreeMap<String, Tensor>> {
    let own: BTreeMap<String, (Tensor, Tensor)> = source
        .layers
        .iter()
        .map(|(p, f)| (p.clone(), (f.a.clone(), f.b.clone())))
        .collect();
    weighted::install(model, source, &own)?;
    let mut bufs: BTreeMap<String, Capture> = BTreeMap::new();
    for l in model.linears_mut() {
        if source.layers.contains_key(&l.path) {
            let buf = Arc::new(Mutex::new(Vec::new()));
            l.capture = Some(buf.clone());
            bufs.insert(l.path.clone(), buf);
        }
    }
    let mut rows = 0;
    for e in examples {
        if rows >= max_rows {
            break;
        }
        let ids = to_tensor(std::slice::from_ref(&e.ids), &model.device)?;
        model.forward_hidden(&ids, None, &Ctx::default())?;
        rows += e.ids.len();
    }
    for l in model.linears_mut() {
        l.capture = None;
        l.adapter = None;
    }
    let mut out = BTreeMap::new();
    for (path, buf) in bufs {
        let parts: Vec<Tensor> = std::mem::take(&mut *buf.lock().expect("capture lock"))
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        if parts.is_empty() {
            return Err(Error::config(format!(
                "ZipLoRA: `{path}` never ran in the forward pass, so it has no inputs"
            )));
        }
        let x = Tensor::cat(&parts, 0)?;
        let n = x.dims()[0].min(max_rows);
        out.insert(path, x.narrow(0, 0, n)?);
    }
    Ok(out)
}

struct Module {
    path: String,
    /// `ΔW₁ᵀ`, `ΔW₂ᵀ`: `[in, out]`.
    d1t: Tensor,
    d2t: Tensor,
    x1: Tensor,
    x2: Tensor,
    /// `X₁ΔW₁ᵀ`, `X₂ΔW₂ᵀ`: what each adapter alone gives.
    y1: Tensor,
    y2: Tensor,
}

/// Learns the coefficients of the modules `a` and `b` share on their own data (`data_a`, `data_b`).
pub fn zip(
    model: &mut Model,
    sources: [&Source; 2],
    data: [&[Example]; 2],
    opts: &ZipOptions,
    mut on_step: impl FnMut(&ZipStep),
) -> Result<Zipped> {
    if opts.steps == 0 || opts.max_rows == 0 {
        return Err(Error::config(
            "ZipLoRA needs at least one step and one input row",
        ));
    }
    let finite = opts.lambda.is_finite() && opts.learning_rate.is_finite();
    if !finite || opts.lambda < 0.0 || opts.learning_rate <= 0.0 {
        return Err(Error::config(format!(
            "lambda {} and learning rate {}: expected lambda >= 0 and a learning rate > 0, both finite",
            opts.lambda, opts.learning_rate
        )));
    }
    for (s, d) in sources.iter().zip(data) {
        if s.config.use_dora {
            return Err(Error::config(format!(
                "{}: a DoRA adapter; ZipLoRA merges plain LoRA updates",
                s.dir.display()
            )));
        }
        if d.is_empty() {
            return Err(Error::config(format!(
                "no examples for {} to keep its behaviour on",
                s.dir.display()
            )));
        }
    }
    let x1 = layer_inputs(model, sources[0], data[0], opts.max_rows)?;
    let x2 = layer_inputs(model, sources[1], data[1], opts.max_rows)?;
    let mut modules = Vec::new();
    for (path, f1) in &sources[0].layers {
        let Some(f2) = sources[1].layers.get(path) else {
            continue;
        };
        let d1t = (f1.b.matmul(&f1.a)? * f1.scaling)?.t()?.contiguous()?;
        let d2t = (f2.b.matmul(&f2.a)? * f2.scaling)?.t()?.contiguous()?;
        let (a, b) = (x1[path].clone(), x2[path].clone());
        modules.push(Module {
            path: path.clone(),
            y1: a.matmul(&d1t)?,
            y2: b.matmul(&d2t)?,
            d1t,
            d2t,
            x1: a,
            x2: b,
        });
    }
    if modules.is_empty() {
        return Err(Error::config(format!(
            "{} and {} adapt no module in common: there is nothing to zip (merge-adapters --combination cat \
             adds them)",
            sources[0].dir.display(),
            sources[1].dir.display()
        )));
    }
    let sizes: Vec<usize> = modules.iter().flat_map(|m| [m.d1t.dims()[0]; 2]).collect();
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![1.0; n]).collect();
    let mut opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.0);
    let scale = vec![1.0; sizes.len()];
    let mut history = Vec::new();
    for step in 0..=opts.steps {
        let vars: Vec<Var> = params
            .iter()
            .map(|p| Var::from_vec(p.clone(), p.len(), &model.device))
            .collect::<candle_core::Result<_>>()?;
        let (mut difference, mut cosine) = (0f64, 0f64);
        let mut total: Option<Tensor> = None;
        for (i, m) in modules.iter().enumerate() {
            let (m1, m2) = (vars[2 * i].as_tensor(), vars[2 * i + 1].as_tensor());
            let merged = |x: &Tensor| -> candle_core::Result<Tensor> {
                x.broadcast_mul(m1)?.matmul(&m.d1t)? + x.broadcast_mul(m2)?.matmul(&m.d2t)?
            };
            let e1 = (merged(&m.x1)? - &m.y1)?.sqr()?.mean_all()?;
            let e2 = (merged(&m.x2)? - &m.y2)?.sqr()?.mean_all()?;
            let norms = (m1.sqr()?.sum_all()?.sqrt()? * m2.sqr()?.sum_all()?.sqrt()?)?;
            let cos = (m1 * m2)?.sum_all()?.div(&norms)?.abs()?;
            difference += (e1.to_scalar::<f32>()? + e2.to_scalar::<f32>()?) as f64;
            cosine += cos.to_scalar::<f32>()? as f64;
            let term = ((e1 + e2)? + (cos * opts.lambda)?)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        let record = ZipStep {
            step,
            difference,
            cosine,
        };
        if !(difference.is_finite() && cosine.is_finite()) {
            return Err(Error::config(format!(
                "ZipLoRA diverged at step {step}: output difference {difference}, cosine {cosine}; lower \
                 the learning rate"
            )));
        }
        on_step(&record);
        history.push(record);
        if step == opts.steps {
            break;
        }
        let grads = total.expect("modules is not empty").backward()?;
        let g: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => g.to_vec1::<f32>(),
                None => Ok(vec![0.0; v.dims()[0]]),
            })
            .collect::<candle_core::Result<_>>()?;
        opt.step(&mut params, &g, opts.learning_rate, &scale);
    }
    let mut coefficients = BTreeMap::new();
    let mut it = params.into_iter();
    for m in &modules {
        let (a, b) = (
            it.next().expect("two per module"),
            it.next().expect("two per module"),
        );
        coefficients.insert(m.path.clone(), (a, b));
    }
    Ok(Zipped {
        coefficients,
        history,
    })
}

/// The two sources with their A's scaled column-wise by the learned coefficients, so that `cat` of them (weights
/// 1) is the ZipLoRA merge.
pub fn scaled_sources(sources: [&Source; 2], zipped: &Zipped) -> Result<[Source; 2]> {
    let scale = |s: &Source, which: usize| -> Result<Source> {
        let mut layers = BTreeMap::new();
        for (path, f) in &s.layers {
            let a = match zipped.coefficients.get(path) {
                Some(c) => {
                    let m = if which == 0 { &c.0 } else { &c.1 };
                    let m = Tensor::from_slice(m, (1, m.len()), f.a.device())?;
                    f.a.broadcast_mul(&m)?
                }
                None => f.a.clone(),
            };
            layers.insert(
                path.clone(),
                weighted::Factors {
                    a,
                    b: f.b.clone(),
                    scaling: f.scaling,
                },
            );
        }
        Ok(Source {
            dir: s.dir.clone(),
            config: s.config.clone(),
            layers,
        })
    };
    Ok([scale(sources[0], 0)?, scale(sources[1], 1)?])
}
