//! Training for factune: configuration, data pipelines, AdamW and schedules, the loop and its checkpoints.

pub mod config;
pub mod data;
pub mod diagnostics;
pub mod metrics;
pub mod optim;
pub mod pretrain;
pub mod relora;
pub mod trainer;

pub use config::{TrainConfig, TrainOverrides};
pub use trainer::{checkpoint_state, evaluate_loss, TrainJob, TrainOutcome};
