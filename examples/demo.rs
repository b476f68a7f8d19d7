//! The built-in demo: a tiny running VM whose two disks live on real ZFS (a qcow2 file on a
//! filesystem and a zvol) inside the rig's OpenZFS VM, snapshotted by the real `vmsnap` binary:
//! overlay, direct, and with RAM, then a resume from that RAM. Run it with `scripts/demo`.
//!
//! Everything happens inside the OpenZFS VM (OpenZFS does not load on this host's kernel); the
//! output is printed when the run there ends.

use std::process::Command;
use std::time::Duration;
use vmsnap_testkit::rig::lane::{self, sh, vmsnap_bin};
use vmsnap_testkit::rig::resume_kit;
use vmsnap_testkit::rig::Rig;

fn main() {
    lane::dispatch(inside);
}

fn step(title: &str, argv: &[&str]) {
    println!("\n$ {}", argv.join(" "));
    let out = Command::new(argv[0]).args(&argv[1..]).output().expect("run");
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        println!("({title} failed: {})", out.status);
        std::process::exit(1);
    }
}

async fn uptime(qga: &std::path::Path) -> f64 {
    let mut qga = vmsnap::qemu::qga::Qga::connect(qga, Default::default()).await.expect("agent");
    let out = qga.sh("cut -d' ' -f1 /proc/uptime", Duration::from_secs(120)).await.expect("uptime");
    out.stdout_text().trim().parse().unwrap_or(0.0)
}

fn inside() {
    println!("== vmsnap demo, inside the OpenZFS VM ({})", sh("zfs version | head -1").trim());
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh("zpool create -f -O mountpoint=/cheap cheap /dev/disk/by-id/virtio-pool2");
    sh("zfs create -p tank/vms/demo && zfs create -V 64M tank/vms/demo-data && udevadm settle");
    let rig = Rig::locate().expect("rig files on /mnt/rig");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut vm = rt.block_on(async {
        let (vm, mut qga) = resume_kit::restore_on_zfs(&rig, "tank/vms/demo", "tank/vms/demo-data").await.expect("starting the demo VM");
        qga.exec_start("/bin/sh", &["-c", "i=0; while :; do i=$((i+1)); echo $i > /mnt/vda/counter; sleep 0.2; done"], &[])
            .await
            .expect("writer");
        vm
    });
    println!(
        "demo VM running (QMP {}, agent {}), disks on tank/vms/demo and the zvol tank/vms/demo-data",
        vm.machine.qmp_path.display(),
        vm.machine.qga_path.display()
    );
    std::fs::create_dir_all("/etc/vmsnap").expect("config dir");
    std::fs::write("/etc/vmsnap/demo.xml", "<domain type='qemu'><name>demo</name></domain>\n").expect("xml");
    let config = format!(
        "# written by the demo\nram_dir = \"/cheap/vmsnap-ram\"\n\n[domain.demo]\nqmp = \"{}\"\nqga = \"{}\"\ndisks = [\"/tank/vms/demo/disk0.qcow2\", \"/dev/zvol/tank/vms/demo-data\"]\nxml = \"/etc/vmsnap/demo.xml\"\n",
        vm.machine.qmp_path.display(),
        vm.machine.qga_path.display()
    );
    std::fs::write("/etc/vmsnap/vmsnap.toml", &config).expect("config");
    println!("\n/etc/vmsnap/vmsnap.toml:\n{config}");
    let bin = vmsnap_bin();
    step("overlay snapshot", &[&bin, "snapshot", "demo", "--label", "demo1"]);
    step("direct snapshot", &[&bin, "snapshot", "demo", "--strategy", "direct", "--label", "demo2"]);
    step("RAM snapshot", &[&bin, "snapshot", "demo", "--memory", "--label", "demo3"]);
    step("list", &[&bin, "list", "demo"]);
    step("zfs list", &["zfs", "list", "-t", "snapshot", "-o", "name,vmsnap:consistency,vmsnap:freeze-ms,vmsnap:pause-ms", "-r", "tank"]);
    step("RAM dumps", &["ls", "-l", "/cheap/vmsnap-ram/demo"]);
    step("verify", &[&bin, "verify", "demo"]);

    // Resume from the RAM snapshot: clones of its datasets, a fresh QEMU fed the dump.
    let snap = sh("zfs list -H -t snapshot -o name -s createtxg tank/vms/demo | grep _demo3$").trim().to_owned();
    let name = snap.split('@').nth(1).expect("snapshot name").to_owned();
    let dump = sh(&format!("zfs get -H -o value vmsnap:ram-dump {snap}")).trim().to_owned();
    println!("\n== resuming {name} from {dump} on clones of the snapshot");
    sh(&format!("zfs clone tank/vms/demo@{name} tank/resumed && zfs clone tank/vms/demo-data@{name} tank/resumed-data && udevadm settle"));
    let before = rt.block_on(uptime(&vm.machine.qga_path));
    vm.machine.kill();
    rt.block_on(async {
        let opts = vmsnap_testkit::rig::TinyVmOptions {
            memory_mib: resume_kit::KIT_MEMORY_MIB,
            disk_images: Some(vec!["/tank/resumed/disk0.qcow2".into(), "/dev/zvol/tank/resumed-data".into()]),
            extra_args: vec!["-incoming".into(), "defer".into()],
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let mut resumed = resume_kit::restore_state(&rig, &opts, std::path::Path::new(&dump)).await.expect("resuming");
        resumed.machine.wait_agent(Duration::from_secs(300)).await.expect("resumed agent");
        // The snapshot froze the guest around its pause (ram_quiesce): it wakes frozen.
        if resume_kit::thaw_if_frozen(&resumed.machine.qga_path).await.expect("thawing") {
            println!("the resumed guest woke frozen, as the snapshot left it (ram_quiesce); thawed it");
        }
        let after = uptime(&resumed.machine.qga_path).await;
        println!(
            "resumed in {:.1} s; guest uptime {after:.1} s (the original read {before:.1} s before it was stopped): it did not reboot",
            t.elapsed().as_secs_f64()
        );
        resumed.machine.kill();
    });
    sh("zfs destroy tank/resumed && zfs destroy tank/resumed-data");

    // Back in place: the stopped domain's datasets rolled back to the first snapshot as one unit.
    let first = sh("zfs list -H -t snapshot -o name -s createtxg tank/vms/demo | grep _demo1$").trim().to_owned();
    let first = first.split('@').nth(1).expect("snapshot name").to_owned();
    println!("\n== restoring the stopped demo domain to {first}, in place");
    step("restore plan", &[&bin, "restore", "demo", &first, "--destroy-newer", "--dry-run"]);
    step("restore", &[&bin, "restore", "demo", &first, "--destroy-newer"]);
    step("list", &[&bin, "list", "demo"]);
    println!("\n== demo done: three consistent snapshots of a running VM, verified, a resume from RAM, and a restore in place");
}
