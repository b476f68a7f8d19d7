//! What the daemon last did for each domain, persisted (`<state_dir>/status.json`, fsync +
//! rename) so `vmsnap check` can report a failing domain even between snapshots.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The last scheduled attempt for one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Unix seconds.
    pub at: i64,
    pub ok: bool,
    /// The snapshot name, when one was taken.
    pub snapshot: Option<String>,
    pub consistency: Option<String>,
    /// The error chain, when it failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub domains: BTreeMap<String, Attempt>,
}

impl Status {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("status.json")
    }

    /// The saved status; empty when there is none yet.
    pub fn load(state_dir: &Path) -> std::io::Result<Status> {
        match std::fs::read(Self::path(state_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Status::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let path = Self::path(state_dir);
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&path, &text, 0o644).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Status::load(dir.path()).unwrap(), Status::default());
        let mut s = Status::default();
        s.domains.insert("web".into(), Attempt { at: 5, ok: false, snapshot: None, consistency: None, error: Some("agent gone".into()) });
        s.save(dir.path()).unwrap();
        assert_eq!(Status::load(dir.path()).unwrap(), s);
        std::fs::write(Status::path(dir.path()), "{").unwrap();
        assert!(Status::load(dir.path()).is_err());
    }
}
