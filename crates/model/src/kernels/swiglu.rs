//! SwiGLU: y = silu(g) ⊙ u with silu(g) = g σ(g). One op keeps g and u (the projections' outputs) and no
//! silu(g) buffer. Backward: dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g))), du = dy ⊙ silu(g).

use super::*;

pub(super) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        map_rows2((gs, gl), (us, ul), "swiglu", vmath::swiglu)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32_slices([g, u, grad], "swiglu backward", |[gv, uv, dy]| {
            let mut dg = vec![0f32; gv.len()];
            let mut du = vec![0f32; gv.len()];
            dg.par_chunks_mut(4096)
                .zip(du.par_chunks_mut(4096))
                .enumerate()
                .for_each(|(c, (dgc, duc))| {
                    let at = c * 4096..c * 4096 + dgc.len();
                    vmath::swiglu_grads(&gv[at.clone()], &uv[at.clone()], &dy[at], dgc, duc);
                });
            Ok((dg, du))
        })?;
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// `silu(gate) ⊙ up` as one op (composed ops off the CPU or for non-f32 inputs).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if f32_cpu(gate) && f32_cpu(up) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, rand};
    use candle_core::Var;

    #[test]
    fn swiglu_matches_the_composed_ops() {
        let g = Var::from_tensor(&(rand(&[3, 7, 10], 51) * 4.0).unwrap()).unwrap();
        let u = Var::from_tensor(&rand(&[3, 7, 10], 52)).unwrap();
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let reference = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-6);
        let w = rand(&[3, 7, 10], 53);
        let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gr) = (grads(&fused), grads(&reference));
        for v in [&g, &u] {
            let (f, r) = (
                gf.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(f, r) < 1e-5,
                "gradient differs by {}",
                max_diff(f, r)
            );
        }
    }
}
