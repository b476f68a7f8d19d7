//! The tiny guest: Debian's kernel booted through PVH, a busybox initramfs, the real qemu-ga, and
//! one or more qcow2 data disks that the guest mounts as ext4 on `/mnt/vda`, `/mnt/vdb`, ...
//! Disk `i` has QMP node names `disk{i}-file` (protocol) and `disk{i}-fmt` (qcow2), device `vd{i}`.

use super::machine::{Machine, ScratchDir};
use super::{host_cmd, Rig, RigError};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmsnap::qemu::qga::Qga;
use vmsnap::qemu::qmp::Qmp;

#[derive(Debug, Clone)]
pub struct TinyVmOptions {
    pub disks: usize,
    pub memory_mib: u32,
    /// Extra QEMU arguments (e.g. `-incoming defer`).
    pub extra_args: Vec<String>,
    /// Use these disk images instead of fresh copies of the template: `.raw` files and paths
    /// under `/dev` (zvols) are raw, other files qcow2 images.
    pub disk_images: Option<Vec<PathBuf>>,
}

impl Default for TinyVmOptions {
    fn default() -> Self {
        Self { disks: 1, memory_mib: 512, extra_args: Vec::new(), disk_images: None }
    }
}

/// A booted tiny guest.
#[derive(Debug)]
pub struct TinyVm {
    pub machine: Machine,
    pub disks: Vec<PathBuf>,
}

impl TinyVm {
    /// Starts the guest; does not wait for it (see [`TinyVm::boot`]).
    pub fn start(rig: &Rig, opts: &TinyVmOptions) -> Result<Self, RigError> {
        let dir = ScratchDir::new("vmsnap-tiny")?;
        let disks: Vec<PathBuf> = match &opts.disk_images {
            Some(images) => images.clone(),
            None => {
                let template = rig.require("data-template.qcow2")?;
                (0..opts.disks)
                    .map(|i| {
                        let p = dir.path().join(format!("disk{i}.qcow2"));
                        host_cmd("cp", &["--sparse=always", template.to_str().expect("utf-8 path"), p.to_str().expect("utf-8 path")])?;
                        Ok(p)
                    })
                    .collect::<Result<_, RigError>>()?
            }
        };
        let mut args: Vec<String> = vec![
            "-m".into(),
            opts.memory_mib.to_string(),
            "-smp".into(),
            "1".into(),
            "-kernel".into(),
            rig.require("vmlinux")?.display().to_string(),
            "-initrd".into(),
            rig.require("initrd.gz")?.display().to_string(),
            "-append".into(),
            "console=ttyS0 panic=-1 quiet".into(),
        ];
        for (i, disk) in disks.iter().enumerate() {
            // A block device (a zvol) or a `.raw` file is a raw disk; any other file a qcow2 image.
            let (protocol, format) = if disk.starts_with("/dev") {
                ("host_device", "raw")
            } else if disk.extension().is_some_and(|e| e == "raw") {
                ("file", "raw")
            } else {
                ("file", "qcow2")
            };
            args.push("-blockdev".into());
            args.push(format!("driver={protocol},filename={},node-name=disk{i}-file,cache.direct=off", disk.display()));
            args.push("-blockdev".into());
            args.push(format!("driver={format},file=disk{i}-file,node-name=disk{i}-fmt"));
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=disk{i}-fmt,id=vd{i}"));
        }
        args.extend(opts.extra_args.iter().cloned());
        let machine = Machine::spawn("tiny", dir, args)?;
        Ok(Self { machine, disks })
    }

    /// Starts the guest and waits for its agent; the QMP and agent connections and the boot time.
    pub async fn boot(rig: &Rig, opts: &TinyVmOptions) -> Result<(Self, Qmp, Qga, Duration), RigError> {
        let t0 = Instant::now();
        let mut vm = Self::start(rig, opts)?;
        let qmp = vm.machine.qmp().await?;
        let qga = vm.machine.wait_agent(Duration::from_secs(60)).await?;
        Ok((vm, qmp, qga, t0.elapsed()))
    }
}
