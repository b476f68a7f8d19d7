//! Saving the VM's RAM into a file vmsnap opened (QEMU gets the descriptor with `getfd` and
//! migrates to `fd:`; no shell, no path QEMU must be allowed to open).
//!
//! Two modes: precopy (a live migration that pauses the VM at its end) and background-snapshot
//! (the VM pauses only for the disk switch; QEMU then writes the RAM as it was at that pause while
//! the guest runs, tracking writes with userfaultfd write-protection).

use super::journal::create_private_dir;
use super::{RamMode, StepError};
use crate::qemu::qmp::{EventStream, Qmp};
use qapi::qmp::{self, MigrationCapability, MigrationCapabilityStatus};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The name the dump's descriptor gets in QEMU.
const FD_NAME: &str = "vmsnap-ram";

/// Refuses when QEMU says migration is blocked or a migration already runs.
///
/// # Errors
/// [`StepError::Refused`] naming QEMU's blockers.
pub async fn check(qmp: &Qmp) -> Result<(), StepError> {
    let status = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await?;
    if let Some(reasons) = status.get("blocked-reasons").and_then(Value::as_array).filter(|r| !r.is_empty()) {
        let reasons: Vec<&str> = reasons.iter().filter_map(Value::as_str).collect();
        return Err(StepError::Refused(format!("QEMU cannot save this VM's RAM: {}", reasons.join("; "))));
    }
    if let Some(s) = status.get("status").and_then(Value::as_str).filter(|s| is_running(s)) {
        return Err(StepError::Refused(format!("a migration is already running ({s})")));
    }
    Ok(())
}

/// Sets the capabilities `mode` needs (journal [`current_capabilities`] first). When QEMU refuses
/// background-snapshot (it needs userfaultfd, which an unprivileged QEMU lacks), the RAM is saved
/// with precopy instead: the mode used, and a warning saying why.
pub async fn set_mode(qmp: &Qmp, mode: RamMode) -> Result<(RamMode, Option<String>), StepError> {
    match set_capabilities(qmp, mode == RamMode::Background).await {
        Ok(()) => Ok((mode, None)),
        Err(StepError::Qmp(q)) if mode == RamMode::Background => {
            set_capabilities(qmp, false).await?;
            Ok((
                RamMode::Precopy,
                Some(format!(
                    "QEMU refused background-snapshot ({q}): it needs userfaultfd, which an unprivileged QEMU \
                     only gets with `sysctl vm.unprivileged_userfaultfd=1`; RAM saved with precopy (the VM pauses at the end)"
                )),
            ))
        }
        Err(e) => Err(e),
    }
}

/// The capabilities vmsnap changes, and how QEMU names them.
const OUR_CAPABILITIES: [(&str, MigrationCapability); 2] =
    [("events", MigrationCapability::events), ("background-snapshot", MigrationCapability::background_snapshot)];

/// The current state of the capabilities vmsnap changes, to journal before changing them.
pub async fn current_capabilities(qmp: &Qmp) -> Result<Vec<(String, bool)>, StepError> {
    let v = qmp.execute_raw("query-migrate-capabilities", None, Duration::from_secs(10)).await?;
    let list = v.as_array().cloned().unwrap_or_default();
    Ok(OUR_CAPABILITIES
        .iter()
        .map(|(name, _)| {
            let on = list.iter().any(|c| c["capability"] == *name && c["state"] == true);
            ((*name).to_owned(), on)
        })
        .collect())
}

/// `events` on (so completion is an event), `background-snapshot` as asked.
pub async fn set_capabilities(qmp: &Qmp, background: bool) -> Result<(), StepError> {
    let caps = vec![
        MigrationCapabilityStatus { capability: MigrationCapability::events, state: true },
        MigrationCapabilityStatus { capability: MigrationCapability::background_snapshot, state: background },
    ];
    qmp.execute(&qmp::migrate_set_capabilities { capabilities: caps }).await?;
    Ok(())
}

/// Puts the capabilities back as journaled (names vmsnap does not know are skipped).
pub async fn restore_capabilities(qmp: &Qmp, previous: &[(String, bool)]) -> Result<(), StepError> {
    let caps: Vec<MigrationCapabilityStatus> = previous
        .iter()
        .filter_map(|(name, on)| {
            OUR_CAPABILITIES.iter().find(|(n, _)| n == name).map(|(_, cap)| MigrationCapabilityStatus { capability: *cap, state: *on })
        })
        .collect();
    if !caps.is_empty() {
        qmp.execute(&qmp::migrate_set_capabilities { capabilities: caps }).await?;
    }
    Ok(())
}

/// Cancels a running migration and waits until QEMU says it stopped; `None` when none ran.
/// Also drops the dump's descriptor if QEMU still holds it unused.
pub async fn cancel(qmp: &Qmp) -> Result<Option<String>, StepError> {
    let status = migration_status(qmp).await?;
    let result = if is_running(&status) {
        qmp.execute(&qmp::migrate_cancel {}).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let now = migration_status(qmp).await?;
            if !is_running(&now) {
                break Some(now);
            }
            if Instant::now() > deadline {
                return Err(StepError::Refused(format!("the migration did not stop within 120 s of migrate_cancel (status {now})")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        None
    };
    // Harmless when `migrate` consumed it or it was never passed.
    let _ = qmp.execute_raw("closefd", Some(serde_json::json!({ "fdname": FD_NAME })), Duration::from_secs(10)).await;
    Ok(result)
}

async fn migration_status(qmp: &Qmp) -> Result<String, StepError> {
    let m = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await?;
    Ok(m.get("status").and_then(Value::as_str).unwrap_or("none").to_owned())
}

/// A status in which QEMU may still write into the dump.
pub fn is_running(status: &str) -> bool {
    matches!(status, "setup" | "active" | "device" | "pre-switchover" | "postcopy-active" | "wait-unplug" | "cancelling")
}

/// Creates the dump file: its directory root-only, the file 0600 and new.
/// Journal the path ([`dump_path`]) before calling this.
pub fn create_dump(path: &Path) -> Result<std::fs::File, StepError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    create_private_dir(dir).map_err(|source| StepError::Io { what: format!("creating {}", dir.display()), source })?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| StepError::Io { what: format!("creating {}", path.display()), source })?;
    Ok(file)
}

/// Where the dump of snapshot `name` goes: `<ram_dir>/<domain>/<name>.ram`.
pub fn dump_path(ram_dir: &Path, domain: &str, name: &str) -> PathBuf {
    ram_dir.join(domain).join(format!("{name}.ram"))
}

/// Hands QEMU the dump's descriptor and starts the migration into it.
pub async fn start(qmp: &Qmp, file: &std::fs::File) -> Result<(), StepError> {
    qmp.getfd(FD_NAME, file.as_fd()).await?;
    qmp.execute(&qmp::migrate { uri: Some(format!("fd:{FD_NAME}")), channels: None, detach: None, resume: None }).await?;
    Ok(())
}

/// Waits for the migration to finish.
///
/// # Errors
/// [`StepError::Refused`] when it failed or was cancelled (with QEMU's reason).
pub async fn wait_completed(qmp: &Qmp, events: &mut EventStream, timeout: Duration) -> Result<(), StepError> {
    let deadline = Instant::now() + timeout;
    let ev = events
        .wait_for("the RAM dump to finish", deadline, |e| {
            e.name == "MIGRATION" && matches!(e.str("status"), Some("completed" | "failed" | "cancelled"))
        })
        .await?;
    if ev.str("status") == Some("completed") {
        return Ok(());
    }
    let info = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await.unwrap_or(Value::Null);
    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
    Err(StepError::Refused(format!("the RAM dump {}: {why}", ev.str("status").unwrap_or("failed"))))
}

/// Precopy: after `MIGRATION completed` the VM may need a moment to reach `postmigrate` (the
/// event can come before the runstate change). Waits for it, so the disks are captured paused.
pub async fn wait_postmigrate(qmp: &Qmp, timeout: Duration) -> Result<(), StepError> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = qmp.execute(&qmp::query_status {}).await?;
        if !st.running && st.status == qmp::RunState::postmigrate {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(StepError::Refused(format!("the VM did not pause after the RAM dump (state {:?})", st.status)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Background-snapshot: waits until QEMU has saved the device state and started streaming RAM,
/// i.e. the image is fixed at the pause and `cont` is safe. (If `cont` came earlier, QEMU's
/// migration thread would stop the VM again later and the image would postdate the disk switch.)
pub async fn wait_saving_started(qmp: &Qmp, timeout: Duration) -> Result<(), StepError> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await?;
        let status = m.get("status").and_then(Value::as_str).unwrap_or("");
        let ram = m.get("ram");
        let pages = |k: &str| ram.and_then(|r| r.get(k)).and_then(Value::as_u64).unwrap_or(0);
        if status == "completed" || pages("normal") + pages("duplicate") > 0 {
            return Ok(());
        }
        if matches!(status, "failed" | "cancelled") {
            return Err(StepError::Refused(format!("the RAM dump {status} before it started")));
        }
        if Instant::now() > deadline {
            return Err(StepError::Refused(format!("the RAM dump did not start within {timeout:?} (status {status})")));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// sha256 of a file, read in 1 MiB pieces (never the whole dump in memory).
pub fn sha256_file(path: &Path) -> Result<String, StepError> {
    let io = |source| StepError::Io { what: format!("reading {}", path.display()), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    f.sync_all().map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The machine type QEMU runs (`pc-i440fx-10.0`), which a restore must use again.
pub async fn machine_type(qmp: &Qmp) -> Result<String, StepError> {
    let v = qmp.execute_raw("qom-get", Some(serde_json::json!({"path": "/machine", "property": "type"})), Duration::from_secs(10)).await?;
    Ok(v.as_str().unwrap_or_default().trim_end_matches("-machine").to_owned())
}

/// The time the VM spent paused, from QEMU's own STOP/RESUME event timestamps seen on `events`.
pub async fn paused_ms(events: &mut EventStream) -> Option<f64> {
    let mut total_us = 0u64;
    let mut stopped_at = None;
    loop {
        let soon = tokio::time::Instant::now() + Duration::from_millis(100);
        let Ok(ev) = events.wait_for("STOP/RESUME", soon, |e| e.name == "STOP" || e.name == "RESUME").await else { break };
        match (ev.name.as_str(), stopped_at) {
            ("STOP", None) => stopped_at = Some(ev.timestamp_us),
            ("RESUME", Some(t0)) => {
                total_us += ev.timestamp_us.saturating_sub(t0);
                stopped_at = None;
            }
            _ => {}
        }
    }
    (total_us > 0).then(|| total_us as f64 / 1e3)
}
