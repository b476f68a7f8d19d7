//! Saving the VM's RAM through a descriptor vmsnap opened (QEMU gets it with `getfd` and
//! migrates to `fd:`; no shell, no path QEMU must be allowed to open): the write end of the pipe
//! [`super::ramstream`] drains into the dump file, or the dump file itself, which
//! [`super::ramstream::follow`] hashes behind QEMU.
//!
//! Two modes: precopy (a live migration that pauses the VM at its end) and background-snapshot
//! (the VM pauses only for the disk switch; QEMU then writes the RAM as it was at that pause while
//! the guest runs, tracking writes with userfaultfd write-protection).

use super::journal::create_private_dir;
use super::{RamMode, StepError};
use crate::qemu::qmp::{EventStream, Qmp};
use qapi::qmp::{self, MigrationCapability, MigrationCapabilityStatus};
use serde_json::Value;
use std::os::fd::{AsFd, BorrowedFd};
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

/// QEMU's migration bandwidth now (bytes/s), to journal before changing it.
pub async fn current_bandwidth(qmp: &Qmp) -> Result<u64, StepError> {
    let v = qmp.execute_raw("query-migrate-parameters", None, Duration::from_secs(10)).await?;
    v.get("max-bandwidth").and_then(Value::as_u64).ok_or_else(|| StepError::Refused("QEMU did not say its migration max-bandwidth".into()))
}

/// Sets QEMU's migration bandwidth (bytes/s).
pub async fn set_bandwidth(qmp: &Qmp, bytes: u64) -> Result<(), StepError> {
    qmp.execute_raw("migrate-set-parameters", Some(serde_json::json!({ "max-bandwidth": bytes })), Duration::from_secs(10)).await?;
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
    close_fd(qmp).await;
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
    // Readable too: a dump QEMU writes itself is hashed behind it from the same file.
    let file = std::fs::OpenOptions::new()
        .read(true)
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

/// Hands QEMU the descriptor the RAM goes to (before the pause: it is not part of it).
pub async fn pass_fd(qmp: &Qmp, fd: BorrowedFd<'_>) -> Result<(), StepError> {
    qmp.getfd(FD_NAME, fd).await?;
    Ok(())
}

/// Drops the descriptor [`pass_fd`] gave, if QEMU still holds it unused (a step failed before
/// the migration took it; a drain waits for its end to close).
pub async fn close_fd(qmp: &Qmp) {
    let _ = qmp.execute_raw("closefd", Some(serde_json::json!({ "fdname": FD_NAME })), Duration::from_secs(10)).await;
}

/// Starts the migration into the descriptor [`pass_fd`] gave.
pub async fn migrate(qmp: &Qmp) -> Result<(), StepError> {
    qmp.execute(&qmp::migrate { uri: Some(format!("fd:{FD_NAME}")), channels: None, detach: None, resume: None }).await?;
    Ok(())
}

/// Hands QEMU `file` and starts the migration into it (QEMU writing the file directly: the
/// benchmarks' baseline).
pub async fn start(qmp: &Qmp, file: &std::fs::File) -> Result<(), StepError> {
    pass_fd(qmp, file.as_fd()).await?;
    migrate(qmp).await
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
        tokio::time::sleep(Duration::from_millis(1)).await;
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
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// sha256 of a file, read in 1 MiB pieces (never the whole dump in memory).
pub fn sha256_file(path: &Path) -> Result<String, StepError> {
    let io = |source| StepError::Io { what: format!("reading {}", path.display()), source };
    let f = std::fs::File::open(path).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(crate::fsutil::sha256_of(f, |_| {}).map_err(io)?.1)
}

/// The machine type QEMU runs (`pc-i440fx-10.0`), which a restore must use again.
pub async fn machine_type(qmp: &Qmp) -> Result<String, StepError> {
    let v = qmp.execute_raw("qom-get", Some(serde_json::json!({"path": "/machine", "property": "type"})), Duration::from_secs(10)).await?;
    Ok(v.as_str().unwrap_or_default().trim_end_matches("-machine").to_owned())
}

/// The VM's pauses as QEMU's own STOP/RESUME event timestamps say (wall clock, µs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pauses {
    pub total_us: u64,
    /// The first STOP and the last RESUME.
    pub first_stop_us: Option<u64>,
    pub last_resume_us: Option<u64>,
}

impl Pauses {
    pub fn ms(&self) -> Option<f64> {
        (self.total_us > 0).then(|| self.total_us as f64 / 1e3)
    }
}

/// The pauses seen on `events` (subscribed before the pause).
pub async fn pauses(events: &mut EventStream) -> Pauses {
    let mut p = Pauses::default();
    let mut stopped_at = None;
    loop {
        let soon = tokio::time::Instant::now() + Duration::from_millis(100);
        let Ok(ev) = events.wait_for("STOP/RESUME", soon, |e| e.name == "STOP" || e.name == "RESUME").await else { break };
        match (ev.name.as_str(), stopped_at) {
            ("STOP", None) => {
                stopped_at = Some(ev.timestamp_us);
                p.first_stop_us.get_or_insert(ev.timestamp_us);
            }
            ("RESUME", Some(t0)) => {
                p.total_us += ev.timestamp_us.saturating_sub(t0);
                p.last_resume_us = Some(ev.timestamp_us);
                stopped_at = None;
            }
            _ => {}
        }
    }
    p
}

/// The time the VM spent paused, from QEMU's own STOP/RESUME event timestamps seen on `events`.
pub async fn paused_ms(events: &mut EventStream) -> Option<f64> {
    pauses(events).await.ms()
}

/// vmsnap's own clock at the steps of a pause (wall clock µs, the clock of QEMU's event
/// timestamps), to break the pause into phases.
#[derive(Debug, Default)]
pub struct PauseMarks(Vec<(&'static str, u64)>);

fn wall_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl PauseMarks {
    pub fn mark(&mut self, step: &'static str) {
        self.0.push((step, wall_us()));
    }

    /// Each step from QEMU's STOP to its RESUME with vmsnap's marks in between, as `"A → B"` and
    /// the µs from A to B, in time order.
    pub fn phases(&self, pauses: &Pauses) -> Vec<(String, u64)> {
        let mut points: Vec<(&str, u64)> = self.0.clone();
        points.extend(pauses.first_stop_us.map(|t| ("STOP event", t)));
        points.extend(pauses.last_resume_us.map(|t| ("RESUME event", t)));
        points.sort_by_key(|&(_, t)| t);
        points.windows(2).map(|w| (format!("{} → {}", w[0].0, w[1].0), w[1].1.saturating_sub(w[0].1))).collect()
    }
}

/// Starts loading the dump at `path` into a QEMU started with `-incoming defer` (wait for the
/// `MIGRATION completed` event afterwards): QEMU reads an uncompressed stream from the file
/// itself; a compressed one is decompressed into a pipe by vmsnap ([`super::ramstream::feed`]),
/// whose [`super::ramstream::Feed`] is returned.
pub async fn load(qmp: &Qmp, path: &Path) -> Result<Option<super::ramstream::Feed>, StepError> {
    use super::saveimage;
    let refused = |e: saveimage::SaveImageError| StepError::Refused(e.to_string());
    let at = saveimage::locate(path).map_err(refused)?;
    if at.compress == crate::model::RamCompress::None {
        let uri = saveimage::incoming_uri(path).map_err(refused)?;
        qmp.execute_raw("migrate-incoming", Some(serde_json::json!({ "uri": uri })), Duration::from_secs(30)).await?;
        return Ok(None);
    }
    let file = crate::fsutil::open_regular(path).map_err(|e| StepError::Refused(format!("opening {}: {e}", path.display())))?;
    let (qemu_end, feed) = super::ramstream::feed(file, at.offset, at.compress)
        .map_err(|source| StepError::Io { what: format!("reading {}", path.display()), source })?;
    qmp.getfd(FD_NAME, qemu_end.as_fd()).await?;
    drop(qemu_end);
    qmp.execute_raw("migrate-incoming", Some(serde_json::json!({ "uri": format!("fd:{FD_NAME}") })), Duration::from_secs(30)).await?;
    Ok(Some(feed))
}
