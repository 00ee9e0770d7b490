//! Training-time behaviour a method brings to the shared step, so the trainer has no per-method branches.

use candle_core::Tensor;
use factune_io::Result;
use factune_model::Model;

/// What a method adds to the step (AdaLoRA: an orthogonality penalty in the loss, and a rank update from
/// the step's gradients).
pub trait StepHook {
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
}
