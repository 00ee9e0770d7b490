//! Matrix products on slices through the gemm crate candle itself uses: strided views, accumulate-into and
//! parallel forms the fused ops share.

pub(super) fn gemm_parallelism() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// A read-only f32 matrix in a slice: element (i, j) at `i · rs + j · cs`.
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major rows `rs` apart.
    pub(super) fn rows(data: &'a [f32], rs: usize) -> Self {
        MatRef { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `rs` apart.
    pub(super) fn transposed(data: &'a [f32], rs: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: rs,
        }
    }

    pub(super) fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst [m, n] (rows dst_rs apart) = (dst if acc else 0) + beta · lhs [m, k] · rhs [k, n]`, on the calling
/// thread (callers parallelise over heads or rows).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) {
    gemm_with(
        gemm::Parallelism::None,
        m,
        n,
        k,
        dst,
        dst_rs,
        acc,
        lhs,
        rhs,
        beta,
    )
}

/// [`gemm_into`] on all of rayon's threads: one large product.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_par_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) {
    gemm_with(
        gemm_parallelism(),
        m,
        n,
        k,
        dst,
        dst_rs,
        acc,
        lhs,
        rhs,
        beta,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_with(
    par: gemm::Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) {
    assert!(
        lhs.fits(m, k) && rhs.fits(k, n) && (m == 0 || (m - 1) * dst_rs + n <= dst.len()),
        "gemm_into: operands out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assertion above keeps every element gemm reads or writes inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// `beta · lhs [m, k] · rhs [k, n]` as a new row-major `[m, n]`, on all of rayon's threads.
pub(super) fn gemm_par_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef,
    rhs: MatRef,
    beta: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    gemm_par_into(m, n, k, &mut out, n, false, lhs, rhs, beta);
    out
}
