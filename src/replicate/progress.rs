//! What a replication run tells whoever watches it: its steps in words, and while a stream or a
//! RAM dump moves, a [`Transfer`] (bytes, total, rate, time left) that the CLI's bar, the D-Bus
//! job's `Transfer` property and the logs show.

use std::time::Duration;

/// One stream on its way to the target.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Transfer {
    /// What moves ("tank/vms/web: incremental @a → @b", "the RAM dump of …").
    pub what: String,
    /// Bytes moved so far in this stream.
    pub bytes: u64,
    /// The stream's size as far as it is known: `zfs send -nP`'s estimate (for a resumed send,
    /// of what is left), or the dump's remaining bytes; never below `bytes` (an estimate can be
    /// short), 0 when unknown.
    pub total: u64,
    /// Bytes per second since the stream started.
    pub rate: u64,
    /// Seconds left at that rate; `None` while unknown.
    pub eta_seconds: Option<u64>,
}

impl Transfer {
    /// The figures of a stream `estimate` bytes long (if known), `bytes` moved in `elapsed`.
    pub fn measure(what: &str, bytes: u64, estimate: Option<u64>, elapsed: Duration) -> Self {
        let total = estimate.map_or(0, |e| e.max(bytes));
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 { (bytes as f64 / secs) as u64 } else { 0 };
        let eta_seconds = match (estimate, rate) {
            (Some(_), r) if r > 0 => Some(total.saturating_sub(bytes).div_ceil(r)),
            (Some(_), _) if bytes >= total => Some(0),
            _ => None,
        };
        Self { what: what.to_owned(), bytes, total, rate, eta_seconds }
    }
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |n: u64| n as f64 / 1_048_576.0;
        write!(f, "{}: {:.1} MiB", self.what, mib(self.bytes))?;
        if self.total > 0 {
            write!(f, " of {:.1} MiB", mib(self.total))?;
        }
        write!(f, " at {:.1} MiB/s", mib(self.rate))?;
        if let Some(eta) = self.eta_seconds.filter(|_| self.bytes < self.total) {
            write!(f, ", {eta} s left")?;
        }
        Ok(())
    }
}

/// Whoever watches a run. Any `Fn(&str)` is one that shows transfers as lines of text.
pub trait Observer: Sync {
    /// A step starts.
    fn step(&self, s: &str);
    /// A stream moved on (at its start, each second, and at its end).
    fn transfer(&self, t: &Transfer) {
        self.step(&t.to_string());
    }
}

impl<F: Fn(&str) + Sync> Observer for F {
    fn step(&self, s: &str) {
        self(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_time_left() {
        let t = Transfer::measure("s", 50 << 20, Some(150 << 20), Duration::from_secs(5));
        assert_eq!((t.total, t.rate, t.eta_seconds), (150 << 20, 10 << 20, Some(10)));
        assert_eq!(t.to_string(), "s: 50.0 MiB of 150.0 MiB at 10.0 MiB/s, 10 s left");
    }

    #[test]
    fn a_short_estimate_never_underflows() {
        // A resumed send's estimate, or compression, can be below what ends up moving.
        let t = Transfer::measure("s", 300, Some(200), Duration::from_secs(1));
        assert_eq!((t.bytes, t.total, t.eta_seconds), (300, 300, Some(0)));
        assert!(!t.to_string().contains("left"));
    }

    #[test]
    fn unknown_size_and_the_first_instant() {
        let t = Transfer::measure("s", 0, None, Duration::ZERO);
        assert_eq!((t.total, t.rate, t.eta_seconds), (0, 0, None));
        assert_eq!(t.to_string(), "s: 0.0 MiB at 0.0 MiB/s");
        let start = Transfer::measure("s", 0, Some(10), Duration::ZERO);
        assert_eq!(start.eta_seconds, None);
    }
}
