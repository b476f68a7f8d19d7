//! Bad input on the command line and on the hook's stdin: a clear refusal, never a panic, and
//! nothing touched. Needs nothing from the rig (every refusal comes before QEMU or ZFS).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

fn vmsnap(args: &[&std::ffi::OsStr], config: &std::path::Path, stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("VMSNAP_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vmsnap.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n[domain.vm]\nqmp = \"/run/no-such.qmp\"\n", dir.path().join("state").display()))
        .unwrap();
    (dir, cfg)
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn non_utf8_arguments_are_refused_not_panicked_on() {
    let (_dir, cfg) = setup();
    let bad = std::ffi::OsStr::from_bytes(b"v\xffm");
    for args in
        [vec![os("snapshot"), bad], vec![os("list"), bad], vec![os("prune"), bad], vec![os("snapshot"), os("vm"), os("--label"), bad]]
    {
        let out = vmsnap(&args, &cfg, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("UTF-8") && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_hook_exits_0_on_any_input() {
    let (_dir, cfg) = setup();
    let bad = std::ffi::OsStr::from_bytes(b"\xff");
    let cases: Vec<(Vec<&std::ffi::OsStr>, Vec<u8>)> = vec![
        (vec![os("hook"), bad, os("started"), os("begin"), os("-")], b"<domain/>".to_vec()),
        (vec![os("hook"), os("vm"), os("started"), os("begin"), os("-")], vec![0xff, 0xfe, 0x00]),
        // Larger than the hook reads: drained, refused, exit 0.
        (vec![os("hook"), os("vm"), os("started"), os("begin"), os("-")], vec![b'x'; 6 << 20]),
        (vec![os("hook")], Vec::new()),
    ];
    for (args, stdin) in cases {
        let out = vmsnap(&args, &cfg, &stdin);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A domain named like a subcommand is an argument like any other: `vmsnap snapshot hook` with a
/// bad option is refused with exit 2 (only `vmsnap hook …` exits 0 whatever it is given), and
/// `vmsnap list daemon` does not log as the daemon does.
#[test]
fn a_domain_named_hook_or_daemon_is_just_a_name() {
    let (_dir, cfg) = setup();
    let out = vmsnap(&[os("snapshot"), os("hook"), os("--no-such-option")], &cfg, b"");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = vmsnap(&[os("list"), os("daemon")], &cfg, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains(" INFO "), "{err}");
}

#[test]
fn a_long_label_is_refused_before_anything_is_touched() {
    let (dir, cfg) = setup();
    let label = "a".repeat(300);
    for label in [label.as_str(), "", "a/b", "x y", "é"] {
        let out = vmsnap(&[os("snapshot"), os("vm"), os("--local"), os(&format!("--label={label}"))], &cfg, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{label:?}: {err}");
        assert!(err.contains("1 to 64 letters"), "{label:?}: {err}");
    }
    assert!(!dir.path().join("state").exists(), "nothing is created for a refused label");
}

#[test]
fn an_empty_config_says_there_is_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vmsnap.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n", dir.path().join("state").display())).unwrap();
    for cmd in ["list", "prune"] {
        let out = vmsnap(&[os(cmd)], &cfg, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains("configures no domain") && err.contains("vmsnap.toml"), "{cmd}: {err}");
    }
}

/// A snapshot name that could not be one, or a target the config lacks: refused naming it,
/// before any state file or dataset is looked for.
#[test]
fn bad_snapshot_and_target_names_are_refused_naming_them() {
    let (dir, cfg) = setup();
    let cases: [(&[&str], &str); 6] = [
        (&["mount", "vm", "../../x"], "\"../../x\" is not a snapshot name"),
        (&["umount", "vm", "a@b"], "\"a@b\" is not a snapshot name"),
        (&["restore", "vm", "x;rm -rf /"], "is not a snapshot name"),
        (&["replicate", "vm", "--target", "nope"], "no [target.nope] in"),
        (&["verify", "vm", "--target", "nope"], "(known: none)"),
        (&["list", "vm", "--target", "nope"], "no [target.nope] in"),
    ];
    for (args, says) in cases {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| os(a)).collect();
        let out = vmsnap(&args, &cfg, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says) && !err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("state/mounts").exists(), "a refused mount wrote state");
}
