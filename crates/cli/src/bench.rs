//! `factune bench`: the factune side of the benchmark in bench/ (a random-weight model of a given shape, and
//! timed LoRA training steps on random tokens), printing one JSON line for bench/run.sh to compare.

use anyhow::Result;
use candle_core::{Device, Tensor};
use factune_adapters::{attach, trainable, AdapterConfig, TargetModules};
use factune_model::{Ctx, Model};
use factune_train::optim::AdamW;
use factune_train::pretrain::{init_model, ArchSpec};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Instant;

/// SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied).
pub fn smollm2_135m() -> ArchSpec {
    ArchSpec {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        max_position_embeddings: 2048,
        rope_theta: 100000.0,
        tie_word_embeddings: true,
    }
}

pub fn init(output: &Path) -> Result<()> {
    init_model(&smollm2_135m(), 0, 0, output)?;
    println!(
        "random-weight SmolLM2-135M-shaped model written to {}",
        output.display()
    );
    Ok(())
}

/// Peak resident set size of this process, from /proc (Linux); 0 elsewhere.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// EVA's collection batches in the benchmark: the training default (`eva_batches`).
const EVA_BATCHES: usize = 4;

/// What `factune bench train` runs.
#[derive(Debug, clap::Args)]
pub struct TrainOpts {
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// init_lora_weights: true, pissa, pissa_niter_K or eva (init time is reported as init_s; EVA's includes
    /// its forward passes over 4 batches of the benchmark's shape, as `eva_batches` = 4 does in training)
    #[arg(long, default_value = "true")]
    pub init: String,
    /// Hold the frozen linear weights in NF4 (QLoRA)
    #[arg(long)]
    pub nf4: bool,
    /// DoRA instead of plain LoRA (its step time and memory against LoRA's)
    #[arg(long)]
    pub dora: bool,
    /// Recompute each block in the backward instead of keeping its activations
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

/// Times `steps` LoRA training steps (forward, backward, AdamW) after one warm-up step.
pub fn train(model_dir: &Path, o: &TrainOpts) -> Result<()> {
    let (seq_len, batch, steps, r, init) = (o.seq_len, o.batch, o.steps, o.r, o.init.as_str());
    let (quantize, dora) = (o.nf4, o.dora);
    let nf4 = quantize.then_some(factune_model::Nf4Options { double_quant: true });
    let mut model = Model::load_with(model_dir, &Device::Cpu, nf4)?;
    let cfg = AdapterConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        lora_dropout: 0.0,
        use_dora: dora,
        target_modules: TargetModules::Pattern("all-linear".into()),
        init_lora_weights: match init {
            "true" => serde_json::Value::Bool(true),
            other => serde_json::Value::String(other.into()),
        },
        ..AdapterConfig::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = model.cfg.vocab_size as u32;
    let mut random_batch = || {
        let ids: Vec<u32> = (0..batch * seq_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        Tensor::from_vec(ids, (batch, seq_len), &Device::Cpu)
    };
    let t0 = Instant::now();
    if init == "eva" {
        let mut collector = factune_adapters::eva::Collector::start(&mut model, &cfg)?;
        for _ in 0..EVA_BATCHES {
            model.forward(&random_batch()?, None, &Ctx::default())?;
            collector.absorb(&vec![true; batch * seq_len])?;
        }
        factune_adapters::eva::attach(&mut model, &cfg, collector, 2.0, false)?;
    } else {
        attach(&mut model, &cfg, 0)?;
    }
    let init_s = t0.elapsed().as_secs_f64();
    let params = trainable(&model);
    let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
    let mut opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.0);
    let scales = vec![1.0; params.len()];
    let (mut timed, mut last_loss) = (0f64, 0f64);
    for step in 0..=steps {
        let ids = random_batch()?;
        let labels: Vec<Vec<i64>> = ids
            .to_vec2::<u32>()?
            .into_iter()
            .map(|c| c.into_iter().map(i64::from).collect())
            .collect();
        let t0 = Instant::now();
        let wanted: Vec<&Tensor> = params.iter().map(|(_, v)| v.as_tensor()).collect();
        let (loss, _, grads) = model.loss_and_grads(
            &ids,
            &labels,
            &Ctx::default(),
            o.gradient_checkpointing,
            &wanted,
        )?;
        let mut values = Vec::with_capacity(params.len());
        let mut gs = Vec::with_capacity(params.len());
        for ((_, v), g) in params.iter().zip(&grads) {
            values.push(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            gs.push(g.as_ref().map_or(Ok(vec![0.0; v.elem_count()]), |g| {
                g.flatten_all()?.to_vec1::<f32>()
            })?);
        }
        opt.step(&mut values, &gs, 1e-4, &scales);
        for ((_, v), val) in params.iter().zip(values) {
            v.set(&Tensor::from_vec(val, v.shape(), &Device::Cpu)?)?;
        }
        last_loss = loss.to_scalar::<f32>()? as f64;
        if step > 0 {
            timed += t0.elapsed().as_secs_f64();
        }
    }
    let tokens = (batch * seq_len * steps) as f64;
    println!(
        "{}",
        serde_json::json!({"impl": "factune", "seq_len": seq_len, "batch": batch, "r": r, "steps": steps,
            "init": init, "init_s": init_s, "quantize": if quantize { "nf4" } else { "none" }, "dora": dora,
            "gradient_checkpointing": o.gradient_checkpointing,
            "tokens_per_s": tokens / timed, "seconds_per_step": timed / steps as f64,
            "peak_rss_mb": peak_rss_mb(), "loss": last_loss})
    );
    Ok(())
}

/// The frozen linear's forward and input gradient with an f32 weight against the same weight in NF4
/// (dequantised tile by tile inside the matmul), at the 135M model's layer shapes; prints a table and the
/// ratios (NF4 speed as a fraction of f32).
pub fn matmul(tokens: usize, reps: usize) -> Result<()> {
    use factune_model::kernels::frozen_linear;
    use factune_model::BaseWeight;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut rand =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.05..0.05)).collect() };
    println!("frozen linear, {tokens} tokens, best of {reps}; GFLOP/s = 2·tokens·out·in / time");
    println!("| [out, in] | f32 fwd | NF4 fwd | ratio | f32 dX | NF4 dX | ratio |");
    println!("|---|---|---|---|---|---|---|");
    let (mut f32_total, mut nf4_total) = (0.0, 0.0);
    for (out, inp) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let w = Tensor::from_vec(rand(out * inp), (out, inp), &Device::Cpu)?;
        let x = candle_core::Var::from_vec(rand(tokens * inp), (tokens, inp), &Device::Cpu)?;
        let dense = BaseWeight::Dense(w.clone());
        let q = BaseWeight::nf4(&w, true)?;
        let flops = 2.0 * (tokens * out * inp) as f64;
        let time = |b: &BaseWeight, backward: bool| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let y = frozen_linear(x.as_tensor(), b, None)?;
                let t0 = Instant::now();
                if backward {
                    y.sum_all()?.backward()?;
                } else {
                    frozen_linear(x.as_tensor(), b, None)?;
                }
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(flops / best / 1e9)
        };
        let (fd, qd) = (time(&dense, false)?, time(&q, false)?);
        let (fb, qb) = (time(&dense, true)?, time(&q, true)?);
        f32_total += 1.0 / fd + 1.0 / fb;
        nf4_total += 1.0 / qd + 1.0 / qb;
        println!(
            "| [{out}, {inp}] | {fd:.1} | {qd:.1} | {:.2} | {fb:.1} | {qb:.1} | {:.2} |",
            qd / fd,
            qb / fb
        );
    }
    println!(
        "NF4 / f32 speed over these shapes (forward + input gradient): {:.2}",
        f32_total / nf4_total
    );
    Ok(())
}
