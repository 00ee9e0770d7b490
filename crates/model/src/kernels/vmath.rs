//! Vectorised element-wise math for the softmax- and gate-shaped loops (attention, the loss, SwiGLU): glibc's
//! scalar `expf` was 5% of a training step and kept those loops from vectorising. The exponential is Cephes'
//! single-precision polynomial (within a few ulp), branch-free so the compiler vectorises it; each entry
//! point runs code compiled for AVX-512 or AVX2 + FMA where the CPU has them, else the baseline build.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so `x − n·ln 2` stays exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this exp(x) is under f32's normal range: the result is 0.
const EXP_LO: f32 = -87.0;
/// Above this the result saturates at exp(88) (no caller passes such inputs: they are shifted by a maximum or
/// are sigmoid arguments, where the saturated value gives the same result).
const EXP_HI: f32 = 88.0;

/// exp(x); NaN stays NaN (the comparisons below are false for NaN, so it flows through).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let xc = if xc > EXP_HI { EXP_HI } else { xc };
    // n = round(x / ln 2) by the 1.5·2²³ trick (plain adds, which vectorise where `round` may not).
    const ROUND: f32 = 12_582_912.0;
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // t's low mantissa bits hold n (its ulp is 1): 2ⁿ comes from integer ops on the bits, which vectorise;
    // a float-to-int cast (saturating in Rust) kept the loop scalar.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let v = p * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < EXP_LO {
        0.0
    } else {
        v
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Sums in eight lanes: one running sum would be a dependency chain the compiler may not reorder.
#[inline(always)]
fn lanes_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn exp_sum_body(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    for x in xs.iter_mut() {
        *x = exp(*x * scale - shift);
    }
    lanes_sum(xs)
}

#[inline(always)]
fn max_body(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |a, &b| a.max(b))
}

#[inline(always)]
fn swiglu_body(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn swiglu_grads_body(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &x), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let s = sigmoid(x);
        *dg = dy * u * s * (1.0 + x * (1.0 - s));
        *du = dy * x * s;
    }
}

/// The bodies compiled for a wider instruction set: `$features` is what the CPU must have.
macro_rules! simd_build {
    ($module:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            #[target_feature(enable = $features)]
            pub fn exp_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
                super::exp_sum_body(xs, scale, shift)
            }

            #[target_feature(enable = $features)]
            pub fn max(xs: &[f32]) -> f32 {
                super::max_body(xs)
            }

            #[target_feature(enable = $features)]
            pub fn swiglu(g: &[f32], u: &[f32], y: &mut [f32]) {
                super::swiglu_body(g, u, y)
            }

            #[target_feature(enable = $features)]
            pub fn swiglu_grads(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
                super::swiglu_grads_body(g, u, dy, dg, du)
            }
        }
    };
}

// Eight lanes per instruction instead of the baseline's four; sixteen with AVX-512 (1.7x on exp).
simd_build!(avx2, "avx2,fma");
simd_build!(avx512, "avx512f,avx2,fma");

/// Which build of the bodies may run here (detected once, then cached by std).
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        2
    } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        1
    } else {
        0
    }
}

macro_rules! dispatch {
    ($name:ident, $body:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        match simd_level() {
            // SAFETY: the features each function is compiled for were detected on this CPU.
            2 => return unsafe { avx512::$name($($arg),*) },
            1 => return unsafe { avx2::$name($($arg),*) },
            _ => {}
        }
        $body($($arg),*)
    }};
}

/// `x ← exp(scale · x − shift)` over the slice; returns the sum of the new values.
pub fn exp_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    dispatch!(exp_sum, exp_sum_body(xs, scale, shift))
}

/// The largest element (−∞ for an empty slice; NaNs are skipped, as `f32::max` skips them).
pub fn max(xs: &[f32]) -> f32 {
    dispatch!(max, max_body(xs))
}

/// `y = g σ(g) u`, element-wise.
pub fn swiglu(g: &[f32], u: &[f32], y: &mut [f32]) {
    dispatch!(swiglu, swiglu_body(g, u, y))
}

/// SwiGLU's gradients: `dg = dy u σ(g) (1 + g (1 − σ(g)))`, `du = dy g σ(g)`.
pub fn swiglu_grads(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dispatch!(swiglu_grads, swiglu_grads_body(g, u, dy, dg, du))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_f64_exponential() {
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        for (scale, shift) in [(1.0, 0.0), (0.125, 3.0)] {
            let mut ys = xs.clone();
            exp_sum(&mut ys, scale, shift);
            for (&x, &y) in xs.iter().zip(&ys) {
                let arg = x * scale - shift;
                let want = (arg as f64).exp();
                let rel = ((y as f64 - want) / want).abs();
                assert!(rel < 4e-7, "exp({arg}) = {y}, want {want} (rel {rel})");
            }
            // Every build this CPU can run gives the dispatched values bit for bit (no contraction to FMA).
            let mut base = xs.clone();
            exp_sum_body(&mut base, scale, shift);
            assert_eq!(base, ys);
            #[cfg(target_arch = "x86_64")]
            if simd_level() >= 1 {
                let mut wide = xs.clone();
                // SAFETY: AVX2 + FMA were detected.
                unsafe { avx2::exp_sum(&mut wide, scale, shift) };
                assert_eq!(wide, ys);
            }
        }
    }

    #[test]
    fn exp_sum_of_a_softmax_row_matches_f64() {
        // A vocabulary-sized row shifted by its maximum, as the loss uses it.
        let row: Vec<f32> = (0..49_152)
            .map(|i| -((i * 7) % 2000) as f32 / 100.0)
            .collect();
        let want: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        let got = exp_sum(&mut row.clone(), 1.0, 0.0) as f64;
        assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn exp_edges_underflow_to_zero_and_keep_nan() {
        let mut xs = [f32::NEG_INFINITY, -1000.0, -87.5, f32::NAN, 0.0];
        exp_sum(&mut xs, 1.0, 0.0);
        assert_eq!(&xs[..3], &[0.0, 0.0, 0.0]);
        assert!(xs[3].is_nan());
        assert_eq!(xs[4], 1.0);
    }

    #[test]
    fn max_and_swiglu_match_the_scalar_forms() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.5).collect();
        assert_eq!(
            max(&xs),
            xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
        );
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let g: Vec<f32> = xs.iter().map(|x| x / 5.0).collect();
        let u: Vec<f32> = xs.iter().map(|x| 1.0 - x / 50.0).collect();
        let dy: Vec<f32> = xs.iter().map(|x| x / 30.0).collect();
        let (mut y, mut dg, mut du) = (vec![0f32; 37], vec![0f32; 37], vec![0f32; 37]);
        swiglu(&g, &u, &mut y);
        swiglu_grads(&g, &u, &dy, &mut dg, &mut du);
        for i in 0..37 {
            let (x, s) = (g[i] as f64, 1.0 / (1.0 + (-g[i] as f64).exp()));
            let close = |a: f32, b: f64| ((a as f64) - b).abs() <= 1e-6 * (1.0 + b.abs());
            assert!(close(y[i], x * s * u[i] as f64));
            assert!(close(
                dg[i],
                dy[i] as f64 * u[i] as f64 * s * (1.0 + x * (1.0 - s))
            ));
            assert!(close(du[i], dy[i] as f64 * x * s));
        }
    }
}
