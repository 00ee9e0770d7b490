//! TT-SVD against tensorly 0.10 (`scripts/make_fixtures.py build-mpo`): the truncated MPO of a matrix, at
//! every bond cap, reconstructs to tensorly's truncated tensor train.

use candle_core::Device;
use factune_model::mpo::{dense, tt_svd, Modes};
use std::path::PathBuf;

#[test]
fn truncated_mpo_matches_tensorly() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/mpo-reference.safetensors");
    let r = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let w = &r["weight"];
    let modes = Modes::given(24, 36, &[4, 3, 2], &[4, 3, 3]).unwrap();
    for chi in [1, 2, 4, 8, 64] {
        let t = tt_svd(w, &modes, chi).unwrap();
        let ours = dense(&t.cores, &modes, &Device::Cpu).unwrap();
        let want = &r[&format!("chi{chi}")];
        let d = (ours - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d < 1e-4,
            "chi {chi}: reconstruction differs from tensorly by {d}"
        );
    }
}
