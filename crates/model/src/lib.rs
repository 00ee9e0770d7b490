//! Transformer architectures for factune, built on one adaptable linear layer whose frozen weight never
//! receives a gradient (see `kernels`).

pub mod attention;
pub mod intruders;
pub mod kernels;
pub mod linalg;
pub mod linear;
pub mod loss;
pub mod model;
pub mod mpo;
pub mod prompt;
pub mod quant;
pub mod save;
pub mod spectrum;

pub use attention::KvCache;
pub use linear::{AdaptableLinear, BaseWeight, Ctx, FrozenParts, LinearAdapter, ParamRole};
pub use model::{take_grads, LoadOptions, Model, Nf4Options};
pub use prompt::{PromptAdapter, VirtualInputs};
