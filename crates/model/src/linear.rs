//! The one adaptable linear layer every architecture is built from: a frozen `W` (and bias) plus an optional
//! adapter. Adapter methods live in the `factune-adapters` crate and plug in through [`LinearAdapter`].

use crate::kernels;
use crate::quant::{NfMatrix, Scales};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::sync::Arc;

/// What a forward pass needs to know beyond its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    /// Training mode: adapter dropout is active.
    pub train: bool,
    /// Seed of this step's dropout masks; each layer mixes in its own index.
    pub dropout_seed: u64,
}

/// What a trainable tensor is to the optimizer. LoRA+ gives `FactorB` a higher learning rate; ReLoRA resets
/// the moments of both factors at a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// The input-side factor of a low-rank pair (LoRA's A).
    FactorA,
    /// The output-side factor (LoRA's B), zero at init.
    FactorB,
    /// Anything else: magnitudes, scales, sparse values, cores, base tensors.
    Other,
}

/// A parameterisation of an update to a frozen linear layer.
pub trait LinearAdapter: Send + Sync {
    /// The PEFT method name (`peft_type`), e.g. `LORA`.
    fn method(&self) -> &'static str;
    /// Output of the adapted layer, given the input and the frozen layer's own output.
    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> Result<Tensor>;
    /// Trainable tensors with their names relative to the module (e.g. `lora_A.weight`).
    fn parameters(&self) -> Vec<(String, Var)>;
    /// The role of the parameter `name` (one of [`LinearAdapter::parameters`]'s names). By default PEFT's
    /// naming: `lora_A.*` and `lora_B.*` are the factors of a low-rank pair; a method names its own otherwise.
    fn role(&self, name: &str) -> ParamRole {
        if name.starts_with("lora_A.") {
            ParamRole::FactorA
        } else if name.starts_with("lora_B.") {
            ParamRole::FactorB
        } else {
            ParamRole::Other
        }
    }
    /// The dense update ΔW `[out, in]` this adapter adds to the weight.
    fn delta_weight(&self, base: &FrozenParts) -> Result<Tensor>;
    /// `(B [out, r], A [r, in], s)` when the update is exactly `s·B·A` (plain LoRA), so its spectrum comes from
    /// the factors without forming ΔW.
    fn low_rank_factors(&self) -> Option<(Tensor, Tensor, f64)> {
        None
    }
    /// The update this adapter adds to the bias `[out]`, where it has one (GLoRA).
    fn delta_bias(&self, _base: &FrozenParts) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Fixed (untrained) tensors of this layer's adapter saved beside its parameters, e.g. a sparse support.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Tensors this adapter shares with every other layer's (VeRA's projections), by name, for saving once.
    fn shared(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Trainable tensors shared by every layer's adapter (SAID's θ), by name: one variable, trained and saved
    /// once (as `base_model.<name>`).
    fn shared_parameters(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The whole adapted layer as one fused op over a frozen base, where the method has one (fewer autograd
    /// nodes); `None` falls back to the frozen output followed by [`LinearAdapter::forward`].
    fn forward_fused(
        &self,
        _x: &Tensor,
        _base: &FrozenParts,
        _ctx: &Ctx,
    ) -> Option<Result<Tensor>> {
        None
    }
}

/// Where a layer's inputs are collected while capturing (see [`AdaptableLinear::capture`]).
/// Each entry: the input's tensor id (layers fed the same tensor, such as q/k/v, can share their statistics)
/// and its rows `[tokens, in]`.
pub type Capture = Arc<std::sync::Mutex<Vec<(candle_core::TensorId, Tensor)>>>;

/// A frozen weight `[out, in]`: dense (f32, or bf16 converted tile by tile in the matmul, half the memory),
/// or 4-bit NF4 dequantised on the fly in the matmul (QLoRA); either way no f32 copy of it is kept.
#[derive(Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Nf(Arc<NfMatrix>, Device),
}

impl BaseWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(t) => (t.dims()[0], t.dims()[1]),
            BaseWeight::Nf(q, _) => (q.rows, q.cols),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            BaseWeight::Dense(t) => t.device(),
            BaseWeight::Nf(_, d) => d,
        }
    }

    /// The weight as a dense f32 tensor: the stored one, or a converted copy of a bf16 or NF4 weight (for
    /// inits, merges and diagnostics, never the training step).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => t.to_dtype(DType::F32),
            BaseWeight::Nf(q, d) => Tensor::from_vec(q.dequantize(), (q.rows, q.cols), d),
        }
    }

    /// The dtype a dense weight is held in (an NF4 weight dequantises to f32).
    pub fn dtype(&self) -> DType {
        match self {
            BaseWeight::Dense(t) => t.dtype(),
            BaseWeight::Nf(..) => DType::F32,
        }
    }

    pub fn is_variable(&self) -> bool {
        matches!(self, BaseWeight::Dense(t) if t.is_variable())
    }

    pub fn as_nf(&self) -> Option<&NfMatrix> {
        match self {
            BaseWeight::Nf(q, _) => Some(q),
            BaseWeight::Dense(_) => None,
        }
    }

    /// NF4 form of a weight (`double_quant`: 8-bit block scales).
    pub fn nf4(w: &Tensor, double_quant: bool) -> factune_io::Result<Self> {
        Self::nf(w, 4, double_quant)
    }

    /// NormalFloat form of a weight with `bits` per code (2 to 8).
    pub fn nf(w: &Tensor, bits: u8, double_quant: bool) -> factune_io::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let q = NfMatrix::quantize_bits(
            &v,
            rows,
            cols,
            bits,
            double_quant.then(crate::quant::dynamic_map),
        )?;
        Ok(BaseWeight::Nf(Arc::new(q), w.device().clone()))
    }
}

/// The frozen part of a linear layer, `y = x Wᵀ + b`, `W: [out, in]`.
pub struct FrozenParts {
    pub weight: BaseWeight,
    pub bias: Option<Tensor>,
}

impl FrozenParts {
    /// Replaces W by `w` (f32), keeping its storage: a dense weight keeps its dtype, an NF4 one is quantised
    /// again with the same scale format (PiSSA/DoTA residuals of a 4-bit base, QDoTA).
    pub fn replace_weight(&mut self, w: Tensor) -> factune_io::Result<()> {
        self.weight = match &self.weight {
            BaseWeight::Dense(old) => BaseWeight::Dense(w.to_dtype(old.dtype())?),
            BaseWeight::Nf(q, _) => {
                BaseWeight::nf(&w, q.bits, matches!(q.scales, Scales::Double { .. }))?
            }
        };
        Ok(())
    }
}

pub struct AdaptableLinear {
    /// Module path as PEFT names it (e.g. `model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// Position among the model's linear layers, so each draws its own dropout mask.
    pub index: usize,
    pub base: FrozenParts,
    /// Checkpoint key of the weight, and whether it is stored `[in, out]` (GPT-2's `Conv1D`).
    pub source_key: String,
    pub stored_transposed: bool,
    pub adapter: Option<Box<dyn LinearAdapter>>,
    /// The frozen parts before the last merge, so unmerging restores them exactly (an update like GLoRA's
    /// `W·A` depends on the weight it was merged into).
    premerge: Option<(BaseWeight, Option<Tensor>)>,
    /// When set, every forward appends its input (detached, `[rows, in]`) here: data-driven inits (EVA) read
    /// the layer inputs this way.
    pub capture: Option<Capture>,
    /// NormalFloat width this layer's weight gets when the base is quantised (a mixed-precision plan);
    /// `None` is NF4.
    pub planned_bits: Option<u8>,
}

impl AdaptableLinear {
    pub fn new(
        path: String,
        index: usize,
        weight: BaseWeight,
        bias: Option<Tensor>,
        source_key: String,
        stored_transposed: bool,
    ) -> Self {
        AdaptableLinear {
            path,
            index,
            base: FrozenParts { weight, bias },
            source_key,
            stored_transposed,
            adapter: None,
            premerge: None,
            capture: None,
            planned_bits: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.base.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.base.weight.dims().0
    }

    /// This layer's weight as `checkpoint` stores it under [`AdaptableLinear::source_key`], in the layer's
    /// `[out, in]` layout and f32 (dequantised if stored in 4 bits): the original W, for inits and
    /// diagnostics that need it after training changed (or an init replaced) the in-memory one.
    pub fn original_weight(&self, checkpoint: &factune_io::Weights) -> factune_io::Result<Tensor> {
        let (o, i) = self.base.weight.dims();
        let dev = self.base.weight.device();
        Ok(read_weight(
            checkpoint,
            &self.source_key,
            o,
            i,
            self.stored_transposed,
            DType::F32,
            dev,
        )?
        .dense()?)
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(c) = &self.capture {
            let rows = x.detach().reshape(((), self.in_features()))?;
            c.lock().expect("capture lock").push((x.id(), rows));
        }
        let ctx = Ctx {
            dropout_seed: ctx.dropout_seed
                ^ (self.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..*ctx
        };
        let trainable_base = self.base.weight.is_variable();
        if let (Some(a), false) = (&self.adapter, trainable_base) {
            if let Some(y) = a.forward_fused(x, &self.base, &ctx) {
                return y;
            }
        }
        // Full-parameter training makes W a `Var`: then it needs the differentiable path.
        let y = if trainable_base {
            let BaseWeight::Dense(w) = &self.base.weight else {
                candle_core::bail!("{}: a 4-bit weight cannot be trained", self.path)
            };
            let y = x.broadcast_matmul(&w.t()?)?;
            match &self.base.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        } else {
            kernels::frozen_linear(x, &self.base.weight, self.base.bias.as_ref())?
        };
        match &self.adapter {
            Some(a) => a.forward(x, y, &self.base, &ctx),
            None => Ok(y),
        }
    }

    /// `W + sign·ΔW` computed in f32, cast back to a dense weight's dtype (a bf16 base stays bf16, as PEFT
    /// merges); from a 4-bit weight it is `deq(Q) + ΔW` in f32, exactly the weight that was trained.
    /// Detached: ΔW comes from the adapter's variables, and a merged weight that kept that graph would pin
    /// the old W and ΔW's temporaries (4× the layer's memory, and a chain across ReLoRA restarts).
    fn shifted(&self, delta: &Tensor, sign: f64) -> Result<Tensor> {
        let w = self.base.weight.dense()?;
        Ok((w + (delta.detach() * sign)?)?
            .to_dtype(self.base.weight.dtype())?
            .detach())
    }

    /// Folds the adapter into W as `W + ΔW` computed in f32 and cast once, detaching the adapter and
    /// returning it (so it can be unmerged). A 4-bit W becomes dense.
    pub fn merge(&mut self) -> Result<Option<Box<dyn LinearAdapter>>> {
        let Some(a) = self.adapter.take() else {
            return Ok(None);
        };
        let delta = a.delta_weight(&self.base)?;
        let bias = match (a.delta_bias(&self.base)?, &self.base.bias) {
            (None, b) => b.clone(),
            (Some(db), Some(b)) => Some((b + db)?),
            (Some(db), None) if db.abs()?.max_all()?.to_scalar::<f32>()? == 0.0 => None,
            (Some(_), None) => {
                let path = self.path.clone();
                self.adapter = Some(a);
                candle_core::bail!(
                    "{path}: the adapter updates the bias, and this layer has none in the architecture, so the \
                     update cannot be merged"
                )
            }
        };
        let weight = BaseWeight::Dense(self.shifted(&delta, 1.0)?);
        let old_weight = std::mem::replace(&mut self.base.weight, weight);
        let old_bias = std::mem::replace(&mut self.base.bias, bias);
        self.premerge = Some((old_weight, old_bias));
        Ok(Some(a))
    }

    /// [`AdaptableLinear::merge`] for good: the previous weight is dropped, not kept for an unmerge (exports,
    /// ReLoRA restarts).
    pub fn fold(&mut self) -> Result<Option<Box<dyn LinearAdapter>>> {
        let a = self.merge()?;
        self.premerge = None;
        Ok(a)
    }

    /// Restores the frozen parts from before the last merge and re-attaches the adapter.
    pub fn unmerge(&mut self, adapter: Box<dyn LinearAdapter>) -> Result<()> {
        match self.premerge.take() {
            Some((w, b)) => {
                self.base.weight = w;
                self.base.bias = b;
            }
            None => candle_core::bail!("{}: unmerge without a merge", self.path),
        }
        self.adapter = Some(adapter);
        Ok(())
    }
}

/// A linear weight `[out, in]` as `checkpoint` stores it under `key`: bitsandbytes' 4-bit layout (kept in NF4;
/// its shape is always `[out, in]`) or a float tensor (as `dtype`; stored `[in, out]` when `transposed`).
pub fn read_weight(
    checkpoint: &factune_io::Weights,
    key: &str,
    out: usize,
    inp: usize,
    transposed: bool,
    dtype: DType,
    dev: &Device,
) -> factune_io::Result<BaseWeight> {
    if let Some(q) = crate::quant::read_bnb(checkpoint, key, out, inp)? {
        return Ok(BaseWeight::Nf(Arc::new(q), dev.clone()));
    }
    Ok(BaseWeight::Dense(if transposed {
        checkpoint
            .get_shaped(key, &[inp, out], dtype, dev)?
            .t()?
            .contiguous()?
    } else {
        checkpoint.get_shaped(key, &[out, inp], dtype, dev)?
    }))
}
