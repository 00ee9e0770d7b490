//! LQ-LoRA-style mixed precision (`quantize = "mixed"`, `quant_budget_bits`): each frozen linear weight gets
//! its own NormalFloat width among [`WIDTHS`] so that the total reconstruction error is as small as the
//! memory budget allows. The error of a width is what the layer will actually carry: with LoftQ's init
//! (LQ-LoRA proper, `W ≈ Q + s·BA`) it is measured after LoftQ's iterations at that width, otherwise it is
//! plain quantisation's. Costs are the stored bits per weight, block scales included.
//!
//! The allocation is greedy on the Lagrangian: every weight starts at the narrowest width, and the upgrade
//! with the largest drop in squared error per extra bit is taken while it fits the budget (LQ-LoRA solves
//! the same knapsack as an integer program; greedy is within one upgrade of it when errors fall convexly
//! with width, as they do here).

use crate::config::AdapterConfig;
use crate::loftq;
use crate::targets::TargetMatcher;
use candle_core::{DType, Tensor};
use factune_io::{Error, Result};
use factune_model::{AdaptableLinear, BaseWeight, Model};
use serde::Serialize;

/// The NormalFloat widths a weight may get.
pub const WIDTHS: [u8; 3] = [3, 4, 8];

/// One weight's chosen width.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub module: String,
    pub bits: u8,
    pub params: usize,
    pub bits_per_param: f64,
    /// ‖W − (deq(Q) [+ s·BA])‖_F / ‖W‖_F at the chosen width.
    pub relative_error: f64,
}

struct WidthCost {
    bits: u8,
    cost: f64,
    err2: f64,
}

fn fro2(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Error and cost of every width for one layer (full-precision weight `w`).
fn options(
    layer: &AdaptableLinear,
    w: &Tensor,
    cfg: &AdapterConfig,
    lowrank: bool,
    double_quant: bool,
) -> Result<Vec<WidthCost>> {
    let n = w.elem_count() as f64;
    WIDTHS
        .iter()
        .map(|&bits| {
            if lowrank {
                // LoftQ at this width on a scratch copy of the layer
                let mut scratch = AdaptableLinear::new(
                    layer.path.clone(),
                    layer.index,
                    BaseWeight::Dense(w.clone()),
                    None,
                    layer.source_key.clone(),
                    layer.stored_transposed,
                );
                scratch.planned_bits = Some(bits);
                let r = cfg.rank_for(&layer.path);
                let s = cfg.scaling(r, cfg.alpha_for(&layer.path));
                let (a, b) = loftq::init(&mut scratch, r, s, cfg.loftq_iter()?)?;
                let q = scratch
                    .base
                    .weight
                    .as_nf()
                    .expect("LoftQ leaves a quantised base");
                let err = ((w - scratch.base.weight.dense()?)? - (b.matmul(&a)? * s)?)?;
                Ok(WidthCost {
                    bits,
                    cost: q.bits_per_param() * n,
                    err2: fro2(&err)?,
                })
            } else {
                let q = BaseWeight::nf(w, bits, double_quant)?;
                let cost = q.as_nf().expect("quantised").bits_per_param() * n;
                Ok(WidthCost {
                    bits,
                    cost,
                    err2: fro2(&(w - q.dense()?)?)?,
                })
            }
        })
        .collect()
}

/// Chooses every block linear's width under `budget` bits per weight on average, records it in the layers
/// (`planned_bits`, used by LoftQ's init and by quantisation) and returns the layout. Needs the
/// full-precision weights.
pub fn plan(
    model: &mut Model,
    cfg: &AdapterConfig,
    budget: f64,
    double_quant: bool,
) -> Result<Vec<Choice>> {
    let matcher = TargetMatcher::for_config(cfg)?;
    let loftq = cfg.init_lora_weights == "loftq";
    let mut table = Vec::new();
    let mut norms = Vec::new();
    for l in model.linears() {
        let w = l.base.weight.dense()?.to_dtype(DType::F32)?;
        if l.base.weight.as_nf().is_some() {
            return Err(Error::config(format!(
                "`{}` is already quantised: a mixed-precision plan needs the full-precision checkpoint",
                l.path
            )));
        }
        let lowrank = loftq && matcher.matches(&l.path);
        table.push(options(l, &w, cfg, lowrank, double_quant && !lowrank)?);
        norms.push(fro2(&w)?.max(f64::MIN_POSITIVE));
    }
    let params: Vec<usize> = model
        .linears()
        .iter()
        .map(|l| l.out_features() * l.in_features())
        .collect();
    let total: f64 = params.iter().sum::<usize>() as f64;
    let allowed = budget * total;
    let mut pick = vec![0usize; table.len()];
    let mut used: f64 = table.iter().map(|o| o[0].cost).sum();
    if used > allowed {
        return Err(Error::config(format!(
            "quant_budget_bits = {budget}: even NF{} everywhere needs {:.3} bits per weight",
            WIDTHS[0],
            used / total
        )));
    }
    loop {
        let best = (0..table.len())
            .filter(|&i| pick[i] + 1 < WIDTHS.len())
            .map(|i| {
                let (cur, next) = (&table[i][pick[i]], &table[i][pick[i] + 1]);
                (
                    i,
                    (cur.err2 - next.err2) / (next.cost - cur.cost),
                    next.cost - cur.cost,
                )
            })
            .filter(|&(_, _, extra)| used + extra <= allowed)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((i, _, extra)) = best else { break };
        pick[i] += 1;
        used += extra;
    }
    let mut out = Vec::new();
    for (((l, o), k), (n, norm)) in model
        .linears_mut()
        .into_iter()
        .zip(&table)
        .zip(pick)
        .zip(params.into_iter().zip(norms))
    {
        let c = &o[k];
        l.planned_bits = Some(c.bits);
        out.push(Choice {
            module: l.path.clone(),
            bits: c.bits,
            params: n,
            bits_per_param: c.cost / n as f64,
            relative_error: (c.err2 / norm).sqrt(),
        });
    }
    Ok(out)
}
