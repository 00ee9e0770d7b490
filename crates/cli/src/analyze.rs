//! `factune analyze`: what fine-tuning did to the weights — the spectrum of every update ΔW and the tuned
//! weights' intruder dimensions (with PEFT's reduction of them), for an adapter on its base or a fully tuned
//! model beside its base (`factune_adapters::analysis`); and a task's intrinsic dimension (`said`).

use crate::commands::outside_model;
use crate::plot::{plot_curves, spectrum_plot, Axes};
use anyhow::{bail, Result};
use candle_core::Device;
use factune_adapters::analysis::{self, LayerPair};
use factune_adapters::{peft, AdapterConfig};
use factune_io::atomic;
use factune_model::intruders::LayerIntruders;
use factune_model::Model;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum AnalyzeCommand {
    /// Singular values of every update ΔW (effective rank, energy at ranks 1..r): spectrum.json + .png
    Spectrum(Box<SpectrumArgs>),
    /// Intruder dimensions (Shuttleworth et al. 2024): top singular vectors of the tuned weights unlike any
    /// pre-trained one; with --reduce λ, a copy with them scaled down (PEFT's reduce_intruder_dimension)
    Intruders(Box<IntrudersArgs>),
    /// SAID intrinsic dimension (Aghajanyan et al. 2021): a full fine-tune, then only a d-dimensional θ
    /// projected into the weights for each d; d90 is the smallest reaching 90% of the full accuracy
    Said(Box<crate::said::SaidArgs>),
}

/// What was tuned: an adapter for `--model`, or a fully tuned model of the same architecture.
#[derive(clap::Args)]
pub struct TunedArgs {
    /// The pre-trained model
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// A PEFT-format adapter directory trained on --model, or a fully tuned model directory of the same
    /// architecture
    #[arg(long, alias = "adapter")]
    pub tuned: PathBuf,
    /// Directory for the report (JSON + PNG)
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(clap::Args)]
pub struct SpectrumArgs {
    #[command(flatten)]
    pub tuned: TunedArgs,
    /// Energy (share of ‖ΔW‖²) reported at ranks 1..N [default: the adapter's r, else 16]
    #[arg(long)]
    pub ranks: Option<usize>,
}

#[derive(clap::Args)]
pub struct IntrudersArgs {
    #[command(flatten)]
    pub tuned: TunedArgs,
    /// How many of the tuned weight's top singular vectors are examined per layer
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// A vector is an intruder when its largest |cos| with every pre-trained singular vector is below this
    #[arg(long, default_value_t = 0.5)]
    pub epsilon: f64,
    /// Also count intruders at ε = 0.05, 0.10, …, 0.95 and plot the counts (intruders-sweep.png)
    #[arg(long)]
    pub sweep: bool,
    /// Write a copy into --output with each intruder's singular value scaled by λ (PEFT's
    /// mitigation_lambda; 0.75 there): a LoRA adapter stays a LoRA adapter of its rank, a model a model
    #[arg(long)]
    pub reduce: Option<f64>,
}

/// What holds the tuned weights (for a reduction): the base with the adapter, or the tuned model.
enum Loaded {
    Adapter(Model, Box<AdapterConfig>),
    Full(Model),
}

impl Loaded {
    fn read(a: &TunedArgs) -> Result<(Loaded, Vec<LayerPair>)> {
        outside_model(&a.output, &a.model)?;
        outside_model(&a.output, &a.tuned)?;
        let dev = Device::Cpu;
        if a.tuned.join(peft::CONFIG_FILE).exists() {
            let mut model = Model::load(&a.model, &dev)?;
            let (cfg, report) = peft::load(&mut model, &a.tuned, false)?;
            eprintln!(
                "adapter {} ({}): {report}",
                a.tuned.display(),
                cfg.peft_type()
            );
            let pairs = analysis::adapter_pairs(&model)?;
            Ok((Loaded::Adapter(model, Box::new(cfg)), pairs))
        } else if a.tuned.join("config.json").exists() {
            let base = Model::load(&a.model, &dev)?;
            let tuned = Model::load(&a.tuned, &dev)?;
            let pairs = analysis::model_pairs(&base, &tuned)?;
            Ok((Loaded::Full(tuned), pairs))
        } else {
            bail!(
                "--tuned {}: neither an adapter ({}) nor a model directory (config.json)",
                a.tuned.display(),
                peft::CONFIG_FILE
            )
        }
    }
}

fn write_json(path: &Path, doc: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(doc)?;
    atomic::write_atomic(path, text.as_bytes())?;
    Ok(())
}

pub fn run(cmd: &AnalyzeCommand) -> Result<()> {
    match cmd {
        AnalyzeCommand::Spectrum(a) => spectrum(a),
        AnalyzeCommand::Intruders(a) => intruders(a),
        AnalyzeCommand::Said(a) => crate::said::said(a),
    }
}

/// Relative tolerance of the reported rank (as the training report's).
const RANK_TOL: f64 = factune_train::diagnostics::RANK_TOL;

fn spectrum(a: &SpectrumArgs) -> Result<()> {
    let (loaded, pairs) = Loaded::read(&a.tuned)?;
    let t0 = Instant::now();
    let spectra = analysis::spectra(&pairs)?;
    let r = a.ranks.unwrap_or(match &loaded {
        Loaded::Adapter(_, c) => c.r,
        Loaded::Full(_) => 16,
    });
    std::fs::create_dir_all(&a.tuned.output)?;
    let json_path = a.tuned.output.join("spectrum.json");
    write_json(
        &json_path,
        &factune_model::spectrum::spectra_json(&spectra, r, RANK_TOL),
    )?;
    spectrum_plot(
        &json_path,
        &a.tuned.output.join("spectrum.png"),
        "spectrum of the update, mean over layers",
    )?;
    let mut eff: Vec<f64> = spectra.iter().map(|(_, s)| s.effective_rank()).collect();
    eff.sort_by(f64::total_cmp);
    let energy: f64 =
        spectra.iter().map(|(_, s)| s.energy_in_top(r)).sum::<f64>() / spectra.len() as f64;
    println!(
        "{} updated layers in {:.1}s: effective rank min {:.2} / median {:.2} / max {:.2}; mean energy in the top {r} \
         directions {:.4}; spectrum.json and spectrum.png in {}",
        spectra.len(),
        t0.elapsed().as_secs_f64(),
        eff[0],
        eff[eff.len() / 2],
        eff[eff.len() - 1],
        energy,
        a.tuned.output.display()
    );
    Ok(())
}

/// The ε values of `--sweep`.
fn sweep_points() -> Vec<f64> {
    (1..20).map(|i| i as f64 * 0.05).collect()
}

fn intruders(a: &IntrudersArgs) -> Result<()> {
    if a.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if !(a.epsilon > 0.0 && a.epsilon <= 1.0) {
        bail!(
            "--epsilon {} is outside (0, 1]: it bounds an absolute cosine similarity",
            a.epsilon
        );
    }
    if let Some(l) = a.reduce {
        if !(0.0..=1.0).contains(&l) {
            bail!("--reduce {l} is outside [0, 1]: it scales the intruders' singular values (1 keeps them, 0 removes them)");
        }
    }
    let (mut loaded, pairs) = Loaded::read(&a.tuned)?;
    let out = &a.tuned.output;
    let t0 = Instant::now();
    let found = analysis::intruders(&pairs, a.top_k)?;
    let secs = t0.elapsed().as_secs_f64();
    std::fs::create_dir_all(out)?;
    let total = |eps: f64| found.iter().map(|l| l.intruders(eps).len()).sum::<usize>();
    let layers: Vec<_> = pairs
        .iter()
        .zip(&found)
        .map(|(p, l)| {
            json!({
                "module": p.module,
                "intruders": l.intruders(a.epsilon).len(),
                "similarity": l.similarity,
                "singular_values": l.singular_values,
            })
        })
        .collect();
    let sweep: Vec<_> = sweep_points()
        .into_iter()
        .map(|e| json!({"epsilon": e, "intruders": total(e)}))
        .collect();
    let mut doc = json!({
        "top_k": a.top_k, "epsilon": a.epsilon, "intruders": total(a.epsilon),
        "layers_with_intruders": found.iter().filter(|l| !l.intruders(a.epsilon).is_empty()).count(),
        "layers": layers, "sweep": sweep,
    });
    plot_layers(&pairs, &found, a.epsilon, &out.join("intruders.png"))?;
    if a.sweep {
        let pts: Vec<(f64, f64)> = sweep_points()
            .into_iter()
            .map(|e| (e, total(e) as f64))
            .collect();
        plot_curves(
            &out.join("intruders-sweep.png"),
            &format!(
                "intruder dimensions among the top {} per layer, {} layers",
                a.top_k,
                pairs.len()
            ),
            &Axes {
                x: "epsilon (cosine threshold)",
                y: "intruders, all layers",
            },
            &[("intruders", pts)],
        )?;
    }
    let mut note = String::new();
    if let Some(lambda) = a.reduce {
        let changed = match &mut loaded {
            Loaded::Adapter(model, cfg) => {
                let n = analysis::reduce_lora(model, &found, &pairs, a.epsilon, lambda)?;
                peft::save(model, cfg, out)?;
                n
            }
            Loaded::Full(tuned) => {
                let n = analysis::reduce_model(tuned, &found, &pairs, a.epsilon, lambda)?;
                let src = factune_io::Weights::from_model_dir(&tuned.dir)?;
                factune_model::save::save_merged(tuned, &src, out)?;
                n
            }
        };
        doc["reduced"] = json!({"lambda": lambda, "layers_changed": changed});
        note = format!(
            "; the copy with intruders scaled by {lambda} ({changed} layers changed) is in {}",
            out.display()
        );
    }
    write_json(&out.join("intruders.json"), &doc)?;
    println!(
        "{} intruder dimensions (top {}, ε = {}) in {} of {} layers, {:.1}s; intruders.json and intruders.png in {}{note}",
        total(a.epsilon),
        a.top_k,
        a.epsilon,
        doc["layers_with_intruders"],
        pairs.len(),
        secs,
        out.display()
    );
    Ok(())
}

/// Intruders per layer at `epsilon`, one curve per module kind (`q_proj`, …) over the layer index.
fn plot_layers(
    pairs: &[LayerPair],
    found: &[LayerIntruders],
    epsilon: f64,
    png: &Path,
) -> Result<()> {
    let mut kinds: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for (i, (p, l)) in pairs.iter().zip(found).enumerate() {
        let kind = p.module.rsplit('.').next().unwrap_or(&p.module).to_string();
        let layer = p
            .module
            .split('.')
            .find_map(|s| s.parse::<f64>().ok())
            .unwrap_or(i as f64);
        kinds
            .entry(kind)
            .or_default()
            .push((layer, l.intruders(epsilon).len() as f64));
    }
    let curves: Vec<(&str, Vec<(f64, f64)>)> =
        kinds.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    plot_curves(
        png,
        &format!("intruder dimensions per layer (epsilon = {epsilon})"),
        &Axes {
            x: "layer",
            y: "intruders",
        },
        &curves,
    )?;
    Ok(())
}
