//! LoraHub (Huang et al. 2023): weights for k trained LoRA adapters that compose one adapter for a new task
//! from a few examples, without gradients. The composition is `A = Σ wᵢAᵢ`, `B = Σ wᵢBᵢ`
//! (`factune_adapters::weighted::compose_factors`); the objective is the few-shot loss plus `l1 · mean|wᵢ|`;
//! the search is CMA-ES (the `cmaes` crate) from w = 0 with step size `bound / 3`, every candidate clipped to
//! `[-bound, bound]` before it is evaluated (the paper uses nevergrad's NGOpt with the same bounds and budget).
//! One base model stays loaded; each evaluation only swaps the composed factors in.

use cmaes::{CMAESOptions, DVector};
use factune_adapters::weighted::{self, Source};
use factune_data::{evaluate_loss, Example};
use factune_io::{Error, Result};
use factune_model::Model;
use serde::Serialize;
use std::collections::BTreeMap;

/// Composed factors `(A, B)` by module path.
pub type Composition = BTreeMap<String, (candle_core::Tensor, candle_core::Tensor)>;

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Objective evaluations in all.
    pub budget: usize,
    pub l1: f64,
    /// Weights stay in `[-bound, bound]`.
    pub bound: f64,
    pub seed: u64,
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct HubEval {
    pub weights: Vec<f64>,
    /// Mean few-shot loss per label token.
    pub loss: f64,
    /// `loss + l1 · mean|w|`, what is minimised.
    pub objective: f64,
}

/// Searches the weights; `on_eval(index, this, best)` follows every evaluation (progress). Returns the best
/// evaluation, every evaluation, and the best composition's factors by module (the model is left with the last
/// candidate evaluated installed).
pub fn search(
    model: &mut Model,
    sources: &[Source],
    examples: &[Example],
    pad: u32,
    opts: &HubOptions,
    mut on_eval: impl FnMut(usize, &HubEval, &HubEval),
) -> Result<(HubEval, Vec<HubEval>, Composition)> {
    if sources.len() < 2 {
        return Err(Error::config(
            "LoraHub needs at least two adapters to weigh",
        ));
    }
    if opts.budget == 0
        || !(opts.bound > 0.0 && opts.bound.is_finite())
        || opts.l1.is_nan()
        || opts.l1 < 0.0
    {
        return Err(Error::config(format!(
            "budget {}, bound {}, l1 {}: expected a budget of at least 1, a finite bound > 0 and l1 >= 0",
            opts.budget, opts.bound, opts.l1
        )));
    }
    if examples.is_empty() {
        return Err(Error::config(
            "no few-shot examples to score the compositions on",
        ));
    }
    weighted::check_composable(sources)?;
    let mut evals: Vec<HubEval> = Vec::new();
    let mut best: Option<HubEval> = None;
    let mut failure: Option<Error> = None;
    let mut score = |w: &[f64]| -> Result<HubEval> {
        let factors = weighted::compose_factors(sources, w)?;
        weighted::install(model, &sources[0], &factors)?;
        let (loss, _) = evaluate_loss(model, examples, opts.batch, pad)?;
        if !loss.is_finite() {
            return Err(Error::config(format!(
                "the composition with weights {w:?} gives a loss of {loss}"
            )));
        }
        let l1 = opts.l1 * w.iter().map(|x| x.abs()).sum::<f64>() / w.len() as f64;
        Ok(HubEval {
            weights: w.to_vec(),
            loss,
            objective: loss + l1,
        })
    };
    let objective = |x: &DVector<f64>| -> f64 {
        if failure.is_some() || evals.len() >= opts.budget {
            return f64::INFINITY;
        }
        let w: Vec<f64> = x.iter().map(|v| v.clamp(-opts.bound, opts.bound)).collect();
        match score(&w) {
            Ok(e) => {
                if best.as_ref().is_none_or(|b| e.objective < b.objective) {
                    best = Some(e.clone());
                }
                on_eval(evals.len(), &e, best.as_ref().expect("set above"));
                let o = e.objective;
                evals.push(e);
                o
            }
            Err(e) => {
                failure = Some(e);
                f64::INFINITY
            }
        }
    };
    let mut cma = CMAESOptions::new(vec![0.0; sources.len()], opts.bound / 3.0)
        .max_function_evals(opts.budget)
        .seed(opts.seed)
        .build(objective)
        .map_err(|e| Error::config(format!("CMA-ES options: {e:?}")))?;
    while cma.next().is_none() {}
    drop(cma);
    if let Some(e) = failure {
        return Err(e);
    }
    let best = best.ok_or_else(|| Error::config("LoraHub evaluated no composition"))?;
    let factors = weighted::compose_factors(sources, &best.weights)?;
    Ok((best, evals, factors))
}
