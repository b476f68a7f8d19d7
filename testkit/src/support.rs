//! Helpers the test lanes and benchmarks share: the `check` of libtest-mimic cases, a runtime,
//! polling with a deadline, a median, timed trials, and the guest's counter writer.

use libtest_mimic::Failed;
use std::time::{Duration, Instant};

/// `Ok` when `cond` holds, else a failure saying `what`.
pub fn check(cond: bool, what: impl std::fmt::Display) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(what.to_string().into())
    }
}

/// A lane's case.
pub type Case = fn() -> Result<(), Failed>;

/// The lane's cases as trials, each printing `CASE <name>: N s` when it ends (what a slow lane
/// spends its time on, in the log).
pub fn timed_trials(cases: &[(&'static str, Case)]) -> Vec<libtest_mimic::Trial> {
    cases
        .iter()
        .map(|&(name, f)| {
            libtest_mimic::Trial::test(name, move || {
                let t = Instant::now();
                let res = f();
                eprintln!("CASE {name}: {:.1} s ({})", t.elapsed().as_secs_f64(), if res.is_ok() { "ok" } else { "failed" });
                res
            })
        })
        .collect()
}

/// A runtime like the product's (two workers).
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

/// Polls `cond` every `every` until it holds (prints `METRIC <what> after N s`) or `limit`
/// passes; the failure carries `context()` (a log, say).
pub fn wait_for(
    what: &str,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) -> Result<(), Failed> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            eprintln!("METRIC {what} after {:.1} s", t.elapsed().as_secs_f64());
            return Ok(());
        }
        std::thread::sleep(every);
    }
    Err(format!("{what}: not within {limit:?}\n{}", context()).into())
}

/// The median (upper middle for an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A guest shell loop: a counter on both disks (`/mnt/vda`, `/mnt/vdb`), rewritten about every
/// half second with write + rename, so any instant has a whole one. (Each round forks a few
/// programs: in a guest nested under TCG inside TCG, a tighter loop kept the guest's CPU busy
/// for the whole lane, competing with what the lane measures.)
pub const COUNTER_WRITER: &str =
    "i=0; while :; do i=$((i+1)); for d in vda vdb; do echo $i > /mnt/$d/c.tmp && mv /mnt/$d/c.tmp /mnt/$d/counter; done; sleep 0.5; done";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
