//! Data for factune, shared by training and evaluation (neither depends on the other): files read into
//! labelled examples, seeded batching, and the mean loss of a model over a set of examples.

pub mod dataset;
pub mod loss;

pub use dataset::{
    alpaca_prompt, collate, pack_text, Batches, DataFormat, Dataset, Example, Format,
};
pub use loss::{evaluate_loss, pad_id, to_tensor};
