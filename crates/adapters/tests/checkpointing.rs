//! Gradient checkpointing and the fused LM-head loss change how a step is computed, not what: the same loss
//! and gradients as the plain graph over full logits, for adapters with dropout, trained norms and (tied or
//! untied) trained embeddings.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, max_abs, max_diff};
use factune_adapters::{attach, trainable, AdapterConfig, TargetModules};
use factune_model::loss::causal_lm_loss;
use factune_model::{Ctx, Model};

fn case(name: &str) {
    let mut model = Model::load(&fixture(name), &Device::Cpu).unwrap();
    let cfg = AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.2,
        init_lora_weights: serde_json::Value::Bool(false),
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..AdapterConfig::default()
    };
    attach(&mut model, &cfg, 3).unwrap();
    let mut params = trainable(&model);
    params.extend(
        model
            .set_trainable(&|k: &str| {
                k.contains("norm") || k.contains("ln_") || k.contains("embed") || k.contains("wte")
            })
            .unwrap(),
    );
    assert!(
        params.len() > 10,
        "{name}: {} trainable tensors",
        params.len()
    );
    let ids = Tensor::new(
        &[[3u32, 17, 42, 99, 5, 250, 31, 8], [7, 7, 1, 2, 3, 4, 5, 6]],
        &Device::Cpu,
    )
    .unwrap();
    let labels = vec![
        vec![3, 17, 42, 99, 5, 250, 31, 8],
        vec![-100, -100, 1, 2, 3, -100, 5, 6],
    ];
    let ctx = Ctx {
        train: true,
        dropout_seed: 11,
    };
    // Reference: full logits, then the loss.
    let logits = model.forward(&ids, None, &ctx).unwrap();
    let (loss, n) = causal_lm_loss(&logits, &labels).unwrap();
    let reference = loss.backward().unwrap();
    for checkpoint in [false, true] {
        let wanted: Vec<&Tensor> = params.iter().map(|(_, v)| v.as_tensor()).collect();
        let (l, m, grads) = model
            .loss_and_grads(&ids, &labels, &ctx, checkpoint, &wanted)
            .unwrap();
        assert_eq!(m, n);
        assert!(max_diff(&l, &loss) < 1e-5, "{name}: loss differs");
        for ((p, v), g) in params.iter().zip(&grads) {
            let (g, r) = (
                g.as_ref()
                    .unwrap_or_else(|| panic!("{name}: no gradient for {p}")),
                reference.get(v.as_tensor()).unwrap(),
            );
            let tol = 1e-5 * (1.0 + max_abs(r));
            assert!(
                max_diff(g, r) < tol,
                "{name} (checkpoint {checkpoint}): {p} gradient differs by {}",
                max_diff(g, r)
            );
        }
    }
}

#[test]
fn llama_step_is_the_same_with_checkpointing_and_the_fused_head() {
    case("llama");
}

#[test]
fn gpt2_step_is_the_same_with_checkpointing_and_the_fused_head() {
    case("gpt2");
}
