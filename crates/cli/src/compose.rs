//! `factune merge-adapters`: several LoRA adapters combined into one PEFT-format adapter
//! (`factune_adapters::weighted`, PEFT's `add_weighted_adapter`).

use crate::commands::outside_model;
use anyhow::{bail, Result};
use candle_core::Device;
use factune_adapters::peft;
use factune_adapters::weighted::{self, Combination, MajoritySign, Weighting};
use factune_model::Model;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct MergeAdaptersArgs {
    /// The base model the adapters were trained on (their shapes are checked against it)
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// The LoRA adapter directories, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated, in the adapters' order (negative subtracts)
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        allow_negative_numbers = true
    )]
    pub weights: Vec<f64>,
    /// PEFT's combination_type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune, magnitude_prune_svd (PEFT's default: svd)
    #[arg(long, default_value = "svd")]
    pub combination: Combination,
    /// Fraction of entries kept by the ties, dare_* and magnitude_prune* types, in (0, 1]
    #[arg(long)]
    pub density: Option<f64>,
    /// How ties and dare_ties elect signs: total or frequency [default: total]
    #[arg(long)]
    pub majority_sign_method: Option<MajoritySign>,
    /// Rank of the svd types' result [default: the largest source rank]
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp the svd types' factors at this quantile of their entries, in [0, 1]
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// Seed of the dare types' random masks
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for the combined adapter (adapter_config.json + adapter_model.safetensors)
    #[arg(long)]
    pub output: PathBuf,
}

pub fn merge_adapters(args: &MergeAdaptersArgs) -> Result<()> {
    let spec = Weighting {
        combination: args.combination,
        weights: args.weights.clone(),
        density: args.density,
        majority_sign_method: args.majority_sign_method,
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        seed: args.seed,
    };
    spec.check(args.adapters.len())?;
    // everything checkable from the configs, before any weight is read
    let configs = args
        .adapters
        .iter()
        .map(|d| weighted::source_config(d))
        .collect::<factune_io::Result<Vec<_>>>()?;
    same_base(&args.adapters, &configs)?;
    outside_model(&args.output, &args.model)?;
    if let Some(a) = args.adapters.iter().find(|a| same_dir(a, &args.output)) {
        bail!(
            "--output {} is the source adapter {}: write the combination elsewhere",
            args.output.display(),
            a.display()
        );
    }
    if args.output.join(peft::CONFIG_FILE).exists() || args.output.join(peft::WEIGHTS_FILE).exists()
    {
        bail!(
            "--output {} already holds an adapter: choose another directory or remove it",
            args.output.display()
        );
    }
    let c = spec.effective(args.adapters.len());
    if c != args.combination {
        eprintln!(
            "one adapter: combined linearly (as PEFT does), not by {}",
            args.combination
        );
    }
    let mut model = Model::load(&args.model, &Device::Cpu)?;
    let mut sources = Vec::new();
    for (dir, cfg) in args.adapters.iter().zip(configs) {
        sources.push(weighted::read_source(&mut model, dir, cfg)?);
    }
    let combined = weighted::combine(&model, &sources, &spec)?;
    let (modules, rank, dora) = (
        combined.modules,
        combined.config.r,
        combined.config.use_dora,
    );
    std::fs::create_dir_all(&args.output).map_err(|e| factune_io::Error::io(&args.output, e))?;
    peft::write_built(&combined.config, combined.tensors, &args.output)?;
    // what was written loads back onto the base
    peft::load(&mut model, &args.output, false)?;
    println!(
        "combined {} adapters by {} (weights {}) into {}: {modules} modules, r = {rank}{}",
        args.adapters.len(),
        combined.combination,
        args.weights
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        args.output.display(),
        if dora {
            ", DoRA magnitudes ‖W‖ per row (as PEFT's)"
        } else {
            ""
        }
    );
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Adapters whose configs name different base models (by the last path component, so moved copies of one
/// base agree) are refused: their updates were learned against different weights.
fn same_base(dirs: &[PathBuf], configs: &[factune_adapters::AdapterConfig]) -> Result<()> {
    let name = |c: &factune_adapters::AdapterConfig| {
        c.base_model_name_or_path.as_deref().and_then(|p| {
            Path::new(p.trim_end_matches('/'))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
    };
    let named: Vec<(usize, String)> = configs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| name(c).map(|n| (i, n)))
        .collect();
    if let Some((i, n)) = named.iter().find(|(_, n)| *n != named[0].1) {
        bail!(
            "{} was trained on `{}` but {} on `{n}` (base_model_name_or_path): adapters combine only on the \
             base they were trained on",
            dirs[named[0].0].display(),
            named[0].1,
            dirs[*i].display()
        );
    }
    Ok(())
}
