//! Greedy decoding with a KV cache gives the same tokens as transformers' `generate` (with the PEFT adapter).

use candle_core::Device;
use factune_eval::{generate, GenConfig};
use factune_model::Model;
use std::path::PathBuf;

#[test]
fn greedy_tokens_match_transformers_for_every_architecture() {
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for name in ["llama", "qwen2", "gpt2"] {
        let mut model = Model::load(&fx.join(name), &Device::Cpu).unwrap();
        factune_adapters::load(&mut model, &fx.join(format!("{name}-lora")), false).unwrap();
        let r = candle_core::safetensors::load(
            fx.join(format!("{name}-reference.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let prompt: Vec<u32> = r["greedy_prompt"].to_vec2::<i64>().unwrap()[0]
            .iter()
            .map(|&x| x as u32)
            .collect();
        let want: Vec<u32> = r["greedy_tokens"].to_vec2::<i64>().unwrap()[0]
            .iter()
            .map(|&x| x as u32)
            .collect();
        let got = generate(
            &model,
            &prompt,
            &GenConfig {
                max_new_tokens: want.len(),
                ..GenConfig::default()
            },
        )
        .unwrap();
        assert_eq!(got, want, "{name}: greedy tokens differ from transformers");
    }
}
