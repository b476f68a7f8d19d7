//! Carrying out a journal's [`Obligations`]: cancel a RAM dump's migration, put the migration
//! capabilities back, resume a VM vmsnap paused, thaw a guest it froze, merge back or remove its
//! overlays, and keep a RAM dump only when a snapshot that exists references it.
//!
//! Every undo first asks what is real. Which QEMU runs decides what may be touched:
//! - **the same process** the journal began with: undo everything through QMP;
//! - **none** (QEMU died): nothing to thaw or resume; an overlay that was in the disk chain holds
//!   the guest's writes since the switch, so it is committed into its base offline (`qemu-img
//!   commit`, which takes the image locks) before its file goes;
//! - **another process** (the VM was restarted, or something else holds the base image): nothing
//!   is merged, resumed or cancelled, and an overlay that was in the chain is kept and reported;
//! - **the same process, not answering**: nothing is touched and the journal stays.
//!
//! Each action is idempotent (thawing a thawed guest, removing a gone overlay succeed), so a
//! recovery that is itself killed is finished by the next one. The engine runs this on its own
//! errors; `vmsnap recover` and the daemon's start-up run it on journals left by a crash.

use super::journal::{obligations, Journal, JournalError, Obligations, OverlayRecord, RamObligation, Record};
use super::lock::DomainLock;
use super::ram;
use crate::config::Config;
use crate::model::prop;
use crate::qemu::blockjob::BlockJob;
use crate::qemu::process::{holders_of, ProcessId};
use crate::qemu::qga::{FreezeStatus, Qga, Timeouts};
use crate::qemu::qmp::{Qmp, QmpError};
use crate::zfs::{PropName, Zfs, ZfsError};
use qapi::qmp;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a commit may take while recovering (a large overlay on slow disks).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(3600);

/// What recovery did for one journal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryReport {
    pub journal: PathBuf,
    pub domain: String,
    pub actions: Vec<String>,
}

/// The fdset `opaque` string vmsnap gives an overlay's descriptor, so recovery can find the set.
pub fn fdset_tag(overlay_node: &str) -> String {
    format!("vmsnap:{overlay_node}")
}

/// Where recovery may delete files: nothing outside these two directories, whatever a journal
/// names.
#[derive(Debug, Clone, Copy)]
pub struct Places<'a> {
    pub overlay_dir: &'a Path,
    pub ram_dir: &'a Path,
}

impl<'a> Places<'a> {
    pub fn of(cfg: &'a Config) -> Self {
        Self { overlay_dir: &cfg.overlay_dir, ram_dir: &cfg.ram_dir }
    }

    fn check(path: &Path, dir: &Path, key: &str) -> Result<(), String> {
        let plain =
            path.is_absolute() && path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
        if plain && path.starts_with(dir) && path != dir {
            Ok(())
        } else {
            Err(format!("the journal names {}, which is not inside {key} ({}): not touched", path.display(), dir.display()))
        }
    }

    fn overlay(&self, path: &Path) -> Result<(), String> {
        Self::check(path, self.overlay_dir, "overlay_dir")
    }

    /// `Ok` when `path` is a plain path inside `ram_dir` (the only place vmsnap deletes dumps).
    pub fn ram(&self, path: &Path) -> Result<(), String> {
        Self::check(path, self.ram_dir, "ram_dir")
    }
}

/// The QEMU recovery finds, compared with the one the journal began with.
pub enum Qemu<'a> {
    /// The same process, answering on this connection.
    Same(&'a Qmp),
    /// No QEMU runs for the domain.
    Gone,
    /// Another process runs the VM (or holds its disks); the sentence says which.
    Restarted(String),
}

/// Decides which [`Qemu`] recovery faces, given the connection the caller has (if any) and the
/// process the journal recorded.
pub fn classify<'a>(connection: Option<&'a Qmp>, recorded: Option<ProcessId>) -> Result<Qemu<'a>, String> {
    let recorded_alive = recorded.map(|r| r.is_alive());
    match (connection, recorded) {
        (Some(qmp), Some(r)) => {
            let now = qmp.peer_pid().and_then(ProcessId::of);
            match now {
                Some(n) if n == r => Ok(Qemu::Same(qmp)),
                Some(n) => {
                    Ok(Qemu::Restarted(format!("QEMU pid {} now serves {}, not pid {} of the journal", n.pid, qmp.path().display(), r.pid)))
                }
                // The connection's process is gone: the one we talked to died.
                None if recorded_alive == Some(false) => Ok(Qemu::Gone),
                None => Ok(Qemu::Same(qmp)),
            }
        }
        (Some(qmp), None) => Ok(Qemu::Same(qmp)),
        (None, Some(r)) if r.is_alive() => {
            Err(format!("QEMU pid {} is alive but its QMP socket does not answer: nothing touched, try again", r.pid))
        }
        (None, _) => Ok(Qemu::Gone),
    }
}

/// Carries out `o`, appending what it completes to `journal` (so a recovery killed half-way is
/// never replayed wrongly).
///
/// # Errors
/// A sentence per action that failed; the others are still attempted.
pub async fn apply(
    qemu: &Qemu<'_>,
    places: Places<'_>,
    qga_path: Option<&Path>,
    o: &Obligations,
    zfs: &Zfs,
    journal: &mut Journal,
    actions: &mut Vec<String>,
) -> Result<(), String> {
    let mut failures = Vec::new();
    // Files a journal names outside overlay_dir and ram_dir are never touched (the journal is
    // damaged, or the directories were moved since); the guest is still thawed and resumed.
    for path in o.merge.iter().chain(&o.remove).filter_map(|ov| places.overlay(&ov.path).err()) {
        failures.push(path);
    }
    let ram_outside = o.ram.as_ref().and_then(|r| places.ram(&r.path).err());
    if let Some(e) = &ram_outside {
        failures.push(e.clone());
    }
    if let Qemu::Same(qmp) = qemu {
        // QEMU must stop writing into the dump before anything decides about the dump.
        if o.cancel_migration {
            match ram::cancel(qmp).await {
                Ok(Some(state)) => actions.push(format!("cancelled the RAM dump's migration (now {state})")),
                Ok(None) => {}
                Err(e) => failures.push(format!("cancel migration: {e}")),
            }
        } else if o.ram.is_some() {
            // The dump's pipe was handed over but no migration took it: QEMU's copy goes, so
            // the writer sees the end of it.
            ram::close_fd(qmp).await;
        }
        if let Some(previous) = &o.reset_capabilities {
            let bandwidth = async {
                match o.reset_bandwidth {
                    Some(bytes) => ram::set_bandwidth(qmp, bytes).await,
                    None => Ok(()),
                }
            };
            match (ram::restore_capabilities(qmp, previous).await, bandwidth.await) {
                (Ok(()), Ok(())) => {
                    // Unrecorded, the next recovery resets them again: harmless (idempotent).
                    let _ = journal.append(Record::CapabilitiesReset);
                    actions.push(if o.reset_bandwidth.is_some() {
                        "reset the migration capabilities and bandwidth".into()
                    } else {
                        "reset the migration capabilities".into()
                    });
                }
                (Err(e), _) | (_, Err(e)) => failures.push(format!("reset migration capabilities: {e}")),
            }
        }
        if o.resume {
            match resume(qmp).await {
                Ok(true) => actions.push("resumed the VM".into()),
                Ok(false) => {}
                Err(e) => failures.push(format!("resume: {e}")),
            }
        }
        if o.thaw {
            match qga_path {
                Some(path) => match thaw(path).await {
                    Ok(n) => {
                        // Unrecorded, the next recovery thaws again: harmless (a thawed guest
                        // stays thawed).
                        let _ = journal.append(Record::Thawed);
                        actions.push(format!("thawed the guest ({n} filesystems)"));
                    }
                    Err(e) => failures.push(format!("thaw: {e}")),
                },
                None => failures.push("thaw: the journal says the guest may be frozen but names no agent socket".into()),
            }
        }
    }
    if let Qemu::Restarted(why) = qemu {
        if o.thaw || o.resume || o.cancel_migration {
            actions.push(format!("left the running VM alone ({why})"));
        }
    }
    for ov in o.merge.iter().filter(|ov| places.overlay(&ov.path).is_ok()) {
        let done = match qemu {
            Qemu::Same(qmp) => merge_overlay(qmp, ov, journal).await,
            Qemu::Gone => commit_offline(ov).await,
            Qemu::Restarted(why) => Ok(vec![keep_overlay(ov, why)]),
        };
        match done {
            Ok(did) => actions.extend(did),
            Err(e) => failures.push(format!("overlay {}: {e}", ov.overlay_node)),
        }
    }
    if let Qemu::Same(qmp) = qemu {
        if !o.merge.is_empty() {
            match resume_after_io_error(qmp).await {
                Ok(true) => actions.push("resumed the VM, paused by an I/O error on its overlay, once the overlay was merged".into()),
                Ok(false) => {}
                Err(e) => failures.push(format!("resume after I/O error: {e}")),
            }
        }
    }
    for ov in o.remove.iter().filter(|ov| places.overlay(&ov.path).is_ok()) {
        let qmp = if let Qemu::Same(qmp) = qemu { Some(*qmp) } else { None };
        match remove_overlay(qmp, ov).await {
            Ok(did) => actions.extend(did),
            Err(e) => failures.push(format!("overlay {}: {e}", ov.overlay_node)),
        }
    }
    if failures.is_empty() {
        // Only once QEMU can no longer write into it (cancelled above, or QEMU gone).
        if let Some(ram) = &o.ram {
            if let Err(e) = settle_ram(zfs, ram, actions).await {
                failures.push(e);
            }
        }
        if let Err(e) = report_snapshots(zfs, o, actions).await {
            failures.push(e);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// `cont` if the VM is not running. True when it was resumed.
async fn resume(qmp: &Qmp) -> Result<bool, QmpError> {
    let status = qmp.execute(&qmp::query_status {}).await?;
    if status.running {
        return Ok(false);
    }
    qmp.execute(&qmp::cont {}).await?;
    Ok(true)
}

/// `cont` if the VM stopped on an I/O error (a full overlay directory): the failed requests are
/// retried on the base once the overlay is merged.
pub async fn resume_after_io_error(qmp: &Qmp) -> Result<bool, QmpError> {
    let status = qmp.execute(&qmp::query_status {}).await?;
    if status.running || status.status != qmp::RunState::io_error {
        return Ok(false);
    }
    qmp.execute(&qmp::cont {}).await?;
    Ok(true)
}

/// Thaws on fresh connections, retrying for a while, and checks the agent says `thawed`: a guest
/// must never stay frozen. The agent runs one command at a time, so a freeze still running in the
/// guest delays the sync until it is done; the thaw then undoes it.
pub async fn thaw(path: &Path) -> Result<i64, String> {
    let mut last = String::new();
    for _ in 0..6 {
        // A guest that was just frozen can be slow to answer: sync patiently.
        let timeouts = Timeouts { sync: Duration::from_secs(10), ..Timeouts::default() };
        match Qga::connect(path, timeouts).await {
            Ok(mut qga) => match qga.thaw().await {
                Ok(n) => match qga.freeze_status().await {
                    Ok(FreezeStatus::Thawed) => return Ok(n),
                    Ok(FreezeStatus::Frozen) => last = "the agent still says frozen after a thaw".into(),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

/// Commits `ov` back into its disk if it is in the disk's chain (or finishes a commit already
/// running), records [`Record::Merged`], then removes it.
pub async fn merge_overlay(qmp: &Qmp, ov: &OverlayRecord, journal: &mut Journal) -> Result<Vec<String>, String> {
    let mut did = Vec::new();
    let jobs = qmp.query_jobs().await.map_err(|e| e.to_string())?;
    let committed = if jobs.iter().any(|j| j.id == ov.job_id) {
        // A commit outlived the process that started it: drive it to its end.
        BlockJob::attach(qmp, &ov.job_id).finish(COMMIT_TIMEOUT).await.map_err(|e| e.to_string())?;
        did.push(format!("finished commit job {}", ov.job_id));
        true
    } else if active_nodes(qmp).await.map_err(|e| e.to_string())?.contains(&ov.overlay_node) {
        let job = BlockJob::start_active_commit(qmp, &ov.job_id, &ov.overlay_node, Some(&ov.disk_node)).await.map_err(|e| e.to_string())?;
        job.finish(COMMIT_TIMEOUT).await.map_err(|e| e.to_string())?;
        did.push(format!("committed {} into {}", ov.overlay_node, ov.disk_node));
        true
    } else {
        false
    };
    if committed {
        journal.append(Record::Merged { overlay_node: ov.overlay_node.clone() }).map_err(|e| e.to_string())?;
    }
    did.extend(remove_overlay(Some(qmp), ov).await?);
    Ok(did)
}

/// QEMU died while `ov` was (or may have been) in the chain: the overlay holds the guest's writes
/// since the switch. Unless another process holds the base, commit it into the base with
/// `qemu-img commit` (a half-done live commit is simply done again: the overlay holds every block
/// it copied), then delete it.
async fn commit_offline(ov: &OverlayRecord) -> Result<Vec<String>, String> {
    if !ov.path.exists() {
        return Ok(Vec::new());
    }
    let mut held: Vec<u32> = holders_of(&ov.path);
    if let Some(base) = &ov.base {
        held.extend(holders_of(base));
    }
    if !held.is_empty() {
        let why = format!("process {held:?} holds the disk image (the VM was restarted?)");
        return Ok(vec![keep_overlay(ov, &why)]);
    }
    // QEMU had the overlay open read-write and may have rewritten its header: `qemu-img commit`
    // (root) follows the header, so it runs only when the header names the journaled base in
    // its journaled format (nothing writes the file any more: no process holds it).
    let (Some(base), Some(format)) = (&ov.base, &ov.base_format) else {
        return Ok(vec![keep_overlay(ov, "its journal does not say which image in which format it sits on")]);
    };
    let (named, named_format) = crate::qemu::img::header_backing(&ov.path).await.map_err(|e| e.to_string())?;
    if named.as_deref() != Some(base.as_os_str().to_string_lossy().as_ref()) || named_format.as_deref() != Some(format.as_str()) {
        let why = format!(
            "its header names {} ({}) as its base, not {} ({format}), the image it was made on",
            crate::replicate::protocol::shown(named.as_deref().unwrap_or("nothing"), 200),
            crate::replicate::protocol::shown(named_format.as_deref().unwrap_or("no format"), 40),
            base.display()
        );
        return Ok(vec![keep_overlay(ov, &why)]);
    }
    crate::qemu::img::commit(&ov.path).await.map_err(|e| format!("{e}; the overlay stays"))?;
    let mut did = vec![format!("QEMU is gone: committed {} into its base with qemu-img", ov.path.display())];
    did.extend(remove_overlay(None, ov).await?);
    Ok(did)
}

/// The message for an overlay that recovery must not touch.
fn keep_overlay(ov: &OverlayRecord, why: &str) -> String {
    let msg = format!(
        "kept overlay {}: it holds the guest's writes made after the switch, but {why}; inspect it with `qemu-img info`, \
         and commit it (`qemu-img commit`) only if the VM ran on it last, or delete it",
        ov.path.display()
    );
    tracing::warn!("{msg}");
    msg
}

/// Removes an overlay that is not (or no longer) in a disk's chain: its nodes, its fdset, its file.
pub async fn remove_overlay(qmp: Option<&Qmp>, ov: &OverlayRecord) -> Result<Vec<String>, String> {
    let mut did = Vec::new();
    if let Some(qmp) = qmp {
        if active_nodes(qmp).await.map_err(|e| e.to_string())?.contains(&ov.overlay_node) {
            return Err(format!("{} is still the active layer of a disk; it must be committed, not removed", ov.overlay_node));
        }
        let nodes = qmp.node_names().await.map_err(|e| e.to_string())?;
        for node in [&ov.overlay_node, &ov.file_node] {
            if nodes.contains(node) {
                qmp.blockdev_del(node).await.map_err(|e| e.to_string())?;
                did.push(format!("deleted node {node}"));
            }
        }
        let tag = fdset_tag(&ov.overlay_node);
        let sets = qmp.execute(&qmp::query_fdsets {}).await.map_err(|e| e.to_string())?;
        for set in sets {
            if set.fds.iter().any(|fd| fd.opaque.as_deref() == Some(tag.as_str())) {
                qmp.remove_fd(set.fdset_id).await.map_err(|e| e.to_string())?;
            }
        }
    }
    match std::fs::remove_file(&ov.path) {
        Ok(()) => did.push(format!("deleted overlay file {}", ov.path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("deleting {}: {e}", ov.path.display())),
    }
    Ok(did)
}

/// The node at the top of each disk.
async fn active_nodes(qmp: &Qmp) -> Result<Vec<String>, QmpError> {
    let blocks = qmp.execute(&qmp::query_block {}).await?;
    Ok(blocks.into_iter().filter_map(|b| b.inserted.and_then(|i| i.node_name)).collect())
}

/// The user properties of a snapshot, or `None` when it does not exist.
async fn snapshot_props(zfs: &Zfs, name: &str) -> Result<Option<std::collections::BTreeMap<PropName, String>>, String> {
    match zfs.user_properties(name).await {
        Ok(p) => Ok(Some(p)),
        Err(ZfsError::NotFound { .. }) => Ok(None),
        Err(e) => Err(format!("asking ZFS whether {name} exists: {e}")),
    }
}

/// Keeps the dump when it is complete and a snapshot that exists names it; otherwise deletes it
/// (and takes the RAM properties off a snapshot that would point at it).
async fn settle_ram(zfs: &Zfs, ram: &RamObligation, actions: &mut Vec<String>) -> Result<(), String> {
    let dump_prop = prop::RAM_DUMP;
    let path = ram.path.display().to_string();
    let mut referencing = Vec::new();
    for name in &ram.snapshots {
        if let Some(props) = snapshot_props(zfs, name).await? {
            if props.get(&dump_prop) == Some(&path) {
                referencing.push(name.clone());
            }
        }
    }
    if ram.sha256.is_some() && !referencing.is_empty() {
        actions.push(format!("kept RAM dump {path}: snapshot {} references it", referencing.join(", ")));
        return Ok(());
    }
    for name in &referencing {
        for key in [prop::RAM_DUMP, prop::RAM_SHA256] {
            zfs.inherit(name, &key).await.map_err(|e| format!("unlabelling {name}: {e}"))?;
        }
        let consistency = prop::CONSISTENCY;
        zfs.set_property(name, &consistency, "crash").await.map_err(|e| format!("unlabelling {name}: {e}"))?;
        actions.push(format!("{name}: its RAM dump was incomplete, so it is labelled crash-consistent"));
    }
    match std::fs::remove_file(&ram.path) {
        Ok(()) => actions.push(format!("deleted RAM dump {path} (no complete snapshot references it)")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("deleting {path}: {e}")),
    }
    Ok(())
}

/// Says which snapshots of an interrupted operation exist (they are kept: each was taken whole,
/// inside the frozen or paused window, or from the overlays' fixed base).
async fn report_snapshots(zfs: &Zfs, o: &Obligations, actions: &mut Vec<String>) -> Result<(), String> {
    let mut existing = Vec::new();
    for name in &o.snapshots {
        if snapshot_props(zfs, name).await?.is_some() {
            existing.push(name.clone());
        }
    }
    if !existing.is_empty() {
        actions.push(format!("kept snapshot {} taken before the interruption", existing.join(", ")));
    }
    Ok(())
}

/// Carries out what `journal` still owes, facing the QEMU reachable on `connection` (None: its
/// socket does not answer). Shared by the engine's own undo and by recovery after a crash; the
/// caller removes the journal once this succeeded.
pub async fn settle(
    journal: &mut Journal,
    connection: Option<&Qmp>,
    places: Places<'_>,
    zfs: &Zfs,
    actions: &mut Vec<String>,
) -> Result<(), String> {
    let (qmp_path, qga_path, recorded) = match journal.records().first() {
        Some(Record::Begin { qmp, qga, qemu, .. }) => (qmp.clone(), qga.clone(), *qemu),
        _ => return Err(format!("journal {} does not start with a begin record", journal.path().display())),
    };
    let o = obligations(journal.records());
    if o.is_empty() {
        return Ok(());
    }
    let qemu = classify(connection, recorded)?;
    if matches!(qemu, Qemu::Gone) {
        actions.push(format!("QEMU is gone ({} does not answer)", qmp_path.display()));
    }
    apply(&qemu, places, qga_path.as_deref(), &o, zfs, journal, actions).await
}

/// Why a journal could not be settled; the journal stays for the next try.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Another operation holds the domain (its lock).
    #[error(transparent)]
    Busy(Box<super::EngineError>),
    #[error("{domain}: cannot reach QEMU on {qmp}", qmp = qmp.display())]
    Qemu {
        domain: String,
        qmp: PathBuf,
        #[source]
        source: QmpError,
    },
    /// A step of the undo failed; `why` names it.
    #[error("{domain}: {why}")]
    Incomplete { domain: String, why: String },
    /// Several journals, each with its own error.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<RecoverError>),
}

impl RecoverError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Journal(e) => e.hint(),
            Self::Busy(e) => e.hint(),
            Self::Qemu { .. } => {
                Some("QEMU's socket answers but not as QMP: check the `qmp` path in the config, then run `vmsnap recover` again")
            }
            Self::Incomplete { .. } => Some("the journal stays: fix what the message names, then run `vmsnap recover` again"),
            Self::Several(all) => all.iter().find_map(RecoverError::hint),
        }
    }
}

/// Recovers one journal file: connects to the QEMU it names and [`settle`]s it.
pub async fn recover_journal(path: &Path, places: Places<'_>, zfs: &Zfs) -> Result<RecoveryReport, RecoverError> {
    let mut journal = Journal::load(path)?;
    let Some(Record::Begin { domain, qmp: qmp_path, qemu: recorded, .. }) = journal.records().first().cloned() else {
        return Err(JournalError::Damaged { path: path.to_owned(), why: "it does not start with a begin record".into() }.into());
    };
    let mut actions = Vec::new();
    let connection = if obligations(journal.records()).is_empty() {
        None
    } else {
        match Qmp::connect(&qmp_path, Duration::from_secs(10)).await {
            Ok(q) => Some(q),
            Err(QmpError::Connect { .. }) => None,
            Err(e) if recorded.is_some_and(|r| !r.is_alive()) => {
                tracing::debug!("QMP {}: {e}; the journal's QEMU is gone", qmp_path.display());
                None
            }
            Err(source) => return Err(RecoverError::Qemu { domain, qmp: qmp_path, source }),
        }
    };
    let incomplete = |why: String| RecoverError::Incomplete { domain: domain.clone(), why };
    settle(&mut journal, connection.as_ref(), places, zfs, &mut actions).await.map_err(incomplete)?;
    journal.remove()?;
    Ok(RecoveryReport { journal: path.to_owned(), domain, actions })
}

/// Recovers `domain`'s journal, if it has one, under its lock (a locked domain has an operation
/// still running: [`RecoverError::Busy`]).
pub async fn recover_domain(cfg: &Config, domain: &str, zfs: &Zfs) -> Result<Option<RecoveryReport>, RecoverError> {
    let _lock = DomainLock::acquire(&cfg.state_dir, domain).map_err(|e| RecoverError::Busy(Box::new(e)))?;
    // A journal write killed half-way left its temporary file; the journal keeps the last whole state.
    Journal::sweep_temporaries(&cfg.state_dir, domain)?;
    let path = Journal::path_of(&cfg.state_dir, domain);
    if !path.exists() {
        return Ok(None);
    }
    recover_journal(&path, Places::of(cfg), zfs).await.map(Some)
}

/// A guest that is frozen while no vmsnap operation holds its domain — one resumed from a RAM
/// snapshot taken with `ram_quiesce` wakes frozen — is thawed. `Ok(None)`: the VM does not run,
/// the guest is not frozen, or its agent does not answer (nothing to say it is frozen).
pub async fn thaw_woken_frozen(cfg: &Config, domain: &str, qmp: &Path, qga: &Path) -> Result<Option<String>, RecoverError> {
    let _lock = DomainLock::acquire(&cfg.state_dir, domain).map_err(|e| RecoverError::Busy(Box::new(e)))?;
    // Only a running VM's agent can answer (a paused guest would keep us waiting for nothing),
    // and QEMU says at once whether it runs.
    let running = match Qmp::connect(qmp, Duration::from_secs(5)).await {
        Ok(q) => q.execute(&qapi::qmp::query_status {}).await.map(|s| s.running).unwrap_or(false),
        Err(_) => false,
    };
    if !running {
        return Ok(None);
    }
    // Patient enough for a guest that has just been resumed; a VM that is not running fails at connect.
    let quick = Timeouts { sync: Duration::from_secs(10), other: Duration::from_secs(20), ..Timeouts::default() };
    let status = match Qga::connect(qga, quick).await {
        Ok(mut q) => q.freeze_status().await.map_err(|e| tracing::debug!(domain, "freeze status: {e}")).ok(),
        Err(e) => {
            tracing::debug!(domain, "no guest agent to ask: {e}");
            None
        }
    };
    if status != Some(FreezeStatus::Frozen) {
        return Ok(None);
    }
    let n = thaw(qga)
        .await
        .map_err(|why| RecoverError::Incomplete { domain: domain.to_owned(), why: format!("thawing a frozen guest: {why}") })?;
    Ok(Some(format!(
        "thawed the guest ({n} filesystems): it was frozen with no vmsnap operation running (resumed from a quiesced RAM snapshot?)"
    )))
}

/// Recovers every journal under the config's state directory; one that fails does not stop
/// the others.
pub async fn recover_all(cfg: &Config, zfs: &Zfs) -> Result<Vec<RecoveryReport>, RecoverError> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for domain in Journal::pending(&cfg.state_dir)? {
        match recover_domain(cfg, &domain, zfs).await {
            Ok(r) => out.extend(r),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(out),
        1 => Err(errors.remove(0)),
        _ => Err(RecoverError::Several(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_deletes_only_inside_its_directories() {
        let places = Places { overlay_dir: Path::new("/var/lib/vmsnap/overlays"), ram_dir: Path::new("/srv/ram") };
        assert!(places.overlay(Path::new("/var/lib/vmsnap/overlays/vm/a-0.qcow2")).is_ok());
        assert!(places.ram(Path::new("/srv/ram/vm/a.ram")).is_ok());
        for bad in [
            "/etc/shadow",
            "/var/lib/vmsnap/overlays/../../../etc/shadow",
            "vm/a.qcow2",
            "/var/lib/vmsnap/overlays",
            "/var/lib/vmsnap/overlaysX/a",
        ] {
            let e = places.overlay(Path::new(bad)).unwrap_err();
            assert!(e.contains("overlay_dir") && e.contains("not touched"), "{bad}: {e}");
        }
        assert!(places.ram(Path::new("/var/lib/vmsnap/overlays/vm/a-0.qcow2")).is_err());
    }

    /// A journal naming a file outside overlay_dir: that file is left alone and the recovery
    /// fails (the journal stays), the rest of the obligations are still carried out.
    #[tokio::test]
    async fn a_file_outside_the_directories_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("precious.qcow2");
        std::fs::write(&victim, b"x").unwrap();
        let inside = dir.path().join("overlays/vm/s-1.qcow2");
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(&inside, b"y").unwrap();
        let ov = |path: &Path, i: usize| OverlayRecord {
            disk_node: format!("disk{i}"),
            overlay_node: format!("vmsnap-ov{i}"),
            file_node: format!("vmsnap-ov{i}-f"),
            path: path.to_owned(),
            fdset_id: None,
            job_id: format!("vmsnap-commit{i}"),
            base: None,
            base_format: None,
        };
        let o = Obligations { remove: vec![ov(&victim, 0), ov(&inside, 1)], ..Obligations::default() };
        let begin = Record::Begin {
            format: super::super::journal::FORMAT,
            domain: "vm".into(),
            qmp: "/q".into(),
            qga: None,
            snapshot: "s".into(),
            pid: 1,
            qemu: None,
        };
        let mut journal = Journal::create(&dir.path().join("state"), "vm", begin).unwrap();
        let overlays = dir.path().join("overlays");
        let places = Places { overlay_dir: &overlays, ram_dir: &dir.path().join("ram") };
        let mut actions = Vec::new();
        let e = apply(&Qemu::Gone, places, None, &o, &Zfs::default(), &mut journal, &mut actions).await.unwrap_err();
        assert!(e.contains("precious.qcow2") && e.contains("not touched"), "{e}");
        assert!(victim.exists(), "a file outside overlay_dir was deleted");
        assert!(!inside.exists(), "the overlay inside overlay_dir is still removed: {actions:?}");
    }
}
