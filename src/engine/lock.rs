//! One operation per domain at a time: an exclusive `flock` on `<state_dir>/locks/<domain>.lock`.
//! The kernel drops the lock when the process dies, so a crash never leaves a domain locked.

use super::journal::create_private_dir;
use super::EngineError;
use nix::fcntl::{Flock, FlockArg};
use std::path::Path;

#[derive(Debug)]
pub struct DomainLock {
    _lock: Flock<std::fs::File>,
}

impl DomainLock {
    /// Takes the lock or fails at once with [`EngineError::Busy`].
    pub fn acquire(state_dir: &Path, domain: &str) -> Result<Self, EngineError> {
        Self::acquire_in(&state_dir.join("locks"), domain)
    }

    /// The domain's replication lock (`<state_dir>/locks/replicate/<domain>.lock`): replication
    /// takes it instead of the domain's lock, so hours of sending never block its snapshots;
    /// a restore takes both.
    pub fn replication(state_dir: &Path, domain: &str) -> Result<Self, EngineError> {
        Self::acquire_in(&state_dir.join("locks").join("replicate"), domain)
    }

    fn acquire_in(dir: &Path, domain: &str) -> Result<Self, EngineError> {
        let dir = dir.to_owned();
        let path = dir.join(format!("{domain}.lock"));
        let io = |source| EngineError::Step {
            domain: domain.to_owned(),
            step: "lock",
            source: Box::new(super::StepError::Io { what: format!("opening {}", path.display()), source }),
        };
        create_private_dir(&dir).map_err(io)?;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, _)) => Err(EngineError::Busy { domain: domain.to_owned(), lock: path }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_busy_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DomainLock::acquire(dir.path(), "vm").unwrap();
        assert!(matches!(DomainLock::acquire(dir.path(), "vm"), Err(EngineError::Busy { .. })));
        assert!(DomainLock::acquire(dir.path(), "other").is_ok());
        drop(first);
        assert!(DomainLock::acquire(dir.path(), "vm").is_ok());
    }

    #[test]
    fn replication_has_its_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotting = DomainLock::acquire(dir.path(), "vm").unwrap();
        let sending = DomainLock::replication(dir.path(), "vm").unwrap();
        assert!(matches!(DomainLock::replication(dir.path(), "vm"), Err(EngineError::Busy { .. })));
        drop(snapshotting);
        assert!(DomainLock::acquire(dir.path(), "vm").is_ok(), "a send does not block a snapshot");
        drop(sending);
    }
}
