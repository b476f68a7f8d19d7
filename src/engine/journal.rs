//! The journal of one running snapshot operation: what has been started and done, so that a crash
//! at any point can be cleaned up by `vmsnap recover` (and by the engine itself on an error).
//!
//! One file per domain under `<state_dir>/journal/`, rewritten whole on every record (a handful of
//! records per operation) through write + fsync + rename + fsync of the directory, so a reader
//! sees either the old or the new list, never a torn one. [`obligations`] is the pure replay:
//! from any prefix of records to what must be undone.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One overlay vmsnap put (or was about to put) on top of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayRecord {
    /// The disk's node the overlay goes on (and is committed back into).
    pub disk_node: String,
    pub overlay_node: String,
    pub file_node: String,
    pub path: PathBuf,
    pub fdset_id: Option<i64>,
    pub job_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    Begin {
        domain: String,
        qmp: PathBuf,
        qga: Option<PathBuf>,
        snapshot: String,
        pid: u32,
    },
    /// Overlay files exist and their nodes may have been added to QEMU.
    OverlaysCreated {
        overlays: Vec<OverlayRecord>,
    },
    /// `guest-fsfreeze-freeze` is about to be sent.
    FreezeStarted,
    Thawed,
    /// vmsnap is about to pause the VM (`stop`, or a migration that ends paused).
    PauseStarted,
    Resumed,
    /// The RAM dump file is created and about to be written.
    RamDumpStarted {
        path: PathBuf,
    },
    RamDumpDone {
        path: PathBuf,
        sha256: String,
    },
    /// The `transaction` switching disks to overlays is about to be sent.
    SwitchStarted,
    Switched,
    ZfsSnapshotDone {
        names: Vec<String>,
    },
    /// Every overlay is merged back, its nodes deleted and its file removed.
    Committed,
    End,
}

impl Record {
    /// A short name, used by the fault-injection hook and in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Record::Begin { .. } => "begin",
            Record::OverlaysCreated { .. } => "overlays_created",
            Record::FreezeStarted => "freeze_started",
            Record::Thawed => "thawed",
            Record::PauseStarted => "pause_started",
            Record::Resumed => "resumed",
            Record::RamDumpStarted { .. } => "ram_dump_started",
            Record::RamDumpDone { .. } => "ram_dump_done",
            Record::SwitchStarted => "switch_started",
            Record::Switched => "switched",
            Record::ZfsSnapshotDone { .. } => "zfs_snapshot_done",
            Record::Committed => "committed",
            Record::End => "end",
        }
    }
}

/// What must be done to leave nothing behind, derived from a journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Obligations {
    /// The VM may be paused by vmsnap: `cont` it.
    pub resume: bool,
    /// The guest may be frozen: thaw it.
    pub thaw: bool,
    /// Overlays that may be in the disk chain: commit them back (if they are), then remove them.
    pub merge: Vec<OverlayRecord>,
    /// Overlays that never reached the chain: remove their nodes, fdsets and files.
    pub remove: Vec<OverlayRecord>,
    /// A RAM dump that has no snapshot to go with: delete it.
    pub delete_ram: Option<PathBuf>,
}

impl Obligations {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Pure replay of a journal (any prefix of one) to what must still be undone.
pub fn obligations(records: &[Record]) -> Obligations {
    let mut o = Obligations::default();
    let mut overlays = Vec::new();
    let mut switch_started = false;
    let mut ram: Option<PathBuf> = None;
    let mut snapshot_taken = false;
    for r in records {
        match r {
            Record::Begin { .. } => {}
            Record::OverlaysCreated { overlays: list } => overlays = list.clone(),
            Record::FreezeStarted => o.thaw = true,
            Record::Thawed => o.thaw = false,
            Record::PauseStarted => o.resume = true,
            Record::Resumed => o.resume = false,
            Record::RamDumpStarted { path } | Record::RamDumpDone { path, .. } => ram = Some(path.clone()),
            Record::SwitchStarted => switch_started = true,
            Record::Switched => {}
            Record::ZfsSnapshotDone { .. } => snapshot_taken = true,
            Record::Committed => overlays.clear(),
            Record::End => return Obligations::default(),
        }
    }
    if switch_started {
        o.merge = overlays;
    } else {
        o.remove = overlays;
    }
    if !snapshot_taken {
        o.delete_ram = ram;
    }
    o
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot write journal {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
}

/// The journal file of one operation.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    records: Vec<Record>,
}

/// Environment variable naming a record after which the process aborts (fault-injection tests).
pub const ABORT_AFTER_ENV: &str = "VMSNAP_ABORT_AFTER";

impl Journal {
    pub fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join("journal")
    }

    /// Starts a new journal for `domain` (there must be none: recover first).
    pub fn create(state_dir: &Path, domain: &str, begin: Record) -> Result<Self, JournalError> {
        let dir = Self::dir(state_dir);
        let path = dir.join(format!("{domain}.json"));
        create_private_dir(&dir).map_err(|source| JournalError::Write { path: path.clone(), source })?;
        let mut j = Self { path, records: Vec::new() };
        j.append(begin)?;
        Ok(j)
    }

    /// Reads a journal left behind.
    pub fn load(path: &Path) -> Result<Self, JournalError> {
        let text = std::fs::read_to_string(path).map_err(|source| JournalError::Read { path: path.to_owned(), source })?;
        let records: Vec<Record> =
            serde_json::from_str(&text).map_err(|e| JournalError::Damaged { path: path.to_owned(), why: e.to_string() })?;
        Ok(Self { path: path.to_owned(), records })
    }

    /// Every journal under `state_dir`.
    pub fn pending(state_dir: &Path) -> Result<Vec<PathBuf>, JournalError> {
        let dir = Self::dir(state_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(JournalError::Read { path: dir, source }),
        };
        let mut out: Vec<PathBuf> =
            entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        out.sort();
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Adds a record durably (fsync + rename + fsync of the directory).
    pub fn append(&mut self, record: Record) -> Result<(), JournalError> {
        let name = record.name();
        self.records.push(record);
        let err = |source| JournalError::Write { path: self.path.clone(), source };
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&self.records).expect("records serialise");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        if std::env::var(ABORT_AFTER_ENV).is_ok_and(|v| v == name) {
            eprintln!("vmsnap: {ABORT_AFTER_ENV}={name}: aborting (fault-injection test)");
            std::process::abort();
        }
        Ok(())
    }

    /// Removes the journal: the operation is over and nothing is left to undo.
    pub fn remove(self) -> Result<(), JournalError> {
        std::fs::remove_file(&self.path).map_err(|source| JournalError::Write { path: self.path.clone(), source })
    }
}

/// Creates `dir` (and parents) as root-only (0700).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(i: usize) -> OverlayRecord {
        OverlayRecord {
            disk_node: format!("disk{i}-fmt"),
            overlay_node: format!("vmsnap-ov{i}"),
            file_node: format!("vmsnap-ov{i}-f"),
            path: PathBuf::from(format!("/var/lib/vmsnap/overlays/vm/s-{i}.qcow2")),
            fdset_id: Some(i as i64),
            job_id: format!("vmsnap-commit-{i}"),
        }
    }

    fn full_overlay_run() -> Vec<Record> {
        vec![
            Record::Begin { domain: "vm".into(), qmp: "/q".into(), qga: Some("/a".into()), snapshot: "s".into(), pid: 1 },
            Record::OverlaysCreated { overlays: vec![overlay(0), overlay(1)] },
            Record::FreezeStarted,
            Record::SwitchStarted,
            Record::Switched,
            Record::Thawed,
            Record::ZfsSnapshotDone { names: vec!["tank/vm@s".into()] },
            Record::Committed,
            Record::End,
        ]
    }

    fn full_ram_run() -> Vec<Record> {
        vec![
            Record::Begin { domain: "vm".into(), qmp: "/q".into(), qga: None, snapshot: "s".into(), pid: 1 },
            Record::OverlaysCreated { overlays: vec![overlay(0)] },
            Record::PauseStarted,
            Record::SwitchStarted,
            Record::Switched,
            Record::RamDumpStarted { path: "/ram/s.ram".into() },
            Record::Resumed,
            Record::RamDumpDone { path: "/ram/s.ram".into(), sha256: "ab".into() },
            Record::ZfsSnapshotDone { names: vec!["tank/vm@s".into()] },
            Record::Committed,
            Record::End,
        ]
    }

    /// Truncating a journal at every prefix gives exactly the obligations of that moment.
    #[test]
    fn every_prefix_of_an_overlay_run() {
        let run = full_overlay_run();
        for cut in 0..=run.len() {
            let o = obligations(&run[..cut]);
            let seen = |name: &str| run[..cut].iter().any(|r| r.name() == name);
            assert_eq!(o.thaw, seen("freeze_started") && !seen("thawed"), "cut {cut}");
            assert!(!o.resume, "cut {cut}");
            let live = seen("overlays_created") && !seen("committed") && !seen("end");
            assert_eq!(!o.merge.is_empty(), live && seen("switch_started"), "cut {cut}: {o:?}");
            assert_eq!(!o.remove.is_empty(), live && !seen("switch_started"), "cut {cut}: {o:?}");
            assert_eq!(o.merge.len() + o.remove.len(), if live { 2 } else { 0 });
            assert_eq!(o.delete_ram, None);
        }
        assert!(obligations(&run).is_empty());
    }

    #[test]
    fn every_prefix_of_a_ram_run() {
        let run = full_ram_run();
        for cut in 0..=run.len() {
            let o = obligations(&run[..cut]);
            let seen = |name: &str| run[..cut].iter().any(|r| r.name() == name);
            assert_eq!(o.resume, seen("pause_started") && !seen("resumed"), "cut {cut}");
            assert_eq!(o.delete_ram.is_some(), seen("ram_dump_started") && !seen("zfs_snapshot_done") && !seen("end"), "cut {cut}");
        }
    }

    #[test]
    fn journal_round_trips_through_the_file_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let run = full_overlay_run();
        let mut j = Journal::create(dir.path(), "vm", run[0].clone()).unwrap();
        for r in &run[1..4] {
            j.append(r.clone()).unwrap();
        }
        let pending = Journal::pending(dir.path()).unwrap();
        assert_eq!(pending.len(), 1);
        let loaded = Journal::load(&pending[0]).unwrap();
        assert_eq!(loaded.records(), &run[..4]);
        let mode = std::fs::metadata(Journal::dir(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        loaded.remove().unwrap();
        assert!(Journal::pending(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_journal_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(&p, "[{\"record\":\"begin\"").unwrap();
        let e = Journal::load(&p).unwrap_err().to_string();
        assert!(e.contains("vm.json") && e.contains("damaged"), "{e}");
    }
}
