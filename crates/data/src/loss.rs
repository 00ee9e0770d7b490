//! The mean loss of a model over examples: validation during training, perplexity in evaluation.

use crate::dataset::{collate, Example};
use candle_core::{Device, Tensor};
use factune_io::{Result, TextTokenizer};
use factune_model::{Ctx, Model};

/// Token ids `[batch, seq]` as a tensor (rows are collated to one length).
pub fn to_tensor(ids: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
    Ok(Tensor::from_vec(ids.concat(), (b, t), dev)?)
}

/// The id short rows are padded with (their labels are ignored): EOS, or 0 for a tokenizer without one.
pub fn pad_id(tok: &TextTokenizer) -> u32 {
    tok.eos_id().unwrap_or(0)
}

/// Mean loss over `examples`, weighted by counted tokens; no dropout.
pub fn evaluate_loss(
    model: &Model,
    examples: &[Example],
    batch: usize,
    pad: u32,
) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, labels) = collate(&refs, pad);
        let (loss, n) = model.loss(&to_tensor(&ids, &model.device)?, &labels, &Ctx::default())?;
        sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    Ok((sum / count.max(1) as f64, count))
}

/// Mean loss and next-token accuracy (argmax = label, over labelled tokens) of `examples`, weighted by
/// counted tokens; no dropout. Forms each chunk's logits `[batch, seq, vocab]`, so keep `batch` small for a
/// large vocabulary.
pub fn evaluate_loss_and_accuracy(
    model: &Model,
    examples: &[Example],
    batch: usize,
    pad: u32,
) -> Result<(f64, f64, usize)> {
    let (mut loss_sum, mut right, mut count) = (0f64, 0usize, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, labels) = collate(&refs, pad);
        let ids_t = to_tensor(&ids, &model.device)?;
        let (loss, n) = model.loss(&ids_t, &labels, &Ctx::default())?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
        let logits = model.forward(&ids_t, None, &Ctx::default())?;
        let pred: Vec<Vec<u32>> = logits.argmax(candle_core::D::Minus1)?.to_vec2()?;
        for (p, l) in pred.iter().zip(&labels) {
            right += (1..l.len())
                .filter(|&t| l[t] >= 0 && p[t - 1] as i64 == l[t])
                .count();
        }
    }
    Ok((
        loss_sum / count.max(1) as f64,
        right as f64 / count.max(1) as f64,
        count,
    ))
}
