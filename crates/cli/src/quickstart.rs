//! `factune quickstart`: fine-tunes the embedded default model with LoRA on the embedded question-answering
//! task (questions about things held out of training) and prints the before/after exact match and validation
//! perplexity.

use anyhow::{Context, Result};
use candle_core::Device;
use factune_eval::{exact_match, perplexity};
use factune_io::TextTokenizer;
use factune_model::Model;
use factune_train::config::Targets;
use factune_train::TrainConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn default_assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// The quickstart's LoRA run: every linear layer, rank 16.
pub fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        target_modules: Targets::One("all-linear".into()),
        learning_rate: 2e-3,
        warmup_steps: steps / 10,
        max_steps: steps as i64,
        micro_batch_size: 8,
        seq_len: 256,
        eval_steps: 50,
        validation_split: 0.0,
        ..TrainConfig::default()
    }
}

pub fn run(output: &Path, assets: Option<PathBuf>, steps: usize) -> Result<()> {
    let assets = assets.unwrap_or_else(default_assets);
    let model_dir = assets.join("default-model");
    let train = assets.join("data/quickstart-train.jsonl");
    let valid = assets.join("data/quickstart-valid.jsonl");
    let valid_data = factune_eval::EvalData::read(&valid)?;
    let t0 = Instant::now();
    let tok = TextTokenizer::from_dir(&model_dir).with_context(|| {
        "the embedded model is missing: run from the repository root or pass --assets"
    })?;
    let mut model = Model::load(&model_dir, &Device::Cpu)?;
    println!(
        "factune quickstart: LoRA on {} (embedded model), task: answer questions in the alpaca format",
        model_dir.display()
    );
    let before_em = exact_match(&model, &tok, valid_data.clone(), 8, 0)?;
    let before_ppl = perplexity(&model, &tok, valid_data.clone(), 256, 8)?;
    println!(
        "before: exact match {:.1}% on {} questions, validation perplexity {:.2}",
        100.0 * before_em.exact_match,
        before_em.n,
        before_ppl.perplexity
    );
    if let Some((_, want, got)) = before_em.samples.first() {
        println!(
            "  e.g. expected {want:?}, base model says {:?}",
            got.lines().next().unwrap_or("")
        );
    }
    // the quickstart owns its output directory: a rerun replaces the previous one
    factune_train::clear_run(output)?;
    let outcome = crate::commands::run_training(
        &mut model,
        &tok,
        config(steps),
        &train,
        output,
        (None, false),
    )?;
    let after_em = exact_match(&model, &tok, valid_data.clone(), 8, 0)?;
    let after_ppl = perplexity(&model, &tok, valid_data.clone(), 256, 8)?;
    println!(
        "after {} steps ({:.0}s): exact match {:.1}%, validation perplexity {:.2}",
        outcome.steps,
        outcome.seconds,
        100.0 * after_em.exact_match,
        after_ppl.perplexity
    );
    println!();
    println!("| metric | before | after |");
    println!("|---|---|---|");
    println!(
        "| exact match | {:.1}% | {:.1}% |",
        100.0 * before_em.exact_match,
        100.0 * after_em.exact_match
    );
    println!(
        "| validation perplexity | {:.2} | {:.2} |",
        before_ppl.perplexity, after_ppl.perplexity
    );
    println!();
    if let Some((prompt, want, got)) = after_em.samples.first() {
        println!(
            "sample (validation):\n{prompt}{}\n(expected: {want})",
            got.trim_end()
        );
    }
    println!(
        "\nadapter (PEFT format) in {}; metrics.jsonl and loss.png beside it. Total time {:.0}s.",
        output.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
