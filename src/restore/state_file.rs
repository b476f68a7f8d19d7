//! The file under a restore's journal and a copy's journal: one JSON document in a root-only
//! directory, rewritten whole and atomically (0600) before or after each step, read back
//! bounded, removed when the work is over. What the document says is each journal's own.

use super::RestoreError;
use crate::fsutil::Dir;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The most a journal file is read back (they are a few KiB).
const MAX: u64 = 1 << 20;

pub(super) struct StateFile {
    dir: Dir,
    name: String,
}

impl StateFile {
    /// Writes `state` as the first record (`step`) of a new file `name` in `dir`; refuses, with
    /// `unfinished` as the reason, when the file is already there (earlier work did not finish).
    pub fn create<S: Serialize>(
        dir: Dir,
        name: String,
        state: &S,
        step: &'static str,
        unfinished: impl FnOnce() -> String,
    ) -> Result<Self, RestoreError> {
        let file = Self { dir, name };
        if file.path().exists() {
            return Err(RestoreError::Journal { path: file.path(), why: unfinished() });
        }
        file.write(state, step)?;
        Ok(file)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// Records `state` as it is after `step` (fault-injection builds may stop the process right
    /// after: `VMSNAP_ABORT_AT=after:<step>`).
    pub fn write<S: Serialize>(&self, state: &S, step: &'static str) -> Result<(), RestoreError> {
        let text = serde_json::to_vec_pretty(state).expect("a journal state serializes");
        self.dir.write_atomic(&self.name, &text, 0o600).map_err(|e| RestoreError::Journal { path: self.path(), why: e.to_string() })?;
        crate::engine::journal::fault_point("after", step);
        Ok(())
    }

    /// The work is over: the file goes.
    pub fn remove(self) -> Result<(), RestoreError> {
        std::fs::remove_file(self.path()).map_err(|e| RestoreError::Journal { path: self.path(), why: e.to_string() })
    }

    /// Reads the file `name` in `dir` back; `names_itself` checks that the state is the one
    /// the file's name says (an error naming what it says instead).
    pub fn read<S: DeserializeOwned>(
        dir: Dir,
        name: String,
        names_itself: impl FnOnce(&S) -> Result<(), String>,
    ) -> Result<(Self, S), RestoreError> {
        let file = Self { dir, name };
        let bad = |why: String| RestoreError::Journal { path: file.path(), why };
        let bytes = crate::fsutil::read_limited(&file.path(), MAX).map_err(|e| bad(e.to_string()))?;
        let state: S = serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable: {e}")))?;
        names_itself(&state).map_err(bad)?;
        Ok((file, state))
    }
}

/// The journal files left in `dir` (work a crash interrupted), in name order; none when the
/// directory does not exist.
pub(super) fn left_in(dir: &Path) -> Result<Vec<String>, RestoreError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| RestoreError::Journal { path: dir.to_owned(), why: e.to_string() })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}
