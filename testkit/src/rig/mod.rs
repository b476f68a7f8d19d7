//! The test rig's machines, booted under TCG from the images `scripts/rig/rig.sh` builds into
//! `$VMSNAP_RIG` (default `/var/cache/vmsnap-rig`): a tiny guest running the real qemu-guest-agent
//! ([`TinyVm`]), a Debian VM with real OpenZFS ([`ZfsVm`]), and real libvirtd ([`libvirt`]). Used by the tests and by the
//! fixture recorder; not by vmsnap itself.
//!
//! Every machine lives in its own scratch directory, is killed when dropped, and prints its serial
//! console when dropped during a panic (a failing test).

pub mod lane;
pub mod libvirt;
mod machine;
pub mod remote;
pub mod resume_kit;
pub mod sanoid;
mod tiny;
mod zfsvm;

pub use machine::{Machine, ScratchDir};
pub use tiny::{TinyVm, TinyVmOptions};
pub use zfsvm::ZfsVm;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("the test rig is not built: {missing} is missing. Run `scripts/rig/rig.sh` (as root) first")]
    NotBuilt { missing: PathBuf },
    #[error("rig: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rig: {0}")]
    Failed(String),
}

/// Where the rig's images are.
#[derive(Debug, Clone)]
pub struct Rig {
    dir: PathBuf,
}

impl Rig {
    /// The rig at `$VMSNAP_RIG` or `/var/cache/vmsnap-rig`.
    ///
    /// # Errors
    /// [`RigError::NotBuilt`] naming the first missing file.
    pub fn locate() -> Result<Self, RigError> {
        let dir = std::env::var_os("VMSNAP_RIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/vmsnap-rig"));
        let rig = Self { dir };
        for f in ["vmlinux", "initrd.gz", "data-template.qcow2"] {
            rig.require(f)?;
        }
        Ok(rig)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn require(&self, name: &str) -> Result<PathBuf, RigError> {
        let p = self.dir.join(name);
        if p.exists() {
            Ok(p)
        } else {
            Err(RigError::NotBuilt { missing: p })
        }
    }
}

/// [`RigError::NotBuilt`] naming the first of `files` that is missing.
pub(crate) fn require_all(files: &[PathBuf]) -> Result<(), RigError> {
    match files.iter().find(|f| !f.exists()) {
        Some(missing) => Err(RigError::NotBuilt { missing: missing.clone() }),
        None => Ok(()),
    }
}

/// Runs a host program (qemu-img, mkfs) and fails with its stderr.
pub(crate) fn host_cmd(program: &str, args: &[&str]) -> Result<(), RigError> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|source| RigError::Io { what: format!("running {program}"), source })?;
    if !out.status.success() {
        return Err(RigError::Failed(format!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_all_names_the_first_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().join("here");
        std::fs::write(&here, b"").unwrap();
        let (gone1, gone2) = (dir.path().join("gone1"), dir.path().join("gone2"));
        assert!(require_all(std::slice::from_ref(&here)).is_ok());
        match require_all(&[here, gone1.clone(), gone2]) {
            Err(RigError::NotBuilt { missing }) => assert_eq!(missing, gone1),
            other => panic!("{other:?}"),
        }
    }
}
