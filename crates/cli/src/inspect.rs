//! `factune inspect`: what a model or an adapter directory holds.

use anyhow::Result;
use candle_core::Device;
use factune_adapters::peft;
use factune_adapters::registry::Attachment;
use factune_io::Weights;
use factune_model::Model;
use std::path::Path;

pub fn inspect(dir: &Path) -> Result<()> {
    let adapter_cfg = dir.join(peft::CONFIG_FILE);
    if adapter_cfg.exists() {
        let cfg = factune_adapters::AdapterConfig::from_file(&adapter_cfg)?;
        let w = Weights::from_files(&[dir.join(peft::WEIGHTS_FILE)])?;
        // trainable values only: shared projections and sparse indices are not parameters
        let params: usize = w
            .names()
            .filter(|n| !n.starts_with("base_model.vera_") && !n.ends_with("sparse_indices"))
            .filter_map(|n| w.info(n))
            .map(|(s, _)| s.iter().product::<usize>())
            .sum();
        println!("adapter: {}", dir.display());
        match cfg.method.method().attachment() {
            Attachment::Prompt(_) => {
                println!(
                    "  method: {} (adds positions, adapts no weight)",
                    cfg.peft_type()
                );
                let settings: Vec<String> = cfg
                    .method
                    .defaults()
                    .into_iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                println!("  {}", settings.join("  "));
                println!("  trainable params: {params}");
            }
            Attachment::Linear(m) => {
                let modules = match m.tensor_names(&cfg).first() {
                    Some(first) => w.names().filter(|n| n.ends_with(first)).count(),
                    None => 0,
                };
                println!(
                    "  method: {}{}",
                    cfg.peft_type(),
                    if cfg.use_rslora {
                        " (rsLoRA scaling)"
                    } else {
                        ""
                    }
                );
                match &cfg.method {
                    factune_adapters::MethodConfig::Mpo(m) => println!(
                        "  bond_dim: {}  mpo_modes: {}  init_weights: {}  dropout: {}",
                        m.bond_dim, m.mpo_modes, m.init_weights, cfg.lora_dropout
                    ),
                    factune_adapters::MethodConfig::Said(m) => println!(
                        "  intrinsic_dimension: {}  structure_aware: {}  fastfood_seed: {}",
                        m.intrinsic_dimension, m.structure_aware, m.fastfood_seed
                    ),
                    _ => println!(
                        "  r: {}  lora_alpha: {}  lora_dropout: {}",
                        cfg.r, cfg.lora_alpha, cfg.lora_dropout
                    ),
                }
                println!("  target_modules: {:?}", cfg.target_modules);
                println!("  adapted modules: {modules}  trainable params: {params}");
            }
        }
        println!(
            "  base model: {}",
            cfg.base_model_name_or_path.unwrap_or_default()
        );
        return Ok(());
    }
    let cfg = factune_io::ModelConfig::from_file(&dir.join("config.json"))?;
    let w = Weights::from_model_dir(dir)?;
    println!("model: {}", dir.display());
    println!("  architecture: {} ({:?} family)", cfg.model_type, cfg.arch);
    println!(
        "  layers {}  hidden {}  intermediate {}  heads {} (kv {})  head_dim {}  vocab {}  context {}",
        cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        cfg.vocab_size, cfg.max_position_embeddings
    );
    println!(
        "  tied embeddings: {}  parameters: {}",
        cfg.tie_word_embeddings,
        cfg.num_parameters()
    );
    println!("  stored dtypes (elements): {:?}", w.dtype_summary());
    let model = Model::from_weights(cfg, &w, dir, &Device::Cpu, Default::default())?;
    let quantized = model.quantized_keys().len();
    if quantized > 0 {
        let (mut bits, mut n) = (0.0, 0usize);
        for q in model.linears().iter().filter_map(|l| l.base.weight.as_nf()) {
            bits += q.bits_per_param() * (q.rows * q.cols) as f64;
            n += q.rows * q.cols;
        }
        println!(
            "  4-bit NF4 linear weights: {quantized} of {} ({:.3} bits per weight)",
            model.linears().len(),
            bits / n as f64
        );
    }
    let names: std::collections::BTreeSet<String> = model
        .linears()
        .iter()
        .map(|l| l.path.rsplit('.').next().unwrap_or("").to_string())
        .collect();
    println!(
        "  adaptable modules: {}",
        names.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
