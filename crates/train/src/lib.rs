//! Training for factune: configuration, AdamW and schedules, the one training step, the run around it and
//! its checkpoints. No printing or drawing: runs report through [`Progress`].

pub mod best;
pub mod config;
pub mod diagnostics;
pub mod foreign;
pub mod metrics;
pub mod online;
pub mod optim;
pub mod peft_type;
pub mod pretrain;
pub mod progress;
pub mod relora;
pub mod resume;
pub mod step;
pub mod trainer;
pub mod ziplora;

pub use config::TrainConfig;
pub use peft_type::PeftType;
pub use progress::{Progress, Silent};
pub use step::{StepSettings, Trainer};
pub use trainer::{
    checkpoint_state, clear_run, holds_run, load_run_data, RunData, TrainJob, TrainOutcome,
};
