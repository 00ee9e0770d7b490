//! Data for factune, shared by training and evaluation (neither depends on the other): files read into
//! records (`source`), records read as text, prompt/completion, chat or alpaca (`shape`), labelled examples
//! and seeded batching (`dataset`), and the mean loss of a model over a set of examples.

pub mod dataset;
pub mod loss;
pub mod shape;
pub mod source;

pub use dataset::{collate, pack_text, Batches, DataOptions, Dataset, Example, Truncation};
pub use loss::{evaluate_loss, evaluate_loss_and_accuracy, pad_id, to_tensor};
pub use shape::{alpaca_prompt, Fields, Shape};
pub use source::{DataFormat, Locator, Record};
