//! The snapshot engine end to end on real parts (ZFS lane, see `vmsnap_testkit::rig::lane`): inside the
//! OpenZFS VM a nested tiny guest runs on two disks that live on ZFS (a qcow2 file on a filesystem
//! and a raw zvol), and the real `vmsnap` binary snapshots it while the guest writes.
//!
//! The cases share one nested guest (it takes over a minute to boot under nested TCG) and run one
//! after the other; each checks the guest is left thawed and running with no overlay anywhere.

use libtest_mimic::{Arguments, Failed};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::time::Duration;
use vmsnap::qemu::qga::{FreezeStatus, Qga, Timeouts};
use vmsnap_testkit::rig::lane::{sh, vmsnap_bin};
use vmsnap_testkit::rig::resume_kit;
use vmsnap_testkit::rig::{Rig, TinyVm};
use vmsnap_testkit::support::{check, rt};

#[path = "engine_zfs/daemon.rs"]
mod daemon;

const CONFIG: &str = "/etc/vmsnap/vmsnap.toml";
const STATE: &str = "/var/lib/vmsnap";
/// RAM dumps on cheaper storage, as users lay it out on a ZFS host: a file system of a second
/// pool (`cheap`, on the VM's second disk, lz4).
const RAM_DIR: &str = "/cheap/vmsnap-ram";
const FS: &str = "tank/vms/demo";
const ZVOL: &str = "tank/vms/demo-data";

fn main() {
    vmsnap_testkit::rig::lane::dispatch(inside);
}

struct Guest {
    vm: TinyVm,
    /// The filesystem dataset holding its qcow2 disk, and its two disks.
    fs: String,
    disks: [String; 2],
}

static GUEST: Mutex<Option<Guest>> = Mutex::new(None);

/// The background RAM snapshot the guest was resumed from: (name, the guest's uptime before it).
static RAM_SNAPSHOT: Mutex<Option<(String, f64)>> = Mutex::new(None);

type Case = fn() -> Result<(), Failed>;

/// Agent deadlines for a nested TCG guest, which can take seconds to answer a sync while it
/// catches up after a freeze.
fn patient() -> Timeouts {
    Timeouts { sync: Duration::from_secs(60), other: Duration::from_secs(180), ..Timeouts::default() }
}

fn inside() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh("zpool create -f -O compression=lz4 -O mountpoint=/cheap cheap /dev/disk/by-id/virtio-pool2");
    sh(&format!("zfs create -p {FS} && zfs create -V 64M {ZVOL} && zfs create tank/vms/stopped && udevadm settle"));
    let rig = Rig::locate().expect("the rig's files on /mnt/rig");
    sh("cp /mnt/rig/data-template.qcow2 /tank/vms/stopped/disk0.qcow2");
    let vm = rt().block_on(async {
        let t = std::time::Instant::now();
        // The nested guest's disks on ZFS: the kit's disks as they were when it was saved.
        let (vm, mut qga) = resume_kit::restore_on_zfs(&rig, FS, ZVOL).await.expect("starting the nested guest from the resume kit");
        eprintln!("METRIC nested_guest_restore_to_agent_s={:.1}", t.elapsed().as_secs_f64());
        let mounts = qga.sh("grep /mnt/ /proc/mounts", Duration::from_secs(300)).await.unwrap().stdout_text();
        assert!(mounts.contains("/mnt/vda") && mounts.contains("/mnt/vdb"), "guest mounts: {mounts}");
        // The writer, for the whole run: a counter on both disks, rewritten every quarter second,
        // and every 4th round a 64 KiB block of random data with its sha256 in a side file.
        qga.exec_start("/bin/sh", &["-c", WRITER], &[]).await.unwrap();
        // Let the writer get going on both disks before the first snapshot.
        for _ in 0..600 {
            let c = qga.sh("cat /mnt/vdb/counter 2>/dev/null", Duration::from_secs(120)).await.unwrap().stdout_text();
            if c.trim().parse::<i64>().is_ok_and(|n| n >= 5) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        vm
    });
    write_config(&vm);
    *GUEST.lock().unwrap() = Some(Guest { vm, fs: FS.into(), disks: [format!("/{FS}/disk0.qcow2"), format!("/dev/zvol/{ZVOL}")] });

    let cases: &[(&str, Case)] = &[
        ("overlay_snapshot_is_app_consistent_and_leaves_nothing", overlay_snapshot),
        ("direct_snapshot", direct_snapshot),
        ("no_quiesce_is_crash_consistent", no_quiesce),
        ("require_quiesce_without_agent_refuses_and_changes_nothing", require_quiesce_refuses),
        ("a_locked_domain_is_busy", busy),
        ("stopped_vm_gets_a_plain_snapshot", stopped_vm),
        ("crash_at_every_step_then_recover", crash_and_recover),
        ("restore_killed_midway_is_finished_by_recover", restore_killed_midway),
        ("ram_precopy_snapshot", ram_precopy),
        ("ram_background_snapshot_resumed_by_vmsnap_restore", ram_background_resumes),
        ("config_domain_copy_resumed_beside_the_original", config_copy_resumed),
        ("list_shows_consistency", list_json),
        // Last: it runs on the guest resumed from RAM above, and stops its agent.
        ("daemon_takes_prunes_and_check_goes_critical", daemon::daemon_takes_prunes_and_check_goes_critical),
    ];
    let trials = vmsnap_testkit::support::timed_trials(cases);
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(mut g) = GUEST.lock().unwrap().take() {
        g.vm.machine.kill();
    }
    // The guest `vmsnap restore --resume` started is vmsnap's child no more: its own session.
    let _ = std::process::Command::new("pkill").args(["-9", "-f", "qemu-system-x86_64"]).status();
    for pool in ["tank", "cheap"] {
        let _ = std::process::Command::new("zpool").args(["destroy", "-f", pool]).status();
    }
    conclusion.exit();
}

/// Each counter file is replaced atomically (write + rename), so any instant has a whole one. A
/// block's side file is removed before the block is rewritten and written (then renamed) after,
/// so wherever a side file exists its block is complete: an app-consistent snapshot must show
/// every block matching its side file. A round forks about ten programs in a guest nested under
/// TCG inside TCG: with 50 ms between rounds the guest's CPU was busy for the whole lane,
/// slowing every agent reply the lane waits for; a quarter second still writes through every
/// freeze and overlay window several times.
const WRITER: &str = "i=0; while :; do i=$((i+1)); \
    for d in vda vdb; do echo $i > /mnt/$d/c.tmp && mv /mnt/$d/c.tmp /mnt/$d/counter; done; \
    if [ $((i % 4)) = 0 ]; then k=$((i / 4 % 8)); for d in vda vdb; do \
        rm -f /mnt/$d/blk.$k.sha; dd if=/dev/urandom of=/mnt/$d/blk.$k bs=64k count=1 2>/dev/null; \
        sha256sum /mnt/$d/blk.$k | cut -d' ' -f1 > /mnt/$d/s.tmp && mv /mnt/$d/s.tmp /mnt/$d/blk.$k.sha; done; fi; \
    sleep 0.25; done";

/// Checks every block that has a side file in the ext4 image `img`; returns how many matched.
fn verify_blocks(img: &str) -> Result<usize, Failed> {
    let mut verified = 0;
    for k in 0..8 {
        let want = sh(&format!("debugfs -R 'cat /blk.{k}.sha' {img} 2>/dev/null"));
        let want = want.trim();
        if want.is_empty() {
            continue;
        }
        let got =
            sh(&format!("rm -f /tmp/blk && debugfs -R 'dump /blk.{k} /tmp/blk' {img} 2>/dev/null; sha256sum /tmp/blk | cut -d' ' -f1"));
        check(got.trim() == want, format!("{img}: block {k} does not match its checksum ({} vs {want})", got.trim()))?;
        verified += 1;
    }
    Ok(verified)
}

fn write_config(vm: &TinyVm) {
    std::fs::create_dir_all("/etc/vmsnap").unwrap();
    std::fs::write("/etc/vmsnap/demo.xml", "<domain type='qemu'><name>demo</name></domain>\n").unwrap();
    sh("head -c 131072 /dev/urandom > /etc/vmsnap/demo_VARS.fd");
    let m = &vm.machine;
    let config = format!(
        r#"state_dir = "{STATE}"
ram_dir = "{RAM_DIR}"
[domain.demo]
qmp = "{qmp}"
qga = "{qga}"
disks = ["/{FS}/disk0.qcow2", "/dev/zvol/{ZVOL}"]
xml = "/etc/vmsnap/demo.xml"
nvram = "/etc/vmsnap/demo_VARS.fd"
start = [{start}]

[domain.strict]
qmp = "{qmp}"
qga = "/run/no-such-agent.sock"
disks = ["/{FS}/disk0.qcow2", "/dev/zvol/{ZVOL}"]
require_quiesce = true

[domain.offline2]
qmp = "/run/no-such-qemu-2.sock"
disks = ["/tank/vms/off-a/a.img", "/tank/vms/off-b/b.img"]
nvram = "/etc/vmsnap/offline2_VARS.fd"

[domain.stopped]
qmp = "/run/no-such-qemu.sock"
disks = ["/tank/vms/stopped/disk0.qcow2"]
xml = "/etc/vmsnap/demo.xml"
nvram = "/etc/vmsnap/demo_VARS.fd"
"#,
        qmp = m.qmp_path.display(),
        qga = m.qga_path.display(),
        start = start_argv(vm).iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", "),
    );
    std::fs::write(CONFIG, config).unwrap();
}

/// How the guest's QEMU was started, as a config domain's `start` says it: the program by its
/// absolute path, without the `-incoming defer` the resume kit started it with (vmsnap adds it).
fn start_argv(vm: &TinyVm) -> Vec<String> {
    let mut argv = vm.machine.argv().to_vec();
    argv[0] = sh(&format!("command -v {}", argv[0])).trim().to_owned();
    if let Some(i) = argv.iter().position(|a| a == "-incoming") {
        argv.drain(i..i + 2);
    }
    argv
}

fn vmsnap(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(vmsnap_bin());
    cmd.arg("--config").arg(CONFIG).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A label per run: two snapshots in the same second would otherwise share a name.
fn label() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("t{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn snapshot_json(args: &[&str]) -> Result<Value, Failed> {
    let label = label();
    let mut full = vec!["snapshot", "demo", "--json", "--label", &label];
    full.extend_from_slice(args);
    let out = vmsnap(&full, &[]);
    if !out.status.success() {
        return Err(format!("vmsnap {full:?} failed: {}", text(&out)).into());
    }
    Ok(serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON ({e}): {}", text(&out)))?)
}

/// QEMU's side ([`vmsnap_testkit::rig::Machine::vmsnap_leftovers`]) and the host's files: no overlay or
/// journal.
fn assert_clean_qemu() -> Result<(), Failed> {
    {
        let guest = GUEST.lock().unwrap();
        rt().block_on(guest.as_ref().unwrap().vm.machine.vmsnap_leftovers(true, &[]))?;
    }
    let overlays = sh(&format!("find {STATE}/overlays -type f 2>/dev/null | wc -l"));
    check(overlays.trim() == "0", format!("overlay files left: {overlays}"))?;
    let journals = sh(&format!("ls {STATE}/journal 2>/dev/null | wc -l"));
    check(journals.trim() == "0", format!("journals left: {journals}"))
}

/// [`assert_clean_qemu`], and the guest is thawed and can write.
fn assert_clean() -> Result<(), Failed> {
    assert_clean_qemu()?;
    let qga_path = GUEST.lock().unwrap().as_ref().unwrap().vm.machine.qga_path.clone();
    rt().block_on(async {
        let mut qga = Qga::connect(&qga_path, patient()).await.map_err(|e| e.to_string())?;
        check(qga.freeze_status().await.map_err(|e| e.to_string())? == FreezeStatus::Thawed, "guest left frozen")?;
        let w =
            qga.sh("echo ok > /mnt/vda/probe && sync && cat /mnt/vda/probe", Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
        check(w.stdout_text().trim() == "ok", "guest cannot write to its disk")
    })
}

/// A clone of a snapshot of the qcow2 disk and of the zvol: both pass e2fsck; the counters the
/// guest wrote to both disks are from one moment.
fn verify_snapshot(name: &str) -> Result<(), Failed> {
    sh(&format!("zfs clone {FS}@{name} tank/chk && zfs clone {ZVOL}@{name} tank/chk-data && udevadm settle"));
    let res = (|| {
        sh("qemu-img check -q /tank/chk/disk0.qcow2 && qemu-img convert -O raw /tank/chk/disk0.qcow2 /tmp/chk.raw");
        sh("e2fsck -fn /tmp/chk.raw");
        sh("e2fsck -fn /dev/zvol/tank/chk-data");
        let a: i64 =
            sh("debugfs -R 'cat /counter' /tmp/chk.raw 2>/dev/null").trim().parse().map_err(|e| format!("counter on disk0: {e}"))?;
        let b: i64 = sh("debugfs -R 'cat /counter' /dev/zvol/tank/chk-data 2>/dev/null")
            .trim()
            .parse()
            .map_err(|e| format!("counter on disk1: {e}"))?;
        let blocks = (verify_blocks("/tmp/chk.raw")?, verify_blocks("/dev/zvol/tank/chk-data")?);
        eprintln!("snapshot {name}: counters {a} / {b}, checksummed blocks verified {} / {}", blocks.0, blocks.1);
        check(blocks.0 > 0 && blocks.1 > 0, "no checksummed block in the snapshot")?;
        check(a > 0 && (a - b).abs() <= 1, format!("the two disks are not from one moment: counters {a} and {b}"))?;
        let saved = Path::new("/tank/chk/.vmsnap/demo");
        check(saved.join("domain.xml").exists() && saved.join("nvram.fd").exists(), "domain XML and nvram are in the snapshot")?;
        sh(&format!("cmp {}/nvram.fd /etc/vmsnap/demo_VARS.fd", saved.display()));
        Ok::<(), Failed>(())
    })();
    sh("rm -f /tmp/chk.raw");
    destroy_clones(&["tank/chk", "tank/chk-data"]);
    res
}

fn overlay_snapshot() -> Result<(), Failed> {
    let r = snapshot_json(&[])?;
    eprintln!("METRIC overlay report: {r}");
    check(r["consistency"] == "app", format!("consistency {}", r["consistency"]))?;
    let snaps = r["snapshots"].as_array().unwrap();
    check(snaps.len() == 2, format!("one snapshot per dataset: {snaps:?}"))?;
    check(r["freeze_ms"].as_f64().is_some(), "freeze time recorded")?;
    let name = r["name"].as_str().unwrap();
    // One `zfs snapshot` call: one transaction group for both datasets.
    let txg = sh(&format!("zfs get -H -p -o value createtxg {FS}@{name} {ZVOL}@{name}"));
    let txgs: Vec<&str> = txg.lines().collect();
    check(txgs.len() == 2 && txgs[0] == txgs[1], format!("createtxg differ: {txgs:?}"))?;
    let props = sh(&format!("zfs get -H -o value vmsnap:consistency,vmsnap:domain,vmsnap:freeze-ms {FS}@{name}"));
    check(props.lines().take(2).collect::<Vec<_>>() == ["app", "demo"], format!("properties: {props}"))?;
    assert_clean()?;
    verify_snapshot(name)
}

fn direct_snapshot() -> Result<(), Failed> {
    let r = snapshot_json(&["--strategy", "direct"])?;
    eprintln!("METRIC direct report: {r}");
    check(r["consistency"] == "app" && r["strategy"] == "direct", format!("{r}"))?;
    // The window closes after the snapshot: its length is recorded once the guest is thawed.
    let name = r["name"].as_str().unwrap();
    let freeze = sh(&format!("zfs get -H -o value vmsnap:freeze-ms {FS}@{name}"));
    check(freeze.trim().parse::<f64>().is_ok(), format!("vmsnap:freeze-ms of a direct snapshot: {freeze:?}"))?;
    assert_clean()?;
    verify_snapshot(r["name"].as_str().unwrap())
}

fn no_quiesce() -> Result<(), Failed> {
    let r = snapshot_json(&["--no-quiesce"])?;
    check(r["consistency"] == "crash", format!("{r}"))?;
    assert_clean()?;
    let r = snapshot_json(&["--no-quiesce", "--strategy", "direct"])?;
    check(r["consistency"] == "crash" && r["pause_ms"].as_f64().is_some(), format!("direct without freeze pauses: {r}"))?;
    assert_clean()
}

fn count_snapshots() -> usize {
    sh(&format!("zfs list -H -t snapshot -o name {FS}")).lines().count()
}

fn require_quiesce_refuses() -> Result<(), Failed> {
    let before = count_snapshots();
    let out = vmsnap(&["snapshot", "strict"], &[]);
    check(!out.status.success(), format!("must fail: {}", text(&out)))?;
    let err = String::from_utf8_lossy(&out.stderr);
    check(err.contains("require_quiesce") && err.contains("strict"), format!("the error names the policy and the domain: {err}"))?;
    check(count_snapshots() == before, "no snapshot taken")?;
    assert_clean()
}

fn busy() -> Result<(), Failed> {
    // Another operation on the domain, as far as the lock goes: this process holds it.
    let held = vmsnap::engine::lock::DomainLock::acquire(Path::new(STATE), "demo").map_err(|e| e.to_string())?;
    let out = vmsnap(&["snapshot", "demo"], &[]);
    drop(held);
    check(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("busy"), text(&out))?;
    assert_clean()
}

/// `zfs destroy` of clones a just-killed QEMU had open: udev may still probe a zvol for a moment.
fn destroy_clones(names: &[&str]) {
    for name in names {
        let script = format!("for i in $(seq 1 20); do zfs destroy {name} 2>/dev/null && exit 0; sleep 0.5; done; zfs destroy {name}");
        sh(&script);
    }
}

fn stopped_vm() -> Result<(), Failed> {
    let out = vmsnap(&["snapshot", "stopped", "--json"], &[]);
    check(out.status.success(), text(&out))?;
    let r: Value = serde_json::from_slice(&out.stdout)?;
    check(r["consistency"] == "offline" && r["snapshots"].as_array().unwrap().len() == 1, format!("{r}"))?;
    // The XML and nvram are inside the snapshot, as for a running VM.
    let saved = format!("/tank/vms/stopped/.zfs/snapshot/{}/.vmsnap/stopped", r["name"].as_str().unwrap());
    sh(&format!("cmp {saved}/domain.xml /etc/vmsnap/demo.xml && cmp {saved}/nvram.fd /etc/vmsnap/demo_VARS.fd"));
    Ok(())
}

/// A stopped two-dataset domain restored in place: refused while a newer snapshot exists (named;
/// a dry run shows the plan with that refusal and `--destroy-newer`, exit 0), then killed (-9) right after the first dataset's rollback with `--destroy-newer`; `vmsnap
/// recover` finishes the unit: both datasets and the nvram are the snapshot's, the newer
/// snapshot is gone, and no journal is left.
fn restore_killed_midway() -> Result<(), Failed> {
    sh("zfs create tank/vms/off-a && zfs create tank/vms/off-b");
    let put = |word: &str| {
        sh(&format!("echo {word} > /tank/vms/off-a/a.img && echo {word} > /tank/vms/off-b/b.img && echo {word}-nvram > /etc/vmsnap/offline2_VARS.fd"))
    };
    let take = |label: &str| -> Result<String, Failed> {
        let out = vmsnap(&["snapshot", "offline2", "--label", label, "--json"], &[]);
        check(out.status.success(), text(&out))?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        check(r["consistency"] == "offline" && r["snapshots"].as_array().is_some_and(|s| s.len() == 2), format!("{r}"))?;
        Ok(r["name"].as_str().unwrap_or_default().to_owned())
    };
    put("one");
    let first = take("r1")?;
    put("two");
    let second = take("r2")?;
    put("three");
    let out = vmsnap(&["restore", "offline2", &first], &[]);
    check(
        !out.status.success() && text(&out).contains(&format!("tank/vms/off-a@{second}")),
        format!("newer snapshot not named: {}", text(&out)),
    )?;
    // A dry run shows the whole plan with what the real run would refuse and the flag it
    // needs, and exits 0 (a plan was shown); it changes nothing.
    let out = vmsnap(&["restore", "offline2", &first, "--dry-run"], &[]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    check(
        out.status.success() && said.contains("roll back") && said.contains("refused:") && said.contains("(needs --destroy-newer)"),
        format!("dry run with newer snapshots: {}", text(&out)),
    )?;
    let out = vmsnap(&["restore", "offline2", &first, "--dry-run", "--json"], &[]);
    let plan: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
    check(plan["refused"][0]["needs"] == "--destroy-newer" && plan["newer"].to_string().contains(&second), format!("{plan}"))?;
    check(sh("cat /tank/vms/off-a/a.img").trim() == "three", "the dry run changed the disk")?;
    let out = vmsnap(&["restore", "offline2", &first, "--destroy-newer"], &[("VMSNAP_ABORT_AT", "after:restore_rolled_back")]);
    check(!out.status.success(), format!("vmsnap should have aborted: {}", text(&out)))?;
    let journal = format!("{STATE}/restore/offline2.json");
    check(Path::new(&journal).exists(), format!("no restore journal left behind: {}", text(&out)))?;
    let halfway = sh("cat /tank/vms/off-a/a.img /tank/vms/off-b/b.img");
    check(halfway.split_whitespace().collect::<Vec<_>>() == ["one", "three"], format!("killed after one rollback: {halfway}"))?;
    let rec = vmsnap(&["recover"], &[]);
    check(rec.status.success() && text(&rec).contains("finished the restore of offline2"), format!("recover: {}", text(&rec)))?;
    let after = sh("cat /tank/vms/off-a/a.img /tank/vms/off-b/b.img /etc/vmsnap/offline2_VARS.fd");
    check(after.split_whitespace().collect::<Vec<_>>() == ["one", "one", "one-nvram"], format!("after recover: {after}"))?;
    check(!Path::new(&journal).exists(), "the restore journal is left")?;
    let left = sh("zfs list -H -t snapshot -o name tank/vms/off-a tank/vms/off-b");
    check(!left.contains(&second) && left.lines().count() == 2, format!("snapshots after the restore: {left}"))?;
    let rec = vmsnap(&["recover"], &[]);
    check(
        rec.status.success() && String::from_utf8_lossy(&rec.stdout).contains("nothing to recover"),
        format!("second recover: {}", text(&rec)),
    )?;

    // Killed right after each of the other records this domain's restore writes (the plan, the
    // nvram): the recovery finishes the unit every time.
    for (i, point) in ["after:restore_planned", "after:restore_nvram_written"].into_iter().enumerate() {
        put("two");
        let newer = take(&format!("k{i}"))?;
        put("three");
        let out = vmsnap(&["restore", "offline2", &first, "--destroy-newer"], &[("VMSNAP_ABORT_AT", point)]);
        check(!out.status.success() && Path::new(&journal).exists(), format!("{point}: no abort or no journal: {}", text(&out)))?;
        // The first by `vmsnap recover`, the second by a daemon's start-up (the same call).
        let (ok, said) = if i == 0 {
            let rec = vmsnap(&["recover"], &[]);
            (rec.status.success(), text(&rec))
        } else {
            daemon_start_recovers(&journal)?
        };
        check(ok && said.contains("finished the restore of offline2"), format!("{point}: recover: {said}"))?;
        let after = sh("cat /tank/vms/off-a/a.img /tank/vms/off-b/b.img /etc/vmsnap/offline2_VARS.fd");
        check(after.split_whitespace().collect::<Vec<_>>() == ["one", "one", "one-nvram"], format!("{point}: after recover: {after}"))?;
        check(
            !Path::new(&journal).exists() && !sh("zfs list -H -t snapshot -o name tank/vms/off-a").contains(&newer),
            format!("{point}: left behind"),
        )?;
    }

    // Killed again, and this time someone snapshots by hand before the recovery: recovery does
    // not destroy that snapshot to finish the rollback; it says where the unit stands.
    let third = take("r3")?;
    put("four");
    let out = vmsnap(&["restore", "offline2", &first, "--destroy-newer"], &[("VMSNAP_ABORT_AT", "after:restore_rolled_back")]);
    check(!out.status.success() && Path::new(&journal).exists(), format!("second abort: {}", text(&out)))?;
    sh("zfs snapshot tank/vms/off-b@byhand");
    let rec = vmsnap(&["recover"], &[]);
    check(
        rec.status.success() && text(&rec).contains("byhand was taken since: not finished"),
        format!("recover with a snapshot taken since: {}", text(&rec)),
    )?;
    check(!Path::new(&journal).exists(), "the abandoned restore's journal is left")?;
    let left = sh("zfs list -H -t snapshot -o name tank/vms/off-b");
    check(left.contains("@byhand") && left.contains(&third), format!("recovery destroyed snapshots: {left}"))
}

/// Starts `vmsnap daemon` (no D-Bus, a config with only `offline2`, not scheduled) until
/// `journal` is gone, then stops it: whether it exited 0, and its log.
fn daemon_start_recovers(journal: &str) -> Result<(bool, String), Failed> {
    let config = "/etc/vmsnap/recover-only.toml";
    std::fs::write(
        config,
        format!(
            "state_dir = \"{STATE}\"\nram_dir = \"{RAM_DIR}\"\n[domain.offline2]\nqmp = \"/run/no-such-qemu-2.sock\"\n\
             disks = [\"/tank/vms/off-a/a.img\", \"/tank/vms/off-b/b.img\"]\nnvram = \"/etc/vmsnap/offline2_VARS.fd\"\nautosnap = false\n"
        ),
    )?;
    let log = "/tmp/recover-daemon.log";
    let mut daemon = std::process::Command::new(vmsnap_bin())
        .args(["--config", config, "daemon", "--bus", "none"])
        .env("VMSNAP_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let t = std::time::Instant::now();
    while Path::new(journal).exists() && t.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    sh(&format!("kill -TERM {}", daemon.id()));
    let status = daemon.wait()?;
    Ok((status.success() && !Path::new(journal).exists(), std::fs::read_to_string(log)?))
}

/// Real kills where real OpenZFS is part of the recovery (the host lane's `faults_host` kills
/// every record of every variant against real QEMU and its agent, so overlay set-up, freeze and
/// switch are covered there): a `zfs snapshot` that happened but was not yet recorded (recovery
/// asks ZFS), the merge into a disk on ZFS; and a background RAM dump killed while QEMU streams
/// it, and once its snapshot exists unrecorded (the dump must stay, referenced).
fn crash_and_recover() -> Result<(), Failed> {
    let rounds: &[(&str, &[&str])] = &[
        ("before:zfs_snapshot_done", &[]),
        ("after:merged", &[]),
        ("after:resumed", &["--memory", "background"]),
        ("before:zfs_snapshot_done", &["--memory", "background"]),
    ];
    for (point, extra) in rounds {
        let label = label();
        let mut args = vec!["snapshot", "demo", "--label", &label];
        args.extend_from_slice(extra);
        let out = vmsnap(&args, &[("VMSNAP_ABORT_AT", point)]);
        check(!out.status.success(), format!("{point}: vmsnap should have aborted: {}", text(&out)))?;
        check(Path::new(&format!("{STATE}/journal/demo.json")).exists(), format!("{point}: no journal left behind: {}", text(&out)))?;
        let rec = vmsnap(&["recover"], &[]);
        check(rec.status.success(), format!("{point}: recover failed: {}", text(&rec)))?;
        eprintln!("after abort at {point} {extra:?}: {}", String::from_utf8_lossy(&rec.stdout).trim());
        assert_clean().map_err(|e| format!("after abort at {point}: {}", e.message().unwrap_or_default()))?;
        assert_dumps_referenced().map_err(|e| format!("after abort at {point}: {}", e.message().unwrap_or_default()))?;
        if point.starts_with("before:zfs_snapshot_done") {
            let name = sh(&format!("zfs list -H -o name -t snapshot {FS} | grep -c '_{label}$' || true"));
            check(name.trim() == "1", format!("{point}: the snapshot taken before the kill is kept"))?;
        }
    }
    Ok(())
}

/// Every RAM dump file is named by a snapshot whose checksum it matches, and every snapshot that
/// names a dump has it.
fn assert_dumps_referenced() -> Result<(), Failed> {
    let named = sh("zfs get -H -o name,value -t snapshot -r vmsnap:ram-dump,vmsnap:ram-sha256 tank");
    let mut dumps = std::collections::BTreeMap::new();
    let mut sums = std::collections::BTreeMap::new();
    for line in named.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() == 2 && f[1] != "-" {
            if f[1].starts_with('/') {
                dumps.insert(f[0].to_owned(), f[1].to_owned());
            } else {
                sums.insert(f[0].to_owned(), f[1].to_owned());
            }
        }
    }
    for (snap, dump) in &dumps {
        let sum = sh(&format!("sha256sum {dump} 2>/dev/null | cut -d' ' -f1 || true"));
        check(Some(sum.trim()) == sums.get(snap).map(String::as_str), format!("{snap}: dump {dump} missing or not matching its checksum"))?;
    }
    for file in sh(&format!("find {RAM_DIR} -type f 2>/dev/null || true")).lines() {
        check(dumps.values().any(|d| d == file), format!("RAM dump {file} is referenced by no snapshot"))?;
    }
    Ok(())
}

fn list_json() -> Result<(), Failed> {
    let out = vmsnap(&["list", "demo", "--json"], &[]);
    check(out.status.success(), text(&out))?;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    check(rows.len() == count_snapshots() * 2, format!("{} rows for {} snapshots on two datasets", rows.len(), count_snapshots()))?;
    check(rows.iter().any(|r| r["consistency"] == "app") && rows.iter().any(|r| r["consistency"] == "crash"), format!("{rows:?}"))
}

/// The RAM dump is private (dir 0700, file 0600), its checksum is the recorded one, and the
/// snapshot properties say where it is.
fn check_dump(r: &Value) -> Result<String, Failed> {
    use std::os::unix::fs::PermissionsExt;
    check(r["consistency"] == "ram", format!("{r}"))?;
    let dump = r["ram_dump"].as_str().ok_or("no ram_dump in the report")?.to_owned();
    // In ram_dir, on the second pool's ZFS file system.
    let fs_type = sh(&format!("stat -f -c %T {dump}"));
    check(dump.starts_with(RAM_DIR) && fs_type.trim() == "zfs", format!("dump {dump} on {}, not in {RAM_DIR} on ZFS", fs_type.trim()))?;
    let meta = std::fs::metadata(&dump)?;
    check(meta.permissions().mode() & 0o777 == 0o600, format!("dump mode {:o}", meta.permissions().mode()))?;
    let dir_mode = std::fs::metadata(Path::new(&dump).parent().unwrap())?.permissions().mode() & 0o777;
    check(dir_mode == 0o700, format!("dump dir mode {dir_mode:o}"))?;
    let sum = sh(&format!("sha256sum {dump}"));
    check(Some(sum.split_whitespace().next().unwrap_or("")) == r["ram_sha256"].as_str(), "checksum matches")?;
    let name = r["name"].as_str().unwrap();
    let props = sh(&format!(
        "zfs get -H -o value vmsnap:consistency,vmsnap:ram-dump,vmsnap:ram-sha256,vmsnap:machine,vmsnap:ram-format,vmsnap:ram-quiesced,vmsnap:ram-bytes,vmsnap:ram-compress,vmsnap:ram-size {FS}@{name}"
    ));
    let props: Vec<&str> = props.lines().collect();
    check(
        props[0] == "ram" && props[1] == dump && Some(props[2]) == r["ram_sha256"].as_str() && props[3].starts_with("pc"),
        format!("properties {props:?}"),
    )?;
    // The config domain has an XML: the dump is a libvirt save image; it was quiesced; the RAM
    // size a resume must match is recorded.
    check(props[4] == "libvirt-save" && props[5] == "yes" && props[6].parse::<u64>().is_ok(), format!("properties {props:?}"))?;
    // Streamed through vmsnap: uncompressed by default, its size recorded (the checksum above was
    // taken in flight and matches the file).
    check(props[7] == "none" && props[8] == meta.len().to_string(), format!("properties {props:?}, file {} bytes", meta.len()))?;
    check(r["pause_phases"].as_array().is_some_and(|p| !p.is_empty()), format!("pause phases: {}", r["pause_phases"]))?;
    let image = vmsnap::engine::saveimage::read(Path::new(&dump)).map_err(|e| e.to_string())?.ok_or("not a save image")?;
    check(image.xml.contains("<name>demo</name>") && image.was_running, format!("save image header: {image:?}"))?;
    check(r["pause_ms"].as_f64().is_some() && r["freeze_ms"].as_f64().is_some(), "pause and freeze recorded")?;
    Ok(dump)
}

fn ram_precopy() -> Result<(), Failed> {
    let r = snapshot_json(&["--memory", "precopy"])?;
    eprintln!("METRIC precopy report: {r}");
    check_dump(&r)?;
    assert_clean()
}

/// `restore demo SNAP --as demo2 --resume` while the original runs: clones, a `[domain.demo2]`
/// appended to the configuration (its disks on the clones, its own sockets and nvram, its
/// `start` rewritten, unscheduled), its QEMU started from the dump by vmsnap, thawed, its uptime
/// going on from the snapshot; the original (paused meanwhile) runs on. (`verify --boot` makes and removes such a
/// copy the same way: the libvirt lane runs it, `scripts/demo` runs it on this config domain.)
fn config_copy_resumed() -> Result<(), Failed> {
    let (name, before) = RAM_SNAPSHOT.lock().unwrap().clone().ok_or("no RAM snapshot was resumed")?;
    let original_qga = GUEST.lock().unwrap().as_ref().ok_or("no guest")?.vm.machine.qga_path.clone();
    let original_qmp = GUEST.lock().unwrap().as_ref().ok_or("no guest")?.vm.machine.qmp_path.clone();
    let config_before = std::fs::read_to_string(CONFIG)?;
    // The original is paused meanwhile: its QEMU, sockets and image locks stay (the copy must
    // keep off them all the same), but two busy guests nested under TCG would double the copy's
    // time for nothing this case checks.
    original_vcpus(&original_qmp, false)?;
    let t = std::time::Instant::now();
    let out = vmsnap(&["restore", "demo", &name, "--as", "demo2", "--resume", "--json"], &[("VMSNAP_LOG", "vmsnap=debug")]);
    eprintln!("restore --as demo2 --resume, its log:\n{}", String::from_utf8_lossy(&out.stderr));
    let continued = original_vcpus(&original_qmp, true);
    let res = (|| {
        continued?;
        check(out.status.success(), format!("restore --as demo2 --resume: {}", text(&out)))?;
        let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON ({e}): {}", text(&out)))?;
        eprintln!("METRIC restore --as --resume of a config domain: {:.1} s; {report}", t.elapsed().as_secs_f64());
        let clones = report["clones"].to_string();
        check(clones.contains("tank/vms/demo2") && clones.contains("tank/vms/demo2-data"), format!("clones: {report}"))?;
        check(report["clock_set"] == true && report["thawed"].as_i64().is_some(), format!("report: {report}"))?;
        let cfg = vmsnap::config::Config::load(Path::new(CONFIG)).map_err(|e| e.to_string())?;
        let copy = cfg.domains.get("demo2").ok_or("no [domain.demo2] in the configuration")?;
        check(!copy.policy.autosnap, "the copy is scheduled")?;
        check(
            copy.disks == [PathBuf::from("/tank/vms/demo2/disk0.qcow2"), PathBuf::from("/dev/zvol/tank/vms/demo2-data")],
            format!("the copy's disks: {:?}", copy.disks),
        )?;
        let qga = copy.qga.clone().ok_or("the copy has no qga")?;
        check(qga != original_qga && copy.start.iter().any(|a| a.contains("demo2")), format!("the copy's start: {:?}", copy.start))?;
        let uptime = guest_uptime(&qga)?;
        eprintln!("METRIC the copy's uptime {uptime:.1} s, the original's {before:.1} s before the snapshot");
        check(uptime >= before, format!("the copy rebooted: uptime {uptime} < {before}"))?;
        guest_uptime(&original_qga).map(drop)
    })();
    // Removed by hand, as a user would: its QEMU quit, its clones destroyed, its table gone.
    if let Ok(cfg) = vmsnap::config::Config::load(Path::new(CONFIG)) {
        if let Some(copy) = cfg.domains.get("demo2") {
            let qmp = copy.qmp.clone();
            rt().block_on(async {
                if let Ok(q) = vmsnap::qemu::qmp::Qmp::connect(&qmp, Duration::from_secs(5)).await {
                    let _ = q.execute(&qapi::qmp::quit {}).await;
                }
            });
        }
    }
    // Only what was made: a failed copy removed its own.
    let made = sh("zfs list -H -o name");
    destroy_clones(&["tank/vms/demo2", "tank/vms/demo2-data"].into_iter().filter(|d| made.lines().any(|l| l == *d)).collect::<Vec<_>>());
    std::fs::write(CONFIG, config_before)?;
    res
}

/// Stops (`run` false) or continues the original guest's vCPUs over its QMP socket.
fn original_vcpus(qmp: &Path, run: bool) -> Result<(), Failed> {
    rt().block_on(async {
        let q = vmsnap::qemu::qmp::Qmp::connect(qmp, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        let done = if run { q.execute(&qapi::qmp::cont {}).await.map(drop) } else { q.execute(&qapi::qmp::stop {}).await.map(drop) };
        done.map_err(|e| format!("{} the original: {e}", if run { "cont" } else { "stop" }).into())
    })
}

fn guest_uptime(qga_path: &Path) -> Result<f64, Failed> {
    rt().block_on(async {
        let mut qga = Qga::connect(qga_path, patient()).await.map_err(|e| e.to_string())?;
        let out = qga.sh("cut -d' ' -f1 /proc/uptime", Duration::from_secs(120)).await.map_err(|e| e.to_string())?;
        Ok(out.stdout_text().trim().parse::<f64>().map_err(|e| e.to_string())?)
    })
}

fn ram_background_resumes() -> Result<(), Failed> {
    let qga_path = GUEST.lock().unwrap().as_ref().unwrap().vm.machine.qga_path.clone();
    let before = guest_uptime(&qga_path)?;
    let r = snapshot_json(&["--memory", "background"])?;
    eprintln!("METRIC background report: {r}");
    let dump = check_dump(&r)?;
    assert_clean()?;
    let name = r["name"].as_str().unwrap().to_owned();
    // Frozen around the pause (ram_quiesce): the disks alone are app-consistent, for when the
    // dump is pruned.
    verify_snapshot(&name)?;
    // The guest stopped, then resumed the way a user would: `vmsnap restore --resume` rolls its
    // datasets back, starts its QEMU from the config's `start` with `-incoming defer`, loads the
    // dump, thaws the guest (saved frozen: ram_quiesce) and sets its clock.
    GUEST.lock().unwrap().as_mut().ok_or("no guest")?.vm.machine.kill();
    let t = std::time::Instant::now();
    let out = vmsnap(&["restore", "demo", &name, "--resume", "--json"], &[("VMSNAP_LOG", "vmsnap=debug")]);
    eprintln!("restore --resume, its log:\n{}", String::from_utf8_lossy(&out.stderr));
    check(out.status.success(), format!("vmsnap restore --resume: {}", text(&out)))?;
    let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON ({e}): {}", text(&out)))?;
    eprintln!("METRIC vmsnap restore --resume of a config domain: {:.1} s; {report}", t.elapsed().as_secs_f64());
    check(report["resumed_from"]["path"] == dump.as_str(), format!("resumed from the dump: {report}"))?;
    check(report["thawed"].as_i64().is_some_and(|n| n >= 0), format!("the guest saved frozen was not thawed: {report}"))?;
    check(report["clock_set"] == true, format!("the guest clock was not set: {report}"))?;
    check(report["rolled_back"].as_array().is_some_and(|r| r.len() == 2), format!("both datasets rolled back: {report}"))?;
    let uptime = guest_uptime(&qga_path)?;
    eprintln!("restored guest: uptime {uptime} s (was {before} s before the snapshot)");
    check(uptime >= before, format!("the restored guest rebooted: uptime {uptime} < {before}"))?;
    let frozen = rt().block_on(async {
        let mut qga = Qga::connect(&qga_path, patient()).await.map_err(|e| e.to_string())?;
        qga.freeze_status().await.map_err(|e| e.to_string())
    })?;
    check(frozen == vmsnap::qemu::qga::FreezeStatus::Thawed, "the resumed guest is still frozen")?;
    *RAM_SNAPSHOT.lock().unwrap() = Some((name.clone(), before));
    // Refused while it runs, as for any restore.
    let again = vmsnap(&["restore", "demo", &name, "--resume"], &[]);
    check(!again.status.success() && text(&again).contains("stop it first"), format!("a second resume: {}", text(&again)))
}
