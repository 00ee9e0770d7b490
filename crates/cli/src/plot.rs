//! PNG plots: a run's loss curves, the spectrum of a full-model run's update, and metric comparisons across
//! runs. The libraries write the numbers (metrics.jsonl, update_spectrum.json); drawing them is the CLI's job.

use factune_io::{Error, Result};
use factune_train::metrics::series;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// A finished run's plots: `loss.png` from its metrics, and `update_spectrum.png` when the run wrote
/// `update_spectrum.json` (it changed the base model).
pub fn run_plots(out: &Path) -> Result<()> {
    let metrics = out.join("metrics.jsonl");
    plot_curves(
        &out.join("loss.png"),
        "factune training loss",
        &LOSS_AXES,
        &[
            ("train loss", series(&metrics, "loss")?),
            ("validation loss", series(&metrics, "val_loss")?),
        ],
    )?;
    let stream = out.join(factune_train::trainer::STREAM_FILE);
    if stream.exists() {
        stream_plot(&stream, &out.join("stream.png"))?;
    }
    let spectrum = out.join("update_spectrum.json");
    if spectrum.exists() {
        spectrum_plot(
            &spectrum,
            &out.join("update_spectrum.png"),
            "spectrum of W - W0, mean over layers",
        )?;
    }
    Ok(())
}

/// An Online-LoRA run's held-out accuracy of every stream segment, each time a segment ended.
fn stream_plot(json: &Path, png: &Path) -> Result<()> {
    let doc: Value = factune_io::error::read_json(json)?;
    let names: Vec<String> = doc["segments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let n = n.as_str().unwrap_or_default();
            Path::new(n)
                .file_name()
                .map_or(n.to_string(), |f| f.to_string_lossy().into_owned())
        })
        .collect();
    let rows = doc["matrix"].as_array().cloned().unwrap_or_default();
    let curves: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let pts = rows
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r["accuracy"][i].as_f64()?)))
                .collect();
            (format!("segment {}: {n}", i + 1), pts)
        })
        .collect();
    let curves: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(n, c)| (n.as_str(), c.clone()))
        .collect();
    plot_curves(
        png,
        &format!(
            "held-out accuracy along the stream (average {:.3}, forgetting {})",
            doc["average_accuracy"].as_f64().unwrap_or(f64::NAN),
            doc["forgetting"]
                .as_f64()
                .map_or("n/a".into(), |f| format!("{f:.3}"))
        ),
        &Axes {
            x: "step (a segment ended)",
            y: "next-token accuracy",
        },
        &curves,
    )
}

/// σᵢ/σ₁ on a log scale, averaged over layers per module kind (`q_proj`, `down_proj`, …), from a spectra file
/// (`factune_model::spectrum::spectra_json`).
pub fn spectrum_plot(json: &Path, png: &Path, title: &str) -> Result<()> {
    let doc: Value = factune_io::error::read_json(json)?;
    let mut by_kind: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for m in doc["modules"].as_array().into_iter().flatten() {
        let module = m["module"].as_str().unwrap_or_default();
        let kind = module.rsplit('.').next().unwrap_or(module).to_string();
        let sv: Vec<f64> = m["singular_values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        if !sv.is_empty() {
            by_kind.entry(kind).or_default().push(sv);
        }
    }
    let curves: Vec<(&str, Vec<(f64, f64)>)> = by_kind
        .iter()
        .map(|(kind, ss)| {
            let n = ss.iter().map(Vec::len).min().unwrap_or(0);
            let pts = (0..n)
                .map(|i| {
                    let mean = ss
                        .iter()
                        .map(|s| {
                            let top = s[0].max(f64::MIN_POSITIVE);
                            (s[i] / top).max(1e-12).log10()
                        })
                        .sum::<f64>()
                        / ss.len() as f64;
                    ((i + 1) as f64, mean)
                })
                .collect();
            (kind.as_str(), pts)
        })
        .collect();
    plot_curves(
        png,
        title,
        &Axes {
            x: "singular value index i",
            y: "log10(s_i / s_1)",
        },
        &curves,
    )
}

/// DejaVu Sans, shipped in assets/ (Bitstream Vera licence), so plots render without system fonts.
static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Axis names of a plot.
pub struct Axes<'a> {
    pub x: &'a str,
    pub y: &'a str,
}

pub const LOSS_AXES: Axes<'static> = Axes {
    x: "step",
    y: "loss",
};

/// Plots named curves (x → y) into a PNG.
pub fn plot_curves(
    path: &Path,
    title: &str,
    axes: &Axes<'_>,
    curves: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let pts = curves.iter().flat_map(|(_, c)| c.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            if y.is_finite() {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .draw()?;
        for (i, (name, c)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).mix(0.9);
            chart
                .draw_series(LineSeries::new(c.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            // Markers too: a curve with a single point (one validation) has no line to draw.
            chart.draw_series(c.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::invalid(path, format!("cannot draw plot: {e}")))
}

/// One PNG comparing a metric across runs: each `LABEL=RUN_DIR` (or a bare directory, labelled by its name)
/// contributes the `key` series of its metrics.jsonl; `exp` plots e^value (perplexity from a loss).
pub fn plot(
    runs: &[String],
    key: &str,
    exp: bool,
    title: &str,
    output: &Path,
) -> anyhow::Result<()> {
    let mut curves = Vec::new();
    for spec in runs {
        let (label, dir) = match spec.split_once('=') {
            Some((l, d)) => (l.to_string(), std::path::PathBuf::from(d)),
            None => {
                let d = std::path::PathBuf::from(spec);
                let name = d
                    .file_name()
                    .map_or(spec.clone(), |n| n.to_string_lossy().into_owned());
                (name, d)
            }
        };
        let path = dir.join("metrics.jsonl");
        let mut pts = series(&path, key)?;
        if pts.is_empty() {
            anyhow::bail!("{}: no `{key}` values", path.display());
        }
        if exp {
            pts.iter_mut().for_each(|p| p.1 = p.1.exp());
        }
        curves.push((label, pts));
    }
    let refs: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(l, c)| (l.as_str(), c.clone()))
        .collect();
    let y = if exp {
        format!("exp({key})")
    } else {
        key.to_string()
    };
    let axes = Axes { x: "step", y: &y };
    plot_curves(output, title, &axes, &refs)?;
    println!("wrote {}", output.display());
    Ok(())
}
