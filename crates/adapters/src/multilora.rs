//! MultiLoRA (`peft_type = "MULTILORA"`): `n` LoRA branches per layer side by side, each with a trainable scale,
//! `ΔW = (α/r) Σ_k s_k B_k A_k`, to spread the update over more directions than one LoRA's dominant few
//! ("horizontal scaling"). Init: the first branch as LoRA (Kaiming A, zero B); the others' A orthogonalised
//! against every earlier branch's rows (decorrelated subspaces), B zero; all scales 1. So the model is
//! unchanged at step 0. PEFT has no MultiLoRA: the file uses PEFT's layout with factune's own `peft_type` —
//! `lora_A.<k>.weight`, `lora_B.<k>.weight`, `lora_scale.<k>` (shape [1]) — and `multilora_branches`.
//!
//! Forward in one pass: the branches' A stacked to `[n·r, in]`, the hidden scaled per branch, B stacked to
//! `[out, n·r]`.

use crate::config::AdapterConfig;
use crate::kaiming_uniform;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

crate::keys::method_keys! {
    /// MultiLoRA's keys (factune's own `peft_type = "MULTILORA"`).
    pub struct MultiLoraConfig {
        /// MultiLoRA: parallel LoRA branches per layer, each of rank `r`.
        multilora_branches: usize = 2,
    }
}

const MAX_BRANCHES: usize = 8;
const A_NAMES: [&str; MAX_BRANCHES] = [
    "lora_A.0.weight",
    "lora_A.1.weight",
    "lora_A.2.weight",
    "lora_A.3.weight",
    "lora_A.4.weight",
    "lora_A.5.weight",
    "lora_A.6.weight",
    "lora_A.7.weight",
];
const B_NAMES: [&str; MAX_BRANCHES] = [
    "lora_B.0.weight",
    "lora_B.1.weight",
    "lora_B.2.weight",
    "lora_B.3.weight",
    "lora_B.4.weight",
    "lora_B.5.weight",
    "lora_B.6.weight",
    "lora_B.7.weight",
];
const S_NAMES: [&str; MAX_BRANCHES] = [
    "lora_scale.0",
    "lora_scale.1",
    "lora_scale.2",
    "lora_scale.3",
    "lora_scale.4",
    "lora_scale.5",
    "lora_scale.6",
    "lora_scale.7",
];

pub struct MultiLora {
    pub a: Vec<Var>,
    pub b: Vec<Var>,
    pub s: Vec<Var>,
    pub scale: f64,
    pub dropout: f64,
}

impl MultiLora {
    /// `(A_stack [n·r, in], B_stack ⊙ per-branch scales [out, n·r])`.
    fn stacked(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let a: Vec<&Tensor> = self.a.iter().map(|v| v.as_tensor()).collect();
        let scaled: Vec<Tensor> = self
            .b
            .iter()
            .zip(&self.s)
            .map(|(b, s)| b.as_tensor().broadcast_mul(s.as_tensor()))
            .collect::<candle_core::Result<_>>()?;
        Ok((Tensor::cat(&a, 0)?, Tensor::cat(&scaled, 1)?))
    }
}

impl LinearAdapter for MultiLora {
    fn method(&self) -> &'static str {
        "MULTILORA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        _base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let x = crate::adapter_input(x, self.dropout, ctx)?;
        let (a, b) = self.stacked()?;
        let inp = *x.dims().last().expect("rank >= 1");
        let d = x.reshape(((), inp))?.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let d = (d.reshape(base_out.shape())? * self.scale)?;
        base_out + d
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = Vec::new();
        for k in 0..self.a.len() {
            p.push((A_NAMES[k].to_string(), self.a[k].clone()));
            p.push((B_NAMES[k].to_string(), self.b[k].clone()));
            p.push((S_NAMES[k].to_string(), self.s[k].clone()));
        }
        p
    }

    fn delta_weight(&self, _base: &FrozenParts) -> candle_core::Result<Tensor> {
        let (a, b) = self.stacked()?;
        b.matmul(&a)? * self.scale
    }
}

pub struct MultiLoraMethod;

fn branches(cfg: &AdapterConfig) -> Result<usize> {
    let own: &MultiLoraConfig = cfg.options()?;
    let n = own.multilora_branches;
    if !(1..=MAX_BRANCHES).contains(&n) {
        return Err(Error::config(format!(
            "multilora_branches = {n}: expected 1 to {MAX_BRANCHES}"
        )));
    }
    Ok(n)
}

/// Rows of `a` made orthogonal to every row of `earlier` (Gram–Schmidt against an orthonormal basis of them),
/// keeping each row's norm.
fn decorrelate(a: &Tensor, earlier: &[Tensor]) -> Result<Tensor> {
    let rows: Vec<Vec<f32>> = a.to_vec2()?;
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for e in earlier {
        for row in e.to_vec2::<f32>()? {
            push_orthonormal(&mut basis, row.iter().map(|&v| v as f64).collect());
        }
    }
    let mut out = Vec::with_capacity(rows.len() * rows[0].len());
    for row in rows {
        let norm: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let mut v: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        for q in &basis {
            let dot: f64 = v.iter().zip(q).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(q).for_each(|(x, y)| *x -= dot * y);
        }
        let n2: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(v.iter().map(|x| (x * norm / n2) as f32));
        push_orthonormal(&mut basis, v);
    }
    Ok(Tensor::from_vec(out, a.shape(), a.device())?)
}

fn push_orthonormal(basis: &mut Vec<Vec<f64>>, mut v: Vec<f64>) {
    for q in basis.iter() {
        let dot: f64 = v.iter().zip(q).map(|(x, y)| x * y).sum();
        v.iter_mut().zip(q).for_each(|(x, y)| *x -= dot * y);
    }
    let n: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 1e-9 {
        basis.push(v.into_iter().map(|x| x / n).collect());
    }
}

impl Method for MultiLoraMethod {
    fn peft_type(&self) -> &'static str {
        "MULTILORA"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for MultiLoraMethod {
    fn tensor_names(&self, cfg: &AdapterConfig) -> Vec<&'static str> {
        let n = branches(cfg).unwrap_or(2);
        (0..n)
            .flat_map(|k| [A_NAMES[k], B_NAMES[k], S_NAMES[k]])
            .collect()
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        rank: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
        _shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let n = branches(cfg)?;
        crate::lora::check_rank(layer, rank)?;
        let (o, i) = (layer.out_features(), layer.in_features());
        if n * rank > i {
            return Err(Error::config(format!(
                "`{}`: {n} branches of rank {rank} need {} decorrelated input directions, the layer has {i}",
                layer.path,
                n * rank
            )));
        }
        let dev = layer.base.weight.device().clone();
        let mut a: Vec<Tensor> = Vec::new();
        for _ in 0..n {
            let fresh = kaiming_uniform(&[rank, i], i, rng, &dev)?;
            let ak = if a.is_empty() {
                fresh
            } else {
                decorrelate(&fresh, &a)?
            };
            a.push(ak);
        }
        let var = |t: &Tensor| Var::from_tensor(t);
        Ok(Box::new(MultiLora {
            a: a.iter().map(var).collect::<candle_core::Result<_>>()?,
            b: (0..n)
                .map(|_| Var::from_tensor(&Tensor::zeros((o, rank), DType::F32, &dev)?))
                .collect::<candle_core::Result<_>>()?,
            s: (0..n)
                .map(|_| Var::from_tensor(&Tensor::ones(1, DType::F32, &dev)?))
                .collect::<candle_core::Result<_>>()?,
            scale: cfg.scaling(rank, alpha),
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
        let n = branches(cfg)?;
        let (o, i) = (layer.out_features(), layer.in_features());
        let r = t[A_NAMES[0]].dims().first().copied().unwrap_or(0);
        for k in 0..n {
            let (a, b, s) = (&t[A_NAMES[k]], &t[B_NAMES[k]], &t[S_NAMES[k]]);
            if a.dims() != [r, i] || b.dims() != [o, r] || s.dims() != [1] {
                return Err(Error::config(format!(
                    "`{}` branch {k}: lora_A {:?} / lora_B {:?} / lora_scale {:?} do not fit [{o}, {i}] at rank {r}",
                    layer.path,
                    a.dims(),
                    b.dims(),
                    s.dims()
                )));
            }
        }
        crate::lora::check_config_rank(cfg, layer, r, "lora_A")?;
        let vars = |names: &[&str]| -> candle_core::Result<Vec<Var>> {
            names[..n]
                .iter()
                .map(|k| Var::from_tensor(&t[*k]))
                .collect()
        };
        Ok(Box::new(MultiLora {
            a: vars(&A_NAMES)?,
            b: vars(&B_NAMES)?,
            s: vars(&S_NAMES)?,
            scale: cfg.scaling(r, alpha),
            dropout: cfg.dropout(),
        }))
    }
}
