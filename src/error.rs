//! How errors travel from where they happen to the person who reads them.
//!
//! The rules:
//! 1. Each layer has its own error enum (`thiserror`); a cause is its `#[source]`, never also
//!    interpolated into the parent's message (the edge prints the chain once: [`chain`]).
//! 2. An error the operator can act on says how through its type's `hint()`; [`hint_of`] finds
//!    the first hint along a chain, wherever the chain was built.
//! 3. A job (in the CLI's process or the daemon's) ends with its message, its kind
//!    ([`crate::daemon::jobs::Failure`]) and that hint, so the CLI prints the same words in
//!    process and through D-Bus (the job's `Failure` and `Hint` properties).

use std::error::Error;

/// `a: b: c` from an error and its sources (what `{:#}` prints for an `anyhow` error).
pub fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The first operator hint along `e`'s chain (`e` itself, then its sources), from the error
/// types that have one.
pub fn hint_of(e: &(dyn Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(job) = e.downcast_ref::<crate::daemon::jobs::JobError>() {
            return job.hint.clone();
        }
        let hint = if let Some(e) = e.downcast_ref::<crate::engine::EngineError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<crate::engine::recover::RecoverError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<crate::replicate::ReplicateError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<crate::engine::journal::JournalError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<crate::recovery::RecoveryError>() {
            e.hint()
        } else {
            None
        };
        if let Some(hint) = hint {
            return Some(hint.to_owned());
        }
        cur = e.source();
    }
    None
}
