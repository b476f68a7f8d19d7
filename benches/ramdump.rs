//! Benchmark: a RAM dump checksummed by vmsnap in flight — streamed through its pipe (→ file,
//! optionally zstd: precopy and compressed dumps) or hashed behind QEMU writing the file (raw
//! background dumps) — against QEMU writing the file directly, and against the flow before
//! streaming (QEMU writes the file, then vmsnap reads it back for the checksum).
//!
//! `cargo bench --bench ramdump`: host lane, a tiny guest under TCG whose RAM holds
//! `VMSNAP_BENCH_FILL_MIB` (default 600) MiB, half random bytes, half repeated text, so neither
//! QEMU nor zstd can skip it, dumps in `/var/tmp`. The guest is paused for every sample so each
//! dump is the same one-pass copy; migration bandwidth is unlimited for all variants. Each sample
//! ends when the dump is synced to disk and its checksum is known.
//!
//! `VMSNAP_BENCH_LANE=zfs cargo bench --bench ramdump`: ZFS lane, inside the OpenZFS VM, the
//! nested guest of the engine lane (384 MiB, running, no fill by default), its RAM saved the way
//! a snapshot saves it, onto ext4 and onto an OpenZFS file system of a pool of its own (lz4):
//! QEMU writing the file itself against `vmsnap snapshot --memory`'s "save RAM" step (see
//! [`on_zfs`]; `VMSNAP_BENCH_TRACE=1` prints a timeline of each vmsnap sample,
//! `VMSNAP_BENCH_ALSO_BIN` adds an earlier build).
//!
//! `VMSNAP_BENCH_LANE=seal cargo bench --bench ramdump`: a dump's upload to a replication target,
//! sealed ([`vmsnap::ramcrypt::Sealer`], ChaCha20-Poly1305) against plain (the file itself), of
//! the same `VMSNAP_BENCH_FILL_MIB` (default 512) MiB file in `/var/tmp` (half random, half
//! text), each through a pipe to a reader that does the target's work (sha256 of what arrives,
//! written to a file and synced). No guest and no ssh: the ratio is of the parts vmsnap adds
//! (ssh's own cipher would slow both alike).
//!
//! N samples per variant (`VMSNAP_BENCH_N`, default 3), round-robin after a warm-up round.
//! Prints medians and ratios from this run.

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
        Ok("seal") => on_seal(),
        Ok("host") | Err(_) => on_host(),
        Ok(other) => panic!("VMSNAP_BENCH_LANE={other:?}: `host` (default), `zfs` or `seal`"),
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
/// resume kit, its disks on ZFS), running, its RAM saved the way a snapshot saves it
/// (background-snapshot: the VM runs while QEMU writes what its RAM held at the pause). For each
/// file system a `ram_dir` may be on, ext4 (the VM's root) and OpenZFS (a pool of its own on the
/// second disk, `compression=lz4`: cheaper storage on a ZFS host), round-robin: QEMU writing the
/// dump into a file there itself (`migrate` to `file:`, then the file synced), and `vmsnap
/// snapshot --memory` (its report's "save RAM": from `migrate` to the dump synced and hashed).
/// `VMSNAP_BENCH_TRACE=1` prints a timeline of every vmsnap sample (QEMU's bytes sent, the
/// file's size, vmsnap's threads and where each waits).
fn on_zfs() {
    // The guest as it is (about 86 MB to dump): a fill takes minutes under nested TCG.
    let fill_mib = env_u32("VMSNAP_BENCH_FILL_MIB", 0);
    let (fs, zvol) = ("tank/vms/bench", "tank/vms/bench-data");
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh("zpool create -f -O compression=lz4 -O mountpoint=/cheap cheap /dev/disk/by-id/virtio-pool2");
    sh(&format!("zfs create -p {fs} && zfs create -V 64M {zvol} && udevadm settle"));
    let rig = Rig::locate().expect("rig");
    let rt = rt();
    let (mut vm, mut qga) = rt.block_on(resume_kit::restore_on_zfs(&rig, fs, zvol)).expect("the nested guest");
    // A guest that does something while its RAM is saved (the demo's writer).
    rt.block_on(qga.exec_start("/bin/sh", &["-c", "i=0; while :; do i=$((i+1)); echo $i > /mnt/vda/counter; sleep 0.2; done"], &[]))
        .expect("the guest's writer");
    drop(qga);
    if fill_mib > 0 {
        rt.block_on(fill(&vm.machine.qga_path, fill_mib));
    }
    let observer = rt.block_on(vm.machine.observer()).expect("the observer monitor");
    let n: usize = std::env::var("VMSNAP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let trace = std::env::var("VMSNAP_BENCH_TRACE").is_ok_and(|v| v == "1");
    let places = [("ext4 (the VM's root file system)", "/var/tmp/vmsnap-bench-ram"), ("OpenZFS (own pool, lz4)", "/cheap/vmsnap-ram")];
    let mut rows = Vec::new();
    // An earlier build to compare with, in the same run (`VMSNAP_BENCH_ALSO_BIN`: its path
    // inside the VM, e.g. /mnt/share/vmsnap-old when it sits beside this build's binary).
    let also = std::env::var("VMSNAP_BENCH_ALSO_BIN").ok().filter(|b| !b.is_empty());
    for (label, dir) in places {
        write_bench_config(&vm, fs, zvol, dir);
        let (mut qemu, mut ours, mut earlier) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=n {
            let q = rt.block_on(qemu_writes_file(&observer, Path::new(dir)));
            let v = rt.block_on(vmsnap_saves(&vmsnap_testkit::rig::lane::vmsnap_bin(), &observer, Path::new(dir), round, trace));
            eprintln!(
                "{label} round {round}: QEMU → file {:.2} s ({} MiB); vmsnap save RAM {:.2} s ({} MiB, whole command {:.2} s)",
                q.secs,
                q.file_bytes >> 20,
                v.save_ram_secs,
                v.file_bytes >> 20,
                v.whole_secs
            );
            let e = also.as_deref().map(|bin| rt.block_on(vmsnap_saves(bin, &observer, Path::new(dir), round, trace)));
            if let Some(e) = &e {
                eprintln!(
                    "{label} round {round}: {} save RAM {:.2} s, whole command {:.2} s",
                    also.as_deref().unwrap_or(""),
                    e.save_ram_secs,
                    e.whole_secs
                );
            }
            if round > 0 {
                qemu.push(q);
                ours.push(v);
                earlier.extend(e);
            }
        }
        rows.push((label, qemu, ours, earlier));
    }
    println!(
        "RAM dump: ZFS lane (nested TCG), a running guest with {KIT_MEMORY_MIB} MiB of RAM, {fill_mib} MiB filled (half random, half text), background-snapshot; median of {n} (the upper one when even):"
    );
    for (label, qemu, ours, earlier) in &rows {
        let q = median(qemu.iter().map(|s| s.secs).collect());
        let v = median(ours.iter().map(|s| s.save_ram_secs).collect());
        let whole = median(ours.iter().map(|s| s.whole_secs).collect());
        let mib = qemu[0].file_bytes as f64 / 1048576.0;
        println!("  dump on {label}:");
        println!("    QEMU → file itself (migrate to file:, then synced)   {q:>7.2} s  {:>6.1} MiB/s  file {:>5.0} MiB", mib / q, mib);
        println!(
            "    vmsnap snapshot --memory, step \"save RAM\"          {v:>7.2} s  {:>6.1} MiB/s  file {:>5} MiB  (whole command {whole:.2} s)",
            ours[0].file_bytes as f64 / 1048576.0 / v,
            ours[0].file_bytes >> 20
        );
        println!("    ratio (throughput, vmsnap / QEMU alone): {:.2} (goal >= 0.9)", q / v);
        if !earlier.is_empty() {
            let e = median(earlier.iter().map(|s| s.save_ram_secs).collect());
            let e_whole = median(earlier.iter().map(|s| s.whole_secs).collect());
            println!(
                "    {}: \"save RAM\" + \"checksum RAM dump\" {e:.2} s, whole command {e_whole:.2} s; this build's whole command / its: {:.2}",
                also.as_deref().unwrap_or(""),
                whole / e_whole
            );
        }
    }
    drop(observer);
    vm.machine.kill();
}

/// `[domain.bench]` for the nested guest, its dumps in `ram_dir` (raw: no XML, so the same bytes
/// QEMU writes by itself).
fn write_bench_config(vm: &vmsnap_testkit::rig::TinyVm, fs: &str, zvol: &str, ram_dir: &str) {
    std::fs::create_dir_all("/etc/vmsnap").unwrap();
    let m = &vm.machine;
    let config = format!(
        "state_dir = \"/var/lib/vmsnap-bench\"\nram_dir = \"{ram_dir}\"\n\n[domain.bench]\nqmp = \"{}\"\nqga = \"{}\"\ndisks = [\"/{fs}/disk0.qcow2\", \"/dev/zvol/{zvol}\"]\n",
        m.qmp_path.display(),
        m.qga_path.display()
    );
    std::fs::write(BENCH_CONFIG, config).unwrap();
}

const BENCH_CONFIG: &str = "/etc/vmsnap/bench.toml";

/// QEMU saves the running guest's RAM into `dir/qemu.ram` by itself, background-snapshot, at
/// the bandwidth vmsnap uses (unlimited); timed until the file is synced.
async fn qemu_writes_file(qmp: &Qmp, dir: &Path) -> Sample {
    let path = dir.join("qemu.ram");
    let _ = std::fs::remove_file(&path);
    std::fs::create_dir_all(dir).unwrap();
    let old = ram::current_bandwidth(qmp).await.unwrap();
    ram::set_capabilities(qmp, true).await.unwrap();
    ram::set_bandwidth(qmp, vmsnap::config::policy::RamBandwidth::Unlimited.bytes().unwrap()).await.unwrap();
    let mut events = qmp.subscribe().unwrap();
    let t = Instant::now();
    let cpu0 = host_busy_secs();
    let uri = format!("file:{}", path.display());
    qmp.execute_raw("migrate", Some(serde_json::json!({ "uri": uri })), Duration::from_secs(30)).await.unwrap();
    ram::wait_completed(qmp, &mut events, Duration::from_secs(1800)).await.unwrap();
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    let sample = Sample { secs: t.elapsed().as_secs_f64(), file_bytes: file.metadata().unwrap().len(), cpu_secs: host_busy_secs() - cpu0 };
    ram::set_capabilities(qmp, false).await.unwrap();
    ram::set_bandwidth(qmp, old).await.unwrap();
    let _ = std::fs::remove_file(&path);
    sample
}

/// One `vmsnap snapshot --memory`.
struct SnapshotSample {
    /// The report's "save RAM" (plus "checksum RAM dump", a step of an earlier build's).
    save_ram_secs: f64,
    /// The whole command, start to exit.
    whole_secs: f64,
    file_bytes: u64,
}

/// `vmsnap snapshot bench --memory --no-quiesce` (background RAM, overlay) run by `bin`. Its
/// snapshots and dump are removed afterwards.
async fn vmsnap_saves(bin: &str, observer: &Qmp, dir: &Path, round: usize, trace: bool) -> SnapshotSample {
    let label = format!("bench{round}");
    let t = Instant::now();
    let child = tokio::process::Command::new(bin)
        .args([
            "--config",
            BENCH_CONFIG,
            "snapshot",
            "bench",
            "--memory",
            "background",
            "--no-quiesce",
            "--local",
            "--json",
            "--label",
            &label,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vmsnap");
    let pid = child.id().unwrap_or(0);
    let out = if trace {
        let sampling = timeline(observer, dir, pid, t);
        tokio::pin!(sampling);
        let waiting = child.wait_with_output();
        tokio::select! { out = waiting => out, _ = &mut sampling => unreachable!("the timeline samples until the command ends") }
    } else {
        child.wait_with_output().await
    }
    .expect("vmsnap ran");
    let whole = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "vmsnap snapshot: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let step = |name: &str| {
        report["steps"].as_array().and_then(|s| s.iter().find(|x| x[0] == name)).and_then(|x| x[1].as_f64()).unwrap_or(f64::NAN) / 1e3
    };
    if trace {
        eprintln!("report steps: {}", report["steps"]);
    }
    let bytes = report["ram_file_bytes"].as_u64().unwrap_or(0);
    sh("zfs list -H -t snapshot -o name -r tank | xargs -r -n1 zfs destroy");
    if let Some(dump) = report["ram_dump"].as_str() {
        let _ = std::fs::remove_file(dump);
    }
    // An earlier build hashed the dump after it was written, in a step of its own.
    let checksum = step("checksum RAM dump");
    let secs = step("save RAM") + if checksum.is_nan() { 0.0 } else { checksum };
    SnapshotSample { save_ram_secs: secs, whole_secs: whole, file_bytes: bytes }
}

/// Every 250 ms until cancelled: QEMU's migration (status, bytes sent), the newest dump's size
/// in `dir`, and vmsnap's threads (state, where the kernel has them wait).
async fn timeline(observer: &Qmp, dir: &Path, pid: u32, t0: Instant) {
    loop {
        let m = observer.execute_raw("query-migrate", None, Duration::from_secs(10)).await.unwrap_or_default();
        let sent = m["ram"]["transferred"].as_u64().unwrap_or(0);
        let file = newest_file_len(dir);
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let p = e.path();
                        let comm = std::fs::read_to_string(p.join("comm")).ok()?;
                        let stat = std::fs::read_to_string(p.join("stat")).ok()?;
                        let state = stat.rsplit(')').next()?.split_whitespace().next()?.to_owned();
                        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                        (state != "S" || comm.starts_with("vmsnap-ram")).then(|| format!("{}:{state}:{wchan}", comm.trim()))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        eprintln!(
            "trace {:6.2} s  migration {:<10} sent {:>4} MiB  file {:>4} MiB  {threads}",
            t0.elapsed().as_secs_f64(),
            m["status"].as_str().unwrap_or("-"),
            sent >> 20,
            file >> 20
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn newest_file_len(dir: &Path) -> u64 {
    walk(dir).into_iter().max_by_key(|(m, _)| *m).map_or(0, |(_, len)| len)
}

fn walk(dir: &Path) -> Vec<(std::time::SystemTime, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            out.extend(walk(&e.path()));
        } else if let Ok(m) = md.modified() {
            out.push((m, md.len()));
        }
    }
    out
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

/// Seal lane: a dump's upload, sealed against plain (see the module doc).
fn on_seal() {
    use sha2::Digest;
    use std::io::{Read, Write};
    let mib = env_u32("VMSNAP_BENCH_FILL_MIB", 512);
    let n = env_u32("VMSNAP_BENCH_N", 3);
    let dir = tempfile::Builder::new().prefix("vmsnap-ramseal").tempdir_in("/var/tmp").unwrap();
    let dump = dir.path().join("dump.ram");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&dump).unwrap());
        let mut random = std::fs::File::open("/dev/urandom").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..mib {
            if i % 2 == 0 {
                random.read_exact(&mut buf).unwrap();
            } else {
                buf.iter_mut().enumerate().for_each(|(j, b)| *b = b"guest page text "[j % 16]);
            }
            f.write_all(&buf).unwrap();
        }
        f.into_inner().unwrap().sync_all().unwrap();
    }
    let len = u64::from(mib) << 20;
    let key = vmsnap::ramcrypt::RamKey::from_hex(&"5a".repeat(32)).unwrap();
    let sum: String = {
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut std::fs::File::open(&dump).unwrap(), &mut h).unwrap();
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    };
    // One upload: the source's side into a pipe, the target's side (hash, write, sync) out of it.
    let upload = |sealed: bool| -> f64 {
        let out = dir.path().join("copy.ram");
        let (r, w) = nix::unistd::pipe().unwrap();
        let t = Instant::now();
        let target = std::thread::spawn(move || {
            let mut r = std::fs::File::from(r);
            let mut f = std::fs::File::create(&out).unwrap();
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = r.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                f.write_all(&buf[..k]).unwrap();
            }
            f.sync_all().unwrap();
            let _ = h.finalize();
        });
        // A MiB's pipe, as the transport makes it.
        let _ = nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&w), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        let mut w = std::fs::File::from(w);
        let file = std::fs::File::open(&dump).unwrap();
        if sealed {
            // As the transport copies a reader: 1 MiB at a time.
            let mut sealer = vmsnap::ramcrypt::Sealer::for_dump(file, len, &key, ("web", "autosnap_bench", &sum), 0).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = sealer.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                w.write_all(&buf[..k]).unwrap();
            }
        } else {
            // As the transport forwards a file (the kernel copies it).
            std::io::copy(&mut &file, &mut w).unwrap();
        }
        drop(w);
        target.join().unwrap();
        t.elapsed().as_secs_f64()
    };
    upload(false);
    upload(true);
    let (mut plain, mut sealed) = (Vec::new(), Vec::new());
    for _ in 0..n {
        plain.push(upload(false));
        sealed.push(upload(true));
    }
    let (p, s) = (median(plain), median(sealed));
    let rate = |secs: f64| f64::from(mib) / secs;
    println!("RAM dump upload of {mib} MiB, median of {n}:");
    println!("  plain   {p:7.2} s  {:8.1} MiB/s", rate(p));
    println!("  sealed  {s:7.2} s  {:8.1} MiB/s", rate(s));
    println!("  ratio sealed/plain throughput: {:.2} (goal >= 0.9)", p / s);
}
