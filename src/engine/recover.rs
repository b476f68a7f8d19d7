//! Carrying out a journal's [`Obligations`]: resume a VM vmsnap paused, thaw a guest it froze,
//! merge back or remove its overlays, delete a RAM dump that has no snapshot. Every action checks
//! what QEMU reports first and is idempotent: thawing a thawed guest, or removing an overlay that
//! is already gone, succeeds. The engine runs this on its own errors; `vmsnap recover` and the
//! daemon's start-up run it on journals left by a crash.

use super::journal::{obligations, Journal, Obligations, OverlayRecord, Record};
use super::lock::DomainLock;
use crate::config::Config;
use crate::qemu::blockjob::BlockJob;
use crate::qemu::qga::{Qga, Timeouts};
use crate::qemu::qmp::{Qmp, QmpError};
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

/// Carries out `o` for a VM reachable at `qmp` (None: QEMU is gone) with its agent at `qga_path`.
///
/// # Errors
/// A sentence per action that failed; the others are still attempted.
pub async fn apply(qmp: Option<&Qmp>, qga_path: Option<&Path>, o: &Obligations, actions: &mut Vec<String>) -> Result<(), String> {
    let mut failures = Vec::new();
    if o.resume {
        if let Some(qmp) = qmp {
            match resume(qmp).await {
                Ok(true) => actions.push("resumed the VM".into()),
                Ok(false) => {}
                Err(e) => failures.push(format!("resume: {e}")),
            }
        }
    }
    if o.thaw && qmp.is_some() {
        match qga_path {
            Some(path) => match thaw(path).await {
                Ok(n) => actions.push(format!("thawed the guest ({n} filesystems)")),
                Err(e) => failures.push(format!("thaw: {e}")),
            },
            None => failures.push("thaw: the journal says the guest may be frozen but names no agent socket".into()),
        }
    }
    for ov in &o.merge {
        match merge_overlay(qmp, ov).await {
            Ok(did) => actions.extend(did),
            Err(e) => failures.push(format!("overlay {}: {e}", ov.overlay_node)),
        }
    }
    for ov in &o.remove {
        match remove_overlay(qmp, ov).await {
            Ok(did) => actions.extend(did),
            Err(e) => failures.push(format!("overlay {}: {e}", ov.overlay_node)),
        }
    }
    if let Some(ram) = &o.delete_ram {
        match std::fs::remove_file(ram) {
            Ok(()) => actions.push(format!("deleted partial RAM dump {}", ram.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("deleting {}: {e}", ram.display())),
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

/// Thaws, retrying for a while: a guest must never stay frozen.
async fn thaw(path: &Path) -> Result<i64, String> {
    let mut last = String::new();
    for _ in 0..5 {
        // A guest that was just frozen can be slow to answer: sync patiently.
        match Qga::connect(path, Timeouts { sync: Duration::from_secs(10), ..Timeouts::default() }).await {
            Ok(mut qga) => match qga.thaw().await {
                Ok(n) => return Ok(n),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

/// Commits `ov` back into its disk if it is in the disk's chain, then removes it.
pub async fn merge_overlay(qmp: Option<&Qmp>, ov: &OverlayRecord) -> Result<Vec<String>, String> {
    let mut did = Vec::new();
    if let Some(qmp) = qmp {
        let jobs = qmp.query_jobs().await.map_err(|e| e.to_string())?;
        if jobs.iter().any(|j| j.id == ov.job_id) {
            // A commit outlived the process that started it: drive it to its end.
            BlockJob::attach(qmp, &ov.job_id).finish(COMMIT_TIMEOUT).await.map_err(|e| e.to_string())?;
            did.push(format!("finished commit job {}", ov.job_id));
        } else if active_nodes(qmp).await.map_err(|e| e.to_string())?.contains(&ov.overlay_node) {
            let job =
                BlockJob::start_active_commit(qmp, &ov.job_id, &ov.overlay_node, Some(&ov.disk_node)).await.map_err(|e| e.to_string())?;
            job.finish(COMMIT_TIMEOUT).await.map_err(|e| e.to_string())?;
            did.push(format!("committed {} into {}", ov.overlay_node, ov.disk_node));
        }
    }
    did.extend(remove_overlay(qmp, ov).await?);
    Ok(did)
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

/// Recovers one journal file: connects to the VM it names and carries out its obligations. The
/// journal is removed once everything succeeded.
pub async fn recover_journal(path: &Path) -> Result<RecoveryReport, String> {
    let journal = Journal::load(path).map_err(|e| e.to_string())?;
    let (domain, qmp_path, qga_path) = match journal.records().first() {
        Some(Record::Begin { domain, qmp, qga, .. }) => (domain.clone(), qmp.clone(), qga.clone()),
        _ => return Err(format!("journal {} does not start with a begin record", path.display())),
    };
    let o = obligations(journal.records());
    let mut actions = Vec::new();
    if !o.is_empty() {
        let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(10)).await {
            Ok(q) => Some(q),
            Err(QmpError::Connect { .. }) => {
                actions.push(format!("QEMU is gone ({} does not answer): only files are cleaned up", qmp_path.display()));
                None
            }
            Err(e) => return Err(format!("{domain}: {e}")),
        };
        apply(qmp.as_ref(), qga_path.as_deref(), &o, &mut actions).await.map_err(|e| format!("{domain}: {e}"))?;
    }
    journal.remove().map_err(|e| e.to_string())?;
    Ok(RecoveryReport { journal: path.to_owned(), domain, actions })
}

/// Recovers every journal under the config's state directory.
pub async fn recover_all(cfg: &Config) -> Result<Vec<RecoveryReport>, String> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for path in Journal::pending(&cfg.state_dir).map_err(|e| e.to_string())? {
        let domain = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        // A journal whose domain is locked belongs to an operation that is still running.
        let _lock = match DomainLock::acquire(&cfg.state_dir, &domain) {
            Ok(lock) => lock,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        match recover_journal(&path).await {
            Ok(r) => out.push(r),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}
