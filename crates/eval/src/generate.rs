//! Text generation with a KV cache: greedy, or temperature + top-p sampling with a seeded RNG.

use candle_core::{Tensor, D};
use factune_io::Result;
use factune_model::{Ctx, Model};
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
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let budget = cfg
        .max_new_tokens
        .min(model.max_positions().saturating_sub(prompt.len()));
    let mut out = Vec::with_capacity(budget);
    let mut input = prompt.to_vec();
    for _ in 0..budget {
        let ids = Tensor::new(input.as_slice(), &model.device)?.unsqueeze(0)?;
        let hidden = model.forward_hidden(&ids, Some(&mut cache), &Ctx::default())?;
        let last = hidden.narrow(1, input.len() - 1, 1)?;
        let logits = model.logits(&last)?.flatten_all()?;
        let next = pick(&logits, cfg, &mut rng)?;
        out.push(next);
        if cfg.stop_ids.contains(&next) {
            break;
        }
        input = vec![next];
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
