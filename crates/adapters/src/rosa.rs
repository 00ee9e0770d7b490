//! Sparse + low-rank (`peft_type = "ROSA"`, as RoSA and the "W ≈ Q + L + S" line of work): `ΔW = s·BA + S`,
//! a LoRA pair plus a sparse matrix S whose support is fixed at init and whose values train. PEFT has no such
//! method: the file uses PEFT's layout with factune's own `peft_type` — `lora_A.weight`, `lora_B.weight`,
//! `sparse_values [k]` and `sparse_indices [k]` (i64, row-major flat positions `row·in + col`).
//!
//! Support (`sparse_init = "weight"`): the `k = ⌈sparse_density · out · in⌉` entries of largest |W|, the
//! weights' outliers that a low-rank update cannot express. Values start at 0 and B at 0, so the model is
//! unchanged at step 0. The sparse product runs in `kernels::sparse_linear` in O(tokens · k).

use crate::config::AdapterConfig;
use crate::kaiming_uniform;
use crate::lora::Lora;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::kernels::{sparse_dense, sparse_linear};
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

factune_io::choice! {
    /// How the sparse part's support is chosen.
    pub enum SparseInit for "sparse_init" {
        /// The entries of largest |W|.
        Weight = "weight",
    }
}

crate::keys::method_keys! {
    /// Sparse + low-rank keys (factune's own `peft_type = "ROSA"`).
    pub struct RosaConfig {
        /// Sparse + low-rank: fraction of each weight's entries in the trained sparse part.
        sparse_density: f64 = 0.01,
        /// Sparse + low-rank: support of the sparse part, `weight` (largest |W| entries).
        sparse_init: SparseInit = SparseInit::Weight,
    }
}

pub struct Rosa {
    pub lora: Lora,
    pub values: Var,
    rows: Arc<Vec<u32>>,
    cols: Arc<Vec<u32>>,
    shape: (usize, usize),
}

impl Rosa {
    fn sparse(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        sparse_linear(
            x,
            self.values.as_tensor(),
            &self.rows,
            &self.cols,
            self.shape.0,
        )
    }
}

impl LinearAdapter for Rosa {
    fn method(&self) -> &'static str {
        "ROSA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        self.lora.forward(x, base_out, base, ctx)? + self.sparse(x)?
    }

    fn forward_fused(
        &self,
        x: &Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> Option<candle_core::Result<Tensor>> {
        let y = self.lora.forward_fused(x, base, ctx)?;
        Some(y.and_then(|y| y + self.sparse(x)?))
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = self.lora.parameters();
        p.push(("sparse_values".into(), self.values.clone()));
        p
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        let inp = self.shape.1 as i64;
        let flat: Vec<i64> = self
            .rows
            .iter()
            .zip(self.cols.iter())
            .map(|(&r, &c)| r as i64 * inp + c as i64)
            .collect();
        let n = flat.len();
        Tensor::from_vec(flat, n, self.values.device())
            .map(|t| vec![("sparse_indices".to_string(), t)])
            .unwrap_or_default()
    }

    fn delta_weight(&self, base: &FrozenParts) -> candle_core::Result<Tensor> {
        let (o, i) = self.shape;
        self.lora.delta_weight(base)?
            + sparse_dense(self.values.as_tensor(), &self.rows, &self.cols, o, i)?
    }
}

pub struct RosaMethod;

/// The `k` positions of largest |W| (row-major flat), ascending.
fn top_k_support(w: &Tensor, k: usize) -> Result<Vec<usize>> {
    let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, |&a, &b| {
            v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable();
    Ok(idx)
}

fn split(flat: &[usize], inp: usize) -> (Arc<Vec<u32>>, Arc<Vec<u32>>) {
    let rows = flat.iter().map(|&f| (f / inp) as u32).collect();
    let cols = flat.iter().map(|&f| (f % inp) as u32).collect();
    (Arc::new(rows), Arc::new(cols))
}

fn density(cfg: &AdapterConfig) -> Result<f64> {
    let own: &RosaConfig = cfg.options()?;
    let d = own.sparse_density;
    if !(d > 0.0 && d <= 1.0) {
        return Err(Error::config(format!(
            "sparse_density = {d}: expected a fraction in (0, 1]"
        )));
    }
    match own.sparse_init {
        SparseInit::Weight => Ok(d),
    }
}

impl Method for RosaMethod {
    fn peft_type(&self) -> &'static str {
        "ROSA"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for RosaMethod {
    fn tensor_names(&self, _cfg: &AdapterConfig) -> Vec<&'static str> {
        vec![
            "lora_A.weight",
            "lora_B.weight",
            "sparse_values",
            "sparse_indices",
        ]
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
        crate::lora::check_rank(layer, rank)?;
        let d = density(cfg)?;
        let (o, i) = (layer.out_features(), layer.in_features());
        let dev = layer.base.weight.device().clone();
        let k = ((d * (o * i) as f64).ceil() as usize).clamp(1, o * i);
        let support = top_k_support(&layer.base.weight.dense()?, k)?;
        let (rows, cols) = split(&support, i);
        let lora = Lora {
            a: Var::from_tensor(&kaiming_uniform(&[rank, i], i, rng, &dev)?)?,
            b: Var::from_tensor(&Tensor::zeros((o, rank), DType::F32, &dev)?)?,
            scale: cfg.scaling(rank, alpha),
            dropout: cfg.dropout(),
        };
        Ok(Box::new(Rosa {
            lora,
            values: Var::from_tensor(&Tensor::zeros(k, DType::F32, &dev)?)?,
            rows,
            cols,
            shape: (o, i),
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
        let (a, b) = (&t["lora_A.weight"], &t["lora_B.weight"]);
        let r = a.dims().first().copied().unwrap_or(0);
        if a.dims() != [r, i] || b.dims() != [o, r] {
            return Err(Error::config(format!(
                "`{}`: lora_A {:?} / lora_B {:?} do not fit a layer of shape [{o}, {i}]",
                layer.path,
                a.dims(),
                b.dims()
            )));
        }
        crate::lora::check_config_rank(cfg, layer, r, "lora_A")?;
        let idx: Vec<i64> = t["sparse_indices"]
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?;
        let values = &t["sparse_values"];
        if values.dims() != [idx.len()] || idx.iter().any(|&f| f < 0 || f as usize >= o * i) {
            return Err(Error::config(format!(
                "`{}`: sparse_values {:?} / sparse_indices [{}] do not describe a sparse [{o}, {i}] matrix",
                layer.path,
                values.dims(),
                idx.len()
            )));
        }
        let flat: Vec<usize> = idx.iter().map(|&f| f as usize).collect();
        let (rows, cols) = split(&flat, i);
        Ok(Box::new(Rosa {
            lora: Lora {
                a: Var::from_tensor(a)?,
                b: Var::from_tensor(b)?,
                scale: cfg.scaling(r, alpha),
                dropout: cfg.dropout(),
            },
            values: Var::from_tensor(values)?,
            rows,
            cols,
            shape: (o, i),
        }))
    }
}
