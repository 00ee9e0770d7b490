//! `factune bench`: the factune side of the benchmark in bench/ (a random-weight model of a given shape, and
//! timed training steps on random tokens through the trainer's own step), printing one JSON line for
//! bench/run.sh to compare.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use factune_adapters::hooks::StepHook;
use factune_adapters::{attach, trainable, AdapterConfig, TargetModules};
use factune_model::{Ctx, Model};
use factune_train::config::Targets;
use factune_train::optim::AdamW;
use factune_train::pretrain::{init_model, ArchSpec};
use factune_train::{PeftType, TrainConfig};
use factune_train::{StepSettings, Trainer};
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
    status_mb("VmHWM:")
}

fn current_rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// A `/proc/self/status` memory line in MB (0 where there is none).
fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
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
    /// The adapter method (peft_type), with the training defaults of its own keys: LORA, VERA, ADALORA, ROSA,
    /// MULTILORA, GLORA, MPO
    #[arg(long, default_value = "LORA")]
    pub method: String,
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// init_lora_weights: true, pissa, pissa_niter_K or eva (init time is reported as init_s; EVA's includes
    /// its forward passes over 4 batches of the benchmark's shape, as `eva_batches` = 4 does in training)
    #[arg(long, default_value = "true")]
    pub init: String,
    /// Hold the frozen linear weights in NF4 (QLoRA)
    #[arg(long)]
    pub nf4: bool,
    /// Hold the frozen linear weights in bf16 (compute in f32)
    #[arg(long, conflicts_with = "nf4")]
    pub bf16: bool,
    /// DoRA instead of plain LoRA (its step time and memory against LoRA's)
    #[arg(long)]
    pub dora: bool,
    /// Recompute each block in the backward instead of keeping its activations
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// LoRA dropout on the adapter input (masks drawn each step, as in training)
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
}

/// Model FLOPs per token, the accounting written out in docs/performance.md: a frozen linear weight costs 2
/// FLOPs forward and 2 for the input gradient, a trainable adapter weight 6 (forward, input and weight
/// gradients); the LM head is frozen; causal attention averages T/2 keys per query, 4·(T/2)·Hq·D per layer
/// forward, twice that backward. Recomputation (the attention backward, gradient checkpointing) is not counted.
pub fn train_flops_per_token(model: &Model, trainable_params: usize, seq_len: usize) -> f64 {
    let c = &model.cfg;
    let frozen: usize = model
        .linears()
        .iter()
        .map(|l| l.in_features() * l.out_features())
        .sum::<usize>()
        + c.vocab_size * c.hidden_size;
    let attn = c.num_layers as f64 * 2.0 * seq_len as f64 * (c.num_heads * c.head_dim) as f64;
    4.0 * frozen as f64 + 6.0 * trainable_params as f64 + 3.0 * attn
}

/// Times `steps` training steps of the chosen method (the trainer's own step: forward, backward, the method's
/// hook, AdamW) after one warm-up step.
pub fn train(model_dir: &Path, o: &TrainOpts) -> Result<()> {
    anyhow::ensure!(
        o.steps >= 1 && o.seq_len >= 2 && o.batch >= 1,
        "--steps and --batch must be at least 1 and --seq-len at least 2 (a warm-up step runs first)"
    );
    let (seq_len, batch, steps, r, init) = (o.seq_len, o.batch, o.steps, o.r, o.init.as_str());
    let (quantize, dora) = (o.nf4, o.dora);
    let opts = factune_model::LoadOptions {
        quantize: quantize.then_some(factune_model::Nf4Options { double_quant: true }),
        base_dtype: base_dtype(o.bf16),
    };
    let mut model = Model::load_with(model_dir, &Device::Cpu, opts)?;
    // The adapter a training run with these settings would attach (each method's own keys at their defaults).
    let peft_type: PeftType = o.method.parse().map_err(anyhow::Error::msg)?;
    if !matches!(peft_type, PeftType::Adapter(_)) {
        bail!(
            "bench train --method {peft_type}: an adapter method is benchmarked, not `{peft_type}`"
        );
    }
    let prompt = factune_adapters::MethodConfig::named(peft_type.adapter())?
        .method()
        .attachment()
        .is_prompt();
    let run = if prompt {
        // the prompt family has no rank or targets: its own keys at their defaults (20 virtual tokens)
        TrainConfig {
            peft_type,
            max_steps: steps as i64 + 1,
            ..TrainConfig::default()
        }
    } else {
        TrainConfig {
            peft_type,
            r,
            lora_alpha: 2.0 * r as f64,
            lora_dropout: o.lora_dropout,
            use_dora: dora,
            target_modules: Targets::One("all-linear".into()),
            init_lora_weights: init.parse().map_err(anyhow::Error::msg)?,
            max_steps: steps as i64 + 1,
            ..TrainConfig::default()
        }
    };
    run.validate()?;
    let cfg = run.adapter_config()?;
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
    let trainable_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let opt = AdamW::new(
        &params
            .iter()
            .map(|(_, v)| v.elem_count())
            .collect::<Vec<_>>(),
        0.9,
        0.999,
        1e-8,
        0.0,
    );
    // As the PyTorch side: one micro-batch per step, no clipping, constant learning rate.
    let settings = StepSettings {
        gradient_accumulation_steps: 1,
        gradient_checkpointing: o.gradient_checkpointing,
        max_grad_norm: 0.0,
        loraplus_lr_ratio: 1.0,
        dropout_seed: 0,
    };
    let mut trainer = Trainer::new(
        params,
        &factune_adapters::peft::roles(&model),
        opt,
        settings,
        false,
    );
    let mut hooks: Vec<Box<dyn StepHook>> = cfg
        .method
        .method()
        .step_hook(&cfg, &model)?
        .into_iter()
        .collect();
    // The steps' own peak, apart from loading's: reset the high-water mark (Linux) and note the resident base.
    let load_peak = peak_rss_mb();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let base_rss = current_rss_mb();
    let (mut timed, mut last_loss) = (0f64, 0f64);
    for step in 0..=steps {
        let ids = random_batch()?;
        let labels: Vec<Vec<i64>> = ids
            .to_vec2::<u32>()?
            .into_iter()
            .map(|c| c.into_iter().map(i64::from).collect())
            .collect();
        let mut batch = Some((ids, labels));
        let mut next = |_: usize| {
            batch
                .take()
                .ok_or_else(|| factune_io::Error::config("one micro-batch per bench step"))
        };
        let t0 = Instant::now();
        let report = trainer.step(&mut model, step, 1e-4, &mut next, &mut hooks)?;
        last_loss = report.loss;
        if step > 0 {
            timed += t0.elapsed().as_secs_f64();
        }
    }
    let tokens = (batch * seq_len * steps) as f64;
    let flops = train_flops_per_token(&model, trainable_params, seq_len);
    println!(
        "{}",
        serde_json::json!({"impl": "factune", "method": cfg.peft_type(), "seq_len": seq_len, "batch": batch, "r": r, "steps": steps,
            "init": init, "init_s": init_s, "quantize": if quantize { "nf4" } else { "none" },
            "base_dtype": format!("{:?}", base_dtype(o.bf16)), "dora": dora,
            "gradient_checkpointing": o.gradient_checkpointing, "lora_dropout": o.lora_dropout,
            "tokens_per_s": tokens / timed, "seconds_per_step": timed / steps as f64,
            "flops_per_token": flops, "gflops": flops * tokens / timed / 1e9,
            "peak_rss_mb": peak_rss_mb().max(load_peak), "step_peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base_rss, "loss": last_loss})
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

/// What `factune bench infer` runs.
#[derive(Debug, clap::Args)]
pub struct InferOpts {
    /// Prompt tokens per sequence (the prefill)
    #[arg(long, default_value_t = 256)]
    pub prompt_len: usize,
    /// Tokens generated after the prompt, one forward each (the decode)
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// Timed repetitions of the whole prefill + decode (after one warm-up); the best is reported
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Hold the base's linear weights in bf16 (the merge is cast back to bf16; compute in f32)
    #[arg(long)]
    pub bf16: bool,
}

fn base_dtype(bf16: bool) -> candle_core::DType {
    if bf16 {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

/// Greedy generation with a merged LoRA adapter (r all-linear, random B so the merge changes every weight):
/// prefill tokens/s (one forward over the prompts, filling the KV cache) and decode tokens/s (one token per
/// sequence per forward, with the cache).
pub fn infer(model_dir: &Path, o: &InferOpts) -> Result<()> {
    anyhow::ensure!(
        o.reps >= 1 && o.prompt_len >= 1 && o.new_tokens >= 1 && o.batch >= 1,
        "--reps, --prompt-len, --new-tokens and --batch must each be at least 1 (the first run is a warm-up)"
    );
    let opts = factune_model::LoadOptions {
        base_dtype: base_dtype(o.bf16),
        ..Default::default()
    };
    let mut model = Model::load_with(model_dir, &Device::Cpu, opts)?;
    let cfg = AdapterConfig {
        r: o.r,
        lora_alpha: 2.0 * o.r as f64,
        target_modules: TargetModules::Pattern("all-linear".into()),
        init_lora_weights: serde_json::Value::Bool(false),
        ..AdapterConfig::default()
    };
    attach(&mut model, &cfg, 0)?;
    for l in model.linears_mut() {
        l.fold()?;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = model.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..o.batch * o.prompt_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let prompt = Tensor::from_vec(ids, (o.batch, o.prompt_len), &Device::Cpu)?;
    let (mut best_prefill, mut best_decode) = (f64::MAX, f64::MAX);
    let mut last = Vec::new();
    for rep in 0..=o.reps {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let hidden = model.forward_hidden(&prompt, Some(&mut cache), &Ctx::default())?;
        let mut next = greedy(&model, &hidden)?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut out = vec![next.to_vec2::<u32>()?];
        for _ in 1..o.new_tokens {
            let hidden = model.forward_hidden(&next, Some(&mut cache), &Ctx::default())?;
            next = greedy(&model, &hidden)?;
            out.push(next.to_vec2::<u32>()?);
        }
        let decode = t1.elapsed().as_secs_f64();
        if rep > 0 {
            best_prefill = best_prefill.min(prefill);
            best_decode = best_decode.min(decode);
        }
        last = out;
    }
    let first_seq: Vec<u32> = last.iter().map(|step| step[0][0]).collect();
    let (b, p, n) = (o.batch as f64, o.prompt_len as f64, o.new_tokens as f64);
    println!(
        "{}",
        serde_json::json!({"impl": "factune", "batch": o.batch, "prompt_len": o.prompt_len,
            "new_tokens": o.new_tokens, "r": o.r, "base_dtype": format!("{:?}", base_dtype(o.bf16)),
            "prefill_tokens_per_s": b * p / best_prefill,
            // the first new token comes with the prefill; the decode times the other n − 1 forwards
            "decode_tokens_per_s": b * (n - 1.0) / best_decode, "peak_rss_mb": peak_rss_mb(),
            "tokens": first_seq})
    );
    Ok(())
}

/// The argmax token of the last position's logits, `[B, 1]`.
fn greedy(model: &Model, hidden: &Tensor) -> Result<Tensor> {
    let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
    Ok(model
        .logits(&last)?
        .argmax(candle_core::D::Minus1)?
        .to_dtype(candle_core::DType::U32)?)
}

/// The sgemm peak probe: `[m, k] · [k, n]` f32 products through candle's matmul (the gemm path every factune
/// linear uses) at the 135M model's training shapes, best of `reps`; prints one JSON line.
pub fn peak(tokens: usize, reps: usize) -> Result<()> {
    let shapes = [
        (tokens, 576, 576),
        (tokens, 1536, 576),
        (tokens, 576, 1536),
        (tokens, 8192, 576),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut rand = |r: usize, c: usize| -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..r * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, (r, c), &Device::Cpu)
    };
    let mut rows = Vec::new();
    for (m, n, k) in shapes {
        let (a, w) = (rand(m, k)?, rand(n, k)?);
        let wt = w.t()?;
        let mut best = f64::MAX;
        for _ in 0..=reps {
            let t0 = Instant::now();
            let y = a.matmul(&wt)?;
            best = best.min(t0.elapsed().as_secs_f64());
            drop(y);
        }
        rows.push(serde_json::json!({"m": m, "n": n, "k": k,
            "gflops": 2.0 * (m * n * k) as f64 / best / 1e9}));
    }
    let peak = rows
        .iter()
        .filter_map(|r| r["gflops"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({"impl": "factune (candle gemm)", "threads": candle_core::utils::get_num_threads(), "shapes": rows, "peak_gflops": peak})
    );
    Ok(())
}
