//! Nothing lost, nothing stuck (host lane): the real `vmsnap` binary against real QEMU and the
//! real qemu-ga in the tiny guest, killed at every journal record of every snapshot variant and
//! recovered, plus the faults that are hard to get any other way: a freeze reply that comes too
//! late, an agent stopped inside the frozen guest, QEMU killed while the guest runs on its
//! overlay (and restarted), a full overlay directory, a hung `zfs` inside the frozen window, and
//! a kill -9 in the middle of a RAM dump.
//!
//! `zfs` is a recording stand-in (`tests/faults_host/zfs-standin.py`): this lane has no OpenZFS,
//! and the matrix must stay fast. The ZFS lane (`tests/engine_zfs.rs`) kills the same flows on
//! real OpenZFS. Needs the rig; without it the tests fail, they never skip.

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmsnap::qemu::qga::{FreezeStatus, Qga, Timeouts};
use vmsnap::qemu::qmp::Qmp;
use vmsnap_testkit::rig::{Rig, TinyVm, TinyVmOptions};
use vmsnap_testkit::support::{check, rt};

const DOMAIN: &str = "vm";
const MEMORY_MIB: u32 = 160;

/// The guest and the files around it. The test holds no agent connection while vmsnap runs (the
/// agent's channel serves one client at a time).
struct Lab {
    vm: TinyVm,
    root: tempfile::TempDir,
}

static LAB: Mutex<Option<Lab>> = Mutex::new(None);

/// The lab, even after a case panicked holding it: one failure must not fail every later case.
fn lab_lock() -> std::sync::MutexGuard<'static, Option<Lab>> {
    LAB.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Lab {
    fn boot() -> Self {
        let root = tempfile::Builder::new().prefix("vmsnap-faults").tempdir().unwrap();
        // The disks outlive any one QEMU (tests kill and restart it): they live in the lab.
        let template = Rig::locate().expect("the test rig is required (scripts/rig/rig.sh)").dir().join("data-template.qcow2");
        std::fs::create_dir_all(root.path().join("disks")).unwrap();
        let disks: Vec<PathBuf> = (0..2).map(|i| root.path().join(format!("disks/disk{i}.qcow2"))).collect();
        for d in &disks {
            std::fs::copy(&template, d).unwrap();
        }
        let vm = boot_vm(Some(disks));
        let lab = Self { vm, root };
        for d in ["state", "overlays", "ram"] {
            std::fs::create_dir_all(lab.root.path().join(d)).unwrap();
        }
        lab.write_config("");
        lab
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    fn config(&self) -> PathBuf {
        self.path("vmsnap.toml")
    }

    /// The config, with `extra` top-level keys and the `qga` key (default: the real agent).
    fn write_config(&self, extra: &str) {
        self.write_config_with(extra, &self.vm.machine.qga_path.clone(), false);
    }

    fn write_config_with(&self, extra: &str, qga: &Path, require_quiesce: bool) {
        let m = &self.vm.machine;
        let text = format!(
            "{extra}\nstate_dir = \"{state}\"\noverlay_dir = \"{ov}\"\nram_dir = \"{ram}\"\n\n[domain.{DOMAIN}]\nqmp = \"{qmp}\"\nqga = \"{qga}\"\nrequire_quiesce = {require_quiesce}\n\n[domain.down]\nqmp = \"{down_qmp}\"\ndisks = [\"{down_disk}\"]\n\n# The daemon (D-Bus case) takes no scheduled snapshot. Dumps keep the migration bandwidth\n# QEMU has: the cases that catch a dump mid-way slow QEMU down through QMP, or count on its\n# default 128 MiB/s (the ZFS lane runs with the limit lifted, vmsnap's default).\n[template.default]\nautosnap = false\nram_bandwidth = \"keep\"\n",
            state = self.path("state").display(),
            ov = self.path("overlays").display(),
            ram = self.path("ram").display(),
            qmp = m.qmp_path.display(),
            qga = qga.display(),
            down_qmp = self.path("down.qmp").display(),
            down_disk = self.path("disks/down.qcow2").display(),
        );
        std::fs::write(self.config(), text).unwrap();
    }

    fn vmsnap(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.vmsnap_cmd(args, env).output().unwrap()
    }

    fn vmsnap_cmd(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
        cmd.arg("--config").arg(self.config()).args(args);
        cmd.env("VMSNAP_ZFS", Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults_host/zfs-standin.py"));
        cmd.env("VMSNAP_STANDIN_STATE", self.path("zfs-state.json"));
        cmd.env("VMSNAP_STANDIN_MOUNT", self.path("disks"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn snapshots(&self) -> serde_json::Map<String, Value> {
        match std::fs::read_to_string(self.path("zfs-state.json")) {
            Ok(t) => serde_json::from_str::<Value>(&t).unwrap()["snapshots"].as_object().cloned().unwrap_or_default(),
            Err(_) => Default::default(),
        }
    }

    /// Forgets the stand-in's snapshots and deletes the dumps they kept (between rounds).
    fn reset_snapshots(&self) {
        let _ = std::fs::remove_file(self.path("zfs-state.json"));
        let _ = std::fs::remove_dir_all(self.path("ram").join(DOMAIN));
    }
}

fn boot_vm(disk_images: Option<Vec<PathBuf>>) -> TinyVm {
    let rig = Rig::locate().expect("the test rig is required (scripts/rig/rig.sh)");
    let opts = TinyVmOptions { disks: 2, memory_mib: MEMORY_MIB, disk_images, ..Default::default() };
    let (vm, _qmp, _qga, boot) = rt().block_on(TinyVm::boot(&rig, &opts)).expect("booting the tiny guest");
    eprintln!("METRIC faults_boot_ms={}", boot.as_millis());
    vm
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn label() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("f{}", N.fetch_add(1, Ordering::Relaxed))
}

fn sha256_file(p: &Path) -> String {
    vmsnap::engine::ram::sha256_file(p).unwrap()
}

fn agent(_qga_path: &Path) -> Timeouts {
    Timeouts { sync: Duration::from_secs(20), other: Duration::from_secs(60), ..Timeouts::default() }
}

/// Runs a shell line in the guest on a short-lived agent connection.
fn guest_sh(lab: &Lab, script: &str) -> Result<String, Failed> {
    let qga = lab.vm.machine.qga_path.clone();
    rt().block_on(async {
        let mut q = Qga::connect(&qga, agent(&qga)).await.map_err(|e| e.to_string())?;
        let out = q.sh(script, Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
        check(out.success(), format!("guest `{script}`: {out:?}"))?;
        Ok(out.stdout_text())
    })
}

/// Starts a shell line in the guest and leaves it running (the connection is let go at once).
fn guest_start(lab: &Lab, script: &str) -> Result<(), Failed> {
    let qga = lab.vm.machine.qga_path.clone();
    rt().block_on(async {
        let mut q = Qga::connect(&qga, agent(&qga)).await.map_err(|e| e.to_string())?;
        q.exec_start("/bin/sh", &["-c", script], &[]).await.map_err(|e| e.to_string())?;
        Ok::<(), Failed>(())
    })
}

/// The invariants after `vmsnap recover`: the VM runs (or stays paused, if the test paused it),
/// the guest is thawed and writes, and nothing of vmsnap is left in QEMU or on disk: no node,
/// job, fdset, migration, changed capability, overlay file, journal; no RAM dump that no
/// snapshot references, no `ram` snapshot whose dump is missing or fails its checksum.
fn assert_invariants(lab: &Lab, expect_running: bool) -> Result<(), Failed> {
    // Nothing in this lab turns the capabilities on but vmsnap.
    rt().block_on(lab.vm.machine.vmsnap_leftovers(expect_running, &[("events", false), ("background-snapshot", false)]))?;
    if expect_running {
        let qga = lab.vm.machine.qga_path.clone();
        rt().block_on(async {
            let mut q = Qga::connect(&qga, agent(&qga)).await.map_err(|e| e.to_string())?;
            check(q.freeze_status().await.map_err(|e| e.to_string())? == FreezeStatus::Thawed, "guest left frozen")?;
            let w = q.sh("echo ok > /mnt/vda/probe && cat /mnt/vda/probe", Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
            check(w.stdout_text().trim() == "ok", "the guest cannot write")
        })?;
    }
    let files = |d: &str| -> Vec<PathBuf> { walk(&lab.path(d)) };
    check(files("overlays").is_empty(), format!("overlay files left: {:?}", files("overlays")))?;
    check(files("state/journal").is_empty(), format!("journals left: {:?}", files("state/journal")))?;
    // RAM dumps and the snapshots that reference them.
    let snaps = lab.snapshots();
    let mut referenced = Vec::new();
    for (name, s) in &snaps {
        let props = &s["props"];
        if props["vmsnap:consistency"] == "ram" {
            let dump = props["vmsnap:ram-dump"].as_str().ok_or(format!("{name}: labelled ram without vmsnap:ram-dump: {props}"))?;
            check(Path::new(dump).exists(), format!("{name}: its RAM dump {dump} is missing"))?;
            check(
                Some(sha256_file(Path::new(dump)).as_str()) == props["vmsnap:ram-sha256"].as_str(),
                format!("{name}: {dump} fails its checksum"),
            )?;
            referenced.push(PathBuf::from(dump));
        } else {
            check(props.get("vmsnap:ram-dump").is_none(), format!("{name}: not ram but names a dump: {props}"))?;
        }
    }
    for dump in files("ram") {
        check(referenced.contains(&dump), format!("RAM dump {} is referenced by no snapshot", dump.display()))?;
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A snapshot variant: its CLI arguments and the records its journal gets, in order.
struct Variant {
    name: &'static str,
    args: &'static [&'static str],
    paused: bool,
    records: &'static [&'static str],
}

#[rustfmt::skip]
const VARIANTS: &[Variant] = &[
    Variant {
        name: "overlay",
        args: &[],
        paused: false,
        records: &["begin", "overlays_created", "freeze_started", "switch_started", "switched", "thawed", "zfs_snapshot_started", "zfs_snapshot_done", "merged", "committed", "end"],
    },
    Variant {
        name: "direct",
        args: &["--strategy", "direct"],
        paused: false,
        records: &["begin", "freeze_started", "zfs_snapshot_started", "zfs_snapshot_done", "thawed", "end"],
    },
    Variant {
        name: "direct-no-quiesce",
        args: &["--strategy", "direct", "--no-quiesce"],
        paused: false,
        records: &["begin", "pause_started", "zfs_snapshot_started", "zfs_snapshot_done", "resumed", "end"],
    },
    Variant {
        name: "overlay-precopy",
        args: &["--memory", "precopy"],
        paused: false,
        records: &[
            "begin", "overlays_created", "capabilities_set", "ram_dump_started", "freeze_started", "pause_started", "migration_started", "switch_started",
            "resumed", "switched", "migration_done", "thawed", "capabilities_reset", "ram_dump_done", "zfs_snapshot_started", "zfs_snapshot_done",
            "merged", "committed", "end",
        ],
    },
    Variant {
        name: "overlay-background",
        args: &["--memory", "background"],
        paused: false,
        records: &[
            "begin", "overlays_created", "capabilities_set", "ram_dump_started", "freeze_started", "pause_started", "switch_started",
            "migration_started", "resumed", "switched", "thawed", "zfs_snapshot_started", "zfs_snapshot_done", "merged", "committed",
            "migration_done", "capabilities_reset", "ram_dump_done", "ram_labelled", "end",
        ],
    },
    Variant {
        name: "direct-precopy",
        args: &["--strategy", "direct", "--memory", "precopy"],
        paused: false,
        records: &[
            "begin", "capabilities_set", "ram_dump_started", "freeze_started", "pause_started", "migration_started", "zfs_snapshot_started",
            "zfs_snapshot_done", "resumed", "migration_done", "thawed", "capabilities_reset", "ram_dump_done", "ram_labelled", "end",
        ],
    },
    Variant {
        name: "direct-background",
        args: &["--strategy", "direct", "--memory", "background"],
        paused: false,
        records: &[
            "begin", "capabilities_set", "ram_dump_started", "freeze_started", "pause_started", "migration_started", "zfs_snapshot_started",
            "zfs_snapshot_done", "resumed", "thawed", "migration_done", "capabilities_reset", "ram_dump_done", "ram_labelled", "end",
        ],
    },
    Variant {
        name: "paused-overlay",
        args: &[],
        paused: true,
        records: &["begin", "overlays_created", "switch_started", "switched", "zfs_snapshot_started", "zfs_snapshot_done", "merged", "committed", "end"],
    },
    Variant {
        name: "paused-direct",
        args: &["--strategy", "direct"],
        paused: true,
        records: &["begin", "zfs_snapshot_started", "zfs_snapshot_done", "end"],
    },
];

fn observer_exec(lab: &Lab, cmd: &str) {
    let observer = lab.vm.machine.observer_path.clone();
    rt().block_on(async {
        let qmp = Qmp::connect(&observer, Duration::from_secs(10)).await.unwrap();
        qmp.execute_raw(cmd, None, Duration::from_secs(10)).await.unwrap();
    });
}

/// Every variant, killed before and after each of its records, then `vmsnap recover`; every
/// third interrupted round, `vmsnap recover` is itself killed at a random moment first.
fn matrix(v: &Variant) -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    lab.write_config("");
    // A clean run first: the variant's records are the ones listed.
    let out = lab.vmsnap(&[&["snapshot", DOMAIN, "--json", "--label", &label()][..], v.args].concat(), &[]);
    if v.paused {
        observer_exec(lab, "stop");
    }
    let res = (|| {
        if !v.paused {
            check(out.status.success(), format!("{}: a clean run fails: {}", v.name, text(&out)))?;
            assert_invariants(lab, true)?;
        }
        lab.reset_snapshots();
        let t = Instant::now();
        let mut rounds = 0;
        for record in v.records {
            for when in ["before", "after"] {
                let point = format!("{when}:{record}");
                let out = lab.vmsnap(&[&["snapshot", DOMAIN, "--label", &label()][..], v.args].concat(), &[("VMSNAP_ABORT_AT", &point)]);
                let err = String::from_utf8_lossy(&out.stderr);
                check(
                    !out.status.success() && err.contains("fault-injection"),
                    format!("{}: {point} was not reached: {}", v.name, text(&out)),
                )?;
                rounds += 1;
                let journal = lab.path("state/journal").join(format!("{DOMAIN}.json"));
                if journal.exists() && rounds % 3 == 0 {
                    let mut child = lab
                        .vmsnap_cmd(&["recover"], &[])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(fastrand::u64(0..200)));
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let rec = lab.vmsnap(&["recover"], &[]);
                check(rec.status.success(), format!("{}: recover after {point} failed: {}", v.name, text(&rec)))?;
                assert_invariants(lab, !v.paused)
                    .map_err(|e| format!("{}: after a kill at {point}: {}", v.name, e.message().unwrap_or_default()))?;
                lab.reset_snapshots();
            }
        }
        eprintln!("METRIC matrix {}: {rounds} kills in {:.1} s", v.name, t.elapsed().as_secs_f64());
        Ok(())
    })();
    if v.paused {
        observer_exec(lab, "cont");
    }
    res
}

/// A tiny proxy on the agent's socket that holds back the reply to `guest-fsfreeze-freeze` for
/// `hold` (the guest froze; vmsnap hears it too late). Everything else passes.
fn start_freeze_proxy(upstream: PathBuf, listen: PathBuf, hold: Duration) -> tokio::runtime::Runtime {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let rt = rt();
    let _ = std::fs::remove_file(&listen);
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&listen) }).unwrap();
    rt.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::UnixStream::connect(&upstream).await else { return };
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (sr, mut sw) = server.into_split();
                let freeze = Arc::new(AtomicBool::new(false));
                let seen = freeze.clone();
                let up = async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n].windows(21).any(|w| w == b"guest-fsfreeze-freeze") {
                            seen.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let mut sr = BufReader::new(sr);
                    loop {
                        let mut line = Vec::new();
                        match sr.read_until(b'\n', &mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        if freeze.swap(false, Ordering::SeqCst) {
                            tokio::time::sleep(hold).await;
                        }
                        if cw.write_all(&line).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    rt
}

/// The freeze reply comes after vmsnap's deadline: best effort goes on crash-consistent, a
/// required quiesce refuses; either way the guest is thawed (before the fix it stayed frozen,
/// and the journal said thawed).
fn late_freeze_reply() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let proxy = lab.path("qga-proxy.sock");
    let _rt = start_freeze_proxy(lab.vm.machine.qga_path.clone(), proxy.clone(), Duration::from_secs(6));
    let res = (|| {
        lab.write_config_with("freeze_timeout = 2", &proxy, false);
        let out = lab.vmsnap(&["snapshot", DOMAIN, "--json", "--label", &label()], &[]);
        check(out.status.success(), format!("best effort goes on: {}", text(&out)))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        check(r["consistency"] == "crash" && r["warnings"].to_string().contains("freeze failed"), format!("{r}"))?;
        assert_invariants(lab, true)?;
        lab.write_config_with("freeze_timeout = 2", &proxy, true);
        let out = lab.vmsnap(&["snapshot", DOMAIN, "--label", &label()], &[]);
        check(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("freeze"),
            format!("require_quiesce refuses: {}", text(&out)),
        )?;
        let rec = lab.vmsnap(&["recover"], &[]);
        check(rec.status.success(), text(&rec))?;
        assert_invariants(lab, true)
    })();
    lab.write_config("");
    lab.reset_snapshots();
    res
}

/// qemu-ga is stopped (SIGSTOP) inside the guest right after it froze, and continued 15 s later:
/// vmsnap's thaw times out, its undo keeps thawing on fresh connections until the agent answers
/// (the snapshot fails: it was taken frozen, but the run could not confirm the thaw in time).
fn agent_stopped_while_frozen() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    // A write that does not finish within 0.3 s means the filesystem is frozen.
    let watcher = "while :; do (echo x > /mnt/vda/.probe) & p=$!; sleep 0.3; \
        if kill -0 $p 2>/dev/null; then kill -STOP $(pidof qemu-ga); sleep 15; kill -CONT $(pidof qemu-ga); exit 0; fi; wait $p; done";
    guest_start(lab, watcher)?;
    let t = Instant::now();
    // Direct, with a `zfs snapshot` that takes 3 s: the watcher sees the freeze in the window.
    let out =
        lab.vmsnap(&["snapshot", DOMAIN, "--strategy", "direct", "--json", "--label", &label()], &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "3")]);
    let err = String::from_utf8_lossy(&out.stderr);
    check(!out.status.success() && err.contains("thaw"), format!("the thaw of a stopped agent fails the snapshot: {}", text(&out)))?;
    eprintln!("METRIC agent stopped while frozen: vmsnap returned after {:.1} s: {}", t.elapsed().as_secs_f64(), text(&out));
    let rec = lab.vmsnap(&["recover"], &[]);
    check(rec.status.success(), text(&rec))?;
    let res = assert_invariants(lab, true);
    lab.reset_snapshots();
    res
}

/// Inside the frozen window `zfs snapshot` hangs: past `window_timeout` vmsnap kills it, thaws,
/// and fails, naming the deadline.
fn hung_zfs_in_the_window() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    lab.write_config("window_timeout = 2");
    let t = Instant::now();
    let out = lab.vmsnap(&["snapshot", DOMAIN, "--strategy", "direct", "--label", &label()], &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "30")]);
    let took = t.elapsed();
    lab.write_config("");
    check(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("window_timeout"), text(&out))?;
    check(took < Duration::from_secs(25), format!("vmsnap waited {took:?} for the hung zfs"))?;
    assert_invariants(lab, true)?;
    lab.reset_snapshots();
    Ok(())
}

/// A kill -9 of `vmsnap snapshot --memory` while QEMU streams the RAM (precopy and background),
/// then `vmsnap recover`: the migration is cancelled, the VM runs, the partial dump is gone.
fn kill_during_ram_dump() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let observer = lab.vm.machine.observer_path.clone();
    for mode in ["precopy", "background"] {
        // A guest that dirties memory keeps a precopy migration going for a while.
        let mut child = lab
            .vmsnap_cmd(&["snapshot", DOMAIN, "--memory", mode, "--label", &label()], &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let seen = rt().block_on(async {
            let qmp = Qmp::connect(&observer, Duration::from_secs(10)).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let m = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await.unwrap();
                if m["status"] == "active" {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            false
        });
        let _ = child.kill();
        let _ = child.wait();
        check(seen, format!("{mode}: the migration was never seen active"))?;
        let rec = lab.vmsnap(&["recover"], &[]);
        check(rec.status.success(), format!("{mode}: {}", text(&rec)))?;
        eprintln!("{mode}: recover after a kill mid-dump: {}", String::from_utf8_lossy(&rec.stdout).trim());
        assert_invariants(lab, true).map_err(|e| format!("{mode}: {}", e.message().unwrap_or_default()))?;
        lab.reset_snapshots();
    }
    Ok(())
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private bus and `vmsnap daemon` on it (with the stand-in `zfs`): the bus address and both
/// processes (killed on drop).
fn start_daemon(lab: &Lab) -> Result<(String, Kill, Kill), Failed> {
    start_daemon_with(lab, &[])
}

fn start_daemon_with(lab: &Lab, env: &[(&str, &str)]) -> Result<(String, Kill, Kill), Failed> {
    let socket = lab.path("bus.sock");
    let _ = std::fs::remove_file(&socket);
    let address = format!("unix:path={}", socket.display());
    let bus = Kill(Command::new("dbus-daemon").args(["--session", "--nofork"]).arg(format!("--address={address}")).spawn()?);
    let t = Instant::now();
    while !socket.exists() {
        check(t.elapsed() < Duration::from_secs(10), "dbus-daemon did not start")?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = lab.path("daemon.log");
    let daemon = Kill(
        lab.vmsnap_cmd(&["daemon", "--bus-address", &address], &[&[("VMSNAP_LOG", "info")][..], env].concat())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let t = Instant::now();
    while !busctl(&address, &[&AGENT1[..], &["Domains"]].concat()).0 {
        check(t.elapsed() < Duration::from_secs(20), format!("the service did not appear: {}", std::fs::read_to_string(&log)?))?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((address, bus, daemon))
}

const AGENT1: [&str; 4] = ["call", "io.github.vmsnap.Agent1", "/io/github/vmsnap/Agent1", "io.github.vmsnap.Agent1"];

fn busctl(address: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("busctl").arg(format!("--address={address}")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// `vmsnap snapshot` while a daemon runs goes through the daemon's job and returns its result
/// and exit status, for a success and for a failure (before the fix it waited forever: its
/// proxy cached the job's `running` state).
fn cli_through_the_daemon_returns() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    // `down`'s QMP path cannot be reached (its parent is a file): its snapshot fails with a hint.
    let (down_disk, down_qmp) = (lab.path("disks/down.qcow2"), lab.path("down.qmp"));
    std::fs::copy(Rig::locate().unwrap().dir().join("data-template.qcow2"), &down_disk)?;
    std::fs::write(&down_qmp, b"")?;
    let config = std::fs::read_to_string(lab.config())?;
    std::fs::write(lab.config(), config.replace(&format!("{}\"", down_qmp.display()), &format!("{}/sock\"", down_qmp.display())))?;
    let res = through_the_daemon(lab);
    lab.write_config("");
    let _ = std::fs::remove_file(&down_disk);
    let _ = std::fs::remove_file(&down_qmp);
    res
}

fn through_the_daemon(lab: &Lab) -> Result<(), Failed> {
    let (address, _bus, _daemon) = start_daemon(lab)?;
    let run = |args: &[&str]| {
        let mut cmd = lab.vmsnap_cmd(args, &[("VMSNAP_BUS_ADDRESS", &address)]);
        let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    let out = run(&["snapshot", DOMAIN, "--label", &label()]);
    check(out.status.success(), format!("through the daemon: {}", text(&out)))?;
    check(String::from_utf8_lossy(&out.stderr).contains("(daemon job"), format!("it went through the daemon: {}", text(&out)))?;
    check(String::from_utf8_lossy(&out.stdout).contains(": app (overlay)"), format!("the job's report: {}", text(&out)))?;
    let out = run(&["snapshot", DOMAIN, "--json", "--label", &label()]);
    let r: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
    check(out.status.success() && r["consistency"] == "app", format!("{r}"))?;
    // A failure: RAM of a paused VM is refused; the CLI says why and exits 1.
    observer_exec(lab, "stop");
    let out = run(&["snapshot", DOMAIN, "--memory", "precopy", "--label", &label()]);
    observer_exec(lab, "cont");
    check(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("paused"),
        format!("a failed job: {}", text(&out)),
    )?;
    // A failure with a hint: the job's `Hint` comes through the daemon, and the CLI prints the
    // same words as when it runs the job itself.
    let through = run(&["snapshot", "down", "--label", &label()]);
    let local = lab.vmsnap(&["snapshot", "down", "--local", "--label", &label()], &[]);
    let hint = |o: &Output| String::from_utf8_lossy(&o.stderr).lines().find(|l| l.starts_with("hint: ")).map(str::to_owned);
    eprintln!("through the daemon: {:?}; in process: {:?}", hint(&through), hint(&local));
    check(
        through.status.code() == Some(1) && hint(&through).is_some_and(|h| h.contains("is the VM running")),
        format!("a failed job's hint through the daemon: {}", text(&through)),
    )?;
    check(hint(&through) == hint(&local), format!("in process: {}", text(&local)))?;
    assert_invariants(lab, true)?;
    lab.reset_snapshots();
    Ok(())
}

/// SIGTERM to the daemon while a D-Bus job has the guest frozen (direct, a `zfs snapshot` that
/// takes 5 s): the daemon exits only once the job is over and the guest thawed (before, it
/// exited at once and left the guest frozen until the next start's recovery).
fn daemon_sigterm_mid_freeze() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let (address, _bus, mut daemon) = start_daemon_with(lab, &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "5")])?;
    let (ok, reply) = busctl(&address, &[&AGENT1[..], &["Snapshot", "sa{sv}", DOMAIN, "1", "strategy", "s", "direct"]].concat());
    check(ok, format!("Snapshot: {reply}"))?;
    let journal = lab.path("state/journal").join(format!("{DOMAIN}.json"));
    let t = Instant::now();
    while !std::fs::read_to_string(&journal).unwrap_or_default().contains("zfs_snapshot_started") {
        check(t.elapsed() < Duration::from_secs(30), "the job never reached its window")?;
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.0.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    let status = daemon.0.wait()?;
    let log = std::fs::read_to_string(lab.path("daemon.log"))?;
    check(status.success() && log.contains("waiting for running jobs jobs=1"), format!("daemon exit {status}: {log}"))?;
    assert_invariants(lab, true)?;
    check(lab.snapshots().len() == 1, "the job finished its snapshot before the daemon stopped")?;
    lab.reset_snapshots();
    Ok(())
}

/// `vmsnap snapshot` following a daemon job (direct, the guest frozen around a `zfs snapshot`
/// that takes 5 s): Ctrl-C has the daemon cancel the job, undone as in-process (thawed);
/// `kill -9` of the daemon makes the CLI say the daemon stopped and how the job is
/// undone, instead of waiting for ever, and `vmsnap recover` then thaws the guest.
fn cli_through_the_daemon_interrupted_or_orphaned() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let (address, _bus, mut daemon) = start_daemon_with(lab, &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "5")])?;
    let journal = lab.path("state/journal").join(format!("{DOMAIN}.json"));
    let in_window = |cli: &mut std::process::Child| -> Result<(), Failed> {
        let t = Instant::now();
        while !std::fs::read_to_string(&journal).unwrap_or_default().contains("zfs_snapshot_started") {
            check(t.elapsed() < Duration::from_secs(30) && cli.try_wait()?.is_none(), "the job never reached its window")?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let start = || {
        lab.vmsnap_cmd(&["snapshot", DOMAIN, "--strategy", "direct", "--label", &label()], &[("VMSNAP_BUS_ADDRESS", &address)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let ended = |mut cli: std::process::Child, within: Duration| -> Result<(bool, Output), Failed> {
        let t = Instant::now();
        while cli.try_wait()?.is_none() && t.elapsed() < within {
            std::thread::sleep(Duration::from_millis(50));
        }
        let returned = cli.try_wait()?.is_some();
        if !returned {
            let _ = cli.kill();
        }
        Ok((returned, cli.wait_with_output()?))
    };

    // Ctrl-C: the daemon's job is cancelled and undone.
    let mut cli = start()?;
    in_window(&mut cli)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cli.id() as i32), nix::sys::signal::Signal::SIGINT)?;
    let (returned, out) = ended(cli, Duration::from_secs(30))?;
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("METRIC CLI interrupted while following the daemon's job: {}", said.trim());
    check(returned && out.status.code() == Some(1) && said.contains("interrupted") && said.contains("thawed"), text(&out))?;
    assert_invariants(lab, true)?;
    lab.reset_snapshots();

    // kill -9 of the daemon: the CLI returns at once.
    let mut cli = start()?;
    in_window(&mut cli)?;
    daemon.0.kill()?;
    daemon.0.wait()?;
    let t = Instant::now();
    let (returned, out) = ended(cli, Duration::from_secs(20))?;
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("METRIC CLI after the daemon was killed: {:.1} s: {}", t.elapsed().as_secs_f64(), said.trim());
    check(returned, format!("the CLI still waited 20 s after the daemon died: {}", text(&out)))?;
    check(out.status.code() == Some(1) && said.contains("the daemon stopped") && said.contains("vmsnap recover"), text(&out))?;
    // The stand-in `zfs snapshot` the daemon started may still be sleeping: recover after it.
    std::thread::sleep(Duration::from_secs(5));
    let rec = lab.vmsnap(&["recover"], &[]);
    check(rec.status.success(), text(&rec))?;
    assert_invariants(lab, true)?;
    lab.reset_snapshots();
    Ok(())
}

/// Caps how fast the lab guest's RAM dumps run (slowed, a dump lasts long enough to interrupt).
fn set_migration_bandwidth(lab: &Lab, bytes: u64) {
    rt().block_on(async {
        let qmp = Qmp::connect(&lab.vm.machine.observer_path, Duration::from_secs(10)).await.unwrap();
        let args = serde_json::json!({ "max-bandwidth": bytes });
        qmp.execute_raw("migrate-set-parameters", Some(args), Duration::from_secs(10)).await.unwrap();
    })
}

/// D-Bus `Cancel` of a `Snapshot` job while QEMU streams the RAM (precopy, slowed to 2 MB/s so
/// the dump lasts): the migration is cancelled, the VM runs, no dump is kept.
fn dbus_cancel_during_a_dump() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let (address, _bus, _daemon) = start_daemon(lab)?;
    let busctl = |args: &[&str]| busctl(&address, args);
    let agent1 = AGENT1;
    let set_bandwidth = |bytes: u64| set_migration_bandwidth(lab, bytes);
    set_bandwidth(2 << 20);
    let res = (|| {
        let (ok, reply) = busctl(&[&agent1[..], &["Snapshot", "sa{sv}", DOMAIN, "1", "memory", "s", "precopy"]].concat());
        check(ok, format!("Snapshot: {reply}"))?;
        let job = reply.split('"').nth(1).ok_or(format!("no job path in {reply:?}"))?.to_owned();
        let active = rt().block_on(async {
            let qmp = Qmp::connect(&lab.vm.machine.observer_path, Duration::from_secs(10)).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let m = qmp.execute_raw("query-migrate", None, Duration::from_secs(10)).await.unwrap();
                if m["status"] == "active" {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        });
        check(active, "the dump never started")?;
        let (ok, reply) = busctl(&["call", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1", "Cancel"]);
        check(ok, format!("Cancel: {reply}"))?;
        let t = Instant::now();
        loop {
            let (_, state) = busctl(&["get-property", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1", "State"]);
            if state.contains("cancelled") {
                break;
            }
            check(t.elapsed() < Duration::from_secs(120), format!("the job did not end cancelled: {state}"))?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let (_, result) = busctl(&["get-property", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1", "Result"]);
        eprintln!("D-Bus cancel during a dump: {}", result.trim());
        set_bandwidth(128 << 20); // the test's own throttle, before the invariants check it
        assert_invariants(lab, true)
    })();
    set_bandwidth(128 << 20);
    lab.reset_snapshots();
    res
}

/// A VM that does not answer on QMP is snapshotted as stopped only when it is known to be down:
/// no socket → `offline`; a stale socket (QEMU died) → `crash`; a socket vmsnap cannot reach,
/// a disk some process holds, a disk that does not exist, or `--memory` → refused, nothing taken.
fn stopped_only_when_known_down() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let disk = lab.path("disks/down.qcow2");
    let qmp = lab.path("down.qmp");
    let snap = |extra: &[&str]| lab.vmsnap(&[&["snapshot", "down", "--json", "--label", &label()][..], extra].concat(), &[]);
    let refused = |out: &Output, why: &str| {
        check(out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains(why), format!("refused ({why}): {}", text(out)))
    };
    let count = || lab.snapshots().len();
    let _ = std::fs::remove_file(&qmp);
    refused(&snap(&[]), "does not exist")?;
    std::fs::copy(Rig::locate().unwrap().dir().join("data-template.qcow2"), &disk)?;
    let res = (|| {
        let out = snap(&[]);
        check(out.status.success(), text(&out))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        check(r["consistency"] == "offline", format!("no socket: offline: {r}"))?;
        refused(&snap(&["--memory", "precopy"]), "--memory")?;
        // QEMU died and left its socket: nobody accepts on it.
        drop(std::os::unix::net::UnixListener::bind(&qmp)?);
        let out = snap(&[]);
        check(out.status.success(), text(&out))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        check(r["consistency"] == "crash" && r["warnings"].to_string().contains("stale socket"), format!("stale socket: crash: {r}"))?;
        // Something holds the disk: it may be running with another socket.
        let holder = Kill(Command::new("sh").arg("-c").arg("exec 3<\"$0\"; sleep 60").arg(&disk).spawn()?);
        std::thread::sleep(Duration::from_millis(300));
        let before = count();
        refused(&snap(&[]), "holds disk")?;
        drop(holder);
        check(count() == before, "no snapshot of a disk in use")?;
        // A path that is not a socket vmsnap can reach (its parent is a file): an error, not "stopped".
        std::fs::remove_file(&qmp)?;
        std::fs::write(&qmp, b"")?;
        let config = std::fs::read_to_string(lab.config())?;
        std::fs::write(lab.config(), config.replace(&format!("{}\"", qmp.display()), &format!("{}/sock\"", qmp.display())))?;
        let out = snap(&[]);
        lab.write_config("");
        refused(&out, "QMP")?;
        check(count() == before, "no snapshot when QMP cannot be reached")
    })();
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&disk);
    lab.reset_snapshots();
    res
}

/// Things planted in the VM's dataset where vmsnap saves the domain XML (`.vmsnap/<domain>/`),
/// and a FIFO as the XML source: refused with a clear error, never followed, never blocking;
/// a symlink at the final name is replaced, its target untouched.
fn planted_files_are_refused() -> Result<(), Failed> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let xml = lab.path("domain.xml");
    std::fs::write(&xml, "<domain type='qemu'><name>withxml</name></domain>\n")?;
    let m = &lab.vm.machine;
    let extra = format!(
        "\n[domain.withxml]\nqmp = \"{}\"\nqga = \"{}\"\nxml = \"{}\"\n",
        m.qmp_path.display(),
        m.qga_path.display(),
        xml.display()
    );
    std::fs::write(lab.config(), std::fs::read_to_string(lab.config())? + &extra)?;
    let saved = lab.path("disks/.vmsnap");
    let target = lab.path("elsewhere");
    std::fs::create_dir_all(&target)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    let snap = || lab.vmsnap(&["snapshot", "withxml", "--label", &label()], &[]);
    let refused = |out: &Output, why: &str| {
        check(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(why), format!("refused ({why}): {}", text(out)))
    };
    let res = (|| {
        symlink(&target, &saved)?;
        refused(&snap(), "symbolic link")?;
        check(std::fs::read_dir(&target)?.count() == 0, "nothing written through the symlink")?;
        check(std::fs::metadata(&target)?.permissions().mode() & 0o777 == 0o755, "the symlink's target not chmodded")?;
        std::fs::remove_file(&saved)?;
        std::fs::create_dir(&saved)?;
        nix::unistd::mkfifo(&saved.join("withxml"), nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        refused(&snap(), "not a directory")?;
        std::fs::remove_file(saved.join("withxml"))?;
        // A symlink where the saved XML goes: replaced by the new file, its target untouched.
        std::fs::create_dir(saved.join("withxml"))?;
        let victim = target.join("victim");
        std::fs::write(&victim, "precious")?;
        symlink(&victim, saved.join("withxml/domain.xml"))?;
        let out = snap();
        check(out.status.success(), text(&out))?;
        check(std::fs::read_to_string(&victim)? == "precious", "the symlink's target was written")?;
        check(std::fs::read_to_string(saved.join("withxml/domain.xml"))?.contains("withxml"), "the XML is saved")?;
        // vmsnap's own directories: a symlink planted where the journal, the overlays or the
        // dumps go is refused, and its target is untouched.
        for (dir, args) in [("state/journal", vec![]), ("overlays/withxml", vec![]), ("ram/withxml", vec!["--memory", "precopy"])] {
            let at = lab.path(dir);
            let _ = std::fs::remove_dir_all(&at);
            symlink(&target, &at)?;
            let out = lab.vmsnap(&[&["snapshot", "withxml", "--label", &label()][..], &args].concat(), &[]);
            std::fs::remove_file(&at)?;
            refused(&out, "symbolic link")?;
            check(std::fs::metadata(&target)?.permissions().mode() & 0o777 == 0o755, format!("{dir}: the target was chmodded"))?;
            check(std::fs::read_dir(&target)?.count() == 1, format!("{dir}: something was written through the symlink"))?;
            assert_invariants(lab, true).map_err(|e| format!("{dir}: {}", e.message().unwrap_or_default()))?;
        }
        // A FIFO as the XML source does not block the snapshot.
        std::fs::remove_file(&xml)?;
        nix::unistd::mkfifo(&xml, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        let t = Instant::now();
        refused(&snap(), "not a regular file")?;
        check(t.elapsed() < Duration::from_secs(20), "the FIFO blocked vmsnap")?;
        assert_invariants(lab, true)
    })();
    let _ = std::fs::remove_file(&saved);
    let _ = std::fs::remove_dir_all(&saved);
    let _ = std::fs::remove_file(&xml);
    lab.write_config("");
    lab.reset_snapshots();
    res
}

/// Runs vmsnap and follows its peak resident memory (VmHWM) until it exits.
fn run_measured(lab: &Lab, args: &[&str]) -> (Output, u64, Duration) {
    let t = Instant::now();
    let mut child = lab.vmsnap_cmd(args, &[]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(s) = std::fs::read_to_string(&status) {
            if let Some(v) = s.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                peak_kib = peak_kib.max(v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (child.wait_with_output().unwrap(), peak_kib, t.elapsed())
}

/// A hostile guest: qemu-ga is replaced by a fake agent that answers the sync and the ping, then
/// answers the freeze with an endless line for 35 s (and later thaws politely). vmsnap drops the
/// line as it arrives: its memory stays small, the freeze times out (`freeze_timeout = 25`), the
/// guest is thawed on a fresh connection and the snapshot goes on crash-consistent. (Before the
/// cap, vmsnap kept the whole line: 1 GB of peak RSS in this test; 22 MB after.)
/// The guest is rebooted afterwards.
fn hostile_agent_port() -> Result<(), Failed> {
    let mut guard = lab_lock();
    let lab = guard.as_mut().unwrap();
    let fake_agent = r#"exec </dev/null >/dev/null 2>&1; sleep 1; kill -9 $(pidof qemu-ga); sleep 0.5
exec 3<>/dev/virtio-ports/org.qemu.guest_agent.0
# The port reads end-of-file while no host client is connected: keep reading.
while :; do sleep 0.05; while read -r line <&3; do
  case "$line" in
    *guest-sync-delimited*) id=$(echo "$line" | sed 's/.*"id": *\([0-9]*\).*/\1/'); printf '\377{"return": %s}\n' "$id" >&3;;
    *guest-ping*) printf '{"return": {}}\n' >&3;;
    *guest-fsfreeze-freeze*) tr '\000' y </dev/zero >&3 & p=$!; sleep 35; kill $p;;
    *guest-fsfreeze-thaw*) printf '{"return": 0}\n' >&3;;
    *guest-fsfreeze-status*) printf '{"return": "thawed"}\n' >&3;;
  esac
done; done"#;
    guest_start(lab, fake_agent)?;
    std::thread::sleep(Duration::from_secs(3));
    let res = (|| {
        lab.write_config("freeze_timeout = 25");
        let (out, peak_kib, took) = run_measured(lab, &["snapshot", DOMAIN, "--json", "--label", &label()]);
        eprintln!("METRIC hostile agent port: took {:.1} s, peak RSS {} KiB", took.as_secs_f64(), peak_kib);
        check(out.status.success(), format!("best effort goes on: {}", text(&out)))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        eprintln!("hostile agent port: warnings {}", r["warnings"]);
        check(r["consistency"] == "crash", format!("crash-consistent when the freeze fails: {r}"))?;
        check(r.to_string().len() < 20_000, "guest text reaches the report unabridged")?;
        check(peak_kib > 0 && peak_kib < 64 * 1024, format!("peak RSS {peak_kib} KiB"))?;
        check(took < Duration::from_secs(120), format!("took {took:?}"))
    })();
    // A new QEMU on the same disks: the next cases need the real agent.
    let disks = lab.vm.disks.clone();
    lab.vm.machine.kill();
    lab.vm = boot_vm(Some(disks));
    lab.write_config("");
    lab.reset_snapshots();
    res
}

/// SIGINT (Ctrl-C) and SIGTERM to `vmsnap snapshot --local` while the guest is frozen (direct,
/// with a `zfs snapshot` that takes 10 s): vmsnap undoes before it exits, the guest is thawed
/// and no journal is left.
fn interrupted_mid_freeze() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    for sig in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGTERM] {
        let child = lab
            .vmsnap_cmd(
                &["snapshot", DOMAIN, "--local", "--strategy", "direct", "--label", &label()],
                &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "10")],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let journal = lab.path("state/journal").join(format!("{DOMAIN}.json"));
        let t = Instant::now();
        // Frozen once the journal says freeze_started and the zfs call has begun.
        while !std::fs::read_to_string(&journal).unwrap_or_default().contains("zfs_snapshot_started") {
            check(t.elapsed() < Duration::from_secs(30), "the snapshot never reached its window")?;
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)?;
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{sig}: {err}");
        check(!out.status.success() && err.contains("interrupted") && err.contains("thawed"), format!("{sig}: {}", text(&out)))?;
        check(t.elapsed() < Duration::from_secs(9), format!("{sig}: vmsnap waited for the hung zfs"))?;
        assert_invariants(lab, true).map_err(|e| format!("{sig}: {}", e.message().unwrap_or_default()))?;
        lab.reset_snapshots();
    }
    Ok(())
}

/// The overlay directory fills up while the guest runs on its overlay: QEMU stops the VM on the
/// I/O error, vmsnap merges the overlay and resumes it, and the guest's data is whole.
fn full_overlay_directory() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let ov = lab.path("overlays");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs"]).arg(&ov).status()?;
    check(mounted.success(), "mounting a 3 MiB tmpfs on the overlay directory (needs root)")?;
    let res = (|| {
        // The writer runs through the snapshot: 12 MiB cannot fit in the 3 MiB overlay.
        guest_start(
            lab,
            "sleep 1; dd if=/dev/urandom of=/mnt/vdb/big bs=64k count=192 conv=fsync 2>/dev/null; sha256sum /mnt/vdb/big > /mnt/vdb/big.sha; sync",
        )?;
        let out =
            lab.vmsnap(&["snapshot", DOMAIN, "--no-quiesce", "--json", "--label", &label()], &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "8")]);
        check(out.status.success(), text(&out))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        eprintln!("full overlay directory: {}", r["warnings"]);
        check(r["warnings"].to_string().contains("I/O error"), format!("the I/O error pause is reported: {r}"))?;
        assert_invariants(lab, true)?;
        // The file the guest wrote across the full overlay is whole, read back from the disk.
        let mut last = String::new();
        for _ in 0..60 {
            last = guest_sh(lab, "cat /mnt/vdb/big.sha 2>/dev/null | cut -d' ' -f1; echo 3 > /proc/sys/vm/drop_caches; sha256sum /mnt/vdb/big | cut -d' ' -f1")?;
            let l: Vec<&str> = last.lines().collect();
            if l.len() == 2 && !l[0].is_empty() {
                return check(l[0] == l[1], format!("the guest's file is damaged: {last}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!("the guest's writer never finished: {last}").into())
    })();
    let _ = Command::new("umount").arg(&ov).status();
    lab.reset_snapshots();
    res
}

/// The guest writes after the switch, then QEMU is SIGKILLed with the guest on its overlay and
/// vmsnap dead too: `vmsnap recover` commits the overlay into the base offline, and a new QEMU on
/// the base reads what the guest wrote. Then the same with the VM restarted before recovery:
/// the overlay is kept (and reported), nothing is merged. Then with the overlays' headers
/// rewritten to name another file: kept, and that file untouched.
fn qemu_killed_on_the_overlay() -> Result<(), Failed> {
    let mut guard = lab_lock();
    let lab = guard.as_mut().unwrap();
    let n = 4242 + fastrand::u32(0..1000);
    let out = lab.vmsnap(&["snapshot", DOMAIN, "--no-quiesce", "--label", &label()], &[("VMSNAP_ABORT_AT", "after:switched")]);
    check(!out.status.success(), text(&out))?;
    guest_sh(lab, &format!("echo {n} > /mnt/vda/counter && sync"))?;
    let disks = lab.vm.disks.clone();
    lab.vm.machine.kill();
    let rec = lab.vmsnap(&["recover"], &[]);
    check(rec.status.success(), text(&rec))?;
    let said = String::from_utf8_lossy(&rec.stdout);
    eprintln!("recover with QEMU gone: {said}");
    check(said.contains("qemu-img"), format!("the overlay was committed offline: {said}"))?;
    check(walk(&lab.path("overlays")).is_empty(), "the overlay file is gone once committed")?;
    // The same disks, a new QEMU: the write made on the overlay is in the base.
    lab.vm = boot_vm(Some(disks.clone()));
    lab.write_config("");
    let got = guest_sh(lab, "cat /mnt/vda/counter")?;
    check(got.trim() == n.to_string(), format!("the base lost the guest's write: counter {got:?}, expected {n}"))?;

    // Restarted before recovery: never merge into a disk another QEMU runs.
    let m = n + 1;
    let out = lab.vmsnap(&["snapshot", DOMAIN, "--no-quiesce", "--label", &label()], &[("VMSNAP_ABORT_AT", "after:switched")]);
    check(!out.status.success(), text(&out))?;
    guest_sh(lab, &format!("echo {m} > /mnt/vda/counter && sync"))?;
    let config = std::fs::read_to_string(lab.config())?;
    lab.vm.machine.kill();
    lab.vm = boot_vm(Some(disks));
    // The journal names the old QMP socket; the config keeps pointing there too.
    std::fs::write(lab.config(), &config)?;
    let rec = lab.vmsnap(&["recover"], &[]);
    let said = String::from_utf8_lossy(&rec.stdout).into_owned();
    eprintln!("recover with QEMU restarted: {said}");
    check(rec.status.success() && said.contains("kept overlay"), text(&rec))?;
    let kept = walk(&lab.path("overlays"));
    check(kept.len() == 2, format!("both overlays kept: {kept:?}"))?;
    for k in kept {
        std::fs::remove_file(k)?;
    }
    lab.write_config("");

    // QEMU rewrote its overlays' headers (it had them open read-write) to name another file,
    // then died: recovery (root) does not follow the header into that file.
    let out = lab.vmsnap(&["snapshot", DOMAIN, "--no-quiesce", "--label", &label()], &[("VMSNAP_ABORT_AT", "after:switched")]);
    check(!out.status.success(), text(&out))?;
    let victim = lab.path("victim.raw");
    std::fs::write(&victim, vec![0x5a; 1 << 20])?;
    let before = sha256_file(&victim);
    let disks = lab.vm.disks.clone();
    lab.vm.machine.kill();
    let overlays = walk(&lab.path("overlays"));
    check(overlays.len() == 2, format!("overlays: {overlays:?}"))?;
    for ov in &overlays {
        let st = Command::new("qemu-img").args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b"]).arg(&victim).arg(ov).status()?;
        check(st.success(), "qemu-img rebase -u")?;
    }
    let rec = lab.vmsnap(&["recover"], &[]);
    let said = String::from_utf8_lossy(&rec.stdout).into_owned();
    eprintln!("recover after QEMU rewrote its overlays' headers: {said}");
    check(rec.status.success() && said.contains("kept overlay") && said.contains("victim.raw"), text(&rec))?;
    check(sha256_file(&victim) == before, "recovery wrote into the file the rewritten header named")?;
    for ov in walk(&lab.path("overlays")) {
        std::fs::remove_file(ov)?;
    }
    std::fs::remove_file(&victim)?;
    lab.vm = boot_vm(Some(disks));
    lab.write_config("");
    lab.reset_snapshots();
    assert_invariants(lab, true)
}

/// A snapshot the daemon's scheduler takes is announced with `SnapshotTaken` like a D-Bus one
/// (before the job layer only D-Bus-started snapshots were), and lands in `status.json`.
fn scheduled_snapshot_is_announced() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let (address, _bus, daemon) = start_daemon(lab)?;
    let monitor = Kill(
        Command::new("dbus-monitor")
            .args(["--address", &address])
            .arg("type='signal',interface='io.github.vmsnap.Agent1',member='SnapshotTaken'")
            .stdout(std::fs::File::create(lab.path("monitor.log"))?)
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    // Schedule this domain (and only it): an hourly snapshot is due at once.
    let cfg = std::fs::read_to_string(lab.config())?;
    let scheduled = cfg.replace(&format!("[domain.{DOMAIN}]\n"), &format!("[domain.{DOMAIN}]\nautosnap = true\nhourly = 2\n"));
    check(scheduled != cfg, "the test config has the domain's section")?;
    std::fs::write(lab.config(), &scheduled)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.0.id() as i32), nix::sys::signal::Signal::SIGHUP)?;
    let t = Instant::now();
    let said = loop {
        let said = std::fs::read_to_string(lab.path("monitor.log"))?;
        if said.contains("SnapshotTaken") {
            break said;
        }
        let log = std::fs::read_to_string(lab.path("daemon.log"))?;
        check(t.elapsed() < Duration::from_secs(60), format!("no SnapshotTaken for the scheduled snapshot: {said}\n{log}"))?;
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(monitor);
    eprintln!("scheduled snapshot announced: {}", said.lines().filter(|l| l.contains("string")).collect::<Vec<_>>().join(" | "));
    check(said.contains(&format!("string \"{DOMAIN}\"")) && said.contains("string \"app\""), said.clone())?;
    // Announced once status.json says so too.
    let status: Value = serde_json::from_str(&std::fs::read_to_string(lab.path("state/status.json"))?)?;
    let named = status["domains"][DOMAIN]["snapshot"].as_str().is_some_and(|n| said.contains(&format!("string \"{n}\"")));
    check(named, format!("status.json does not name the announced snapshot: {status}"))?;
    check(status["domains"][DOMAIN]["ok"] == true, format!("status.json: {status}"))?;
    let mut daemon = daemon;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.0.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    check(daemon.0.wait()?.success(), "the daemon stops on SIGTERM")?;
    lab.write_config("");
    assert_invariants(lab, true)?;
    lab.reset_snapshots();
    Ok(())
}

/// D-Bus `Cancel` of domain A's job (a RAM dump, slowed) while domain B's job has B frozen (a
/// `zfs snapshot` that takes 12 s): A's undo runs for A alone; B's job goes on and succeeds, B
/// thawed, and A is thawed and running with nothing of vmsnap left in it.
fn cancel_of_one_domain_leaves_the_other_alone() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    // Domain B: a second tiny guest whose disk is in the stand-in's dataset too.
    let disk = lab.path("disks/other0.qcow2");
    let rig = Rig::locate().expect("the rig");
    std::fs::copy(rig.dir().join("data-template.qcow2"), &disk)?;
    let opts = TinyVmOptions { disks: 1, memory_mib: MEMORY_MIB, disk_images: Some(vec![disk.clone()]), ..Default::default() };
    let (other, _q, _g, _) = rt().block_on(TinyVm::boot(&rig, &opts)).map_err(|e| e.to_string())?;
    drop((_q, _g));
    let cfg = std::fs::read_to_string(lab.config())?;
    let section =
        format!("\n[domain.other]\nqmp = \"{}\"\nqga = \"{}\"\n", other.machine.qmp_path.display(), other.machine.qga_path.display());
    std::fs::write(lab.config(), format!("max_parallel = 2\n{cfg}{section}"))?;
    let (address, _bus, _daemon) = start_daemon_with(lab, &[("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "12")])?;
    let busctl = |args: &[&str]| busctl(&address, args);
    let set_bandwidth = |bytes: u64| set_migration_bandwidth(lab, bytes);
    set_bandwidth(2 << 20);
    let job_of = |reply: &str| reply.split('"').nth(1).map(str::to_owned).ok_or(format!("no job path in {reply:?}"));
    let property = |job: &str, name: &str| busctl(&["get-property", "io.github.vmsnap.Agent1", job, "io.github.vmsnap.Job1", name]).1;
    let res = (|| {
        let (ok, reply) = busctl(&[&AGENT1[..], &["Snapshot", "sa{sv}", "other", "1", "strategy", "s", "direct"]].concat());
        check(ok, format!("Snapshot of other: {reply}"))?;
        let b_job = job_of(&reply)?;
        // B is frozen once its zfs snapshot has begun.
        let b_journal = lab.path("state/journal/other.json");
        let t = Instant::now();
        while !std::fs::read_to_string(&b_journal).unwrap_or_default().contains("zfs_snapshot_started") {
            check(t.elapsed() < Duration::from_secs(30), "B never reached its window")?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let (ok, reply) = busctl(&[&AGENT1[..], &["Snapshot", "sa{sv}", DOMAIN, "1", "memory", "s", "precopy"]].concat());
        check(ok, format!("Snapshot of {DOMAIN}: {reply}"))?;
        let a_job = job_of(&reply)?;
        let a_journal = lab.path(&format!("state/journal/{DOMAIN}.json"));
        while !std::fs::read_to_string(&a_journal).unwrap_or_default().contains("migration_started") {
            check(t.elapsed() < Duration::from_secs(60), "A's dump never started")?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let (ok, reply) = busctl(&["call", "io.github.vmsnap.Agent1", &a_job, "io.github.vmsnap.Job1", "Cancel"]);
        check(ok, format!("Cancel: {reply}"))?;
        while !property(&a_job, "State").contains("cancelled") {
            check(t.elapsed() < Duration::from_secs(120), format!("A did not end cancelled: {}", property(&a_job, "State")))?;
            std::thread::sleep(Duration::from_millis(100));
        }
        // (The stand-in holds its lock while it sleeps, so A's undo may wait for B's zfs call.)
        eprintln!("A cancelled after {:.1} s; B still in its window then: {}", t.elapsed().as_secs_f64(), b_journal.exists());
        while property(&b_job, "State").contains("running") {
            check(t.elapsed() < Duration::from_secs(120), "B's job did not finish")?;
            std::thread::sleep(Duration::from_millis(100));
        }
        let state = property(&b_job, "State");
        check(state.contains("succeeded"), format!("B: {state} {}", property(&b_job, "Result")))?;
        rt().block_on(other.machine.vmsnap_leftovers(true, &[]))?;
        rt().block_on(async {
            let mut q = Qga::connect(&other.machine.qga_path, agent(&other.machine.qga_path)).await.map_err(|e| e.to_string())?;
            check(q.freeze_status().await.map_err(|e| e.to_string())? == FreezeStatus::Thawed, "B left frozen")
        })?;
        eprintln!("cancel of A while B snapshots: A {}; B {}", property(&a_job, "State").trim(), state.trim());
        set_bandwidth(128 << 20); // the test's own throttle, before the invariants check it
        assert_invariants(lab, true)
    })();
    set_bandwidth(128 << 20);
    drop(other);
    let _ = std::fs::remove_file(&disk);
    lab.write_config("");
    lab.reset_snapshots();
    res
}

/// A daemon's job that panics (a bug, injected once right after the disks switched to their
/// overlays, the guest frozen) ends as failed, of kind `bug`, with its journal replayed as after a
/// kill: the guest thawed, the overlays merged. The domain is free again: the next snapshot, in
/// the same daemon, succeeds.
fn a_panicking_job_frees_its_domain() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let (address, _bus, _daemon) = start_daemon_with(lab, &[("VMSNAP_ABORT_AT", "panic:after:switched")])?;
    let busctl = |args: &[&str]| busctl(&address, args);
    let property = |job: &str, name: &str| busctl(&["get-property", "io.github.vmsnap.Agent1", job, "io.github.vmsnap.Job1", name]).1;
    let ended = |job: &str| -> Result<String, Failed> {
        let t = Instant::now();
        loop {
            let state = property(job, "State");
            if !state.contains("running") && !state.contains("waiting") {
                return Ok(state);
            }
            check(t.elapsed() < Duration::from_secs(120), format!("the job did not end: {state}"))?;
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let res = (|| {
        let (ok, reply) = busctl(&[&AGENT1[..], &["Snapshot", "sa{sv}", DOMAIN, "0"]].concat());
        check(ok, format!("Snapshot: {reply}"))?;
        let job = reply.split('"').nth(1).ok_or(format!("no job path in {reply:?}"))?.to_owned();
        let state = ended(&job)?;
        let (failure, result) = (property(&job, "Failure"), property(&job, "Result"));
        eprintln!("panicked job: {} {} {}", state.trim(), failure.trim(), result.trim());
        check(state.contains("failed") && failure.contains("bug"), format!("{state} {failure} {result}"))?;
        check(result.contains("bug in vmsnap") && result.contains("journal was replayed"), result.clone())?;
        rt().block_on(async {
            let mut q = Qga::connect(&lab.vm.machine.qga_path, agent(&lab.vm.machine.qga_path)).await.map_err(|e| e.to_string())?;
            check(q.freeze_status().await.map_err(|e| e.to_string())? == FreezeStatus::Thawed, "left frozen after the panic")
        })?;
        assert_invariants(lab, true)?;
        // The same daemon starts the domain's next job (it would answer busy if the panicked
        // one had kept it), and that one succeeds.
        let (ok, reply) = busctl(&[&AGENT1[..], &["Snapshot", "sa{sv}", DOMAIN, "0"]].concat());
        check(ok, format!("the next Snapshot: {reply}"))?;
        let job = reply.split('"').nth(1).ok_or(format!("no job path in {reply:?}"))?.to_owned();
        let state = ended(&job)?;
        check(state.contains("succeeded"), format!("the next snapshot: {state} {}", property(&job, "Result")))?;
        assert_invariants(lab, true)
    })();
    lab.reset_snapshots();
    res
}

/// A guest frozen while no vmsnap operation runs (as one resumed from a quiesced RAM snapshot
/// wakes) is thawed by `vmsnap recover`, which says so; a second run has nothing to do.
fn recover_thaws_a_guest_frozen_with_nothing_running() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let qga = lab.vm.machine.qga_path.clone();
    rt().block_on(async {
        let mut q = Qga::connect(&qga, agent(&qga)).await.map_err(|e| e.to_string())?;
        q.freeze().await.map_err(|e| e.to_string())?;
        check(q.freeze_status().await.map_err(|e| e.to_string())? == FreezeStatus::Frozen, "the guest did not freeze")
    })?;
    let out = lab.vmsnap(&["recover"], &[]);
    eprintln!("recover of a frozen guest: {}", text(&out).trim());
    check(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("thawed the guest"), text(&out))?;
    let again = lab.vmsnap(&["recover"], &[]);
    check(String::from_utf8_lossy(&again.stdout).contains("nothing to recover"), text(&again))?;
    assert_invariants(lab, true)
}

/// A RAM snapshot with `ram_compress = "zstd"` of a domain with an XML: the dump is a zstd save
/// image (libvirt's format 5) streamed through vmsnap, whose sha256 (taken as the bytes went
/// by) is the file's; the pause comes in phases; vmsnap's own resume path decompresses it into
/// a new QEMU, which runs on.
fn compressed_dump_streams_and_resumes() -> Result<(), Failed> {
    let guard = lab_lock();
    let lab = guard.as_ref().unwrap();
    let xml = lab.path("domain.xml");
    std::fs::write(&xml, format!("<domain type='qemu'><name>{DOMAIN}</name></domain>"))?;
    lab.write_config("");
    let cfg = std::fs::read_to_string(lab.config())?.replacen(
        "require_quiesce = false\n",
        &format!("require_quiesce = false\nram_compress = \"zstd\"\nxml = \"{}\"\n", xml.display()),
        1,
    );
    std::fs::write(lab.config(), cfg)?;
    let res = (|| {
        let out = lab.vmsnap(&["snapshot", DOMAIN, "--memory", "background", "--json", "--label", &label()], &[]);
        check(out.status.success(), text(&out))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        let dump = PathBuf::from(r["ram_dump"].as_str().ok_or("no ram_dump in the report")?);
        let size = std::fs::metadata(&dump)?.len();
        check(r["ram_compress"] == "zstd", format!("report: {r}"))?;
        check(r["ram_sha256"] == sha256_file(&dump).as_str(), "the in-flight checksum is not the file's")?;
        check(r["ram_file_bytes"] == size, format!("ram_file_bytes {} for a file of {size}", r["ram_file_bytes"]))?;
        let img = vmsnap::engine::saveimage::read(&dump)?.ok_or("the dump is not a save image")?;
        check(img.format == "zstd", format!("save image format {}", img.format))?;
        check(size < u64::from(MEMORY_MIB) << 20, format!("a zstd dump of {size} bytes for {MEMORY_MIB} MiB of RAM"))?;
        let phases = r["pause_phases"].as_array().ok_or("no pause_phases")?;
        check(phases.iter().any(|p| p[0] == "STOP event → disks switched"), format!("pause phases: {phases:?}"))?;
        eprintln!("zstd dump: {size} bytes; pause {} ms: {phases:?}", r["pause_ms"]);
        // vmsnap's resume path: a new QEMU on copies of the disks loads the decompressed stream.
        let copies: Vec<PathBuf> = (0..lab.vm.disks.len()).map(|i| lab.path(&format!("resume-{i}.qcow2"))).collect();
        for (from, to) in lab.vm.disks.iter().zip(&copies) {
            std::fs::copy(from, to)?;
        }
        let rig = Rig::locate().map_err(|e| e.to_string())?;
        let opts = TinyVmOptions {
            disks: copies.len(),
            memory_mib: MEMORY_MIB,
            disk_images: Some(copies.clone()),
            extra_args: vec!["-incoming".into(), "defer".into()],
        };
        let mut resumed = rt().block_on(vmsnap_testkit::rig::resume_kit::restore_state(&rig, &opts, &dump)).map_err(|e| e.to_string())?;
        let running = rt().block_on(async {
            let qmp = resumed.machine.qmp().await.map_err(|e| e.to_string())?;
            let st = qmp.execute(&qapi::qmp::query_status {}).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(st.running)
        })?;
        drop(resumed);
        for c in &copies {
            let _ = std::fs::remove_file(c);
        }
        check(running, "the VM resumed from the zstd dump does not run")
    })();
    // What the snapshot saved next to the disks (the XML), and the XML itself: the other cases
    // plant their own files there.
    let _ = std::fs::remove_dir_all(lab.path("disks/.vmsnap"));
    let _ = std::fs::remove_file(&xml);
    lab.write_config("");
    lab.reset_snapshots();
    res
}

type Case = fn() -> Result<(), Failed>;

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let mut trials: Vec<Trial> =
        VARIANTS.iter().map(|v| Trial::test(format!("kill_at_every_record::{}", v.name), move || matrix(v))).collect();
    let cases: &[(&str, Case)] = &[
        ("late_freeze_reply_leaves_the_guest_thawed", late_freeze_reply),
        ("agent_stopped_while_frozen_is_thawed_when_it_continues", agent_stopped_while_frozen),
        ("hung_zfs_in_the_window_thaws_first", hung_zfs_in_the_window),
        ("kill_during_a_ram_dump_cancels_the_migration", kill_during_ram_dump),
        ("dbus_cancel_during_a_dump_cancels_the_migration", dbus_cancel_during_a_dump),
        ("cli_through_the_daemon_returns_the_jobs_result", cli_through_the_daemon_returns),
        ("daemon_sigterm_mid_freeze_waits_for_the_thaw", daemon_sigterm_mid_freeze),
        ("cli_through_the_daemon_interrupted_or_orphaned", cli_through_the_daemon_interrupted_or_orphaned),
        ("scheduled_snapshot_is_announced", scheduled_snapshot_is_announced),
        ("cancel_of_one_domain_leaves_the_other_alone", cancel_of_one_domain_leaves_the_other_alone),
        ("a_panicking_job_frees_its_domain", a_panicking_job_frees_its_domain),
        ("recover_thaws_a_guest_frozen_with_nothing_running", recover_thaws_a_guest_frozen_with_nothing_running),
        ("compressed_dump_streams_and_resumes", compressed_dump_streams_and_resumes),
        ("full_overlay_directory_pauses_then_resumes", full_overlay_directory),
        ("stopped_only_when_known_down", stopped_only_when_known_down),
        ("planted_files_are_refused", planted_files_are_refused),
        ("interrupted_mid_freeze_thaws_before_exit", interrupted_mid_freeze),
        // These two kill and restart QEMU.
        ("hostile_agent_port_costs_no_memory", hostile_agent_port),
        ("qemu_killed_on_the_overlay_keeps_the_guests_writes", qemu_killed_on_the_overlay),
    ];
    trials.extend(vmsnap_testkit::support::timed_trials(cases));
    if !args.list {
        *lab_lock() = Some(Lab::boot());
    }
    let conclusion = libtest_mimic::run(&args, trials);
    drop(lab_lock().take());
    conclusion.exit();
}
