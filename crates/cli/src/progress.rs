//! A training run's progress on the terminal: a bar with loss, learning rate and tokens/s, the run's notes
//! above it; plain lines on stderr when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Bar(ProgressBar);

impl Bar {
    /// A bar when stderr is a terminal, plain notes otherwise.
    pub fn for_stderr() -> Self {
        Bar(if std::io::stderr().is_terminal() {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        })
    }
}

impl factune_train::Progress for Bar {
    fn start(&self, total: usize, done: usize) {
        self.0.set_length(total as u64);
        self.0.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("static template"),
        );
        self.0.set_position(done as u64);
    }

    fn step(&self, _step: usize, loss: f64, lr: f64, tokens_per_s: f64) {
        self.0.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
        ));
        self.0.inc(1);
    }

    fn note(&self, line: &str) {
        if self.0.is_hidden() {
            eprintln!("{line}");
        } else {
            self.0.println(line);
        }
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
