//! The built-in demo: a tiny running VM whose two disks live on real ZFS (a qcow2 file on a
//! filesystem and a zvol) inside the rig's OpenZFS VM, snapshotted by the real `vmsnap` binary:
//! overlay, direct, and with RAM; verified, also by starting a scratch copy; a copy resumed from
//! the RAM beside it (`restore --as --resume`); then the VM resumed in place (`restore
//! --resume`). Run it with `scripts/demo`.
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
    // How its QEMU is started (what `vmsnap restore --resume` runs, with `-incoming defer`): the
    // demo VM's own command line, without the `-incoming` it was first started with.
    let mut start = vm.machine.argv().to_vec();
    start[0] = sh(&format!("command -v {}", start[0])).trim().to_owned();
    if let Some(i) = start.iter().position(|a| a == "-incoming") {
        start.drain(i..i + 2);
    }
    let start = start.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(",\n    ");
    let config = format!(
        "# written by the demo\nram_dir = \"/cheap/vmsnap-ram\"\n\n[domain.demo]\nqmp = \"{}\"\nqga = \"{}\"\ndisks = [\"/tank/vms/demo/disk0.qcow2\", \"/dev/zvol/tank/vms/demo-data\"]\nxml = \"/etc/vmsnap/demo.xml\"\nstart = [\n    {start},\n]\n",
        vm.machine.qmp_path.display(),
        vm.machine.qga_path.display()
    );
    std::fs::write("/etc/vmsnap/vmsnap.toml", &config).expect("config");
    println!("\n/etc/vmsnap/vmsnap.toml:\n{config}");
    let bin = vmsnap_bin();
    step("overlay snapshot", &[&bin, "snapshot", "demo", "--label", "demo1"]);
    step("direct snapshot", &[&bin, "snapshot", "demo", "--strategy", "direct", "--label", "demo2"]);
    // The guest's uptime just before the RAM snapshot: a guest resumed from it goes on from there.
    let at_snapshot = rt.block_on(uptime(&vm.machine.qga_path));
    step("RAM snapshot", &[&bin, "snapshot", "demo", "--memory", "--label", "demo3"]);
    step("list", &[&bin, "list", "demo"]);
    step("zfs list", &["zfs", "list", "-t", "snapshot", "-o", "name,vmsnap:consistency,vmsnap:freeze-ms,vmsnap:pause-ms", "-r", "tank"]);
    step("RAM dumps", &["ls", "-l", "/cheap/vmsnap-ram/demo"]);
    step("verify", &[&bin, "verify", "demo"]);

    let snap = sh("zfs list -H -t snapshot -o name -s createtxg tank/vms/demo | grep _demo3$").trim().to_owned();
    let name = snap.split('@').nth(1).expect("snapshot name").to_owned();

    // Proven by starting it: a scratch copy of the newest snapshot resumed from its RAM until its
    // agent answers, then removed.
    println!("\n== verify --boot: a scratch copy of {name} started from its RAM, beside the running VM");
    step("verify --boot", &[&bin, "verify", "demo", "--boot"]);

    // A second VM from the RAM snapshot, beside the original: clones, a [domain.demo-copy] in the
    // configuration, its QEMU started from the dump.
    println!("\n== a copy of the VM as it was at {name}, running beside it");
    step("restore --as --resume", &[&bin, "restore", "demo", &name, "--as", "demo-copy", "--resume"]);
    let cfg = vmsnap::config::Config::load(std::path::Path::new("/etc/vmsnap/vmsnap.toml")).expect("config");
    let copy = cfg.domains.get("demo-copy").expect("the copy's [domain.demo-copy]").clone();
    let (original, copied) =
        rt.block_on(async { (uptime(&vm.machine.qga_path).await, uptime(copy.qga.as_deref().expect("the copy's agent socket")).await) });
    println!(
        "both run: the original's guest uptime {original:.1} s, the copy's {copied:.1} s (it went on from the {at_snapshot:.1} s it read just before the snapshot: no reboot)"
    );
    step("list", &[&bin, "list", "demo"]);
    quit(&rt, &copy.qmp);

    // The VM stopped, then brought back in place from the RAM snapshot: its datasets rolled back,
    // the dump checked, its QEMU started from `start` with `-incoming defer` and fed the dump,
    // the guest thawed (it was saved frozen) and its clock set.
    let stopped_at = rt.block_on(uptime(&vm.machine.qga_path));
    vm.machine.kill();
    println!("\n== the demo VM stopped (guest uptime {stopped_at:.1} s); resuming it in place from {name}");
    let t = std::time::Instant::now();
    step("restore --resume", &[&bin, "restore", "demo", &name, "--resume"]);
    let after = rt.block_on(uptime(&vm.machine.qga_path));
    println!(
        "resumed in {:.1} s; guest uptime {after:.1} s: it went on from the {at_snapshot:.1} s it read just before the snapshot (no reboot; what it did after the snapshot went with the rollback)",
        t.elapsed().as_secs_f64()
    );
    quit(&rt, &vm.machine.qmp_path);
    println!(
        "\n== demo done: three consistent snapshots of a running VM, verified (also by starting a copy), a copy resumed from RAM beside it, and the VM resumed in place"
    );
}

/// Stops the QEMU on `qmp` (`quit`) and waits until it has gone.
fn quit(rt: &tokio::runtime::Runtime, qmp: &std::path::Path) {
    rt.block_on(async {
        if let Ok(q) = vmsnap::qemu::qmp::Qmp::connect(qmp, Duration::from_secs(10)).await {
            let _ = q.execute(&qapi::qmp::quit {}).await;
        }
    });
    for _ in 0..50 {
        if std::os::unix::net::UnixStream::connect(qmp).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
