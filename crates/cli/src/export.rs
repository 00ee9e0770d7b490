//! `factune merge` and `factune quantize`: writing a model out — an adapter merged into its base (checked
//! against the unmerged model with `--verify`), or the base in 4-bit NF4.

use crate::commands::{load_model, outside_model};
use crate::ModelArgs;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use factune_adapters::peft;
use factune_io::Weights;
use factune_model::{Ctx, Model, Nf4Options};
use std::path::Path;

fn probe_ids(model: &Model) -> Result<Tensor> {
    let v = model.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 7919 + 11) % v).collect();
    Ok(Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?)
}

pub fn merge(args: &ModelArgs, output: &Path, verify: bool) -> Result<()> {
    if args.adapter()?.is_none() {
        bail!("merge needs --adapter");
    }
    outside_model(output, &args.model)?;
    let mut model = load_model(args)?;
    if let Some(p) = &model.prompt {
        bail!(
            "{} adds {} virtual tokens and changes no weight: there is nothing to merge; use the adapter as \
             --adapter with eval and generate (or PEFT's PeftModel.from_pretrained)",
            p.method(),
            p.num_virtual_tokens()
        );
    }
    let before = if verify {
        Some(model.forward(&probe_ids(&model)?, None, &Ctx::default())?)
    } else {
        None
    };
    // Held in 4 bits: every weight is written as the dequantised one the adapter was trained on.
    let quantized = !model.quantized_keys().is_empty();
    let mut merged = 0;
    for l in model.linears_mut() {
        if l.fold()?.is_some() {
            merged += 1;
        }
    }
    if merged == 0 {
        bail!(
            "no module was merged: the adapter matched no layer of {}",
            args.model.display()
        );
    }
    let weights = Weights::from_model_dir(&args.model)?;
    let into = if quantized {
        "into the 4-bit base as trained: deq(Q) + s·BA in f32, written dense in f32"
    } else {
        "W + s·BA in f32, cast once to the stored dtype"
    };
    if quantized {
        factune_model::save::save_pretrained(&model, output, candle_core::DType::F32, &args.model)?;
    } else {
        factune_model::save::save_merged(&model, &weights, output)?;
    }
    println!("merged {merged} modules ({into}) into {}", output.display());
    if let Some(before) = before {
        let reloaded = Model::load(output, &model.device)?;
        let after = reloaded.forward(&probe_ids(&reloaded)?, None, &Ctx::default())?;
        let d = (after - before)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        println!("verify: max |logits(merged) - logits(base + adapter)| = {d:.3e}");
    }
    Ok(())
}

pub fn quantize(dir: &Path, output: &Path, double_quant: bool) -> Result<()> {
    outside_model(output, dir)?;
    let t0 = std::time::Instant::now();
    let model = Model::load_with(dir, &Device::Cpu, Some(Nf4Options { double_quant }))?;
    let weights = Weights::from_model_dir(dir)?;
    let dense_bytes: usize = model
        .linears()
        .iter()
        .filter_map(|l| weights.info(&l.source_key))
        .map(|(shape, dt)| shape.iter().product::<usize>() * dt.bitsize() / 8)
        .sum();
    factune_model::save::save_quantized(&model, &weights, output)?;
    let (mut bits, mut params) = (0.0, 0usize);
    for l in model.linears() {
        if let Some(q) = l.base.weight.as_nf() {
            bits += q.bits_per_param() * (q.rows * q.cols) as f64;
            params += q.rows * q.cols;
        }
    }
    println!(
        "quantised {} linear weights ({} parameters) to NF4{}: {:.3} bits per weight, {:.1} MB -> {:.1} MB \
         in {:.1}s; embeddings, norms and the LM head kept as stored; written to {}",
        model.quantized_keys().len(),
        peft::thousands(params),
        if double_quant { " with double-quantised scales" } else { "" },
        bits / params.max(1) as f64,
        dense_bytes as f64 / 1e6,
        model.linear_weight_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}
