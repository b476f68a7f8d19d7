//! The user's pre/post snapshot and pruning scripts: run with sanoid's environment variables
//! (`SANOID_TARGET`, `SANOID_TARGETS`, `SANOID_SNAPNAME`, `SANOID_SNAPNAMES`, `SANOID_TYPES`,
//! `SANOID_SCRIPT`) plus `VMSNAP_DOMAIN`, no shell, and killed when they outlive their timeout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot run {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exited with {status}: {stderr}")]
    Failed { path: PathBuf, status: std::process::ExitStatus, stderr: String },
    #[error("{path} did not finish within {timeout:?} and was killed")]
    Timeout { path: PathBuf, timeout: Duration },
}

/// What a script is told.
#[derive(Debug, Clone, Default)]
pub struct ScriptEnv {
    pub domain: String,
    /// Which hook: `pre`, `post` or `prune`.
    pub script: &'static str,
    pub targets: Vec<String>,
    pub snapnames: Vec<String>,
    pub types: Vec<String>,
}

impl ScriptEnv {
    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VMSNAP_DOMAIN", self.domain.clone()),
            ("SANOID_SCRIPT", self.script.to_owned()),
            ("SANOID_TARGET", self.targets.first().cloned().unwrap_or_default()),
            ("SANOID_TARGETS", self.targets.join(",")),
            ("SANOID_SNAPNAME", self.snapnames.first().cloned().unwrap_or_default()),
            ("SANOID_SNAPNAMES", self.snapnames.join(",")),
            ("SANOID_TYPES", self.types.join(",")),
        ]
    }
}

/// Runs `path` with `env`; its stdout goes to the log, a non-zero exit or a timeout is an error.
pub async fn run(path: &Path, env: &ScriptEnv, timeout: Duration) -> Result<(), ScriptError> {
    let mut cmd = tokio::process::Command::new(path);
    // Its own process group: a timeout kills whatever the script started too (a child left
    // holding its output pipe would otherwise outlive it).
    cmd.envs(env.vars()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
    let child = cmd.spawn().map_err(|source| ScriptError::Spawn { path: path.to_owned(), source })?;
    let group = child.id().and_then(|p| i32::try_from(p).ok()).map(nix::unistd::Pid::from_raw);
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|source| ScriptError::Spawn { path: path.to_owned(), source })?,
        Err(_) => {
            if let Some(g) = group {
                let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
            }
            return Err(ScriptError::Timeout { path: path.to_owned(), timeout });
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        tracing::info!(script = %path.display(), "{}", stdout.trim());
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(ScriptError::Failed {
            path: path.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("s.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn environment_exit_status_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let env = ScriptEnv {
            domain: "web".into(),
            script: "pre",
            targets: vec!["tank/vms/web".into(), "tank/web-data".into()],
            snapnames: vec!["autosnap_x_hourly".into()],
            types: vec!["hourly".into()],
        };
        let p = script(dir.path(), &format!("env | grep -E '^(SANOID|VMSNAP)_' | sort > {}", out.display()));
        run(&p, &env, Duration::from_secs(10)).await.unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains("SANOID_TARGET=tank/vms/web\n") && text.contains("SANOID_TARGETS=tank/vms/web,tank/web-data\n"), "{text}");
        assert!(
            text.contains("VMSNAP_DOMAIN=web\n") && text.contains("SANOID_SCRIPT=pre\n") && text.contains("SANOID_TYPES=hourly"),
            "{text}"
        );

        let p = script(dir.path(), "echo no >&2; exit 3");
        let e = run(&p, &env, Duration::from_secs(10)).await.unwrap_err().to_string();
        assert!(e.contains("s.sh") && e.contains('3') && e.contains("no"), "{e}");

        let p = script(dir.path(), "sleep 30");
        let t = std::time::Instant::now();
        let e = run(&p, &env, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, ScriptError::Timeout { .. }) && t.elapsed() < Duration::from_secs(10), "{e}");
    }

    /// A script that started a child holding its output pipe: the timeout kills the whole group.
    #[tokio::test]
    async fn a_timeout_kills_what_the_script_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let p = script(dir.path(), &format!("sleep 60 & echo $! > {}; wait", pid_file.display()));
        let e = run(&p, &ScriptEnv::default(), Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(e, ScriptError::Timeout { .. }), "{e}");
        let child: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let mut gone = false;
        for _ in 0..50 {
            // Gone, or a zombie of an init that has not reaped it yet.
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if stat.is_empty() || crate::qemu::process::state(&stat) == Some('Z') {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone, "the script's child {child} outlived the timeout");
    }
}
