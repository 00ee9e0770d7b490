//! Training-time behaviour a method brings to the shared step, so the trainer has no per-method branches.

use crate::config::AdapterConfig;
use candle_core::Tensor;
use factune_io::Result;
use factune_model::{Model, ParamRole};
use std::collections::{BTreeMap, HashMap};

/// What a hook keeps in a checkpoint: tensors (`<name>_state.safetensors`) and metadata (under `<name>` in
/// `trainer_state.json`).
pub type HookState = (BTreeMap<String, Tensor>, serde_json::Value);

/// A run's final adapter when the method saves it differently from its training state: the tensors, the
/// config to write beside them, and a line for the user.
pub type FinalAdapter = (BTreeMap<String, Tensor>, AdapterConfig, String);

/// The optimizer's moments of each trainable tensor, in the trainer's order, with each tensor's role.
pub struct Moments<'a> {
    pub roles: &'a [ParamRole],
    pub exp_avg: &'a mut [Vec<f32>],
    pub exp_avg_sq: &'a mut [Vec<f32>],
}

/// What a method adds to the step (AdaLoRA: an orthogonality penalty in the loss, and a rank update from
/// the step's gradients).
pub trait StepHook {
    /// Names the hook's checkpoint state (file and key).
    fn name(&self) -> &'static str;
    /// Before step `step` (0-based), with the optimizer's moments: a method that restarts (ReLoRA) merges,
    /// re-initialises and resets moments here. A value returned means it did (the trainer's gradient checks
    /// start again) and is logged as the step's event.
    fn before_step(
        &mut self,
        _model: &mut Model,
        _step: usize,
        _moments: Moments<'_>,
    ) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
    /// A term added to each micro-batch's loss, differentiated with it.
    fn penalty(&self, _model: &Model) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Runs after the optimizer update with the step's averaged, clipped gradients (in `names` order); a
    /// value returned is logged with the step's metrics under `key`.
    fn after_update(
        &mut self,
        _model: &mut Model,
        _names: &[&str],
        _grads: &[Vec<f32>],
        _step: usize,
    ) -> Result<Option<(&'static str, serde_json::Value)>> {
        Ok(None)
    }
    /// State to checkpoint, so a resumed run continues exactly.
    fn state(&self) -> Result<Option<HookState>> {
        Ok(None)
    }
    /// Puts back what [`StepHook::state`] saved.
    fn restore(
        &mut self,
        _tensors: &HashMap<String, Tensor>,
        _meta: &serde_json::Value,
    ) -> Result<()> {
        Ok(())
    }
    /// The adapter to write at the end of the run, where it is not the training state as is.
    fn final_adapter(&self, _model: &Model, _cfg: &AdapterConfig) -> Result<Option<FinalAdapter>> {
        Ok(None)
    }
}
