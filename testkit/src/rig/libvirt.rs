//! Real libvirtd for the libvirt lane: starting and stopping Debian's `virtlogd` + `libvirtd` by
//! hand (no systemd in the rig's machines), `virsh` as a vector of arguments, and the libvirt
//! kit — an enrolled tiny domain saved with `virsh save`, so the OpenZFS VM can `virsh restore`
//! it in a minute instead of booting it under nested TCG for six.
//!
//! The kit is built on the host (plain TCG: the boot takes seconds) by [`LibvirtKit::ensure`]:
//! define the domain, enrol it with the real `vmsnap enroll` (its `virsh dumpxml`/`define`
//! plumbing on a real libvirtd), start it, wait for the agent on vmsnap's own socket, `sync`,
//! `virsh save`, and keep the save file with both disks as they were at that moment. Kernel,
//! initramfs and disks live under [`IMAGES`] on both sides, so the saved definition is valid in
//! the OpenZFS VM too; only the disk paths change at restore (`virsh restore --xml`).

use super::{host_cmd, Rig, RigError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmsnap::qemu::qga::{Qga, Timeouts};

/// Where the kit domain's kernel, initramfs, console log and (on the host) disks are.
pub const IMAGES: &str = "/var/lib/libvirt/images/vmsnap-rig";
/// The kit domain's name.
pub const DOMAIN: &str = "lvguest";
const KIT_DIR: &str = "libvirt-kit";
const URI: &str = "qemu:///system";
const LIBVIRTD_PID: &str = "/run/vmsnap-rig-libvirtd.pid";
const VIRTLOGD_PID: &str = "/run/vmsnap-rig-virtlogd.pid";

/// Runs `virsh -c qemu:///system ARGS`; its stdout, or an error with its stderr.
pub fn virsh(args: &[&str]) -> Result<String, RigError> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .map_err(|source| RigError::Io { what: "running virsh".into(), source })?;
    if !out.status.success() {
        return Err(RigError::Failed(format!("virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A libvirtd this process started (stopped on drop), or one that was already running (left
/// alone).
#[derive(Debug)]
pub struct Libvirtd {
    started: bool,
}

impl Libvirtd {
    /// Starts virtlogd and libvirtd unless a libvirtd answers already, and waits until `virsh`
    /// connects (the first connection probes QEMU's capabilities: seconds on the host, a minute
    /// or more under nested TCG). A libvirt hook must be in place before this.
    pub fn start(timeout: Duration) -> Result<Self, RigError> {
        if virsh(&["version"]).is_ok() {
            return Ok(Self { started: false });
        }
        if !pid_alive(VIRTLOGD_PID) {
            host_cmd("virtlogd", &["-d", "-p", VIRTLOGD_PID])?;
        }
        host_cmd("libvirtd", &["-d", "-p", LIBVIRTD_PID])?;
        let t = Instant::now();
        loop {
            match virsh(&["version"]) {
                Ok(_) => return Ok(Self { started: true }),
                Err(e) if t.elapsed() > timeout => {
                    return Err(RigError::Failed(format!("libvirtd did not answer within {timeout:?}: {e}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Stops libvirtd (SIGTERM, then waits for it to exit). Running domains keep running; the
    /// next start reconnects to them (`reconnect` hook).
    pub fn stop(&mut self) -> Result<(), RigError> {
        let pid = read_pid(LIBVIRTD_PID).ok_or_else(|| RigError::Failed(format!("no libvirtd pid in {LIBVIRTD_PID}")))?;
        signal(pid, nix::sys::signal::Signal::SIGTERM)?;
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            if t.elapsed() > Duration::from_secs(60) {
                return Err(RigError::Failed(format!("libvirtd (pid {pid}) did not exit on SIGTERM")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.started = false;
        Ok(())
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if self.started {
            let _ = self.stop();
            if let Some(pid) = read_pid(VIRTLOGD_PID) {
                let _ = signal(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<(), RigError> {
    let pid = i32::try_from(pid).map_err(|_| RigError::Failed(format!("pid {pid} out of range")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| RigError::Failed(format!("kill {pid}: {e}")))
}

fn read_pid(file: &str) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn pid_alive(file: &str) -> bool {
    read_pid(file).is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// The kit domain's definition before enrolment: 384 MiB, the rig's kernel booted directly, a
/// qcow2 disk and a raw disk, libvirt's own agent channel (which enrolment replaces).
pub fn domain_xml() -> String {
    format!(
        "<domain type='qemu'>
  <name>{DOMAIN}</name>
  <uuid>5e1f0d1c-8a53-4b1e-9a3c-6c0e2b7d9f41</uuid>
  <memory unit='MiB'>384</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{IMAGES}/vmlinux</kernel>
    <initrd>{IMAGES}/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{IMAGES}/disk0.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{IMAGES}/disk1.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{IMAGES}/console.log'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"
    )
}

/// The files of a libvirt kit.
#[derive(Debug, Clone)]
pub struct LibvirtKit {
    pub dir: PathBuf,
}

impl LibvirtKit {
    /// `virsh save` output: libvirt's header, the enrolled live XML, QEMU's migration stream.
    pub fn save_file(&self) -> PathBuf {
        self.dir.join("domain.save")
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
        super::require_all(&[kit.save_file(), kit.disk0(), kit.disk1()])?;
        Ok(kit)
    }

    /// Builds the kit unless one made from the current rig files, libvirt and definition exists
    /// (host only). `vmsnap` is the binary whose `enroll` edits the definition.
    pub async fn ensure(rig: &Rig, vmsnap: &Path) -> Result<Self, RigError> {
        let dir = rig.dir().join(KIT_DIR);
        let stamp = stamp(rig)?;
        if std::fs::read_to_string(dir.join("stamp")).ok().as_deref() == Some(stamp.as_str()) {
            return Self::find(rig);
        }
        let libvirtd = Libvirtd::start(Duration::from_secs(120))?;
        let built = build(rig, vmsnap, &dir, &stamp).await;
        let _ = virsh(&["destroy", DOMAIN]);
        let _ = virsh(&["undefine", DOMAIN]);
        drop(libvirtd);
        built?;
        Self::find(rig)
    }
}

async fn build(rig: &Rig, vmsnap: &Path, dir: &Path, stamp: &str) -> Result<(), RigError> {
    let fail = |what: &str, e: String| RigError::Failed(format!("building the libvirt kit: {what}: {e}"));
    let images = Path::new(IMAGES);
    let _ = std::fs::remove_dir_all(images);
    std::fs::create_dir_all(images).map_err(|source| RigError::Io { what: IMAGES.into(), source })?;
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    for f in ["vmlinux", "initrd.gz"] {
        host_cmd("cp", &[&s(&rig.require(f)?), IMAGES])?;
    }
    let template = s(&rig.require("data-template.qcow2")?);
    host_cmd("cp", &[&template, &s(&images.join("disk0.qcow2"))])?;
    host_cmd("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &template, &s(&images.join("disk1.raw"))])?;
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN]);
    let xml = images.join("domain.xml");
    std::fs::write(&xml, domain_xml()).map_err(|source| RigError::Io { what: "domain xml".into(), source })?;
    virsh(&["define", &s(&xml)])?;
    // The real enrolment, with a throw-away state directory for its backup.
    let state = super::ScratchDir::new("vmsnap-lvkit")?;
    let config = state.path().join("vmsnap.toml");
    std::fs::write(&config, format!("state_dir = \"{}\"\n", state.path().display()))
        .map_err(|source| RigError::Io { what: "kit config".into(), source })?;
    let out = Command::new(vmsnap)
        .args(["--config", &s(&config), "enroll", DOMAIN])
        .env("LIBVIRT_DEFAULT_URI", URI)
        .output()
        .map_err(|source| RigError::Io { what: "running vmsnap enroll".into(), source })?;
    if !out.status.success() {
        return Err(fail("vmsnap enroll", String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    virsh(&["start", DOMAIN])?;
    let (_, qga_path) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    let mut qga = wait_agent(&qga_path, Duration::from_secs(120)).await.map_err(|e| fail("the agent on vmsnap's socket", e))?;
    qga.sh("sync", Duration::from_secs(30)).await.map_err(|e| fail("sync", e.to_string()))?;
    drop(qga);
    let tmp = rig.dir().join(format!("{KIT_DIR}.new"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| RigError::Io { what: "kit dir".into(), source })?;
    virsh(&["save", DOMAIN, &s(&tmp.join("domain.save"))])?;
    for f in ["disk0.qcow2", "disk1.raw"] {
        host_cmd("cp", &["--sparse=always", &s(&images.join(f)), &s(&tmp)])?;
    }
    std::fs::write(tmp.join("stamp"), stamp).map_err(|source| RigError::Io { what: "kit stamp".into(), source })?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|source| RigError::Io { what: "installing the libvirt kit".into(), source })?;
    Ok(())
}

/// Restores the kit's domain on copies of its disks at `disk0` (qcow2) and `disk1` (raw), e.g.
/// on ZFS (the saved RAM must meet the disks it was saved with), and waits for its agent on
/// vmsnap's socket. The hooks run as for any start.
pub async fn restore(kit: &LibvirtKit, disk0: &Path, disk1: &Path) -> Result<(), RigError> {
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    host_cmd("cp", &["--sparse=always", &s(&kit.disk0()), &s(disk0)])?;
    host_cmd("cp", &["--sparse=always", &s(&kit.disk1()), &s(disk1)])?;
    let saved = s(&kit.save_file());
    let xml = virsh(&["save-image-dumpxml", &saved])?
        .replace(&format!("{IMAGES}/disk0.qcow2"), &s(disk0))
        .replace(&format!("{IMAGES}/disk1.raw"), &s(disk1));
    let edited = super::ScratchDir::new("vmsnap-restore")?;
    let xml_path = edited.path().join("domain.xml");
    std::fs::write(&xml_path, xml).map_err(|source| RigError::Io { what: "restore xml".into(), source })?;
    virsh(&["restore", &saved, "--xml", &s(&xml_path)])?;
    let (_, qga) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    wait_agent(&qga, Duration::from_secs(300)).await.map_err(RigError::Failed)?;
    Ok(())
}

/// Connects to a guest agent socket, retrying until it answers a ping or `timeout` passes.
pub async fn wait_agent(path: &Path, timeout: Duration) -> Result<Qga, String> {
    let probe = Timeouts { sync: Duration::from_secs(3), other: Duration::from_secs(180), ..Timeouts::default() };
    let t = Instant::now();
    loop {
        let attempt = async {
            let mut qga = Qga::connect(path, probe).await?;
            qga.ping().await?;
            Ok::<Qga, vmsnap::qemu::qga::QgaError>(qga)
        }
        .await;
        match attempt {
            Ok(q) => return Ok(q),
            Err(e) if t.elapsed() > timeout => return Err(format!("{}: no agent within {timeout:?}: {e}", path.display())),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// What the kit was made from: the resume kit's inputs, libvirt's version, the definition and
/// vmsnap's enrolment of it.
fn stamp(rig: &Rig) -> Result<String, RigError> {
    let libvirt = Command::new("libvirtd")
        .arg("--version")
        .output()
        .map_err(|source| RigError::Io { what: "libvirtd --version (is libvirt-daemon-system installed?)".into(), source })?;
    let enrolled = vmsnap::libvirt::enroll::enroll_xml(&domain_xml()).map_err(RigError::Failed)?;
    Ok(format!("{}\n{}\n{}", super::resume_kit::stamp(rig)?, String::from_utf8_lossy(&libvirt.stdout).trim(), enrolled.xml))
}
