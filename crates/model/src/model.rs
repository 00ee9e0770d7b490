//! Decoder-only transformers as Hugging Face defines them; checkpoint key names are written once (the linear
//! layers' in the loader, the rest in `TensorNames`) and serve loading and saving alike. Llama-family blocks (RMSNorm, RoPE, GQA, SwiGLU) and GPT-2 blocks (LayerNorm, learned positions,
//! GELU-tanh, fused `c_attn`) share one block structure and one adaptable linear layer.

use crate::attention::{causal_attention, causal_mask, KvCache, Rope};
use crate::kernels;
use crate::linear::{AdaptableLinear, BaseWeight, Ctx};
use crate::prompt::{PromptAdapter, VirtualInputs};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use factune_io::{Error, ModelConfig, Result};
use std::path::PathBuf;

mod load;
mod tensors;

pub use load::{LoadOptions, Nf4Options};

pub enum Norm {
    Rms { w: Tensor, eps: f64 },
    Layer { w: Tensor, b: Tensor, eps: f64 },
}

impl Norm {
    /// A trainable (`Var`) weight takes the differentiable path; a frozen one the fused kernel.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let trainable = self.tensors().iter().any(|t| t.is_variable());
        match (self, trainable) {
            (Norm::Rms { w, eps }, false) => kernels::rms_norm(x, w, *eps),
            (Norm::Rms { w, eps }, true) => kernels::rms_norm_reference(x, w, *eps),
            (Norm::Layer { w, b, eps }, false) => kernels::layer_norm(x, w, b, *eps),
            (Norm::Layer { w, b, eps }, true) => kernels::layer_norm_reference(x, w, b, *eps),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Norm::Rms { w, .. } => vec![w],
            Norm::Layer { w, b, .. } => vec![w, b],
        }
    }
}

// One per layer, built once: the size difference between variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
pub enum Attn {
    /// Llama family: separate projections.
    Split {
        q: AdaptableLinear,
        k: AdaptableLinear,
        v: AdaptableLinear,
        o: AdaptableLinear,
    },
    /// GPT-2: one `c_attn` producing q, k, v side by side, then `c_proj`.
    Fused {
        qkv: AdaptableLinear,
        o: AdaptableLinear,
    },
}

pub enum Mlp {
    SwiGlu {
        gate: AdaptableLinear,
        up: AdaptableLinear,
        down: AdaptableLinear,
    },
    Gelu {
        fc: AdaptableLinear,
        proj: AdaptableLinear,
    },
}

pub struct Block {
    pub ln1: Norm,
    pub attn: Attn,
    pub ln2: Norm,
    pub mlp: Mlp,
}

/// Adds the gradients `store` holds for `wanted` into `acc` (same order), detached, and returns the store. Call
/// it on every store a backward yields and drop the store soon: candle also keeps gradients for operands that
/// never needed one (masks, frozen tables), and those still reference the forward graph.
pub fn take_grads(
    mut store: GradStore,
    wanted: &[&Tensor],
    acc: &mut [Option<Tensor>],
) -> candle_core::Result<GradStore> {
    for (t, slot) in wanted.iter().zip(acc.iter_mut()) {
        if let Some(g) = store.remove(t) {
            let g = g.detach();
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
    }
    Ok(store)
}

pub struct Model {
    pub cfg: ModelConfig,
    pub dir: PathBuf,
    pub device: Device,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    rope: Option<Rope>,
    pub blocks: Vec<Block>,
    final_norm: Norm,
    lm_head: Tensor,
    /// A sequence-level adapter (the prompt family), if one is attached.
    pub prompt: Option<Box<dyn PromptAdapter>>,
}

/// A forward pass's input after the embeddings: what every block needs to know of the sequence.
struct Prepared {
    /// `[B, lead + T, H]`: the embedded tokens, after any virtual embeddings.
    x: Tensor,
    mask: Tensor,
    /// The position of `x`'s first row (cached positions and any KV prefix come before it).
    start: usize,
    /// Rows of `x` that are virtual tokens, dropped before the head.
    lead: usize,
    /// Per layer, the KV prefix `[Hkv, n, D]` to place before the keys and values.
    kv: Option<Vec<(Tensor, Tensor)>>,
}

impl Prepared {
    /// The rows of `x: [B, lead + T, H]` that belong to real tokens.
    fn real_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.lead {
            0 => Ok(x.clone()),
            n => x.narrow(1, n, x.dim(1)? - n),
        }
    }

    /// The rows the loss scores, with `labels` to match: the real tokens', and before them the last virtual
    /// token's, whose prediction is the first real token (PEFT counts it: its labels lead with ignored
    /// positions for the virtual tokens, and the causal shift pairs the last of them with the first label).
    fn loss_rows(
        &self,
        x: &Tensor,
        labels: &[Vec<i64>],
    ) -> candle_core::Result<(Tensor, Vec<Vec<i64>>)> {
        match self.lead {
            0 => Ok((x.clone(), labels.to_vec())),
            n => {
                let rows = x.narrow(1, n - 1, x.dim(1)? - n + 1)?;
                let labels = labels
                    .iter()
                    .map(|l| std::iter::once(-100).chain(l.iter().copied()).collect())
                    .collect();
                Ok((rows, labels))
            }
        }
    }
}

impl Model {
    /// Positions left for real tokens: the context (`max_position_embeddings`) less a prompt adapter's
    /// virtual tokens.
    pub fn max_positions(&self) -> usize {
        self.cfg
            .max_position_embeddings
            .saturating_sub(self.virtual_tokens())
    }

    /// The positions a prompt adapter adds before every sequence (0 without one).
    pub fn virtual_tokens(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.num_virtual_tokens())
    }

    /// The vocabulary embeddings `[n, H]` of `ids` (a text-initialised prompt starts from them).
    pub fn token_embeddings(&self, ids: &[u32]) -> Result<Tensor> {
        self.check_ids(ids.iter().copied().max().unwrap_or(0))?;
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?.detach())
    }

    /// Final hidden states `[B, T, H]` for token ids `[B, T]`, continuing after the cached positions.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (p, x) = self.run_blocks(ids, cache, ctx)?;
        Ok(self.final_norm.forward(&p.real_rows(&x)?)?)
    }

    /// The prepared sequence and the last block's output `[B, lead + T, H]` (virtual rows included).
    fn run_blocks(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<(Prepared, Tensor)> {
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let p = self.prepare(ids, cached, ctx)?;
        let mut x = p.x.clone();
        for (n, blk) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, n));
            x = self.block_forward(blk, &x, layer_cache, &p, n, ctx)?;
        }
        Ok((p, x))
    }

    /// The mean next-token loss over `labels` for ids `[B, T]` and the count of labelled tokens; with virtual
    /// tokens, the last of them predicts the first real token as in PEFT.
    pub fn loss(&self, ids: &Tensor, labels: &[Vec<i64>], ctx: &Ctx) -> Result<(Tensor, usize)> {
        let (p, x) = self.run_blocks(ids, None, ctx)?;
        let (rows, labels) = p.loss_rows(&x, labels)?;
        self.lm_loss(&self.final_norm.forward(&rows)?, &labels)
    }

    /// Embeds ids `[B, T]` after `cached` positions, with a prompt adapter's virtual inputs when the sequence
    /// starts here, after checking the ids and the length against the model.
    fn prepare(&self, ids: &Tensor, cached: usize, ctx: &Ctx) -> Result<Prepared> {
        let (b, t) = ids.dims2()?;
        let virt = match (&self.prompt, cached) {
            (Some(p), 0) => Some(p.virtual_inputs(ctx)?),
            _ => None,
        };
        let n = virt.as_ref().map_or(0, |v| v.len());
        let (lead, kv) = match virt {
            Some(VirtualInputs::Embeddings(e)) => (Some(e), None),
            Some(VirtualInputs::KvPrefix(kv)) => {
                self.check_prefix(&kv)?;
                (None, Some(kv))
            }
            None => (None, None),
        };
        let total = cached + n + t;
        let context = self.cfg.max_position_embeddings;
        if total > context {
            let virtual_note = match self.virtual_tokens() {
                0 => String::new(),
                v => format!(" (counting the adapter's {v} virtual tokens)"),
            };
            return Err(Error::config(format!(
                "sequence of {total} tokens{virtual_note} exceeds the model's context of {context} positions (max_position_embeddings in {})",
                self.dir.join("config.json").display()
            )));
        }
        if let Some(w) = self.cfg.sliding_window {
            if total > w {
                return Err(Error::config(format!(
                    "sequence of {total} tokens is longer than the sliding window ({w}); sliding-window attention is not implemented yet"
                )));
            }
        }
        self.check_ids(ids.flatten_all()?.max(0)?.to_scalar::<u32>()?)?;
        let hs = self.cfg.hidden_size;
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, hs))?;
        let lead_rows = if lead.is_some() { n } else { 0 };
        if let Some(e) = lead {
            if e.dims() != [n, hs] {
                return Err(Error::config(format!(
                    "{} virtual token embeddings are {:?}; the model's hidden size is {hs}",
                    self.prompt.as_ref().map_or("", |p| p.method()),
                    e.dims()
                )));
            }
            let e = e.unsqueeze(0)?.broadcast_as((b, lead_rows, hs))?;
            x = Tensor::cat(&[&e, &x], 1)?;
        }
        let start = cached + kv.as_ref().map_or(0, |_| n);
        if let Some(pe) = &self.pos_embed {
            x = x.broadcast_add(&pe.narrow(0, start, lead_rows + t)?)?;
        }
        let rep = self.cfg.num_heads / self.cfg.num_kv_heads;
        Ok(Prepared {
            x,
            mask: causal_mask(lead_rows + t, start, rep, &self.device)?,
            start,
            lead: lead_rows,
            kv,
        })
    }

    /// Every token id (`max_id` the largest) must be inside the vocabulary.
    fn check_ids(&self, max_id: u32) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if max_id as usize >= vocab {
            return Err(Error::config(format!(
                "token id {max_id} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// A KV prefix must give every layer keys and values `[kv_heads, n, head_dim]`.
    fn check_prefix(&self, kv: &[(Tensor, Tensor)]) -> Result<()> {
        let c = &self.cfg;
        let method = self.prompt.as_ref().map_or("", |p| p.method());
        if kv.len() != c.num_layers {
            return Err(Error::config(format!(
                "the {method} prefix has {} layers; the model has {}",
                kv.len(),
                c.num_layers
            )));
        }
        let n = kv[0].0.dims().get(1).copied().unwrap_or(0);
        let want = [c.num_kv_heads, n, c.head_dim];
        for (l, (k, v)) in kv.iter().enumerate() {
            if k.dims() != want || v.dims() != want {
                return Err(Error::config(format!(
                    "the {method} prefix of layer {l} has keys {:?} and values {:?}; the model expects {want:?} (key/value heads, virtual tokens, head dim)",
                    k.dims(),
                    v.dims()
                )));
            }
        }
        Ok(())
    }

    /// Block `layer`: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
    fn block_forward(
        &self,
        blk: &Block,
        x: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        p: &Prepared,
        layer: usize,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let h = blk.ln1.forward(x)?;
        let prefix = p.kv.as_ref().map(|kv| &kv[layer]);
        let a = self.attention(&blk.attn, &h, cache, p, prefix, ctx)?;
        let x = (x + a)?;
        let h = blk.ln2.forward(&x)?;
        let m = match &blk.mlp {
            Mlp::SwiGlu { gate, up, down } => {
                let g = gate.forward(&h, ctx)?;
                down.forward(&kernels::swiglu(&g, &up.forward(&h, ctx)?)?, ctx)?
            }
            Mlp::Gelu { fc, proj } => proj.forward(&fc.forward(&h, ctx)?.gelu()?, ctx)?,
        };
        x + m
    }

    /// One training micro-batch: the mean next-token loss over `labels` (a value, detached), the number of
    /// labelled tokens, and the gradients of `wanted` (the trainable tensors), in their order. With
    /// `checkpoint`, activations are kept only at block boundaries: each block is run again during the
    /// backward, one at a time, and differentiated there (gradient checkpointing: one extra forward, the
    /// activation memory of one block).
    pub fn loss_and_grads(
        &self,
        ids: &Tensor,
        labels: &[Vec<i64>],
        ctx: &Ctx,
        checkpoint: bool,
        wanted: &[&Tensor],
    ) -> Result<(Tensor, usize, Vec<Option<Tensor>>)> {
        let mut out = vec![None; wanted.len()];
        if !checkpoint {
            let (loss, n) = self.loss(ids, labels, ctx)?;
            take_grads(loss.backward()?, wanted, &mut out)?;
            return Ok((loss.detach(), n, out));
        }
        let p = self.prepare(ids, 0, ctx)?;
        // Forward, keeping each block's input only; the graph of a block is dropped as soon as it has run.
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = p.x.detach();
        for (l, blk) in self.blocks.iter().enumerate() {
            let y = self.block_forward(blk, &x, None, &p, l, ctx)?.detach();
            inputs.push(std::mem::replace(&mut x, y));
        }
        // The head and the loss, differentiated with respect to the last block's output.
        let top = Var::from_tensor(&x)?;
        drop(x);
        let (rows, labels) = p.loss_rows(top.as_tensor(), labels)?;
        let (loss, n) = self.lm_loss(&self.final_norm.forward(&rows)?, &labels)?;
        let mut g = take_grads(loss.backward()?, wanted, &mut out)?
            .remove(top.as_tensor())
            .map(|t| t.detach());
        let loss = loss.detach();
        // Blocks from the top down: recompute, differentiate <output, dY>, pass dX down.
        for (l, (blk, input)) in self.blocks.iter().zip(inputs).enumerate().rev() {
            let Some(dy) = g else { break };
            let xv = Var::from_tensor(&input)?;
            drop(input);
            let y = self.block_forward(blk, xv.as_tensor(), None, &p, l, ctx)?;
            let bg = (y * dy)?.sum_all()?.backward()?;
            g = take_grads(bg, wanted, &mut out)?
                .remove(xv.as_tensor())
                .map(|t| t.detach());
        }
        if let (Some(dx), true) = (g, p.x.track_op()) {
            take_grads((&p.x * dx)?.sum_all()?.backward()?, wanted, &mut out)?;
        }
        Ok((loss, n, out))
    }

    fn attention(
        &self,
        attn: &Attn,
        h: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        p: &Prepared,
        prefix: Option<&(Tensor, Tensor)>,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        // a KV prefix goes before this pass's keys and values (and so into the cache with them)
        let with_prefix = |x: Tensor, pre: Option<&Tensor>| match pre {
            Some(pre) => {
                let pre = pre.unsqueeze(0)?.broadcast_as((b, nkv, pre.dims()[1], d))?;
                Tensor::cat(&[&pre, &x], 2)
            }
            None => Ok(x),
        };
        let (pk, pv) = (prefix.map(|kv| &kv.0), prefix.map(|kv| &kv.1));
        let (qh, kh, vh) = match attn {
            Attn::Split { q, k, v, .. } => {
                let rope = self.rope.as_ref().expect("llama-family models have RoPE");
                (
                    rope.apply_heads(&q.forward(h, ctx)?, nh, p.start)?,
                    rope.apply_heads(&k.forward(h, ctx)?, nkv, p.start)?,
                    heads(v.forward(h, ctx)?, nkv)?,
                )
            }
            Attn::Fused { qkv, .. } => {
                let hs = self.cfg.hidden_size;
                let y = qkv.forward(h, ctx)?;
                (
                    heads(y.narrow(2, 0, hs)?, nh)?,
                    heads(y.narrow(2, hs, hs)?, nh)?,
                    heads(y.narrow(2, 2 * hs, hs)?, nh)?,
                )
            }
        };
        let y = causal_attention(
            &qh,
            with_prefix(kh, pk)?,
            with_prefix(vh, pv)?,
            cache,
            &p.mask,
        )?;
        match attn {
            Attn::Split { o, .. } | Attn::Fused { o, .. } => o.forward(&y, ctx),
        }
    }

    /// Logits `[.., vocab]` from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if self.lm_head.is_variable() {
            return Ok(hidden.broadcast_matmul(&self.lm_head.t()?)?);
        }
        Ok(kernels::frozen_linear(
            hidden,
            &BaseWeight::Dense(self.lm_head.clone()),
            None,
        )?)
    }

    /// Mean next-token loss over `labels` (and the count of labelled tokens) from final hidden states, the LM
    /// head fused into the loss (no full logits tensor).
    pub fn lm_loss(&self, hidden: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
        Ok(crate::loss::causal_lm_loss_from_hidden(
            hidden,
            &self.lm_head,
            labels,
        )?)
    }

    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, ctx: &Ctx) -> Result<Tensor> {
        self.logits(&self.forward_hidden(ids, cache, ctx)?)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    pub fn linears(&self) -> Vec<&AdaptableLinear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            match &b.attn {
                Attn::Split { q, k, v, o } => out.extend([q, k, v, o]),
                Attn::Fused { qkv, o } => out.extend([qkv, o]),
            }
            match &b.mlp {
                Mlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Gelu { fc, proj } => out.extend([fc, proj]),
            }
        }
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            match &mut b.attn {
                Attn::Split { q, k, v, o } => out.extend([q, k, v, o]),
                Attn::Fused { qkv, o } => out.extend([qkv, o]),
            }
            match &mut b.mlp {
                Mlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Gelu { fc, proj } => out.extend([fc, proj]),
            }
        }
        out
    }

    /// Frozen parameter count (tied embeddings counted once), as transformers' `num_parameters()`.
    pub fn num_base_parameters(&self) -> usize {
        let mut n = self.embed.elem_count();
        if let Some(p) = &self.pos_embed {
            n += p.elem_count();
        }
        // Tied weights are one tensor loaded once: compare identity, not values.
        if self.lm_head.id() != self.embed.id() {
            n += self.lm_head.elem_count();
        }
        for b in &self.blocks {
            n += b
                .ln1
                .tensors()
                .iter()
                .chain(b.ln2.tensors().iter())
                .map(|t| t.elem_count())
                .sum::<usize>();
        }
        for l in self.linears() {
            let (o, i) = l.base.weight.dims();
            n += o * i + l.base.bias.as_ref().map_or(0, |b| b.elem_count());
        }
        n + self
            .final_norm
            .tensors()
            .iter()
            .map(|t| t.elem_count())
            .sum::<usize>()
    }
}
