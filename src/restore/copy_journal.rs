//! The journal of a copy (`restore --as NEW`, and `verify --boot`'s scratch copy): the plan and
//! each intent written before its step, in `<state_dir>/restore/copies/<new>.json`. What a copy
//! makes is all new, so a copy that did not finish is undone — and every undo checks the system
//! first: a clone is destroyed only while its origin is the planned snapshot, the libvirt
//! definition only while its UUID is the one this copy generated, a config copy's
//! `[domain.NEW]` only while it is still the end of the file as appended (its QEMU asked to quit
//! first), the nvram only once its write was intended.
//! A copy a crash left running is the user's (kept) unless it was a verification's scratch copy.

use super::clone::ClonePlan;
use super::state_file::{self, StateFile};
use super::RestoreError;
use crate::fsutil::Dir;
use crate::libvirt::virsh;
use crate::zfs::{Dataset, Zfs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    pub plan: ClonePlan,
    /// The UUID the new definition gets: written before `virsh define`.
    pub uuid: Option<String>,
    /// A config domain's copy: (the configuration file, the table appended to it, the copy's
    /// QMP socket), written before it is appended.
    #[serde(default)]
    pub config: Option<(PathBuf, String, PathBuf)>,
    /// The nvram copy was about to be written.
    pub nvram_intended: bool,
    /// The save image written for the resume (removed right after `virsh restore`).
    pub image: Option<PathBuf>,
    /// The copy was about to be started.
    pub start_intended: bool,
}

pub(super) struct CopyJournal {
    file: StateFile,
    pub state: State,
}

fn dir(state_dir: &Path) -> Result<Dir, RestoreError> {
    let path = state_dir.join("restore/copies");
    Dir::private(state_dir, &["restore", "copies"]).map_err(|e| RestoreError::Journal { path, why: e.to_string() })
}

impl CopyJournal {
    /// Writes the plan; refuses when a copy of that name did not finish.
    pub fn create(state_dir: &Path, plan: ClonePlan) -> Result<Self, RestoreError> {
        let name = format!("{}.json", plan.new_name);
        let unfinished = format!("an earlier copy named {} did not finish: run `vmsnap recover` first", plan.new_name);
        let state = State { plan, uuid: None, config: None, nvram_intended: false, image: None, start_intended: false };
        let file = StateFile::create(dir(state_dir)?, name, &state, "copy_planned", || unfinished)?;
        Ok(Self { file, state })
    }

    /// Records the state (fault-injection builds may stop right after: `after:<step>`).
    pub fn record(&self, step: &'static str) -> Result<(), RestoreError> {
        self.file.write(&self.state, step)
    }

    pub fn finish(self) -> Result<(), RestoreError> {
        self.file.remove()
    }

    fn load(dir: Dir, name: String) -> Result<Self, RestoreError> {
        let expected = name.clone();
        let (file, state) = StateFile::read(dir, name, |s: &State| {
            let new = &s.plan.new_name;
            if format!("{new}.json") == expected && crate::config::valid_domain_name(new) {
                Ok(())
            } else {
                Err(format!("names domain {new:?}"))
            }
        })?;
        Ok(Self { file, state })
    }

    /// Whether libvirt's domain of the new name is the one this copy defined.
    fn ours(&self) -> bool {
        let new = &self.state.plan.new_name;
        self.state.uuid.as_ref().is_some_and(|u| virsh::run(&["domuuid", "--", new]).is_ok_and(|got| got.trim() == u))
    }

    /// Whether the copy runs: libvirt's domain (ours) not shut off, or a QEMU answering on a
    /// config copy's QMP socket.
    async fn runs(&self) -> Result<bool, RestoreError> {
        if let Some((_, _, qmp)) = &self.state.config {
            return Ok(crate::qemu::qmp::Qmp::connect(qmp, Duration::from_secs(3)).await.is_ok());
        }
        Ok(self.ours() && virsh::domstate(&self.state.plan.new_name)?.is_some_and(|s| s != "shut off"))
    }

    /// Removes what the copy made, checking each thing first; one line per action (failures
    /// included: the rest is still tried).
    pub async fn undo(&self, zfs: &Zfs) -> Vec<String> {
        let plan = &self.state.plan;
        let new = plan.new_name.as_str();
        let mut done = Vec::new();
        if self.ours() {
            match virsh::destroy(new).and_then(|()| virsh::undefine(new)) {
                Ok(()) => done.push(format!("removed the domain {new}")),
                Err(e) => done.push(format!("could not remove the domain {new}: {e}")),
            }
        }
        if let Some((config, text, qmp)) = &self.state.config {
            if super::start_qemu::stop(qmp).await {
                done.push(format!("stopped {new}'s QEMU"));
                // The clones stay busy until it has gone.
                for _ in 0..50 {
                    if crate::qemu::qmp::Qmp::connect(qmp, Duration::from_millis(500)).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if super::config_copy::remove(config, text) {
                done.push(format!("removed [domain.{new}] from {}", config.display()));
            } else if super::config_copy::present(config, text) {
                done.push(format!("could not remove [domain.{new}] from {} (edited since: remove it by hand)", config.display()));
            }
        }
        if let Some(img) = &self.state.image {
            if std::fs::remove_file(img).is_ok() {
                done.push(format!("deleted {}", img.display()));
            }
        }
        for (snap, target) in plan.clones.iter().rev() {
            match zfs.get_native(target, "origin").await {
                Ok(Some(origin)) if origin == *snap => match destroy_retrying(zfs, target).await {
                    Ok(()) => done.push(format!("destroyed the clone {target}")),
                    Err(e) => done.push(format!("could not destroy the clone {target}: {e}")),
                },
                Ok(Some(other)) => done.push(format!("left {target}: a clone of {other}, not of {snap}")),
                Ok(None) => {}
                Err(e) => done.push(format!("could not read {target}: {e}")),
            }
        }
        if let (Some((_, home)), true) = (&plan.nvram, self.state.nvram_intended) {
            if std::fs::remove_file(home).is_ok() {
                done.push(format!("deleted {}", home.display()));
            }
        }
        done
    }
}

/// `zfs destroy` of a clone QEMU just let go of (its zvol or mount can stay busy a moment).
async fn destroy_retrying(zfs: &Zfs, target: &str) -> Result<(), crate::zfs::ZfsError> {
    let ds = Dataset::new(target)?;
    let mut tries = 0;
    loop {
        match zfs.destroy_dataset(&ds).await {
            Err(e) if tries < 20 && e.to_string().contains("busy") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}

/// Undoes every copy a crash interrupted (a copy a crash left running is the user's and kept,
/// unless it is a verification's scratch copy): one line per action, per copy.
pub async fn recover_copies(state_dir: &Path, zfs: &Zfs) -> Result<Vec<(String, Vec<String>)>, RestoreError> {
    let names = state_file::left_in(&state_dir.join("restore/copies"))?;
    let mut out = Vec::new();
    for name in names {
        let journal = CopyJournal::load(dir(state_dir)?, name)?;
        let new = journal.state.plan.new_name.clone();
        let _lock = crate::engine::lock::DomainLock::acquire(state_dir, &new)
            .map_err(|e| RestoreError::Busy { domain: new.clone(), source: Box::new(e) })?;
        let runs = journal.runs().await?;
        let actions = if runs && !journal.state.plan.scratch {
            if let Some(img) = &journal.state.image {
                let _ = std::fs::remove_file(img);
            }
            vec![format!("the copy {new} runs: kept as it is")]
        } else {
            let mut a = journal.undo(zfs).await;
            a.insert(0, format!("undoing the unfinished copy {new} of {} {}", journal.state.plan.domain, journal.state.plan.snapshot));
            a
        };
        journal.finish()?;
        out.push((new, actions));
    }
    Ok(out)
}
