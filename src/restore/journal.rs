//! The restore journal: the plan, written before the first rollback, and each step's fact after
//! it, in `<state_dir>/restore/<domain>.json` (rewritten whole, atomically). A crash leaves it;
//! [`recover_pending`] finishes the rollbacks, nvram and definition once the domain is stopped,
//! and never rolls back a dataset the journal says is done (the VM may have run on it since).

use super::{steps, Plan, RestoreError};
use crate::config::Config;
use crate::fsutil::Dir;
use crate::zfs::Zfs;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    pub plan: Plan,
    /// Snapshots rolled back (facts).
    pub rolled_back: Vec<String>,
    pub nvram_written: bool,
    /// The newer snapshots' RAM dumps were deleted.
    #[serde(default)]
    pub dumps_removed: bool,
    pub redefined: bool,
    /// The domain was about to be started from its RAM dump (intent): never redone by recovery.
    pub resume_started: bool,
}

pub(super) struct Journal {
    dir: Dir,
    name: String,
    pub state: State,
}

const MAX: u64 = 1 << 20;

fn dir(state_dir: &Path) -> Result<Dir, RestoreError> {
    Dir::private(state_dir, &["restore"]).map_err(|e| RestoreError::Journal { path: state_dir.join("restore"), why: e.to_string() })
}

impl Journal {
    pub fn create(state_dir: &Path, plan: Plan) -> Result<Self, RestoreError> {
        let j = Self {
            dir: dir(state_dir)?,
            name: format!("{}.json", plan.domain),
            state: State {
                plan,
                rolled_back: Vec::new(),
                nvram_written: false,
                dumps_removed: false,
                redefined: false,
                resume_started: false,
            },
        };
        if j.path().exists() {
            return Err(RestoreError::Journal {
                path: j.path(),
                why: "an earlier restore of this domain did not finish: run `vmsnap recover` first".into(),
            });
        }
        j.record("restore_planned")?;
        Ok(j)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// Records the state as it is now, after the step `step` (fault-injection builds may stop
    /// the process right after each record: `VMSNAP_ABORT_AT=after:<step>`).
    pub fn record(&self, step: &'static str) -> Result<(), RestoreError> {
        let text = serde_json::to_vec_pretty(&self.state).expect("a restore state serializes");
        self.dir.write_atomic(&self.name, &text, 0o600).map_err(|e| RestoreError::Journal { path: self.path(), why: e.to_string() })?;
        crate::engine::journal::fault_point("after", step);
        Ok(())
    }

    /// The restore is over: the journal goes.
    pub fn finish(self) -> Result<(), RestoreError> {
        std::fs::remove_file(self.path()).map_err(|e| RestoreError::Journal { path: self.path(), why: e.to_string() })
    }

    fn load(dir: Dir, name: String) -> Result<Self, RestoreError> {
        let path = dir.path().join(&name);
        let bad = |why: String| RestoreError::Journal { path: path.clone(), why };
        let bytes = crate::fsutil::read_limited(&path, MAX).map_err(|e| bad(e.to_string()))?;
        let state: State = serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable: {e}")))?;
        if format!("{}.json", state.plan.domain) != name {
            return Err(bad(format!("names domain {:?}", state.plan.domain)));
        }
        Ok(Self { dir, name, state })
    }
}

/// Finishes every restore a crash interrupted: one line per action, per domain.
pub async fn recover_pending(cfg: &Config, zfs: &Zfs) -> Result<Vec<(String, Vec<String>)>, RestoreError> {
    let base = cfg.state_dir.join("restore");
    if !base.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&base)
        .map_err(|e| RestoreError::Journal { path: base.clone(), why: e.to_string() })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        let journal = Journal::load(dir(&cfg.state_dir)?, name)?;
        let domain = journal.state.plan.domain.clone();
        let actions = steps::finish_interrupted(cfg, zfs, journal).await?;
        out.push((domain, actions));
    }
    Ok(out)
}
