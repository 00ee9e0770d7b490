//! Causal-LM cross-entropy as transformers computes it: logits at t predict the label at t+1, labels of
//! -100 are ignored, the mean is over the counted tokens.

use candle_core::{Result, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// Returns the mean loss (a scalar tensor in the autograd graph) and the number of tokens it averages.
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
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
    let x = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let loss = crate::kernels::cross_entropy(&x, targets, mask, count)?;
    Ok((loss, count))
}
