//! Everything a crash can leave behind, settled in one call: `vmsnap recover` and the daemon's
//! start-up both run [`everything`], so a daemon that starts after a crash finishes an
//! interrupted restore, copy or mount as the command would.
//!
//! In order: the snapshot journals ([`crate::engine::recover`]: thaw, resume, merge the
//! overlays), restores (finished once their domain is stopped), copies (`restore --as`,
//! `verify --boot`'s scratch copies: undone unless the user's copy runs), half-made mounts
//! (undone; complete ones stay until `vmsnap umount`), then guests that woke frozen from a
//! quiesced RAM snapshot while nothing of vmsnap runs on them (thawed).

use crate::config::Config;
use crate::engine::recover::{self, RecoverError, RecoveryReport};
use crate::restore::mount::MountError;
use crate::restore::RestoreError;
use crate::zfs::Zfs;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("recovery incomplete; the journals stay")]
    Snapshots(#[source] RecoverError),
    #[error("an interrupted restore")]
    Restore(#[source] RestoreError),
    #[error("an interrupted copy")]
    Copy(#[source] RestoreError),
    #[error("an interrupted mount")]
    Mount(#[source] MountError),
    #[error("domain {domain}")]
    Thaw {
        domain: String,
        #[source]
        source: RecoverError,
    },
}

impl RecoveryError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Snapshots(e) | Self::Thaw { source: e, .. } => e.hint(),
            _ => None,
        }
    }
}

/// Settles every journal and interrupted operation on this host; what each did, by domain.
pub async fn everything(cfg: &Config, zfs: &Zfs) -> Result<Vec<RecoveryReport>, RecoveryError> {
    let mut reports = recover::recover_all(cfg, zfs).await.map_err(RecoveryError::Snapshots)?;
    let report = |(domain, actions): (String, Vec<String>)| RecoveryReport { journal: Default::default(), domain, actions };
    reports.extend(crate::restore::recover_pending(cfg, zfs).await.map_err(RecoveryError::Restore)?.into_iter().map(report));
    reports.extend(crate::restore::recover_copies(&cfg.state_dir, zfs).await.map_err(RecoveryError::Copy)?.into_iter().map(report));
    reports.extend(crate::restore::mount::recover_interrupted(cfg, zfs).await.map_err(RecoveryError::Mount)?.into_iter().map(report));
    let registry = crate::daemon::registry::Registry::new(&cfg.state_dir);
    for dom in crate::daemon::registry::all_domains(cfg, &registry) {
        let Some(qga) = &dom.qga else { continue };
        match recover::thaw_woken_frozen(cfg, &dom.name, &dom.qmp, qga).await {
            Ok(Some(action)) => reports.push(report((dom.name.clone(), vec![action]))),
            Ok(None) => {}
            // An operation runs on it and thaws it itself.
            Err(RecoverError::Busy(_)) => {}
            Err(source) => return Err(RecoveryError::Thaw { domain: dom.name.clone(), source }),
        }
    }
    Ok(reports)
}
