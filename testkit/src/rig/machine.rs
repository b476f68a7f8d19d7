//! A QEMU process in a scratch directory, with its QMP and guest-agent sockets and serial log.

use super::RigError;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use vmsnap::qemu::qga::{Qga, QgaError, Timeouts};
use vmsnap::qemu::qmp::Qmp;

/// A directory removed when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> Result<Self, RigError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("VMSNAP_SCRATCH").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| RigError::Io { what: format!("creating {}", dir.display()), source })?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running QEMU. Killed on drop; its console is printed if that happens during a panic.
#[derive(Debug)]
pub struct Machine {
    name: String,
    child: Option<Child>,
    pub qmp_path: PathBuf,
    pub qga_path: PathBuf,
    /// A second QMP monitor, for tests to observe the VM while vmsnap uses the first.
    pub observer_path: PathBuf,
    pub console_path: PathBuf,
    /// The program and its arguments, as started.
    argv: Vec<String>,
    started: Instant,
    // Last: removed after the process is dead.
    dir: ScratchDir,
}

impl Machine {
    /// Starts `qemu-system-x86_64` with `args` plus the QMP socket, the agent channel and the
    /// serial console, all in `dir`.
    pub(crate) fn spawn(name: &str, dir: ScratchDir, args: Vec<String>) -> Result<Self, RigError> {
        let qmp_path = dir.path().join("qmp.sock");
        let qga_path = dir.path().join("qga.sock");
        let console_path = dir.path().join("console.log");
        let observer_path = dir.path().join("observer.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", name, "-accel", "tcg", "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console_path.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            // A second monitor for test code to watch the VM while vmsnap holds the first.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", observer_path.display()))
            .arg("-chardev")
            .arg(format!("socket,id=qga0,path={},server=on,wait=off", qga_path.display()))
            .args(["-device", "virtio-serial-pci,id=vser0", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("qemu.stderr"))
                    .map_err(|source| RigError::Io { what: "qemu.stderr".into(), source })?,
            );
        // QEMU dies with the thread that started it, even when a test or the demo is killed.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let argv: Vec<String> =
            std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
        let child =
            cmd.spawn().map_err(|source| RigError::Io { what: "starting qemu-system-x86_64 (is the rig built?)".into(), source })?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            qmp_path,
            observer_path,
            qga_path,
            console_path,
            argv,
            started: Instant::now(),
            dir,
        })
    }

    /// The program and its arguments, as started (a config domain's `start` is built from it).
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Time since the process was started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the QMP socket accepts and negotiates.
    pub async fn qmp(&mut self) -> Result<Qmp, RigError> {
        let path = self.qmp_path.clone();
        self.connect_qmp(&path).await
    }

    /// Connects to the observer monitor.
    pub async fn observer(&mut self) -> Result<Qmp, RigError> {
        let path = self.observer_path.clone();
        self.connect_qmp(&path).await
    }

    async fn connect_qmp(&mut self, path: &Path) -> Result<Qmp, RigError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_alive()?;
            match Qmp::connect(path, Duration::from_secs(5)).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() > deadline => return Err(RigError::Failed(format!("{}: QMP never came up: {e}", self.name))),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits until the guest agent answers a sync and a ping; the connected client.
    pub async fn wait_agent(&mut self, timeout: Duration) -> Result<Qga, RigError> {
        let deadline = Instant::now() + timeout;
        // Short syncs while probing; generous deadlines after, for nested guests under load.
        let probe = Timeouts { sync: Duration::from_secs(2), other: Duration::from_secs(180), ..Timeouts::default() };
        loop {
            self.check_alive()?;
            let attempt: Result<Qga, QgaError> = async {
                let mut qga = Qga::connect(&self.qga_path, probe).await?;
                qga.ping().await?;
                Ok(qga)
            }
            .await;
            match attempt {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() > deadline => {
                    return Err(RigError::Failed(format!("{}: guest agent silent after {timeout:?}: {e}\n{}", self.name, self.console())))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_path).unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<(), RigError> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let stderr = std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default();
                return Err(RigError::Failed(format!("{} exited ({status}): {stderr}\nconsole:\n{}", self.name, self.console())));
            }
        }
        Ok(())
    }

    /// What vmsnap must never leave behind in this QEMU, seen on the observer monitor: the VM
    /// running (or paused, as `expect_running` says), no `vmsnap*` node, block job or fdset, every
    /// disk on its own node (`disk<i>-fmt`), no migration running, and the migration
    /// capabilities in `caps` as given (vmsnap puts back what it found). The first thing wrong,
    /// as a sentence.
    pub async fn vmsnap_leftovers(&self, expect_running: bool, caps: &[(&str, bool)]) -> Result<(), String> {
        let fail = |what: String| Err(what);
        let qmp = Qmp::connect(&self.observer_path, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        let status = qmp.execute(&qapi::qmp::query_status {}).await.map_err(|e| e.to_string())?;
        if status.running != expect_running {
            return fail(format!("VM running={} ({:?}), expected {expect_running}", status.running, status.status));
        }
        let nodes = qmp.node_names().await.map_err(|e| e.to_string())?;
        if nodes.iter().any(|n| n.starts_with("vmsnap")) {
            return fail(format!("vmsnap nodes left: {nodes:?}"));
        }
        if !qmp.query_jobs().await.map_err(|e| e.to_string())?.is_empty() {
            return fail("a block job is left".into());
        }
        let fdsets = qmp.execute(&qapi::qmp::query_fdsets {}).await.map_err(|e| e.to_string())?;
        if !fdsets.is_empty() {
            return fail(format!("fdsets left: {fdsets:?}"));
        }
        let blocks = qmp.execute(&qapi::qmp::query_block {}).await.map_err(|e| e.to_string())?;
        let tops: Vec<String> = blocks.into_iter().filter_map(|b| b.inserted.and_then(|i| i.node_name)).collect();
        if tops.iter().enumerate().any(|(i, t)| *t != format!("disk{i}-fmt")) {
            return fail(format!("disk chains not back on their base: {tops:?}"));
        }
        let m = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        let st = m["status"].as_str().unwrap_or("none");
        if vmsnap::engine::ram::is_running(st) {
            return fail(format!("a migration is left {st}"));
        }
        // vmsnap lifts the migration bandwidth for a dump (`ram_bandwidth`) and must put it back:
        // no test leaves QEMU's default of 128 MiB/s changed.
        let params = qmp.execute_raw("query-migrate-parameters", None, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        if params["max-bandwidth"].as_u64() != Some(128 << 20) {
            return fail(format!("migration max-bandwidth is {}, expected QEMU's default 134217728", params["max-bandwidth"]));
        }
        let now = qmp.execute_raw("query-migrate-capabilities", None, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        for (name, want) in caps {
            let on = now.as_array().into_iter().flatten().any(|c| c["capability"] == *name && c["state"] == true);
            if on != *want {
                return fail(format!("migration capability {name} is {on}, expected {want}"));
            }
        }
        Ok(())
    }

    /// Kills QEMU now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} console ({}) ----\n{}\n---- end of console ----", self.name, self.console_path.display(), self.console());
            let stderr = std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default();
            if !stderr.is_empty() {
                eprintln!("---- {} qemu stderr ----\n{stderr}", self.name);
            }
        }
        self.kill();
    }
}
