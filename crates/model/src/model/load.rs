//! Loading a Hugging Face checkpoint: the names of the tensors outside the linear layers, the loader that reads
//! each tensor with its expected shape, and how the frozen weights are held.

use super::{Attn, Block, Mlp, Model, Norm};
use crate::attention::Rope;
use crate::linear::{read_weight, AdaptableLinear, BaseWeight};
use candle_core::{DType, Device, Tensor};
use factune_io::{Arch, Error, ModelConfig, Result, Weights};
use std::path::Path;

/// The Hugging Face names of the tensors outside the linear layers, written once: loading reads them (after
/// the checkpoint's own prefix), saving writes them (after [`TensorNames::save_prefix`]). The linear layers'
/// names are the loader's, kept by each layer as its path.
pub(super) struct TensorNames(pub(super) Arch);

impl TensorNames {
    pub(super) fn embed(&self) -> &'static str {
        match self.0 {
            Arch::Llama => "model.embed_tokens.weight",
            Arch::Gpt2 => "wte.weight",
        }
    }

    /// Learned position embeddings, where the architecture has them.
    pub(super) fn positions(&self) -> Option<&'static str> {
        match self.0 {
            Arch::Llama => None,
            Arch::Gpt2 => Some("wpe.weight"),
        }
    }

    /// The module path of block `i`.
    pub(super) fn block(&self, i: usize) -> String {
        match self.0 {
            Arch::Llama => format!("model.layers.{i}"),
            Arch::Gpt2 => format!("h.{i}"),
        }
    }

    /// The two norms of block `i` (before attention, before the MLP).
    pub(super) fn block_norms(&self, i: usize) -> [String; 2] {
        let b = self.block(i);
        match self.0 {
            Arch::Llama => [
                format!("{b}.input_layernorm"),
                format!("{b}.post_attention_layernorm"),
            ],
            Arch::Gpt2 => [format!("{b}.ln_1"), format!("{b}.ln_2")],
        }
    }

    pub(super) fn final_norm(&self) -> &'static str {
        match self.0 {
            Arch::Llama => "model.norm",
            Arch::Gpt2 => "ln_f",
        }
    }

    /// What saved checkpoints put before every name above (GPT-2 hub files omit it, transformers writes it).
    pub(super) fn save_prefix(&self) -> &'static str {
        match self.0 {
            Arch::Llama => "",
            Arch::Gpt2 => "transformer.",
        }
    }
}

/// The untied output head (both architectures).
pub(super) const LM_HEAD: &str = "lm_head.weight";

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
        let peft_path = format!("{}{path}", TensorNames(Arch::Gpt2).save_prefix());
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
        check_fits(weights, dir, &opts)?;
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
                let names = TensorNames(Arch::Llama);
                let embed = l.get(names.embed(), &[v, h])?;
                let mut blocks = Vec::with_capacity(c.num_layers);
                for n in 0..c.num_layers {
                    let p = names.block(n);
                    let [ln1, ln2] = names.block_norms(n);
                    blocks.push(Block {
                        ln1: l.rms(&ln1)?,
                        attn: Attn::Split {
                            q: l.linear(&format!("{p}.self_attn.q_proj"), qd, h, c.qkv_bias)?,
                            k: l.linear(&format!("{p}.self_attn.k_proj"), kvd, h, c.qkv_bias)?,
                            v: l.linear(&format!("{p}.self_attn.v_proj"), kvd, h, c.qkv_bias)?,
                            o: l.linear(&format!("{p}.self_attn.o_proj"), h, qd, c.o_bias)?,
                        },
                        ln2: l.rms(&ln2)?,
                        mlp: Mlp::SwiGlu {
                            gate: l.linear(&format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias)?,
                            up: l.linear(&format!("{p}.mlp.up_proj"), i, h, c.mlp_bias)?,
                            down: l.linear(&format!("{p}.mlp.down_proj"), h, i, c.mlp_bias)?,
                        },
                    });
                }
                let lm_head = if c.tie_word_embeddings || !weights.contains(LM_HEAD) {
                    if !c.tie_word_embeddings {
                        return Err(Error::invalid(
                            dir,
                            "missing tensor `lm_head.weight` (config.json says tie_word_embeddings: false)",
                        ));
                    }
                    embed.clone()
                } else {
                    l.get(LM_HEAD, &[v, h])?
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
                    final_norm: l.rms(names.final_norm())?,
                    cfg: cfg.clone(),
                    dir: dir.to_path_buf(),
                    device: device.clone(),
                    embed,
                    pos_embed: None,
                    rope: Some(rope),
                    blocks,
                    lm_head,
                    prompt: None,
                }
            }
            Arch::Gpt2 => {
                // Checkpoints saved from GPT2LMHeadModel carry `transformer.`; the original hub files do not.
                let names = TensorNames(Arch::Gpt2);
                let saved_prefix = names.save_prefix();
                let prefix = if weights.contains(&format!("{saved_prefix}{}", names.embed())) {
                    saved_prefix
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
                let embed = l.get(names.embed(), &[v, h])?;
                let positions = names.positions().expect("GPT-2 has learned positions");
                let pos = l.get(positions, &[c.max_position_embeddings, h])?;
                let mut blocks = Vec::with_capacity(c.num_layers);
                for n in 0..c.num_layers {
                    let p = names.block(n);
                    let [ln1, ln2] = names.block_norms(n);
                    blocks.push(Block {
                        ln1: l.ln(&ln1)?,
                        attn: Attn::Fused {
                            qkv: l.conv1d(&format!("{p}.attn.c_attn"), 3 * h, h)?,
                            o: l.conv1d(&format!("{p}.attn.c_proj"), h, h)?,
                        },
                        ln2: l.ln(&ln2)?,
                        mlp: Mlp::Gelu {
                            fc: l.conv1d(&format!("{p}.mlp.c_fc"), i, h)?,
                            proj: l.conv1d(&format!("{p}.mlp.c_proj"), h, i)?,
                        },
                    });
                }
                let lm_head = if !c.tie_word_embeddings && weights.contains(LM_HEAD) {
                    weights.get_shaped(LM_HEAD, &[v, h], DType::F32, device)?
                } else {
                    embed.clone()
                };
                Model {
                    final_norm: l.ln(names.final_norm())?,
                    cfg: cfg.clone(),
                    dir: dir.to_path_buf(),
                    device: device.clone(),
                    embed,
                    pos_embed: Some(pos),
                    rope: None,
                    blocks,
                    lm_head,
                    prompt: None,
                }
            }
        };
        model.cfg = cfg;
        Ok(model)
    }
}

/// Refuses a checkpoint whose weights, as they would be held, exceed this machine's physical memory, before
/// any is read. A floor, so nothing that fits is refused: every floating-point tensor at the smallest width
/// the options allow (4 bytes, 2 with bf16, half a byte with NF4), stored 4-bit tensors as stored.
fn check_fits(weights: &Weights, dir: &Path, opts: &LoadOptions) -> Result<()> {
    let Some(total) = factune_io::memory::physical_bytes() else {
        return Ok(());
    };
    let (per, held) = match (opts.quantize, opts.base_dtype) {
        (Some(_), _) => (0.5, "quantised to NF4"),
        (None, DType::BF16) => (2.0, "in bf16"),
        _ => (4.0, "in f32"),
    };
    let need: f64 = weights
        .names()
        .filter_map(|n| weights.info(n))
        .map(|(shape, dt)| {
            let n = shape.iter().map(|&d| d as f64).product::<f64>();
            match dt {
                safetensors::Dtype::U8 | safetensors::Dtype::I8 => n,
                _ => n * per,
            }
        })
        .sum();
    if need > total as f64 {
        let instead = match (opts.quantize, opts.base_dtype) {
            (Some(_), _) => "a machine with more memory",
            (None, DType::BF16) => "--quantize nf4 (about a quarter of bf16)",
            _ => "--base-dtype bfloat16 (half) or --quantize nf4 (about an eighth)",
        };
        return Err(Error::invalid(
            dir,
            format!(
                "its weights held {held} take at least {:.1} GB, more than this machine's {:.1} GB of memory: \
                 use {instead}",
                need / 1e9,
                total as f64 / 1e9
            ),
        ));
    }
    Ok(())
}
