//! Benchmark: `vmsnap replicate` against a bare `zfs send | ssh … zfs receive` pipe of the same
//! snapshots, full and incremental, with ssh compression off and on.
//!
//! `cargo bench --bench replication` (ZFS lane: inside the rig's OpenZFS VM; the "remote host" is
//! an `sshd` in its own network namespace, as on the replication lane). The data set is 1 GiB
//! of base64 text (compressible, as disk images are) in one file of a dataset; its second
//! snapshot rewrites all of it, so the increment is 1 GiB too. Each figure is the wall time of
//! the whole command (connection set-up included) for the same stream; the target is emptied
//! between runs, and the two ways alternate so neither always finds the source in the ARC.
//! Knobs: `VMSNAP_BENCH_N` rounds without compression and `VMSNAP_BENCH_N_COMPRESSED` with it
//! (default 1 each; zlib under TCG is slow, 4 minutes a run); `VMSNAP_BENCH_COMPRESSION=off|on`
//! for one of the two; `VMSNAP_BENCH_MIB` the data's size (default 1024; a small one shows the
//! fixed cost per run); `VMSNAP_BENCH_TRACE=1` appends vmsnap's debug log (timed requests and
//! `zfs` commands) to `replication-bench.trace` beside the binaries.
//! Prints MiB/s and the ratio vmsnap/bare (goal ≥ 0.9).

use std::process::Command;
use std::time::Instant;
use vmsnap_testkit::rig::lane::{sh, vmsnap_bin};
use vmsnap_testkit::rig::remote;
use vmsnap_testkit::support::median;

const DIR: &str = "/root/rb";
const SRC: &str = "tank/vms/bench";
const DST: &str = "backup/replica/tank/vms/bench";
const CONFIG: &str = "/root/rb/vmsnap.toml";

fn main() {
    vmsnap_testkit::rig::lane::dispatch(inside);
}

fn inside() {
    let rounds = env_n("VMSNAP_BENCH_N");
    sh("zpool create -f -O mountpoint=/tank tank /dev/disk/by-id/virtio-pool1");
    sh("zpool create -f -O mountpoint=/backup backup /dev/disk/by-id/virtio-pool2 && zfs create backup/replica && mkdir -p /backup/ram");
    sh(&format!("mkdir -p {DIR}/ram && chmod 700 {DIR} && zfs create -p {SRC}"));
    remote::start(DIR);
    // Two keys: vmsnap's pinned to `vmsnap serve`, the bare pipe's free to run `zfs receive`.
    sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {DIR}/bare"));
    let key = |f: &str| std::fs::read_to_string(format!("{DIR}/{f}.pub")).unwrap().trim().to_owned();
    std::fs::write(
        format!("{DIR}/authorized_keys"),
        format!("command=\"{} serve --root backup/replica --ram-dir /backup/ram\",restrict {}\n{}\n", vmsnap_bin(), key("id"), key("bare")),
    )
    .unwrap();
    let ssh_opts = remote::ssh_options(DIR);

    let t = Instant::now();
    let mib: u64 = std::env::var("VMSNAP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    note(&format!("filling {mib} MiB"));
    fill(mib);
    let first = snapshot("first");
    let full_bytes = estimate(&format!("zfs send -nP {SRC}@{first}"));
    fill(mib);
    let second = snapshot("second");
    let incr_bytes = estimate(&format!("zfs send -nP -i @{first} {SRC}@{second}"));
    note(&format!("data: two snapshots of {mib} MiB each, made in {:.0} s", t.elapsed().as_secs_f64()));

    let bare_ssh = |compress: bool| {
        let mut a = vec!["ssh".to_owned(), "-i".into(), format!("{DIR}/bare")];
        a.extend(ssh_opts.iter().cloned());
        if compress {
            a.push("-C".into());
        }
        a.push(format!("root@{}", remote::ADDRESS));
        a.join(" ")
    };
    println!("replication of {} MiB (full) and {} MiB (incremental) over ssh", full_bytes >> 20, incr_bytes >> 20);
    println!("{:<40} {:>12} {:>12} {:>8}", "", "vmsnap MiB/s", "bare MiB/s", "ratio");
    // `VMSNAP_BENCH_COMPRESSION=off|on` runs one of the two (ssh -C under TCG is slow).
    let modes: &[bool] = match std::env::var("VMSNAP_BENCH_COMPRESSION").as_deref() {
        Ok("off") => &[false],
        Ok("on") => &[true],
        _ => &[false, true],
    };
    for &compress in modes {
        config(compress, &ssh_opts);
        let rounds = if compress { env_n("VMSNAP_BENCH_N_COMPRESSED") } else { rounds };
        let (mut vf, mut bf, mut vi, mut bi) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let ssh = bare_ssh(compress);
            let bare_full = || {
                reset();
                timed(&format!("zfs send {SRC}@{first} | {ssh} zfs receive -s -u {DST}"))
            };
            let bare_incr = || {
                back_to_first();
                timed(&format!("zfs send -i @{first} {SRC}@{second} | {ssh} zfs receive -s -u {DST}"))
            };
            let vmsnap_full = || {
                reset();
                // Only the first snapshot is the domain's for this run.
                sh(&format!("zfs inherit vmsnap:domain {SRC}@{second}"));
                let s = timed(&replicate());
                sh(&format!("zfs set vmsnap:domain=bench {SRC}@{second}"));
                s
            };
            let vmsnap_incr = || {
                back_to_first();
                // The base may be the bare pipe's, and a target sets properties only on what its
                // `vmsnap serve` received: mark it as serve would have (not timed).
                sh(&format!("zfs set vmsnap:received=$(date +%s) $(zfs list -H -t snapshot -o name -s createtxg -d 1 {DST} | head -1)"));
                timed(&replicate())
            };
            // Alternate which goes first; the incrementals start from the full the last full run
            // left on the target (rolled back to the first snapshot each time).
            if round % 2 == 0 {
                vf.push(vmsnap_full());
                bf.push(bare_full());
                bi.push(bare_incr());
                vi.push(vmsnap_incr());
            } else {
                bf.push(bare_full());
                vf.push(vmsnap_full());
                vi.push(vmsnap_incr());
                bi.push(bare_incr());
            }
        }
        let c = if compress { format!("ssh -C, {rounds} round(s)") } else { format!("no compression, {rounds} round(s)") };
        for (what, bytes, v, b) in [("full", full_bytes, &vf, &bf), ("incremental", incr_bytes, &vi, &bi)] {
            let (v, b) = (median(v.clone()), median(b.clone()));
            let mibs = |s: f64| bytes as f64 / 1_048_576.0 / s;
            let row = format!("{:<40} {:>12.1} {:>12.1} {:>8.2}", format!("{what}, {c}"), mibs(v), mibs(b), b / v);
            note(&row);
            println!("{row}");
        }
    }
    remote::stop();
    let _ = Command::new("/bin/sh").arg("-c").arg("zpool destroy backup; zpool destroy tank").status();
}

/// A count from the environment, 1 by default.
fn env_n(var: &str) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// `vmsnap replicate` of the bench domain, as a shell command.
fn replicate() -> String {
    let trace = std::env::var_os("VMSNAP_BENCH_TRACE").is_some();
    let log = if trace { "VMSNAP_LOG=vmsnap=debug " } else { "" };
    let to = if trace { "2>> /mnt/share/replication-bench.trace" } else { "" };
    format!("{log}{} --config {CONFIG} replicate bench --json > /dev/null {to}", vmsnap_bin())
}

/// Rewrites the data file with `mib` MiB of fresh base64 text.
fn fill(mib: u64) {
    sh(&format!("head -c {} /dev/urandom | base64 -w 0 > /{SRC}/disk0.img && sync", mib * 3 / 4 * 1_048_576));
}

/// An offline vmsnap snapshot of the bench domain (so it carries vmsnap's properties); its name.
fn snapshot(label: &str) -> String {
    config(false, &remote::ssh_options(DIR));
    let out = sh(&format!("{} --config {CONFIG} snapshot bench --label {label} --json 2>/dev/null", vmsnap_bin()));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("a snapshot report");
    v["name"].as_str().expect("a name").to_owned()
}

fn config(compress: bool, ssh_opts: &[String]) {
    let opts = ssh_opts.iter().map(|o| format!("\"{o}\"")).collect::<Vec<_>>().join(", ");
    std::fs::write(
        CONFIG,
        format!(
            "state_dir = \"{DIR}/state\"\nram_dir = \"{DIR}/ram\"\n\n\
             [domain.bench]\nqmp = \"{DIR}/bench.qmp\"\ndisks = [\"/{SRC}/disk0.img\"]\nreplicate_to = [\"offsite\"]\n\n\
             [target.offsite]\nhost = \"{}\"\nidentity = \"{DIR}/id\"\ncompress = {compress}\nssh_options = [{opts}]\n",
            remote::ADDRESS
        ),
    )
    .unwrap();
}

/// The target emptied, and the source's cursor bookmarks gone (each run starts alike).
fn reset() {
    sh(&format!(
        "for s in $(zfs list -H -t snapshot -o name -r {DST} 2>/dev/null); do zfs release vmsnap-replica $s 2>/dev/null; done; \
         zfs destroy -r {DST} 2>/dev/null; zfs list -H -t bookmark -o name -d 1 {SRC} | xargs -r -n1 zfs destroy; \
         zfs create -p backup/replica/tank/vms; sync"
    ));
}

/// The target back at the first snapshot (what a full run left there), for an incremental.
fn back_to_first() {
    sh(&format!(
        "for s in $(zfs list -H -t snapshot -o name -r {DST}); do zfs release vmsnap-replica $s 2>/dev/null; done; \
         zfs rollback -r $(zfs list -H -t snapshot -o name -s createtxg -d 1 {DST} | head -1); \
         zfs list -H -t bookmark -o name -d 1 {SRC} | xargs -r -n1 zfs destroy; sync"
    ));
}

/// `zfs send -nP`'s size.
fn estimate(cmd: &str) -> u64 {
    sh(cmd).lines().find_map(|l| l.strip_prefix("size\t")).and_then(|n| n.trim().parse().ok()).expect("a size")
}

/// Seconds a shell pipeline takes (it must succeed); logged as it goes.
fn timed(script: &str) -> f64 {
    let t = Instant::now();
    sh(&format!("set -o pipefail; {script}"));
    let s = t.elapsed().as_secs_f64();
    note(&format!("{s:.1} s: {}", script.chars().take(160).collect::<String>()));
    s
}

/// A line on stderr and in `replication-bench.log` beside the binaries on the host (the VM's
/// output reaches the host only at the end): a long run can be followed, and a run cut short
/// still leaves its figures.
fn note(line: &str) {
    use std::io::Write;
    eprintln!("{line}");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open("/mnt/share/replication-bench.log") {
        let _ = writeln!(f, "{line}");
    }
}
