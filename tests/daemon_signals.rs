//! The daemon's life cycle without any domain (no ZFS needed): it refuses to start on a bad
//! config, naming the file, line and key; a SIGHUP with a broken config keeps the old one
//! running; a good reload is taken; SIGTERM stops it with exit 0.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmsnap")
}

#[test]
fn refuses_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vmsnap.toml");
    std::fs::write(&cfg, "[domain.web]\nqmp = \"/run/web.qmp\"\n\ndaily_hour = 24\n").unwrap();
    let out = Command::new(bin()).arg("--config").arg(&cfg).args(["daemon", "--bus", "none"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to start") && err.contains("line 4") && err.contains("daily_hour"), "{err}");
}

fn wait_log(log: &std::path::Path, what: &str) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no {what:?} in the daemon's log:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn reload_keeps_the_old_config_on_error_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vmsnap.toml");
    let state = dir.path().join("state");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .args(["daemon", "--bus", "none"])
        .env("VMSNAP_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    wait_log(&log, "vmsnap daemon starting");
    std::fs::write(&cfg, "max_parallel = 0\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let text = wait_log(&log, "reload refused");
    assert!(text.contains("max_parallel"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "the daemon must keep running on a bad reload");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\nmax_parallel = 3\n", state.display())).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_log(&log, "configuration reloaded");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    wait_log(&log, "vmsnap daemon stopped");
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.is_empty(), "the daemon logs to stderr only: {stdout}");
}
