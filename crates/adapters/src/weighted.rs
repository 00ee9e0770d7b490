//! Several LoRA adapters combined into one, as PEFT's `add_weighted_adapter` does it (PEFT 0.21.2,
//! `tuners/lora/model.py` and `utils/merge_utils.py`), so a combination made here loads in PEFT with the
//! numbers PEFT's own gives.
//!
//! The combination types fall into PEFT's three paths:
//! - `cat` stacks `wᵢsᵢAᵢ` and `Bᵢ` (`sᵢ` adapter i's scaling): exact, the product is `Σ wᵢsᵢBᵢAᵢ`, and the rank
//!   is the sum of the ranks.
//! - On the factors (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): the A's and the B's are
//!   reduced separately, adapter i's A weighted by `sign(wᵢsᵢ)·√|wᵢsᵢ|` and its B by `√|wᵢsᵢ|`. Equal ranks are
//!   needed, and the product carries cross terms `BᵢAⱼ`: that is PEFT's definition, kept.
//! - On the products (`svd` and the `*_svd` types): `ΔWᵢ = sᵢBᵢAᵢ` reduced with weights `wᵢ`, then re-factored by
//!   a truncated SVD to `svd_rank` (default: the largest source rank), `B = U·diag(S)`, `A = Vᵀ`, optionally
//!   clamped at the `svd_clamp` quantile of their entries.
//!
//! The reductions (PEFT's `merge_utils`): a weighted sum; TIES (keep each tensor's largest `density` share by
//! magnitude, elect a sign per entry from the sum or the count of the pruned tensors' signs, average the
//! weighted entries that agree with it); DARE (keep each entry with probability `density` and divide by
//! `density`, from a seeded generator: PEFT's masks come from torch's generator and cannot be reproduced);
//! magnitude pruning followed by the weighted sum.
//!
//! The result has `lora_alpha = r` (scaling 1) and rsLoRA off: PEFT 0.21.2 keeps the first source's
//! `use_rslora`, which scales the combined update by √r (fixed in PEFT after 0.21.2, as here). For DoRA
//! sources the combined adapter's magnitudes are a fresh DoRA adapter's, ‖W‖ per row: PEFT injects the new
//! adapter and overwrites only its A and B, so the sources' magnitudes do not enter.

use crate::config::{AdapterConfig, RankEntry, TargetModules};
use crate::dora::Dora;
use crate::lora::Lora;
use crate::peft::{self, CONFIG_FILE, KEY_PREFIX};
use crate::targets::TargetMatcher;
use candle_core::{Tensor, Var};
use factune_io::{Error, Result};
use factune_model::linalg;
use factune_model::Model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

factune_io::choice! {
    /// PEFT's `combination_type`.
    pub enum Combination for "combination_type" {
        Linear = "linear",
        Cat = "cat",
        Svd = "svd",
        Ties = "ties",
        TiesSvd = "ties_svd",
        DareLinear = "dare_linear",
        DareTies = "dare_ties",
        DareLinearSvd = "dare_linear_svd",
        DareTiesSvd = "dare_ties_svd",
        MagnitudePrune = "magnitude_prune",
        MagnitudePruneSvd = "magnitude_prune_svd",
    }
}

factune_io::choice! {
    /// How TIES elects the sign of an entry: the sign of the sum of the entries (`total`) or of the count of
    /// positive minus negative entries (`frequency`).
    pub enum MajoritySign for "majority_sign_method" {
        Total = "total",
        Frequency = "frequency",
    }
}

/// How a list of tensors (one per adapter) becomes one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduce {
    Sum,
    Ties,
    Dare,
    DareTies,
    Prune,
}

impl Combination {
    /// `None` for `cat`, which stacks instead of reducing.
    fn reduce(self) -> Option<Reduce> {
        use Combination::*;
        Some(match self {
            Cat => return None,
            Linear | Svd => Reduce::Sum,
            Ties | TiesSvd => Reduce::Ties,
            DareLinear | DareLinearSvd => Reduce::Dare,
            DareTies | DareTiesSvd => Reduce::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Reduce::Prune,
        })
    }

    fn on_products(self) -> bool {
        self.as_str().ends_with("svd")
    }

    fn prunes(self) -> bool {
        !matches!(self.reduce(), None | Some(Reduce::Sum))
    }

    fn elects_sign(self) -> bool {
        matches!(self.reduce(), Some(Reduce::Ties | Reduce::DareTies))
    }
}

/// What to combine and how: PEFT's `add_weighted_adapter` arguments.
#[derive(Debug, Clone)]
pub struct Weighting {
    pub combination: Combination,
    /// One per adapter; negative subtracts.
    pub weights: Vec<f64>,
    /// The fraction of entries kept by the pruning types, in (0, 1].
    pub density: Option<f64>,
    pub majority_sign_method: Option<MajoritySign>,
    pub svd_rank: Option<usize>,
    /// Quantile of the re-factored entries at which they are clamped (`svd_clamp`), in [0, 1].
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's random masks.
    pub seed: u64,
}

impl Weighting {
    /// The combination applied to `adapters` sources: PEFT merges a single adapter linearly whatever the type.
    pub fn effective(&self, adapters: usize) -> Combination {
        if adapters == 1 {
            Combination::Linear
        } else {
            self.combination
        }
    }

    /// Every argument against the others, before anything is read.
    pub fn check(&self, adapters: usize) -> Result<()> {
        let c = self.combination;
        let bad = |m: String| Err(Error::config(m));
        if adapters == 0 {
            return bad("no adapters to combine".into());
        }
        if self.weights.len() != adapters {
            return bad(format!(
                "{} weights for {adapters} adapters: give one weight per adapter, in the adapters' order",
                self.weights.len()
            ));
        }
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite()) {
            return bad(format!("weight {w}: expected a finite number"));
        }
        match (c.prunes(), self.density) {
            (true, None) => {
                return bad(format!(
                    "combination_type {c} needs `density` (the fraction of entries kept, in (0, 1])"
                ))
            }
            (true, Some(d)) if !(d > 0.0 && d <= 1.0) => {
                return bad(format!("density {d}: expected a value in (0, 1]"))
            }
            (false, Some(_)) => {
                return bad(format!(
                    "`density` is used by the ties, dare_* and magnitude_prune* types, not by {c}"
                ))
            }
            _ => {}
        }
        if self.majority_sign_method.is_some() && !c.elects_sign() {
            return bad(format!(
                "`majority_sign_method` is used by ties, ties_svd, dare_ties and dare_ties_svd, not by {c}"
            ));
        }
        if !c.on_products() && (self.svd_rank.is_some() || self.svd_clamp.is_some()) {
            return bad(format!(
                "`svd_rank` and `svd_clamp` are used by svd and the *_svd types, not by {c}"
            ));
        }
        if self.svd_rank == Some(0) {
            return bad("svd_rank 0: expected at least 1".into());
        }
        if let Some(q) = self.svd_clamp.filter(|q| !(0.0..=1.0).contains(q)) {
            return bad(format!("svd_clamp {q}: expected a quantile in [0, 1]"));
        }
        Ok(())
    }
}

/// One source adapter's factors, by module path.
pub struct Source {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub layers: BTreeMap<String, Factors>,
}

pub struct Factors {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scaling: f64,
}

/// A source's config, refused when the adapter cannot be combined (checked before any weight is read).
pub fn source_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let cfg = AdapterConfig::from_file(&path)?;
    if cfg.peft_type() != "LORA" {
        return Err(Error::invalid(
            &path,
            format!(
                "a {} adapter: only LoRA adapters (LORA, with rsLoRA or DoRA) combine, as in PEFT's \
                 add_weighted_adapter",
                cfg.peft_type()
            ),
        ));
    }
    if cfg.init_reads_base() {
        return Err(Error::invalid(
            &path,
            format!(
                "init_lora_weights = {}: the adapter is relative to a rewritten base; save it as a plain LoRA \
                 first (factune train writes that form as the final adapter)",
                cfg.init_lora_weights
            ),
        ));
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(Error::invalid(
            &path,
            "modules_to_save: whole-module copies do not combine",
        ));
    }
    Ok(cfg)
}

/// Reads the adapter in `dir` through the model (so its shapes are checked against the base), then takes it
/// off again.
pub fn read_source(model: &mut Model, dir: &Path, config: AdapterConfig) -> Result<Source> {
    peft::load(model, dir, false)?;
    let mut layers = BTreeMap::new();
    for l in model.linears() {
        let Some(adapter) = &l.adapter else { continue };
        let params: BTreeMap<String, Var> = adapter.parameters().into_iter().collect();
        let factor = |name: &str| {
            params
                .get(name)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| {
                    Error::config(format!("{}: {} has no {name}", dir.display(), l.path))
                })
        };
        let scaling = config.scaling(config.rank_for(&l.path), config.alpha_for(&l.path));
        layers.insert(
            l.path.clone(),
            Factors {
                a: factor("lora_A.weight")?,
                b: factor("lora_B.weight")?,
                scaling,
            },
        );
    }
    peft::detach(model);
    Ok(Source {
        dir: dir.to_path_buf(),
        config,
        layers,
    })
}

/// PEFT's rank of a source: the largest of `r` and its `rank_pattern`.
fn source_rank(cfg: &AdapterConfig) -> usize {
    cfg.rank_pattern
        .values()
        .map(RankEntry::rank)
        .fold(cfg.r, usize::max)
}

/// The combined adapter: its config and tensors (PEFT keys), ready to write.
pub struct Combined {
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, Tensor>,
    pub combination: Combination,
    pub modules: usize,
}

/// The rank of the combined adapter, or why the sources cannot be combined this way.
fn combined_rank(sources: &[Source], c: Combination, svd_rank: Option<usize>) -> Result<usize> {
    let ranks: Vec<usize> = sources.iter().map(|s| source_rank(&s.config)).collect();
    Ok(match c {
        Combination::Cat => ranks.iter().sum(),
        _ if c.on_products() => {
            svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0))
        }
        _ => {
            if let Some(i) = ranks.iter().position(|&r| r != ranks[0]) {
                return Err(Error::config(format!(
                    "combination_type {c} needs adapters of one rank: {} has r = {}, {} has r = {} (cat, svd \
                     and the *_svd types take different ranks)",
                    sources[0].dir.display(),
                    ranks[0],
                    sources[i].dir.display(),
                    ranks[i]
                )));
            }
            ranks[0]
        }
    })
}

/// Combines `sources` (read on `model`) as `spec` says.
pub fn combine(model: &Model, sources: &[Source], spec: &Weighting) -> Result<Combined> {
    spec.check(sources.len())?;
    let c = spec.effective(sources.len());
    let rank = combined_rank(sources, c, spec.svd_rank)?;
    let dora = sources[0].config.use_dora;
    if let Some(s) = sources.iter().find(|s| s.config.use_dora != dora) {
        let (with, without) = if dora {
            (&sources[0], s)
        } else {
            (s, &sources[0])
        };
        return Err(Error::config(format!(
            "{} is a DoRA adapter and {} is not: combine DoRA adapters with DoRA adapters only",
            with.dir.display(),
            without.dir.display()
        )));
    }
    let paths: BTreeSet<&String> = sources.iter().flat_map(|s| s.layers.keys()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut tensors = BTreeMap::new();
    let mut ranks = BTreeMap::new();
    for path in &paths {
        let present: Vec<(&Source, &Factors, f64)> = sources
            .iter()
            .zip(&spec.weights)
            .filter_map(|(s, &w)| s.layers.get(*path).map(|f| (s, f, w)))
            .collect();
        let (a, b) = match c.reduce() {
            None => stack(&present, rank)?,
            Some(r) if c.on_products() => refactor(path, &present, r, rank, spec, &mut rng)?,
            Some(r) => on_factors(path, &present, r, spec, &mut rng)?,
        };
        ranks.insert(path.to_string(), a.dims()[0]);
        let key = format!("{KEY_PREFIX}{path}");
        if dora {
            let l = model
                .linears()
                .into_iter()
                .find(|l| &&l.path == path)
                .ok_or_else(|| Error::config(format!("{path}: no such module in the model")))?;
            let fresh = Lora {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b.zeros_like()?)?,
                scale: 1.0,
                dropout: 0.0,
            };
            let m = Dora::new(fresh, &l.base, None)?.magnitude;
            tensors.insert(
                format!("{key}.lora_magnitude_vector"),
                m.as_tensor().clone(),
            );
        }
        tensors.insert(format!("{key}.lora_A.weight"), a);
        tensors.insert(format!("{key}.lora_B.weight"), b);
    }
    let config = combined_config(model, &sources[0].config, rank, &ranks)?;
    Ok(Combined {
        config,
        tensors,
        combination: c,
        modules: paths.len(),
    })
}

/// LoraHub's composition (Huang et al. 2023): `A = Σ wᵢAᵢ`, `B = Σ wᵢBᵢ` per module — the factors, not the
/// products — for sources with the same modules, ranks and scalings (checked by [`check_composable`]).
pub fn compose_factors(
    sources: &[Source],
    weights: &[f64],
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    let mut out = BTreeMap::new();
    for (path, f0) in &sources[0].layers {
        let (mut a, mut b) = ((&f0.a * weights[0])?, (&f0.b * weights[0])?);
        for (s, &w) in sources.iter().zip(weights).skip(1) {
            let f = &s.layers[path];
            a = (a + (&f.a * w)?)?;
            b = (b + (&f.b * w)?)?;
        }
        out.insert(path.clone(), (a, b));
    }
    Ok(out)
}

/// Whether LoraHub can compose `sources`: plain LoRA (DoRA magnitudes do not compose), the same modules, and per
/// module the same rank and scaling.
pub fn check_composable(sources: &[Source]) -> Result<()> {
    let first = &sources[0];
    for s in sources {
        if s.config.use_dora {
            return Err(Error::config(format!(
                "{}: a DoRA adapter; LoraHub composes plain LoRA factors (DoRA's magnitudes do not add up)",
                s.dir.display()
            )));
        }
        let (ours, theirs): (BTreeSet<&String>, BTreeSet<&String>) =
            (first.layers.keys().collect(), s.layers.keys().collect());
        if let Some(p) = ours.symmetric_difference(&theirs).next() {
            return Err(Error::config(format!(
                "{p} is adapted in only one of {} and {}: LoraHub needs adapters of the same modules",
                first.dir.display(),
                s.dir.display()
            )));
        }
        for (p, f) in &s.layers {
            let f0 = &first.layers[p];
            if f.a.dims() != f0.a.dims() || (f.scaling - f0.scaling).abs() > 1e-12 {
                return Err(Error::config(format!(
                    "{p}: rank {} and scaling {} in {}, rank {} and scaling {} in {}: LoraHub needs one rank \
                     and lora_alpha across the adapters",
                    f0.a.dims()[0],
                    f0.scaling,
                    first.dir.display(),
                    f.a.dims()[0],
                    f.scaling,
                    s.dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// Puts plain LoRA adapters with these factors on the model's modules (replacing any), scaled by each
/// module's scaling in `like`; used to evaluate a composition without writing it.
pub fn install(
    model: &mut Model,
    like: &Source,
    factors: &BTreeMap<String, (Tensor, Tensor)>,
) -> Result<()> {
    for l in model.linears_mut() {
        if let Some((a, b)) = factors.get(&l.path) {
            l.adapter = Some(Box::new(Lora {
                a: Var::from_tensor(a)?,
                b: Var::from_tensor(b)?,
                scale: like.layers[&l.path].scaling,
                dropout: 0.0,
            }));
        }
    }
    Ok(())
}

/// The tensors (PEFT keys) of composed factors.
pub fn factor_tensors(factors: BTreeMap<String, (Tensor, Tensor)>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (path, (a, b)) in factors {
        out.insert(format!("{KEY_PREFIX}{path}.lora_A.weight"), a);
        out.insert(format!("{KEY_PREFIX}{path}.lora_B.weight"), b);
    }
    out
}

/// `cat`: `[w₁s₁A₁; w₂s₂A₂; …]` and `[B₁ B₂ …]`, zero-padded to `rank` where a module lacks some sources.
fn stack(present: &[(&Source, &Factors, f64)], rank: usize) -> Result<(Tensor, Tensor)> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for (_, f, w) in present {
        a.push((&f.a * (w * f.scaling))?);
        b.push(f.b.clone());
    }
    let (mut a, mut b) = (Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?);
    let short = rank - a.dims()[0];
    if short > 0 {
        let (inp, out) = (a.dims()[1], b.dims()[0]);
        a = Tensor::cat(
            &[
                a.clone(),
                Tensor::zeros((short, inp), a.dtype(), a.device())?,
            ],
            0,
        )?;
        b = Tensor::cat(
            &[
                b.clone(),
                Tensor::zeros((out, short), b.dtype(), b.device())?,
            ],
            1,
        )?;
    }
    Ok((a, b))
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The factor-space types: A's and B's reduced separately with `±√|ws|` and `√|ws|`.
fn on_factors(
    path: &str,
    present: &[(&Source, &Factors, f64)],
    r: Reduce,
    spec: &Weighting,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Tensor)> {
    let (first, f0, _) = present[0];
    if let Some((s, f, _)) = present.iter().find(|(_, f, _)| f.a.dims() != f0.a.dims()) {
        return Err(Error::config(format!(
            "{path}: rank {} in {} but {} in {} (a rank_pattern): combination_type {} needs one rank per \
             module; use cat or svd",
            f0.a.dims()[0],
            first.dir.display(),
            f.a.dims()[0],
            s.dir.display(),
            spec.combination
        )));
    }
    let ws: Vec<f64> = present.iter().map(|(_, f, w)| w * f.scaling).collect();
    let wa: Vec<f32> = ws
        .iter()
        .map(|&x| (x.abs().sqrt() * if x >= 0.0 { 1.0 } else { -1.0 }) as f32)
        .collect();
    let wb: Vec<f32> = ws.iter().map(|&x| x.abs().sqrt() as f32).collect();
    let a: Vec<Vec<f32>> = present
        .iter()
        .map(|(_, f, _)| flat(&f.a))
        .collect::<Result<_>>()?;
    let b: Vec<Vec<f32>> = present
        .iter()
        .map(|(_, f, _)| flat(&f.b))
        .collect::<Result<_>>()?;
    let a = reduce(&a, &wa, r, spec, rng);
    let b = reduce(&b, &wb, r, spec, rng);
    Ok((
        Tensor::from_vec(a, f0.a.dims(), f0.a.device())?,
        Tensor::from_vec(b, f0.b.dims(), f0.b.device())?,
    ))
}

/// The product-space types: `Σ`-reduce `sᵢBᵢAᵢ`, then a rank-`rank` SVD.
fn refactor(
    path: &str,
    present: &[(&Source, &Factors, f64)],
    r: Reduce,
    rank: usize,
    spec: &Weighting,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Tensor)> {
    let (out, inp) = (present[0].1.b.dims()[0], present[0].1.a.dims()[1]);
    if rank > out.min(inp) {
        return Err(Error::config(format!(
            "svd_rank {rank} exceeds {path}'s [{out}, {inp}] update: at most {}",
            out.min(inp)
        )));
    }
    let deltas: Vec<Vec<f32>> = present
        .iter()
        .map(|(_, f, _)| flat(&(f.b.matmul(&f.a)? * f.scaling)?))
        .collect::<Result<_>>()?;
    let w: Vec<f32> = present.iter().map(|(_, _, w)| *w as f32).collect();
    let dev = present[0].1.a.device();
    let delta = Tensor::from_vec(reduce(&deltas, &w, r, spec, rng), (out, inp), dev)?;
    let svd = linalg::svd_top(&delta, rank)?;
    let s = Tensor::from_vec(
        svd.s.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        (1, rank),
        dev,
    )?;
    let mut b = svd.u.broadcast_mul(&s)?;
    let mut a = svd.vt;
    if let Some(q) = spec.svd_clamp {
        let mut all = flat(&b)?;
        all.extend(flat(&a)?);
        let hi = quantile(&mut all, q) as f64;
        b = b.clamp(-hi, hi)?;
        a = a.clamp(-hi, hi)?;
    }
    Ok((a, b))
}

/// `torch.quantile`'s linear interpolation between the closest ranks.
fn quantile(v: &mut [f32], q: f64) -> f32 {
    v.sort_by(f32::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64) as f32
}

/// One tensor from several (same length), PEFT's `merge_utils` reductions.
fn reduce(
    ts: &[Vec<f32>],
    w: &[f32],
    r: Reduce,
    spec: &Weighting,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let density = spec.density.unwrap_or(1.0);
    let pruned: Vec<Vec<f32>> = match r {
        Reduce::Sum => ts.to_vec(),
        Reduce::Ties | Reduce::Prune => ts.iter().map(|t| keep_largest(t, density)).collect(),
        Reduce::Dare | Reduce::DareTies => {
            ts.iter().map(|t| drop_random(t, density, rng)).collect()
        }
    };
    let n = ts[0].len();
    if matches!(r, Reduce::Ties | Reduce::DareTies) {
        let method = spec.majority_sign_method.unwrap_or(MajoritySign::Total);
        return (0..n)
            .map(|j| {
                let elect: f32 = pruned
                    .iter()
                    .map(|t| match method {
                        MajoritySign::Total => t[j],
                        MajoritySign::Frequency => sign(t[j]),
                    })
                    .sum();
                let majority = if elect >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut kept) = (0f32, 0f32);
                for (t, &wi) in pruned.iter().zip(w) {
                    if sign(t[j]) == majority {
                        sum += t[j] * wi;
                        kept += 1.0;
                    }
                }
                sum / kept.max(1.0)
            })
            .collect();
    }
    (0..n)
        .map(|j| pruned.iter().zip(w).map(|(t, &wi)| t[j] * wi).sum())
        .collect()
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// PEFT's magnitude pruning: the `⌊density·n⌋` entries largest in magnitude kept, the rest zeroed.
fn keep_largest(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// DARE: each entry kept with probability `density` and rescaled by `1/density`.
fn drop_random(t: &[f32], density: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter()
        .map(|&x| {
            if rng.random::<f64>() < density {
                x / density as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// The first source's config with PEFT's changes (rank, `lora_alpha = r`, no patterns, rsLoRA off), and
/// targets that select exactly the modules written: their names under the first source's layer selection,
/// else their names on every layer, else a regex of their paths.
fn combined_config(
    model: &Model,
    first: &AdapterConfig,
    rank: usize,
    ranks: &BTreeMap<String, usize>,
) -> Result<AdapterConfig> {
    let mut cfg = first.clone();
    cfg.r = rank;
    cfg.lora_alpha = rank as f64;
    cfg.use_rslora = false;
    cfg.rank_pattern.clear();
    cfg.alpha_pattern.clear();
    for (path, &r) in ranks.iter().filter(|(_, &r)| r != rank) {
        cfg.rank_pattern.insert(path.clone(), RankEntry::Rank(r));
        cfg.alpha_pattern.insert(path.clone(), r as f64);
    }
    let names: BTreeSet<String> = ranks
        .keys()
        .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    cfg.target_modules = TargetModules::List(names.into_iter().collect());
    let wanted: BTreeSet<&str> = ranks.keys().map(String::as_str).collect();
    let selects = |cfg: &AdapterConfig| -> Result<BTreeSet<String>> {
        let m = TargetMatcher::for_config(cfg)?;
        Ok(model
            .linears()
            .into_iter()
            .filter(|l| m.matches(&l.path))
            .map(|l| l.path.clone())
            .collect())
    };
    let exact = |cfg: &AdapterConfig| -> Result<bool> {
        Ok(selects(cfg)?
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            == wanted)
    };
    if !exact(&cfg)? {
        // the names on every layer, else the paths themselves
        cfg.layers_to_transform = None;
        cfg.layers_pattern = None;
        cfg.exclude_modules = None;
        if !exact(&cfg)? {
            let paths: Vec<String> = wanted.iter().map(|p| regex::escape(p)).collect();
            cfg.target_modules = TargetModules::Pattern(paths.join("|"));
        }
    }
    cfg.inference_mode = serde_json::Value::Bool(true);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(c: Combination, density: Option<f64>) -> Weighting {
        Weighting {
            combination: c,
            weights: vec![1.0, 1.0],
            density,
            majority_sign_method: None,
            svd_rank: None,
            svd_clamp: None,
            seed: 7,
        }
    }

    #[test]
    fn dare_keeps_about_density_and_rescales() {
        let t: Vec<f32> = (0..20_000).map(|i| 1.0 + (i % 7) as f32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let d = drop_random(&t, 0.3, &mut rng);
        let kept = d.iter().filter(|&&x| x != 0.0).count() as f64 / t.len() as f64;
        assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
        for (x, y) in t.iter().zip(&d) {
            assert!(*y == 0.0 || (y - x / 0.3).abs() < 1e-5, "{x} -> {y}");
        }
        // the same seed gives the same mask; another seed another
        let again = drop_random(&t, 0.3, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(d, again);
        assert_ne!(d, drop_random(&t, 0.3, &mut ChaCha8Rng::seed_from_u64(4)));
    }

    #[test]
    fn dare_linear_is_unbiased_over_seeds() {
        // 64 entries × 2000 seeds: each entry is 1.0 or −0.4 (+ both, or neither) with mean 0.3, sd ≈ 0.54
        let ts = vec![vec![0.5f32; 64], vec![-0.2f32; 64]];
        let s = spec(Combination::DareLinear, Some(0.5));
        let (mut sum, mut n) = (0f64, 0usize);
        for seed in 0..2000 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for x in reduce(&ts, &[1.0, 1.0], Reduce::Dare, &s, &mut rng) {
                sum += x as f64;
                n += 1;
            }
        }
        let mean = sum / n as f64;
        assert!((mean - 0.3).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn ties_elects_signs_and_averages_the_agreeing() {
        // entry 0: +3 and −1 → total +2: only +3 counts; entry 1: −4 and +1 → −4; entry 2: 2 and 2 → mean 2
        let ts = vec![vec![3.0f32, -4.0, 2.0], vec![-1.0, 1.0, 2.0]];
        let s = spec(Combination::Ties, Some(1.0));
        let got = reduce(
            &ts,
            &[1.0, 1.0],
            Reduce::Ties,
            &s,
            &mut ChaCha8Rng::seed_from_u64(0),
        );
        assert_eq!(got, vec![3.0, -4.0, 2.0]);
        let mut freq = s.clone();
        freq.majority_sign_method = Some(MajoritySign::Frequency);
        // entry 0 by count: one + and one − → + (ties go positive)
        let got = reduce(
            &ts,
            &[1.0, 1.0],
            Reduce::Ties,
            &freq,
            &mut ChaCha8Rng::seed_from_u64(0),
        );
        assert_eq!(got[0], 3.0);
        assert_eq!(
            keep_largest(&[0.1, -0.9, 0.5, 0.2], 0.5),
            vec![0.0, -0.9, 0.5, 0.0]
        );
    }

    #[test]
    fn svd_clamp_bounds_the_refactored_entries_at_their_quantile() {
        let dev = candle_core::Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut rand = |r, c| {
            let v: Vec<f32> = (0..r * c).map(|_| rng.random::<f32>() - 0.5).collect();
            Tensor::from_vec(v, (r, c), &dev).unwrap()
        };
        let f = Factors {
            a: rand(4, 12),
            b: rand(10, 4),
            scaling: 2.0,
        };
        let src = Source {
            dir: "x".into(),
            config: AdapterConfig::default(),
            layers: BTreeMap::new(),
        };
        let present = [(&src, &f, 1.0)];
        let mut s = spec(Combination::Svd, None);
        let run = |s: &Weighting| {
            refactor(
                "m",
                &present,
                Reduce::Sum,
                4,
                s,
                &mut ChaCha8Rng::seed_from_u64(0),
            )
            .unwrap()
        };
        let (a, b) = run(&s);
        // rank 4 re-factors the rank-4 update exactly
        let want = (f.b.matmul(&f.a).unwrap() * 2.0).unwrap();
        let got = b.matmul(&a).unwrap();
        let d: f32 = flat(&(got - &want).unwrap())
            .unwrap()
            .iter()
            .map(|x| x.abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{d}");
        let mut all = flat(&a).unwrap();
        all.extend(flat(&b).unwrap());
        let hi = quantile(&mut all.clone(), 0.8);
        s.svd_clamp = Some(0.8);
        let (ca, cb) = run(&s);
        let clamped: Vec<f32> = flat(&ca)
            .unwrap()
            .into_iter()
            .chain(flat(&cb).unwrap())
            .collect();
        let want: Vec<f32> = all.iter().map(|x| x.clamp(-hi, hi)).collect();
        assert_eq!(clamped, want);
        assert!(
            clamped.iter().zip(&all).any(|(c, x)| c != x),
            "nothing clamped"
        );
    }

    #[test]
    fn arguments_are_checked_against_the_type() {
        let ok = spec(Combination::Ties, Some(0.5));
        assert!(ok.check(2).is_ok());
        let err = |s: Weighting, n| s.check(n).unwrap_err().to_string();
        assert!(err(spec(Combination::Ties, None), 2).contains("needs `density`"));
        assert!(err(spec(Combination::Ties, Some(0.0)), 2).contains("(0, 1]"));
        assert!(err(spec(Combination::Linear, Some(0.5)), 2).contains("not by linear"));
        assert!(err(ok.clone(), 3).contains("2 weights for 3 adapters"));
        let mut svd = spec(Combination::Linear, None);
        svd.svd_rank = Some(4);
        assert!(err(svd, 2).contains("not by linear"));
        let mut sign = spec(Combination::DareLinear, Some(0.5));
        sign.majority_sign_method = Some(MajoritySign::Total);
        assert!(err(sign, 2).contains("not by dare_linear"));
        assert_eq!(ok.effective(1), Combination::Linear);
        assert!(quantile(&mut [3.0, 1.0, 2.0, 4.0], 0.5) == 2.5);
    }
}
