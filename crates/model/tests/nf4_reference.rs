//! NF4 quantisation against bitsandbytes 0.50.2 (`scripts/make_fixtures.py build-nf4`): identical 4-bit codes
//! and block scales, identical double-quantised scales, and the same dequantised values.

use factune_model::quant::{dynamic_map, NfMatrix, Scales};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn fixture() -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/nf4-reference.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

fn u8s(st: &SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

#[test]
fn nf4_codes_scales_and_values_match_bitsandbytes() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in ["a", "b", "c"] {
        let (w, shape) = f32s(&st, &format!("{name}.weight"));
        let (rows, cols) = (shape[0], shape[1]);

        let plain = NfMatrix::quantize(&w, rows, cols, false).unwrap();
        assert_eq!(
            plain.packed,
            u8s(&st, &format!("{name}.codes")),
            "{name}: 4-bit codes"
        );
        let Scales::F32(absmax) = &plain.scales else {
            panic!("plain scales")
        };
        assert_eq!(
            absmax,
            &f32s(&st, &format!("{name}.absmax")).0,
            "{name}: absmax"
        );

        // the 8-bit codes of the scales depend on the map; quantise against the one bitsandbytes stored
        let bnb_map = f32s(&st, &format!("{name}.dq.nested_quant_map")).0;
        for (a, b) in dynamic_map().iter().zip(&bnb_map) {
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b.abs(),
                "dynamic map: {a} vs {b}"
            );
        }
        let dq = NfMatrix::quantize_with(&w, rows, cols, Some(bnb_map.clone())).unwrap();
        assert_eq!(dq.packed, plain.packed);
        let Scales::Double {
            codes,
            absmax,
            offset,
            map,
        } = &dq.scales
        else {
            panic!("double scales")
        };
        assert_eq!(map, &bnb_map);
        let want_offset = f32s(&st, &format!("{name}.dq.offset")).0[0];
        assert!(
            (offset - want_offset).abs() <= 1e-7 * want_offset.abs(),
            "{name}: offset {offset} vs {want_offset}"
        );
        let want_nested = f32s(&st, &format!("{name}.dq.nested_absmax")).0;
        for (a, b) in absmax.iter().zip(&want_nested) {
            assert!(
                (a - b).abs() <= 1e-7 * b.abs(),
                "{name}: nested absmax {a} vs {b}"
            );
        }
        // bitsandbytes' CPU search for the 8-bit scale codes (an approximate direct-lookup binary search) can
        // land one entry off where the map's entries crowd near zero; we pick the nearest entry. Every code
        // matches or is the nearer neighbour of the one bitsandbytes chose.
        let want_codes = u8s(&st, &format!("{name}.dq.absmax"));
        let plain_absmax = f32s(&st, &format!("{name}.absmax")).0;
        let mut differ = 0;
        for (i, (&ours, &theirs)) in codes.iter().zip(&want_codes).enumerate() {
            if ours != theirs {
                differ += 1;
                let x = (plain_absmax[i] - offset) / absmax[i / 256];
                let err = |c: u8| (map[c as usize] - x).abs();
                assert!(
                    ours.abs_diff(theirs) == 1 && err(ours) < err(theirs),
                    "{name}: scale code {i}"
                );
            }
        }
        assert!(
            differ * 100 <= codes.len(),
            "{name}: {differ} of {} scale codes differ",
            codes.len()
        );

        // dequantisation of bitsandbytes' own codes gives its values
        let theirs = NfMatrix::from_parts(
            rows,
            cols,
            dq.packed.clone(),
            Scales::Double {
                codes: want_codes,
                absmax: want_nested,
                offset: want_offset,
                map: bnb_map.clone(),
            },
        )
        .unwrap();
        let (want, _) = f32s(&st, &format!("{name}.dequant"));
        let err = theirs
            .dequantize()
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-6, "{name}: dequantised values differ by {err}");
    }
}
