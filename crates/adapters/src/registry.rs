//! Adapter methods by `peft_type`. Adding a method = its module (config, [`Method`] with its attachment
//! point, layer) + one variant of [`MethodConfig`](crate::method_config::MethodConfig), which is also the list
//! searched here.

use crate::config::AdapterConfig;
use crate::method_config::METHODS;
use candle_core::Tensor;
use factune_io::{Error, Result};
use factune_model::{AdaptableLinear, LinearAdapter, Model, PromptAdapter};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

pub trait Method: Sync {
    fn peft_type(&self) -> &'static str;
    /// Where the method attaches to the model.
    fn attachment(&self) -> Attachment<'_>;
    /// What the method adds to each training step, if anything (made after the adapters are attached).
    fn step_hook(
        &self,
        _cfg: &AdapterConfig,
        _model: &Model,
    ) -> Result<Option<Box<dyn crate::hooks::StepHook>>> {
        Ok(None)
    }
}

/// A method's attachment point, with what it implements there.
pub enum Attachment<'a> {
    /// Targeted linear layers, each given a [`LinearAdapter`] (the LoRA family, VeRA, MPO, …).
    Linear(&'a dyn LinearMethod),
    /// The sequence: virtual input embeddings or per-layer KV prefixes (the prompt family).
    Prompt(&'a dyn PromptMethod),
}

impl Attachment<'_> {
    pub fn is_prompt(&self) -> bool {
        matches!(self, Attachment::Prompt(_))
    }
}

/// A method that adapts targeted linear layers.
pub trait LinearMethod: Sync {
    /// Tensor names per module as saved in `adapter_model.safetensors`, relative to the module path.
    fn tensor_names(&self, cfg: &AdapterConfig) -> Vec<&'static str>;
    /// A freshly initialised adapter for one layer. Inits built from W (PiSSA) may rewrite the layer's frozen
    /// weight (to a residual), hence `&mut`.
    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        rank: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
        shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>>;
    /// Names among `tensor_names` a module may lack (a part that does not apply to its layer).
    fn optional_names(&self) -> &'static [&'static str] {
        &[]
    }
    /// Names of tensors shared by every adapted layer (VeRA's projections), stored once in the file as
    /// `base_model.<name>` and handed to `load_tensors` among the module's own.
    fn shared_names(&self) -> &'static [&'static str] {
        &[]
    }
    /// The shared tensors for a model whose adapted layers have the shapes `[out, in]` given.
    fn init_shared(
        &self,
        _cfg: &AdapterConfig,
        _shapes: &[(usize, usize)],
        _dev: &candle_core::Device,
    ) -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::new())
    }
    /// Checks shared tensors read from a file against the layers they are loaded onto (`[out, in]` of each
    /// targeted layer), before any layer is built.
    fn check_shared(
        &self,
        _cfg: &AdapterConfig,
        _shapes: &[(usize, usize)],
        _shared: &HashMap<String, Tensor>,
    ) -> Result<()> {
        Ok(())
    }
    /// Whether the shared tensors are trained (SAID's θ) rather than fixed (VeRA's projections): a loaded one
    /// is then one variable handed to every layer.
    fn trains_shared(&self) -> bool {
        false
    }
    /// An adapter rebuilt from saved tensors (every name of `tensor_names` is present).
    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>>;
}

/// A method that adds positions to the sequence (see `factune_model::prompt`).
pub trait PromptMethod: Sync {
    /// A freshly initialised adapter for `model` (whose vocabulary embeddings a text init reads).
    fn init(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn PromptAdapter>>;
    /// An adapter rebuilt from the tensors of an adapter file, by their names there.
    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        model: &Model,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn PromptAdapter>>;
}

pub fn method(peft_type: &str) -> Result<&'static dyn Method> {
    METHODS
        .iter()
        .copied()
        .find(|m| m.peft_type() == peft_type)
        .ok_or_else(|| {
            let known: Vec<_> = METHODS.iter().map(|m| m.peft_type()).collect();
            Error::config(format!(
                "unknown adapter method peft_type `{peft_type}`; supported: {}",
                known.join(", ")
            ))
        })
}
