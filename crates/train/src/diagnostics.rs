//! Reports on what training did to the weights: the per-layer spectrum of the total update `W − W₀` (JSON and
//! PNG), whose rank shows whether a run of low-rank updates (ReLoRA) built a higher-rank change.

use crate::metrics::{plot_curves, Axes};
use factune_io::{atomic, Error, Result};
use factune_model::spectrum::Spectrum;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Relative tolerance of the reported rank: f32 rounding of `W − W₀` sits near 1e-7 · σ₁.
pub const RANK_TOL: f64 = 1e-4;

/// Writes `update_spectrum.json` (per module: rank, effective rank, energy in the top `r` directions, all
/// singular values) and `update_spectrum.png` (σᵢ/σ₁ on a log scale, averaged over layers per module kind),
/// and prints a one-line summary.
pub fn write_update_spectra(out: &Path, spectra: &[(String, Spectrum)], r: usize) -> Result<()> {
    if spectra.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = spectra
        .iter()
        .map(|(module, s)| {
            json!({
                "module": module,
                "rank": s.rank(RANK_TOL),
                "effective_rank": s.effective_rank(),
                "energy_in_top_r": s.energy_in_top(r),
                "singular_values": s.singular_values,
            })
        })
        .collect();
    let doc = json!({"rank_rel_tol": RANK_TOL, "adapter_r": r, "modules": rows});
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::config(e.to_string()))?;
    atomic::write_atomic(&out.join("update_spectrum.json"), text.as_bytes())?;

    let mut by_kind: BTreeMap<&str, Vec<&Spectrum>> = BTreeMap::new();
    for (module, s) in spectra {
        let kind = module.rsplit('.').next().unwrap_or(module);
        by_kind.entry(kind).or_default().push(s);
    }
    let curves: Vec<(&str, Vec<(f64, f64)>)> = by_kind
        .iter()
        .map(|(kind, ss)| {
            let n = ss
                .iter()
                .map(|s| s.singular_values.len())
                .min()
                .unwrap_or(0);
            let pts = (0..n)
                .map(|i| {
                    let mean = ss
                        .iter()
                        .map(|s| {
                            let top = s.singular_values[0].max(f64::MIN_POSITIVE);
                            (s.singular_values[i] / top).max(1e-12).log10()
                        })
                        .sum::<f64>()
                        / ss.len() as f64;
                    ((i + 1) as f64, mean)
                })
                .collect();
            (*kind, pts)
        })
        .collect();
    plot_curves(
        &out.join("update_spectrum.png"),
        "spectrum of W - W0, mean over layers",
        &Axes {
            x: "singular value index i",
            y: "log10(s_i / s_1)",
        },
        &curves,
    )?;

    let mut ranks: Vec<usize> = spectra.iter().map(|(_, s)| s.rank(RANK_TOL)).collect();
    ranks.sort_unstable();
    eprintln!(
        "update W - W0 over {} linear layers: rank min {} / median {} / max {} (adapter r = {r}; see update_spectrum.json)",
        ranks.len(),
        ranks[0],
        ranks[ranks.len() / 2],
        ranks[ranks.len() - 1]
    );
    Ok(())
}
