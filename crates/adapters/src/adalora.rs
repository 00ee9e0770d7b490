//! AdaLoRA (`peft_type = "ADALORA"`): `ΔW = P Λ Q` in SVD form — `lora_A` (Q) `[r, in]`, `lora_E` (Λ) `[r, 1]`,
//! `lora_B` (P) `[out, r]` — `y = x Wᵀ + α/(r + 1e−5) · dropout(x) (A ⊙ E)ᵀ Bᵀ`, with an orthogonality penalty on
//! A and B added to the loss and a budget of singular values cut from `init_r` to `target_r` per module by
//! importance, all as PEFT 0.21 does it (tested against it):
//! - penalty: `orth_reg_weight · mean over A, B of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F` (the Frobenius norm, as PEFT;
//!   the paper writes it squared);
//! - importance of every entry: sensitivity `|p · ∂L/∂p|` smoothed by `beta1`, uncertainty `|sens − EMA|`
//!   smoothed by `beta2`, score = their product; a triplet's score is its E entry's plus the means of its A
//!   row and B column;
//! - budget: `init_r · n` until `tinit`, then cubic down to `target_r · n` at `total_step − tfinal`, masking
//!   (E ← 0) every `deltaT` steps the triplets at or below the k-th smallest score; after that the final mask
//!   is held.
//!
//! The trainer drives the allocator after each optimizer step; the final adapter is saved as PEFT saves it,
//! tensors cut to the kept triplets (a module may keep none) with `rank_pattern` in the config. Loaded, the
//! scale stays `α/(init_r + 1e−5)` whatever was kept, as in PEFT (checked: PEFT loads ours to our logits).

use crate::config::{AdapterConfig, RankEntry};
use crate::hooks::{FinalAdapter, HookState, StepHook};
use crate::normal;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter, Model};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};

crate::keys::method_keys! {
    /// AdaLoRA's keys, PEFT's `AdaLoraConfig` names and defaults: ranks start at `init_r` and the total is cut
    /// to `target_r` per module on a cubic schedule between steps `tinit` and `total_step − tfinal`, masking
    /// every `deltaT` steps.
    pub struct AdaLoraConfig {
        /// AdaLoRA: starting rank of every module.
        init_r: usize = 12,
        /// AdaLoRA: average rank per module at the end (the total budget is target_r × modules).
        target_r: usize = 8,
        /// AdaLoRA: steps at full budget before pruning starts.
        tinit: usize = 0,
        /// AdaLoRA: final steps with the budget fixed.
        tfinal: usize = 0,
        /// AdaLoRA: prune every this many steps while the budget shrinks.
        deltaT | "delta_t": usize = 1,
        /// AdaLoRA: EMA factor of the sensitivity.
        beta1: f64 = 0.85,
        /// AdaLoRA: EMA factor of the uncertainty.
        beta2: f64 = 0.85,
        /// AdaLoRA: weight of the orthogonality penalty on A and B.
        orth_reg_weight: f64 = 0.5,
        /// AdaLoRA: the run's length, which the schedule needs (training sets it to max_steps).
        total_step: Option<usize> = None,
    }
}

pub struct AdaLora {
    pub a: Var,
    pub b: Var,
    pub e: Var,
    /// `α / (ranknum + 1e−5)`.
    pub scale: f64,
    pub dropout: f64,
}

impl LinearAdapter for AdaLora {
    fn method(&self) -> &'static str {
        "ADALORA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        _base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        if self.e.elem_count() == 0 {
            return Ok(base_out);
        }
        let x = crate::adapter_input(x, self.dropout, ctx)?;
        let ae = self.a.as_tensor().broadcast_mul(self.e.as_tensor())?;
        let inp = *x.dims().last().expect("rank >= 1");
        let d = x
            .reshape(((), inp))?
            .matmul(&ae.t()?)?
            .matmul(&self.b.as_tensor().t()?)?;
        let d = (d.reshape(base_out.shape())? * self.scale)?;
        base_out + d
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A".into(), self.a.clone()),
            ("lora_B".into(), self.b.clone()),
            ("lora_E".into(), self.e.clone()),
        ]
    }

    fn delta_weight(&self, base: &FrozenParts) -> candle_core::Result<Tensor> {
        if self.e.elem_count() == 0 {
            let (o, i) = base.weight.dims();
            return Tensor::zeros((o, i), DType::F32, base.weight.device());
        }
        let ae = self.a.as_tensor().broadcast_mul(self.e.as_tensor())?;
        self.b.as_tensor().matmul(&ae)? * self.scale
    }
}

pub struct AdaLoraMethod;

impl Method for AdaLoraMethod {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }

    /// The rank schedule is the trainer's job (no user callback to forget), run as this hook.
    fn step_hook(&self, cfg: &AdapterConfig, model: &Model) -> Result<Option<Box<dyn StepHook>>> {
        Ok(Some(Box::new(RankAllocator::new(cfg, model)?)))
    }
}

impl LinearMethod for AdaLoraMethod {
    fn tensor_names(&self, _cfg: &AdapterConfig) -> Vec<&'static str> {
        vec!["lora_A", "lora_B", "lora_E"]
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _rank: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
        _shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let r = cfg.options::<AdaLoraConfig>()?.init_r;
        crate::lora::check_rank(layer, r)?;
        let (o, i) = (layer.out_features(), layer.in_features());
        let dev = layer.base.weight.device().clone();
        Ok(Box::new(AdaLora {
            a: Var::from_tensor(&normal(&[r, i], 0.02, rng, &dev)?)?,
            b: Var::from_tensor(&normal(&[o, r], 0.02, rng, &dev)?)?,
            e: Var::from_tensor(&Tensor::zeros((r, 1), DType::F32, &dev)?)?,
            scale: alpha / (r as f64 + 1e-5),
            dropout: cfg.dropout(),
        }))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let (o, i) = (layer.out_features(), layer.in_features());
        let (a, b, e) = (&t["lora_A"], &t["lora_B"], &t["lora_E"]);
        let r = e.dims().first().copied().unwrap_or(0);
        let init_r = cfg.options::<AdaLoraConfig>()?.init_r;
        if a.dims() != [r, i] || b.dims() != [o, r] || e.dims() != [r, 1] || r > init_r {
            return Err(Error::config(format!(
                "`{}`: lora_A {:?} / lora_E {:?} / lora_B {:?} do not fit a layer of shape [{o}, {i}]",
                layer.path,
                a.dims(),
                e.dims(),
                b.dims()
            )));
        }
        Ok(Box::new(AdaLora {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            e: Var::from_tensor(e)?,
            scale: alpha / (init_r as f64 + 1e-5),
            dropout: cfg.dropout(),
        }))
    }
}

/// The orthogonality penalty over every AdaLoRA adapter of the model, weighted (`None` without AdaLoRA).
pub fn orth_penalty(model: &Model, weight: f64) -> candle_core::Result<Option<Tensor>> {
    let mut terms = Vec::new();
    for l in model.linears() {
        let Some(ad) = l.adapter.as_ref().filter(|a| a.method() == "ADALORA") else {
            continue;
        };
        for (name, v) in ad.parameters() {
            let p = v.as_tensor();
            let cov = match name.as_str() {
                "lora_A" => p.matmul(&p.t()?)?,
                "lora_B" => p.t()?.matmul(p)?,
                _ => continue,
            };
            let n = cov.dim(0)?;
            let eye = Tensor::eye(n, DType::F32, p.device())?;
            terms.push((cov - eye)?.sqr()?.sum_all()?.sqrt()?);
        }
    }
    if terms.is_empty() {
        return Ok(None);
    }
    let n = terms.len() as f64;
    Ok(Some(
        ((Tensor::stack(&terms, 0)?.sum_all()? / n)? * weight)?,
    ))
}

/// One module's importance state: EMAs of sensitivity and uncertainty for A, E and B, flat.
#[derive(Default, Clone)]
struct Ema {
    ipt: Vec<f32>,
    unc: Vec<f32>,
}

/// AdaLoRA's rank allocator, run by the shared training step as the method's [`StepHook`].
pub struct RankAllocator {
    init_bgt: usize,
    target_bgt: usize,
    init_r: usize,
    target_r: usize,
    tinit: usize,
    tfinal: usize,
    total_step: usize,
    delta_t: usize,
    beta1: f32,
    beta2: f32,
    orth_reg_weight: f64,
    /// Keyed by trainable-parameter name.
    ema: BTreeMap<String, Ema>,
    /// The mask of every module once the final budget is fixed, keyed by module path.
    pub final_mask: Option<BTreeMap<String, Vec<bool>>>,
}

/// In every step: the orthogonality penalty joins the loss; after the update, importance and masks follow
/// the step's gradients and the kept rank is logged as `rank`.
impl StepHook for RankAllocator {
    fn name(&self) -> &'static str {
        "adalora"
    }

    fn state(&self) -> Result<Option<HookState>> {
        Ok(Some(RankAllocator::state(self)?))
    }

    fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()> {
        RankAllocator::restore(self, tensors, meta)
    }

    /// As PEFT saves a finished AdaLoRA run: cut to the kept triplets, `rank_pattern` in the config.
    fn final_adapter(&self, model: &Model, cfg: &AdapterConfig) -> Result<Option<FinalAdapter>> {
        let (tensors, pattern) = resized(model, &self.current_mask(model)?)?;
        let total: usize = pattern.values().map(|p| p.rank()).sum();
        let mut c = cfg.clone();
        c.rank_pattern = pattern;
        let note = format!(
            "AdaLoRA: {total} singular values kept over all modules (rank_pattern in adapter_config.json)"
        );
        Ok(Some((tensors, c, note)))
    }

    fn penalty(&self, model: &Model) -> Result<Option<Tensor>> {
        Ok(orth_penalty(model, self.orth_reg_weight)?)
    }

    fn after_update(
        &mut self,
        model: &mut Model,
        names: &[&str],
        grads: &[Vec<f32>],
        step: usize,
    ) -> Result<Option<(&'static str, serde_json::Value)>> {
        let by_name: HashMap<String, Vec<f32>> = names
            .iter()
            .zip(grads)
            .map(|(n, g)| {
                (
                    n.trim_start_matches("base_model.model.").to_string(),
                    g.clone(),
                )
            })
            .collect();
        let rank = self.update_and_allocate(model, &by_name, step)?;
        Ok(Some(("rank", rank.into())))
    }
}

impl RankAllocator {
    pub fn new(cfg: &AdapterConfig, model: &Model) -> Result<Self> {
        let modules = model
            .linears()
            .iter()
            .filter(|l| l.adapter.as_ref().is_some_and(|a| a.method() == "ADALORA"))
            .count();
        let own: &AdaLoraConfig = cfg.options()?;
        let (init_r, target_r) = (own.init_r, own.target_r);
        let total_step = own.total_step.unwrap_or(0);
        let (tinit, tfinal) = (own.tinit, own.tfinal);
        if target_r > init_r {
            return Err(Error::config(format!(
                "AdaLoRA: target_r = {target_r} exceeds init_r = {init_r}"
            )));
        }
        if tinit + tfinal >= total_step {
            return Err(Error::config(format!(
                "AdaLoRA: tinit ({tinit}) + tfinal ({tfinal}) must be smaller than total_step ({total_step}) so \
                 the budget has steps to shrink in"
            )));
        }
        Ok(RankAllocator {
            init_bgt: init_r * modules,
            target_bgt: target_r * modules,
            init_r,
            target_r,
            tinit,
            tfinal,
            total_step,
            delta_t: own.deltaT.max(1),
            beta1: own.beta1 as f32,
            beta2: own.beta2 as f32,
            orth_reg_weight: own.orth_reg_weight,
            ema: BTreeMap::new(),
            final_mask: None,
        })
    }

    /// The budget at `step` and whether this step masks (PEFT's cubic schedule).
    pub fn budget(&self, step: usize) -> (usize, bool) {
        if step <= self.tinit {
            (self.init_bgt, false)
        } else if step > self.total_step - self.tfinal {
            (self.target_bgt, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            let b = ((self.init_bgt - self.target_bgt) as f64 * mul.powi(3)
                + self.target_bgt as f64) as usize;
            (b, step.is_multiple_of(self.delta_t))
        }
    }

    /// The configured target ranks, for the record.
    pub fn ranks(&self) -> (usize, usize) {
        (self.init_r, self.target_r)
    }

    /// After the optimizer step of `step` (0-based), with this step's gradients by parameter name: updates the
    /// importance, masks to the budget when the schedule says so, and returns the total kept rank.
    pub fn update_and_allocate(
        &mut self,
        model: &Model,
        grads: &HashMap<String, Vec<f32>>,
        step: usize,
    ) -> Result<usize> {
        let last = self.total_step - self.tfinal;
        if step < last {
            self.update_ipt(model, grads)?;
            let (budget, mask) = self.budget(step);
            if mask {
                self.mask_to_budget(model, budget)?;
            }
        } else if step == last {
            let mask = self.mask_to_budget(model, self.target_bgt)?;
            self.final_mask = Some(mask);
            self.ema.clear();
        } else if let Some(mask) = &self.final_mask {
            apply_masks(model, mask)?;
        }
        total_rank(model)
    }

    fn update_ipt(&mut self, model: &Model, grads: &HashMap<String, Vec<f32>>) -> Result<()> {
        let (b1, b2) = (self.beta1, self.beta2);
        for (name, var) in adalora_params(model) {
            let Some(g) = grads.get(&name) else { continue };
            let p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let e = self.ema.entry(name).or_insert_with(|| Ema {
                ipt: vec![0.0; p.len()],
                unc: vec![0.0; p.len()],
            });
            for j in 0..p.len() {
                let ipt = (p[j] * g[j]).abs();
                e.ipt[j] = b1 * e.ipt[j] + (1.0 - b1) * ipt;
                e.unc[j] = b2 * e.unc[j] + (1.0 - b2) * (ipt - e.ipt[j]).abs();
            }
        }
        Ok(())
    }

    /// Per module path, the score of each triplet: E's score plus the mean of its A row and of its B column.
    fn triplet_scores(&self, model: &Model) -> Result<Vec<(String, Vec<f32>)>> {
        let score = |name: &str| -> Option<Vec<f32>> {
            self.ema
                .get(name)
                .map(|e| e.ipt.iter().zip(&e.unc).map(|(a, b)| a * b).collect())
        };
        let mut out = Vec::new();
        for l in model.linears() {
            let Some(ad) = l.adapter.as_ref().filter(|a| a.method() == "ADALORA") else {
                continue;
            };
            let p = ad.parameters();
            let (a, b) = (p[0].1.as_tensor(), p[1].1.as_tensor());
            let (r, i) = a.dims2()?;
            let o = b.dim(0)?;
            let key = |n: &str| format!("{}.{n}", l.path);
            let (sa, sb, se) = match (
                score(&key("lora_A")),
                score(&key("lora_B")),
                score(&key("lora_E")),
            ) {
                (Some(a), Some(b), Some(e)) => (a, b, e),
                _ => (vec![0.0; r * i], vec![0.0; o * r], vec![0.0; r]),
            };
            let t: Vec<f32> = (0..r)
                .map(|k| {
                    let a_mean = sa[k * i..(k + 1) * i].iter().sum::<f32>() / i as f32;
                    let b_mean = (0..o).map(|row| sb[row * r + k]).sum::<f32>() / o as f32;
                    se[k] + (a_mean + b_mean)
                })
                .collect();
            out.push((l.path.clone(), t));
        }
        Ok(out)
    }

    fn mask_to_budget(&self, model: &Model, budget: usize) -> Result<BTreeMap<String, Vec<bool>>> {
        let scores = self.triplet_scores(model)?;
        let mut all: Vec<f32> = scores.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        let k = self.init_bgt.saturating_sub(budget);
        let mut masks = BTreeMap::new();
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            all.sort_by(f32::total_cmp);
            all[k - 1]
        };
        for (path, s) in scores {
            masks.insert(path, s.iter().map(|&v| v > threshold).collect());
        }
        apply_masks(model, &masks)?;
        Ok(masks)
    }
}

impl RankAllocator {
    /// The importance EMAs as tensors and the final mask, for checkpoints (a resumed run allocates exactly as
    /// a straight one).
    pub fn state(&self) -> Result<(BTreeMap<String, Tensor>, serde_json::Value)> {
        let mut t = BTreeMap::new();
        for (name, e) in &self.ema {
            let n = e.ipt.len();
            t.insert(
                format!("{name}.ipt"),
                Tensor::from_vec(e.ipt.clone(), n, &candle_core::Device::Cpu)?,
            );
            t.insert(
                format!("{name}.unc"),
                Tensor::from_vec(e.unc.clone(), n, &candle_core::Device::Cpu)?,
            );
        }
        Ok((t, serde_json::json!({ "final_mask": self.final_mask })))
    }

    pub fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &serde_json::Value,
    ) -> Result<()> {
        self.ema.clear();
        for (k, t) in tensors {
            if let Some(name) = k.strip_suffix(".ipt") {
                let unc = tensors.get(&format!("{name}.unc")).ok_or_else(|| {
                    Error::config(format!("AdaLoRA state: `{name}.ipt` without `{name}.unc`"))
                })?;
                self.ema.insert(
                    name.to_string(),
                    Ema {
                        ipt: t.to_vec1()?,
                        unc: unc.to_vec1()?,
                    },
                );
            }
        }
        self.final_mask = serde_json::from_value(meta["final_mask"].clone())
            .map_err(|e| Error::config(format!("AdaLoRA state: bad final_mask: {e}")))?;
        Ok(())
    }

    /// The kept triplets now: the final mask once fixed, else E's non-zero entries.
    pub fn current_mask(&self, model: &Model) -> Result<BTreeMap<String, Vec<bool>>> {
        if let Some(m) = &self.final_mask {
            return Ok(m.clone());
        }
        let mut out = BTreeMap::new();
        for l in model.linears() {
            if let Some(ad) = l.adapter.as_ref().filter(|a| a.method() == "ADALORA") {
                let e = ad.parameters()[2]
                    .1
                    .as_tensor()
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                out.insert(l.path.clone(), e.iter().map(|&x| x != 0.0).collect());
            }
        }
        Ok(out)
    }
}

/// `(name, Var)` of every AdaLoRA parameter, names as `<module path>.<lora_A|lora_B|lora_E>`.
fn adalora_params(model: &Model) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for l in model.linears() {
        if let Some(ad) = l.adapter.as_ref().filter(|a| a.method() == "ADALORA") {
            out.extend(
                ad.parameters()
                    .into_iter()
                    .map(|(n, v)| (format!("{}.{n}", l.path), v)),
            );
        }
    }
    out
}

/// Zeroes the E entries each module's mask drops.
fn apply_masks(model: &Model, masks: &BTreeMap<String, Vec<bool>>) -> Result<()> {
    for l in model.linears() {
        let (Some(ad), Some(m)) = (l.adapter.as_ref(), masks.get(&l.path)) else {
            continue;
        };
        let e = &ad.parameters()[2].1;
        let keep: Vec<f32> = m.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (m.len(), 1), e.device())?;
        e.set(&(e.as_tensor() * keep)?)?;
    }
    Ok(())
}

/// Non-zero singular values over every AdaLoRA module.
pub fn total_rank(model: &Model) -> Result<usize> {
    let mut n = 0;
    for (name, v) in adalora_params(model) {
        if name.ends_with("lora_E") {
            n += v
                .as_tensor()
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .filter(|&&x| x != 0.0)
                .count();
        }
    }
    Ok(n)
}

/// The adapter as PEFT saves a finished AdaLoRA run: per module only the kept triplets (rows of A and E,
/// columns of B), and the `rank_pattern` (`<module>.lora_E` → kept mask) for the config.
pub fn resized(
    model: &Model,
    masks: &BTreeMap<String, Vec<bool>>,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, RankEntry>)> {
    let mut tensors = BTreeMap::new();
    let mut pattern = BTreeMap::new();
    for l in model.linears() {
        let Some(ad) = l.adapter.as_ref().filter(|a| a.method() == "ADALORA") else {
            continue;
        };
        let p = ad.parameters();
        let (a, b, e) = (p[0].1.as_tensor(), p[1].1.as_tensor(), p[2].1.as_tensor());
        let r = e.dim(0)?;
        let mask = masks.get(&l.path).cloned().unwrap_or_else(|| vec![true; r]);
        let keep: Vec<u32> = (0..r as u32).filter(|&k| mask[k as usize]).collect();
        let n = keep.len();
        let prefix = format!("base_model.model.{}", l.path);
        let (i, o) = (a.dim(1)?, b.dim(0)?);
        let (ka, ke, kb) = if n == 0 {
            // pruned to rank 0: empty tensors, as PEFT writes them
            let z = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, a.device());
            (z((0, i))?, z((0, 1))?, z((o, 0))?)
        } else {
            let idx = Tensor::from_vec(keep, n, a.device())?;
            (
                a.index_select(&idx, 0)?,
                e.index_select(&idx, 0)?,
                b.index_select(&idx, 1)?.contiguous()?,
            )
        };
        tensors.insert(format!("{prefix}.lora_A"), ka);
        tensors.insert(format!("{prefix}.lora_E"), ke);
        tensors.insert(format!("{prefix}.lora_B"), kb);
        pattern.insert(format!("{}.lora_E", l.path), RankEntry::Mask(mask));
    }
    Ok((tensors, pattern))
}
