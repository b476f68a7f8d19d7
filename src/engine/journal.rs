//! The journal of one running snapshot operation: what has been started and done, so that a crash
//! at any point can be cleaned up by `vmsnap recover` (and by the engine itself on an error).
//!
//! One file per domain under `<state_dir>/journal/`, rewritten whole on every record (a handful of
//! records per operation) through write + fsync + rename + fsync of the directory, so a reader
//! sees either the old or the new list, never a torn one. [`obligations`] is the pure replay:
//! from any prefix of records to what must be undone.

use crate::qemu::process::ProcessId;
use serde::{Deserialize, Serialize};
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
    /// The disk image the overlay sits on (its backing file), checked for other holders before
    /// an offline commit.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// The base's image format (`raw`, `qcow2`): an offline commit writes into the base only
    /// when the overlay's header still names this file in this format.
    #[serde(default)]
    pub base_format: Option<String>,
}

/// The journal format this vmsnap writes and reads (recorded in `begin`).
pub const FORMAT: u32 = 2;

/// Every record is an *intent* (appended before the act, so a crash right after it undoes an act
/// that may or may not have happened) or a *fact* (appended after the act succeeded, and only
/// then). Recovery treats an intent as "maybe done" and checks QEMU or ZFS before undoing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    Begin {
        /// [`FORMAT`]; journals without it were written by vmsnap before format 2.
        #[serde(default)]
        format: u32,
        domain: String,
        qmp: PathBuf,
        qga: Option<PathBuf>,
        snapshot: String,
        pid: u32,
        /// The QEMU process the operation works on (None: the VM was not running, or the kernel
        /// did not say). Recovery never merges into, resumes or cancels on another process.
        #[serde(default)]
        qemu: Option<ProcessId>,
    },
    /// Intent: overlay files are about to be created and their nodes added to QEMU.
    OverlaysCreated {
        overlays: Vec<OverlayRecord>,
    },
    /// Intent: `guest-fsfreeze-freeze` is about to be sent.
    FreezeStarted,
    /// Fact: the agent thawed the guest (or said it is thawed).
    Thawed,
    /// Intent: vmsnap is about to pause the VM (`stop`, or a migration that ends paused).
    PauseStarted,
    /// Fact: the VM runs again.
    Resumed,
    /// Intent: migration capabilities (and, when `max_bandwidth` is there, QEMU's migration
    /// bandwidth) are about to change; `previous` and `max_bandwidth` are what they were.
    CapabilitiesSet {
        previous: Vec<(String, bool)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bandwidth: Option<u64>,
    },
    /// Fact: the capabilities (and the bandwidth) are back as they were.
    CapabilitiesReset,
    /// Intent: the RAM dump file is about to be created.
    RamDumpStarted {
        path: PathBuf,
    },
    /// Intent: `migrate` into the dump is about to be sent.
    MigrationStarted,
    /// Fact: the migration completed (QEMU writes no more into the dump).
    MigrationDone,
    /// Fact: the dump is complete and its checksum known.
    RamDumpDone {
        path: PathBuf,
        sha256: String,
    },
    /// Intent: the `transaction` switching disks to overlays is about to be sent.
    SwitchStarted,
    /// Fact: every disk runs on its overlay.
    Switched,
    /// Intent: `zfs snapshot` of these names is about to run.
    ZfsSnapshotStarted {
        names: Vec<String>,
    },
    /// Fact: the snapshots exist.
    ZfsSnapshotDone {
        names: Vec<String>,
    },
    /// Fact: the snapshots carry the RAM dump's properties (direct strategy: set after the dump).
    RamLabelled,
    /// Fact: this overlay's commit job completed (QEMU runs on the base again; the overlay file
    /// is stale from here on and must never be committed again).
    Merged {
        overlay_node: String,
    },
    /// Fact: every overlay is merged back, its nodes deleted and its file removed.
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
            Record::CapabilitiesSet { .. } => "capabilities_set",
            Record::CapabilitiesReset => "capabilities_reset",
            Record::RamDumpStarted { .. } => "ram_dump_started",
            Record::MigrationStarted => "migration_started",
            Record::MigrationDone => "migration_done",
            Record::RamDumpDone { .. } => "ram_dump_done",
            Record::SwitchStarted => "switch_started",
            Record::Switched => "switched",
            Record::ZfsSnapshotStarted { .. } => "zfs_snapshot_started",
            Record::ZfsSnapshotDone { .. } => "zfs_snapshot_done",
            Record::RamLabelled => "ram_labelled",
            Record::Merged { .. } => "merged",
            Record::Committed => "committed",
            Record::End => "end",
        }
    }
}

/// A RAM dump the operation made or was making, and what decides its fate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamObligation {
    pub path: PathBuf,
    /// Set once the dump was complete and checksummed.
    pub sha256: Option<String>,
    /// Snapshots that may exist and reference it: the dump is kept only if ZFS shows one of
    /// them with `vmsnap:ram-dump` naming it.
    pub snapshots: Vec<String>,
}

/// What must be done to leave nothing behind, derived from a journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Obligations {
    /// The VM may be paused by vmsnap: `cont` it.
    pub resume: bool,
    /// The guest may be frozen: thaw it.
    pub thaw: bool,
    /// A migration into the dump may be running: cancel it and wait until it stopped.
    pub cancel_migration: bool,
    /// Migration capabilities vmsnap may have changed: set them back to these.
    pub reset_capabilities: Option<Vec<(String, bool)>>,
    /// The migration bandwidth to put back (bytes/s), with the capabilities.
    pub reset_bandwidth: Option<u64>,
    /// Overlays that may be in the disk chain: commit them back (if they are), then remove them.
    pub merge: Vec<OverlayRecord>,
    /// Overlays that never reached the chain, or whose commit completed: remove their nodes,
    /// fdsets and files.
    pub remove: Vec<OverlayRecord>,
    /// A RAM dump: kept only when a snapshot that exists references it, deleted otherwise.
    pub ram: Option<RamObligation>,
    /// Snapshots that may have been created (`zfs snapshot` was started): recovery reports
    /// which exist, and strips RAM properties from them when their dump is deleted.
    pub snapshots: Vec<String>,
}

impl Obligations {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A record that cannot be where it is in a journal vmsnap wrote: a fact before its intent, an
/// undo of something never begun, anything before the begin or after the end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index} ({record}) {why}")]
pub struct IllegalRecord {
    pub index: usize,
    pub record: &'static str,
    pub why: &'static str,
}

/// Checks that `records` is a sequence vmsnap writes (the flow and recovery's own appends):
/// [`Journal::load`] refuses any other, so [`obligations`] never replays an impossible one.
pub fn check(records: &[Record]) -> Result<(), IllegalRecord> {
    let mut seen: std::collections::HashSet<&'static str> = std::collections::HashSet::new();
    let mut overlays: Vec<&str> = Vec::new();
    for (index, r) in records.iter().enumerate() {
        let illegal = |why: &'static str| Err(IllegalRecord { index, record: r.name(), why });
        let after = |cause: &'static str, why: &'static str| if seen.contains(cause) { Ok(()) } else { illegal(why) };
        match r {
            _ if seen.contains("end") => illegal("comes after the end record"),
            Record::Begin { .. } if index > 0 => illegal("is a second begin record"),
            Record::Begin { .. } => Ok(()),
            _ if index == 0 => illegal("comes before the begin record"),
            Record::Thawed => after("freeze_started", "comes without a freeze_started before it"),
            Record::Resumed => after("pause_started", "comes without a pause_started before it"),
            Record::CapabilitiesReset => after("capabilities_set", "comes without a capabilities_set before it"),
            Record::MigrationStarted => after("ram_dump_started", "comes without a ram_dump_started before it"),
            Record::MigrationDone => after("migration_started", "comes without a migration_started before it"),
            Record::SwitchStarted => after("overlays_created", "comes without an overlays_created before it"),
            Record::Switched => after("switch_started", "comes without a switch_started before it"),
            Record::ZfsSnapshotDone { .. } => after("zfs_snapshot_started", "comes without a zfs_snapshot_started before it"),
            Record::Merged { overlay_node } if !overlays.contains(&overlay_node.as_str()) => {
                illegal("names an overlay no overlays_created record made")
            }
            Record::Merged { .. } => after("switch_started", "comes without a switch_started before it"),
            Record::Committed => after("overlays_created", "comes without an overlays_created before it"),
            Record::OverlaysCreated { overlays: list } => {
                overlays = list.iter().map(|o| o.overlay_node.as_str()).collect();
                Ok(())
            }
            _ => Ok(()),
        }?;
        seen.insert(r.name());
    }
    Ok(())
}

/// Pure replay of a journal (any prefix of one) to what must still be undone.
pub fn obligations(records: &[Record]) -> Obligations {
    let mut o = Obligations::default();
    let mut overlays = Vec::new();
    let mut merged: Vec<String> = Vec::new();
    let mut switch_started = false;
    for r in records {
        match r {
            Record::Begin { .. } => {}
            Record::OverlaysCreated { overlays: list } => overlays = list.clone(),
            Record::FreezeStarted => o.thaw = true,
            Record::Thawed => o.thaw = false,
            Record::PauseStarted => o.resume = true,
            Record::Resumed => o.resume = false,
            Record::CapabilitiesSet { previous, max_bandwidth } => {
                o.reset_capabilities = Some(previous.clone());
                o.reset_bandwidth = *max_bandwidth;
            }
            Record::CapabilitiesReset => (o.reset_capabilities, o.reset_bandwidth) = (None, None),
            Record::RamDumpStarted { path } => o.ram = Some(RamObligation { path: path.clone(), ..Default::default() }),
            Record::MigrationStarted => o.cancel_migration = true,
            Record::MigrationDone => o.cancel_migration = false,
            Record::RamDumpDone { path, sha256 } => {
                let ram = o.ram.get_or_insert_with(|| RamObligation { path: path.clone(), ..Default::default() });
                ram.sha256 = Some(sha256.clone());
            }
            Record::SwitchStarted => switch_started = true,
            Record::Switched => {}
            Record::ZfsSnapshotStarted { names } | Record::ZfsSnapshotDone { names } => o.snapshots = names.clone(),
            Record::RamLabelled => {}
            Record::Merged { overlay_node } => merged.push(overlay_node.clone()),
            Record::Committed => overlays.clear(),
            Record::End => return Obligations::default(),
        }
    }
    for ov in overlays {
        if switch_started && !merged.contains(&ov.overlay_node) {
            o.merge.push(ov);
        } else {
            o.remove.push(ov);
        }
    }
    if let Some(ram) = o.ram.as_mut() {
        ram.snapshots = o.snapshots.clone();
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
    #[error("journal {path} was written by an older vmsnap (format {found}; this one reads format {FORMAT})")]
    OldFormat { path: PathBuf, found: u32 },
}

impl JournalError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            JournalError::Damaged { .. } | JournalError::OldFormat { .. } => Some(
                "check the VM by hand: `virsh domfsthaw`/guest-fsfreeze-thaw, `cont` if paused, no vmsnap-ov* node in \
                 query-block; commit any overlay left in overlay_dir with `qemu-img commit` while the VM is off; then \
                 delete the journal file",
            ),
            _ => None,
        }
    }
}

/// The journal file of one operation.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    records: Vec<Record>,
}

/// Environment variable naming a record before or after whose append the process aborts, as
/// `before:NAME` or `after:NAME` (fault-injection tests: a kill -9 at that instant), or
/// `panic:before:NAME` / `panic:after:NAME` (the job panics there, once per process: a bug in
/// a daemon's job). Only builds with the `fault-injection` feature (the tests') read it.
#[cfg(feature = "fault-injection")]
pub const ABORT_AT_ENV: &str = "VMSNAP_ABORT_AT";

/// Aborts the process (or panics, once) when [`ABORT_AT_ENV`] names this moment.
#[cfg(feature = "fault-injection")]
pub fn fault_point(when: &str, name: &str) {
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Ok(v) = std::env::var(ABORT_AT_ENV) {
        let (panics, point) = match v.strip_prefix("panic:") {
            Some(p) => (true, p),
            None => (false, v.as_str()),
        };
        if point.split_once(':') != Some((when, name)) {
            return;
        }
        if panics {
            if !PANICKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                panic!("{ABORT_AT_ENV}={v}: a panic (fault-injection test)");
            }
            return;
        }
        eprintln!("vmsnap: {ABORT_AT_ENV}={v}: aborting (fault-injection test)");
        std::process::abort();
    }
}

/// Release builds: no fault injection.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fault_point(_when: &str, _name: &str) {}

impl Journal {
    pub fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join("journal")
    }

    /// Starts a new journal for `domain` (there must be none: recover first).
    pub fn create(state_dir: &Path, domain: &str, begin: Record) -> Result<Self, JournalError> {
        let dir = Self::dir(state_dir);
        let path = dir.join(format!("{domain}.json"));
        create_private_dir(&dir).map_err(|source| JournalError::Write { path: path.clone(), source })?;
        Self::sweep_temporaries(state_dir, domain)?;
        let mut j = Self { path, records: Vec::new() };
        j.append(begin)?;
        Ok(j)
    }

    /// Reads a journal left behind.
    pub fn load(path: &Path) -> Result<Self, JournalError> {
        let text = std::fs::read_to_string(path).map_err(|source| JournalError::Read { path: path.to_owned(), source })?;
        let records: Vec<Record> = match serde_json::from_str(&text) {
            Ok(r) => r,
            // A format-1 journal has records this one no longer knows, or lacks the format.
            Err(e) => {
                let old = serde_json::from_str::<Vec<serde_json::Value>>(&text)
                    .ok()
                    .and_then(|v| v.first().filter(|b| b["record"] == "begin").map(|b| b["format"].as_u64().unwrap_or(1) as u32));
                return Err(match old {
                    Some(found) if found != FORMAT => JournalError::OldFormat { path: path.to_owned(), found },
                    _ => JournalError::Damaged { path: path.to_owned(), why: e.to_string() },
                });
            }
        };
        match records.first() {
            Some(Record::Begin { format, .. }) if *format == FORMAT => match check(&records) {
                Ok(()) => Ok(Self { path: path.to_owned(), records }),
                Err(e) => Err(JournalError::Damaged { path: path.to_owned(), why: e.to_string() }),
            },
            Some(Record::Begin { format, .. }) => Err(JournalError::OldFormat { path: path.to_owned(), found: (*format).max(1) }),
            _ => Err(JournalError::Damaged { path: path.to_owned(), why: "it does not start with a begin record".into() }),
        }
    }

    /// Every domain with a journal under `state_dir`, or with only the temporary file of a journal
    /// write that was killed half-way (see [`Journal::sweep_temporaries`]).
    pub fn pending(state_dir: &Path) -> Result<Vec<String>, JournalError> {
        let dir = Self::dir(state_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(JournalError::Read { path: dir, source }),
        };
        let mut out: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| journal_domain(n).or_else(|| temporary_domain(n))).map(str::to_owned))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The path of `domain`'s journal.
    pub fn path_of(state_dir: &Path, domain: &str) -> PathBuf {
        Self::dir(state_dir).join(format!("{domain}.json"))
    }

    /// The snapshot `domain`'s journal is about: one being taken now, or one a crash left for
    /// `vmsnap recover`. Until its journal is gone such a snapshot may still change (a RAM
    /// snapshot is labelled `ram` only once its dump is complete), so it is not final yet.
    ///
    /// # Errors
    /// [`JournalError`] when the journal exists but cannot be read.
    pub fn snapshot_in_progress(state_dir: &Path, domain: &str) -> Result<Option<String>, JournalError> {
        let j = match Self::load(&Self::path_of(state_dir, domain)) {
            Ok(j) => j,
            Err(JournalError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(match j.records.first() {
            Some(Record::Begin { snapshot, .. }) => Some(snapshot.clone()),
            _ => None,
        })
    }

    /// Removes the temporary files of `domain`'s journal writes that were killed before their
    /// rename (the journal itself still holds the last complete state). Call it under the
    /// domain's lock: no writer of that domain runs then. Returns how many went.
    pub fn sweep_temporaries(state_dir: &Path, domain: &str) -> Result<usize, JournalError> {
        let dir = Self::dir(state_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(JournalError::Read { path: dir, source }),
        };
        let mut removed = 0;
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name().to_str().and_then(temporary_domain) == Some(domain) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| JournalError::Write { path, source })?;
                removed += 1;
            }
        }
        Ok(removed)
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
        fault_point("before", name);
        self.records.push(record);
        let text = serde_json::to_vec_pretty(&self.records).expect("records serialise");
        crate::fsutil::write_atomic(&self.path, &text, 0o600)
            .map_err(|e| JournalError::Write { path: self.path.clone(), source: std::io::Error::other(e) })?;
        fault_point("after", name);
        Ok(())
    }

    /// Removes the journal: the operation is over and nothing is left to undo.
    pub fn remove(self) -> Result<(), JournalError> {
        std::fs::remove_file(&self.path).map_err(|source| JournalError::Write { path: self.path.clone(), source })
    }
}

/// `NAME` of a journal file `NAME.json`.
fn journal_domain(file: &str) -> Option<&str> {
    file.strip_suffix(".json").filter(|d| !d.is_empty() && !d.starts_with('.'))
}

/// `NAME` of a temporary file `.NAME.json.XXXXXXXX.tmp` left by a killed journal write (the
/// shape [`crate::fsutil::Dir::write_atomic`] gives them).
fn temporary_domain(file: &str) -> Option<&str> {
    let (stem, random) = file.strip_prefix('.')?.strip_suffix(".tmp")?.rsplit_once('.')?;
    (random.len() == 8 && random.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    journal_domain(stem)
}

/// Creates `dir` as root-only (0700): its parent comes from root's config and is created if
/// missing; `dir` itself is never a symlink and must be vmsnap's own (see [`crate::fsutil`]).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    match (dir.parent(), dir.file_name().and_then(|n| n.to_str())) {
        (Some(parent), Some(name)) => crate::fsutil::Dir::private(parent, &[name]).map(drop).map_err(std::io::Error::other),
        _ => crate::fsutil::Dir::private(dir, &[]).map(drop).map_err(std::io::Error::other),
    }
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
            base: Some(PathBuf::from(format!("/tank/vm/disk{i}.qcow2"))),
            base_format: Some("qcow2".into()),
        }
    }

    fn begin(qga: Option<&str>) -> Record {
        Record::Begin {
            format: FORMAT,
            domain: "vm".into(),
            qmp: "/q".into(),
            qga: qga.map(PathBuf::from),
            snapshot: "s".into(),
            pid: 1,
            qemu: Some(ProcessId { pid: 7, start_ticks: 9 }),
        }
    }

    fn full_overlay_run() -> Vec<Record> {
        vec![
            begin(Some("/a")),
            Record::OverlaysCreated { overlays: vec![overlay(0), overlay(1)] },
            Record::FreezeStarted,
            Record::SwitchStarted,
            Record::Switched,
            Record::Thawed,
            Record::ZfsSnapshotStarted { names: vec!["tank/vm@s".into()] },
            Record::ZfsSnapshotDone { names: vec!["tank/vm@s".into()] },
            Record::Merged { overlay_node: "vmsnap-ov0".into() },
            Record::Merged { overlay_node: "vmsnap-ov1".into() },
            Record::Committed,
            Record::End,
        ]
    }

    fn full_ram_run() -> Vec<Record> {
        vec![
            begin(None),
            Record::OverlaysCreated { overlays: vec![overlay(0)] },
            Record::CapabilitiesSet {
                previous: vec![("events".into(), false), ("background-snapshot".into(), false)],
                max_bandwidth: Some(128 << 20),
            },
            Record::RamDumpStarted { path: "/ram/s.ram".into() },
            Record::PauseStarted,
            Record::SwitchStarted,
            Record::Switched,
            Record::MigrationStarted,
            Record::Resumed,
            Record::MigrationDone,
            Record::CapabilitiesReset,
            Record::RamDumpDone { path: "/ram/s.ram".into(), sha256: "ab".into() },
            Record::ZfsSnapshotStarted { names: vec!["tank/vm@s".into()] },
            Record::ZfsSnapshotDone { names: vec!["tank/vm@s".into()] },
            Record::Merged { overlay_node: "vmsnap-ov0".into() },
            Record::Committed,
            Record::End,
        ]
    }

    /// A domain's snapshot is in progress exactly while its journal is there.
    #[test]
    fn snapshot_in_progress_while_the_journal_is_there() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Journal::snapshot_in_progress(dir.path(), "vm").unwrap(), None);
        let mut j = Journal::create(dir.path(), "vm", begin(None)).unwrap();
        j.append(Record::ZfsSnapshotStarted { names: vec!["tank/vm@s".into()] }).unwrap();
        j.append(Record::ZfsSnapshotDone { names: vec!["tank/vm@s".into()] }).unwrap();
        assert_eq!(Journal::snapshot_in_progress(dir.path(), "vm").unwrap().as_deref(), Some("s"));
        assert_eq!(Journal::snapshot_in_progress(dir.path(), "other").unwrap(), None);
        j.remove().unwrap();
        assert_eq!(Journal::snapshot_in_progress(dir.path(), "vm").unwrap(), None);
        std::fs::write(Journal::path_of(dir.path(), "vm"), "not json").unwrap();
        assert!(Journal::snapshot_in_progress(dir.path(), "vm").is_err());
    }

    /// Every prefix of what the flow writes is legal, and so is a prefix followed by what
    /// recovery appends (thawed, capabilities reset, the overlays merged) and the end.
    #[test]
    fn what_vmsnap_writes_is_legal() {
        for run in [full_overlay_run(), full_ram_run()] {
            for cut in 1..=run.len() {
                check(&run[..cut]).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
                let mut recovered = run[..cut].to_vec();
                let o = obligations(&recovered);
                if o.thaw {
                    recovered.push(Record::Thawed);
                }
                if o.reset_capabilities.is_some() {
                    recovered.push(Record::CapabilitiesReset);
                }
                recovered.extend(o.merge.iter().map(|ov| Record::Merged { overlay_node: ov.overlay_node.clone() }));
                check(&recovered).unwrap_or_else(|e| panic!("cut {cut}, recovered: {e}"));
            }
        }
    }

    #[test]
    fn impossible_sequences_are_refused_by_name() {
        let run = full_overlay_run();
        let thawed_first = vec![run[0].clone(), Record::Thawed];
        assert_eq!(check(&thawed_first).unwrap_err().to_string(), "record 1 (thawed) comes without a freeze_started before it");
        let after_end = [run.clone(), vec![Record::FreezeStarted]].concat();
        assert!(check(&after_end).unwrap_err().why.contains("after the end"));
        let merged_unknown = vec![run[0].clone(), run[1].clone(), Record::SwitchStarted, Record::Merged { overlay_node: "x".into() }];
        assert!(check(&merged_unknown).unwrap_err().why.contains("no overlays_created"));
        assert!(check(&[Record::Thawed]).unwrap_err().why.contains("before the begin"));
        // And a journal file with such records is refused as damaged, with the hint.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(&p, serde_json::to_string(&thawed_first).unwrap()).unwrap();
        let e = Journal::load(&p).unwrap_err();
        assert!(matches!(e, JournalError::Damaged { .. }) && e.to_string().contains("thawed") && e.hint().is_some(), "{e}");
    }

    fn any_record() -> impl proptest::strategy::Strategy<Value = Record> {
        use proptest::prelude::*;
        let names = prop_oneof![Just("vmsnap-ov0".to_owned()), Just("vmsnap-ov1".to_owned()), Just("x".to_owned())];
        prop_oneof![
            Just(begin(Some("/a"))),
            Just(Record::OverlaysCreated { overlays: vec![overlay(0), overlay(1)] }),
            Just(Record::FreezeStarted),
            Just(Record::Thawed),
            Just(Record::PauseStarted),
            Just(Record::Resumed),
            Just(Record::CapabilitiesSet { previous: vec![("x".into(), false)], max_bandwidth: None }),
            Just(Record::CapabilitiesReset),
            Just(Record::RamDumpStarted { path: "/r/vm/s.ram".into() }),
            Just(Record::MigrationStarted),
            Just(Record::MigrationDone),
            Just(Record::SwitchStarted),
            Just(Record::Switched),
            Just(Record::ZfsSnapshotStarted { names: vec!["tank/vm@s".into()] }),
            Just(Record::ZfsSnapshotDone { names: vec!["tank/vm@s".into()] }),
            names.prop_map(|overlay_node| Record::Merged { overlay_node }),
            Just(Record::Committed),
            Just(Record::End),
        ]
    }

    proptest::proptest! {
        /// Any sequence is refused, or replays to obligations that follow from its records: a
        /// thaw only after a freeze began, a resume only after a pause, a merge only of an
        /// overlay the journal made once the switch began, nothing left after the end.
        #[test]
        fn any_sequence_is_refused_or_replayed_soundly(records in proptest::collection::vec(any_record(), 0..14)) {
            if check(&records).is_ok() {
                let o = obligations(&records);
                let seen = |name: &str| records.iter().any(|r| r.name() == name);
                proptest::prop_assert!(!o.thaw || seen("freeze_started"));
                proptest::prop_assert!(!o.resume || seen("pause_started"));
                proptest::prop_assert!(!o.cancel_migration || seen("ram_dump_started"));
                proptest::prop_assert!(o.merge.is_empty() || (seen("overlays_created") && seen("switch_started")));
                proptest::prop_assert!(!seen("end") || o.is_empty());
            }
        }
    }

    /// Truncating a journal at every prefix gives exactly the obligations of that moment.
    #[test]
    fn every_prefix_of_an_overlay_run() {
        let run = full_overlay_run();
        for cut in 0..=run.len() {
            let o = obligations(&run[..cut]);
            let seen = |name: &str| run[..cut].iter().any(|r| r.name() == name);
            let merged = run[..cut].iter().filter(|r| r.name() == "merged").count();
            assert_eq!(o.thaw, seen("freeze_started") && !seen("thawed"), "cut {cut}");
            assert!(!o.resume && !o.cancel_migration && o.reset_capabilities.is_none() && o.ram.is_none(), "cut {cut}");
            let live = seen("overlays_created") && !seen("committed") && !seen("end");
            // A merged overlay is stale: it is removed, never committed again.
            let to_merge = if live && seen("switch_started") { 2 - merged } else { 0 };
            assert_eq!(o.merge.len(), to_merge, "cut {cut}: {o:?}");
            assert_eq!(o.merge.len() + o.remove.len(), if live { 2 } else { 0 }, "cut {cut}");
            assert_eq!(!o.snapshots.is_empty(), seen("zfs_snapshot_started") && !seen("end"), "cut {cut}");
        }
        assert!(obligations(&run).is_empty());
    }

    #[test]
    fn every_prefix_of_a_ram_run() {
        let run = full_ram_run();
        for cut in 0..=run.len() {
            let o = obligations(&run[..cut]);
            let seen = |name: &str| run[..cut].iter().any(|r| r.name() == name);
            let open = !seen("end");
            assert_eq!(o.resume, seen("pause_started") && !seen("resumed"), "cut {cut}");
            assert_eq!(o.cancel_migration, seen("migration_started") && !seen("migration_done"), "cut {cut}");
            assert_eq!(o.reset_capabilities.is_some(), seen("capabilities_set") && !seen("capabilities_reset") && open, "cut {cut}");
            assert_eq!(o.reset_bandwidth.is_some(), o.reset_capabilities.is_some(), "cut {cut}");
            // The dump is an obligation until the end: recovery keeps it only if a snapshot
            // that exists references it, and only once it is complete.
            assert_eq!(o.ram.is_some(), seen("ram_dump_started") && open, "cut {cut}");
            if let Some(ram) = &o.ram {
                assert_eq!(ram.sha256.is_some(), seen("ram_dump_done"), "cut {cut}");
                assert_eq!(ram.snapshots.is_empty(), !seen("zfs_snapshot_started"), "cut {cut}");
            }
        }
    }

    #[test]
    fn an_old_journal_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        let old = r#"[{"record":"begin","domain":"vm","qmp":"/q","qga":null,"snapshot":"s","pid":1},{"record":"freeze_started"}]"#;
        std::fs::write(&p, old).unwrap();
        let e = Journal::load(&p).unwrap_err();
        assert!(matches!(e, JournalError::OldFormat { found: 1, .. }), "{e}");
        assert!(e.to_string().contains("older vmsnap") && e.hint().is_some(), "{e}");
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
        assert_eq!(pending, ["vm"]);
        let loaded = Journal::load(&Journal::path_of(dir.path(), "vm")).unwrap();
        assert_eq!(loaded.records(), &run[..4]);
        let mode = std::fs::metadata(Journal::dir(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        loaded.remove().unwrap();
        assert!(Journal::pending(dir.path()).unwrap().is_empty());
    }

    /// A journal write killed before its rename leaves `.vm.json.XXXXXXXX.tmp`: the domain is
    /// still pending (even with no journal), and the sweep removes only that domain's leftovers.
    #[test]
    fn temporaries_of_a_killed_write_are_found_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = Journal::dir(dir.path());
        std::fs::create_dir_all(&jdir).unwrap();
        for f in [".vm.json.0c4568ee.tmp", ".vm.json.deadbeef.tmp", ".other.json.00000000.tmp", ".vm.json.nothex!!.tmp", "notes.txt"] {
            std::fs::write(jdir.join(f), b"{").unwrap();
        }
        assert_eq!(Journal::pending(dir.path()).unwrap(), ["other", "vm"]);
        assert_eq!(Journal::sweep_temporaries(dir.path(), "vm").unwrap(), 2);
        assert_eq!(Journal::pending(dir.path()).unwrap(), ["other"]);
        assert!(jdir.join(".vm.json.nothex!!.tmp").exists() && jdir.join("notes.txt").exists());
        let j = Journal::create(dir.path(), "other", full_overlay_run()[0].clone()).unwrap();
        assert!(!jdir.join(".other.json.00000000.tmp").exists());
        assert_eq!(Journal::pending(dir.path()).unwrap(), ["other"]);
        j.remove().unwrap();
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
