//! Benchmark: a RAM dump checksummed by vmsnap in flight — streamed through its pipe (→ file,
//! optionally zstd: precopy and compressed dumps) or hashed behind QEMU writing the file (raw
//! background dumps) — against QEMU writing the file directly, and against the flow before
//! streaming (QEMU writes the file, then vmsnap reads it back for the checksum).
//!
//! `cargo bench --bench ramdump`: host lane, a tiny guest under TCG whose RAM holds
//! `VMSNAP_BENCH_FILL_MIB` (default 600) MiB, half random bytes, half repeated text, so neither
//! QEMU nor zstd can skip it, dumps in `/var/tmp`. `VMSNAP_BENCH_LANE=zfs cargo bench --bench
//! ramdump`: ZFS lane, inside the OpenZFS VM, the nested guest of the engine lane (384 MiB,
//! default fill 160 MiB), dumps on an OpenZFS file system. The guest is paused for every sample
//! so each dump is the same one-pass copy; migration bandwidth is unlimited for all variants. N
//! samples per variant (`VMSNAP_BENCH_N`, default 3), round-robin after a warm-up round. Each
//! sample ends when the dump is synced to disk and its checksum is known. Prints medians and
//! ratios from this run.

use std::path::Path;
use std::time::{Duration, Instant};
use vmsnap::engine::{ram, ramstream};
use vmsnap::model::RamCompress;
use vmsnap::qemu::qga::{Qga, Timeouts};
use vmsnap::qemu::qmp::Qmp;
use vmsnap_testkit::rig::lane::sh;
use vmsnap_testkit::rig::resume_kit::{self, KIT_MEMORY_MIB};
use vmsnap_testkit::rig::{Rig, TinyVm, TinyVmOptions};
use vmsnap_testkit::support::{median, rt};

#[derive(Clone, Copy)]
enum Variant {
    /// QEMU writes the file (fd passed with getfd); synced; no checksum.
    Direct,
    /// The flow before streaming: QEMU writes the file, vmsnap reads it back to hash it.
    DirectReadBack,
    /// Through vmsnap's pipe, hashed in flight.
    Stream,
    /// Through vmsnap's pipe, zstd level 3, hashed in flight.
    StreamZstd,
    /// QEMU writes the file, vmsnap hashes it behind QEMU as it grows (raw background dumps).
    Follow,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "QEMU → file (no checksum)",
            Variant::DirectReadBack => "QEMU → file, then read back for sha256",
            Variant::Stream => "QEMU → vmsnap pipe → file, sha256 in flight",
            Variant::StreamZstd => "QEMU → vmsnap pipe → zstd → file, sha256 in flight",
            Variant::Follow => "QEMU → file, sha256 behind QEMU in flight",
        }
    }
}

struct Sample {
    secs: f64,
    file_bytes: u64,
    /// CPU time the whole host spent (every process, kernel included) during the sample.
    cpu_secs: f64,
}

/// Busy CPU time of the whole host so far, from `/proc/stat` (user, nice, system, irq, softirq,
/// steal), in seconds.
fn host_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<f64>();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    busy / hz
}

async fn dump(qmp: &Qmp, variant: Variant, path: &Path) -> Sample {
    let _ = std::fs::remove_file(path);
    let mut events = qmp.subscribe().unwrap();
    let t = Instant::now();
    let cpu0 = host_busy_secs();
    let file = ram::create_dump(path).unwrap();
    let file_bytes = match variant {
        Variant::Direct | Variant::DirectReadBack => {
            ram::start(qmp, &file).await.unwrap();
            ram::wait_completed(qmp, &mut events, Duration::from_secs(1800)).await.unwrap();
            file.sync_data().unwrap();
            if let Variant::DirectReadBack = variant {
                let p = path.to_owned();
                tokio::task::spawn_blocking(move || ram::sha256_file(&p).unwrap()).await.unwrap();
            }
            file.metadata().unwrap().len()
        }
        Variant::Stream | Variant::StreamZstd => {
            let compress = if let Variant::StreamZstd = variant { RamCompress::Zstd } else { RamCompress::None };
            let (qemu_end, drain) = ramstream::drain_into(file, Vec::new(), compress, 3).unwrap();
            ram::pass_fd(qmp, std::os::fd::AsFd::as_fd(&qemu_end)).await.unwrap();
            drop(qemu_end);
            ram::migrate(qmp).await.unwrap();
            ram::wait_completed(qmp, &mut events, Duration::from_secs(1800)).await.unwrap();
            drain.finish().await.unwrap().file_bytes
        }
        Variant::Follow => {
            let (qemu_end, drain) = ramstream::follow(file, Vec::new()).unwrap();
            ram::pass_fd(qmp, std::os::fd::AsFd::as_fd(&qemu_end)).await.unwrap();
            drop(qemu_end);
            ram::migrate(qmp).await.unwrap();
            ram::wait_completed(qmp, &mut events, Duration::from_secs(1800)).await.unwrap();
            drain.finish().await.unwrap().file_bytes
        }
    };
    Sample { secs: t.elapsed().as_secs_f64(), file_bytes, cpu_secs: host_busy_secs() - cpu0 }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    match std::env::var("VMSNAP_BENCH_LANE").as_deref() {
        Ok("zfs") => vmsnap_testkit::rig::lane::dispatch(on_zfs),
        Ok("host") | Err(_) => on_host(),
        Ok(other) => panic!("VMSNAP_BENCH_LANE={other:?}: `host` (default) or `zfs`"),
    }
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Host lane: a tiny guest with room for the fill, dumps into `/var/tmp`.
fn on_host() {
    let fill_mib = env_u32("VMSNAP_BENCH_FILL_MIB", 600);
    let rig = Rig::locate().expect("the test rig is required (scripts/rig/rig.sh)");
    let dir = tempfile::Builder::new().prefix("vmsnap-ramdump").tempdir_in("/var/tmp").unwrap();
    let opts = TinyVmOptions { disks: 1, memory_mib: fill_mib + 400, ..Default::default() };
    // One runtime for the whole run: the QMP connection's reader lives on it.
    let rt = rt();
    let (vm, qmp, _qga, _) = rt.block_on(TinyVm::boot(&rig, &opts)).expect("booting the tiny guest");
    drop(_qga);
    rt.block_on(fill(&vm.machine.qga_path, fill_mib));
    let what = format!(
        "host lane, a paused guest with {} MiB of RAM, {fill_mib} MiB filled (half random, half text), dumps in /var/tmp",
        fill_mib + 400
    );
    compare(&rt, &qmp, dir.path(), &what);
    drop(vm);
}

/// ZFS lane (inside the OpenZFS VM): the nested guest of the engine lane (started from the
/// resume kit, its disks on ZFS), dumps into a file system of their own, as `ram_dir` is.
fn on_zfs() {
    let fill_mib = env_u32("VMSNAP_BENCH_FILL_MIB", 160);
    let (fs, zvol, ram) = ("tank/vms/bench", "tank/vms/bench-data", "tank/ram");
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh(&format!("zfs create -p {fs} && zfs create -V 64M {zvol} && zfs create {ram} && chmod 700 /{ram} && udevadm settle"));
    let rig = Rig::locate().expect("rig");
    let rt = rt();
    let (mut vm, qga) = rt.block_on(resume_kit::restore_on_zfs(&rig, fs, zvol)).expect("the nested guest");
    drop(qga);
    let qmp = rt.block_on(vm.machine.qmp()).expect("QMP");
    rt.block_on(fill(&vm.machine.qga_path, fill_mib));
    let what = format!(
        "ZFS lane (nested TCG), a paused guest with {KIT_MEMORY_MIB} MiB of RAM, {fill_mib} MiB filled (half random, half text), dumps on /{ram} (OpenZFS)"
    );
    compare(&rt, &qmp, std::path::Path::new(&format!("/{ram}")), &what);
    vm.machine.kill();
}

/// Fills `fill_mib` of the guest's RAM (a tmpfs: half random bytes, half repeated text) so
/// neither QEMU nor zstd can skip it.
async fn fill(qga_path: &Path, fill_mib: u32) {
    let mut q = Qga::connect(qga_path, Timeouts::default()).await.unwrap();
    let half = fill_mib / 2;
    let script = format!(
        "mkdir -p /fill && mount -t tmpfs -o size={}m tmpfs /fill && dd if=/dev/urandom of=/fill/random bs=1M count={half} 2>&1 \
         && yes 'Nov 29 10:00:00 web nginx: 10.0.0.7 GET /index.html 200 (a log line a guest keeps in its page cache)' \
         | head -c {} > /fill/text",
        fill_mib + 50,
        u64::from(fill_mib - half) << 20
    );
    let out = q.sh(&script, Duration::from_secs(900)).await.unwrap();
    assert!(out.success(), "filling the guest's RAM: {}", out.stdout_text());
}

/// Every variant N times (`VMSNAP_BENCH_N`, default 3), round-robin after a warm-up round, the
/// guest paused for each sample; prints the medians and ratios.
fn compare(rt: &tokio::runtime::Runtime, qmp: &Qmp, dir: &Path, what: &str) {
    let n: usize = std::env::var("VMSNAP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    rt.block_on(async {
        ram::set_capabilities(qmp, false).await.unwrap();
        qmp.execute_raw("migrate-set-parameters", Some(serde_json::json!({ "max-bandwidth": 100u64 << 30 })), Duration::from_secs(10))
            .await
            .unwrap();
    });
    let variants = [Variant::Direct, Variant::DirectReadBack, Variant::Stream, Variant::StreamZstd, Variant::Follow];
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..=n {
        for (i, &v) in variants.iter().enumerate() {
            let s = rt.block_on(async {
                qmp.execute(&qapi::qmp::stop {}).await.unwrap();
                let s = dump(qmp, v, &dir.join("dump.ram")).await;
                qmp.execute(&qapi::qmp::cont {}).await.unwrap();
                s
            });
            eprintln!("round {round} {}: {:.2} s, {} MiB, host CPU {:.2} s", v.name(), s.secs, s.file_bytes >> 20, s.cpu_secs);
            if round > 0 {
                samples[i].push(s);
            }
        }
    }
    let _ = std::fs::remove_file(dir.join("dump.ram"));
    let secs: Vec<f64> = samples.iter().map(|s| median(s.iter().map(|x| x.secs).collect())).collect();
    let size: Vec<u64> = samples.iter().map(|s| s[0].file_bytes).collect();
    let cpu: Vec<f64> = samples.iter().map(|s| median(s.iter().map(|x| x.cpu_secs).collect())).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let stream_mib = size[0] as f64 / 1048576.0;
    println!("RAM dump: {what}; median of {n}:");
    for (i, v) in variants.iter().enumerate() {
        println!(
            "  {:<52} {:>7.2} s  {:>7.0} MiB/s of stream  file {:>5} MiB  host CPU {:>5.2} s ({:.1} of {cores} cores busy)",
            v.name(),
            secs[i],
            stream_mib / secs[i],
            size[i] >> 20,
            cpu[i],
            cpu[i] / secs[i]
        );
    }
    println!("ratios (throughput, higher is better for vmsnap):");
    println!("  hashed behind QEMU (raw background dumps) vs QEMU → file, both synced: {:.2} (goal >= 0.95)", secs[0] / secs[4]);
    println!("  through the pipe (precopy and zstd dumps) vs QEMU → file, both synced: {:.2}", secs[0] / secs[2]);
    println!("  streamed vs the old flow (file, then read back for the checksum): {:.2}", secs[1] / secs[2]);
    println!("  zstd vs raw stream: time {:.2}x, size {:.2}", secs[3] / secs[2], size[3] as f64 / size[2] as f64);
    // The floor the host's cores set: the CPU a variant needs, spread over every core at once.
    println!(
        "CPU floor: hashed behind QEMU needs {:.2} CPU s, so at least {:.2} s on {cores} cores: at best {:.2} of QEMU → file",
        cpu[4],
        cpu[4] / cores,
        (secs[0] / (cpu[4] / cores)).min(1.0)
    );
}
