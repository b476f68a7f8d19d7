//! The one place that runs `zfs` and `zpool`. Arguments are always a vector (never a shell line),
//! the argv is logged at debug level, stderr is always captured and turned into a [`ZfsError`].

use super::error::{recognise, ZfsError};
use std::ffi::OsString;
use std::path::PathBuf;
use tokio::process::Command;

/// Which binaries to run. `VMSNAP_ZFS` / `VMSNAP_ZPOOL` override the defaults (`zfs`, `zpool` on
/// `PATH`), so tests can point vmsnap at a stand-in.
#[derive(Debug, Clone)]
pub struct ZfsCli {
    zfs: PathBuf,
    zpool: PathBuf,
}

impl Default for ZfsCli {
    fn default() -> Self {
        Self::from_env()
    }
}

impl ZfsCli {
    pub fn from_env() -> Self {
        let var = |k: &str, d: &str| std::env::var_os(k).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(d));
        Self { zfs: var("VMSNAP_ZFS", "zfs"), zpool: var("VMSNAP_ZPOOL", "zpool") }
    }

    pub fn with_binaries(zfs: PathBuf, zpool: PathBuf) -> Self {
        Self { zfs, zpool }
    }

    /// Runs `zfs ARGS`; its stdout.
    ///
    /// # Errors
    /// A recognised variant of [`ZfsError`] from stderr, else [`ZfsError::Failed`] with the argv,
    /// exit status and stderr; [`ZfsError::Spawn`] when the binary cannot be run.
    pub async fn zfs(&self, args: Vec<OsString>) -> Result<String, ZfsError> {
        run(&self.zfs, args).await
    }

    /// The `zfs` program, for the streaming commands (`send`, `receive`) whose stdin or stdout is
    /// a pipe rather than captured text.
    pub fn zfs_program(&self) -> &std::path::Path {
        &self.zfs
    }

    /// Runs `zpool ARGS`; its stdout.
    pub async fn zpool(&self, args: Vec<OsString>) -> Result<String, ZfsError> {
        run(&self.zpool, args).await
    }
}

async fn run(program: &PathBuf, args: Vec<OsString>) -> Result<String, ZfsError> {
    let argv = std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%argv, "running");
    let out = Command::new(program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ZfsError::Spawn { program: program.display().to_string(), source })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        if !stderr.trim().is_empty() {
            tracing::debug!(%argv, stderr = %stderr.trim(), "zfs wrote to stderr but succeeded");
        }
        return String::from_utf8(out.stdout).map_err(|_| ZfsError::Failed {
            argv,
            status: "0".into(),
            stderr: "output is not UTF-8".into(),
        });
    }
    let status = out.status.code().map_or_else(|| "signal".to_owned(), |c| c.to_string());
    tracing::debug!(%argv, %status, stderr = %stderr.trim(), "failed");
    Err(recognise(&stderr).unwrap_or(ZfsError::Failed { argv, status, stderr: stderr.trim().to_owned() }))
}

/// Builds an argument vector from anything string-like.
#[macro_export]
#[doc(hidden)]
macro_rules! zargs {
    ($($a:expr),* $(,)?) => { vec![$(::std::ffi::OsString::from($a)),*] };
}
