//! Hostile peers on the replication lane: a compromised source speaking `vmsnap serve`'s
//! protocol with crafted streams and requests (its own serve root, `backup/hostile`, as a second
//! source's key would have), and a target answering with a resume token that names another
//! dataset's snapshot, or sending back a snapshot whose domain XML it changed, or listing
//! thousands of snapshots.

use super::{add_ram, replicate, sec_domain, sh, snaps, snapshot, text, vmsnap, write_config, Failed, DST, DST_ZVOL, RT, SRC, ZVOL};
use vmsnap_testkit::rig::lane::vmsnap_bin;
use vmsnap_testkit::support::check;

const ROOT: &str = "backup/hostile";
const RAM: &str = "/backup/ram-hostile";

/// One request to `vmsnap serve` (what the forced command runs), followed by the bytes of
/// `stream` if any; its reply line.
fn serve(request: &str, stream: Option<&str>) -> String {
    serve_with("", request, stream)
}

/// [`serve`] with more of the forced command's options.
fn serve_with(options: &str, request: &str, stream: Option<&str>) -> String {
    let feed = stream.map(|f| format!("cat {f};")).unwrap_or_default();
    let out = std::process::Command::new("/bin/bash")
        .arg("-c")
        .arg(format!("{{ printf '%s\\n' '{request}'; {feed} }} | {} serve --root {ROOT} --ram-dir {RAM} {options}", vmsnap_bin()))
        .output()
        .expect("bash");
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned()
}

fn get(props: &str, name: &str) -> Vec<(String, String, String)> {
    sh(&format!("zfs get -H -o property,value,source {props} {name}"))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 3).then(|| (f[0].to_owned(), f[1].to_owned(), f[2].to_owned()))
        })
        .collect()
}

/// A `zfs send -R` stream whose dataset says `mountpoint=<somewhere outside>`, setuid/exec/
/// devices on, a reservation of backup pool space, and whose snapshot claims to be vmsnap's snapshot of this host's domain `web`:
/// received, it mounts only below the root, read-only, with the root's nosuid/noexec/nodev;
/// this host's restore does not take it for web's; the source can set properties neither on a
/// snapshot made on the target by hand nor of the target's own marks; a dump longer than it
/// announced is cut at the announced size.
pub fn hostile_source() -> Result<(), Failed> {
    let snap = "autosnap_2026-12-01_00:00:00_daily";
    sh(&format!(
        "set -e; zfs create -o mountpoint={RT}/evil-mnt -o setuid=on -o exec=on -o devices=on -o canmount=on -o reservation=256M tank/evil
         echo payload > {RT}/evil-mnt/payload
         zfs snapshot tank/evil@{snap}
         zfs set vmsnap:domain=web vmsnap:periods=daily vmsnap:consistency=app tank/evil@{snap}
         zfs send -R tank/evil@{snap} > {RT}/evil.stream
         zfs destroy -r tank/evil; rmdir {RT}/evil-mnt 2>/dev/null || true
         zfs create -o setuid=off -o exec=off -o devices=off {ROOT}"
    ));
    let reply = serve(r#"{"verb":"recv","dataset":"evil"}"#, Some(&format!("{RT}/evil.stream")));
    check(!reply.contains("\"error\""), format!("the receive: {reply}"))?;
    let ds = format!("{ROOT}/evil");
    for (prop, value, source) in get("mountpoint,setuid,exec,devices,readonly,reservation", &ds) {
        let want = match prop.as_str() {
            "mountpoint" => format!("/{ds}"),
            "readonly" => "on".into(),
            "reservation" => "none".into(),
            _ => "off".into(),
        };
        check(value == want && source != "received", format!("{ds}: {prop}={value} ({source}), want {want} not received"))?;
    }
    sh("zfs mount -a");
    let escaped = sh(&format!("findmnt -n -o SOURCE --target {RT}/evil-mnt 2>/dev/null || true"));
    check(!escaped.contains("evil"), format!("the replica mounted outside the root: {escaped}"))?;
    let mounted = sh(&format!("findmnt -n -o TARGET,OPTIONS -S {ds} || true"));
    check(
        mounted.starts_with(&format!("/{ds} ")) && mounted.contains(" ro,") && mounted.contains("nosuid"),
        format!("mounted: {mounted}"),
    )?;
    // The target's own marks, set locally by the server.
    check(sh(&format!("zfs get -H -s local -o value vmsnap:serve-root {ROOT}")).trim() == "on", "the root is not marked")?;
    let received = sh(&format!("zfs get -H -s local -o value vmsnap:received {ds}@{snap}"));
    check(received.trim().parse::<i64>().is_ok(), format!("{ds}@{snap} is not marked received: {received:?}"))?;
    // This host's own restore never takes a source's replica for a domain's snapshot.
    let out = vmsnap(&["restore", "web", snap, "--dry-run"]);
    check(!out.status.success() && !text(&out).contains(ROOT), format!("restore saw the hostile replica: {}", text(&out)))?;
    // Properties: only on what the source sent, and never the target's marks.
    let mine = "autosnap_2026-12-02_00:00:00_daily";
    sh(&format!("zfs snapshot {ds}@{mine}"));
    let props =
        |snapshot: &str, kv: &str| serve(&format!(r#"{{"verb":"props","dataset":"evil","snapshot":"{snapshot}","props":{{{kv}}}}}"#), None);
    let r = props(mine, r#""vmsnap:domain":"web","vmsnap:periods":"daily""#);
    check(r.contains("was not received by this target"), format!("props on a hand-made snapshot: {r}"))?;
    for kv in [r#""vmsnap:received":"1""#, r#""vmsnap:serve-root":"off""#, r#""com.example:x":"1""#] {
        let r = props(snap, kv);
        check(r.contains("not a property a source sets"), format!("props {kv}: {r}"))?;
    }
    let r = props(snap, r#""vmsnap:periods":"hourly""#);
    check(!r.contains("\"error\""), format!("props on what it sent: {r}"))?;
    check(sh(&format!("zfs get -H -s local -o value vmsnap:received {ds}@{mine}")).trim().is_empty(), "the hand-made snapshot got marked")?;
    // Two sources given one root and RAM directory: the first binds them, the other is refused.
    let list = r#"{"verb":"list","dataset":"evil"}"#;
    let r = serve_with("--source a", list, None);
    check(!r.contains("\"error\""), format!("source a: {r}"))?;
    for other in ["--source b", ""] {
        let r = serve_with(other, list, None);
        let error: serde_json::Value = serde_json::from_str(&r).map_err(|e| format!("{other:?} on a's root: {e}: {r}"))?;
        check(error["error"].as_str().is_some_and(|e| e.contains("serves the source \"a\"")), format!("{other:?} on a's root: {r}"))?;
    }
    check(sh(&format!("cat {RAM}/.vmsnap-source")).trim() == "a", "the RAM directory is not bound to a")?;
    sh(&format!("zfs inherit vmsnap:serve-source {ROOT} && rm {RAM}/.vmsnap-source"));
    // A dump longer than announced: the target stops at the announced size.
    sh(&format!("printf 0123456789ABCDEFGHIJ > {RT}/long.ram"));
    let sum = sh("printf 0123456789 | sha256sum | cut -d' ' -f1");
    let put = format!(r#"{{"verb":"ram-put","domain":"web","snapshot":"{snap}","sha256":"{}","offset":0,"size":10}}"#, sum.trim());
    let r = serve(&put, Some(&format!("{RT}/long.ram")));
    check(!r.contains("\"error\""), format!("ram-put: {r}"))?;
    let kept = sh(&format!("stat -c %s {RAM}/web/{snap}.ram"));
    check(kept.trim() == "10", format!("the target kept {} bytes of a 10-byte dump", kept.trim()))?;
    sh(&format!("zfs release -r vmsnap-replica {ds}@{snap}; zfs destroy -r {ROOT} && rm -rf {RAM} {RT}/evil.stream {RT}/long.ram"));
    Ok(())
}

/// The target's copy of the zvol is gone and a partial receive there was made from the
/// *filesystem's* stream: its token names `tank/vms/web@…`. The source refuses to send on it,
/// aborts the partial receive and sends the zvol in full.
pub fn forged_resume_token() -> Result<(), Failed> {
    sh(&format!(
        "set -e; for s in $(zfs list -H -t snapshot -o name -d 1 {DST_ZVOL}); do zfs release vmsnap-replica $s 2>/dev/null || true; done
         zfs destroy -r {DST_ZVOL}
         first=$(zfs list -H -t snapshot -o name -s createtxg -d 1 tank/vms/web | head -1)
         (zfs send $first | head -c 4194304 | zfs receive -s {DST_ZVOL}) || true"
    ));
    let token = sh(&format!("zfs get -H -o value receive_resume_token {DST_ZVOL}"));
    check(token.trim().len() > 10, format!("no partial receive to forge a token from: {token:?}"))?;
    let r = replicate(&[])?;
    let said = r.to_string();
    check(said.contains("another dataset") && said.contains("aborted an interrupted receive"), format!("the run: {said}"))?;
    check(sh(&format!("zfs get -H -o value type {DST_ZVOL}")).trim() == "volume", "the zvol's copy is not a volume")?;
    // The target's retention has pruned on its own by now: the copy's newest snapshot is the
    // source's newest, by GUID.
    let newest = |ds: &str| sh(&format!("zfs list -H -t snapshot -o name,guid -s createtxg -d 1 {ds} | tail -1 | sed 's/.*@//'"));
    check(newest(DST_ZVOL) == newest(ZVOL), format!("the zvol's copy ends at {:?}, the source at {:?}", newest(DST_ZVOL), newest(ZVOL)))
}

/// The target swaps a snapshot for one of the same name whose domain XML runs another
/// `<emulator>` (it destroys and takes it again over changed data, keeping the properties):
/// `restore --from` receives it, finds the XML is not what this host recorded when it took the
/// snapshot, and removes it again; without a record it refuses too, saying what the XML would
/// run, unless told `--trust-target`.
pub fn planted_xml() -> Result<(), Failed> {
    let planted = snapshot("h1")?;
    let newest = snapshot("h2")?;
    replicate(&[])?;
    let props = |snap: &str| {
        sh(&format!(
            "zfs get -H -s local -o property,value all {snap} | grep '^vmsnap:' | grep -v '^vmsnap:verified' | tr '\t' '=' | tr '\n' ' '"
        ))
    };
    for ds in [DST, DST_ZVOL] {
        let kept = props(&format!("{ds}@{planted}"));
        // The file system's XML is changed in a copy of its newest snapshot received aside, and
        // the changed snapshot received back as an increment on it: the replica itself is never mounted here (its
        // mount may live in the target sshd's mount namespace, and a snapshot read through
        // `.zfs/snapshot` keeps it busy, so mounting or remounting it failed late in the lane).
        let plant = if ds == DST {
            format!(
                "zfs destroy -r backup/plant 2>/dev/null || true; \
                 zfs send {ds}@{newest} | zfs receive -o readonly=off -o mountpoint={RT}/plant backup/plant; \
                 sed -i 's#</domain>#<devices><emulator>/tmp/evil-qemu</emulator></devices></domain>#' {RT}/plant/.vmsnap/web/domain.xml; \
                 zfs snapshot backup/plant@{planted}; \
                 zfs send -i @{newest} backup/plant@{planted} | zfs receive -F {ds}; \
                 zfs destroy -r backup/plant; "
            )
        } else {
            format!("zfs snapshot {ds}@{planted}; ")
        };
        sh(&format!(
            "set -e; zfs release vmsnap-replica {ds}@{planted} 2>/dev/null || true; zfs destroy {ds}@{planted}; {plant}\
             zfs set {kept} {ds}@{planted}"
        ));
    }
    // Pruned here.
    sh(&format!("zfs destroy {SRC}@{planted} && zfs destroy {ZVOL}@{planted}"));
    let out = vmsnap(&["restore", "web", &planted, "--from", "offsite"]);
    let said = text(&out);
    check(!out.status.success() && said.contains("domain.xml has sha256") && said.contains("removed again"), said.clone())?;
    check(!snaps(SRC).contains(&planted) && !snaps(ZVOL).contains(&planted), format!("the refused snapshot stayed: {said}"))?;
    // A host without records (rebuilt): refused, showing what the XML would run.
    sh(&format!("mv {RT}/state/integrity {RT}/integrity.saved"));
    let out = vmsnap(&["restore", "web", &planted, "--from", "offsite"]);
    sh(&format!("mv {RT}/integrity.saved {RT}/state/integrity"));
    let said = text(&out);
    check(
        !out.status.success() && said.contains("no record") && said.contains("/tmp/evil-qemu") && said.contains("--trust-target"),
        said.clone(),
    )?;
    check(!snaps(SRC).contains(&planted), format!("the unchecked snapshot stayed: {said}"))?;
    Ok(())
}

/// The disaster the backups are for, staged as a user would meet it: this host lost the domain's
/// datasets (the file system and the zvol), its RAM dumps and its state directory. `list
/// --target` still answers, and `restore --from` brings the snapshot back — in full, with its
/// dump — once told to trust the target (there is no record here to check it against). After
/// the same loss again, `restore --from --as` brings the datasets back and makes the copy.
pub fn disaster_restore() -> Result<(), Failed> {
    let snap = snapshot("d1")?;
    let sum = add_ram(&snap, 2)?;
    let disk = sh(&format!("sha256sum /{SRC}/disk0.img | cut -d' ' -f1")).trim().to_owned();
    let vol = sh(&format!("sha256sum /dev/zvol/{ZVOL} | cut -d' ' -f1")).trim().to_owned();
    replicate(&[])?;
    // What could keep the datasets busy, shown if the destroy fails.
    let busy = format!("grep -e {SRC} -e zd /proc/mounts; ps -eo pid,ppid,stat,etime,args | grep -v -e '\\['");
    sh(&format!(
        "zfs destroy -r -f {SRC} && zfs destroy -r -f {ZVOL} && rm -rf {RT}/ram/web {RT}/state && udevadm settle || {{ {busy}; exit 1; }}"
    ));
    let listed = vmsnap(&["list", "web", "--target", "offsite", "--json"]);
    check(listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains(&snap), text(&listed))?;
    let out = vmsnap(&["restore", "web", &snap, "--from", "offsite"]);
    check(!out.status.success() && text(&out).contains("no record") && text(&out).contains("--trust-target"), text(&out))?;
    check(sh(&format!("zfs list -H -o name {SRC} 2>&1 || true")).contains("does not exist"), "a refused pull left the dataset")?;
    let out = vmsnap(&["restore", "web", &snap, "--from", "offsite", "--trust-target"]);
    eprintln!("METRIC restore --from onto an empty host: {}", String::from_utf8_lossy(&out.stderr).trim());
    check(out.status.success(), text(&out))?;
    sh("udevadm settle");
    check(sh(&format!("sha256sum /{SRC}/disk0.img | cut -d' ' -f1")).trim() == disk, "the file disk is not the snapshot's")?;
    check(sh(&format!("sha256sum /dev/zvol/{ZVOL} | cut -d' ' -f1")).trim() == vol, "the zvol is not the snapshot's")?;
    let dump = format!("{RT}/ram/web/{snap}.ram");
    check(sh(&format!("sha256sum {dump} | cut -d' ' -f1")).trim() == sum, "the RAM dump did not come back")?;
    check(snaps(SRC).last() == Some(&snap), format!("{SRC}: {:?}", snaps(SRC)))?;

    // The same loss again, and a copy this time (`--as`): the datasets come back from the
    // target, and the copy's clones hold the snapshot's disks.
    sh(&format!(
        "zfs destroy -r -f {SRC} && zfs destroy -r -f {ZVOL} && rm -rf {RT}/ram/web {RT}/state && udevadm settle || {{ {busy}; exit 1; }}"
    ));
    let config = std::fs::read_to_string(super::CONFIG)?;
    let out = vmsnap(&["restore", "web", &snap, "--from", "offsite", "--trust-target", "--as", "webcopy", "--json"]);
    let copied = (|| {
        check(out.status.success(), text(&out))?;
        sh("udevadm settle");
        // The copy's datasets are named after it: tank/vms/webcopy and tank/vms/webcopy-data.
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
        let clones: Vec<&str> = report["clones"].as_array().map(|c| c.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
        check(clones.len() == 2 && clones.iter().all(|c| c.contains("webcopy")), format!("clones: {report}"))?;
        let (fs, zvol) = (SRC.replace("web", "webcopy"), ZVOL.replace("web", "webcopy"));
        check(clones.contains(&fs.as_str()) && clones.contains(&zvol.as_str()), format!("clones: {report}"))?;
        let clone_disk = sh(&format!("sha256sum /{fs}/disk0.img | cut -d' ' -f1"));
        check(clone_disk.trim() == disk, format!("the copy's file disk is not the snapshot's: {}", text(&out)))?;
        check(sh(&format!("sha256sum /dev/zvol/{zvol} | cut -d' ' -f1")).trim() == vol, "the copy's zvol is not the snapshot's")?;
        check(snaps(SRC).last() == Some(&snap), format!("{SRC} did not come back: {:?}", snaps(SRC)))
    })();
    std::fs::write(super::CONFIG, config)?;
    sh(&format!(
        "zfs destroy -r {}; zfs destroy -r {}; udevadm settle; true",
        SRC.replace("web", "webcopy"),
        ZVOL.replace("web", "webcopy")
    ));
    copied
}

/// The same loss for a domain whose dataset is encrypted (`sec`, replicated raw by the
/// encrypted-datasets case): it comes back raw, as it was sent, so nothing of it can be read or
/// checked until its key is loaded here. The first restore says so and keeps what it received;
/// once the key is loaded, the same command restores it.
pub fn disaster_restore_encrypted() -> Result<(), Failed> {
    const SEC: &str = "tank/vms/sec";
    write_config(&["offsite"], &sec_domain());
    let restored = (|| {
        let snap = snaps(SEC).last().cloned().ok_or("sec has no snapshot (the encrypted-datasets case makes one)")?;
        let disk = sh(&format!("sha256sum /{SEC}/disk.img | cut -d' ' -f1")).trim().to_owned();
        sh(&format!("zfs destroy -r -f {SEC} && rm -rf {RT}/state && udevadm settle"));
        let out = vmsnap(&["restore", "sec", &snap, "--from", "offsite", "--trust-target"]);
        let said = text(&out);
        check(!out.status.success() && said.contains("not loaded") && said.contains(SEC) && said.contains("zfs load-key"), &said)?;
        let kept = sh(&format!("zfs get -H -o value keystatus {SEC} 2>&1"));
        check(kept.contains("unavailable"), format!("the raw receive was not kept: {kept}"))?;
        // As the hint says: the key's file, then the same command.
        sh(&format!("zfs set keylocation=file://{RT}/pass {SEC} && zfs load-key {SEC}"));
        let out = vmsnap(&["restore", "sec", &snap, "--from", "offsite", "--trust-target"]);
        check(out.status.success() && text(&out).contains("here already"), text(&out))?;
        check(sh(&format!("sha256sum /{SEC}/disk.img | cut -d' ' -f1")).trim() == disk, "the encrypted disk is not the snapshot's")?;
        check(sh(&format!("zfs get -H -o value encryption {SEC}")).trim() != "off", "the restored dataset is not encrypted")
    })();
    write_config(&["offsite"], "");
    restored
}

/// A target program behind the forced command instead of `vmsnap serve`: it answers `list` as
/// `{RT}/hostile-mode` says and refuses anything else.
const HOSTILE_TARGET: &str = r#"#!/bin/bash
IFS= read -r -n 65536 line
case "$line" in
  *'"verb":"list"'*) ;;
  *) echo '{"ok":false,"error":"refused"}'; exit 0 ;;
esac
after=$(printf '%s' "$line" | sed -n 's/.*"after":\([0-9]*\).*/\1/p')
mode=$(cat /root/rt/hostile-mode)
# entries FROM, how many, more (true/false), the padding of each entry's property
listing() {
  awk -v from="$1" -v n="$2" -v more="$3" -v pad="$4" 'BEGIN {
    p = ""; for (k = 0; k < pad; k++) p = p "x";
    printf "{\"ok\":true,\"value\":{\"exists\":true,\"written\":0,\"more\":%s,\"snapshots\":[", more;
    for (i = from; i < from + n; i++) {
      if (i > from) printf ",";
      printf "{\"name\":\"planted%06d\",\"guid\":%d,\"createtxg\":%d,\"props\":{\"vmsnap:domain\":\"web%s\"}}", i, 7000000 + i, i, p;
    }
    printf "]}}\n";
  }'
}
case "$mode" in
  many) listing 1 5000 false 0 ;;
  endless) listing $(( ${after:-0} + 1 )) 5000 true 0 ;;
  huge) listing 1 5000 false 300 ;;
esac
"#;

/// A hostile target's listings (a program answering `list` behind the forced command): 5,000
/// snapshots the source never made are a divergence, said in a few words, nothing sent; pages
/// that never end are refused at the most a source takes (100,000); a reply over the 1 MiB a
/// source reads is refused. Each run ends within seconds, and the real target is untouched.
pub fn hostile_listings() -> Result<(), Failed> {
    let program = format!("{RT}/hostile-target");
    std::fs::write(&program, HOSTILE_TARGET)?;
    sh(&format!("chmod 755 {program}"));
    let key = std::fs::read_to_string(format!("{RT}/id.pub"))?;
    std::fs::write(format!("{RT}/authorized_keys"), format!("command=\"{program}\",restrict {}\n", key.trim()))?;
    let _ = std::process::Command::new("/bin/sh").arg("-c").arg(format!("rm -f {RT}/state/ssh/*")).status();
    let before = sh("zfs list -H -t all -o name,guid -r backup | sort");
    let run = |mode: &str| {
        std::fs::write(format!("{RT}/hostile-mode"), mode).unwrap();
        let t = std::time::Instant::now();
        let out = vmsnap(&["replicate", "web", "--local"]);
        eprintln!("METRIC hostile listing {mode}: {:.1} s, exit {:?}", t.elapsed().as_secs_f64(), out.status.code());
        (out, t.elapsed())
    };
    let res = (|| {
        let (out, took) = run("many");
        let said = text(&out);
        check(out.status.code() == Some(3) && said.contains("no snapshot in common") && said.contains("and 4995 more"), &said)?;
        check(said.len() < 4000 && took.as_secs() < 60, format!("{} bytes said in {took:?}", said.len()))?;
        let (out, took) = run("endless");
        let said = text(&out);
        check(!out.status.success() && said.contains("more than 100000 snapshots"), &said)?;
        check(took.as_secs() < 180, format!("the endless listing took {took:?}"))?;
        let (out, took) = run("huge");
        let said = text(&out);
        check(
            !out.status.success() && said.contains("more than 1 MiB") && said.len() < 4000 && took.as_secs() < 60,
            format!("{took:?}: {said}"),
        )?;
        eprintln!("METRIC hostile listing huge says: {}", said.lines().find(|l| l.contains("error")).unwrap_or_default());
        check(sh("zfs list -H -t all -o name,guid -r backup | sort") == before, "the backup host's datasets changed")
    })();
    super::forced_command("");
    res
}
