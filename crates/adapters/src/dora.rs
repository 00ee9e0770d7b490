//! DoRA (weight-decomposed LoRA): `W' = m ⊙ (W + sBA) / ‖W + sBA‖_row`, the norm treated as a constant in
//! backward (as the paper and PEFT do). Saved as PEFT does: a LoRA with `use_dora` and one extra tensor per
//! module, `lora_magnitude_vector` `[out]`.
//!
//! The row norm is computed from low-rank pieces, never materialising BA:
//! `‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ`, with `‖W_i‖²` cached at creation.

use crate::lora::Lora;
use candle_core::{Result, Tensor, Var, D};
use factune_model::{Ctx, FrozenParts, LinearAdapter};

pub struct Dora {
    pub lora: Lora,
    /// Trainable magnitude `m`, one per output row.
    pub magnitude: Var,
    /// `‖W_i‖²` of the frozen weight, per row.
    w_row_sq: Tensor,
}

impl Dora {
    /// Wraps a LoRA pair; `magnitude` defaults to `‖W + sBA‖_row` (so the layer starts as plain LoRA).
    pub fn new(lora: Lora, base: &FrozenParts, magnitude: Option<Tensor>) -> Result<Self> {
        let w_row_sq = base
            .weight
            .dense()?
            .to_dtype(candle_core::DType::F32)?
            .sqr()?
            .sum(D::Minus1)?;
        let mut d = Dora {
            lora,
            magnitude: Var::new(&[0f32], base.weight.device())?,
            w_row_sq,
        };
        let m = match magnitude {
            Some(m) => m,
            None => d.row_norm(base)?,
        };
        let out = base.weight.dims().0;
        if m.dims() != [out] {
            candle_core::bail!(
                "lora_magnitude_vector has shape {:?}, expected [{out}]",
                m.dims()
            );
        }
        d.magnitude = Var::from_tensor(&m)?;
        Ok(d)
    }

    /// `‖W + sBA‖` per output row, detached.
    fn row_norm(&self, base: &FrozenParts) -> Result<Tensor> {
        let s = self.lora.scale;
        let a = self.lora.a.as_tensor().detach();
        let b = self.lora.b.as_tensor().detach();
        // W Aᵀ = (A Wᵀ)ᵀ through the frozen-linear kernel, so a 4-bit W is never dequantised whole.
        let wa = factune_model::kernels::frozen_linear(&a, &base.weight, None)?.t()?; // [out, r]
        let cross = (&wa * &b)?.sum(D::Minus1)?;
        let aat = a.matmul(&a.t()?)?; // [r, r]
        let quad = (b.matmul(&aat)? * &b)?.sum(D::Minus1)?;
        let sq = ((&self.w_row_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        sq.sqrt()
    }
}

impl LinearAdapter for Dora {
    fn method(&self) -> &'static str {
        "LORA"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let lora = (self.lora.delta(x, base_out.shape(), ctx)? * self.lora.scale)?;
        let scale = self
            .magnitude
            .as_tensor()
            .broadcast_div(&self.row_norm(base)?)?; // [out]
        let plain = match &base.bias {
            Some(b) => base_out.broadcast_sub(b)?,
            None => base_out.clone(),
        };
        // base + (scale − 1)·(xWᵀ) + scale·s·BAx
        let extra = (plain.broadcast_mul(&(&scale - 1.0)?)? + lora.broadcast_mul(&scale)?)?;
        base_out + extra
    }

    /// The same output as `forward`, `(m/‖W + sBA‖) ⊙ (xWᵀ + s·dropout(x)AᵀBᵀ) + b`, as one fused op (the
    /// magnitude's gradient included): one graph node and one kept activation per layer, as for LoRA.
    fn forward_fused(&self, x: &Tensor, base: &FrozenParts, ctx: &Ctx) -> Option<Result<Tensor>> {
        let norm = match self.row_norm(base) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        factune_model::kernels::dora_linear(
            x,
            &base.weight,
            base.bias.as_ref(),
            self.lora.a.as_tensor(),
            self.lora.b.as_tensor(),
            self.magnitude.as_tensor(),
            &norm,
            self.lora.scale,
            self.lora.train_dropout(ctx),
        )
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = self.lora.parameters();
        p.push(("lora_magnitude_vector".into(), self.magnitude.clone()));
        p
    }

    fn delta_weight(&self, base: &FrozenParts) -> Result<Tensor> {
        let w = base.weight.dense()?.to_dtype(candle_core::DType::F32)?;
        let adapted = (&w + self.lora.delta_weight(base)?)?;
        let scale = self
            .magnitude
            .as_tensor()
            .broadcast_div(&self.row_norm(base)?)?;
        adapted.broadcast_mul(&scale.unsqueeze(1)?)? - w
    }
}
