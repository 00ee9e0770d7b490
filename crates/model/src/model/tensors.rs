//! The model's tensors by Hugging Face name, in one traversal: saving, freezing and unfreezing, quantising the
//! linear weights, and loading a full state back.

use super::load::{TensorNames, LM_HEAD};
use super::{Attn, Mlp, Model, Nf4Options, Norm};
use crate::linear::BaseWeight;
use candle_core::{DType, Tensor};
use factune_io::{Error, Result, Weights};

impl Model {
    /// Every tensor of the model under its Hugging Face key and in its stored layout, in a stable order (a
    /// tied head listed once; 4-bit weights dequantised).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_tensors_with(true)
    }

    /// [`Model::named_tensors`], without the 4-bit weights unless `dequantize` (then as f32 copies).
    fn named_tensors_with(&self, dequantize: bool) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let names = TensorNames(self.cfg.arch);
        let saved = |name: &str| format!("{}{name}", names.save_prefix());
        out.push((saved(names.embed()), self.embed.clone()));
        if let (Some(p), Some(key)) = (&self.pos_embed, names.positions()) {
            out.push((saved(key), p.clone()));
        }
        let norm = |out: &mut Vec<(String, Tensor)>, n: &Norm, key: String| match n {
            Norm::Rms { w, .. } => out.push((format!("{key}.weight"), w.clone())),
            Norm::Layer { w, b, .. } => {
                out.push((format!("{key}.weight"), w.clone()));
                out.push((format!("{key}.bias"), b.clone()));
            }
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let [l1, l2] = names.block_norms(i);
            norm(&mut out, &b.ln1, saved(&l1));
            norm(&mut out, &b.ln2, saved(&l2));
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
        norm(&mut out, &self.final_norm, saved(names.final_norm()));
        if self.lm_head.id() != self.embed.id() {
            out.push((LM_HEAD.into(), self.lm_head.clone()));
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
