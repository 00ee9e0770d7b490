//! Evaluation for factune models: perplexity, multiple-choice log-likelihood, exact match, generation.

pub mod focused;
pub mod generate;
pub mod lorahub;
pub mod routed;
pub mod tasks;

pub use generate::{generate, generate_focused, GenConfig};
pub use tasks::{
    detect_task, exact_match, multiple_choice, perplexity, task_for, Accuracy, EvalData,
    ExactMatch, Perplexity,
};
