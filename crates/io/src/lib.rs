//! Reading and writing what factune exchanges with the Hugging Face ecosystem: model configs, safetensors
//! checkpoints, tokenizers and chat templates, and (in `peft`) the PEFT adapter format.

pub mod atomic;
pub mod choice;
pub mod config;
pub mod error;
pub mod fingerprint;
pub mod hub;
pub mod memory;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use tokenizer::{ChatMessage, TextTokenizer};
pub use weights::Weights;
