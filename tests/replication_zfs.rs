//! Replication on real OpenZFS over real OpenSSH (ZFS lane, inside the OpenZFS VM): pool `tank`
//! is the source host's, pool `backup` the target host's, reached through an `sshd` in its own
//! network namespace (a veth pair, addresses inside the VM only) whose `authorized_keys` pins the
//! source's key to `vmsnap serve --root backup/replica --ram-dir /backup/ram`.
//!
//! The domain `web` is a stopped VM (a disk image on a filesystem and a zvol): its snapshots are
//! vmsnap's offline snapshots. Its RAM "dump" is made by the test (random bytes with a checksum,
//! recorded on a snapshot the way the engine records one): replication moves and checks bytes,
//! it does not read them; the RAM path itself is proven on the engine lanes.
//! The cases run in order and build on each other.

use libtest_mimic::{Arguments, Failed};
use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use vmsnap_testkit::rig::lane::{sh, vmsnap_bin};
use vmsnap_testkit::rig::remote;
use vmsnap_testkit::support::check;

const SRC: &str = "tank/vms/web";
const ZVOL: &str = "tank/vms/web-data";
const DST: &str = "backup/replica/tank/vms/web";
const DST_ZVOL: &str = "backup/replica/tank/vms/web-data";
const CONFIG: &str = "/root/rt/vmsnap.toml";
const RT: &str = "/root/rt";

type Case = fn() -> Result<(), Failed>;

#[path = "replication_zfs/hostile.rs"]
mod hostile;

fn main() {
    vmsnap_testkit::rig::lane::dispatch(inside);
}

fn inside() {
    let mut args = Arguments::from_args();
    // The cases build on each other.
    args.test_threads = Some(1);
    setup();
    let cases: &[(&str, Case)] = &[
        ("first_full_send_with_a_ram_dump", first_full_send),
        ("incrementals_carry_every_snapshot", incrementals),
        ("a_dataset_with_hundreds_of_snapshots_replicates_in_pieces_lists_in_pages_and_restores", many_snapshots),
        ("a_snapshot_still_being_taken_is_sent_not_completed", snapshot_being_taken),
        ("kill_mid_stream_then_resume_sends_only_the_rest", kill_and_resume),
        ("resume_token_of_a_destroyed_snapshot_repairs_itself", token_snapshot_gone),
        ("a_changed_target_is_reported_not_overwritten", changed_target),
        ("a_hand_made_target_snapshot_is_kept", hand_made_target_snapshot),
        ("encrypted_datasets_go_raw_and_need_no_key_there", encrypted),
        ("the_daemon_replicates_on_schedule_and_over_dbus", daemon_replicates),
        ("an_unreachable_target_does_not_stop_the_others", unreachable_target),
        ("verify_target_matches_guids_and_rereads_the_dumps_there", verify_target),
        // These two change what the target holds on the target's own terms.
        ("rollback_target_after_a_restore_only_with_the_targets_leave", rollback_target_after_a_restore),
        ("restore_from_the_target_after_local_pruning", restore_from_target),
        ("the_target_prunes_by_its_own_policy", target_prunes_by_its_own_policy),
        ("a_sealed_ram_dump_leaves_no_plaintext_on_the_target", sealed_ram),
        // Hostile peers.
        ("a_hostile_source_stream_mounts_and_marks_nothing_outside_its_root", hostile::hostile_source),
        ("a_resume_token_naming_another_dataset_is_aborted_not_sent", hostile::forged_resume_token),
        ("a_target_listing_thousands_or_endless_pages_or_a_huge_reply_is_refused_in_seconds", hostile::hostile_listings),
        ("restore_from_onto_a_host_that_lost_the_datasets_dumps_and_state", hostile::disaster_restore),
        ("an_encrypted_dataset_comes_back_raw_and_restores_once_its_key_is_loaded", hostile::disaster_restore_encrypted),
        ("a_snapshot_the_target_changed_is_refused_and_removed_on_restore_from", hostile::planted_xml),
        // File-level restore (pools are here; it sends nothing).
        ("mount_reads_files_out_of_a_snapshot_and_umount_releases_it", mount_and_umount),
    ];
    let trials = vmsnap_testkit::support::timed_trials(cases);
    let conclusion = libtest_mimic::run(&args, trials);
    remote::stop();
    let _ = Command::new("/bin/sh").arg("-c").arg("zpool destroy backup; zpool destroy tank").status();
    conclusion.exit();
}

/// Pools, the domain's disks, the ssh "remote host", the config.
fn setup() {
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh("zpool create -f -O mountpoint=/backup backup /dev/disk/by-id/virtio-pool2 && zfs create backup/replica && mkdir -p /backup/ram");
    sh(&format!(
        "zfs create -p {SRC} && zfs create -V 64M {ZVOL} && udevadm settle && dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=16 status=none \
         && dd if=/dev/urandom of=/dev/zvol/{ZVOL} bs=1M count=8 status=none conv=fsync"
    ));
    sh(&format!("mkdir -p {RT}/ram && chmod 700 {RT} && echo \"<domain><name>web</name></domain>\" > {RT}/web.xml"));
    // The remote host: sshd in network namespace `remote`, reachable at 10.77.0.2 only.
    remote::start(RT);
    forced_command("");
    write_config(&["offsite"], "");
}

/// Pins the source's key on the "remote host" to `vmsnap serve` with the target's own options
/// (`extra`); sshd reads the file at each connection.
fn forced_command(extra: &str) {
    let key = std::fs::read_to_string(format!("{RT}/id.pub")).unwrap();
    let line = format!("command=\"{} serve --root backup/replica --ram-dir /backup/ram {extra}\",restrict {}\n", vmsnap_bin(), key.trim());
    std::fs::write(format!("{RT}/authorized_keys"), line).unwrap();
    // A shared connection keeps the forced command it authenticated with: start afresh.
    let _ = Command::new("/bin/sh").arg("-c").arg(format!("rm -f {RT}/state/ssh/*")).status();
}

fn write_config(targets: &[&str], extra_domains: &str) {
    let list = targets.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "state_dir = \"{RT}/state\"\nram_dir = \"{RT}/ram\"\n\n\
         [domain.web]\nqmp = \"{RT}/web.qmp\"\nxml = \"{RT}/web.xml\"\ndisks = [\"/{SRC}/disk0.img\", \"/dev/zvol/{ZVOL}\"]\nreplicate_to = [{list}]\n{extra_domains}\n\
         [target.offsite]\nhost = \"10.77.0.2\"\nidentity = \"{RT}/id\"\nssh_options = [\"-o\", \"StrictHostKeyChecking=accept-new\", \"-o\", \"UserKnownHostsFile={RT}/known_hosts\", \"-o\", \"ConnectTimeout=5\"]\n\n\
         [target.down]\nhost = \"10.77.0.9\"\nidentity = \"{RT}/id\"\nssh_options = [\"-o\", \"StrictHostKeyChecking=accept-new\", \"-o\", \"UserKnownHostsFile={RT}/known_hosts\", \"-o\", \"ConnectTimeout=3\"]\n"
    );
    std::fs::write(CONFIG, text).unwrap();
}

fn vmsnap(args: &[&str]) -> Output {
    Command::new(vmsnap_bin()).arg("--config").arg(CONFIG).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// An offline snapshot of `web`; its name.
fn snapshot(label: &str) -> Result<String, Failed> {
    let out = vmsnap(&["snapshot", "web", "--json", "--label", label]);
    check(out.status.success(), text(&out))?;
    let r: Value = serde_json::from_slice(&out.stdout)?;
    Ok(r["name"].as_str().ok_or("no name")?.to_owned())
}

/// Records a RAM dump on snapshot `name` as the engine does (random bytes standing in for QEMU's stream).
fn add_ram(name: &str, mib: u32) -> Result<String, Failed> {
    add_ram_with(name, mib, None)
}

/// [`add_ram`], with `marker` written into the dump at each MiB (a secret of the guest's).
fn add_ram_with(name: &str, mib: u32, marker: Option<&str>) -> Result<String, Failed> {
    let dump = format!("{RT}/ram/web/{name}.ram");
    sh(&format!("mkdir -p {RT}/ram/web && dd if=/dev/urandom of={dump} bs=1M count={mib} status=none && chmod 600 {dump}"));
    if let Some(m) = marker {
        for i in 0..mib {
            sh(&format!("printf %s '{m}' | dd of={dump} bs=1M seek={i} conv=notrunc status=none"));
        }
    }
    let sum = sh(&format!("sha256sum {dump} | cut -d' ' -f1")).trim().to_owned();
    for ds in [SRC, ZVOL] {
        sh(&format!(
            "zfs set vmsnap:consistency=ram vmsnap:ram-dump={dump} vmsnap:ram-sha256={sum} vmsnap:ram-format=qemu-stream {ds}@{name}"
        ));
    }
    // And in this host's integrity record of the snapshot, as the engine records a dump.
    // `autosnap_YYYY-MM-…`: the month's file.
    let file = format!("{RT}/state/integrity/web/{}.jsonl", &name["autosnap_".len().."autosnap_YYYY-MM".len()]);
    let text = std::fs::read_to_string(&file)?;
    let mut record: Value = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["snapshot"] == name)
        .ok_or(format!("no integrity record of {name} in {file}"))?;
    record["ram_sha256"] = Value::String(sum.clone());
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(&file)?.write_all(format!("{record}\n").as_bytes())?;
    Ok(sum)
}

fn replicate(args: &[&str]) -> Result<Value, Failed> {
    let out = vmsnap(&[&["replicate", "web", "--json"][..], args].concat());
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    check(out.status.success(), text(&out))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v[0].clone())
}

fn snaps(ds: &str) -> Vec<String> {
    sh(&format!("zfs list -H -t snapshot -o name -s createtxg -d 1 {ds} 2>/dev/null || true"))
        .lines()
        .map(|l| l.split('@').nth(1).unwrap_or_default().to_owned())
        .collect()
}

fn vmsnap_props(snap: &str) -> Vec<String> {
    sh(&format!("zfs get -H -s local,received -o property,value all {snap} | grep '^vmsnap:' | grep -v -e '^vmsnap:ram-dump' -e '^vmsnap:ram-sealed' -e '^vmsnap:replica' -e '^vmsnap:verified' -e '^vmsnap:received' | sort"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What every case leaves: the target holds exactly what the source has (by name), each with the
/// same vmsnap properties and `vmsnap:replica=complete`; one hold, on the target's newest; one
/// cursor bookmark per source dataset.
fn assert_replicated() -> Result<(), Failed> {
    for (src, dst) in [(SRC, DST), (ZVOL, DST_ZVOL)] {
        let (s, d) = (snaps(src), snaps(dst));
        check(s == d, format!("{src} has {s:?}, {dst} has {d:?}"))?;
        for name in s.iter().filter(|n| !n.starts_with("by-hand")) {
            check(
                vmsnap_props(&format!("{src}@{name}")) == vmsnap_props(&format!("{dst}@{name}")),
                format!("properties of {name} differ"),
            )?;
            let replica = sh(&format!("zfs get -H -o value vmsnap:replica {dst}@{name}"));
            check(replica.trim() == "complete", format!("{dst}@{name}: vmsnap:replica={replica}"))?;
        }
        let holds = sh(&format!("zfs list -H -t snapshot -o name -d 1 {dst} | xargs -r zfs holds -H | awk '{{print $1, $2}}'"));
        let want = format!("{dst}@{} vmsnap-replica", d.last().unwrap());
        check(holds.trim() == want, format!("holds on {dst}: {holds:?}, want {want:?}"))?;
        let marks = sh(&format!("zfs list -H -t bookmark -o name -d 1 {src}"));
        check(marks.lines().count() == 1 && marks.contains("#vmsnap-offsite-"), format!("bookmarks of {src}: {marks}"))?;
    }
    Ok(())
}

fn first_full_send() -> Result<(), Failed> {
    let s1 = snapshot("one")?;
    let s2 = snapshot("two")?;
    let sum = add_ram(&s2, 24)?;
    let dry = replicate(&["--dry-run"])?;
    check(dry["datasets"][0]["steps"].to_string().contains("full send"), format!("dry run: {dry}"))?;
    check(snaps(DST).is_empty(), "the dry run sent something")?;
    let r = replicate(&[])?;
    eprintln!("METRIC replication first run: {r}");
    check(r["ram_dumps"] == serde_json::json!([s2]), format!("RAM dumps: {}", r["ram_dumps"]))?;
    check(snaps(DST) == vec![s1.clone(), s2.clone()], format!("target: {:?}", snaps(DST)))?;
    // The dump on the target: checked, private, and named by the target snapshot.
    let there = format!("/backup/ram/web/{s2}.ram");
    check(sh(&format!("sha256sum {there} | cut -d' ' -f1")).trim() == sum, "the target's dump differs")?;
    check(sh(&format!("stat -c %a {there}")).trim() == "600", "the target's dump is not 0600")?;
    check(sh(&format!("zfs get -H -o value vmsnap:ram-dump {DST}@{s2}")).trim() == there, "vmsnap:ram-dump on the target")?;
    // The domain XML travelled inside the dataset.
    sh(&format!("zfs clone -o mountpoint=/backup/chk {DST}@{s2} backup/chk"));
    let xml = std::fs::read_to_string("/backup/chk/.vmsnap/web/domain.xml");
    sh("zfs destroy backup/chk");
    check(xml?.contains("<name>web</name>"), "domain.xml in the replica")?;
    // Nothing left to do.
    let again = replicate(&[])?;
    check(
        again["datasets"].as_array().is_some_and(|d| d.iter().all(|d| d["steps"] == serde_json::json!([]))),
        format!("second run: {again}"),
    )?;
    // Complete copies are left be: nothing is set again, no dump asked for.
    check(again["completed"] == serde_json::json!([]) && again["ram_dumps"] == serde_json::json!([]), format!("second run: {again}"))?;
    assert_replicated()
}

fn incrementals() -> Result<(), Failed> {
    sh(&format!("dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=2 seek=3 conv=notrunc status=none"));
    snapshot("three")?;
    sh(&format!("zfs snapshot {SRC}@by-hand-1 {ZVOL}@by-hand-1"));
    let s4 = snapshot("four")?;
    let r = replicate(&[])?;
    let steps = r["datasets"][0]["steps"].to_string();
    check(steps.contains("incremental") && !steps.contains("full"), format!("steps: {steps}"))?;
    check(snaps(DST).contains(&"by-hand-1".to_owned()) && snaps(DST).last() == Some(&s4), format!("target: {:?}", snaps(DST)))?;
    assert_replicated()
}

/// A snapshot whose operation is still journaled (a RAM snapshot's ZFS snapshot exists before its
/// dump is complete and labelled) is sent but not completed; once the journal is gone, the next
/// run completes it with the labels and the dump it has by then.
fn snapshot_being_taken() -> Result<(), Failed> {
    use vmsnap::engine::journal::{self, Journal, Record};
    let name = snapshot("taking")?;
    let begin = Record::Begin {
        format: journal::FORMAT,
        domain: "web".into(),
        qmp: format!("{RT}/web.qmp").into(),
        qga: None,
        snapshot: name.clone(),
        pid: std::process::id(),
        qemu: None,
    };
    let taking = Journal::create(format!("{RT}/state").as_ref(), "web", begin)?;
    let first = vmsnap(&["replicate", "web"]);
    taking.remove()?;
    check(first.status.success() && text(&first).contains("still being taken"), text(&first))?;
    check(snaps(DST).last() == Some(&name), format!("{name} not sent: {:?}", snaps(DST)))?;
    let replica = sh(&format!("zfs get -H -o value vmsnap:replica {DST}@{name}"));
    check(replica.trim() != "complete", format!("{DST}@{name}: vmsnap:replica={replica}"))?;
    // The dump is complete and the snapshot labelled `ram`: the next run brings both.
    add_ram(&name, 1)?;
    let second = replicate(&[])?;
    check(second["completed"].to_string().contains(&name) && second["ram_dumps"].to_string().contains(&name), format!("{second}"))?;
    assert_replicated()
}

/// Runs `vmsnap replicate web` and kills it (-9) once its progress says `mib` MiB of the
/// filesystem's stream went.
fn kill_once_sent(mib: u64) -> Result<(), Failed> {
    use std::io::BufRead;
    let mut child =
        Command::new(vmsnap_bin()).args(["--config", CONFIG, "replicate", "web"]).stderr(std::process::Stdio::piped()).spawn()?;
    let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.map_while(Result::ok) {
        // "web → offsite: sending tank/vms/web: 16.0 MiB of 96.0 MiB at 16.0 MiB/s, 5 s left"
        let sent =
            line.split_once(&format!("sending {SRC}: ")).and_then(|(_, r)| r.split(' ').next()?.parse::<f64>().ok()).map(|n| n as u64);
        seen = line;
        if sent.is_some_and(|n| n >= mib) {
            break;
        }
    }
    child.kill()?;
    let status = child.wait()?;
    check(status.code().is_none(), format!("replicate ended before it was killed; last line: {seen}"))
}

fn kill_and_resume() -> Result<(), Failed> {
    sh(&format!("dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=96 seek=16 status=none"));
    snapshot("big")?;
    // Slowed down so the kill lands mid-stream.
    let cfg = std::fs::read_to_string(CONFIG)?.replacen("[target.offsite]\n", "[target.offsite]\nrate_limit = 16777216\n", 1);
    std::fs::write(CONFIG, &cfg)?;
    // At 16 MiB/s the 96 MiB increment takes about 6 s: killed (-9) once 16 MiB went.
    kill_once_sent(16)?;
    let t = Instant::now();
    let mut token = String::new();
    // The receive on the target fails (and keeps its token) once ssh sees the end of its input.
    while t.elapsed() < Duration::from_secs(30) && token.len() < 10 {
        std::thread::sleep(Duration::from_millis(500));
        token = sh(&format!("zfs get -H -o value receive_resume_token {DST}")).trim().to_owned();
    }
    check(token.len() > 10, format!("no resume token after the kill: {token:?}"))?;
    std::fs::write(CONFIG, cfg.replacen("rate_limit = 16777216\n", "", 1))?;
    let full = sh(&format!("zfs send -nP -I {SRC}@$(zfs list -H -o name -t snapshot -d 1 -s createtxg {DST} | tail -1 | cut -d@ -f2) {SRC}@$(zfs list -H -o name -t snapshot -d 1 -s createtxg {SRC} | tail -1 | cut -d@ -f2) | awk '/^size/ {{print $2}}'"));
    let r = replicate(&[])?;
    let sent = r["datasets"][0]["bytes"].as_u64().unwrap_or(0);
    let full: u64 = full.trim().parse().unwrap_or(0);
    eprintln!("METRIC resume after kill: {sent} bytes sent after the kill, the whole increment is {full}");
    check(r["datasets"][0]["steps"].to_string().contains("resume"), format!("steps: {}", r["datasets"][0]["steps"]))?;
    check(sent < full, format!("the rerun sent {sent} bytes of a {full}-byte increment"))?;
    assert_replicated()
}

fn token_snapshot_gone() -> Result<(), Failed> {
    sh(&format!("dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=64 seek=16 conv=notrunc status=none"));
    let doomed = snapshot("doomed")?;
    let cfg = std::fs::read_to_string(CONFIG)?.replacen("[target.offsite]\n", "[target.offsite]\nrate_limit = 8388608\n", 1);
    std::fs::write(CONFIG, &cfg)?;
    kill_once_sent(8)?;
    std::fs::write(CONFIG, cfg.replacen("rate_limit = 8388608\n", "", 1))?;
    let t = Instant::now();
    let mut token = String::new();
    while t.elapsed() < Duration::from_secs(30) && token.len() < 10 {
        std::thread::sleep(Duration::from_millis(500));
        token = sh(&format!("zfs get -H -o value receive_resume_token {DST}")).trim().to_owned();
    }
    check(token.len() > 10, "no partial receive to repair")?;
    // The snapshot under the token goes; a newer one comes.
    sh(&format!("zfs destroy {SRC}@{doomed} && zfs destroy {ZVOL}@{doomed}"));
    snapshot("after")?;
    let r = replicate(&[])?;
    let steps = r["datasets"][0]["steps"].to_string();
    check(steps.contains("aborted"), format!("steps: {steps}"))?;
    assert_replicated()
}

fn changed_target() -> Result<(), Failed> {
    snapshot("five")?;
    let before = snaps(DST);
    sh(&format!("zfs set readonly=off mountpoint=/backup/web-mnt {DST} && (zfs mount {DST} 2>/dev/null; mountpoint -q /backup/web-mnt) && dd if=/dev/urandom of=/backup/web-mnt/intruder bs=1M count=1 status=none && sync"));
    let out = vmsnap(&["replicate", "web"]);
    let said = text(&out);
    eprintln!("METRIC diverged target: {}", String::from_utf8_lossy(&out.stderr).trim());
    sh(&format!(
        "zfs unmount {DST}; zfs inherit mountpoint {DST}; zfs set readonly=on {DST}; zfs rollback {DST}@{}",
        before.last().unwrap()
    ));
    check(out.status.code() == Some(3) && said.contains("diverged") && said.contains("guid"), said)?;
    check(snaps(DST) == before, "the target's snapshots changed")?;
    // Once the target is put back, replication goes on.
    replicate(&[])?;
    assert_replicated()
}

fn hand_made_target_snapshot() -> Result<(), Failed> {
    snapshot("six")?;
    sh(&format!("zfs snapshot {DST}@mine"));
    let out = vmsnap(&["replicate", "web"]);
    let said = text(&out);
    check(out.status.code() == Some(3) && said.contains("mine (guid"), said)?;
    check(snaps(DST).contains(&"mine".to_owned()), "the hand-made snapshot is gone")?;
    sh(&format!("zfs destroy {DST}@mine"));
    replicate(&[])?;
    assert_replicated()
}

fn encrypted() -> Result<(), Failed> {
    sh(&format!(
        "echo 'correct horse battery' > {RT}/pass && zfs create -o encryption=on -o keyformat=passphrase -o keylocation=file://{RT}/pass tank/vms/sec \
         && dd if=/dev/urandom of=/tank/vms/sec/disk.img bs=1M count=8 status=none"
    ));
    write_config(&["offsite"], &sec_domain());
    let out = vmsnap(&["snapshot", "sec", "--label", "enc"]);
    check(out.status.success(), text(&out))?;
    let out = vmsnap(&["replicate", "sec"]);
    check(out.status.success(), text(&out))?;
    let dst = "backup/replica/tank/vms/sec";
    let ks = sh(&format!("zfs get -H -o value encryption,keystatus {dst}"));
    check(ks.lines().next().is_some_and(|e| e != "off") && ks.contains("unavailable"), format!("target: {ks}"))?;
    sh(&format!("zfs load-key -L file://{RT}/pass {dst} && zfs set mountpoint=/backup/sec-mnt {dst} && (zfs mount {dst} 2>/dev/null; mountpoint -q /backup/sec-mnt)"));
    let same = sh("cmp /tank/vms/sec/disk.img /backup/sec-mnt/disk.img && echo same");
    sh(&format!("zfs unmount {dst}; zfs unload-key {dst}"));
    check(same.contains("same"), "the decrypted copy differs")?;
    write_config(&["offsite"], "");
    Ok(())
}

/// A dataset with many vmsnap snapshots (150; `VMSNAP_MANY_SNAPSHOTS` for another count), each
/// with the properties a snapshot carries and a long CPU definition, so that the target's
/// listing (about 350 KB) comes in pages, and the first replication sends them in several
/// streams (at most 100 snapshots each: a receive commits each one in its own transaction group,
/// and one stream of a thousand kept the target busy past the idle deadline after its last byte).
/// The domain `many` is a stopped VM. It replicates whole, `list --target` shows every snapshot,
/// and after this host lost the dataset `restore --from` brings one back. (Under nested TCG each
/// snapshot costs about 0.08 s to make and 0.72 s to replicate, most of it `zfs receive`: 300
/// took 215 s; each stream of 100 took longer than the one before it (47, 57, 64 s), and 5,000
/// did not finish within 75 minutes.)
fn many_snapshots() -> Result<(), Failed> {
    const MANY: &str = "tank/vms/many";
    let n: usize = std::env::var("VMSNAP_MANY_SNAPSHOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    sh(&format!("zfs create {MANY} && dd if=/dev/urandom of=/{MANY}/disk.img bs=64k count=4 status=none"));
    let t = Instant::now();
    let name = |i: usize| format!("autosnap_2026-01-01_00:00:00.{i:05}_hourly");
    let cpu = format!("host-model,{}", (0..150).map(|f| format!("+feature{f:03}")).collect::<Vec<_>>().join(","));
    sh(&format!(
        "for i in $(seq -f %05g 1 {n}); do zfs snapshot -o vmsnap:domain=many -o vmsnap:consistency=app -o vmsnap:version=1 \
         -o vmsnap:freeze-ms=812 -o vmsnap:qemu-version=10.0.2 -o vmsnap:machine=pc-q35-10.0 -o vmsnap:periods=hourly \
         -o vmsnap:cpu={cpu} {MANY}@autosnap_2026-01-01_00:00:00.${{i}}_hourly || exit 1; done"
    ));
    eprintln!("METRIC {n} snapshots made in {:.1} s", t.elapsed().as_secs_f64());
    write_config(
        &["offsite"],
        &format!("\n[domain.many]\nqmp = \"{RT}/many.qmp\"\ndisks = [\"/{MANY}/disk.img\"]\nreplicate_to = [\"offsite\"]\n"),
    );
    let res = (|| {
        check(snaps(MANY).len() == n, format!("{} snapshots made", snaps(MANY).len()))?;
        let t = Instant::now();
        let out = vmsnap(&["replicate", "many", "--json"]);
        eprintln!("METRIC replication of {n} snapshots: {:.1} s", t.elapsed().as_secs_f64());
        check(out.status.success(), text(&out))?;
        let streams = String::from_utf8_lossy(&out.stdout).matches("incremental ").count();
        check(streams >= n.div_ceil(100), format!("{n} snapshots went in {streams} incremental streams: {}", text(&out)))?;
        let there = format!("backup/replica/{MANY}");
        check(snaps(&there).len() == n, format!("{} snapshots on the target", snaps(&there).len()))?;
        let t = Instant::now();
        let listed = vmsnap(&["list", "many", "--target", "offsite", "--json"]);
        eprintln!("METRIC list --target of {n} snapshots: {:.1} s", t.elapsed().as_secs_f64());
        check(listed.status.success(), text(&listed))?;
        // More than one page of the target's listing: it came in pages.
        eprintln!("METRIC list --target --json: {} bytes", listed.stdout.len());
        let page = vmsnap::replicate::protocol::PAGE_BYTES;
        check(listed.stdout.len() > page || n < 120, format!("the listing is {} bytes: one page holds it", listed.stdout.len()))?;
        let rows: Value = serde_json::from_slice(&listed.stdout)?;
        let rows = rows.as_array().ok_or("list --json is not a list")?;
        check(rows.len() == n && rows.iter().any(|r| r["snapshot"] == name(n)), format!("{} rows listed", rows.len()))?;
        sh(&format!("zfs destroy -r {MANY}"));
        let t = Instant::now();
        let out = vmsnap(&["restore", "many", &name(n / 2), "--from", "offsite", "--trust-target"]);
        eprintln!("METRIC restore --from among {n} snapshots: {:.1} s", t.elapsed().as_secs_f64());
        check(out.status.success(), text(&out))?;
        check(snaps(MANY) == [name(n / 2)], format!("after the restore: {:?}", snaps(MANY).iter().take(3).collect::<Vec<_>>()))
    })();
    write_config(&["offsite"], "");
    sh(&format!("zfs destroy -r {MANY}; zfs destroy -r backup/replica/{MANY}; true"));
    res
}

/// The config of `sec`, a stopped VM whose disk is on an encrypted dataset (a passphrase in a file).
fn sec_domain() -> String {
    format!("\n[domain.sec]\nqmp = \"{RT}/sec.qmp\"\ndisks = [\"/tank/vms/sec/disk.img\"]\nreplicate_to = [\"offsite\"]\n")
}

fn unreachable_target() -> Result<(), Failed> {
    write_config(&["down", "offsite"], "");
    snapshot("seven")?;
    let t = Instant::now();
    let out = vmsnap(&["replicate", "web"]);
    let said = text(&out);
    eprintln!("METRIC unreachable target: exit {:?} after {:.1} s", out.status.code(), t.elapsed().as_secs_f64());
    // `vmsnap check` reads the lag from the source's cursor bookmarks (no connection needed);
    // `vmsnap list --target` asks the target.
    let checked = vmsnap(&["check", "web"]);
    let listed = vmsnap(&["list", "web", "--target", "offsite", "--json"]);
    let down = vmsnap(&["list", "web", "--target", "down"]);
    write_config(&["offsite"], "");
    check(out.status.code() == Some(1) && said.contains("web → down"), said)?;
    let line = String::from_utf8_lossy(&checked.stdout).into_owned();
    eprintln!("METRIC check with two targets: {line}");
    check(
        checked.status.code() == Some(2)
            && line.contains("nothing replicated to target down yet")
            && line.contains("web_offsite_replication_lag="),
        text(&checked),
    )?;
    check(listed.status.success(), text(&listed))?;
    let rows: Vec<Value> = serde_json::from_slice(&listed.stdout)?;
    for (src, dst) in [(SRC, DST), (ZVOL, DST_ZVOL)] {
        let on: Vec<&str> = rows.iter().filter(|r| r["dataset"] == src).filter_map(|r| r["snapshot"].as_str()).collect();
        check(on == snaps(dst), format!("list --target of {src}: {on:?}, the target has {:?}", snaps(dst)))?;
    }
    check(
        rows.iter().filter(|r| r["props"]["vmsnap:domain"] == "web").all(|r| r["props"]["vmsnap:replica"] == "complete"),
        format!("{rows:?}"),
    )?;
    check(!down.status.success() && text(&down).contains("down"), text(&down))?;
    assert_replicated()
}

/// The daemon, on a one-minute policy with the target on its own one-minute schedule
/// (`every_minutes`), takes the due snapshot and sends it by itself. Then over D-Bus (a private
/// bus): a `Replicate` job shows its stream in `Transfer`; a slowed one cancelled mid-stream
/// ends `cancelled`, the target keeping a resumable receive; the next job resumes it.
fn daemon_replicates() -> Result<(), Failed> {
    let cfg = std::fs::read_to_string(CONFIG)?;
    let scheduled = cfg
        .replacen("[domain.web]\n", "[domain.web]\nfrequently = 2\nfrequent_period = 1\nverify_every = \"1h\"\n", 1)
        .replacen("[target.offsite]\n", "[target.offsite]\nevery_minutes = 1\n", 1);
    std::fs::write(CONFIG, &scheduled)?;
    let bus = format!("unix:path={RT}/bus");
    let mut dbus = Command::new("dbus-daemon").args(["--session", "--nofork", "--nopidfile", &format!("--address={bus}")]).spawn()?;
    let log = std::fs::File::create(format!("{RT}/daemon.log"))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut daemon = Command::new(vmsnap_bin()).args(["--config", CONFIG, "daemon", "--bus-address", &bus]).stderr(log).spawn()?;
    let daemon_log = || std::fs::read_to_string(format!("{RT}/daemon.log")).unwrap_or_default();
    let result = (|| -> Result<(), Failed> {
        let t = Instant::now();
        let mut done = false;
        while t.elapsed() < Duration::from_secs(240) && !done {
            std::thread::sleep(Duration::from_secs(2));
            let said = daemon_log();
            done = snaps(DST).iter().any(|n| n.contains("frequently"))
                && said.contains("scheduled replication started")
                && said.contains("replicated");
        }
        eprintln!("METRIC daemon replication on the target's schedule after {:.0} s", t.elapsed().as_secs_f64());
        let timeline: Vec<String> = daemon_log()
            .lines()
            .filter(|l| l.contains("job started") || l.contains("scheduled replication") || l.contains("replicated"))
            .take(12)
            .map(|l| l.chars().take(160).collect())
            .collect();
        eprintln!("METRIC daemon timeline:\n  {}", timeline.join("\n  "));
        check(done, format!("the daemon did not replicate a scheduled snapshot; the target has {:?}", snaps(DST)))?;
        check(
            !daemon_log().lines().any(|l| l.contains("replication started") && !l.contains("scheduled replication started")),
            "replicated after the snapshot, not on the target's own schedule",
        )?;
        // `verify_every`: the daemon verified the domain by itself, once.
        check(daemon_log().matches("scheduled verification started").count() == 1, format!("scheduled verifications: {}", daemon_log()))?;
        let verified = sh(&format!("zfs get -H -o value vmsnap:verified {SRC}@{}", snaps(SRC)[0]));
        check(verified.contains(" ok: "), format!("vmsnap:verified after the scheduled verification: {verified}"))?;
        // And over D-Bus.
        let v = busctl(
            &bus,
            &["call", "io.github.vmsnap.Agent1", "/io/github/vmsnap/Agent1", "io.github.vmsnap.Agent1", "Verify", "s", "web"],
        )?;
        let job = v["data"][0].as_str().ok_or("no job path")?.to_owned();
        let (state, said) = job_end(&bus, &job, 60)?;
        check(state == "succeeded" && said.contains("\"ok\":true"), format!("D-Bus Verify: {state}: {said}"))?;

        // Quiet (nothing due for a while), and the target slowed down.
        let slow = cfg.replacen("[target.offsite]\n", "[target.offsite]\nrate_limit = 8388608\n", 1);
        reload(&daemon, &slow)?;
        sh(&format!("dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=48 seek=16 conv=notrunc status=none"));
        // A scheduled snapshot the old configuration started may still hold the domain's lock.
        let t = Instant::now();
        let name = loop {
            match snapshot("bus") {
                Err(e) if e.message().is_some_and(|m| m.contains("is busy")) && t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_secs(1))
                }
                other => break other?,
            }
        };
        let job = replicate_job(&bus)?;
        let t = Instant::now();
        let mut moving = Value::Null;
        while t.elapsed() < Duration::from_secs(30) {
            moving = busctl(&bus, &["get-property", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1", "Transfer"])?;
            if moving["data"]["bytes"]["data"].as_u64().unwrap_or(0) >= 8 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("METRIC D-Bus Transfer mid-stream: {moving}");
        let (bytes, total) = (moving["data"]["bytes"]["data"].as_u64().unwrap_or(0), moving["data"]["total"]["data"].as_u64().unwrap_or(0));
        check(bytes >= 8 << 20 && total >= 48 << 20 && bytes < total, format!("Transfer: {moving}"))?;
        check(moving["data"]["eta"]["data"].as_u64().is_some_and(|e| e > 0), format!("no time left in {moving}"))?;
        busctl(&bus, &["call", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1", "Cancel"])?;
        let (state, said) = job_end(&bus, &job, 30)?;
        check(state == "cancelled" && said.contains("resumes"), format!("{state}: {said}"))?;
        let token = sh(&format!("zfs get -H -o value receive_resume_token {DST}")).trim().to_owned();
        check(token.len() > 10, format!("no resumable receive on the target after the cancel: {token:?}"))?;

        reload(&daemon, &cfg)?;
        let job = replicate_job(&bus)?;
        let (state, said) = job_end(&bus, &job, 90)?;
        check(state == "succeeded", format!("{state}: {said}"))?;
        let reports: Value = serde_json::from_str(&said)?;
        check(reports[0]["datasets"][0]["steps"].to_string().contains("resume"), format!("not resumed: {said}"))?;
        check(reports[0]["completed"].to_string().contains(&name), format!("{name} not completed: {said}"))?;
        let last = busctl(&bus, &["get-property", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1", "Transfer"])?;
        let (bytes, total) = (last["data"]["bytes"]["data"].as_u64().unwrap_or(0), last["data"]["total"]["data"].as_u64().unwrap_or(0));
        check(bytes > 0 && bytes <= total, format!("the last Transfer: {last}"))?;
        cli_through_the_daemon(&bus, &daemon, &cfg, &slow)
    })();
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    let _ = dbus.kill();
    let _ = dbus.wait();
    std::fs::write(CONFIG, cfg)?;
    result.map_err(|e| Failed::from(format!("{}\ndaemon log:\n{}", e.message().unwrap_or_default(), tail(&daemon_log(), 40))))?;
    assert_replicated()
}

/// `vmsnap replicate` while the daemon runs is one of its jobs: its report as in-process, its
/// streams on the CLI, Ctrl-C cancels the job (the next run resumes), a diverged target is
/// exit 3 as in-process.
fn cli_through_the_daemon(bus: &str, daemon: &std::process::Child, cfg: &str, slow: &str) -> Result<(), Failed> {
    let cli = |args: &[&str]| {
        let mut c = Command::new(vmsnap_bin());
        c.env("VMSNAP_BUS_ADDRESS", bus).args(["--config", CONFIG, "replicate", "web"]).args(args);
        c
    };
    let jobs = || {
        std::fs::read_to_string(format!("{RT}/daemon.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("job started") && l.contains("replicate"))
            .count()
    };
    let before = jobs();
    let name = snapshot("cli")?;
    let out = cli(&["--json"]).output()?;
    check(out.status.success(), text(&out))?;
    let reports: Value = serde_json::from_slice(&out.stdout)?;
    check(reports[0]["completed"].to_string().contains(&name), format!("{name} not completed: {}", text(&out)))?;
    check(jobs() > before, format!("not a job of the daemon's: {before} replication jobs before, {} after", jobs()))?;

    // Interrupted mid-stream: the daemon's job is cancelled, the target keeps a resumable receive.
    reload(daemon, slow)?;
    sh(&format!("dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=48 seek=16 conv=notrunc status=none"));
    let name = snapshot("cli-stop")?;
    let mut child = cli(&[]).stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" MiB of ") && line.contains("(through the daemon)") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let moving = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    sh(&format!("kill -INT {}", child.id()));
    let status = child.wait()?;
    let said = reader.join().map_err(|_| "the stderr reader panicked")?;
    eprintln!("METRIC CLI interrupted through the daemon: {}", tail(&said, 3));
    check(moving, format!("no stream shown through the daemon: {said}"))?;
    check(
        status.code() == Some(1) && said.contains("stopping after the piece in flight") && said.contains("cancelled"),
        format!("{status}: {said}"),
    )?;
    let token = sh(&format!("zfs get -H -o value receive_resume_token {DST}")).trim().to_owned();
    check(token.len() > 10, format!("no resumable receive on the target after the interrupt: {token:?}"))?;
    reload(daemon, cfg)?;
    let out = cli(&["--json"]).output()?;
    check(out.status.success(), text(&out))?;
    let reports: Value = serde_json::from_slice(&out.stdout)?;
    check(reports[0]["datasets"][0]["steps"].to_string().contains("resume"), format!("not resumed: {}", text(&out)))?;
    check(reports[0]["completed"].to_string().contains(&name), format!("{name} not completed: {}", text(&out)))?;

    // A diverged target: exit 3, nothing destroyed, as in-process.
    let kept = snaps(DST);
    snapshot("cli-diverged")?;
    sh(&format!("zfs set readonly=off mountpoint=/backup/web-mnt {DST} && (zfs mount {DST} 2>/dev/null; mountpoint -q /backup/web-mnt) && dd if=/dev/urandom of=/backup/web-mnt/intruder bs=1M count=1 status=none && sync"));
    let out = cli(&[]).output()?;
    let said = text(&out);
    sh(&format!("zfs unmount {DST}; zfs inherit mountpoint {DST}; zfs set readonly=on {DST}; zfs rollback {DST}@{}", kept.last().unwrap()));
    check(out.status.code() == Some(3) && said.contains("diverged") && said.contains("hint:"), said)?;
    check(snaps(DST) == kept, "the target's snapshots changed")?;
    replicate(&[]).map(drop)?;

    // An unreachable target: exit 1 with the same hint as in-process (the job's `Failure` is
    // `target`).
    let started = jobs();
    let down = cfg.replacen("replicate_to = [\"offsite\"]", "replicate_to = [\"down\"]", 1);
    check(down != cfg, "the config has no replicate_to = [\"offsite\"] to change")?;
    reload(daemon, &down)?;
    let out = cli(&[]).output()?;
    reload(daemon, cfg)?;
    let said = text(&out);
    check(out.status.code() == Some(1) && said.contains("hint: can this host reach the target"), said)?;
    check(jobs() > started, "the daemon ran no replication job to the unreachable target")
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `busctl --json=short` on the private bus.
fn busctl(bus: &str, args: &[&str]) -> Result<Value, Failed> {
    let out = Command::new("busctl").arg(format!("--address={bus}")).arg("--json=short").args(args).output()?;
    check(out.status.success(), format!("busctl {args:?}: {}", text(&out)))?;
    Ok(if out.stdout.is_empty() { Value::Null } else { serde_json::from_slice(&out.stdout)? })
}

/// D-Bus `Replicate("web", "offsite", {})`: the job's path. A scheduled replication may still
/// be running: tried again for up to a minute while the answer says so.
fn replicate_job(bus: &str) -> Result<String, Failed> {
    const AGENT: &str = "io.github.vmsnap.Agent1";
    let args = ["call", AGENT, "/io/github/vmsnap/Agent1", AGENT, "Replicate", "ssa{sv}", "web", "offsite", "0"];
    let t = Instant::now();
    loop {
        match busctl(bus, &args) {
            Ok(v) => return Ok(v["data"][0].as_str().ok_or_else(|| format!("no job path in {v}"))?.to_owned()),
            Err(e) if e.message().is_some_and(|m| m.contains("is still running")) && t.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits up to `secs` for a job to end: its state and result.
fn job_end(bus: &str, job: &str, secs: u64) -> Result<(String, String), Failed> {
    let prop = |name: &str| -> Result<String, Failed> {
        let v = busctl(bus, &["get-property", "io.github.vmsnap.Agent1", job, "io.github.vmsnap.Job1", name])?;
        Ok(v["data"].as_str().unwrap_or_default().to_owned())
    };
    let t = Instant::now();
    loop {
        let state = prop("State")?;
        if state != "running" {
            return Ok((state, prop("Result")?));
        }
        check(t.elapsed() < Duration::from_secs(secs), format!("{job} still running after {secs} s: {}", prop("Progress")?))?;
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A new config for the running daemon (SIGHUP), once it says it took it.
fn reload(daemon: &std::process::Child, text: &str) -> Result<(), Failed> {
    let log = || std::fs::read_to_string(format!("{RT}/daemon.log")).unwrap_or_default();
    let before = log().matches("configuration reloaded").count();
    std::fs::write(CONFIG, text)?;
    sh(&format!("kill -HUP {}", daemon.id()));
    let t = Instant::now();
    while log().matches("configuration reloaded").count() == before {
        check(t.elapsed() < Duration::from_secs(10), "the daemon did not reload its configuration")?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `vmsnap verify --target`: every replica matches the source by GUID and is complete, each dump
/// on the target is read again there; a dump altered on the target fails, naming it; an
/// unreachable target is an error.
fn verify_target() -> Result<(), Failed> {
    let out = vmsnap(&["verify", "web", "--target", "offsite", "--json"]);
    check(out.status.success(), text(&out))?;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let on_target = snaps(DST);
    check(rows.len() == on_target.iter().filter(|n| !n.starts_with("by-hand")).count(), format!("{rows:?} for {on_target:?}"))?;
    check(rows.iter().all(|r| r["ok"] == true && r["detail"].as_str().unwrap_or_default().contains("guid matches")), format!("{rows:?}"))?;
    let dumped: Vec<&Value> = rows.iter().filter(|r| r["detail"].as_str().unwrap_or_default().contains("RAM dump sha256 ok")).collect();
    check(!dumped.is_empty(), format!("no dump was read on the target: {rows:?}"))?;
    let snap = dumped[0]["snapshot"].as_str().unwrap_or_default().to_owned();
    let copy = format!("/backup/ram/web/{snap}.ram");
    sh(&format!("cp -p {copy} {RT}/saved.ram && printf 'X' | dd of={copy} bs=1 seek=4096 conv=notrunc status=none"));
    let bad = vmsnap(&["verify", "web", "--target", "offsite"]);
    sh(&format!("mv {RT}/saved.ram {copy}"));
    let said = String::from_utf8_lossy(&bad.stdout).into_owned();
    eprintln!("METRIC verify --target with an altered dump: {}", said.lines().find(|l| l.contains("FAILED")).unwrap_or_default());
    check(
        bad.status.code() == Some(1) && said.lines().any(|l| l.contains(&snap) && l.contains("FAILED") && l.contains("does not match")),
        text(&bad),
    )?;
    write_config(&["down", "offsite"], "");
    let down = vmsnap(&["verify", "web", "--target", "down"]);
    write_config(&["offsite"], "");
    check(down.status.code() == Some(1) && text(&down).contains("down"), text(&down))?;
    assert_replicated()
}

/// After a restore to an older snapshot the target holds newer ones: a plain run stops (exit 3);
/// `--rollback-target` is refused until the target's forced command allows it, and then still
/// refused while a hand-made snapshot is among them; allowed, it destroys only those newer
/// vmsnap snapshots (and their dumps there), then sends.
fn rollback_target_after_a_restore() -> Result<(), Failed> {
    let back_to = snapshot("r1")?;
    let newer = snapshot("r2")?;
    add_ram(&newer, 4)?;
    replicate(&[])?;
    let dump_there = format!("/backup/ram/web/{newer}.ram");
    check(std::path::Path::new(&dump_there).exists(), "r2's dump did not reach the target")?;
    let out = vmsnap(&["restore", "web", &back_to, "--destroy-newer"]);
    check(out.status.success(), text(&out))?;
    // The replica on this host's other pool carries the domain's name too: it is not the domain's.
    check(snaps(DST).contains(&newer) && snaps(SRC).last() == Some(&back_to), format!("source {:?}, target {:?}", snaps(SRC), snaps(DST)))?;
    let after = snapshot("r3")?;
    let out = vmsnap(&["replicate", "web"]);
    check(out.status.code() == Some(3) && text(&out).contains(&newer), text(&out))?;
    let out = vmsnap(&["replicate", "web", "--rollback-target"]);
    eprintln!("METRIC rollback refused by the target: {}", String::from_utf8_lossy(&out.stderr).trim());
    check(out.status.code() == Some(1) && text(&out).contains("--allow-rollback"), text(&out))?;
    check(snaps(DST).contains(&newer), "the target lost r2 without allowing it")?;
    forced_command("--allow-rollback");
    sh(&format!("zfs snapshot {DST}@mine-after"));
    let out = vmsnap(&["replicate", "web", "--rollback-target"]);
    let said = text(&out);
    check(out.status.code() == Some(1) && said.contains("mine-after") && said.contains("not made by vmsnap"), said)?;
    check(snaps(DST).contains(&newer) && snaps(DST).contains(&"mine-after".to_owned()), "a refused rollback destroyed something")?;
    sh(&format!("zfs destroy {DST}@mine-after"));
    let r = replicate(&["--rollback-target"]);
    forced_command("");
    let r = r?;
    eprintln!("METRIC rollback-target: {}", r["datasets"]);
    for d in r["datasets"].as_array().ok_or("no datasets")? {
        check(d["rolled_back"]["to"] == back_to.as_str() && d["rolled_back"]["destroyed"] == serde_json::json!([newer]), format!("{d}"))?;
    }
    check(!std::path::Path::new(&dump_there).exists(), "r2's dump is still on the target")?;
    check(snaps(DST).last() == Some(&after), format!("target: {:?}", snaps(DST)))?;
    assert_replicated()
}

/// The target's `--keep` (and its clock, `--now`) decide; the source's policy and clock do not.
/// Hourly snapshots beyond the target's count go there with their dumps; vmsnap's unscheduled
/// ones, and a hand-made one, stay; the source keeps everything; the next run sends nothing.
fn target_prunes_by_its_own_policy() -> Result<(), Failed> {
    let mut hourly = Vec::new();
    for i in 1..=3 {
        let name = snapshot(&format!("h{i}"))?;
        // What the scheduler records on the snapshots it takes for a period.
        sh(&format!("zfs set vmsnap:periods=hourly {SRC}@{name} {ZVOL}@{name}"));
        hourly.push(name);
    }
    add_ram(&hourly[0], 4)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3 * 3600;
    forced_command(&format!("--keep hourly=1,frequently=0 --now {now}"));
    let r = replicate(&[]);
    forced_command("");
    let r = r?;
    eprintln!("METRIC target retention: {}", r["target_pruned"]);
    let destroyed: Vec<String> = serde_json::from_value(r["target_pruned"]["destroyed"].clone())?;
    check(
        destroyed.contains(&hourly[0]) && destroyed.contains(&hourly[1]) && !destroyed.contains(&hourly[2]),
        format!("destroyed: {destroyed:?}"),
    )?;
    check(
        destroyed.iter().all(|d| d.contains("hourly") || d.contains("frequently") || hourly.contains(d)),
        format!("destroyed: {destroyed:?}"),
    )?;
    let (src, dst) = (snaps(SRC), snaps(DST));
    for s in &src {
        let should = !destroyed.contains(s);
        check(dst.contains(s) == should, format!("{s}: on the target {}, expected {should}; target: {dst:?}", dst.contains(s)))?;
    }
    check(hourly.iter().all(|h| src.contains(h)), "the source lost a snapshot")?;
    check(dst.contains(&"by-hand-1".to_owned()), "a snapshot vmsnap did not make was pruned on the target")?;
    check(
        !std::path::Path::new(&format!("/backup/ram/web/{}.ram", hourly[0])).exists(),
        "the pruned snapshot's dump is still on the target",
    )?;
    check(std::path::Path::new(&format!("{RT}/ram/web/{}.ram", hourly[0])).exists(), "the source's dump went")?;
    let again = replicate(&[])?;
    check(
        again["datasets"].as_array().is_some_and(|d| d.iter().all(|d| d["steps"] == serde_json::json!([]))),
        format!("after pruning: {again}"),
    )?;
    check(again["target_pruned"]["policy"].is_null(), format!("the default forced command has no policy: {}", again["target_pruned"]))
}

/// `vmsnap restore --from offsite`: a snapshot pruned here (with its RAM dump) comes back from
/// the target, incrementally onto the snapshot in common, its dump checked; the snapshots newer
/// here are destroyed only with `--destroy-newer`; the disk then holds the snapshot's data. The
/// target is then brought back in line with `--rollback-target`.
fn restore_from_target() -> Result<(), Failed> {
    let gone = snapshot("p1")?;
    let sum = add_ram(&gone, 4)?;
    let at_p1 = sh(&format!("sha256sum /{SRC}/disk0.img | cut -d' ' -f1")).trim().to_owned();
    sh(&format!("dd if=/dev/urandom of=/{SRC}/disk0.img bs=1M count=2 conv=notrunc status=none"));
    snapshot("p2")?;
    replicate(&[])?;
    let guid = |s: &str| sh(&format!("zfs get -H -o value guid {s}")).trim().to_owned();
    let there = guid(&format!("{DST}@{gone}"));
    // Pruned here, dump and all.
    sh(&format!("zfs destroy {SRC}@{gone} && zfs destroy {ZVOL}@{gone} && rm {RT}/ram/web/{gone}.ram"));
    let here = vmsnap(&["restore", "web", &gone]);
    check(!here.status.success(), text(&here))?;
    let refused = vmsnap(&["restore", "web", &gone, "--from", "offsite"]);
    check(!refused.status.success() && text(&refused).contains("--destroy-newer"), text(&refused))?;
    check(!snaps(SRC).contains(&gone), "a refused pull received something")?;
    let t = Instant::now();
    let out = vmsnap(&["restore", "web", &gone, "--from", "offsite", "--destroy-newer", "--json"]);
    eprintln!("METRIC restore --from the target: {:.1} s; {}", t.elapsed().as_secs_f64(), String::from_utf8_lossy(&out.stderr).trim());
    check(out.status.success(), text(&out))?;
    check(guid(&format!("{SRC}@{gone}")) == there, "the snapshot here is not the target's")?;
    check(snaps(SRC).last() == Some(&gone), format!("{gone} is not the newest here: {:?}", snaps(SRC)))?;
    let now = sh(&format!("sha256sum /{SRC}/disk0.img | cut -d' ' -f1")).trim().to_owned();
    check(now == at_p1, format!("the disk after the restore: {now}, at the snapshot: {at_p1}"))?;
    let dump = format!("{RT}/ram/web/{gone}.ram");
    check(sh(&format!("sha256sum {dump} | cut -d' ' -f1")).trim() == sum, "the dump back here is not the recorded one")?;
    check(sh(&format!("stat -c %a {dump}")).trim() == "600", "the dump back here is not 0600")?;
    check(sh(&format!("zfs get -H -o value vmsnap:ram-dump {SRC}@{gone}")).trim() == dump, "vmsnap:ram-dump does not name the copy here")?;
    // The target still has p2: bring it in line.
    forced_command("--allow-rollback");
    let r = replicate(&["--rollback-target"]);
    forced_command("");
    r?;
    assert_replicated()
}

/// A target trusted with ciphertext only (`seal_ram`): a RAM dump holding a marker goes sealed
/// under this host's key, and the marker is found nowhere on the backup host; `verify --target`
/// rereads the sealed copy; `restore --from` needs the key (without it nothing is received) and
/// brings back the very dump. Without a key the replication refuses, saying how to make one.
/// (The dump is the lane's stand-in for QEMU's stream, the marker written into it.)
fn sealed_ram() -> Result<(), Failed> {
    const MARKER: &str = "vmsnap-lane-marker: the guest secret 7f3a9c";
    let key = format!("{RT}/ram.key");
    write_config(&["offsite"], "");
    let plain = std::fs::read_to_string(CONFIG)?;
    let sealed = format!("ram_key = \"{key}\"\n{}", plain.replace("[target.offsite]\n", "[target.offsite]\nseal_ram = \"always\"\n"));
    std::fs::write(CONFIG, sealed)?;
    let result = sealed_ram_steps(&key, MARKER);
    // The cases after this one replicate unsealed.
    write_config(&["offsite"], "");
    result?;
    // The restore rolled the cursor bookmarks back with the datasets: a run sets them again.
    // (The target's own retention pruned it earlier in the lane: it holds fewer snapshots.)
    replicate(&[])?;
    check(snaps(SRC).last() == snaps(DST).last() && snaps(ZVOL).last() == snaps(DST_ZVOL).last(), "source and target end apart")?;
    Ok(())
}

fn sealed_ram_steps(key: &str, marker: &str) -> Result<(), Failed> {
    let s = snapshot("sealed")?;
    let sum = add_ram_with(&s, 6, Some(marker))?;
    let here = format!("{RT}/ram/web/{s}.ram");
    check(sh(&format!("grep -caF -- '{marker}' {here} || true")).trim() != "0", "the marker is not in the dump here")?;
    let refused = vmsnap(&["replicate", "web"]);
    check(!refused.status.success() && text(&refused).contains(key) && text(&refused).contains("vmsnap setup"), text(&refused))?;
    // Refused before anything went: the key is asked for first.
    check(!snaps(DST).contains(&s), "the streams went before the missing key was found")?;
    sh(&format!("umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {key}"));
    let r = replicate(&[])?;
    check(r["ram_dumps"].as_array().is_some_and(|d| d.iter().any(|d| d == s.as_str())), format!("RAM dumps: {}", r["ram_dumps"]))?;
    let there = format!("/backup/ram/web/{s}.ram");
    check(sh(&format!("head -c 15 {there}")) == "vmsnap-ramseal1", "the target's copy is not sealed")?;
    let found = sh(&format!("grep -rlaF -- '{marker}' /backup 2>/dev/null || true"));
    check(found.trim().is_empty(), format!("the marker is on the backup host: {found}"))?;
    let stored = sh(&format!("sha256sum {there} | cut -d' ' -f1")).trim().to_owned();
    check(sh(&format!("zfs get -H -o value vmsnap:ram-sealed {DST}@{s}")).trim() == stored, "vmsnap:ram-sealed is not the copy's sha256")?;
    let out = vmsnap(&["verify", "web", "--target", "offsite", "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
    let row = rows.as_array().and_then(|r| r.iter().find(|r| r["snapshot"] == s.as_str())).cloned().unwrap_or_default();
    check(row["ok"] == true && row["detail"].as_str().is_some_and(|d| d.contains("sealed RAM dump sha256 ok")), format!("{row}"))?;
    // Pruned here, dump and all; the key put away: nothing comes back.
    sh(&format!("zfs destroy {SRC}@{s} && zfs destroy {ZVOL}@{s} && rm {here} && mv {key} {key}.away"));
    // `--destroy-newer`: the domain's XML was saved into its file system after the snapshot
    // before `s`, so receiving `s` discards that write (as the in-place restore would).
    let keyless = vmsnap(&["restore", "web", &s, "--from", "offsite", "--destroy-newer"]);
    check(
        !keyless.status.success() && text(&keyless).contains("sealed") && text(&keyless).contains("nothing was received"),
        text(&keyless),
    )?;
    check(!snaps(SRC).contains(&s), "a keyless pull received the snapshot")?;
    sh(&format!("mv {key}.away {key}"));
    let out = Command::new(vmsnap_bin())
        .env("VMSNAP_LOG", "vmsnap=debug")
        .args(["--config", CONFIG, "restore", "web", &s, "--from", "offsite", "--destroy-newer"])
        .output()?;
    check(out.status.success(), text(&out))?;
    check(sh(&format!("sha256sum {here} | cut -d' ' -f1")).trim() == sum, "the dump back here is not the one sent")?;
    check(sh(&format!("stat -c %a {here}")).trim() == "600", "the dump back here is not 0600")?;
    Ok(())
}

/// `vmsnap mount`: a qcow2 image holding an MBR-partitioned ext4 and a zvol that is one ext4 file
/// system, read-only from a snapshot taken before the files changed; the snapshot held (pruning
/// keeps it); `umount` releases everything. Then a mount killed (-9) half-way is undone by
/// `vmsnap recover`.
fn mount_and_umount() -> Result<(), Failed> {
    let (img, vol) = ("/tank/vms/files/disk0.qcow2", "tank/vms/files-vol");
    // A raw disk whose first sector the guest made a qcow2 header naming a host file.
    let trap = "/tank/vms/files/disk2.img";
    sh(&format!(
        "set -e; zfs create tank/vms/files; zfs create -V 64M {vol}; udevadm settle
         modprobe loop; truncate -s 64M {RT}/raw.img
         printf '\\x00\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff\\x00\\x08\\x00\\x00\\x00\\xf8\\x01\\x00' | dd of={RT}/raw.img bs=1 seek=446 conv=notrunc status=none
         printf '\\x55\\xaa' | dd of={RT}/raw.img bs=1 seek=510 conv=notrunc status=none
         mkfs.ext4 -q -F -E offset=1048576 {RT}/raw.img 63M
         mkdir -p {RT}/m; mount -o loop,offset=1048576 {RT}/raw.img {RT}/m
         head -c 300000 /dev/urandom > {RT}/known.bin; cp {RT}/known.bin {RT}/m/known.bin
         cp /bin/true {RT}/m/suid-root; chown 0:0 {RT}/m/suid-root; chmod 4755 {RT}/m/suid-root
         mknod -m 666 {RT}/m/host-null c 1 3
         umount {RT}/m
         qemu-img convert -O qcow2 {RT}/raw.img {img}
         mkfs.ext4 -q /dev/zvol/{vol}; mount /dev/zvol/{vol} {RT}/m; echo 'on the zvol' > {RT}/m/note.txt; umount {RT}/m
         truncate -s 16M {RT}/secret.img; mkfs.ext4 -q -F {RT}/secret.img
         mount {RT}/secret.img {RT}/m; echo 'the host s secret' > {RT}/m/secret.txt; umount {RT}/m
         qemu-img create -q -f qcow2 -b {RT}/secret.img -F raw {RT}/trap.qcow2
         truncate -s 16M {trap}; dd if={RT}/trap.qcow2 of={trap} conv=notrunc status=none"
    ));
    let sum = |p: &str| sh(&format!("sha256sum {p} | cut -d' ' -f1")).trim().to_owned();
    let extra =
        format!("\n[domain.files]\nqmp = \"{RT}/files.qmp\"\ndisks = [\"{img}\", \"/dev/zvol/{vol}\", \"{trap}\"]\nreplicate_to = []\n");
    write_config(&["offsite"], &extra);
    let out = vmsnap(&["snapshot", "files", "--json", "--label", "m"]);
    check(out.status.success(), text(&out))?;
    let snap = serde_json::from_slice::<Value>(&out.stdout)?["name"].as_str().ok_or("no name")?.to_owned();
    sh(&format!("zfs set vmsnap:periods=hourly tank/vms/files@{snap} {vol}@{snap}"));
    // The live disks change after the snapshot.
    sh(&format!("mount /dev/zvol/{vol} {RT}/m && echo changed > {RT}/m/note.txt && umount {RT}/m"));
    let at = format!("{RT}/mnt");
    let out = vmsnap(&["mount", "files", &snap, &at, "--json"]);
    eprintln!("METRIC mount: {}", String::from_utf8_lossy(&out.stdout));
    check(out.status.success(), text(&out))?;
    let known = sum(&format!("{at}/disk0-p1/known.bin"));
    let note = std::fs::read_to_string(format!("{at}/disk1/note.txt"))?;
    let expected = sum(&format!("{RT}/known.bin"));
    check(known == expected, format!("known.bin read {known}, written {expected}"))?;
    check(note == "on the zvol\n", format!("the zvol's note reads {note:?}"))?;
    let ro = sh(&format!("touch {at}/disk1/x 2>&1 || echo refused"));
    check(ro.contains("refused"), format!("the mount is writable: {ro}"))?;
    // The guest's setuid program and device node are inert; only root enters the directory.
    let opts = sh(&format!("findmnt -n -o OPTIONS {at}/disk0-p1"));
    check(["ro", "nosuid", "nodev", "noexec"].iter().all(|o| opts.split(',').any(|x| x.trim() == *o)), format!("mount options: {opts}"))?;
    let ran = sh(&format!("{at}/disk0-p1/suid-root 2>&1 && echo ran || echo refused"));
    check(ran.contains("refused"), format!("a program on the guest's file system ran: {ran}"))?;
    let dev = sh(&format!("head -c 1 {at}/disk0-p1/host-null >/dev/null 2>&1 && echo opened || echo refused"));
    check(dev.contains("refused"), format!("the guest's device node opened: {dev}"))?;
    check(sh(&format!("stat -c %a {at}")).trim() == "700", "the mount directory is not 0700")?;
    // The trap disk is read as the raw disk it is: no file system, the host file never opened.
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let trapped = report.to_string();
    check(!std::path::Path::new(&format!("{at}/disk2")).exists() && !trapped.contains("secret"), format!("the trap disk: {trapped}"))?;
    check(sh(&format!("grep -rl secret {at} 2>/dev/null || true")).trim().is_empty(), "the host's secret is readable under the mount")?;
    let holds = sh(&format!("zfs holds -H tank/vms/files@{snap} {vol}@{snap}"));
    check(holds.matches("vmsnap-mount").count() == 2, format!("holds: {holds}"))?;
    // Retention far in the future would destroy it, but not while it is held.
    let future = sh("date -u -d '+400 days' +%Y-%m-%dT%H:%M:%SZ").trim().to_owned();
    let pruned = vmsnap(&["prune", "files", "--now", &future, "--json"]);
    check(pruned.status.success() && String::from_utf8_lossy(&pruned.stdout).contains("held"), text(&pruned))?;
    check(snaps("tank/vms/files").contains(&snap), "a held snapshot was pruned")?;
    // `vmsnap list` shows where it is mounted and the zvol's clone.
    let listed = vmsnap(&["list", "files", "--json"]);
    check(listed.status.success(), text(&listed))?;
    let rows: Vec<Value> = serde_json::from_slice(&listed.stdout)?;
    let row = |ds: &str| rows.iter().find(|r| r["snapshot"] == format!("{ds}@{snap}")).cloned().unwrap_or_default();
    check(row("tank/vms/files")["mounted_at"] == at.as_str(), format!("{rows:?}"))?;
    check(row(vol)["clones"] == serde_json::json!([format!("{vol}-mnt-{snap}")]), format!("{rows:?}"))?;
    let again = vmsnap(&["mount", "files", &snap, &format!("{RT}/mnt2")]);
    check(!again.status.success() && text(&again).contains("already mounted"), text(&again))?;
    let restore = vmsnap(&["restore", "files", &snap]);
    check(!restore.status.success() && text(&restore).contains("vmsnap umount files"), text(&restore))?;
    let out = vmsnap(&["umount", "files", &snap]);
    check(out.status.success(), text(&out))?;
    let left = sh(&format!(
        "grep -c ' {at}' /proc/mounts || true; zfs holds -H tank/vms/files@{snap} {vol}@{snap}; zfs list -H -o name | grep -c -- '-mnt-' || true; ls /sys/block/nbd0/pid 2>&1 || true"
    ));
    check(
        left.lines().next() == Some("0") && !left.contains("vmsnap-mount") && left.contains("No such file"),
        format!("left after umount: {left}"),
    )?;
    // Killed right after the first file system's directory was recorded: recover undoes it all.
    let out = Command::new(vmsnap_bin())
        .args(["--config", CONFIG, "mount", "files", &snap, &at])
        .env("VMSNAP_ABORT_AT", "after:mount_mount_planned")
        .output()?;
    check(!out.status.success(), text(&out))?;
    let out = vmsnap(&["recover"]);
    eprintln!("METRIC recover after a killed mount: {}", String::from_utf8_lossy(&out.stdout).trim());
    check(out.status.success() && text(&out).contains("undid the interrupted mount"), text(&out))?;
    let left = sh(&format!(
        "grep -c ' {at}' /proc/mounts || true; zfs holds -H tank/vms/files@{snap} {vol}@{snap}; zfs list -H -o name | grep -c -- '-mnt-' || true; ls /sys/block/nbd0/pid 2>&1 || true; ls {RT}/state/mounts"
    ));
    check(
        left.lines().next() == Some("0") && !left.contains("vmsnap-mount") && left.contains("No such file") && !left.contains(".json"),
        format!("left after recover: {left}"),
    )?;
    write_config(&["offsite"], "");
    Ok(())
}
