//! Seeded inverted dropout: the mask is a seed, regenerated exactly in forward and backward and the same
//! whatever the thread count.

use super::*;

/// Inverted dropout on the adapter input, as the seed of its mask: the op draws the mask in forward and again
/// in backward instead of keeping a `[tokens, in]` tensor between them.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    pub(super) fn mask(&self, n: usize) -> Vec<f32> {
        dropout_mask(n, self.p, self.seed)
    }

    /// The mask as a tensor shaped like `x` (the composed adapter path and backward's tensor ops use it).
    pub fn mask_like(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_vec(self.mask(x.elem_count()), x.shape(), x.device())
    }
}

/// Elements per independently seeded block of a dropout mask.
pub(super) const DROPOUT_BLOCK: usize = 1 << 16;

/// Inverted-dropout multipliers (0 or 1/(1−p)) for `n` elements from a seeded generator, so a mask can be
/// regenerated exactly and runs are reproducible bit for bit. Blocks of the mask come from separate ChaCha
/// streams of the same seed and are drawn in parallel (the mask is the same whatever the thread count); a
/// serial draw cost about as much as the adapter matmuls it masks.
pub fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let keep = 1.0 / (1.0 - p) as f32;
    // P(u32 < threshold) = p, to within 2^-32.
    let threshold = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u64;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(DROPOUT_BLOCK)
        .enumerate()
        .for_each(|(i, block)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            for m in block {
                *m = if (rng.random::<u32>() as u64) < threshold {
                    0.0
                } else {
                    keep
                };
            }
        });
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_are_reproducible_across_thread_counts_and_keep_the_right_share() {
        let n = 5 * DROPOUT_BLOCK + 123;
        let m = dropout_mask(n, 0.25, 7);
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| dropout_mask(n, 0.25, 7));
        assert_eq!(m, one_thread);
        assert_ne!(m, dropout_mask(n, 0.25, 8));
        let keep = 1.0 / 0.75f32;
        assert!(m.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // 327k draws: the share's standard deviation is below 0.001.
        assert!((dropped - 0.25).abs() < 0.005, "dropped share {dropped}");
        // Blocks draw from different streams, not copies of the first.
        assert_ne!(m[..DROPOUT_BLOCK], m[DROPOUT_BLOCK..2 * DROPOUT_BLOCK]);
    }
}
