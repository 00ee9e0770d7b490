//! The vendored candle-core's one change (vendor/README.md): a first gradient is stored as is instead of
//! being added to a zero tensor. These cases pin down what that must keep: sums over shared uses, first
//! gradients that arrive as strided views (transpose, narrow, broadcast), and no entry for unused tensors.

use candle_core::{Device, Tensor, Var};

fn close(a: &Tensor, b: &Tensor) -> bool {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() < 1e-6
}

#[test]
fn gradients_sum_over_shared_and_strided_uses() {
    let dev = Device::Cpu;
    let xs: Vec<f32> = (0..12).map(|i| i as f32 / 7.0 - 0.8).collect();
    let x = Var::from_vec(xs, (3, 4), &dev).unwrap();
    let b = Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.25], 4, &dev).unwrap();
    let unused = Var::from_vec(vec![1f32; 4], 4, &dev).unwrap();
    // Used once, through a transpose: its only gradient arrives as a strided view.
    let w = Var::from_vec(vec![0.5f32; 12], (4, 3), &dev).unwrap();
    let c = Tensor::arange(0f32, 12.0, &dev)
        .unwrap()
        .reshape((4, 3))
        .unwrap();
    let xt = x.as_tensor();
    // x reaches the loss five ways: through a transpose, twice through a product with itself, through a
    // narrow, a broadcast add and a product with w's transpose.
    let loss = ((xt.t().unwrap() * &c).unwrap().sum_all().unwrap()
        + (xt * xt).unwrap().sum_all().unwrap()
        + (xt.narrow(1, 1, 2).unwrap() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap()
        + xt.broadcast_add(b.as_tensor()).unwrap().sum_all().unwrap()
        + (w.as_tensor().t().unwrap() * xt)
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(xt).unwrap();
    let narrow_mask = Tensor::from_vec(
        (0..12)
            .map(|i| if (1..3).contains(&(i % 4)) { 3f32 } else { 0.0 })
            .collect(),
        (3, 4),
        &dev,
    )
    .unwrap();
    let terms = [
        c.t().unwrap(),
        (xt * 2.0).unwrap(),
        narrow_mask,
        w.as_tensor().t().unwrap(),
    ];
    let want = (terms
        .iter()
        .fold(xt.zeros_like().unwrap(), |a, t| (a + t).unwrap())
        + 1.0)
        .unwrap();
    assert!(close(gx, &want), "dx = {gx}, want {want}");
    assert!(
        gx.is_contiguous(),
        "kernels read gradients as contiguous slices"
    );
    let gb = grads.get(b.as_tensor()).unwrap();
    assert!(
        close(gb, &Tensor::new(&[3f32; 4], &dev).unwrap()),
        "db = {gb}"
    );
    let gw = grads.get(w.as_tensor()).unwrap();
    assert!(close(gw, &xt.t().unwrap()), "dw = {gw}");
    assert!(
        gw.is_contiguous(),
        "a strided first gradient is stored contiguous"
    );
    assert!(grads.get(unused.as_tensor()).is_none());
}

#[test]
fn a_first_gradient_that_is_a_view_is_not_shared_with_a_later_sum() {
    // y is used twice: its first gradient is the broadcast of the scalar seed; the second use must add to
    // it without touching the tensor the first use handed over.
    let dev = Device::Cpu;
    let x = Var::from_vec(vec![1f32, 2.0, 3.0], 3, &dev).unwrap();
    let y = (x.as_tensor() * 2.0).unwrap();
    let loss = (y.sum_all().unwrap() + (&y * &y).unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    // d/dx [Σ 2x + Σ 4x²] = 2 + 8x
    let want = Tensor::new(&[10f32, 18.0, 26.0], &dev).unwrap();
    assert!(close(grads.get(x.as_tensor()).unwrap(), &want));
}
