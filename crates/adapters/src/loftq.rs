//! LoftQ (`init_lora_weights = "loftq"`, `loftq_config = {loftq_bits: 4, loftq_iter: T}`): a 4-bit base and
//! LoRA factors chosen together so that `deq(Q) + s·BA` is closer to W than plain NF4's `deq(NF4(W))`.
//! Starting from BA = 0, each iteration quantises what the factors miss, `Q = NF4(W − s·BA)`, then refits
//! the factors to what the quantisation missed, `s·BA = SVD_r(W − deq(Q))`.
//!
//! Two choices differ from PEFT 0.21, with reasons. PEFT stores the SVD factors as A, B without dividing by
//! the LoRA scale, which is exact only when `lora_alpha == r`; here `A = √(S/s) Vᵀ`, `B = U √(S/s)` for any α.
//! And the base keeps the Q of the last iteration with f32 block scales (as PEFT quantises it), whatever
//! `double_quant` says for the other layers: requantising its scales would move deq(Q) away from what the
//! factors were fitted to.

use candle_core::{DType, Tensor};
use factune_io::Result;
use factune_model::linalg::svd_top;
use factune_model::{AdaptableLinear, BaseWeight};

/// What LoftQ achieved on one layer: Frobenius errors of plain quantisation (NF4, or the layer's planned
/// width) and of LoftQ's `deq(Q) + s·BA`.
#[derive(Debug, Clone, Copy)]
pub struct LoftqError {
    pub nf4: f64,
    pub loftq: f64,
}

fn fro(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .sqrt())
}

/// The errors of `layer` (LoftQ-initialised, adapter untrained) against its full-precision weight `w`.
pub fn error(layer: &AdaptableLinear, w: &Tensor) -> Result<LoftqError> {
    let plain = BaseWeight::nf(w, layer.planned_bits.unwrap_or(4), false)?.dense()?;
    let delta = match &layer.adapter {
        Some(a) => a.delta_weight(&layer.base)?,
        None => Tensor::zeros(w.shape(), DType::F32, w.device())?,
    };
    Ok(LoftqError {
        nf4: fro(&(w - plain)?)?,
        loftq: fro(&((w - layer.base.weight.dense()?)? - delta)?)?,
    })
}

/// Runs `iters` LoftQ iterations on `layer` (its weight must be the full-precision W), replaces the weight by
/// the 4-bit Q and returns `(A [r, in], B [out, r])`.
pub fn init(
    layer: &mut AdaptableLinear,
    r: usize,
    scale: f64,
    iters: usize,
) -> Result<(Tensor, Tensor)> {
    let w = layer.base.weight.dense()?.to_dtype(DType::F32)?;
    let bits = layer.planned_bits.unwrap_or(4);
    let quantize = |t: &Tensor| BaseWeight::nf(t, bits, false);
    let dev = w.device();
    let mut low_rank = Tensor::zeros(w.shape(), DType::F32, dev)?;
    let mut q = None;
    let mut factors = None;
    for _ in 0..iters.max(1) {
        let qi = quantize(&(&w - &low_rank)?)?;
        let t = svd_top(&(&w - qi.dense()?)?, r)?;
        q = Some(qi);
        let root: Vec<f32> = t.s.iter().map(|&s| (s / scale).sqrt() as f32).collect();
        let k = root.len();
        let a =
            t.vt.broadcast_mul(&Tensor::from_vec(root.clone(), (k, 1), dev)?)?;
        let b = t.u.broadcast_mul(&Tensor::from_vec(root, (1, k), dev)?)?;
        low_rank = (b.matmul(&a)? * scale)?;
        factors = Some((a, b));
    }
    let (a, b) = factors.expect("at least one iteration");
    layer.base.weight = q.expect("at least one iteration");
    Ok((a, b))
}
