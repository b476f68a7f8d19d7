//! The OpenZFS VM: a Debian 12 rootfs with zfs-dkms built for its kernel, two empty 4 GiB pool disks
//! (`/dev/vdb`, `/dev/vdc`, by-id `virtio-pool1`, `virtio-pool2`), a host directory shared over
//! 9p on `/mnt/share`, through which tests hand it the binaries under test, and the rig directory
//! itself read-only on `/mnt/rig` (the tiny guest's kernel and initramfs for nested guests). Driven through its
//! guest agent. Each boot gets a fresh qcow2 overlay over the cached root image.

use super::machine::{Machine, ScratchDir};
use super::{host_cmd, Rig, RigError};
use std::path::Path;
use std::time::{Duration, Instant};
use vmsnap::qemu::qga::{ExecOutput, Qga};

#[derive(Debug)]
pub struct ZfsVm {
    pub machine: Machine,
    pub qga: Qga,
    pub boot_time: Duration,
}

impl ZfsVm {
    /// Boots the VM with `share` exported as `/mnt/share` and waits for its agent.
    pub async fn boot(rig: &Rig, share: &Path) -> Result<Self, RigError> {
        let t0 = Instant::now();
        let root_img = rig.require("zfsroot.img")?;
        let initrd = rig.require("zfsvm-initrd.img")?;
        let dir = ScratchDir::new("vmsnap-zfsvm")?;
        let p = |n: &str| dir.path().join(n).display().to_string();
        host_cmd("qemu-img", &["create", "-q", "-f", "qcow2", "-b", root_img.to_str().expect("utf-8"), "-F", "raw", &p("root.qcow2")])?;
        for pool in ["pool1.qcow2", "pool2.qcow2"] {
            host_cmd("qemu-img", &["create", "-q", "-f", "qcow2", &p(pool), "4G"])?;
        }
        let mut args: Vec<String> = vec![
            "-m".into(),
            "2048".into(),
            "-smp".into(),
            "2".into(),
            "-kernel".into(),
            rig.require("vmlinux")?.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            "root=/dev/vda rw init=/sbin/vmsnap-rig-init console=ttyS0 panic=-1".into(),
        ];
        for (i, (file, serial)) in [("root.qcow2", "root"), ("pool1.qcow2", "pool1"), ("pool2.qcow2", "pool2")].iter().enumerate() {
            args.push("-blockdev".into());
            args.push(format!("driver=file,filename={},node-name=d{i}-file", p(file)));
            args.push("-blockdev".into());
            args.push(format!("driver=qcow2,file=d{i}-file,node-name=d{i}"));
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=d{i},serial={serial}"));
        }
        args.push("-virtfs".into());
        args.push(format!("local,path={},mount_tag=share,security_model=none,id=share", share.display()));
        // The rig directory (tiny guest kernel, initramfs, disk template) for nested guests.
        args.push("-virtfs".into());
        args.push(format!("local,path={},mount_tag=rig,security_model=none,readonly=on,id=rig", rig.dir().display()));
        let mut machine = Machine::spawn("zfsvm", dir, args)?;
        let qga = machine.wait_agent(Duration::from_secs(180)).await?;
        Ok(Self { machine, qga, boot_time: t0.elapsed() })
    }

    /// Runs `argv` in the VM with `env` (`KEY=value`) and waits up to `timeout`.
    pub async fn run(&mut self, argv: &[&str], env: &[&str], timeout: Duration) -> Result<ExecOutput, RigError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let pid = self.qga.exec_start(argv[0], &argv[1..], env).await.map_err(|e| RigError::Failed(format!("guest-exec {argv:?}: {e}")))?;
        self.qga.exec_wait(pid, argv[0], deadline).await.map_err(|e| RigError::Failed(format!("{argv:?}: {e}")))
    }

    /// Runs a bash script in the VM; fails unless it exits 0.
    pub async fn sh(&mut self, script: &str) -> Result<String, RigError> {
        let out = self.run(&["/bin/bash", "-c", &format!("{{ {script}\n}} 2>&1")], &[], Duration::from_secs(120)).await?;
        if !out.success() {
            return Err(RigError::Failed(format!("in the ZFS VM: `{script}` exited {:?}: {}", out.exit_code, out.stdout_text())));
        }
        Ok(out.stdout_text())
    }
}
