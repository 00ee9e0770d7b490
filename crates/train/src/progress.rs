//! What a run reports while it goes. The library never prints: the CLI draws a bar and prints the notes,
//! tests and embedders pass [`Silent`] or their own implementation.

/// Events of a training run, in order: `start`, then `note`s and one `step` per optimizer step, `finish`.
pub trait Progress {
    /// The run will end at `total` steps; `done` have already run (a resumed run).
    fn start(&self, _total: usize, _done: usize) {}
    /// Step `step` (1-based) finished with this loss, learning rate and throughput.
    fn step(&self, _step: usize, _loss: f64, _lr: f64, _tokens_per_s: f64) {}
    /// A line for the user: what the run set up, measured or wrote.
    fn note(&self, _line: &str) {}
    /// No more steps.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
