//! Causal-LM cross-entropy as transformers computes it: logits at t predict the label at t+1, labels of
//! -100 are ignored, the mean is over the counted tokens.

use candle_core::{Result, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// Per-position targets and weights for positions `0..t-1` of every row (predicting the next label), and the
/// number counted.
fn shifted_targets(
    labels: &[Vec<i64>],
    b: usize,
    t: usize,
    v: usize,
) -> Result<(Vec<u32>, Vec<f32>, usize)> {
    if labels.len() != b || labels.iter().any(|l| l.len() != t) {
        candle_core::bail!("labels must be [{b}, {t}]");
    }
    let mut targets = Vec::with_capacity(b * (t - 1));
    let mut mask = Vec::with_capacity(b * (t - 1));
    for row in labels {
        for &l in &row[1..] {
            let keep = l != IGNORE_INDEX;
            if keep && (l < 0 || l as usize >= v) {
                candle_core::bail!("label {l} is outside the vocabulary of {v}");
            }
            targets.push(if keep { l as u32 } else { 0 });
            mask.push(if keep { 1f32 } else { 0f32 });
        }
    }
    let count = mask.iter().filter(|m| **m > 0.0).count();
    Ok((targets, mask, count))
}

/// Returns the mean loss (a scalar tensor in the autograd graph) and the number of tokens it averages.
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    let (targets, mask, count) = shifted_targets(labels, b, t, v)?;
    let x = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let loss = crate::kernels::cross_entropy(&x, targets, mask, count)?;
    Ok((loss, count))
}

/// The same loss from final hidden states `[B, T, d]` and the LM head `[V, d]`, the head fused into the loss
/// so the `[B·T, V]` logits are never held at once (see `kernels::linear_cross_entropy`).
pub fn causal_lm_loss_from_hidden(
    hidden: &Tensor,
    head: &Tensor,
    labels: &[Vec<i64>],
) -> Result<(Tensor, usize)> {
    let (b, t, d) = hidden.dims3()?;
    let (targets, mask, count) = shifted_targets(labels, b, t, head.dim(0)?)?;
    let h = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), d))?;
    let loss = crate::kernels::linear_cross_entropy(&h, head, targets, mask, count)?;
    Ok((loss, count))
}
