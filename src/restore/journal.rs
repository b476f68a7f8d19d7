//! The restore journal: the plan, written before the first rollback, and each step's fact after
//! it, in `<state_dir>/restore/<domain>.json` (rewritten whole, atomically). A crash leaves it;
//! [`recover_pending`] finishes the rollbacks, nvram and definition once the domain is stopped,
//! and never rolls back a dataset the journal says is done (the VM may have run on it since).

use super::state_file::{self, StateFile};
use super::{steps, Plan, RestoreError};
use crate::config::Config;
use crate::fsutil::Dir;
use crate::zfs::Zfs;
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// A raw save image vmsnap was about to write for `virsh restore` (intent: a zstd dump this
    /// libvirt cannot read); recovery deletes it (it holds the guest's RAM).
    #[serde(default)]
    pub image: Option<std::path::PathBuf>,
}

pub(super) struct Journal {
    file: StateFile,
    pub state: State,
}

fn dir(state_dir: &Path) -> Result<Dir, RestoreError> {
    Dir::private(state_dir, &["restore"]).map_err(|e| RestoreError::Journal { path: state_dir.join("restore"), why: e.to_string() })
}

impl Journal {
    pub fn create(state_dir: &Path, plan: Plan) -> Result<Self, RestoreError> {
        let name = format!("{}.json", plan.domain);
        let state = State {
            plan,
            rolled_back: Vec::new(),
            nvram_written: false,
            dumps_removed: false,
            redefined: false,
            resume_started: false,
            image: None,
        };
        let file = StateFile::create(dir(state_dir)?, name, &state, "restore_planned", || {
            "an earlier restore of this domain did not finish: run `vmsnap recover` first".into()
        })?;
        Ok(Self { file, state })
    }

    /// Records the state as it is now, after the step `step`.
    pub fn record(&self, step: &'static str) -> Result<(), RestoreError> {
        self.file.write(&self.state, step)
    }

    /// The restore is over: the journal goes.
    pub fn finish(self) -> Result<(), RestoreError> {
        self.file.remove()
    }

    fn load(dir: Dir, name: String) -> Result<Self, RestoreError> {
        let expected = name.clone();
        let (file, state) = StateFile::read(dir, name, |s: &State| {
            if format!("{}.json", s.plan.domain) == expected {
                Ok(())
            } else {
                Err(format!("names domain {:?}", s.plan.domain))
            }
        })?;
        Ok(Self { file, state })
    }
}

/// Finishes every restore a crash interrupted: one line per action, per domain.
pub async fn recover_pending(cfg: &Config, zfs: &Zfs) -> Result<Vec<(String, Vec<String>)>, RestoreError> {
    let mut out = Vec::new();
    let names = state_file::left_in(&cfg.state_dir.join("restore"))?;
    for name in names {
        let journal = Journal::load(dir(&cfg.state_dir)?, name)?;
        let domain = journal.state.plan.domain.clone();
        let actions = steps::finish_interrupted(cfg, zfs, journal).await?;
        out.push((domain, actions));
    }
    Ok(out)
}
