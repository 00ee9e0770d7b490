//! What PEFT's prompt-learning methods share: a table of `num_virtual_tokens` rows, optionally passed through
//! a small encoder each forward (P-tuning's MLP, prefix tuning's projection), whose output becomes virtual
//! input embeddings or per-layer key/value prefixes. On disk, as PEFT: the output alone, `prompt_embeddings`
//! (what PEFT loads for inference); factune's checkpoints also keep the encoder, as
//! `prompt_encoder.<PEFT's parameter name>`, so a run resumes exactly.

use crate::config::AdapterConfig;
use crate::{kaiming_uniform, normal};
use candle_core::{Tensor, Var};
use factune_io::{Error, Result};
use factune_model::{Ctx, Model, PromptAdapter, VirtualInputs};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// `method_keys!` for a prompt-learning method: its own keys, then the ones every `PromptLearningConfig` has.
macro_rules! prompt_method_keys {
    ($(#[doc = $sdoc:literal])* pub struct $name:ident { $($own:tt)* }) => {
        crate::keys::method_keys! {
            $(#[doc = $sdoc])*
            pub struct $name {
                $($own)*
                /// Prompt family: number of virtual tokens placed before every input.
                num_virtual_tokens: usize = 20,
                /// Prompt family: the width PEFT records (hidden size; kv_heads · head_dim for prefix tuning), checked against the model when set.
                token_dim: Option<usize> = None,
                /// Prompt family: the heads PEFT records (key/value heads for prefix tuning), checked against the model when set.
                num_attention_heads: Option<usize> = None,
                /// Prompt family: the model's layers (PEFT records it), checked against the model when set.
                num_layers: Option<usize> = None,
                /// Prompt family: transformer stacks the prompt feeds (1 for decoder-only models).
                num_transformer_submodules: Option<usize> = None,
            }
        }
    };
}

pub(crate) use prompt_method_keys;

/// PEFT's name of the saved output.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
const ENCODER: &str = "prompt_encoder.";

/// What the table (or its encoder) produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `[n, hidden]` virtual input embeddings.
    Embeddings,
    /// `[n, layers · 2 · kv_heads · head_dim]`, PEFT's layout of per-layer keys and values.
    KvPrefix {
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    },
}

impl Output {
    /// Width of one virtual token's output.
    pub fn width(&self, model: &Model) -> usize {
        match *self {
            Output::Embeddings => model.cfg.hidden_size,
            Output::KvPrefix {
                layers,
                kv_heads,
                head_dim,
            } => layers * 2 * kv_heads * head_dim,
        }
    }

    /// The output form of a model: keys and values for prefix tuning, embeddings otherwise.
    pub fn kv_prefix(model: &Model) -> Self {
        Output::KvPrefix {
            layers: model.cfg.num_layers,
            kv_heads: model.cfg.num_kv_heads,
            head_dim: model.cfg.head_dim,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Tanh,
}

/// An encoder layer's name, `[out, in]` and activation.
pub type LayerSpec = (String, (usize, usize), Option<Activation>);

/// One `nn.Linear` of an encoder and the activation after it, if any.
pub struct Layer {
    pub name: String,
    pub weight: Var,
    pub bias: Var,
    pub act: Option<Activation>,
}

impl Layer {
    /// PyTorch's default `nn.Linear` init (weight and bias U(−1/√in, 1/√in)).
    pub fn new(
        name: String,
        (out, inp): (usize, usize),
        act: Option<Activation>,
        rng: &mut ChaCha8Rng,
        model: &Model,
    ) -> Result<Self> {
        let dev = &model.device;
        Ok(Layer {
            name,
            weight: Var::from_tensor(&kaiming_uniform(&[out, inp], inp, rng, dev)?)?,
            bias: Var::from_tensor(&kaiming_uniform(&[out], inp, rng, dev)?)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?;
        match self.act {
            Some(Activation::Relu) => y.relu(),
            Some(Activation::Tanh) => y.tanh(),
            None => Ok(y),
        }
    }
}

/// The shape of P-tuning's LSTM encoder (PEFT's `lstm_head`, bidirectional).
#[derive(Debug, Clone, Copy)]
pub struct LstmSpec {
    pub input: usize,
    pub hidden: usize,
    pub layers: usize,
    /// Between layers, while training (PyTorch's `dropout`).
    pub dropout: f64,
}

impl LstmSpec {
    /// PyTorch's parameter names and shapes, layer by layer, forward then reverse: weight_ih, weight_hh,
    /// bias_ih, bias_hh (gates stacked i, f, g, o).
    fn params(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let mut out = Vec::new();
        for k in 0..self.layers {
            let inp = if k == 0 { self.input } else { 2 * h };
            for dir in ["", "_reverse"] {
                out.push((format!("weight_ih_l{k}{dir}"), vec![4 * h, inp]));
                out.push((format!("weight_hh_l{k}{dir}"), vec![4 * h, h]));
                out.push((format!("bias_ih_l{k}{dir}"), vec![4 * h]));
                out.push((format!("bias_hh_l{k}{dir}"), vec![4 * h]));
            }
        }
        out
    }
}

/// P-tuning's LSTM over the table's rows as one sequence, zero initial state, PyTorch's equations; its output
/// at each row is the forward and reverse hidden states side by side.
pub struct Lstm {
    pub spec: LstmSpec,
    /// In [`LstmSpec::params`]' order.
    pub params: Vec<Var>,
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl Lstm {
    /// PyTorch's init: every weight and bias U(−1/√hidden, 1/√hidden).
    pub fn new(spec: LstmSpec, rng: &mut ChaCha8Rng, model: &Model) -> Result<Self> {
        let params = spec
            .params()
            .iter()
            .map(|(_, shape)| {
                Ok(Var::from_tensor(&kaiming_uniform(
                    shape,
                    spec.hidden,
                    rng,
                    &model.device,
                )?)?)
            })
            .collect::<Result<_>>()?;
        Ok(Lstm { spec, params })
    }

    fn named(&self) -> Vec<(String, Var)> {
        self.spec
            .params()
            .into_iter()
            .zip(&self.params)
            .map(|((n, _), v)| (format!("{ENCODER}lstm_head.{n}"), v.clone()))
            .collect()
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for k in 0..self.spec.layers {
            if k > 0 {
                x = crate::adapter_input(&x, self.spec.dropout, ctx)?;
            }
            let p = &self.params[8 * k..8 * k + 8];
            let fwd = self.direction(&x, &p[..4], false)?;
            let rev = self.direction(&x, &p[4..], true)?;
            x = Tensor::cat(&[fwd, rev], 1)?;
        }
        Ok(x)
    }

    /// One direction of one layer: `[n, in]` → `[n, hidden]`.
    fn direction(&self, x: &Tensor, p: &[Var], reverse: bool) -> candle_core::Result<Tensor> {
        let (n, h) = (x.dims()[0], self.spec.hidden);
        let (wih, whh, bih, bhh) = (
            p[0].as_tensor(),
            p[1].as_tensor(),
            p[2].as_tensor(),
            p[3].as_tensor(),
        );
        let xw = x
            .matmul(&wih.t()?)?
            .broadcast_add(bih)?
            .broadcast_add(bhh)?;
        let whh_t = whh.t()?;
        let mut hidden = Tensor::zeros((1, h), x.dtype(), x.device())?;
        let mut cell = hidden.clone();
        let mut out: Vec<Option<Tensor>> = vec![None; n];
        let steps: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in steps {
            let g = (xw.narrow(0, t, 1)? + hidden.matmul(&whh_t)?)?;
            let i = sigmoid(&g.narrow(1, 0, h)?)?;
            let f = sigmoid(&g.narrow(1, h, h)?)?;
            let c = g.narrow(1, 2 * h, h)?.tanh()?;
            let o = sigmoid(&g.narrow(1, 3 * h, h)?)?;
            cell = ((f * cell)? + (i * c)?)?;
            hidden = (o * cell.tanh()?)?;
            out[t] = Some(hidden.clone());
        }
        let rows: Vec<Tensor> = out
            .into_iter()
            .map(|r| r.expect("every step ran"))
            .collect();
        Tensor::cat(&rows, 0)
    }
}

/// A prompt-learning adapter: the table, and the encoder it is trained through (none once loaded from
/// PEFT's saved output).
pub struct Prompt {
    pub method: &'static str,
    pub output: Output,
    pub table: Var,
    /// P-tuning's LSTM, before the layers.
    pub lstm: Option<Lstm>,
    pub encoder: Vec<Layer>,
}

impl Prompt {
    fn table_name(&self) -> &'static str {
        if self.encoder.is_empty() && self.lstm.is_none() {
            PROMPT_EMBEDDINGS
        } else {
            "prompt_encoder.embedding.weight"
        }
    }

    fn output(&self, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let mut x = self.table.as_tensor().clone();
        if let Some(lstm) = &self.lstm {
            x = lstm.forward(&x, ctx)?;
        }
        for l in &self.encoder {
            x = l.forward(&x)?;
        }
        Ok(x)
    }

    /// Rebuilds an adapter saved by PEFT (`prompt_embeddings`, the output) or by a factune checkpoint (the
    /// table and `encoder`'s tensors under `prompt_encoder.`), checking every name and shape. `encoder` lists
    /// the layers a checkpoint must hold (their names, shapes and activations).
    pub fn from_tensors(
        method: &'static str,
        output: Output,
        n: usize,
        model: &Model,
        encoder: &[LayerSpec],
        table_width: usize,
        t: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        Self::from_tensors_with(method, output, n, model, (None, encoder), table_width, t)
    }

    /// [`Prompt::from_tensors`] with P-tuning's LSTM before the layers, where `encoder.0` is given.
    pub fn from_tensors_with(
        method: &'static str,
        output: Output,
        n: usize,
        model: &Model,
        encoder: (Option<LstmSpec>, &[LayerSpec]),
        table_width: usize,
        t: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        let (lstm_spec, encoder) = encoder;
        let width = output.width(model);
        let shaped = |name: &str, shape: &[usize]| -> Result<Var> {
            let v = t
                .get(name)
                .ok_or_else(|| Error::config(format!("missing tensor `{name}`")))?;
            if v.dims() != shape {
                return Err(Error::config(format!(
                    "tensor `{name}` is {:?}; this model and num_virtual_tokens = {n} need {shape:?}",
                    v.dims()
                )));
            }
            Ok(Var::from_tensor(v)?)
        };
        let check_names = |known: &[String]| -> Result<()> {
            match t.keys().find(|k| !known.contains(k)) {
                Some(k) => Err(Error::config(format!(
                    "unexpected tensor `{k}` in a {method} adapter (expected {})",
                    known.join(", ")
                ))),
                None => Ok(()),
            }
        };
        if t.contains_key(PROMPT_EMBEDDINGS) {
            check_names(&[PROMPT_EMBEDDINGS.to_string()])?;
            return Ok(Prompt {
                method,
                output,
                table: shaped(PROMPT_EMBEDDINGS, &[n, width])?,
                lstm: None,
                encoder: Vec::new(),
            });
        }
        if encoder.is_empty() && lstm_spec.is_none() {
            return Err(Error::config(format!(
                "missing tensor `{PROMPT_EMBEDDINGS}` (the {method} adapter's [{n}, {width}] table)"
            )));
        }
        let table_key = format!("{ENCODER}embedding.weight");
        let mut known = vec![table_key.clone()];
        let lstm = match lstm_spec {
            Some(spec) => {
                let mut params = Vec::new();
                for (name, shape) in spec.params() {
                    let key = format!("{ENCODER}lstm_head.{name}");
                    params.push(shaped(&key, &shape)?);
                    known.push(key);
                }
                Some(Lstm { spec, params })
            }
            None => None,
        };
        let mut layers = Vec::new();
        for (name, (out, inp), act) in encoder {
            let (w, b) = (
                format!("{ENCODER}{name}.weight"),
                format!("{ENCODER}{name}.bias"),
            );
            layers.push(Layer {
                name: name.clone(),
                weight: shaped(&w, &[*out, *inp])?,
                bias: shaped(&b, &[*out])?,
                act: *act,
            });
            known.extend([w, b]);
        }
        check_names(&known)?;
        Ok(Prompt {
            method,
            output,
            table: shaped(&table_key, &[n, table_width])?,
            lstm,
            encoder: layers,
        })
    }
}

impl PromptAdapter for Prompt {
    fn method(&self) -> &'static str {
        self.method
    }

    fn num_virtual_tokens(&self) -> usize {
        self.table.dims()[0]
    }

    fn virtual_inputs(&self, ctx: &Ctx) -> candle_core::Result<VirtualInputs> {
        let y = self.output(ctx)?;
        match self.output {
            Output::Embeddings => Ok(VirtualInputs::Embeddings(y)),
            Output::KvPrefix {
                layers,
                kv_heads,
                head_dim,
            } => {
                // PEFT's view [n, layers·2, kv_heads, head_dim] permuted to [layers·2, kv_heads, n, head_dim]:
                // entry 2l is layer l's keys, 2l + 1 its values
                let n = y.dims()[0];
                let kv = y
                    .reshape((n, layers * 2, kv_heads, head_dim))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?;
                (0..layers)
                    .map(|l| Ok((kv.get(2 * l)?, kv.get(2 * l + 1)?)))
                    .collect::<candle_core::Result<_>>()
                    .map(VirtualInputs::KvPrefix)
            }
        }
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut out = vec![(self.table_name().to_string(), self.table.clone())];
        out.extend(self.lstm.iter().flat_map(Lstm::named));
        for l in &self.encoder {
            out.push((format!("{ENCODER}{}.weight", l.name), l.weight.clone()));
            out.push((format!("{ENCODER}{}.bias", l.name), l.bias.clone()));
        }
        out
    }

    fn portable(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            PROMPT_EMBEDDINGS.to_string(),
            self.output(&Ctx::default())?.detach(),
        )])
    }
}

/// `N(0, 1)` rows, as `nn.Embedding` starts.
pub fn random_table(n: usize, width: usize, rng: &mut ChaCha8Rng, model: &Model) -> Result<Var> {
    Ok(Var::from_tensor(&normal(
        &[n, width],
        1.0,
        rng,
        &model.device,
    )?)?)
}

/// The settings every prompt-learning config carries (PEFT's `PromptLearningConfig`), checked against the
/// model: `num_virtual_tokens` > 0 and fitting the context, and the model shape PEFT recorded, where it did.
pub fn check_shape(
    cfg: &AdapterConfig,
    model: &Model,
    n: usize,
    recorded: [(&str, Option<usize>, usize); 3],
) -> Result<()> {
    let method = cfg.peft_type();
    if n == 0 {
        return Err(Error::config(format!(
            "{method}: num_virtual_tokens must be at least 1"
        )));
    }
    let context = model.cfg.max_position_embeddings;
    if n >= context {
        return Err(Error::config(format!(
            "{method}: num_virtual_tokens = {n} leaves no room in the model's context of {context} positions"
        )));
    }
    for (key, given, want) in recorded {
        if let Some(g) = given.filter(|&g| g != want) {
            return Err(Error::config(format!(
                "{method}: {key} = {g}, but the model has {want} (the adapter was made for another model)"
            )));
        }
    }
    Ok(())
}

/// Refuses an encoder whose parameters, with their gradients and two optimizer moments (four f32 copies), exceed
/// this machine's memory, before any is allocated. `layers` are the linear layers; `lstm` adds P-tuning's LSTM
/// (counted without listing its tensors, so a huge layer count allocates nothing).
pub fn check_encoder_memory(
    cfg: &AdapterConfig,
    layers: &[LayerSpec],
    lstm: Option<&LstmSpec>,
) -> Result<()> {
    let Some(total) = factune_io::memory::physical_bytes() else {
        return Ok(());
    };
    let mut params: f64 = layers
        .iter()
        .map(|(_, (out, inp), _)| *out as f64 * (*inp as f64 + 1.0))
        .sum();
    if let Some(l) = lstm {
        let h = l.hidden as f64;
        let per_direction = |inp: f64| 4.0 * h * (inp + h + 2.0);
        params += 2.0 * per_direction(l.input as f64)
            + 2.0 * (l.layers as f64 - 1.0).max(0.0) * per_direction(2.0 * h);
    }
    let need = params * 4.0 * 4.0;
    if need > total as f64 {
        return Err(Error::config(format!(
            "{}: the encoder (encoder_hidden_size, encoder_num_layers) has {params:.3e} parameters, {:.1} GB \
             with gradients and optimizer state, more than this machine's {:.1} GB",
            cfg.peft_type(),
            need / 1e9,
            total as f64 / 1e9
        )));
    }
    Ok(())
}

/// `num_transformer_submodules`: decoder-only models have one stack (PEFT's 2 is for encoder-decoders).
pub fn check_submodules(cfg: &AdapterConfig, given: Option<usize>) -> Result<()> {
    match given {
        None | Some(1) => Ok(()),
        Some(k) => Err(Error::config(format!(
            "{}: num_transformer_submodules = {k}; factune's models are decoder-only (1)",
            cfg.peft_type()
        ))),
    }
}
