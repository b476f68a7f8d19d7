//! Benchmark: a snapshot with RAM of a libvirt-managed guest, vmsnap against the flow users
//! script with libvirt today — `virsh snapshot-create-as --memspec … --diskspec … --atomic`,
//! `zfs snapshot`, then `virsh blockcommit --active --pivot` per disk — on real libvirtd.
//!
//! `cargo bench --bench libvirt_baseline` (libvirt lane: inside the rig's OpenZFS VM, the libvirt
//! kit's enrolled domain restored onto two datasets, under write load). N rounds of each variant
//! (`VMSNAP_BENCH_N`, default 3), round-robin after a warm-up round. The guest-visible pause is
//! read from QEMU's own STOP/RESUME event timestamps on vmsnap's QMP socket (an observer during
//! the libvirt flow; vmsnap's report, from the same events, for vmsnap); the total is the wall
//! time of the whole flow, merge included. It prints medians and ratios to the libvirt flow;
//! every figure comes from this run.

use std::path::Path;
use std::time::{Duration, Instant};
use vmsnap::engine::ram;
use vmsnap::qemu::qmp::Qmp;
use vmsnap_testkit::rig::lane::{sh, vmsnap_bin};
use vmsnap_testkit::rig::libvirt::{self, virsh, LibvirtKit, Libvirtd, DOMAIN};
use vmsnap_testkit::rig::Rig;
use vmsnap_testkit::support::median;

const FS: &str = "tank/vms/lv";
const DATA: &str = "tank/vms/lv-data";
const CONFIG: &str = "/etc/vmsnap/bench.toml";

fn main() {
    vmsnap_testkit::rig::lane::dispatch_libvirt(inside);
}

#[derive(Clone, Copy)]
enum Variant {
    /// libvirt's non-live external snapshot with --memspec, then zfs snapshot and blockcommit.
    Libvirt,
    /// vmsnap with RAM as libvirt runs QEMU by default (no userfaultfd: precopy).
    VmsnapPrecopy,
    /// vmsnap with RAM, background-snapshot (`vm.unprivileged_userfaultfd = 1`).
    VmsnapBackground,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Libvirt => "libvirt: snapshot-create-as --memspec, zfs snapshot, blockcommit --pivot",
            Variant::VmsnapPrecopy => "vmsnap --memory precopy",
            Variant::VmsnapBackground => "vmsnap --memory background (unprivileged_userfaultfd=1)",
        }
    }
}

struct Sample {
    pause_ms: f64,
    total_ms: f64,
}

fn inside() {
    let n: usize = std::env::var("VMSNAP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh(&format!("zfs create -p {FS} && zfs create {DATA} && zfs create tank/ram"));
    sh(&format!("mkdir -p {0} && cp /mnt/rig/vmlinux /mnt/rig/initrd.gz {0}/", libvirt::IMAGES));
    let _libvirtd = Libvirtd::start(Duration::from_secs(900)).expect("libvirtd");
    let kit = LibvirtKit::find(&Rig::locate().expect("rig")).expect("libvirt kit");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (disk0, disk1) = (format!("/{FS}/disk0.qcow2"), format!("/{DATA}/disk1.raw"));
    rt.block_on(async {
        libvirt::restore(&kit, disk0.as_ref(), disk1.as_ref()).await.expect("restoring the domain");
        let (_, qga) = vmsnap::libvirt::enroll::sockets(DOMAIN);
        let mut qga = libvirt::wait_agent(&qga, Duration::from_secs(60)).await.expect("agent");
        // Write load for the whole run: 1 MiB rewritten and synced in a loop on each disk.
        let load = "while :; do for d in vda vdb; do dd if=/dev/urandom of=/mnt/$d/load bs=64k count=16 conv=fsync 2>/dev/null; done; done";
        qga.exec_start("/bin/sh", &["-c", load], &[]).await.expect("load");
    });
    let (qmp, qga) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    std::fs::create_dir_all("/etc/vmsnap").unwrap();
    std::fs::write(
        CONFIG,
        format!("[domain.{DOMAIN}]\nqmp = \"{}\"\nqga = \"{}\"\ndisks = [\"{disk0}\", \"{disk1}\"]\n", qmp.display(), qga.display()),
    )
    .unwrap();

    let variants = [Variant::Libvirt, Variant::VmsnapPrecopy, Variant::VmsnapBackground];
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
    let mut label = 0;
    for round in 0..=n {
        for (k, v) in variants.iter().enumerate() {
            label += 1;
            let sample = rt.block_on(run(*v, label, &qmp));
            eprintln!("round {round} {}: pause {:.1} ms, total {:.1} ms", v.name(), sample.pause_ms, sample.total_ms);
            if round > 0 {
                samples[k].push(sample);
            }
        }
    }
    let _ = virsh(&["destroy", DOMAIN]);

    let results: Vec<(&str, f64, f64)> = variants
        .iter()
        .zip(&samples)
        .map(|(v, s)| (v.name(), median(s.iter().map(|s| s.pause_ms).collect()), median(s.iter().map(|s| s.total_ms).collect())))
        .collect();
    let (base_pause, base_total) = (results[0].1.max(0.001), results[0].2.max(0.001));
    println!("\nsnapshot with RAM of a libvirt-managed nested TCG guest under write load, N={n} each (medians)");
    println!("{:<76} {:>9} {:>10} {:>15} {:>15}", "variant", "pause ms", "total ms", "pause/libvirt", "total/libvirt");
    for (name, pause, total) in &results {
        println!("{name:<76} {pause:>9.1} {total:>10.1} {:>15.3} {:>15.3}", pause / base_pause, total / base_total);
    }
}

async fn run(v: Variant, label: usize, qmp_path: &Path) -> Sample {
    match v {
        Variant::Libvirt => {
            let obs = Qmp::connect(qmp_path, Duration::from_secs(30)).await.expect("observer on vmsnap's QMP socket");
            let mut pauses = obs.subscribe().expect("events");
            let t = Instant::now();
            libvirt_flow(label).await;
            let total_ms = t.elapsed().as_secs_f64() * 1e3;
            Sample { pause_ms: ram::paused_ms(&mut pauses).await.unwrap_or(0.0), total_ms }
        }
        Variant::VmsnapPrecopy | Variant::VmsnapBackground => {
            let background = matches!(v, Variant::VmsnapBackground);
            sh(&format!("echo {} > /proc/sys/vm/unprivileged_userfaultfd", u8::from(background)));
            let l = format!("b{label}");
            let mode = if background { "background" } else { "precopy" };
            let t = Instant::now();
            let out = tokio::process::Command::new(vmsnap_bin())
                .args(["--config", CONFIG, "snapshot", DOMAIN, "--local", "--json", "--label", &l, "--memory", mode])
                .output()
                .await
                .expect("vmsnap");
            let total_ms = t.elapsed().as_secs_f64() * 1e3;
            assert!(out.status.success(), "{}: {}", v.name(), String::from_utf8_lossy(&out.stderr));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
            assert!(report["warnings"].as_array().is_some_and(Vec::is_empty) || !background, "{report}");
            // Where the time went (stderr, next to the round's line): the report's steps and the
            // pause's phases.
            eprintln!("  {mode} steps (ms): {}", report["steps"]);
            eprintln!("  {mode} pause phases (µs): {}", report["pause_phases"]);
            sh(&format!("rm -f {}", report["ram_dump"].as_str().unwrap_or("/nonexistent")));
            Sample { pause_ms: report["pause_ms"].as_f64().unwrap_or(0.0), total_ms }
        }
    }
}

/// What a user's script runs with libvirt: an external snapshot of RAM and both disks, the zfs
/// snapshot of the datasets, then each disk committed back and pivoted, overlays and RAM removed.
async fn libvirt_flow(label: usize) {
    let name = format!("lv{label}");
    let (ov0, ov1, mem) = (format!("/{FS}/{name}-0.qcow2"), format!("/{DATA}/{name}-1.qcow2"), format!("/tank/ram/{name}.mem"));
    let args = [
        "snapshot-create-as".to_owned(),
        DOMAIN.to_owned(),
        "--name".to_owned(),
        name.clone(),
        "--no-metadata".to_owned(),
        "--atomic".to_owned(),
        "--memspec".to_owned(),
        format!("file={mem},snapshot=external"),
        "--diskspec".to_owned(),
        format!("vda,snapshot=external,file={ov0}"),
        "--diskspec".to_owned(),
        format!("vdb,snapshot=external,file={ov1}"),
    ];
    virsh_async(&args).await;
    sh(&format!("zfs snapshot {FS}@{name} {DATA}@{name}"));
    for disk in ["vda", "vdb"] {
        virsh_async(&["blockcommit", DOMAIN, disk, "--active", "--pivot", "--wait"].map(str::to_owned)).await;
    }
    sh(&format!("rm -f {ov0} {ov1} {mem}"));
}

/// virsh without blocking the runtime (the observer's QMP connection keeps reading events).
async fn virsh_async(args: &[String]) {
    let out = tokio::process::Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().await.expect("running virsh");
    assert!(out.status.success(), "virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
