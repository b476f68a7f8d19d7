//! vmsnap's three ways in on real libvirtd (the libvirt lane: the ZFS lane plus libvirt and a
//! system bus inside the OpenZFS VM). The Debian package installs vmsnap, the hook and the bus policy; the
//! daemon serves `io.github.vmsnap.Agent1` on a real system bus; libvirtd restores the enrolled
//! guest saved in the libvirt kit (see `vmsnap_testkit::rig::libvirt`) onto two ZFS datasets, and:
//! the hook registers it → a `Snapshot` over D-Bus gives one consistent zfs snapshot of both
//! datasets while libvirt keeps its own monitor → `virsh destroy` unregisters it → it starts fine
//! with the daemon down → a libvirtd restart (`reconnect`) registers it again → a daemon restart
//! keeps it, and drops it once it stopped unheard.
//!
//! The cases run in order on one libvirtd and one guest; each says what it needs.

use libtest_mimic::{Arguments, Failed};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmsnap::qemu::qmp::Qmp;
use vmsnap_testkit::rig::lane::sh;
use vmsnap_testkit::rig::libvirt::{self, virsh, LibvirtKit, Libvirtd, DOMAIN, IMAGES};
use vmsnap_testkit::rig::remote;
use vmsnap_testkit::rig::Rig;
use vmsnap_testkit::support::{self, check, rt, COUNTER_WRITER};

const CONFIG: &str = "/etc/vmsnap/vmsnap.toml";
/// The vmsnap this lane runs: the one the package installed.
const VMSNAP: &str = "/usr/bin/vmsnap";
const STATE: &str = "/var/lib/vmsnap";
const LOG: &str = "/var/log/vmsnap-daemon.log";
const FS: &str = "tank/vms/lv";
const DATA: &str = "tank/vms/lv-data";
const AGENT: &str = "io.github.vmsnap.Agent1";
const PATH: &str = "/io/github/vmsnap/Agent1";

fn main() {
    vmsnap_testkit::rig::lane::dispatch_libvirt(inside);
}

struct Lane {
    libvirtd: Option<Libvirtd>,
    daemon: Option<Child>,
    /// The last RAM snapshot's report, and the guest's uptime (s) just before it.
    ram: Option<(serde_json::Value, f64)>,
    /// A zstd-compressed dump (libvirt's format 5).
    zstd_dump: Option<String>,
    /// The zstd RAM snapshot's report.
    zstd: Option<serde_json::Value>,
    /// The disk-only (app-consistent) snapshot's name.
    disk_snap: Option<String>,
}

static LANE: Mutex<Lane> = Mutex::new(Lane { libvirtd: None, daemon: None, ram: None, zstd_dump: None, zstd: None, disk_snap: None });

type Case = fn() -> Result<(), Failed>;

fn inside() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    // An administrator's root shell, not the agent's: qemu-ga runs commands with umask 077, which
    // leaves the kernel unreadable for libvirt-qemu and the system bus socket closed to non-root.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh(&format!("zfs create -p {FS} && zfs create {DATA}"));
    // The saved definition's kernel and initramfs, where it expects them.
    sh(&format!("mkdir -p {IMAGES} && cp /mnt/rig/vmlinux /mnt/rig/initrd.gz {IMAGES}/"));
    std::fs::create_dir_all("/etc/vmsnap").unwrap();
    // Registered domains use [template.default]; no scheduled snapshot while the cases run.
    std::fs::write(CONFIG, format!("state_dir = \"{STATE}\"\n[template.default]\nautosnap = false\n")).unwrap();

    let cases: &[(&str, Case)] = &[
        ("the_package_installs_hook_unit_and_bus_policy", package_installs),
        ("a_started_domain_registers_through_the_hook", started_registers),
        ("snapshot_over_dbus_is_consistent_under_libvirt", snapshot_over_dbus),
        ("ram_snapshot_over_dbus_under_libvirt", ram_snapshot_over_dbus),
        ("restore_as_resume_beside_the_running_original", restore_as_resume),
        ("non_root_and_malformed_calls_change_nothing", refused_calls),
        ("polkit_grants_a_non_root_caller", polkit_grants_a_non_root_caller),
        ("destroy_unregisters", destroy_unregisters),
        // With the original stopped: a nested TCG copy beside a running one takes minutes.
        ("verify_boot_resumes_a_scratch_copy", verify_boot),
        ("verify_boot_killed_then_recover_removes_the_copy", verify_boot_killed),
        ("virsh_restores_a_vmsnap_dump", virsh_restores_a_vmsnap_dump),
        ("vmsnap_restore_resumes_a_zstd_dump", vmsnap_restore_resumes_a_zstd_dump),
        ("verify_and_a_damaged_dump", verify_and_a_damaged_dump),
        ("disk_only_restore_in_place", disk_only_restore_in_place),
        ("a_domain_starts_with_the_daemon_down", starts_with_daemon_down),
        ("a_libvirtd_restart_registers_again", reconnect_registers),
        ("the_daemon_keeps_live_registrations_and_drops_stale_ones", daemon_restarts),
        ("enroll_and_unenroll_through_virsh", enroll_and_unenroll),
        // Last: it takes the host's vmsnap state away.
        ("a_host_that_lost_the_domain_resumes_it_from_the_target", disaster_resume),
    ];
    let trials = vmsnap_testkit::support::timed_trials(cases);
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = virsh(&["destroy", DOMAIN]);
    let mut lane = LANE.lock().unwrap();
    if let Some(mut d) = lane.daemon.take() {
        let _ = d.kill();
        let _ = d.wait();
    }
    lane.libvirtd.take();
    drop(lane);
    let _ = Command::new("zpool").args(["destroy", "-f", "tank"]).status();
    conclusion.exit();
}

/// The Debian package of the build under test (made on the host by the lane, from the same
/// binary), installed with dpkg; then a system bus with the policy it installed, the daemon on it,
/// then libvirtd (which reads its hooks when it starts). The lane runs the installed files.
fn package_installs() -> Result<(), Failed> {
    // The config the lane wrote is the admin's: dpkg keeps it (--force-confold, as a person
    // answering "keep" would).
    let out = sh("dpkg -i --force-confold /mnt/share/debian/vmsnap_*.deb 2>&1 && dpkg -s vmsnap | grep -E '^(Status|Version)'");
    eprintln!("dpkg: {}", out.trim());
    check(out.contains("install ok installed"), format!("dpkg -i: {out}"))?;
    let hook = std::fs::read_to_string("/etc/libvirt/hooks/qemu.d/vmsnap")?;
    check(hook.contains(&format!("VMSNAP=${{VMSNAP:-{VMSNAP}}}")), format!("the hook runs the installed vmsnap: {hook}"))?;
    check(
        std::fs::read_to_string("/lib/systemd/system/vmsnap.service")?.contains(&format!("ExecStart={VMSNAP} ")),
        "the unit runs /usr/bin/vmsnap",
    )?;
    check(std::fs::read_to_string(CONFIG)?.contains("autosnap = false"), "dpkg left the existing config alone")?;
    // `vmsnap setup`, the way without the package, is idempotent under another root.
    let root = "/tmp/setup-root";
    let out = Command::new(VMSNAP).args(["--config", CONFIG, "setup", "--root", root]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    check(out.status.success() && text.contains("libvirtd"), format!("vmsnap setup: {text}"))?;
    let again = Command::new(VMSNAP).args(["--config", CONFIG, "setup", "--root", root, "--dry-run"]).output()?;
    let again = String::from_utf8_lossy(&again.stdout);
    check(!again.contains("install") && !again.contains("update"), format!("a second setup would change things: {again}"))?;

    sh("mkdir -p /run/dbus && dbus-daemon --system --fork");
    // polkit, as a system with libvirt has it (started here: no systemd in the rig's VM).
    sh("/usr/lib/polkit-1/polkitd --no-debug >/var/log/polkitd.log 2>&1 &");
    start_daemon()?;
    let t = Instant::now();
    let lv = Libvirtd::start(Duration::from_secs(900))?;
    eprintln!("METRIC libvirtd first connection after {:.1} s", t.elapsed().as_secs_f64());
    LANE.lock().unwrap().libvirtd = Some(lv);
    Ok(())
}

fn start_daemon() -> Result<(), Failed> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(LOG)?;
    let child = Command::new(VMSNAP)
        .args(["--config", CONFIG, "daemon", "--bus", "system"])
        .env("VMSNAP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    LANE.lock().unwrap().daemon = Some(child);
    wait_for("the daemon on the system bus", Duration::from_secs(60), || call(false, "Status", &[]).0)
}

fn stop_daemon() -> Result<(), Failed> {
    let child = LANE.lock().unwrap().daemon.take();
    if let Some(mut child) = child {
        sh(&format!("kill -TERM {}", child.id()));
        let status = child.wait()?;
        check(status.success(), format!("daemon exit {status}"))?;
    }
    Ok(())
}

fn wait_for(what: &str, limit: Duration, cond: impl FnMut() -> bool) -> Result<(), Failed> {
    support::wait_for(what, limit, Duration::from_millis(500), cond, || std::fs::read_to_string(LOG).unwrap_or_default())
}

/// `busctl --system call` of an Agent1 method, as root or as nobody: (succeeded, output).
fn call(nobody: bool, method: &str, args: &[&str]) -> (bool, String) {
    busctl(nobody, &["call", AGENT, PATH, AGENT, method], args)
}

fn busctl(nobody: bool, head: &[&str], args: &[&str]) -> (bool, String) {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"]);
        c
    } else {
        Command::new("busctl")
    };
    let out = cmd.arg("--system").args(head).args(args).output().expect("busctl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn registered() -> bool {
    let (ok, out) = call(false, "Domains", &[]);
    ok && out.contains(&format!("\"{DOMAIN}\""))
}

/// The kit's domain restored on fresh copies of its disks on ZFS.
fn restore_guest() -> Result<(), Failed> {
    let kit = LibvirtKit::find(&Rig::locate()?)?;
    let t = Instant::now();
    let (disk0, disk1) = (format!("/{FS}/disk0.qcow2"), format!("/{DATA}/disk1.raw"));
    rt().block_on(libvirt::restore(&kit, disk0.as_ref(), disk1.as_ref()))?;
    eprintln!("METRIC virsh restore to agent {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn started_registers() -> Result<(), Failed> {
    check(!registered(), "registered before it started")?;
    restore_guest()?;
    wait_for("registered by the started hook", Duration::from_secs(30), registered)?;
    let saved = std::fs::read_to_string(format!("{STATE}/registry/{DOMAIN}.json"))?;
    let (qmp, qga) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    for want in [qmp.display().to_string(), qga.display().to_string(), format!("/{FS}/disk0.qcow2"), format!("/{DATA}/disk1.raw")] {
        check(saved.contains(&want), format!("the registration lacks {want}: {saved}"))?;
    }
    Ok(())
}

fn snapshot_over_dbus() -> Result<(), Failed> {
    check(registered(), "the guest is not registered")?;
    let (_, qga_path) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    rt().block_on(async {
        let mut qga = libvirt::wait_agent(&qga_path, Duration::from_secs(60)).await?;
        qga.exec_start("/bin/sh", &["-c", COUNTER_WRITER], &[]).await.map_err(|e| e.to_string())?;
        for _ in 0..300 {
            let c = qga.sh("cat /mnt/vdb/counter 2>/dev/null", Duration::from_secs(120)).await.map_err(|e| e.to_string())?.stdout_text();
            if c.trim().parse::<i64>().is_ok_and(|n| n >= 5) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err::<(), Failed>("the writer did not start".into())
    })?;
    let report = dbus_snapshot(&["1", "label", "s", "dbus"])?;
    check(report["consistency"] == "app", format!("consistency: {report}"))?;

    // One zfs snapshot of both datasets (same txg), app-consistent, with the domain's XML.
    let names = sh(&format!("zfs list -H -t snapshot -o name -s createtxg {FS} {DATA}"));
    let snaps: Vec<&str> = names.lines().collect();
    check(snaps.len() == 2, format!("one snapshot per dataset: {snaps:?}"))?;
    let name = snaps[0].split('@').nth(1).unwrap_or_default().to_owned();
    check(snaps[1].ends_with(&format!("@{name}")), format!("one name: {snaps:?}"))?;
    let txg = sh(&format!("zfs get -H -p -o value createtxg {FS}@{name} {DATA}@{name}"));
    check(txg.lines().collect::<Vec<_>>().windows(2).all(|w| w[0] == w[1]), format!("createtxg differ: {txg}"))?;
    let props = sh(&format!("zfs get -H -o value vmsnap:consistency,vmsnap:domain {FS}@{name}"));
    check(props.lines().collect::<Vec<_>>() == ["app", DOMAIN], format!("properties: {props}"))?;
    verify_clone(&name)?;
    LANE.lock().unwrap().disk_snap = Some(name.clone());

    // libvirt still owns the domain, running, on its original disks; vmsnap left no node, job or
    // fdset behind in QEMU.
    check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the domain is not running")?;
    let blk = virsh(&["domblklist", DOMAIN])?;
    check(blk.contains(&format!("/{FS}/disk0.qcow2")) && blk.contains(&format!("/{DATA}/disk1.raw")), blk)?;
    let (qmp_path, _) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    rt().block_on(async {
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
        let nodes = qmp.node_names().await.map_err(|e| e.to_string())?;
        check(!nodes.iter().any(|n| n.starts_with("vmsnap")), format!("vmsnap nodes left: {nodes:?}"))?;
        check(qmp.query_jobs().await.map_err(|e| e.to_string())?.is_empty(), "a block job is left")?;
        // libvirt keeps fdsets of its own (the serial log): only vmsnap's must be gone.
        let fdsets = qmp.execute(&qapi::qmp::query_fdsets {}).await.map_err(|e| e.to_string())?;
        let ours = fdsets.iter().any(|s| s.fds.iter().any(|f| f.opaque.as_deref().is_some_and(|o| o.starts_with("vmsnap"))));
        check(!ours, format!("vmsnap fdsets left: {fdsets:?}"))
    })?;
    let overlays = sh(&format!("find {STATE}/overlays -type f 2>/dev/null | wc -l"));
    check(overlays.trim() == "0", format!("overlay files left: {overlays}"))
}

/// `Snapshot(DOMAIN, options)` over the system bus (`options`: busctl's a{sv} arguments); waits
/// for the job and returns its report.
fn dbus_snapshot(options: &[&str]) -> Result<serde_json::Value, Failed> {
    let mut args = vec!["sa{sv}", DOMAIN];
    args.extend_from_slice(options);
    dbus_job("Snapshot", &args)
}

/// An Agent1 method that starts a job (busctl's signature and arguments); waits for the job
/// and returns its report.
fn dbus_job(method: &str, args: &[&str]) -> Result<serde_json::Value, Failed> {
    let (ok, out) = call(false, method, args);
    check(ok, format!("{method}: {out}"))?;
    let job = out.split('"').find(|s| s.starts_with("/io/github/vmsnap/Agent1/Jobs/")).ok_or(format!("no job path: {out}"))?.to_owned();
    let prop = |p: &str| busctl(false, &["get-property", "--json=short", AGENT, &job, "io.github.vmsnap.Job1", p], &[]).1;
    wait_for(&format!("the D-Bus {method} job"), Duration::from_secs(900), || !prop("State").contains("\"running\""))?;
    let result = prop("Result");
    check(prop("State").contains("\"succeeded\""), format!("job: {} {result}\n{}", prop("State"), std::fs::read_to_string(LOG)?))?;
    eprintln!("METRIC D-Bus {method} result: {result}");
    // {"type":"s","data":"<the report as JSON>"}
    let wrapped: serde_json::Value = serde_json::from_str(&result)?;
    Ok(serde_json::from_str(wrapped["data"].as_str().ok_or("no report")?)?)
}

/// RAM snapshots of the libvirt-managed guest: QEMU (run by libvirt as libvirt-qemu, sandboxed)
/// writes the RAM to a descriptor vmsnap opened, a root-only file; libvirt follows the pause and
/// still sees the domain running after it. Unprivileged, QEMU has no userfaultfd: background
/// falls back to precopy and says why; with `vm.unprivileged_userfaultfd = 1` it runs.
fn ram_snapshot_over_dbus() -> Result<(), Failed> {
    check(registered(), "the guest is not registered")?;
    sh("echo 0 > /proc/sys/vm/unprivileged_userfaultfd");
    // This one compressed (`ram_compress = "zstd"`: libvirt's save-image format 5).
    std::fs::write(CONFIG, format!("state_dir = \"{STATE}\"\n[template.default]\nautosnap = false\nram_compress = \"zstd\"\n"))?;
    reload_daemon()?;
    let report = dbus_snapshot(&["2", "label", "s", "ram", "memory", "s", "background"])?;
    let warnings = report["warnings"].to_string();
    check(warnings.contains("refused background-snapshot") && warnings.contains("precopy"), format!("no fallback warning: {report}"))?;
    check_ram_snapshot(&report)?;
    check(report["ram_compress"] == "zstd", format!("not compressed: {report}"))?;
    LANE.lock().unwrap().zstd_dump = report["ram_dump"].as_str().map(str::to_owned);
    LANE.lock().unwrap().zstd = Some(report.clone());
    sh("echo 1 > /proc/sys/vm/unprivileged_userfaultfd");
    std::fs::write(CONFIG, format!("state_dir = \"{STATE}\"\n[template.default]\nautosnap = false\n"))?;
    reload_daemon()?;
    let uptime = guest_uptime()?;
    let report = dbus_snapshot(&["2", "label", "s", "ram-bg", "memory", "s", "background"]);
    sh("echo 0 > /proc/sys/vm/unprivileged_userfaultfd");
    let report = report?;
    check(report["warnings"].as_array().is_some_and(Vec::is_empty), format!("background under libvirt: {report}"))?;
    check_ram_snapshot(&report)?;
    check(report["ram_compress"] == "none", format!("compressed: {report}"))?;
    LANE.lock().unwrap().ram = Some((report, uptime));
    Ok(())
}

/// SIGHUP to the daemon, and its word that the configuration was reloaded.
fn reload_daemon() -> Result<(), Failed> {
    let count = || std::fs::read_to_string(LOG).unwrap_or_default().matches("configuration reloaded").count();
    let before = count();
    let pid = LANE.lock().unwrap().daemon.as_ref().ok_or("the daemon is not running")?.id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP)?;
    wait_for("the daemon reloads its configuration", Duration::from_secs(30), || count() > before)
}

fn guest_freeze_status() -> Result<vmsnap::qemu::qga::FreezeStatus, Failed> {
    let (_, qga_path) = vmsnap::libvirt::enroll::sockets(DOMAIN);
    rt().block_on(async {
        let mut qga = libvirt::wait_agent(&qga_path, Duration::from_secs(120)).await?;
        qga.freeze_status().await.map_err(|e| Failed::from(e.to_string()))
    })
}

/// The guest's uptime in seconds, through its agent.
fn guest_uptime() -> Result<f64, Failed> {
    uptime_of(DOMAIN)
}

fn uptime_of(domain: &str) -> Result<f64, Failed> {
    let (_, qga_path) = vmsnap::libvirt::enroll::sockets(domain);
    rt().block_on(async {
        let mut qga = libvirt::wait_agent(&qga_path, Duration::from_secs(120)).await?;
        let out = qga.sh("cat /proc/uptime", Duration::from_secs(60)).await.map_err(|e| e.to_string())?.stdout_text();
        out.split_whitespace().next().and_then(|u| u.parse().ok()).ok_or_else(|| Failed::from(format!("uptime: {out:?}")))
    })
}

/// The tools a libvirt user knows, on a vmsnap dump (a libvirt save image): with the domain
/// stopped and its datasets rolled back to the RAM snapshot, `virsh restore` of the dump brings
/// the guest back where it was (its uptime goes on from the snapshot: no reboot);
/// `virsh save-image-dumpxml` prints its XML; an image whose stream was never finished is
/// refused as incomplete.
fn virsh_restores_a_vmsnap_dump() -> Result<(), Failed> {
    let (report, uptime_before) = LANE.lock().unwrap().ram.clone().ok_or("no RAM snapshot was taken")?;
    let (name, dump) = (report["name"].as_str().unwrap_or_default().to_owned(), report["ram_dump"].as_str().unwrap_or_default().to_owned());
    // The kit's domain is transient: once destroyed, libvirt has no definition of it at all.
    check(!virsh(&["list", "--name"])?.lines().any(|l| l.trim() == DOMAIN), "the domain must be stopped first")?;
    let props = sh(&format!("zfs get -H -o value vmsnap:ram-format,vmsnap:ram-compress {FS}@{name}"));
    check(props.split_whitespace().collect::<Vec<_>>() == ["libvirt-save", "none"], format!("vmsnap:ram-format, -compress: {props}"))?;
    // libvirt 9.0 (Debian 12, the rig's) cannot decompress a zstd save image (the format number
    // came later); the README says so and vmsnap's own resume path decompresses it (host lane).
    let zstd_dump = LANE.lock().unwrap().zstd_dump.clone().ok_or("no zstd RAM snapshot was taken")?;
    let refused = Command::new("virsh").args(["-c", "qemu:///system", "restore", &zstd_dump]).output()?;
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    eprintln!("METRIC virsh restore of a zstd save image: {}", said.trim());
    check(!refused.status.success() && said.contains("compressed save format 5"), format!("virsh restore of a zstd image: {said}"))?;
    let xml = virsh(&["save-image-dumpxml", &dump])?;
    check(xml.contains(&format!("<name>{DOMAIN}</name>")), format!("save-image-dumpxml: {xml}"))?;
    // A copy whose magic still says "partial", as after a crash mid-stream.
    let partial = "/tmp/partial.ram";
    sh(&format!("cp {dump} {partial} && printf LibvirtQemudPart | dd of={partial} bs=16 count=1 conv=notrunc 2>/dev/null"));
    let refused = Command::new("virsh").args(["-c", "qemu:///system", "restore", partial]).output()?;
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    check(!refused.status.success() && said.contains("incomplete"), format!("virsh restore of a partial image: {said}"))?;
    sh(&format!("rm -f {partial}"));

    // Then the way a user brings it back: `vmsnap restore --resume` rolls both datasets back,
    // checks the dump, `virsh restore`s it, thaws the guest (saved frozen) and sets its clock.
    let t = Instant::now();
    let report = vmsnap_json(&["restore", DOMAIN, &name, "--resume", "--json"])?;
    let res = (|| {
        check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the restored domain is not running")?;
        check(report["resumed_from"]["sha256"] == report_sha(&dump)?, format!("resumed from the checked dump: {report}"))?;
        // How many filesystems the thaw reports depends on whether an earlier attempt's answer
        // came too late (nested TCG right after a resume); the guest must be thawed either way.
        check(report["thawed"].as_i64().is_some(), format!("the guest saved frozen was thawed: {report}"))?;
        check(guest_freeze_status()? == vmsnap::qemu::qga::FreezeStatus::Thawed, "the resumed guest is still frozen")?;
        check(report["clock_set"] == true, format!("the guest clock was set: {report}"))?;
        check(report["rolled_back"].as_array().is_some_and(|r| r.len() == 2), format!("both datasets rolled back: {report}"))?;
        guest_resumed_where_it_was(uptime_before, t)
    })();
    // Stopped whatever happened: the next cases start their own guest.
    let _ = virsh(&["destroy", DOMAIN]);
    res?;
    wait_for("unregistered after the restored guest stopped", Duration::from_secs(30), || !registered())
}

/// The installed vmsnap with `args`; its stdout parsed as JSON (it must succeed).
fn vmsnap_json(args: &[&str]) -> Result<serde_json::Value, Failed> {
    // Its debug log (each step, command and QGA/QMP request, timed) goes to the lane's log.
    let out = Command::new(VMSNAP).env("VMSNAP_LOG", "vmsnap=debug").args(["--config", CONFIG]).args(args).output()?;
    let (ok, out, err) =
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("vmsnap {}: {}\n{}", args.join(" "), err.trim(), out.trim());
    check(ok, format!("vmsnap {args:?} failed: {err}{out}"))?;
    Ok(serde_json::from_str(&out).map_err(|e| format!("vmsnap {args:?} printed no JSON ({e}): {out}"))?)
}

/// The installed vmsnap with `args`: (succeeded, stdout, stderr).
fn vmsnap_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(VMSNAP).args(["--config", CONFIG]).args(args).output().expect("vmsnap runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn report_sha(path: &str) -> Result<serde_json::Value, Failed> {
    Ok(sh(&format!("sha256sum {path}")).split_whitespace().next().ok_or("sha256sum printed nothing")?.into())
}

/// A guest resumed from RAM: its uptime goes on from before the snapshot (no reboot) and its
/// clock is the host's (within 2 s), not the moment it was saved.
fn guest_resumed_where_it_was(uptime_before: f64, since: Instant) -> Result<(), Failed> {
    resumed_where_it_was(DOMAIN, uptime_before, since)
}

fn resumed_where_it_was(domain: &str, uptime_before: f64, since: Instant) -> Result<(), Failed> {
    let uptime_after = uptime_of(domain)?;
    eprintln!(
        "METRIC vmsnap restore --resume: guest uptime {uptime_before:.1} s before the snapshot, {uptime_after:.1} s after ({:.1} s after the restore started)",
        since.elapsed().as_secs_f64()
    );
    check(uptime_after >= uptime_before, format!("the guest rebooted: uptime {uptime_after} < {uptime_before}"))?;
    let (_, qga_path) = vmsnap::libvirt::enroll::sockets(domain);
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let (before, guest, after) = rt().block_on(async {
        let mut qga = libvirt::wait_agent(&qga_path, Duration::from_secs(120)).await?;
        let before = now();
        let ns = qga.execute(&qapi::qga::guest_get_time {}, Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
        let after = now();
        Ok::<_, Failed>((before, ns as f64 / 1e9, after))
    })?;
    eprintln!("METRIC guest clock after the resume: {:+.2} s from the host's", guest - (before + after) / 2.0);
    check(guest >= before - 2.0 && guest <= after + 2.0, format!("the guest clock {guest} is not the host's ({before}..{after})"))
}

/// The zstd snapshot (older than the raw one): libvirt 9.0 cannot read it, so `vmsnap restore`
/// rewrites it raw into the RAM directory, restores that and removes it. The raw snapshot is
/// newer, so the restore is refused until `--destroy-newer`, which also deletes its dump.
fn vmsnap_restore_resumes_a_zstd_dump() -> Result<(), Failed> {
    let (raw, _) = LANE.lock().unwrap().ram.clone().ok_or("no RAM snapshot was taken")?;
    let zstd = LANE.lock().unwrap().zstd.clone().ok_or("no zstd RAM snapshot was taken")?;
    let (zname, zdump) = (zstd["name"].as_str().unwrap_or_default().to_owned(), zstd["ram_dump"].as_str().unwrap_or_default().to_owned());
    let (rname, rdump) = (raw["name"].as_str().unwrap_or_default().to_owned(), raw["ram_dump"].as_str().unwrap_or_default().to_owned());
    let (ok, out, err) = vmsnap_cli(&["restore", DOMAIN, &zname, "--resume"]);
    check(
        !ok && err.contains("--destroy-newer") && err.contains(&format!("{FS}@{rname}")),
        format!("newer snapshots not named: {err}{out}"),
    )?;
    check(std::path::Path::new(&rdump).exists(), "a refused restore deleted a dump")?;
    let plan = vmsnap_json(&["restore", DOMAIN, &zname, "--resume", "--destroy-newer", "--dry-run", "--json"])?;
    check(plan["newer_dumps"].as_array().is_some_and(|d| d.iter().any(|d| d == rdump.as_str())), format!("dry run: {plan}"))?;
    check(std::path::Path::new(&rdump).exists(), "a dry run deleted a dump")?;
    let t = Instant::now();
    let report = vmsnap_json(&["restore", DOMAIN, &zname, "--resume", "--destroy-newer", "--json"]);
    let res = (|| {
        let report = report?;
        check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the restored domain is not running")?;
        check(report["resumed_from"]["compress"] == "zstd" && report["clock_set"] == true, format!("report: {report}"))?;
        check(!std::path::Path::new(&rdump).exists(), "the destroyed snapshot's dump is left")?;
        let left = sh(&format!("zfs list -H -t snapshot -o name {FS} {DATA}"));
        check(!left.contains(&rname) && left.contains(&zname), format!("snapshots after --destroy-newer: {left}"))?;
        let temporaries = sh(&format!("ls {STATE}/ram 2>/dev/null | grep -c '^restore-' || true"));
        check(temporaries.trim() == "0", "the decompressed image is left")?;
        eprintln!("METRIC vmsnap restore --resume of a zstd dump (decompressed for libvirt 9.0): {:.1} s", t.elapsed().as_secs_f64());
        guest_resumed_where_it_was(0.0, t)
    })();
    let _ = virsh(&["destroy", DOMAIN]);
    res?;
    wait_for("unregistered after the restored guest stopped", Duration::from_secs(30), || !registered())?;
    LANE.lock().unwrap().zstd_dump = Some(zdump);
    Ok(())
}

/// `vmsnap verify` reads every dump against its sha256 and records the outcome on the snapshot;
/// a dump changed by one byte fails it, and `restore --resume` refuses it before anything changes.
fn verify_and_a_damaged_dump() -> Result<(), Failed> {
    let zstd = LANE.lock().unwrap().zstd.clone().ok_or("no zstd RAM snapshot was taken")?;
    let (zname, zdump) = (zstd["name"].as_str().unwrap_or_default().to_owned(), zstd["ram_dump"].as_str().unwrap_or_default().to_owned());
    let good = vmsnap_json(&["verify", DOMAIN, "--json"])?;
    check(good.as_array().is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["ok"] == true)), format!("verify: {good}"))?;
    let said = sh(&format!("zfs get -H -o value vmsnap:verified {FS}@{zname} {DATA}@{zname}"));
    check(said.lines().count() == 2 && said.lines().all(|l| l.contains(" ok: RAM dump sha256")), format!("vmsnap:verified: {said}"))?;
    // Recorded for a machine type this QEMU does not have: refused before anything changes,
    // asked of the snapshot XML's <emulator> itself.
    let machine = sh(&format!("zfs get -H -o value vmsnap:machine {FS}@{zname}")).trim().to_owned();
    sh(&format!("zfs set vmsnap:machine=pc-i440fx-99.9 {FS}@{zname} {DATA}@{zname}"));
    let (ok, out, err) = vmsnap_cli(&["restore", DOMAIN, &zname, "--resume", "--destroy-newer"]);
    sh(&format!("zfs set vmsnap:machine={machine} {FS}@{zname} {DATA}@{zname}"));
    eprintln!(
        "METRIC restore --resume of a dump for another machine type: {}",
        err.lines().find(|l| l.contains("machine")).unwrap_or_default()
    );
    check(!ok && err.contains("no machine type pc-i440fx-99.9"), format!("restore for another machine type: {err}{out}"))?;
    check(!std::path::Path::new(&format!("{STATE}/restore/{DOMAIN}.json")).exists(), "a refused restore left a journal")?;
    // One byte of the stream changed, as bit rot on cheap storage would.
    sh(&format!(
        r#"perl -e 'open F, "+<", $ARGV[0] or die; seek F, -100, 2; read F, $b, 1; seek F, -100, 2; print F chr(ord($b) ^ 1); close F or die' {zdump}"#
    ));
    let (ok, out, err) = vmsnap_cli(&["verify", DOMAIN]);
    check(!ok && out.contains("FAILED") && out.contains("sha256"), format!("verify of a damaged dump: {out}{err}"))?;
    let said = sh(&format!("zfs get -H -o value vmsnap:verified {FS}@{zname}"));
    check(said.contains(" failed: ") && said.contains("sha256"), format!("vmsnap:verified: {said}"))?;
    let before = sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}"));
    let (ok, out, err) = vmsnap_cli(&["restore", DOMAIN, &zname, "--resume"]);
    check(
        !ok && err.contains("refused before anything changed") && err.contains("sha256"),
        format!("restore of a damaged dump: {err}{out}"),
    )?;
    check(sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}")) == before, "a refused restore changed the snapshots")?;
    check(!std::path::Path::new(&format!("{STATE}/restore/{DOMAIN}.json")).exists(), "a refused restore left a journal")?;
    // `verify --boot` of it fails with the reason, recorded, before any copy is made.
    let (ok, out, err) = vmsnap_cli(&["verify", DOMAIN, "--boot", "--snapshot", &zname, "--json"]);
    let results: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("verify --boot printed no JSON ({e}): {out}{err}"))?;
    let last = results.as_array().and_then(|a| a.last()).cloned().unwrap_or_default();
    check(
        !ok && last["snapshot"] == zname.as_str() && last["ok"] == false && last["detail"].as_str().is_some_and(|d| d.contains("sha256")),
        format!("verify --boot of a damaged dump: {out}{err}"),
    )?;
    let said = sh(&format!("zfs get -H -o value vmsnap:verified {FS}@{zname}"));
    check(said.contains(" failed: boot: ") && said.contains("sha256"), format!("vmsnap:verified: {said}"))?;
    no_scratch_left()
}

/// `--as lvram --resume` of the RAM snapshot beside the original (paused meanwhile): a copy started from the
/// dump (a save image written under the copy's own XML: libvirt refuses another UUID for an
/// image's own), its uptime going on from the snapshot, its clock the host's, thawed, its own
/// UUID; the original runs on, its snapshots unchanged; no save image left. Then removed.
fn restore_as_resume() -> Result<(), Failed> {
    const COPY: &str = "lvram";
    let (ram, uptime_before) = LANE.lock().unwrap().ram.clone().ok_or("no RAM snapshot was taken")?;
    let (name, dump) = (ram["name"].as_str().unwrap_or_default().to_owned(), ram["ram_dump"].as_str().unwrap_or_default().to_owned());
    let before = sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}"));
    let plan = vmsnap_json(&["restore", DOMAIN, &name, "--as", COPY, "--resume", "--dry-run", "--json"])?;
    check(plan["resume"]["dump"] == dump.as_str() && plan["start"] == "resume", format!("dry run: {plan}"))?;
    // The original is paused meanwhile (its QEMU, image locks and sockets stay, so the copy must
    // keep off them all the same): two busy guests nested under TCG left the copy's agent too
    // slow to answer guest-set-time within two minutes on a 2-core host.
    virsh(&["suspend", DOMAIN])?;
    let t = Instant::now();
    let report = vmsnap_json(&["restore", DOMAIN, &name, "--as", COPY, "--resume", "--json"]);
    let continued = virsh(&["resume", DOMAIN]);
    let res = (|| {
        continued?;
        let report = report?;
        eprintln!("METRIC restore --as --resume: {:.1} s", t.elapsed().as_secs_f64());
        let (copy, original) = (virsh(&["domstate", COPY])?, virsh(&["domstate", DOMAIN])?);
        check(copy.trim() == "running" && original.trim() == "running", format!("both run: the copy {copy:?}, the original {original:?}"))?;
        check(report["resumed_from"]["sha256"] == report_sha(&dump)?, format!("resumed from the checked dump: {report}"))?;
        check(report["started"] == "resume" && report["clock_set"] == true, format!("report: {report}"))?;
        check(report["thawed"].as_i64().is_some(), format!("the guest saved frozen was thawed: {report}"))?;
        let (a, b) = (virsh(&["domuuid", DOMAIN])?, virsh(&["domuuid", COPY])?);
        check(a.trim() != b.trim() && b.trim() == report["uuid"], format!("UUIDs {a} / {b}"))?;
        let blk = virsh(&["domblklist", COPY])?;
        check(blk.contains("/tank/vms/lv-lvram/disk0.qcow2") && blk.contains("/tank/vms/lv-data-lvram/disk1.raw"), blk)?;
        // The original paused again while the copy is asked (its uptime, its clock): a copy
        // just resumed beside a busy original answered guest-exec too late on a 2-core host.
        virsh(&["suspend", DOMAIN])?;
        let copy_checked = resumed_where_it_was(COPY, uptime_before, t);
        virsh(&["resume", DOMAIN])?;
        copy_checked?;
        let left = sh(&format!("ls {STATE}/ram 2>/dev/null | grep -c '^restore-' || true"));
        check(left.trim() == "0", "the copy's save image is left")?;
        check(!std::path::Path::new(&format!("{STATE}/restore/copies/{COPY}.json")).exists(), "the copy's journal is left")?;
        check(sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}")) == before, "the original's snapshots changed")
    })();
    let _ = virsh(&["destroy", COPY]);
    let _ = virsh(&["undefine", COPY]);
    destroy_retrying(&["tank/vms/lv-lvram", "tank/vms/lv-data-lvram"]);
    res
}

/// Nothing of a scratch copy is left: no domain, clone, journal or save image.
fn no_scratch_left() -> Result<(), Failed> {
    let doms = virsh(&["list", "--all", "--name"])?;
    check(!doms.contains("vmsnap-verify-"), format!("a scratch domain is left: {doms}"))?;
    let ds = sh("zfs list -H -o name -t filesystem,volume");
    check(!ds.contains("vmsnap-verify-"), format!("a scratch clone is left: {ds}"))?;
    let j = sh(&format!("ls {STATE}/restore/copies 2>/dev/null | wc -l"));
    check(j.trim() == "0", format!("a copy journal is left: {j}"))?;
    let img = sh(&format!("ls {STATE}/ram 2>/dev/null | grep -c '^restore-' || true"));
    check(img.trim() == "0", "a save image is left")
}

/// `verify --boot` of the stopped domain, as the daemon's D-Bus job `VerifyBoot`: the newest
/// snapshot (a RAM one) resumed as a scratch copy until its agent answers, recorded on the
/// snapshot, nothing of the copy left, the original untouched (still stopped, its snapshots
/// unchanged). The CLI's `verify --boot` runs in the next case (a disk-only copy, which boots
/// cold in six minutes under nested TCG — see the libvirt kit — so it is killed once it runs)
/// and on the damaged dump.
fn verify_boot() -> Result<(), Failed> {
    let (ram, _) = LANE.lock().unwrap().ram.clone().ok_or("no RAM snapshot was taken")?;
    let name = ram["name"].as_str().unwrap_or_default().to_owned();
    let before = sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}"));
    let t = Instant::now();
    let last = dbus_job("VerifyBoot", &["ss", DOMAIN, ""])?;
    eprintln!("METRIC VerifyBoot (the newest snapshot resumed as a copy): {:.1} s", t.elapsed().as_secs_f64());
    check(
        last["snapshot"] == name.as_str() && last["ok"] == true && last["detail"].as_str().is_some_and(|d| d.contains("resumed a copy")),
        format!("VerifyBoot: {last}"),
    )?;
    let said = sh(&format!("zfs get -H -o value vmsnap:verified {FS}@{name} {DATA}@{name}"));
    check(said.lines().count() == 2 && said.lines().all(|l| l.contains(" ok: boot: resumed")), format!("vmsnap:verified: {said}"))?;
    no_scratch_left()?;
    check(!virsh(&["list", "--name"])?.lines().any(|l| l.trim() == DOMAIN), "the original was started")?;
    check(sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}")) == before, "the original's snapshots changed")
}

/// `verify --boot` killed (SIGKILL) once its scratch copy runs: `vmsnap recover` removes the
/// copy — domain, clones, journal — and a second recover finds nothing.
fn verify_boot_killed() -> Result<(), Failed> {
    let disk = LANE.lock().unwrap().disk_snap.clone().ok_or("no disk-only snapshot was taken")?;
    let mut child = Command::new(VMSNAP)
        .args(["--config", CONFIG, "verify", DOMAIN, "--boot", "--snapshot", &disk])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let scratch = format!("vmsnap-verify-{DOMAIN}");
    let seen = wait_for("the scratch copy running", Duration::from_secs(120), || {
        virsh(&["domstate", &scratch]).is_ok_and(|s| s.trim() == "running")
    });
    let _ = child.kill();
    let _ = child.wait();
    seen?;
    check(std::path::Path::new(&format!("{STATE}/restore/copies/{scratch}.json")).exists(), "no copy journal while the copy ran")?;
    let (ok, out, err) = vmsnap_cli(&["recover"]);
    eprintln!("vmsnap recover: {out}{err}");
    check(ok && out.contains("undoing the unfinished copy") && out.contains("destroyed the clone"), format!("recover: {out}{err}"))?;
    no_scratch_left()?;
    let (ok, out, _) = vmsnap_cli(&["recover"]);
    check(ok && !out.contains(&scratch), format!("a second recover: {out}"))
}

/// `--as lvcopy` while the original runs: clones of both datasets, a definition with its own
/// name, UUID, disks and vmsnap sockets; started beside the original (the hook registers it under
/// its own name); the original's snapshots unchanged. Then removed again.
fn restore_as_beside_the_original(name: &str) -> Result<(), Failed> {
    const COPY: &str = "lvcopy";
    let before = sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}"));
    let (ok, _, err) = vmsnap_cli(&["restore", DOMAIN, name, "--as", DOMAIN]);
    check(!ok && err.contains("new domain name"), format!("--as its own name: {err}"))?;
    let report = vmsnap_json(&["restore", DOMAIN, name, "--as", COPY, "--json"]);
    let res = (|| {
        let report = report?;
        let clones = report["clones"].to_string();
        check(clones.contains("tank/vms/lv-lvcopy") && clones.contains("tank/vms/lv-data-lvcopy"), format!("clones: {report}"))?;
        let (ok, _, err) = vmsnap_cli(&["restore", DOMAIN, name, "--as", COPY]);
        check(!ok && err.contains("exists already"), format!("--as twice: {err}"))?;
        let (a, b) = (virsh(&["domuuid", DOMAIN])?, virsh(&["domuuid", COPY])?);
        check(a.trim() != b.trim() && b.trim() == report["uuid"], format!("UUIDs {a} / {b}"))?;
        let blk = virsh(&["domblklist", COPY])?;
        check(blk.contains("/tank/vms/lv-lvcopy/disk0.qcow2") && blk.contains("/tank/vms/lv-data-lvcopy/disk1.raw"), blk)?;
        virsh(&["start", COPY])?;
        check(virsh(&["domstate", COPY])?.trim() == "running" && virsh(&["domstate", DOMAIN])?.trim() == "running", "both run")?;
        wait_for("the copy registered under its own name", Duration::from_secs(60), || {
            let (ok, out) = call(false, "Domains", &[]);
            ok && out.contains(&format!("\"{COPY}\"")) && out.contains(&format!("\"{DOMAIN}\""))
        })?;
        check(sh(&format!("zfs list -H -t snapshot -o name,guid {FS} {DATA}")) == before, "the original's snapshots changed")
    })();
    let _ = virsh(&["destroy", COPY]);
    let _ = virsh(&["undefine", COPY]);
    destroy_retrying(&["tank/vms/lv-lvcopy", "tank/vms/lv-data-lvcopy"]);
    res
}

fn destroy_retrying(datasets: &[&str]) {
    for ds in datasets {
        sh(&format!("for i in $(seq 1 20); do zfs destroy {ds} 2>/dev/null && exit 0; zfs list {ds} >/dev/null 2>&1 || exit 0; sleep 0.5; done; zfs destroy {ds}"));
    }
}

/// In place, disks only: refused while the domain runs and while newer snapshots exist (named);
/// with `--destroy-newer` both datasets are at the snapshot: the writer's counter on the disk is
/// the snapshot's.
fn disk_only_restore_in_place() -> Result<(), Failed> {
    let name = LANE.lock().unwrap().disk_snap.clone().ok_or("no disk-only snapshot was taken")?;
    let counter = |img: &str| -> Result<i64, Failed> {
        Ok(sh(&format!("debugfs -R 'cat /counter' {img} 2>/dev/null")).trim().parse().map_err(|e| format!("counter in {img}: {e}"))?)
    };
    let in_snapshot = counter(&format!("/{DATA}/.zfs/snapshot/{name}/disk1.raw"))?;
    restore_guest()?;
    let (ok, _, err) = vmsnap_cli(&["restore", DOMAIN, &name, "--destroy-newer"]);
    check(!ok && err.contains("is running") && err.contains("virsh shutdown"), format!("restore of a running domain: {err}"))?;
    let beside = restore_as_beside_the_original(&name);
    virsh(&["destroy", DOMAIN])?;
    beside?;
    wait_for("unregistered after the guest stopped", Duration::from_secs(30), || !registered())?;
    let now = counter(&format!("/{DATA}/disk1.raw"));
    let (ok, _, err) = vmsnap_cli(&["restore", DOMAIN, &name]);
    check(!ok && err.contains("--destroy-newer"), format!("newer snapshots not named: {err}"))?;
    let report = vmsnap_json(&["restore", DOMAIN, &name, "--destroy-newer", "--json"])?;
    let after = counter(&format!("/{DATA}/disk1.raw"))?;
    eprintln!("METRIC disk-only restore: counter {now:?} before, {after} after, {in_snapshot} in the snapshot; {}", report["seconds"]);
    check(after == in_snapshot, format!("the disk holds counter {after}, the snapshot {in_snapshot}"))?;
    check(report["resumed_from"].is_null() && report["rolled_back"].as_array().is_some_and(|r| r.len() == 2), format!("report: {report}"))?;
    let left = sh(&format!("zfs list -H -t snapshot -o name {FS} {DATA}"));
    check(left.lines().count() == 2 && left.lines().all(|l| l.ends_with(&name)), format!("snapshots left: {left}"))
}

fn check_ram_snapshot(report: &serde_json::Value) -> Result<(), Failed> {
    use std::os::unix::fs::PermissionsExt;
    check(report["consistency"] == "ram" && report["pause_ms"].as_f64().is_some(), format!("consistency: {report}"))?;
    let dump = report["ram_dump"].as_str().ok_or(format!("no dump: {report}"))?.to_owned();
    let mode = std::fs::metadata(&dump)?.permissions().mode() & 0o777;
    let owner = sh(&format!("stat -c %U {dump}"));
    check(mode == 0o600 && owner.trim() == "root", format!("dump {dump}: mode {mode:o}, owner {owner}"))?;
    let sum = sh(&format!("sha256sum {dump}"));
    check(Some(sum.split_whitespace().next().unwrap_or("")) == report["ram_sha256"].as_str(), "the dump's checksum")?;
    check(virsh(&["domstate", DOMAIN])?.trim() == "running", "libvirt does not see the domain running after the RAM snapshot")?;
    let name = report["name"].as_str().unwrap_or_default();
    let props = sh(&format!("zfs get -H -o value vmsnap:consistency,vmsnap:ram-dump {FS}@{name}"));
    check(props.lines().collect::<Vec<_>>() == ["ram", dump.as_str()], format!("properties: {props}"))
}

/// Clones of both datasets at `name`: the qcow2 passes `qemu-img check`, both filesystems pass
/// e2fsck, the counters are from one moment, and the domain's XML is inside.
fn verify_clone(name: &str) -> Result<(), Failed> {
    sh(&format!("zfs clone {FS}@{name} tank/chk && zfs clone {DATA}@{name} tank/chk-data"));
    let res = (|| {
        sh("qemu-img check -q /tank/chk/disk0.qcow2 && qemu-img convert -O raw /tank/chk/disk0.qcow2 /tmp/chk.raw");
        sh("e2fsck -fn /tmp/chk.raw && e2fsck -fn /tank/chk-data/disk1.raw");
        let counter = |img: &str| -> Result<i64, Failed> {
            Ok(sh(&format!("debugfs -R 'cat /counter' {img} 2>/dev/null")).trim().parse().map_err(|e| format!("counter in {img}: {e}"))?)
        };
        let (a, b) = (counter("/tmp/chk.raw")?, counter("/tank/chk-data/disk1.raw")?);
        eprintln!("snapshot {name}: counters {a} / {b}");
        check(a > 0 && (a - b).abs() <= 1, format!("the two disks are not from one moment: counters {a} and {b}"))?;
        let xml = std::fs::read_to_string(format!("/tank/chk/.vmsnap/{DOMAIN}/domain.xml"))?;
        check(xml.contains(&format!("<name>{DOMAIN}</name>")), "the domain XML is in the snapshot")
    })();
    sh("rm -f /tmp/chk.raw; zfs destroy tank/chk; zfs destroy tank/chk-data");
    res
}

fn refused_calls() -> Result<(), Failed> {
    let before = sh("zfs list -H -t snapshot -o name");
    for (method, args) in [
        ("Snapshot", vec!["sa{sv}", DOMAIN, "0"]),
        ("Prune", vec!["sb", DOMAIN, "false"]),
        ("UnregisterDomain", vec!["s", DOMAIN]),
        ("RegisterDomain", vec!["ssssasss", "x", "", "/run/x.qmp", "", "0", "", ""]),
    ] {
        let (ok, out) = call(true, method, &args);
        // RegisterDomain is root's alone: polkit is not even asked.
        let why = if method == "RegisterDomain" { "polkit's io.github.vmsnap.manage does not cover it" } else { "polkit does not grant" };
        check(!ok && out.contains("needs root") && out.contains(why), format!("{method} as nobody: {out}"))?;
    }
    let (ok, out) = call(false, "Snapshot", &["sa{sv}", DOMAIN, "1", "frobnicate", "i", "1"]);
    check(!ok && out.contains("unknown option \"frobnicate\""), format!("malformed Snapshot: {out}"))?;
    let (ok, out) = call(false, "UnregisterDomain", &["s", "../etc"]);
    check(!ok && out.contains("domain name"), format!("malformed UnregisterDomain: {out}"))?;
    check(registered(), "a refused call unregistered the domain")?;
    check(sh("zfs list -H -t snapshot -o name") == before, "a refused call changed the snapshots")
}

/// With polkit on the bus, a rule granting `io.github.vmsnap.manage` lets a non-root caller in.
fn polkit_grants_a_non_root_caller() -> Result<(), Failed> {
    const RULE: &str = "/etc/polkit-1/rules.d/50-vmsnap-test.rules";
    check(std::path::Path::new("/usr/share/polkit-1/actions/io.github.vmsnap.policy").exists(), "setup installed the action")?;
    std::fs::write(
        RULE,
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"io.github.vmsnap.manage\" && subject.user == \"nobody\") { return polkit.Result.YES; }\n});\n",
    )?;
    // polkitd picks up new rules on its own (inotify); give it a moment.
    let granted = wait_for("polkit granting nobody", Duration::from_secs(30), || {
        let (ok, out) = call(true, "UnregisterDomain", &["s", "nosuch"]);
        ok && out.contains("b false")
    });
    // Even granted, nobody may not register a domain (root would connect to what it names).
    let (ok, out) = call(true, "RegisterDomain", &["ssssasss", "x", "", "/run/x.qmp", "", "0", "", ""]);
    std::fs::remove_file(RULE)?;
    granted?;
    check(!ok && out.contains("needs root"), format!("RegisterDomain with polkit's grant: {out}"))?;
    wait_for("polkit refusing nobody again", Duration::from_secs(30), || !call(true, "UnregisterDomain", &["s", "nosuch"]).0)?;
    check(registered(), "the domain is still registered")
}

fn destroy_unregisters() -> Result<(), Failed> {
    check(registered(), "the guest is not registered")?;
    virsh(&["destroy", DOMAIN])?;
    wait_for("unregistered by the stopped/release hook", Duration::from_secs(30), || !registered())?;
    check(!std::path::Path::new(&format!("{STATE}/registry/{DOMAIN}.json")).exists(), "the registration file is left")
}

fn starts_with_daemon_down() -> Result<(), Failed> {
    stop_daemon()?;
    restore_guest()?;
    check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the domain is not running")?;
    start_daemon()?;
    // Nothing told the daemon: the domain started while it was down.
    check(!registered(), "registered although the daemon was down at the start")
}

fn reconnect_registers() -> Result<(), Failed> {
    check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the domain is not running")?;
    let mut lane = LANE.lock().unwrap();
    let lv = lane.libvirtd.as_mut().ok_or("no libvirtd")?;
    lv.stop()?;
    let t = Instant::now();
    *lv = Libvirtd::start(Duration::from_secs(900))?;
    drop(lane);
    eprintln!("METRIC libvirtd restart {:.1} s", t.elapsed().as_secs_f64());
    wait_for("registered by the reconnect hook", Duration::from_secs(120), registered)?;
    check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the domain is not running after the restart")
}

/// A daemon restart keeps the running domain's registration (persisted); a domain stopped while
/// no daemon heard the hook is dropped at the next start, because its QMP socket is dead.
fn daemon_restarts() -> Result<(), Failed> {
    check(registered(), "the guest is not registered")?;
    stop_daemon()?;
    start_daemon()?;
    check(registered(), "a daemon restart lost the running domain")?;
    stop_daemon()?;
    virsh(&["destroy", DOMAIN])?;
    let file = format!("{STATE}/registry/{DOMAIN}.json");
    check(std::path::Path::new(&file).exists(), "the hook changed the registry without a daemon")?;
    start_daemon()?;
    // The daemon is on the bus first (systemd waits for that) and drops stale registrations
    // right after.
    wait_for("the stale registration dropped at start", Duration::from_secs(30), || !registered() && !std::path::Path::new(&file).exists())
        .map_err(|e| format!("the stale registration survived the start: {}", e.message().unwrap_or_default()))?;
    let log = std::fs::read_to_string(LOG)?;
    check(log.contains("unregistered") && log.contains("does not answer"), format!("the daemon says why: {log}"))
}

/// `vmsnap enroll` / `unenroll` on a persistent definition through real virsh: idempotent, the
/// agent channel moves to vmsnap and back, the original is kept 0600 meanwhile.
fn enroll_and_unenroll() -> Result<(), Failed> {
    check(virsh(&["domstate", DOMAIN]).is_err(), "the domain still exists")?;
    std::fs::write("/tmp/lvguest.xml", libvirt::domain_xml())?;
    virsh(&["define", "/tmp/lvguest.xml"])?;
    let vmsnap = |args: &[&str]| -> Result<String, Failed> {
        let out = Command::new(VMSNAP).args(["--config", CONFIG]).args(args).env("LIBVIRT_DEFAULT_URI", "qemu:///system").output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        check(out.status.success(), format!("vmsnap {args:?}: {text}"))?;
        Ok(text)
    };
    let res = (|| {
        let said = vmsnap(&["enroll", DOMAIN])?;
        check(said.contains("domfsfreeze") && said.contains("next start"), format!("enroll warns and says when: {said}"))?;
        let xml = virsh(&["dumpxml", "--inactive", DOMAIN])?;
        check(xml.contains("id=vmsnap-qga") && !xml.contains("<channel type='unix'>"), format!("enrolled: {xml}"))?;
        let backup = format!("{STATE}/enroll/{DOMAIN}.xml");
        let mode = sh(&format!("stat -c %a {backup}"));
        check(mode.trim() == "600", format!("backup mode {mode}"))?;
        check(vmsnap(&["enroll", DOMAIN])?.contains("already enrolled"), "enroll twice")?;
        vmsnap(&["unenroll", DOMAIN])?;
        let xml = virsh(&["dumpxml", "--inactive", DOMAIN])?;
        check(!xml.contains("commandline") && xml.contains("org.qemu.guest_agent.0"), format!("unenrolled: {xml}"))?;
        check(vmsnap(&["unenroll", DOMAIN])?.contains("not enrolled"), "unenroll twice")
    })();
    virsh(&["undefine", DOMAIN])?;
    res
}

/// The disaster a backup is for, with a libvirt domain: a RAM snapshot of the running guest is
/// replicated to a target (a second "host": sshd in its own network namespace, its own pool);
/// then this host loses the domain (destroyed, not defined), its datasets, its RAM dumps and
/// vmsnap's whole state directory (registry, integrity records). `list --target` still finds
/// the snapshot by the domain's name alone, and `restore --from --resume` receives the
/// datasets, defines the domain from the snapshot's XML and resumes the guest from its RAM where
/// it was (no reboot).
fn disaster_resume() -> Result<(), Failed> {
    const RT: &str = "/root/lvrt";
    sh(&format!(
        "mkdir -p {RT} && chmod 700 {RT} && zpool create -f -O mountpoint=/backup backup /dev/disk/by-id/virtio-pool2 \
         && zfs create backup/replica && mkdir -p /backup/ram"
    ));
    remote::start(RT);
    let key = std::fs::read_to_string(format!("{RT}/id.pub"))?;
    std::fs::write(
        format!("{RT}/authorized_keys"),
        format!("command=\"{VMSNAP} serve --root backup/replica --ram-dir /backup/ram\",restrict {}\n", key.trim()),
    )?;
    let options = remote::ssh_options(RT).iter().map(|o| format!("{o:?}")).collect::<Vec<_>>().join(", ");
    let config = std::fs::read_to_string(CONFIG)?;
    std::fs::write(
        CONFIG,
        format!(
            "state_dir = \"{STATE}\"\n[template.default]\nautosnap = false\nreplicate_to = [\"offsite\"]\n\n\
             [target.offsite]\nhost = \"{}\"\nidentity = \"{RT}/id\"\nssh_options = [{options}]\n",
            remote::ADDRESS
        ),
    )?;
    let res = (|| {
        restore_guest()?;
        wait_for("registered by the started hook", Duration::from_secs(30), registered)?;
        let uptime = uptime_of(DOMAIN)?;
        let snap = vmsnap_json(&["snapshot", DOMAIN, "--memory", "--json"])?;
        let name = snap["name"].as_str().ok_or(format!("no name: {snap}"))?.to_owned();
        let dump = snap["ram_dump"].as_str().ok_or(format!("no dump: {snap}"))?.to_owned();
        let sent = vmsnap_json(&["replicate", DOMAIN, "--target", "offsite", "--local", "--json"])?;
        eprintln!("METRIC replicated for the disaster: {sent}");
        check(sh(&format!("ls /backup/ram/{DOMAIN}/")).contains(&name), "the dump did not reach the target")?;

        // The loss: the guest, its definition, its datasets, its dumps, vmsnap's state.
        virsh(&["destroy", DOMAIN])?;
        check(virsh(&["domstate", DOMAIN]).is_err(), "libvirt still knows the domain")?;
        stop_daemon()?;
        sh(&format!("zfs destroy -r -f {FS} && zfs destroy -r -f {DATA} && rm -rf {STATE} {dump}"));

        let listed = vmsnap_json(&["list", DOMAIN, "--target", "offsite", "--json"])?;
        check(listed.to_string().contains(&name), format!("list --target: {listed}"))?;
        let t = Instant::now();
        let (ok, out, err) = vmsnap_cli(&["restore", DOMAIN, &name, "--from", "offsite", "--trust-target", "--resume"]);
        eprintln!("METRIC restore --from --resume onto a host that lost the domain: {:.1} s\n{out}{err}", t.elapsed().as_secs_f64());
        check(ok, format!("restore --from --resume: {out}{err}"))?;
        check(virsh(&["domstate", DOMAIN])?.trim() == "running", "the restored domain is not running")?;
        let info = virsh(&["dominfo", DOMAIN])?;
        check(info.lines().any(|l| l.starts_with("Persistent:") && l.ends_with("yes")), format!("not defined again: {info}"))?;
        resumed_where_it_was(DOMAIN, uptime, t)
    })();
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN]);
    remote::stop();
    std::fs::write(CONFIG, config)?;
    res
}
