//! A config domain's QEMU started by vmsnap, for `restore --resume`: the domain's `start`
//! argument vector with `-incoming defer` added, in a session of its own (it outlives vmsnap;
//! the daemon does not start one: its service's cgroup would take the guest down with it),
//! its stderr appended to `<state_dir>/<domain>.qemu.log`; then over QMP the dump loaded (QEMU
//! reads a raw stream from the file, a compressed one through vmsnap's pipe) and `cont`. A QEMU
//! that does not come up, or a load that fails, is killed: a half-loaded guest is no guest.

use crate::config::{Config, DomainConfig};
use crate::engine::ram;
use crate::qemu::qmp::Qmp;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long QEMU may take to answer on its QMP socket after it was started.
const QMP_WAIT: Duration = Duration::from_secs(60);
/// How long loading the dump may take (nested TCG reads ~100 MiB/s).
const LOAD_WAIT: Duration = Duration::from_secs(900);

/// Starts `dom`'s QEMU from `dump` and lets it run. Errors are sentences for the user.
pub async fn resume(cfg: &Config, dom: &DomainConfig, dump: &Path) -> Result<(), String> {
    run(cfg, dom, Some(dump)).await
}

/// Starts `dom`'s QEMU (a cold boot) and waits until its QMP socket answers.
pub async fn boot(cfg: &Config, dom: &DomainConfig) -> Result<(), String> {
    run(cfg, dom, None).await
}

/// Asks the QEMU on `qmp` to quit; true when one answered there.
pub async fn stop(qmp: &Path) -> bool {
    match Qmp::connect(qmp, Duration::from_secs(3)).await {
        Ok(q) => {
            let _ = q.execute(&qapi::qmp::quit {}).await;
            true
        }
        Err(_) => false,
    }
}

async fn run(cfg: &Config, dom: &DomainConfig, dump: Option<&Path>) -> Result<(), String> {
    let Some(program) = dom.start.first() else {
        return Err(format!("[domain.{}] has no `start`: vmsnap does not know how to start its QEMU", dom.name));
    };
    let log = cfg.state_dir.join(format!("{}.qemu.log", dom.name));
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let log_start = stderr.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = std::process::Command::new(program);
    cmd.args(&dom.start[1..]);
    if dump.is_some() {
        cmd.args(["-incoming", "defer"]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
    // A session of its own: neither a Ctrl-C to vmsnap nor the terminal's hang-up reaches it.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting {program}: {e}"))?;
    let pid = child.id();
    // Reaped by a thread of its own: no zombie under a long-running daemon.
    let exited: Arc<Mutex<Option<ExitStatus>>> = Arc::default();
    let seen = exited.clone();
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            *seen.lock().expect("not poisoned") = Some(status);
        }
    });
    let res = load(dom, dump, &exited, &log, log_start).await;
    if res.is_err() && exited.lock().expect("not poisoned").is_none() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    res
}

async fn load(
    dom: &DomainConfig,
    dump: Option<&Path>,
    exited: &Mutex<Option<ExitStatus>>,
    log: &Path,
    log_start: u64,
) -> Result<(), String> {
    let died = |status: ExitStatus| format!("QEMU exited ({status}): {}", tail(log, log_start));
    let deadline = Instant::now() + QMP_WAIT;
    let qmp = loop {
        if let Some(status) = *exited.lock().expect("not poisoned") {
            return Err(died(status));
        }
        match Qmp::connect(&dom.qmp, Duration::from_secs(3)).await {
            Ok(q) => break q,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("QEMU did not answer on {} within {} s: {e}", dom.qmp.display(), QMP_WAIT.as_secs()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let Some(dump) = dump else { return Ok(()) };
    let step = |what: &str, e: String| match *exited.lock().expect("not poisoned") {
        Some(status) => format!("{what}: {e}; {}", died(status)),
        None => format!("{what}: {e}"),
    };
    ram::set_capabilities(&qmp, false).await.map_err(|e| step("migration capabilities", e.to_string()))?;
    let mut events = qmp.subscribe().map_err(|e| step("QMP events", e.to_string()))?;
    let feed = ram::load(&qmp, dump).await.map_err(|e| step("loading the dump", e.to_string()))?;
    ram::wait_completed(&qmp, &mut events, LOAD_WAIT).await.map_err(|e| step("loading the dump", e.to_string()))?;
    if let Some(feed) = feed {
        feed.finish().await.map_err(|e| step("decompressing the dump", e.to_string()))?;
    }
    let status = qmp.execute(&qapi::qmp::query_status {}).await.map_err(|e| step("query-status", e.to_string()))?;
    if !status.running {
        qmp.execute(&qapi::qmp::cont {}).await.map_err(|e| step("cont", e.to_string()))?;
    }
    Ok(())
}

/// What QEMU wrote to its log since `from` (its last 1000 bytes, one line).
fn tail(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.max(len.saturating_sub(1000));
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.take(1000).read_to_string(&mut text);
        }
    }
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        format!("nothing in {}", PathBuf::from(log).display())
    } else {
        text
    }
}
