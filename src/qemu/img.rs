//! The `qemu-img` calls vmsnap makes, from one place: an overlay file created on a live disk,
//! an overlay's header read (never probing its backing file), an offline commit. Each is an
//! argument vector with stdin closed; stderr is kept for the error.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    #[error("running qemu-img {verb}: {source}")]
    Spawn {
        verb: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {verb} {path}: {stderr}")]
    Failed { verb: &'static str, path: String, stderr: String },
    #[error("qemu-img info {path}: not JSON: {why}")]
    Unreadable { path: String, why: String },
}

async fn run(verb: &'static str, args: &[&std::ffi::OsStr], path: &Path) -> Result<Vec<u8>, ImgError> {
    let out = tokio::process::Command::new("qemu-img")
        .arg(verb)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| ImgError::Spawn { verb, source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(ImgError::Failed { verb, path: path.display().to_string(), stderr });
    }
    Ok(out.stdout)
}

/// `qemu-img create` of a qcow2 overlay at `path` whose backing is `backing` (in `format`,
/// `size` bytes): `-u`, so the backing is not opened here (`blockdev-snapshot` links the live
/// node).
pub async fn create_overlay(path: &Path, backing: &Path, format: &str, size: u64) -> Result<(), ImgError> {
    let size = size.to_string();
    let args = ["-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "-u".as_ref(), "-F".as_ref(), format.as_ref(), "-b".as_ref()];
    let args: Vec<&std::ffi::OsStr> = args.into_iter().chain([backing.as_os_str(), path.as_os_str(), size.as_ref()]).collect();
    run("create", &args, path).await.map(drop)
}

/// The backing file and its format that a qcow2 file's header names (`qemu-img info -U`, which
/// opens no backing file).
pub async fn header_backing(path: &Path) -> Result<(Option<String>, Option<String>), ImgError> {
    let args = ["-U".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "--output=json".as_ref(), path.as_os_str()];
    let out = run("info", &args, path).await?;
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| ImgError::Unreadable { path: path.display().to_string(), why: e.to_string() })?;
    let field = |k: &str| info[k].as_str().map(str::to_owned);
    Ok((field("backing-filename"), field("backing-filename-format")))
}

/// `qemu-img commit` of a qcow2 overlay into its base (no process may have either open).
pub async fn commit(path: &Path) -> Result<(), ImgError> {
    let args = ["-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str()];
    run("commit", &args, path).await.map(drop)
}
