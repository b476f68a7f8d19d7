//! The daemon on the real rig: a 1-minute `frequently` policy (keep 1) with RAM in every snapshot
//! takes and prunes snapshots of the running guest and deletes the pruned RAM dumps; a reload
//! (SIGHUP) to disk-only snapshots after the guest agent is stopped makes `vmsnap check`
//! critical; SIGTERM stops it cleanly, after its running job. It runs last, on the guest the RAM
//! case resumed from a snapshot (on clones of it), and stops that guest's agent.

use super::{check, sh, Guest, GUEST, STATE};
use libtest_mimic::Failed;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmsnap_testkit::rig::lane::vmsnap_bin;

const SCHED_CONFIG: &str = "/etc/vmsnap/sched.toml";
const LOG: &str = "/var/log/vmsnap-daemon.log";
const METRICS: &str = "/var/lib/vmsnap/vmsnap.prom";
const SCRIPT: &str = "/etc/vmsnap/record-env.sh";
const SCRIPT_LOG: &str = "/var/log/vmsnap-scripts.log";

fn config(g: &Guest, ram: bool) -> String {
    let m = &g.vm.machine;
    format!(
        r#"state_dir = "{STATE}"
metrics_file = "{METRICS}"
[domain.sched]
qmp = "{qmp}"
qga = "{qga}"
disks = ["{d0}", "{d1}"]
frequently = 1
frequent_period = 1
hourly = 0
daily = 0
monthly = 0
frequently_warn = "10m"
frequently_crit = "20m"
ram = [{ram}]
pre_snapshot_script = "{SCRIPT}"
post_snapshot_script = "{SCRIPT}"
pruning_script = "{SCRIPT}"
"#,
        qmp = m.qmp_path.display(),
        qga = m.qga_path.display(),
        d0 = g.disks[0],
        d1 = g.disks[1],
        ram = if ram { "\"frequently\"" } else { "" },
    )
}

/// (name, consistency, ram dump) of the daemon's snapshots, oldest first.
fn sched_snapshots() -> Vec<(String, String, String)> {
    let fs = GUEST.lock().unwrap().as_ref().map(|g| g.fs.clone()).unwrap_or_default();
    sh(&format!("zfs list -H -p -t snapshot -s creation -o name,vmsnap:domain,vmsnap:consistency,vmsnap:ram-dump {fs}"))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[1] == "sched").then(|| (f[0].split('@').nth(1).unwrap_or("").to_owned(), f[2].to_owned(), f[3].to_owned()))
        })
        .collect()
}

fn wait_for(what: &str, limit: Duration, cond: impl FnMut() -> bool) -> Result<(), Failed> {
    let what = format!("daemon: {what}");
    vmsnap_testkit::support::wait_for(&what, limit, Duration::from_secs(3), cond, || std::fs::read_to_string(LOG).unwrap_or_default())
}

fn vmsnap_check() -> (i32, String) {
    let out = Command::new(vmsnap_bin()).args(["--config", SCHED_CONFIG, "check"]).output().expect("vmsnap check");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vmsnap daemon` on the sched config, no D-Bus, logging to `log`.
fn spawn_daemon(log: std::fs::File) -> Result<Daemon, Failed> {
    let child = Command::new(vmsnap_bin())
        .args(["--config", SCHED_CONFIG, "daemon", "--bus", "none"])
        .env("VMSNAP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Daemon(child))
}

/// SIGTERM, then the daemon must exit 0 (after any running job).
fn stop(daemon: &mut Daemon) -> Result<(), Failed> {
    sh(&format!("kill -TERM {}", daemon.0.id()));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait()? {
            break s;
        }
        check(t.elapsed() < Duration::from_secs(300), "the daemon did not stop on SIGTERM")?;
        std::thread::sleep(Duration::from_millis(500));
    };
    check(status.success(), format!("daemon exit: {status}"))
}

pub fn daemon_takes_prunes_and_check_goes_critical() -> Result<(), Failed> {
    check(GUEST.lock().unwrap().is_some(), "no running guest (the RAM resume case did not leave one)")?;
    // The user's scripts: each call appends what sanoid's variables said.
    std::fs::write(
        SCRIPT,
        format!("#!/bin/sh\necho \"$SANOID_SCRIPT $VMSNAP_DOMAIN $SANOID_SNAPNAME $SANOID_TYPES $SANOID_TARGETS\" >> {SCRIPT_LOG}\n"),
    )?;
    sh(&format!("chmod 755 {SCRIPT} && rm -f {SCRIPT_LOG}"));
    std::fs::write(SCHED_CONFIG, config(GUEST.lock().unwrap().as_ref().unwrap(), true))?;
    let mut daemon = spawn_daemon(std::fs::File::create(LOG)?)?;
    let mut seen: Vec<(String, String, String)> = Vec::new();
    // Two RAM snapshots a minute apart: the first is then older than a minute and one of more
    // than one, so it goes, with its RAM dump.
    wait_for("a snapshot pruned", Duration::from_secs(600), || {
        for s in sched_snapshots() {
            match seen.iter_mut().find(|x| x.0 == s.0) {
                // A RAM snapshot is labelled `ram`, with its dump, once the dump is complete.
                Some(x) if *x != s => {
                    eprintln!("daemon's {} now ({}, {})", s.0, s.1, s.2);
                    *x = s;
                }
                Some(_) => {}
                None => {
                    eprintln!("daemon took {} ({}, {})", s.0, s.1, s.2);
                    seen.push(s);
                }
            }
        }
        let now: Vec<String> = sched_snapshots().into_iter().map(|s| s.0).collect();
        // The snapshot goes first, then its RAM dump: the prune is over at its log line.
        seen.len() >= 2
            && seen.iter().any(|s| !now.contains(&s.0))
            && std::fs::read_to_string(LOG).unwrap_or_default().lines().any(|l| l.contains("pruned") && l.contains("ram_deleted"))
    })?;
    // Stopped first (SIGTERM lets a running snapshot finish): at one a minute, the next may
    // start while this looks, and a RAM snapshot is labelled `ram` only once its dump is done.
    stop(&mut daemon)?;
    let now = sched_snapshots();
    check(now.len() <= 2 && now.iter().all(|s| s.1 == "ram"), format!("kept: {now:?}"))?;
    for s in &seen {
        let kept = now.iter().any(|n| n.0 == s.0);
        let exists = std::path::Path::new(&s.2).exists();
        check(kept == exists, format!("{}: snapshot kept {kept} but RAM dump exists {exists}", s.0))?;
    }
    let log_text = std::fs::read_to_string(LOG)?;
    check(log_text.contains("snapshot taken") && log_text.contains("pruned"), "the daemon logs each snapshot and prune")?;
    let (code, line) = vmsnap_check();
    check(code == 0, format!("check should be OK: {code} {line}"))?;
    let scripts = std::fs::read_to_string(SCRIPT_LOG)?;
    for s in &seen {
        check(scripts.contains(&format!("pre sched {} frequently", s.0)), format!("no pre script for {}: {scripts}", s.0))?;
        check(scripts.contains(&format!("post sched {} frequently", s.0)), format!("no post script for {}: {scripts}", s.0))?;
    }
    // Like sanoid's, the targets are the datasets (the guest's qcow2 filesystem and its zvol).
    let fs = GUEST.lock().unwrap().as_ref().map(|g| g.fs.clone()).unwrap_or_default();
    check(
        scripts.lines().all(|l| l.contains(&format!(" {fs}")) && !l.contains("/dev/") && !l.contains(".qcow2")),
        format!("SANOID_TARGETS are datasets: {scripts}"),
    )?;
    let gone = seen.iter().find(|s| !now.iter().any(|n| n.0 == s.0)).expect("one was pruned");
    check(scripts.contains(&format!("prune sched {} frequently", gone.0)), format!("no pruning script for {}: {scripts}", gone.0))?;
    let metrics = std::fs::read_to_string(METRICS)?;
    check(metrics.contains("vmsnap_snapshots_taken_total{domain=\"sched\",consistency=\"ram\"}"), metrics.clone())?;

    // The daemon is stopped (above); now the guest agent — never while a snapshot runs: an
    // agent that dies between freeze and thaw leaves the guest frozen, and nothing but an
    // agent can thaw it (a first version of this test did exactly that).
    let qga_path = GUEST.lock().unwrap().as_ref().unwrap().vm.machine.qga_path.clone();
    super::rt().block_on(async {
        let mut qga = vmsnap::qemu::qga::Qga::connect(&qga_path, super::patient()).await.map_err(|e| e.to_string())?;
        qga.exec_start("/bin/sh", &["-c", "(sleep 1; kill $(pidof qemu-ga)) >/dev/null 2>&1 &"], &[]).await.map_err(|e| e.to_string())?;
        Ok::<(), Failed>(())
    })?;
    wait_for("the agent gone", Duration::from_secs(180), || {
        super::rt().block_on(async {
            let quick = vmsnap::qemu::qga::Timeouts { sync: Duration::from_secs(3), ..Default::default() };
            vmsnap::qemu::qga::Qga::connect(&qga_path, quick).await.is_err()
        })
    })?;
    // A new daemon on the RAM config, reloaded (SIGHUP) to disk-only snapshots: without the
    // agent the next one falls back to crash-consistent and the check goes critical.
    let mut daemon = spawn_daemon(std::fs::OpenOptions::new().append(true).open(LOG)?)?;
    // SIGHUP before the daemon has installed its handlers would simply kill it: wait for its
    // start line (logged after the handlers are in place).
    wait_for("the second daemon started", Duration::from_secs(60), || {
        std::fs::read_to_string(LOG).unwrap_or_default().matches("vmsnap daemon starting").count() >= 2
    })?;
    std::fs::write(SCHED_CONFIG, config(GUEST.lock().unwrap().as_ref().unwrap(), false))?;
    sh(&format!("kill -HUP {}", daemon.0.id()));
    wait_for("a crash-consistent snapshot", Duration::from_secs(300), || sched_snapshots().last().is_some_and(|s| s.1 == "crash"))?;
    let (code, line) = vmsnap_check();
    check(code == 2 && line.contains("crash-consistent"), format!("check should be CRITICAL: {code} {line}"))?;
    stop(&mut daemon)?;
    let log_text = std::fs::read_to_string(LOG)?;
    check(log_text.contains("configuration reloaded") && log_text.contains("vmsnap daemon stopped"), "reload and stop are logged")?;
    super::assert_clean_qemu()?;

    // prune --dry-run, years from now: all but the newest (frequently = 1) would go, and nothing
    // is destroyed.
    let before = sched_snapshots();
    let out = Command::new(vmsnap_bin())
        .args(["--config", SCHED_CONFIG, "prune", "sched", "--dry-run", "--json", "--now", "2030-01-01T00:00:00Z"])
        .output()?;
    check(out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())?;
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let destroyed = reports[0]["destroyed"].as_array().map(Vec::len).unwrap_or(0);
    check(destroyed + 1 == before.len(), format!("dry run: {destroyed} of {} would go: {reports}", before.len()))?;
    check(sched_snapshots() == before, "a dry run destroyed something")
}
