//! `--as NEW` of a config domain: the new domain is a `[domain.NEW]` table appended to the
//! configuration file, written from the original's — its disks on the clones, its own QMP and
//! agent sockets and nvram file (the original's names with `NEW-` in front, or the clone's
//! paths when they were on the datasets), and its `start` vector with every one of those paths
//! replaced (plain, `key=PATH` or inside a JSON `-blockdev`), every other listening socket in
//! it renamed the same way, and `-name`. A `start` that would still name a file on the
//! snapshot's datasets is refused; other paths the original uses (a kernel, a log) are said. The table carries `autosnap = false`: a copy is not scheduled until you say so.

use crate::config::DomainConfig;
use std::path::{Path, PathBuf};

/// The new domain, as appended.
#[derive(Debug)]
pub(super) struct Table {
    /// The text appended to the configuration file (whole lines).
    pub text: String,
    pub domain: DomainConfig,
    pub warnings: Vec<String>,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The copy of `dom` as `new`: disks under the clones' paths (`paths`: old → new prefixes),
/// its nvram at `nvram`. A disk not on the snapshot's datasets is refused (both would write it).
pub(super) fn table(
    dom: &DomainConfig,
    new: &str,
    snapshot: &str,
    paths: &[(PathBuf, PathBuf)],
    nvram: Option<&Path>,
) -> Result<Table, String> {
    let own = |p: &Path| super::rename::own_file(p, new, paths);
    let mut disks = Vec::new();
    for d in &dom.disks {
        disks.push(
            super::rename::moved(d, paths)
                .ok_or_else(|| format!("disk {} is not on the snapshot's datasets: the new VM would write the same image", d.display()))?,
        );
    }
    let qmp = own(&dom.qmp);
    let qga = dom.qga.as_deref().map(own);
    // Longest first: a path inside another renamed one is replaced whole.
    let mut swaps: Vec<(String, String)> = vec![(path_str(&dom.qmp), path_str(&qmp))];
    if let (Some(o), Some(n)) = (&dom.qga, &qga) {
        swaps.push((path_str(o), path_str(n)));
    }
    if let (Some(o), Some(n)) = (&dom.nvram, nvram) {
        swaps.push((path_str(o), path_str(n)));
    }
    swaps.extend(paths.iter().map(|(o, n)| (path_str(o), path_str(n))));
    // A listening socket is the VM's own: QEMU unlinks and rebinds its path, so a copy sharing
    // one would take it from the original for good.
    for p in server_sockets(&dom.start) {
        if !swaps.iter().any(|(o, _)| *o == p) {
            let new_path = path_str(&own(Path::new(&p)));
            swaps.push((p, new_path));
        }
    }
    swaps.sort_by_key(|(o, _)| std::cmp::Reverse(o.len()));
    let mut start = Vec::new();
    let mut shared = Vec::new();
    for (i, arg) in dom.start.iter().enumerate() {
        let renamed = if i > 0 && dom.start[i - 1] == "-name" && (arg == &dom.name || arg.starts_with(&format!("{},", dom.name))) {
            arg.replacen(&dom.name, new, 1)
        } else {
            swap_paths(arg, &swaps)
        };
        if i > 0 && renamed == *arg && arg.contains('/') {
            shared.push(arg.clone());
        }
        start.push(renamed);
    }
    // A file on the snapshot's datasets still named is the original's own: the copy would run on
    // it (with the original stopped, QEMU's image lock does not object). Refused, never warned.
    if let Some((arg, old)) = start.iter().find_map(|a| paths.iter().find(|(o, _)| names_below(a, &path_str(o))).map(|(o, _)| (a, o))) {
        return Err(format!(
            "{new}'s `start` would still name the original's {} in {arg:?}: write that path in `start` as a plain argument, \
             `key=PATH` or a JSON string so that vmsnap can move it to the clone",
            old.display()
        ));
    }
    let mut warnings = Vec::new();
    if !shared.is_empty() {
        warnings.push(format!(
            "these arguments of {new}'s `start` still name what the original uses (fine for a kernel or an ISO, not for a log or a socket): {}",
            shared.join(" ")
        ));
    }
    if dom.start.iter().any(|a| matches!(a.as_str(), "-netdev" | "-nic" | "-net")) {
        warnings.push(format!("{new} has the original's network devices and MAC addresses: give it others before both run on one network"));
    }
    let mut text =
        format!("\n# A copy of {}@{snapshot}, made by `vmsnap restore --as {new}`.\n[domain.{new}]\nautosnap = false\n", dom.name);
    text += &format!("qmp = {}\n", quoted(&path_str(&qmp)));
    if let Some(q) = &qga {
        text += &format!("qga = {}\n", quoted(&path_str(q)));
    }
    text += &format!("disks = [{}]\n", disks.iter().map(|d| quoted(&path_str(d))).collect::<Vec<_>>().join(", "));
    if let Some(n) = nvram {
        text += &format!("nvram = {}\n", quoted(&path_str(n)));
    }
    if !start.is_empty() {
        text += &format!("start = [\n{}\n]\n", start.iter().map(|a| format!("    {},", quoted(a))).collect::<Vec<_>>().join("\n"));
    }
    let domain = DomainConfig {
        name: new.to_owned(),
        uuid: None,
        qmp,
        qga,
        disks,
        nvram: nvram.map(Path::to_path_buf),
        xml: None,
        start,
        quiesce: dom.quiesce,
        policy: dom.policy.clone(),
    };
    Ok(Table { text, domain, warnings })
}

/// The paths of the listening sockets in a QEMU argument vector (`unix:PATH,…,server=on`,
/// `socket,…,path=PATH,server=on`).
fn server_sockets(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args {
        let opts: Vec<&str> = arg.split(',').collect();
        if !opts.iter().any(|o| matches!(*o, "server" | "server=on" | "server=yes" | "server=true")) {
            continue;
        }
        for o in opts {
            if let Some(p) = o.strip_prefix("unix:").or_else(|| o.strip_prefix("path=")) {
                if p.starts_with('/') && !out.iter().any(|x| x == p) {
                    out.push(p.to_owned());
                }
            }
        }
    }
    out
}

/// Whether `arg` names `dir` or a path below it anywhere (a JSON `-blockdev` too), wherever
/// a path may start.
fn names_below(arg: &str, dir: &str) -> bool {
    arg.match_indices(dir).any(|(i, _)| {
        let before = arg[..i].chars().last();
        let after = arg[i + dir.len()..].chars().next();
        before.is_none_or(|c| !c.is_alphanumeric() && !matches!(c, '-' | '_' | '.' | '/'))
            && after.is_none_or(|c| matches!(c, '/' | ',' | ':' | '"'))
    })
}

/// `arg` with every old path in it replaced by its new one, where it stands as a whole path
/// (after nothing, `=`, `:`, `,` or a JSON string's `"`; followed by nothing, `,`, `:`, `/` or `"`).
fn swap_paths(arg: &str, swaps: &[(String, String)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    'scan: while !rest.is_empty() {
        for (old, new) in swaps {
            if let Some(after) = rest.strip_prefix(old.as_str()) {
                let boundary = out.is_empty() || out.ends_with(['=', ':', ',', '"']);
                if boundary && (after.is_empty() || after.starts_with([',', ':', '/', '"'])) {
                    out.push_str(new);
                    rest = after;
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Appends `text` to the configuration file (atomically: the whole file rewritten, its mode kept).
pub(super) fn append(config: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let old = std::fs::read_to_string(config).map_err(|e| format!("reading {}: {e}", config.display()))?;
    let mode = std::fs::metadata(config).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o644);
    let mut new = old;
    if !new.ends_with('\n') && !new.is_empty() {
        new.push('\n');
    }
    new.push_str(text);
    crate::config::Config::parse(&new, config).map_err(|e| format!("the configuration with the copy would not load: {e}"))?;
    crate::fsutil::write_atomic(config, new.as_bytes(), mode).map_err(|e| format!("writing {}: {e}", config.display()))
}

/// Takes `text` back out of the configuration file when it is still there as appended (the end
/// of the file). True when it was removed.
pub(super) fn remove(config: &Path, text: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(now) = std::fs::read_to_string(config) else { return false };
    let Some(before) = now.strip_suffix(text) else { return false };
    let mode = std::fs::metadata(config).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o644);
    crate::fsutil::write_atomic(config, before.as_bytes(), mode).is_ok()
}

/// Whether the copy's table is in the configuration file.
pub(super) fn present(config: &Path, text: &str) -> bool {
    std::fs::read_to_string(config).is_ok_and(|now| now.contains(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom() -> DomainConfig {
        let mut d = DomainConfig::by_name("demo");
        d.qmp = "/run/vm/qmp.sock".into();
        d.qga = Some("/run/vm/qga.sock".into());
        d.disks = vec!["/tank/vms/demo/disk0.qcow2".into(), "/dev/zvol/tank/vms/demo-data".into()];
        d.nvram = Some("/etc/vmsnap/demo_VARS.fd".into());
        d.start = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "demo",
            "-qmp",
            "unix:/run/vm/qmp.sock,server=on,wait=off",
            "-chardev",
            "socket,id=qga0,path=/run/vm/qga.sock,server=on,wait=off",
            "-qmp",
            "unix:/run/vm/observer.sock,server=on,wait=off",
            "-drive",
            "file=/tank/vms/demo/disk0.qcow2,if=virtio",
            "-drive",
            "file=/dev/zvol/tank/vms/demo-data,if=virtio,format=raw",
            "-drive",
            "file=/tank/vms/demo-other/x.img,if=virtio",
            "-kernel",
            "/srv/vmlinux",
            "-serial",
            "file:/run/vm/console.log",
        ]
        .map(String::from)
        .to_vec();
        d
    }

    fn paths() -> Vec<(PathBuf, PathBuf)> {
        vec![
            ("/tank/vms/demo".into(), "/tank/vms/demo2".into()),
            ("/dev/zvol/tank/vms/demo-data".into(), "/dev/zvol/tank/vms/demo2-data".into()),
        ]
    }

    #[test]
    fn a_copy_gets_its_own_disks_sockets_nvram_and_name() {
        let t = table(&dom(), "demo2", "s1", &paths(), Some(Path::new("/etc/vmsnap/demo2-demo_VARS.fd"))).unwrap();
        let s = &t.domain.start;
        assert_eq!(s[2], "demo2");
        assert_eq!(s[4], "unix:/run/vm/demo2-qmp.sock,server=on,wait=off");
        assert_eq!(s[6], "socket,id=qga0,path=/run/vm/demo2-qga.sock,server=on,wait=off");
        // A listening socket not named in the table is the VM's own too.
        assert_eq!(s[8], "unix:/run/vm/demo2-observer.sock,server=on,wait=off");
        assert_eq!(s[10], "file=/tank/vms/demo2/disk0.qcow2,if=virtio");
        assert_eq!(s[12], "file=/dev/zvol/tank/vms/demo2-data,if=virtio,format=raw");
        // `/tank/vms/demo-other` is not under `/tank/vms/demo`: a prefix of a name is no path.
        assert_eq!(s[14], "file=/tank/vms/demo-other/x.img,if=virtio");
        assert_eq!(t.domain.qmp, Path::new("/run/vm/demo2-qmp.sock"));
        assert!(t.warnings[0].contains("/srv/vmlinux") && t.warnings[0].contains("file:/run/vm/console.log"), "{:?}", t.warnings);
        assert!(t.warnings[0].contains("demo-other"), "{:?}", t.warnings);
        // The appended text loads as a configuration of its own, with the copy unscheduled.
        let cfg = crate::config::Config::parse(&t.text, Path::new("/x.toml")).unwrap();
        let d = &cfg.domains["demo2"];
        assert_eq!((&d.disks, &d.start, d.policy.autosnap), (&t.domain.disks, &t.domain.start, false));
    }

    #[test]
    fn a_json_blockdev_is_moved_and_a_path_left_on_the_original_refused() {
        let mut d = dom();
        d.start.extend(["-blockdev".into(), r#"{"driver":"file","filename":"/tank/vms/demo/disk1.qcow2","node-name":"f1"}"#.into()]);
        let t = table(&d, "demo2", "s1", &paths(), None).unwrap();
        assert_eq!(t.domain.start.last().unwrap(), r#"{"driver":"file","filename":"/tank/vms/demo2/disk1.qcow2","node-name":"f1"}"#);
        // A path vmsnap cannot tell apart from its surroundings stays the original's: refused.
        let mut d = dom();
        d.start.extend(["-append".into(), "root=/dev/vda log=@/tank/vms/demo/log.txt".into()]);
        let e = table(&d, "demo2", "s1", &paths(), None).unwrap_err();
        assert!(e.contains("/tank/vms/demo") && e.contains("log.txt"), "{e}");
        assert!(names_below("x /tank/vms/demo", "/tank/vms/demo"));
        assert!(!names_below("/tank/vms/demo-other/x", "/tank/vms/demo"));
        assert!(!names_below("/tank/vms/demo2/x", "/tank/vms/demo"));
    }

    #[test]
    fn a_disk_outside_the_snapshot_is_refused_and_the_table_comes_back_out() {
        let mut d = dom();
        d.disks.push("/srv/shared.img".into());
        assert!(table(&d, "demo2", "s1", &paths(), None).unwrap_err().contains("/srv/shared.img"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmsnap.toml");
        std::fs::write(&path, "state_dir = \"/var/lib/vmsnap\"\n").unwrap();
        let t = table(&dom(), "demo2", "s1", &paths(), None).unwrap();
        append(&path, &t.text).unwrap();
        assert!(present(&path, &t.text));
        assert!(remove(&path, &t.text));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "state_dir = \"/var/lib/vmsnap\"\n");
        assert!(!remove(&path, &t.text), "only what is still there");
    }
}
