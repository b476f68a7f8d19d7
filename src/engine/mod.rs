//! The snapshot engine: consistent snapshots of one domain, and cleaning up after a crash.
//!
//! [`flow`] is the snapshot itself, top to bottom as steps; every step that changes the VM is
//! journaled first ([`journal`]), and on any error the engine replays its own journal through
//! [`recover`], the same code `vmsnap recover` runs after a crash. [`lock`] keeps two snapshots of
//! one domain from interleaving; [`disks`] asks QEMU which disks a running VM has; [`naming`]
//! holds the snapshot names and the ZFS properties every snapshot carries.

pub mod disks;
pub(crate) mod flow;
pub mod journal;
pub mod lock;
pub mod naming;
pub mod ram;
pub mod ramstream;
pub mod recover;
pub mod resumable;
pub mod saveimage;

use crate::qemu::blockjob::JobError;
use crate::qemu::qga::QgaError;
use crate::qemu::qmp::QmpError;
use crate::zfs::ZfsError;
use std::path::PathBuf;

pub use flow::snapshot;

pub use crate::model::{Consistency, RamMode, Strategy};

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub strategy: Strategy,
    pub memory: Option<RamMode>,
    /// `false` with `--no-quiesce`: do not freeze even if an agent is there.
    pub quiesce: bool,
    /// The label after the timestamp in the name (`manual` from the CLI).
    pub label: String,
    /// The retention periods a scheduled snapshot serves (recorded in `vmsnap:periods`).
    pub periods: Vec<crate::model::Period>,
    /// The time in the snapshot's name (default: when the snapshot starts); the daemon fixes it
    /// beforehand so the name its pre-snapshot script is told is the one taken.
    pub name_at: Option<std::time::SystemTime>,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self { strategy: Strategy::Overlay, memory: None, quiesce: true, label: "manual".into(), periods: Vec::new(), name_at: None }
    }
}

/// What a snapshot did (also the `Result` of a D-Bus snapshot job, as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotReport {
    pub domain: String,
    /// The part after `@`.
    pub name: String,
    pub snapshots: Vec<String>,
    pub consistency: Consistency,
    /// `overlay`, `direct`, or `offline` (the VM was not running).
    pub strategy: String,
    /// How long the guest's filesystems were frozen.
    pub freeze_ms: Option<f64>,
    /// How long the VM was paused.
    pub pause_ms: Option<f64>,
    pub ram_dump: Option<PathBuf>,
    pub ram_sha256: Option<String>,
    /// The dump file's size in bytes.
    #[serde(default)]
    pub ram_file_bytes: Option<u64>,
    /// How the dump's stream is compressed.
    #[serde(default)]
    pub ram_compress: Option<crate::model::RamCompress>,
    /// The guest pause of a RAM snapshot, phase by phase (each ends with the event named, µs
    /// since the previous one), from QEMU's STOP/RESUME timestamps and vmsnap's own clock.
    #[serde(default)]
    pub pause_phases: Vec<(String, u64)>,
    /// Why the snapshot is less consistent than asked, if it is.
    pub warnings: Vec<String>,
    /// Each step and how long it took, in order.
    pub steps: Vec<(String, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Qga(#[from] QgaError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Zfs(#[from] ZfsError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    /// An earlier operation's journal could not be settled first.
    #[error(transparent)]
    Recover(Box<recover::RecoverError>),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("domain {domain} is busy: another vmsnap operation holds its lock ({lock})")]
    Busy { domain: String, lock: PathBuf },
    #[error("domain {domain}: step {step} failed")]
    Step {
        domain: String,
        step: &'static str,
        #[source]
        source: Box<StepError>,
    },
    #[error("domain {domain}: step {step} failed, and cleaning up after it failed too: {cleanup}")]
    CleanupFailed {
        domain: String,
        step: &'static str,
        cleanup: String,
        #[source]
        source: Box<StepError>,
    },
}

impl EngineError {
    /// A hint for the operator, when there is an obvious next thing to try.
    pub fn hint(&self) -> Option<&'static str> {
        let source = match self {
            EngineError::Busy { .. } => return Some("wait for the other operation, or check `vmsnap recover` if none runs"),
            EngineError::CleanupFailed { .. } => return Some("run `vmsnap recover` to finish the cleanup"),
            EngineError::Step { source, .. } => source.as_ref(),
        };
        match source {
            StepError::Qga(QgaError::AgentNotRunning { .. } | QgaError::Connect { .. }) => {
                Some("is qemu-guest-agent running in the guest? Use --no-quiesce for a crash-consistent snapshot")
            }
            StepError::Qmp(QmpError::Connect { .. }) => Some("is the VM running, and is `qmp` in the config its QMP socket?"),
            StepError::Zfs(ZfsError::NoDatasetFor { .. }) => Some("vmsnap snapshots disks that live on ZFS datasets or zvols"),
            StepError::Recover(e) => e.hint(),
            _ => None,
        }
    }
}
