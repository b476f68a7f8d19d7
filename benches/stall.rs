//! Benchmark: the daemon never stalls. While domain A's RAM snapshot runs (QEMU streams a large
//! dump, then vmsnap checksums it), domain B's snapshots and a hook registration go through the
//! same daemon. Before the multi-thread runtime and `spawn_blocking`, A's checksum held the one
//! thread every other job, D-Bus and the hook waited on.
//!
//! `cargo bench --bench stall` (host lane: two tiny guests under TCG, the real `vmsnap daemon` on
//! a private bus, `zfs` replaced by the fault lane's stand-in since only the host's runtime is
//! measured). Guest A gets `VMSNAP_BENCH_FILL_MIB` (default 600) of random data in RAM so its
//! dump is large. Prints, from this run: B's freeze window alone (median of N, `VMSNAP_BENCH_N`,
//! default 5) and while A runs (median), their ratio (goal ≤ 1.5), and the slowest
//! `RegisterDomain` during A (goal < 2 s, the hook's own deadline).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmsnap::qemu::qga::{Qga, Timeouts};
use vmsnap_testkit::rig::{Rig, TinyVm, TinyVmOptions};
use vmsnap_testkit::support::{median, rt};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Bench {
    root: tempfile::TempDir,
    address: String,
}

impl Bench {
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    fn vmsnap(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
        cmd.arg("--config").arg(self.path("vmsnap.toml")).args(args);
        cmd.env("VMSNAP_ZFS", Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults_host/zfs-standin.py"));
        cmd.env("VMSNAP_STANDIN_STATE", self.path("zfs-state.json"));
        cmd.env("VMSNAP_STANDIN_MOUNT", self.path("disks"));
        cmd.env("VMSNAP_BUS_ADDRESS", &self.address);
        cmd
    }

    /// One disk-only snapshot of B through the daemon: its freeze window in ms.
    fn snapshot_b(&self, label: &str) -> f64 {
        let out = self.vmsnap(&["snapshot", "b", "--json", "--label", label]).stderr(Stdio::inherit()).output().unwrap();
        assert!(out.status.success(), "snapshot of b failed");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        r["freeze_ms"].as_f64().expect("b was frozen")
    }

    /// `RegisterDomain` of B's sockets and disk as the hook sends it: how long the call took.
    fn register(&self, vm: &TinyVm) -> Duration {
        let m = &vm.machine;
        let t = Instant::now();
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(["call", "io.github.vmsnap.Agent1", "/io/github/vmsnap/Agent1", "io.github.vmsnap.Agent1", "RegisterDomain"])
            .args(["ssssasss", "b-hooked", ""])
            .arg(&m.qmp_path)
            .arg(&m.qga_path)
            .arg("1")
            .arg(&vm.disks[0])
            .args(["", ""])
            .output()
            .unwrap();
        let took = t.elapsed();
        assert!(out.status.success(), "RegisterDomain: {}", String::from_utf8_lossy(&out.stderr));
        took
    }
}

fn boot(rig: &Rig, root: &Path, name: &str, memory_mib: u32) -> TinyVm {
    let disk = root.join(format!("disks/{name}.qcow2"));
    std::fs::copy(rig.dir().join("data-template.qcow2"), &disk).unwrap();
    let opts = TinyVmOptions { disks: 1, memory_mib, disk_images: Some(vec![disk]), ..Default::default() };
    let (vm, _qmp, _qga, took) = rt().block_on(TinyVm::boot(rig, &opts)).expect("booting a tiny guest");
    eprintln!("guest {name} ({memory_mib} MiB) up in {:.1} s", took.as_secs_f64());
    vm
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("VMSNAP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let fill_mib: u32 = std::env::var("VMSNAP_BENCH_FILL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let rig = Rig::locate().expect("the test rig is required (scripts/rig/rig.sh)");
    let root = tempfile::Builder::new().prefix("vmsnap-stall").tempdir().unwrap();
    for d in ["disks", "state", "overlays", "ram"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    let a = boot(&rig, root.path(), "a", fill_mib + 400);
    let b = boot(&rig, root.path(), "b", 160);
    // A's RAM full of random data: a dump of about fill_mib that neither QEMU nor a checksum can skip.
    rt().block_on(async {
        let mut q = Qga::connect(&a.machine.qga_path, Timeouts::default()).await.unwrap();
        let t = Instant::now();
        let script = format!(
            "mkdir -p /fill && mount -t tmpfs -o size={}m tmpfs /fill && dd if=/dev/urandom of=/fill/x bs=1M count={fill_mib} 2>&1",
            fill_mib + 50
        );
        let out = q.sh(&script, Duration::from_secs(900)).await.unwrap();
        assert!(out.success(), "filling A's RAM: {}", out.stdout_text());
        eprintln!("A's RAM filled with {fill_mib} MiB in {:.0} s", t.elapsed().as_secs_f64());
    });
    let config = format!(
        "state_dir = \"{s}\"\noverlay_dir = \"{o}\"\nram_dir = \"{r}\"\nmax_parallel = 2\n\n\
         [domain.a]\nqmp = \"{aq}\"\nqga = \"{ag}\"\n\n[domain.b]\nqmp = \"{bq}\"\nqga = \"{bg}\"\n\n\
         [template.default]\nautosnap = false\n",
        s = root.path().join("state").display(),
        o = root.path().join("overlays").display(),
        r = root.path().join("ram").display(),
        aq = a.machine.qmp_path.display(),
        ag = a.machine.qga_path.display(),
        bq = b.machine.qmp_path.display(),
        bg = b.machine.qga_path.display(),
    );
    std::fs::write(root.path().join("vmsnap.toml"), config).unwrap();
    let socket = root.path().join("bus.sock");
    let address = format!("unix:path={}", socket.display());
    let _bus = Killed(Command::new("dbus-daemon").args(["--session", "--nofork"]).arg(format!("--address={address}")).spawn().unwrap());
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let bench = Bench { root, address };
    let log = std::fs::File::create(bench.path("daemon.log")).unwrap();
    let _daemon = Killed(bench.vmsnap(&["daemon", "--bus-address", &bench.address]).env("VMSNAP_LOG", "info").stderr(log).spawn().unwrap());
    let t = Instant::now();
    let domains = || {
        Command::new("busctl")
            .arg(format!("--address={}", bench.address))
            .args(["call", "io.github.vmsnap.Agent1", "/io/github/vmsnap/Agent1", "io.github.vmsnap.Agent1", "Domains"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    while !domains() {
        assert!(t.elapsed() < Duration::from_secs(20), "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }

    // B alone.
    bench.snapshot_b("warmup");
    let alone: Vec<f64> = (0..n).map(|i| bench.snapshot_b(&format!("alone{i}"))).collect();
    let register_alone = bench.register(&b);

    // B while A's RAM snapshot runs: as many B snapshots and registrations as fit in it.
    let t = Instant::now();
    let mut a_job = bench
        .vmsnap(&["snapshot", "a", "--memory", "background", "--json", "--label", "big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (mut during, mut registrations) = (Vec::new(), Vec::new());
    let mut i = 0;
    while a_job.try_wait().unwrap().is_none() {
        registrations.push(bench.register(&b));
        during.push(bench.snapshot_b(&format!("during{i}")));
        i += 1;
    }
    let a_took = t.elapsed();
    let out = a_job.wait_with_output().unwrap();
    assert!(out.status.success(), "A's RAM snapshot failed");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps: Vec<String> = report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{} {:.0} ms", s[0].as_str().unwrap_or("?"), s[1].as_f64().unwrap_or(0.0)))
        .collect();
    let dump = report["ram_dump"].as_str().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).unwrap_or(0);

    let (m_alone, m_during) = (median(alone.clone()), median(during.clone()));
    let worst_reg = registrations.iter().max().copied().unwrap_or_default();
    println!("stall benchmark (host lane, TCG, one run, N = {n}):");
    println!(
        "  A: RAM snapshot (background) of a guest with {fill_mib} MiB of random data: dump {} MiB, {:.1} s",
        dump >> 20,
        a_took.as_secs_f64()
    );
    println!("     steps: {}", steps.join(", "));
    println!("  B: freeze window alone, median of {n}: {m_alone:.0} ms ({alone:.0?})");
    println!("  B: freeze window while A runs, median of {}: {m_during:.0} ms ({during:.0?})", during.len());
    println!("  ratio during/alone: {:.2} (goal <= 1.5)", m_during / m_alone);
    println!(
        "  RegisterDomain: alone {} ms; during A, {} calls, slowest {} ms (goal < 2000)",
        register_alone.as_millis(),
        registrations.len(),
        worst_reg.as_millis()
    );
}
