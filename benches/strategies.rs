//! Benchmark: what the guest feels of a snapshot, per strategy, against the flow libvirt runs for
//! a non-live external snapshot with `--memspec` (the "seed" flow users script today).
//!
//! `cargo bench --bench strategies` (ZFS lane: runs inside the rig's OpenZFS VM on a nested guest
//! under write load). It takes N snapshots of each variant (`VMSNAP_BENCH_N`, default 3), round-robin
//! after a warm-up round, with
//! the real `vmsnap` binary and reads the guest-visible pause from QEMU's own STOP/RESUME event
//! timestamps (on a second QMP monitor) and the freeze window from vmsnap's report (agent freeze
//! call to thaw reply). It prints medians and ratios; every figure comes from this run.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;
use vmsnap::engine::ram;
use vmsnap::qemu::block::{file_node, qcow2_overlay_node};
use vmsnap::qemu::blockjob::BlockJob;
use vmsnap::qemu::qmp::Qmp;
use vmsnap_testkit::rig::lane::{sh, vmsnap_bin};
use vmsnap_testkit::rig::resume_kit;
use vmsnap_testkit::rig::Rig;
use vmsnap_testkit::support::median;

const FS: &str = "tank/vms/bench";
const ZVOL: &str = "tank/vms/bench-data";

fn main() {
    vmsnap_testkit::rig::lane::dispatch(inside);
}

struct Sample {
    pause_ms: f64,
    freeze_ms: f64,
    /// The part of the window the strategy itself takes: the overlay switch or the zfs snapshot.
    capture_ms: f64,
}

fn inside() {
    let n: usize = std::env::var("VMSNAP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh(&format!("zfs create -p {FS} && zfs create -V 64M {ZVOL} && udevadm settle"));
    let rig = Rig::locate().expect("rig");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut vm = rt.block_on(async {
        let (vm, mut qga) = resume_kit::restore_on_zfs(&rig, FS, ZVOL).await.expect("guest");
        // Write load for the whole run: 1 MiB rewritten and synced in a loop on each disk.
        qga.exec_start(
            "/bin/sh",
            &[
                "-c",
                "while :; do for d in vda vdb; do dd if=/dev/urandom of=/mnt/$d/load bs=64k count=16 conv=fsync 2>/dev/null; done; done",
            ],
            &[],
        )
        .await
        .expect("load");
        vm
    });
    std::fs::create_dir_all("/etc/vmsnap").unwrap();
    let config = format!(
        "[domain.bench]\nqmp = \"{}\"\nqga = \"{}\"\ndisks = [\"/{FS}/disk0.qcow2\", \"/dev/zvol/{ZVOL}\"]\n",
        vm.machine.qmp_path.display(),
        vm.machine.qga_path.display()
    );
    std::fs::write("/etc/vmsnap/bench.toml", config).unwrap();
    let observer = vm.machine.observer_path.clone();
    let qmp_path = vm.machine.qmp_path.clone();

    let variants: &[(&str, &[&str])] = &[
        ("overlay", &[]),
        ("direct", &["--strategy", "direct"]),
        ("overlay + RAM (background)", &["--memory", "background"]),
        ("direct + RAM (background)", &["--strategy", "direct", "--memory", "background"]),
        ("overlay + RAM (precopy)", &["--memory", "precopy"]),
    ];
    // Round-robin over the variants, after one unmeasured warm-up round: the first freezes of a
    // freshly restored nested guest are slower (TCG translating code paths it has not run yet),
    // and running each variant's samples back to back would charge that to whichever ran first.
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
    let mut label = 0;
    for round in 0..=n {
        for (k, (name, args)) in variants.iter().enumerate() {
            label += 1;
            let sample = rt.block_on(async {
                let obs = Qmp::connect(&observer, Duration::from_secs(10)).await.expect("observer");
                let mut events = obs.subscribe().expect("events");
                let l = format!("b{label}");
                let mut argv = vec!["--config", "/etc/vmsnap/bench.toml", "snapshot", "bench", "--json", "--label", &l];
                argv.extend_from_slice(args);
                let out = std::process::Command::new(vmsnap_bin()).args(&argv).output().expect("vmsnap");
                assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
                let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
                Sample {
                    pause_ms: ram::paused_ms(&mut events).await.unwrap_or(0.0),
                    freeze_ms: report["freeze_ms"].as_f64().unwrap_or(0.0),
                    capture_ms: capture_ms(&report),
                }
            });
            if round > 0 {
                samples[k].push(sample);
            }
        }
    }
    let mut results: Vec<(String, f64, f64, f64)> = variants
        .iter()
        .zip(&samples)
        .map(|((name, _), s)| {
            (
                name.to_string(),
                median(s.iter().map(|s| s.pause_ms).collect()),
                median(s.iter().map(|s| s.freeze_ms).collect()),
                median(s.iter().map(|s| s.capture_ms).collect()),
            )
        })
        .collect();
    // The baseline: libvirt's non-live external snapshot with --memspec, over QMP.
    let mut base = Vec::new();
    for i in 0..n {
        base.push(rt.block_on(baseline(&qmp_path, &observer, i)));
    }
    results.push(("baseline: stop, save RAM, overlay, cont (libvirt --memspec flow)".into(), median(base), 0.0, 0.0));
    vm.machine.kill();

    let base_pause = results.last().map(|r| r.1).unwrap_or(1.0).max(0.001);
    println!("\nvmsnap strategies, nested TCG guest under write load, N={n} each (medians)");
    println!("{:<66} {:>10} {:>10} {:>11} {:>15}", "variant", "pause ms", "freeze ms", "capture ms", "pause/baseline");
    for (name, pause, freeze, capture) in &results {
        println!("{name:<66} {pause:>10.1} {freeze:>10.1} {capture:>11.1} {:>15.3}", pause / base_pause);
    }
    let get = |k: &str| results.iter().find(|r| r.0 == k).map(|r| (r.1, r.2, r.3)).unwrap_or((0.0, 0.0, 0.0));
    let (o, d) = (get("overlay"), get("direct"));
    println!("\nfreeze window overlay/direct: {:.3}", o.1 / d.1.max(0.001));
    println!("capture inside the window (switch vs zfs snapshot), overlay/direct: {:.3}", o.2 / d.2.max(0.001));
    let (orb, drb) = (get("overlay + RAM (background)"), get("direct + RAM (background)"));
    println!("pause with RAM, overlay/direct: {:.3}", orb.0 / drb.0.max(0.001));
}

/// How long the in-window capture took, from the report's steps.
fn capture_ms(report: &serde_json::Value) -> f64 {
    let steps = report["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
    steps.iter().find(|s| s[0] == "switch" || s[0] == "zfs snapshot (in window)").and_then(|s| s[1].as_f64()).unwrap_or(0.0)
}

/// stop → migrate RAM to a file → overlays (blockdev-add + transaction) → cont → zfs snapshot →
/// active commit → cleanup. Returns the STOP→RESUME time.
async fn baseline(qmp_path: &Path, observer: &Path, i: usize) -> f64 {
    let obs = Qmp::connect(observer, Duration::from_secs(10)).await.expect("observer");
    let mut pauses = obs.subscribe().expect("events");
    let qmp = Qmp::connect(qmp_path, Duration::from_secs(10)).await.expect("qmp");
    vmsnap::engine::ram::set_capabilities(&qmp, false).await.expect("caps");
    let dir = Path::new("/var/lib/vmsnap-bench");
    std::fs::create_dir_all(dir).unwrap();
    let disks = [("disk0-fmt", format!("/{FS}/disk0.qcow2"), "qcow2"), ("disk1-fmt", format!("/dev/zvol/{ZVOL}"), "raw")];
    let mut events = qmp.subscribe().expect("events");
    qmp.execute(&qapi::qmp::stop {}).await.expect("stop");
    let dump = vmsnap::engine::ram::dump_path(dir, "baseline", &format!("b{i}"));
    let file = vmsnap::engine::ram::create_dump(&dump).expect("dump");
    vmsnap::engine::ram::start(&qmp, &file).await.expect("migrate");
    vmsnap::engine::ram::wait_completed(&qmp, &mut events, Duration::from_secs(600)).await.expect("dump done");
    let mut pairs = Vec::new();
    for (k, (node, path, fmt)) in disks.iter().enumerate() {
        let ov = dir.join(format!("ov{k}.qcow2"));
        let _ = std::fs::remove_file(&ov);
        sh(&format!("qemu-img create -q -f qcow2 -u -F {fmt} -b {path} {} 64M", ov.display()));
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&ov).unwrap();
        let set = qmp.add_fd(None, &format!("base-ov{k}"), f.as_fd()).await.expect("add-fd");
        qmp.blockdev_add(file_node(&format!("base-ov{k}-f"), &set.path())).await.expect("file node");
        qmp.blockdev_add(qcow2_overlay_node(&format!("base-ov{k}"), &format!("base-ov{k}-f"))).await.expect("overlay node");
        pairs.push((node.to_string(), format!("base-ov{k}")));
    }
    qmp.snapshot_transaction(&pairs).await.expect("transaction");
    qmp.execute(&qapi::qmp::cont {}).await.expect("cont");
    sh(&format!("zfs snapshot {FS}@base{i} {ZVOL}@base{i}"));
    for (k, (node, _)) in pairs.iter().enumerate() {
        let job =
            BlockJob::start_active_commit(&qmp, &format!("base-commit{k}"), &format!("base-ov{k}"), Some(node)).await.expect("commit");
        job.finish(Duration::from_secs(600)).await.expect("commit done");
        qmp.blockdev_del(&format!("base-ov{k}")).await.expect("del");
        qmp.blockdev_del(&format!("base-ov{k}-f")).await.expect("del file");
    }
    for set in qmp.execute(&qapi::qmp::query_fdsets {}).await.expect("fdsets") {
        qmp.remove_fd(set.fdset_id).await.expect("remove-fd");
    }
    let _ = std::fs::remove_file(dump);
    drop(qmp);
    ram::paused_ms(&mut pauses).await.unwrap_or(0.0)
}
