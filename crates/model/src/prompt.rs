//! Attachment points for adapters that add positions to the sequence instead of changing a weight (PEFT's
//! "prompt learning": prompt tuning, P-tuning, prefix tuning). The model asks the adapter for its virtual
//! inputs once per forward that starts a sequence; a forward that continues after a KV cache gets nothing,
//! because the cache already holds them, so generation prepends them once, not per decoded token.

use crate::linear::{Ctx, ParamRole};
use candle_core::{Result, Tensor, Var};

/// What a prompt adapter adds to a forward pass, computed from its parameters (through any
/// reparameterisation, so gradients reach them).
pub enum VirtualInputs {
    /// `[n, hidden]` embeddings placed before the input's own: ordinary leading positions `0..n` (learned
    /// position embeddings and RoPE apply to them as to any token).
    Embeddings(Tensor),
    /// Per layer, keys and values `[kv_heads, n, head_dim]` placed before that attention layer's own, as a KV
    /// cache would hold them: used as stored (no RoPE is applied to them), every real token attends to all of
    /// them, and the real tokens take positions `n..`, as transformers numbers tokens after a cache.
    KvPrefix(Vec<(Tensor, Tensor)>),
}

impl VirtualInputs {
    /// The number of virtual positions.
    pub fn len(&self) -> usize {
        match self {
            VirtualInputs::Embeddings(e) => e.dims().first().copied().unwrap_or(0),
            VirtualInputs::KvPrefix(kv) => kv.first().map_or(0, |(k, _)| k.dims()[1]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sequence-level adapter (see the module doc). Methods live in `factune-adapters`.
pub trait PromptAdapter: Send + Sync {
    /// The PEFT method name (`peft_type`), e.g. `PROMPT_TUNING`.
    fn method(&self) -> &'static str;
    /// How many positions [`PromptAdapter::virtual_inputs`] adds.
    fn num_virtual_tokens(&self) -> usize;
    fn virtual_inputs(&self, ctx: &Ctx) -> Result<VirtualInputs>;
    /// Trainable tensors with their names as saved.
    fn parameters(&self) -> Vec<(String, Var)>;
    /// The role of the parameter `name` to the optimizer.
    fn role(&self, _name: &str) -> ParamRole {
        ParamRole::Other
    }
    /// The tensors PEFT saves for this adapter (`prompt_embeddings`: what the encoder produces, not the
    /// encoder), which load for inference in PEFT and here.
    fn portable(&self) -> Result<Vec<(String, Tensor)>>;
}
