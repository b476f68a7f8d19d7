//! A job's steps as the CLI shows them: a spinner with the current step on a terminal, plain
//! lines on stderr otherwise, nothing with `--json`.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

pub struct Steps {
    bar: Option<ProgressBar>,
    quiet: bool,
    last: String,
    /// Said after each plain line (which daemon job it is).
    tag: String,
}

impl Steps {
    /// `what` prefixes the spinner; `tag` follows each plain line.
    pub fn new(quiet: bool, what: &str, tag: &str) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed}] {prefix}: {msg}").expect("valid template"));
            bar.set_prefix(what.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let tag = if tag.is_empty() { String::new() } else { format!(" ({tag})") };
        Self { bar, quiet, last: String::new(), tag }
    }

    /// A new step (repeats are shown once).
    pub fn step(&mut self, s: &str) {
        if s == self.last || s.is_empty() {
            return;
        }
        self.last = s.to_owned();
        // With `--json` (nothing shown) a debug log still has each step and when it came.
        tracing::debug!(step = s, "step");
        match &self.bar {
            Some(b) => {
                b.println(format!("  {s}"));
                b.set_message(s.to_owned());
            }
            None if !self.quiet => eprintln!("  {s}{}", self.tag),
            None => {}
        }
    }

    /// A stream on its way: the spinner's message on a terminal (no new line each second); a
    /// plain line each time otherwise (a log shows how the stream went).
    pub fn transfer(&mut self, t: &vmsnap::replicate::Transfer) {
        match &self.bar {
            Some(b) => b.set_message(t.to_string()),
            None if !self.quiet => eprintln!("  {t}{}", self.tag),
            None => {}
        }
    }

    /// A line that is not a step (always shown, also with `--json`).
    pub fn note(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    pub fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
