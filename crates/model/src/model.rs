//! Decoder-only transformers as Hugging Face defines them, with checkpoint key paths visible in the loading
//! code. Llama-family blocks (RMSNorm, RoPE, GQA, SwiGLU) and GPT-2 blocks (LayerNorm, learned positions,
//! GELU-tanh, fused `c_attn`) share one block structure and one adaptable linear layer.

use crate::attention::{causal_attention, causal_mask, KvCache, Rope};
use crate::kernels;
use crate::linear::{read_weight, AdaptableLinear, BaseWeight, Ctx};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use factune_io::{Arch, Error, ModelConfig, Result, Weights};
use std::path::{Path, PathBuf};

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
}

struct Loader<'a> {
    w: &'a Weights,
    dev: &'a Device,
    cfg: &'a ModelConfig,
    prefix: &'a str,
    next_index: usize,
    opts: LoadOptions,
}

/// How the frozen linear weights of the blocks are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Quantise them to NF4 (QLoRA); weights a checkpoint stores in 4 bits stay 4-bit either way.
    pub quantize: Option<Nf4Options>,
    /// F32, or BF16 to hold them at half the memory (compute stays f32: the matmuls convert tiles of rows on
    /// the fly). Embeddings, norms and the head stay f32.
    pub base_dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quantize: None,
            base_dtype: DType::F32,
        }
    }
}

impl LoadOptions {
    /// Options for a base quantised to `quantize`, now or (`defer`, an init or plan that reads the dense
    /// weights first) after loading, else held in `base_dtype`: a weight bound for 4 bits is read in f32 either
    /// way, never rounded to bf16 first.
    pub fn planned(quantize: Option<Nf4Options>, defer: bool, base_dtype: DType) -> Self {
        LoadOptions {
            quantize: quantize.filter(|_| !defer),
            base_dtype: if quantize.is_some() {
                DType::F32
            } else {
                base_dtype
            },
        }
    }

    /// The dtype a `base_dtype` / `torch_dtype` name stands for (`float32`/`f32`, `bfloat16`/`bf16`).
    pub fn dtype_named(name: &str) -> Option<DType> {
        match name {
            "float32" | "f32" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl From<Option<Nf4Options>> for LoadOptions {
    fn from(quantize: Option<Nf4Options>) -> Self {
        LoadOptions {
            quantize,
            ..Default::default()
        }
    }
}

/// Quantise the blocks' linear weights to NF4 while loading (QLoRA): each is read, quantised and its f32
/// copy dropped before the next, so peak memory never holds the dense model. Embeddings, norms and the LM
/// head stay in full precision, as bitsandbytes leaves them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nf4Options {
    pub double_quant: bool,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.w.get_shaped(
            &format!("{}{name}", self.prefix),
            shape,
            DType::F32,
            self.dev,
        )
    }

    fn opt(&self, name: &str, shape: &[usize], present: bool) -> Result<Option<Tensor>> {
        if present {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A linear weight as stored (dense or 4-bit), quantised if the load asks for it.
    fn weight(&self, key: &str, out: usize, inp: usize, transposed: bool) -> Result<BaseWeight> {
        // A weight about to be quantised is read in f32, not rounded to bf16 first.
        let dtype = match self.opts.quantize {
            Some(_) => DType::F32,
            None => self.opts.base_dtype,
        };
        let w = read_weight(self.w, key, out, inp, transposed, dtype, self.dev)?;
        match (&w, self.opts.quantize) {
            (BaseWeight::Dense(t), Some(o)) => BaseWeight::nf4(t, o.double_quant),
            _ => Ok(w),
        }
    }

    /// A linear layer stored PyTorch-style `[out, in]`.
    fn linear(
        &mut self,
        path: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<AdaptableLinear> {
        let key = format!("{}{path}.weight", self.prefix);
        let w = self.weight(&key, out, inp, false)?;
        let b = self.opt(&format!("{path}.bias"), &[out], bias)?;
        self.next_index += 1;
        Ok(AdaptableLinear::new(
            path.to_string(),
            self.next_index - 1,
            w,
            b,
            key,
            false,
        ))
    }

    /// GPT-2's `Conv1D`, stored `[in, out]`; kept as `[out, in]` in memory so every linear is alike.
    fn conv1d(&mut self, path: &str, out: usize, inp: usize) -> Result<AdaptableLinear> {
        let key = format!("{}{path}.weight", self.prefix);
        let w = self.weight(&key, out, inp, true)?;
        let b = self.get(&format!("{path}.bias"), &[out])?;
        self.next_index += 1;
        // PEFT names GPT-2 modules under `transformer.` whatever the checkpoint's own prefix.
        let peft_path = format!("transformer.{path}");
        Ok(AdaptableLinear::new(
            peft_path,
            self.next_index - 1,
            w,
            Some(b),
            key,
            true,
        ))
    }

    fn rms(&self, name: &str) -> Result<Norm> {
        Ok(Norm::Rms {
            w: self.get(&format!("{name}.weight"), &[self.cfg.hidden_size])?,
            eps: self.cfg.norm_eps,
        })
    }

    fn ln(&self, name: &str) -> Result<Norm> {
        let h = self.cfg.hidden_size;
        Ok(Norm::Layer {
            w: self.get(&format!("{name}.weight"), &[h])?,
            b: self.get(&format!("{name}.bias"), &[h])?,
            eps: self.cfg.norm_eps,
        })
    }
}

impl Model {
    /// Loads a Hugging Face model directory (`config.json` + safetensors).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, None)
    }

    /// [`Model::load`], holding the linear weights as `opts` asks (NF4, bf16; an `Option<Nf4Options>`
    /// converts).
    pub fn load_with(dir: &Path, device: &Device, opts: impl Into<LoadOptions>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(dir, "model directory does not exist"));
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::from_model_dir(dir)?;
        Self::from_weights(cfg, &weights, dir, device, opts.into())
    }

    pub fn from_weights(
        cfg: ModelConfig,
        weights: &Weights,
        dir: &Path,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        if !matches!(opts.base_dtype, DType::F32 | DType::BF16) {
            return Err(Error::config(format!(
                "frozen weights can be held in f32 or bf16, not {:?}",
                opts.base_dtype
            )));
        }
        let c = cfg.clone();
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let mut model = match c.arch {
            Arch::Llama => {
                let mut l = Loader {
                    w: weights,
                    dev: device,
                    cfg: &c,
                    prefix: "",
                    next_index: 0,
                    opts,
                };
                let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                let embed = l.get("model.embed_tokens.weight", &[v, h])?;
                let mut blocks = Vec::with_capacity(c.num_layers);
                for n in 0..c.num_layers {
                    let p = format!("model.layers.{n}");
                    blocks.push(Block {
                        ln1: l.rms(&format!("{p}.input_layernorm"))?,
                        attn: Attn::Split {
                            q: l.linear(&format!("{p}.self_attn.q_proj"), qd, h, c.qkv_bias)?,
                            k: l.linear(&format!("{p}.self_attn.k_proj"), kvd, h, c.qkv_bias)?,
                            v: l.linear(&format!("{p}.self_attn.v_proj"), kvd, h, c.qkv_bias)?,
                            o: l.linear(&format!("{p}.self_attn.o_proj"), h, qd, c.o_bias)?,
                        },
                        ln2: l.rms(&format!("{p}.post_attention_layernorm"))?,
                        mlp: Mlp::SwiGlu {
                            gate: l.linear(&format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias)?,
                            up: l.linear(&format!("{p}.mlp.up_proj"), i, h, c.mlp_bias)?,
                            down: l.linear(&format!("{p}.mlp.down_proj"), h, i, c.mlp_bias)?,
                        },
                    });
                }
                let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
                    if !c.tie_word_embeddings {
                        return Err(Error::invalid(
                            dir,
                            "missing tensor `lm_head.weight` (config.json says tie_word_embeddings: false)",
                        ));
                    }
                    embed.clone()
                } else {
                    l.get("lm_head.weight", &[v, h])?
                };
                let max_pos = c.max_position_embeddings;
                let rope = Rope::new(
                    c.head_dim,
                    max_pos,
                    c.rope_theta,
                    c.rope_scaling.as_ref(),
                    device,
                )?;
                Model {
                    final_norm: l.rms("model.norm")?,
                    cfg: cfg.clone(),
                    dir: dir.to_path_buf(),
                    device: device.clone(),
                    embed,
                    pos_embed: None,
                    rope: Some(rope),
                    blocks,
                    lm_head,
                }
            }
            Arch::Gpt2 => {
                // Checkpoints saved from GPT2LMHeadModel carry `transformer.`; the original hub files do not.
                let prefix = if weights.contains("transformer.wte.weight") {
                    "transformer."
                } else {
                    ""
                };
                let mut l = Loader {
                    w: weights,
                    dev: device,
                    cfg: &c,
                    prefix,
                    next_index: 0,
                    opts,
                };
                let embed = l.get("wte.weight", &[v, h])?;
                let pos = l.get("wpe.weight", &[c.max_position_embeddings, h])?;
                let mut blocks = Vec::with_capacity(c.num_layers);
                for n in 0..c.num_layers {
                    let p = format!("h.{n}");
                    blocks.push(Block {
                        ln1: l.ln(&format!("{p}.ln_1"))?,
                        attn: Attn::Fused {
                            qkv: l.conv1d(&format!("{p}.attn.c_attn"), 3 * h, h)?,
                            o: l.conv1d(&format!("{p}.attn.c_proj"), h, h)?,
                        },
                        ln2: l.ln(&format!("{p}.ln_2"))?,
                        mlp: Mlp::Gelu {
                            fc: l.conv1d(&format!("{p}.mlp.c_fc"), i, h)?,
                            proj: l.conv1d(&format!("{p}.mlp.c_proj"), h, i)?,
                        },
                    });
                }
                let lm_head = if !c.tie_word_embeddings && weights.contains("lm_head.weight") {
                    weights.get_shaped("lm_head.weight", &[v, h], DType::F32, device)?
                } else {
                    embed.clone()
                };
                Model {
                    final_norm: l.ln("ln_f")?,
                    cfg: cfg.clone(),
                    dir: dir.to_path_buf(),
                    device: device.clone(),
                    embed,
                    pos_embed: Some(pos),
                    rope: None,
                    blocks,
                    lm_head,
                }
            }
        };
        model.cfg = cfg;
        Ok(model)
    }

    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Final hidden states `[B, T, H]` for token ids `[B, T]`, continuing after the cached positions.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let mut x = self.embed_tokens(ids, offset)?;
        let mask = self.mask_for(ids.dim(1)?, offset)?;
        for (n, blk) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, n));
            x = self.block_forward(blk, &x, layer_cache, offset, &mask, ctx)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }

    /// Token (and, for GPT-2, position) embeddings `[B, T, H]` of ids `[B, T]` at positions `offset..`,
    /// after checking the ids and the length against the model.
    fn embed_tokens(&self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if offset + t > self.max_positions() {
            return Err(Error::config(format!(
                "sequence of {} tokens exceeds the model's context of {} positions (max_position_embeddings in {})",
                offset + t,
                self.max_positions(),
                self.dir.join("config.json").display()
            )));
        }
        if let Some(w) = self.cfg.sliding_window {
            if offset + t > w {
                return Err(Error::config(format!(
                    "sequence of {} tokens is longer than the sliding window ({w}); sliding-window attention is not implemented yet",
                    offset + t
                )));
            }
        }
        let vocab = self.cfg.vocab_size as u32;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id >= vocab {
            return Err(Error::config(format!(
                "token id {max_id} is outside the vocabulary of {vocab}"
            )));
        }
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        if let Some(pe) = &self.pos_embed {
            x = x.broadcast_add(&pe.narrow(0, offset, t)?)?;
        }
        Ok(x)
    }

    fn mask_for(&self, t: usize, offset: usize) -> Result<Tensor> {
        let rep = self.cfg.num_heads / self.cfg.num_kv_heads;
        Ok(causal_mask(t, offset, rep, &self.device)?)
    }

    /// One block: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
    fn block_forward(
        &self,
        blk: &Block,
        x: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        offset: usize,
        mask: &Tensor,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let h = blk.ln1.forward(x)?;
        let a = self.attention(&blk.attn, &h, cache, offset, mask, ctx)?;
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
            let hidden = self.forward_hidden(ids, None, ctx)?;
            let (loss, n) = self.lm_loss(&hidden, labels)?;
            take_grads(loss.backward()?, wanted, &mut out)?;
            return Ok((loss.detach(), n, out));
        }
        let x0 = self.embed_tokens(ids, 0)?;
        let mask = self.mask_for(ids.dim(1)?, 0)?;
        // Forward, keeping each block's input only; the graph of a block is dropped as soon as it has run.
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = x0.detach();
        for blk in &self.blocks {
            let y = self.block_forward(blk, &x, None, 0, &mask, ctx)?.detach();
            inputs.push(std::mem::replace(&mut x, y));
        }
        // The head and the loss, differentiated with respect to the last block's output.
        let top = Var::from_tensor(&x)?;
        drop(x);
        let (loss, n) = self.lm_loss(&self.final_norm.forward(top.as_tensor())?, labels)?;
        let mut g = take_grads(loss.backward()?, wanted, &mut out)?
            .remove(top.as_tensor())
            .map(|t| t.detach());
        let loss = loss.detach();
        // Blocks from the top down: recompute, differentiate <output, dY>, pass dX down.
        for (blk, input) in self.blocks.iter().zip(inputs).rev() {
            let Some(dy) = g else { break };
            let xv = Var::from_tensor(&input)?;
            drop(input);
            let y = self.block_forward(blk, xv.as_tensor(), None, 0, &mask, ctx)?;
            let bg = (y * dy)?.sum_all()?.backward()?;
            g = take_grads(bg, wanted, &mut out)?
                .remove(xv.as_tensor())
                .map(|t| t.detach());
        }
        if let (Some(dx), true) = (g, x0.track_op()) {
            take_grads((x0 * dx)?.sum_all()?.backward()?, wanted, &mut out)?;
        }
        Ok((loss, n, out))
    }

    fn attention(
        &self,
        attn: &Attn,
        h: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        offset: usize,
        mask: &Tensor,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        match attn {
            Attn::Split { q, k, v, o } => {
                let rope = self.rope.as_ref().expect("llama-family models have RoPE");
                let qh = rope.apply_heads(&q.forward(h, ctx)?, nh, offset)?;
                let kh = rope.apply_heads(&k.forward(h, ctx)?, nkv, offset)?;
                let vh = heads(v.forward(h, ctx)?, nkv)?;
                o.forward(&causal_attention(&qh, kh, vh, cache, mask)?, ctx)
            }
            Attn::Fused { qkv, o } => {
                let hs = self.cfg.hidden_size;
                let y = qkv.forward(h, ctx)?;
                let qh = heads(y.narrow(2, 0, hs)?, nh)?;
                let kh = heads(y.narrow(2, hs, hs)?, nh)?;
                let vh = heads(y.narrow(2, 2 * hs, hs)?, nh)?;
                o.forward(&causal_attention(&qh, kh, vh, cache, mask)?, ctx)
            }
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

    /// Every tensor of the model under its Hugging Face key and in its stored layout, in a stable order (a
    /// tied head listed once; 4-bit weights dequantised).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_tensors_with(true)
    }

    /// [`Model::named_tensors`], without the 4-bit weights unless `dequantize` (then as f32 copies).
    fn named_tensors_with(&self, dequantize: bool) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let gpt2 = self.cfg.arch == Arch::Gpt2;
        let (embed_key, final_key) = if gpt2 {
            ("transformer.wte.weight", "transformer.ln_f")
        } else {
            ("model.embed_tokens.weight", "model.norm")
        };
        out.push((embed_key.to_string(), self.embed.clone()));
        if let Some(p) = &self.pos_embed {
            out.push(("transformer.wpe.weight".into(), p.clone()));
        }
        let norm = |out: &mut Vec<(String, Tensor)>, n: &Norm, key: String| match n {
            Norm::Rms { w, .. } => out.push((format!("{key}.weight"), w.clone())),
            Norm::Layer { w, b, .. } => {
                out.push((format!("{key}.weight"), w.clone()));
                out.push((format!("{key}.bias"), b.clone()));
            }
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let (l1, l2) = if gpt2 {
                (
                    format!("transformer.h.{i}.ln_1"),
                    format!("transformer.h.{i}.ln_2"),
                )
            } else {
                (
                    format!("model.layers.{i}.input_layernorm"),
                    format!("model.layers.{i}.post_attention_layernorm"),
                )
            };
            norm(&mut out, &b.ln1, l1);
            norm(&mut out, &b.ln2, l2);
        }
        for l in self.linears() {
            if dequantize || l.base.weight.as_nf().is_none() {
                let w = l.base.weight.dense().expect("NF4 weights dequantise");
                // GPT-2's Conv1D is stored [in, out].
                let w = if l.stored_transposed {
                    w.t().expect("2-D weight")
                } else {
                    w
                };
                out.push((format!("{}.weight", l.path), w));
            }
            if let Some(b) = &l.base.bias {
                out.push((format!("{}.bias", l.path), b.clone()));
            }
        }
        norm(&mut out, &self.final_norm, final_key.to_string());
        if self.lm_head.id() != self.embed.id() {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        out
    }

    /// Every tensor in [`Model::named_tensors`]' order (a tied head is the embedding) but the 4-bit weights
    /// (see [`Model::quantized_keys`]), mutable, with whether it is a linear weight kept transposed relative to
    /// its stored layout.
    fn tensors_mut(&mut self) -> Vec<(&mut Tensor, bool)> {
        fn norm(n: &mut Norm) -> Vec<(&mut Tensor, bool)> {
            match n {
                Norm::Rms { w, .. } => vec![(w, false)],
                Norm::Layer { w, b, .. } => vec![(w, false), (b, false)],
            }
        }
        let tied = self.lm_head.id() == self.embed.id();
        let mut out = vec![(&mut self.embed, false)];
        if let Some(p) = &mut self.pos_embed {
            out.push((p, false));
        }
        let mut linears = Vec::new();
        for b in &mut self.blocks {
            out.extend(norm(&mut b.ln1));
            out.extend(norm(&mut b.ln2));
            let (attn, mlp) = (&mut b.attn, &mut b.mlp);
            match attn {
                Attn::Split { q, k, v, o } => linears.extend([q, k, v, o]),
                Attn::Fused { qkv, o } => linears.extend([qkv, o]),
            }
            match mlp {
                Mlp::SwiGlu { gate, up, down } => linears.extend([gate, up, down]),
                Mlp::Gelu { fc, proj } => linears.extend([fc, proj]),
            }
        }
        for l in linears {
            if let BaseWeight::Dense(w) = &mut l.base.weight {
                out.push((w, l.stored_transposed));
            }
            if let Some(b) = &mut l.base.bias {
                out.push((b, false));
            }
        }
        out.extend(norm(&mut self.final_norm));
        if !tied {
            out.push((&mut self.lm_head, false));
        }
        out
    }

    /// Makes the tensors whose key `pick` accepts trainable `Var`s and freezes every other one; returns the
    /// trainable ones by key. Full-parameter training picks all; ReLoRA picks embeddings and norms.
    pub fn set_trainable(
        &mut self,
        pick: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, candle_core::Var)>> {
        use candle_core::Var;
        let tied = self.lm_head.id() == self.embed.id();
        let quantized = self.quantized_keys();
        if let Some(k) = quantized.iter().find(|k| pick(k)) {
            return Err(Error::config(format!(
                "`{k}` is stored in 4 bits and cannot be trained; train adapters on a 4-bit base, or load \
                 the model without quantisation for full-parameter training"
            )));
        }
        let names: Vec<String> = self
            .named_tensors_with(false)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut vars = Vec::new();
        for (name, (t, _)) in names.into_iter().zip(self.tensors_mut()) {
            if pick(&name) {
                // Trained in f32 whatever the frozen weights are held in.
                let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                *t = v.as_tensor().clone();
                vars.push((name, v));
            } else {
                *t = t.detach();
            }
        }
        if tied {
            self.lm_head = self.embed.clone();
        }
        Ok(vars)
    }

    /// Quantises every dense linear weight of the blocks to NF4, or to its planned width (those already
    /// quantised stay as they are); returns how many it converted.
    pub fn quantize_linears(&mut self, opts: Nf4Options) -> Result<usize> {
        let mut n = 0;
        for l in self.linears_mut() {
            if let BaseWeight::Dense(w) = &l.base.weight {
                if w.is_variable() {
                    return Err(Error::config(format!(
                        "`{}` is being trained and cannot be quantised",
                        l.path
                    )));
                }
                l.base.weight = BaseWeight::nf(w, l.planned_bits.unwrap_or(4), opts.double_quant)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Bytes the linear weights of the blocks occupy in memory (NF4 packed or dense).
    pub fn linear_weight_bytes(&self) -> usize {
        self.linears()
            .iter()
            .map(|l| match &l.base.weight {
                BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
                BaseWeight::Nf(q, _) => q.storage_bytes(),
            })
            .sum()
    }

    /// Keys (as in [`Model::named_tensors`]) of the weights held in 4 bits.
    pub fn quantized_keys(&self) -> std::collections::HashSet<String> {
        self.linears()
            .iter()
            .filter(|l| l.base.weight.as_nf().is_some())
            .map(|l| format!("{}.weight", l.path))
            .collect()
    }

    /// Whether `key` (as in [`Model::named_tensors`]) is the weight or bias of a linear layer.
    pub fn is_linear_key(&self, key: &str) -> bool {
        self.linears().iter().any(|l| {
            key.strip_prefix(l.path.as_str())
                .is_some_and(|rest| rest == ".weight" || rest == ".bias")
        })
    }

    /// Replaces every tensor with the one of the same key in `weights` (a checkpoint of this architecture, as
    /// written from [`Model::named_tensors`]); all of them must be present with the same shapes. The result is
    /// frozen; call [`Model::set_trainable`] afterwards.
    pub fn load_state(&mut self, weights: &Weights) -> Result<()> {
        let tied = self.lm_head.id() == self.embed.id();
        let dev = self.device.clone();
        let named = self.named_tensors_with(false);
        for ((name, stored), (t, transposed)) in named.into_iter().zip(self.tensors_mut()) {
            let loaded = weights.get_shaped(&name, stored.dims(), DType::F32, &dev)?;
            *t = if transposed {
                loaded.t()?.contiguous()?
            } else {
                loaded
            };
        }
        if tied {
            self.lm_head = self.embed.clone();
        }
        Ok(())
    }
}
