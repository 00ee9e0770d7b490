//! The one adaptable linear layer every architecture is built from: a frozen `W` (and bias) plus an optional
//! adapter. Adapter methods live in the `factune-adapters` crate and plug in through [`LinearAdapter`].

use crate::kernels;
use candle_core::{Result, Tensor, Var};

/// What a forward pass needs to know beyond its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    /// Training mode: adapter dropout is active.
    pub train: bool,
    /// Seed of this step's dropout masks; each layer mixes in its own index.
    pub dropout_seed: u64,
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
    /// The dense update ΔW `[out, in]` this adapter adds to the weight.
    fn delta_weight(&self, base: &FrozenParts) -> Result<Tensor>;
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

/// The frozen part of a linear layer, `y = x Wᵀ + b`, `W: [out, in]`.
pub struct FrozenParts {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
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
}

impl AdaptableLinear {
    pub fn new(
        path: String,
        index: usize,
        weight: Tensor,
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
        }
    }

    pub fn in_features(&self) -> usize {
        self.base.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.base.weight.dims()[0]
    }

    /// This layer's weight as `checkpoint` stores it under [`AdaptableLinear::source_key`], in the layer's
    /// `[out, in]` layout and f32: the original W, for inits and diagnostics that need it after training
    /// changed (or an init replaced) the in-memory one.
    pub fn original_weight(&self, checkpoint: &factune_io::Weights) -> factune_io::Result<Tensor> {
        let (o, i) = (self.out_features(), self.in_features());
        let dims = if self.stored_transposed {
            [i, o]
        } else {
            [o, i]
        };
        let w = checkpoint.get_shaped(
            &self.source_key,
            &dims,
            candle_core::DType::F32,
            self.base.weight.device(),
        )?;
        Ok(if self.stored_transposed {
            w.t()?.contiguous()?
        } else {
            w
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
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
            let y = x.broadcast_matmul(&self.base.weight.t()?)?;
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

    /// Folds the adapter into W as `W + ΔW` computed in f32 and cast once, detaching the adapter and
    /// returning it (so it can be unmerged).
    pub fn merge(&mut self) -> Result<Option<Box<dyn LinearAdapter>>> {
        let Some(a) = self.adapter.take() else {
            return Ok(None);
        };
        let delta = a.delta_weight(&self.base)?;
        let dtype = self.base.weight.dtype();
        let w = (self.base.weight.to_dtype(candle_core::DType::F32)? + delta)?;
        self.base.weight = w.to_dtype(dtype)?;
        Ok(Some(a))
    }

    /// Subtracts a previously merged adapter's ΔW from W and re-attaches the adapter.
    pub fn unmerge(&mut self, adapter: Box<dyn LinearAdapter>) -> Result<()> {
        let delta = adapter.delta_weight(&self.base)?;
        let dtype = self.base.weight.dtype();
        let w = (self.base.weight.to_dtype(candle_core::DType::F32)? - delta)?;
        self.base.weight = w.to_dtype(dtype)?;
        self.adapter = Some(adapter);
        Ok(())
    }
}
