//! Reports on what training did to the weights: the per-layer spectrum of the total update `W − W₀`, whose
//! rank shows whether a run of low-rank updates (ReLoRA) built a higher-rank change.

use factune_io::{atomic, Error, Result};
use factune_model::spectrum::{spectra_json, Spectrum};
use std::path::Path;

/// Relative tolerance of the reported rank: f32 rounding of `W − W₀` sits near 1e-7 · σ₁.
pub const RANK_TOL: f64 = 1e-4;

/// Writes `update_spectrum.json` ([`spectra_json`]) and returns a one-line summary (none when no layer changed).
pub fn write_update_spectra(
    out: &Path,
    spectra: &[(String, Spectrum)],
    r: usize,
) -> Result<Option<String>> {
    if spectra.is_empty() {
        return Ok(None);
    }
    let doc = spectra_json(spectra, r, RANK_TOL);
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::config(e.to_string()))?;
    atomic::write_atomic(&out.join("update_spectrum.json"), text.as_bytes())?;

    let mut ranks: Vec<usize> = spectra.iter().map(|(_, s)| s.rank(RANK_TOL)).collect();
    ranks.sort_unstable();
    Ok(Some(format!(
        "update W - W0 over {} linear layers: rank min {} / median {} / max {} (adapter r = {r}; see update_spectrum.json)",
        ranks.len(),
        ranks[0],
        ranks[ranks.len() / 2],
        ranks[ranks.len() - 1]
    )))
}
