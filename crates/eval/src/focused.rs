//! Evaluation under focused prefix tuning's contrast: every next-token distribution is
//! `softmax(log p_specific − α · log p_general)` ([`crate::generate::focus`]), the specific prefix on the model
//! and the general one swapped in beside it. Perplexity scores the labels under that distribution (re-normalised,
//! so it is a proper distribution and its perplexity comparable with a plain adapter's); exact match decodes
//! greedily from it.

use crate::generate::{contrast_room, focus, generate_focused};
use crate::tasks::{records, Answerer, EvalData, ExactMatch, Perplexity};
use factune_data::{collate, to_tensor, DataOptions, Dataset};
use factune_io::{Result, TextTokenizer};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, Model, PromptAdapter};

type General = Option<Box<dyn PromptAdapter>>;

pub fn perplexity(
    model: &mut Model,
    general: &mut General,
    weight: f64,
    tok: &TextTokenizer,
    data: EvalData,
    seq_len: usize,
) -> Result<Perplexity> {
    // the sequence must fit after either prefix
    let seq_len = seq_len.min(contrast_room(model, general));
    let ds = Dataset::from_contents(data.contents, &data.path, &DataOptions::eval(seq_len), tok)?;
    let pad = tok.eos_id().unwrap_or(0);
    let (mut sum, mut count) = (0f64, 0usize);
    // one example at a time: the contrast needs both prefixes' full logits
    for e in &ds.examples {
        let (ids, labels) = collate(&[e], pad);
        let ids = to_tensor(&ids, &model.device)?;
        let specific = model.forward(&ids, None, &Ctx::default())?;
        std::mem::swap(&mut model.prompt, general);
        let other = model.forward(&ids, None, &Ctx::default());
        std::mem::swap(&mut model.prompt, general);
        let contrast = focus(&specific, &other?, weight)?;
        let (loss, n) = causal_lm_loss(&contrast, &labels)?;
        sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    let loss = sum / count.max(1) as f64;
    Ok(Perplexity {
        loss,
        perplexity: loss.exp(),
        tokens: count,
        token_accuracy: None,
        truncation: ds.truncation,
    })
}

pub fn exact_match(
    model: &mut Model,
    general: &mut General,
    weight: f64,
    tok: &TextTokenizer,
    data: EvalData,
    max_new_tokens: usize,
    limit: usize,
) -> Result<ExactMatch> {
    let file = data.path.clone();
    let recs = records(data, "exact match")?;
    let eos = model.cfg.eos_token_ids.clone();
    let answer = Answerer {
        tok,
        eos: &eos,
        max_new_tokens,
        limit,
    };
    answer.score(
        recs,
        &file,
        |_, _| Ok(()),
        |ids, cfg| generate_focused(model, general, weight, ids, cfg),
    )
}
