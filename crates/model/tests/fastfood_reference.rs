//! SAID's Fastfood projection against its definition written in torch (`scripts/make_fixtures.py
//! build-fastfood`): handed torch's random signs, permutation and Gaussian scales, `project` gives torch's
//! `P θ` and `project_t` torch autograd's gradient `Pᵀ g`.

use candle_core::{Device, Tensor};
use factune_model::kernels::fastfood::{Fastfood, Tables};
use std::path::PathBuf;

fn close(ours: &[f32], want: &Tensor, what: &str) {
    let want = want.to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-5 * scale.max(1.0),
        "{what}: differs from torch by {err} (scale {scale})"
    );
}

#[test]
fn fastfood_matches_torch_both_ways() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/fastfood-reference.safetensors");
    let r = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    for name in ["narrow", "wide", "square"] {
        let t = |k: &str| &r[&format!("{name}.{k}")];
        let perm: Vec<u32> = t("perm")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let (d, dd) = (t("theta").dims1().unwrap(), t("g").dims1().unwrap());
        let ff = Fastfood::with_tables(
            d,
            dd,
            Tables::Explicit {
                signs: t("signs").to_vec1().unwrap(),
                perm,
                gauss: t("gauss").to_vec1().unwrap(),
            },
        )
        .unwrap();
        close(
            &ff.project(&t("theta").to_vec1::<f32>().unwrap()),
            t("out"),
            name,
        );
        close(
            &ff.project_t(&t("g").to_vec1::<f32>().unwrap()),
            t("grad"),
            name,
        );
    }
}
