//! A booted tiny guest, saved: RAM state plus its two disks as they were at that moment, so the
//! ZFS lane can start a nested guest in seconds instead of the minutes a boot takes under TCG
//! inside TCG. Built on the host (fast) into `<rig>/resume-kit/`, restored inside the OpenZFS VM
//! with `-incoming defer` + `migrate-incoming`, exactly as a vmsnap RAM snapshot is resumed.
//!
//! The kit's guest has disk 0 as a qcow2 image (`disk0.qcow2`) and disk 1 raw (`disk1.raw`, 64
//! MiB, to be written onto a zvol); the guest must be restored with the same memory size, the
//! same devices and identical disk contents.

use super::machine::ScratchDir;
use super::tiny::{TinyVm, TinyVmOptions};
use super::{host_cmd, Rig, RigError};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmsnap::qemu::qga::Qga;
use vmsnap::qemu::qmp::Qmp;

pub const KIT_MEMORY_MIB: u32 = 384;
const KIT_DIR: &str = "resume-kit";

/// The files of a resume kit.
#[derive(Debug, Clone)]
pub struct ResumeKit {
    pub dir: PathBuf,
}

impl ResumeKit {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.bin")
    }
    pub fn disk0(&self) -> PathBuf {
        self.dir.join("disk0.qcow2")
    }
    pub fn disk1(&self) -> PathBuf {
        self.dir.join("disk1.raw")
    }

    /// The kit in `rig` if it was built.
    pub fn find(rig: &Rig) -> Result<Self, RigError> {
        let kit = Self { dir: rig.dir().join(KIT_DIR) };
        super::require_all(&[kit.state(), kit.disk0(), kit.disk1()])?;
        Ok(kit)
    }

    /// Builds the kit unless one made from the current rig files exists (host only).
    pub async fn ensure(rig: &Rig) -> Result<Self, RigError> {
        let dir = rig.dir().join(KIT_DIR);
        let stamp = stamp(rig)?;
        if std::fs::read_to_string(dir.join("stamp")).ok().as_deref() == Some(stamp.as_str()) {
            return Self::find(rig);
        }
        let work = ScratchDir::new("vmsnap-kit")?;
        let disk0 = work.path().join("disk0.qcow2");
        let disk1 = work.path().join("disk1.raw");
        let template = rig.require("data-template.qcow2")?;
        host_cmd("cp", &[template.to_str().expect("utf-8"), disk0.to_str().expect("utf-8")])?;
        host_cmd("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", template.to_str().expect("utf-8"), disk1.to_str().expect("utf-8")])?;
        let opts =
            TinyVmOptions { memory_mib: KIT_MEMORY_MIB, disk_images: Some(vec![disk0.clone(), disk1.clone()]), ..Default::default() };
        let (mut vm, qmp, mut qga, _) = TinyVm::boot(rig, &opts).await?;
        qga.sh("sync", Duration::from_secs(30)).await.map_err(|e| RigError::Failed(format!("sync in the kit guest: {e}")))?;
        drop(qga);
        let state = work.path().join("state.bin");
        save_state(&qmp, &state).await?;
        vm.machine.kill();
        let tmp = rig.dir().join(format!("{KIT_DIR}.new"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| RigError::Io { what: "kit dir".into(), source })?;
        for f in [&state, &disk0, &disk1] {
            host_cmd("cp", &["--sparse=always", f.to_str().expect("utf-8"), tmp.to_str().expect("utf-8")])?;
        }
        std::fs::write(tmp.join("stamp"), &stamp).map_err(|source| RigError::Io { what: "kit stamp".into(), source })?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(|source| RigError::Io { what: "installing the kit".into(), source })?;
        Self::find(rig)
    }
}

/// Pauses the guest and writes its state to `path`.
async fn save_state(qmp: &Qmp, path: &Path) -> Result<(), RigError> {
    let fail = |e: String| RigError::Failed(format!("saving the kit guest: {e}"));
    qmp.execute(&qapi::qmp::stop {}).await.map_err(|e| fail(e.to_string()))?;
    vmsnap::engine::ram::set_capabilities(qmp, false).await.map_err(|e| fail(e.to_string()))?;
    let mut events = qmp.subscribe().map_err(|e| fail(e.to_string()))?;
    qmp.execute_raw("migrate", Some(serde_json::json!({"uri": format!("file:{}", path.display())})), Duration::from_secs(10))
        .await
        .map_err(|e| fail(e.to_string()))?;
    vmsnap::engine::ram::wait_completed(qmp, &mut events, Duration::from_secs(300)).await.map_err(|e| fail(e.to_string()))
}

/// What the kit was made from: the rig's guest files and the QEMU that saved it.
pub(crate) fn stamp(rig: &Rig) -> Result<String, RigError> {
    let mut parts = Vec::new();
    for f in ["vmlinux", "initrd.gz", "data-template.qcow2"] {
        let meta = std::fs::metadata(rig.require(f)?).map_err(|source| RigError::Io { what: f.into(), source })?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        parts.push(format!("{f}:{}:{mtime}", meta.len()));
    }
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|source| RigError::Io { what: "qemu --version".into(), source })?;
    parts.push(String::from_utf8_lossy(&qemu.stdout).lines().next().unwrap_or_default().to_owned());
    parts.push(format!("mem:{KIT_MEMORY_MIB}"));
    Ok(parts.join("\n"))
}

/// Starts a guest from the kit on `disks` (copies of the kit's disks, e.g. on ZFS) and waits for
/// its agent.
pub async fn restore(rig: &Rig, kit: &ResumeKit, disks: Vec<PathBuf>) -> Result<TinyVm, RigError> {
    let opts = TinyVmOptions {
        memory_mib: KIT_MEMORY_MIB,
        disk_images: Some(disks),
        extra_args: vec!["-incoming".into(), "defer".into()],
        ..Default::default()
    };
    restore_state(rig, &opts, &kit.state()).await
}

/// Inside the OpenZFS VM: the kit's guest running on ZFS, its qcow2 disk copied to
/// `/<fs>/disk0.qcow2` (filesystem `fs`, mounted at `/<fs>`) and its raw disk written onto the
/// zvol `zvol` (both must exist, the zvol at least 64 MiB); the VM and its agent.
pub async fn restore_on_zfs(rig: &Rig, fs: &str, zvol: &str) -> Result<(TinyVm, Qga), RigError> {
    let kit = ResumeKit::find(rig)?;
    let (disk0, disk1) = (format!("/{fs}/disk0.qcow2"), format!("/dev/zvol/{zvol}"));
    host_cmd("cp", &[kit.disk0().to_str().expect("utf-8 path"), &disk0])?;
    let input = format!("if={}", kit.disk1().display());
    host_cmd("dd", &[&input, &format!("of={disk1}"), "bs=1M", "conv=fsync", "status=none"])?;
    let mut vm = restore(rig, &kit, vec![disk0.into(), disk1.into()]).await?;
    let qga = vm.machine.wait_agent(Duration::from_secs(300)).await?;
    Ok((vm, qga))
}

/// Starts QEMU with `-incoming defer` and feeds it `state` (a bare stream or a libvirt save
/// image, either compressed or not); resumes it.
pub async fn restore_state(rig: &Rig, opts: &TinyVmOptions, state: &Path) -> Result<TinyVm, RigError> {
    let fail = |e: String| RigError::Failed(format!("restoring {}: {e}", state.display()));
    let mut vm = TinyVm::start(rig, opts)?;
    let qmp = vm.machine.qmp().await?;
    vmsnap::engine::ram::set_capabilities(&qmp, false).await.map_err(|e| fail(e.to_string()))?;
    let mut events = qmp.subscribe().map_err(|e| fail(e.to_string()))?;
    // A vmsnap dump may be a libvirt save image, compressed or not: the product loads it.
    let feed = vmsnap::engine::ram::load(&qmp, state).await.map_err(|e| fail(e.to_string()))?;
    vmsnap::engine::ram::wait_completed(&qmp, &mut events, Duration::from_secs(900)).await.map_err(|e| fail(e.to_string()))?;
    if let Some(feed) = feed {
        feed.finish().await.map_err(|e| fail(format!("decompressing: {e}")))?;
    }
    let status = qmp.execute(&qapi::qmp::query_status {}).await.map_err(|e| fail(e.to_string()))?;
    if !status.running {
        qmp.execute(&qapi::qmp::cont {}).await.map_err(|e| fail(e.to_string()))?;
    }
    drop(qmp);
    Ok(vm)
}

/// A guest resumed from a RAM snapshot taken with `ram_quiesce` wakes frozen: thaws it the way
/// vmsnap does (fresh connections, retries, checked). True when it was frozen.
pub async fn thaw_if_frozen(qga_path: &Path) -> Result<bool, RigError> {
    use vmsnap::qemu::qga::{FreezeStatus, Qga, Timeouts};
    let fail = |e: String| RigError::Failed(format!("thawing the resumed guest: {e}"));
    let patient = Timeouts { sync: Duration::from_secs(60), other: Duration::from_secs(120), ..Timeouts::default() };
    let mut q = Qga::connect(qga_path, patient).await.map_err(|e| fail(e.to_string()))?;
    if q.freeze_status().await.map_err(|e| fail(e.to_string()))? != FreezeStatus::Frozen {
        return Ok(false);
    }
    drop(q);
    vmsnap::engine::recover::thaw(qga_path).await.map_err(fail)?;
    Ok(true)
}
