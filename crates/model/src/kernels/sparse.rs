//! Sparse update: y = x Sᵀ with S [out, in] holding k trainable values at fixed (row, col) positions. Backward:
//! dX[m, col] += g[m, row] · v, dv = Σ_m g[m, row] · x[m, col]. Work is O(tokens · k), never O(out · in).

use super::*;

pub(super) struct SparseLinear {
    rows: std::sync::Arc<Vec<u32>>,
    cols: std::sync::Arc<Vec<u32>>,
    out: usize,
}

impl SparseLinear {
    pub(super) fn check(&self, k_in: usize, v_len: usize) -> Result<()> {
        if v_len != self.rows.len() {
            candle_core::bail!(
                "sparse-linear: {v_len} values for {} positions",
                self.rows.len()
            );
        }
        if self.cols.iter().any(|&c| c as usize >= k_in)
            || self.rows.iter().any(|&r| r as usize >= self.out)
        {
            candle_core::bail!(
                "sparse-linear: a position lies outside [{}, {k_in}]",
                self.out
            );
        }
        Ok(())
    }
}

impl CustomOp2 for SparseLinear {
    fn name(&self) -> &'static str {
        "sparse-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "sparse-linear")?;
        let v = f32_slice(vs, vl, "sparse-linear values")?;
        let (_, k) = last_dim(xl)?;
        self.check(k, v.len())?;
        let mut y = vec![0f32; x.len() / k * self.out];
        y.par_chunks_mut(self.out)
            .zip(x.par_chunks(k))
            .for_each(|(yr, xr)| {
                for ((&r, &c), &val) in self.rows.iter().zip(self.cols.iter()).zip(v) {
                    yr[r as usize] += val * xr[c as usize];
                }
            });
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let k = *x.dims().last().expect("rank >= 1");
        let x2 = x
            .detach()
            .contiguous()?
            .reshape(((), k))?
            .to_vec2::<f32>()?;
        let g2 = grad
            .detach()
            .contiguous()?
            .reshape(((), self.out))?
            .to_vec2::<f32>()?;
        let vals = v.detach().to_vec1::<f32>()?;
        let dx: Vec<f32> = g2
            .par_iter()
            .flat_map_iter(|gr| {
                let mut d = vec![0f32; k];
                for ((&r, &c), &val) in self.rows.iter().zip(self.cols.iter()).zip(&vals) {
                    d[c as usize] += gr[r as usize] * val;
                }
                d
            })
            .collect();
        let dv: Vec<f32> = self
            .rows
            .par_iter()
            .zip(self.cols.par_iter())
            .map(|(&r, &c)| {
                g2.iter()
                    .zip(&x2)
                    .map(|(g, xr)| g[r as usize] * xr[c as usize])
                    .sum()
            })
            .collect();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

/// `x Sᵀ` for a sparse `S [out, in]` whose `values` sit at `(rows[j], cols[j])`; differentiable in x and the
/// values. Off the CPU, S is scattered into a dense matrix first.
pub fn sparse_linear(
    x: &Tensor,
    values: &Tensor,
    rows: &std::sync::Arc<Vec<u32>>,
    cols: &std::sync::Arc<Vec<u32>>,
    out: usize,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        let op = SparseLinear {
            rows: rows.clone(),
            cols: cols.clone(),
            out,
        };
        return x.contiguous()?.apply_op2(&values.contiguous()?, op);
    }
    let inp = *x.dims().last().expect("rank >= 1");
    let dense = sparse_dense(values, rows, cols, out, inp)?;
    x.broadcast_matmul(&dense.t()?)
}

/// The dense `[out, in]` matrix of a sparse one (differentiable in the values).
pub fn sparse_dense(
    values: &Tensor,
    rows: &[u32],
    cols: &[u32],
    out: usize,
    inp: usize,
) -> Result<Tensor> {
    let flat: Vec<u32> = rows
        .iter()
        .zip(cols)
        .map(|(&r, &c)| r * inp as u32 + c)
        .collect();
    let idx = Tensor::from_vec(flat, rows.len(), values.device())?;
    Tensor::zeros(out * inp, values.dtype(), values.device())?
        .index_add(&idx, values, 0)?
        .reshape((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, rand};
    use candle_core::Var;

    #[test]
    fn sparse_linear_matches_the_dense_matrix_in_values_and_gradients() {
        let (out, inp) = (7, 11);
        let rows = std::sync::Arc::new(vec![0u32, 3, 3, 6, 2]);
        let cols = std::sync::Arc::new(vec![10u32, 0, 5, 5, 7]);
        let v = Var::from_tensor(&rand(&[5], 31)).unwrap();
        let x = Var::from_tensor(&rand(&[2, 3, inp], 32)).unwrap();
        let y = sparse_linear(x.as_tensor(), v.as_tensor(), &rows, &cols, out).unwrap();
        let dense = sparse_dense(v.as_tensor(), &rows, &cols, out, inp).unwrap();
        let want = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-6);
        let probe = rand(&[2, 3, out], 33);
        let g1 = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), v.as_tensor()] {
            assert!(max_diff(g1.get(t).unwrap(), g2.get(t).unwrap()) < 1e-5);
        }
    }
}
