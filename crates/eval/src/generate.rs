//! Text generation with a KV cache: greedy, or temperature + top-p sampling with a seeded RNG; focused prefix
//! tuning's contrast of two prefixes.

use candle_core::{Tensor, D};
use factune_io::Result;
use factune_model::{Ctx, KvCache, Model, PromptAdapter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after any of these (EOS).
    pub stop_ids: Vec<u32>,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
        }
    }
}

/// New tokens after `prompt` (the stop token, when hit, is included).
pub fn generate(model: &Model, prompt: &[u32], cfg: &GenConfig) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let budget = budget(model, prompt, cfg);
    decode(prompt, budget, cfg, |input| {
        next_logits(model, &mut cache, input)
    })
}

/// Focused prefix tuning's decoding (Ma et al., ACL 2023): the model's own prompt adapter is the
/// specific-attribute prefix, `general` the prefix trained on all the data; each next token is drawn from
/// `softmax(log p_specific − weight · log p_general)`, so what the general prefix also predicts (attributes the
/// data carries implicitly) is suppressed. Both prefixes run on the one model, each with its own KV cache (a
/// prompt adapter is consulted only when a cache is empty); temperature and top-p apply to the combined
/// distribution; no plausibility cut-off is applied (the paper has none).
pub fn generate_focused(
    model: &mut Model,
    general: &mut Option<Box<dyn PromptAdapter>>,
    weight: f64,
    prompt: &[u32],
    cfg: &GenConfig,
) -> Result<Vec<u32>> {
    // the context must hold the prompt after either prefix
    let budget =
        budget(model, prompt, cfg).min(contrast_room(model, general).saturating_sub(prompt.len()));
    let (mut specific_cache, mut general_cache) = (model.new_cache(), model.new_cache());
    decode(prompt, budget, cfg, |input| {
        let ls = next_logits(model, &mut specific_cache, input)?;
        let prefill = general_cache.is_empty();
        if prefill {
            std::mem::swap(&mut model.prompt, general);
        }
        let lg = next_logits(model, &mut general_cache, input);
        if prefill {
            std::mem::swap(&mut model.prompt, general);
        }
        focus(&ls, &lg?, weight)
    })
}

/// Positions left for real tokens after either prefix: the model's own (specific) one and `general`.
pub fn contrast_room(model: &Model, general: &Option<Box<dyn PromptAdapter>>) -> usize {
    model.max_positions().min(
        model
            .cfg
            .max_position_embeddings
            .saturating_sub(general.as_ref().map_or(0, |g| g.num_virtual_tokens())),
    )
}

/// `log_softmax(log_softmax(specific) − weight · log_softmax(general))`: FPT's contrast, re-normalised.
pub fn focus(specific: &Tensor, general: &Tensor, weight: f64) -> Result<Tensor> {
    let contrast = (log_softmax(specific)? - (log_softmax(general)? * weight)?)?;
    log_softmax(&contrast)
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// New tokens the context leaves room for after `prompt` (the model's prompt adapter's positions counted).
fn budget(model: &Model, prompt: &[u32], cfg: &GenConfig) -> usize {
    cfg.max_new_tokens
        .min(model.max_positions().saturating_sub(prompt.len()))
}

/// The last position's logits `[vocab]` after feeding `input` past `cache`.
fn next_logits(model: &Model, cache: &mut KvCache, input: &[u32]) -> Result<Tensor> {
    let ids = Tensor::new(input, &model.device)?.unsqueeze(0)?;
    let hidden = model.forward_hidden(&ids, Some(cache), &Ctx::default())?;
    let last = hidden.narrow(1, input.len() - 1, 1)?;
    Ok(model.logits(&last)?.flatten_all()?)
}

/// The decoding loop: `next` gives the logits after feeding its input (the prompt first, then each new token).
fn decode(
    prompt: &[u32],
    budget: usize,
    cfg: &GenConfig,
    mut next: impl FnMut(&[u32]) -> Result<Tensor>,
) -> Result<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut out = Vec::with_capacity(budget);
    let mut input = prompt.to_vec();
    for _ in 0..budget {
        let token = pick(&next(&input)?, cfg, &mut rng)?;
        out.push(token);
        if cfg.stop_ids.contains(&token) {
            break;
        }
        input = vec![token];
    }
    Ok(out)
}

fn pick(logits: &Tensor, cfg: &GenConfig, rng: &mut ChaCha8Rng) -> Result<u32> {
    if cfg.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let l: Vec<f32> = (logits / cfg.temperature)?.to_vec1()?;
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(usize, f64)> = l
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x - m) as f64).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Nucleus: the smallest prefix whose mass reaches top_p.
    let mut mass = 0.0;
    let mut keep = p.len();
    for (k, (_, q)) in p.iter().enumerate() {
        mass += q;
        if mass >= cfg.top_p {
            keep = k + 1;
            break;
        }
    }
    let p = &p[..keep];
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f64>() * total;
    for (i, q) in p {
        if u < *q {
            return Ok(*i as u32);
        }
        u -= q;
    }
    Ok(p[p.len() - 1].0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn focus_divides_out_the_general_distribution_and_renormalises() {
        // p_specific = [1/3, 2/3], p_general = [3/4, 1/4]: p ∝ p_s / p_g = [4/9, 8/3] → [1/7, 6/7]
        let dev = Device::Cpu;
        let ls = Tensor::new(&[0f32, 2f32.ln()], &dev).unwrap();
        let lg = Tensor::new(&[3f32.ln(), 0.0], &dev).unwrap();
        let p: Vec<f32> = focus(&ls, &lg, 1.0)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (p[0] - 1.0 / 7.0).abs() < 1e-6 && (p[1] - 6.0 / 7.0).abs() < 1e-6,
            "{p:?}"
        );
        // weight 0: the specific distribution itself
        let p: Vec<f32> = focus(&ls, &lg, 0.0)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-6, "{p:?}");
        // weight 0.5: p ∝ p_s / √p_g = [(1/3)/√(3/4), (2/3)/√(1/4)]
        let p: Vec<f32> = focus(&ls, &lg, 0.5)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (a, b) = (1.0 / 3.0 / 0.75f32.sqrt(), 2.0 / 3.0 / 0.5);
        assert!((p[0] - a / (a + b)).abs() < 1e-6, "{p:?}");
    }
}
