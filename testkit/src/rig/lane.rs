//! Running a program inside the rig's OpenZFS VM (the ZFS lane).
//!
//! OpenZFS cannot load on this host's kernel. A ZFS-lane program (a test binary, the demo) calls
//! [`dispatch`]: on the host it builds the resume kit if needed, boots the OpenZFS VM, shares the
//! cargo target directory into it over 9p (so the program and the `vmsnap` binary are both
//! there), and reruns itself inside through the guest agent with `VMSNAP_INSIDE_ZFSVM=1`; its
//! output and exit status become the host's.

use super::resume_kit::ResumeKit;
use super::{Rig, ZfsVm};
use std::time::Duration;

pub const INSIDE: &str = "VMSNAP_INSIDE_ZFSVM";

/// True inside the OpenZFS VM.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Runs `inside` when already in the VM; else boots the VM, reruns this program there, and exits
/// with its status.
pub fn dispatch(inside_fn: fn()) {
    dispatch_with(inside_fn, false)
}

/// [`dispatch`] for the libvirt lane: also builds the libvirt kit (on the host, with the `vmsnap`
/// binary next to this program).
pub fn dispatch_libvirt(inside_fn: fn()) {
    dispatch_with(inside_fn, true)
}

fn dispatch_with(inside_fn: fn(), libvirt_kit: bool) {
    if inside() {
        share_mounts();
        cache_the_rig();
        install_vmsnap_locally();
        inside_fn();
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = rt.block_on(async {
        let rig = Rig::locate().expect("the test rig is required (scripts/rig/rig.sh)");
        // Nested guests start from a saved state: booting one under TCG inside TCG takes minutes.
        let kit = ResumeKit::ensure(&rig).await.expect("building the resume kit");
        eprintln!("resume kit: {}", kit.dir.display());
        let exe = std::env::current_exe().expect("own path");
        // target/debug/<deps|examples>/<program>: share target/debug, which holds the vmsnap binary.
        let sub = exe.parent().expect("a directory");
        let share = sub.parent().expect("the target directory");
        if libvirt_kit {
            let kit = super::libvirt::LibvirtKit::ensure(&rig, &share.join("vmsnap")).await.expect("building the libvirt kit");
            eprintln!("libvirt kit: {}", kit.dir.display());
            // The lane installs this build the way users install vmsnap: as its Debian package.
            let deb = package(&share.join("vmsnap"), &share.join("debian"));
            eprintln!("package: {}", deb.display());
        }
        let mut vm = ZfsVm::boot(&rig, share).await.expect("booting the OpenZFS VM");
        eprintln!("METRIC zfsvm_boot_to_agent_s={:.1}", vm.boot_time.as_secs_f64());
        let inner = format!("/mnt/share/{}/{}", name(sub), name(&exe));
        let mut argv = vec![inner.as_str()];
        argv.extend(args.iter().map(String::as_str));
        let mut env = vec![
            format!("{INSIDE}=1"),
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "RUST_BACKTRACE=1".into(),
            "VMSNAP_RIG=/mnt/rig".into(),
            "HOME=/root".into(),
        ];
        // A benchmark's knobs (`VMSNAP_BENCH_N` …) reach the program inside.
        env.extend(
            std::env::vars()
                .filter(|(k, _)| k.starts_with("VMSNAP_BENCH_") || k == "VMSNAP_MANY_SNAPSHOTS")
                .map(|(k, v)| format!("{k}={v}")),
        );
        let env: Vec<&str> = env.iter().map(String::as_str).collect();
        // A bound for a lane that hangs, well above the longest one (the engine lane takes
        // 20-23 min on a 2-core TCG host); benchmarks may ask for longer (`VMSNAP_LANE_TIMEOUT_S`).
        let limit = std::env::var("VMSNAP_LANE_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(2100);
        let out = vm.run(&argv, &env, Duration::from_secs(limit)).await.expect("running inside the VM");
        print!("{}", out.stdout_text());
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.success() {
            eprintln!(
                "inner run exited {:?} (signal {:?})\n---- OpenZFS VM console (last {CONSOLE_TAIL} lines) ----\n{}",
                out.exit_code,
                out.signal,
                last_lines(&vm.machine.console(), CONSOLE_TAIL)
            );
            // The harness's failure messages, again after the console: the end of a long log is
            // what a CI summary shows. libtest prints "failures:" twice: first with each test's
            // message, then the bare names; the messages are the news.
            let stdout = out.stdout_text();
            if let Some(at) = stdout.rfind("\nfailures:\n\n---- ").or_else(|| stdout.rfind("\nfailures:\n")) {
                eprintln!("---- the failures, once more ----{}", &stdout[at..]);
            }
        }
        out.exit_code.unwrap_or(1) as i32
    });
    std::process::exit(code);
}

/// `scripts/package-deb` of `binary` into `out`: the package's path.
fn package(binary: &std::path::Path, out: &std::path::Path) -> std::path::PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package-deb");
    let run = std::process::Command::new(&script)
        .env("VMSNAP_PACKAGE_BINARY", binary)
        .env("VMSNAP_PACKAGE_OUT", out)
        .output()
        .expect("running scripts/package-deb");
    assert!(run.status.success(), "scripts/package-deb: {}", String::from_utf8_lossy(&run.stderr));
    std::path::PathBuf::from(String::from_utf8_lossy(&run.stdout).trim())
}

/// How much of the OpenZFS VM's console a failed run prints (its boot is not the news).
const CONSOLE_TAIL: usize = 40;

fn last_lines(text: &str, n: usize) -> &str {
    let mut at = text.len();
    for _ in 0..=n {
        match text[..at].rfind('\n') {
            Some(i) => at = i,
            None => return text,
        }
    }
    &text[at + 1..]
}

fn name(p: &std::path::Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).expect("a UTF-8 file name")
}

/// The `vmsnap` binary under test as the VM shares it (built next to the program's directory).
const SHARED_BIN: &str = "/mnt/share/vmsnap";

/// Where a lane runs `vmsnap` from: a copy on the VM's own disk.
const LOCAL_BIN: &str = "/opt/vmsnap-lane/vmsnap";

/// Copies the shared `vmsnap` onto the VM's disk. Started from the 9p share, each run pages the
/// ~180 MiB debug binary in over 9p under TCG: 2.1 s for `vmsnap --version`, against 0.06 s from
/// the VM's disk, and a lane starts vmsnap hundreds of times (every CLI call, every `vmsnap serve`
/// behind ssh). The copy takes ~9 s once.
fn install_vmsnap_locally() {
    let local = std::path::Path::new(LOCAL_BIN);
    std::fs::create_dir_all(local.parent().expect("a directory")).expect("creating the lane's bin directory");
    std::fs::copy(SHARED_BIN, local).unwrap_or_else(|e| panic!("copying {SHARED_BIN} to {LOCAL_BIN}: {e}"));
}

/// Makes every mount shared, as systemd does on the hosts vmsnap runs on (the VM's init leaves
/// them private). The lanes' other hosts are `ip netns exec` processes with a mount namespace of
/// their own: with private mounts each keeps a copy of every file system mounted when it
/// started, and `zfs destroy` of one of them fails as busy long after the host unmounted it.
fn share_mounts() {
    let out = std::process::Command::new("mount").args(["--make-rshared", "/"]).output().expect("mount");
    assert!(out.status.success(), "mount --make-rshared /: {}", String::from_utf8_lossy(&out.stderr));
}

/// Remounts the read-only rig share with the page cache on: with 9p's default (no cache) every
/// nested guest start reads its 83 MiB saved state and 66 MiB kernel over 9p again (~6 s each
/// time under TCG); the host never changes the rig while a lane runs.
fn cache_the_rig() {
    let remount = "umount /mnt/rig && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=1048576 rig /mnt/rig";
    let out = std::process::Command::new("/bin/sh").arg("-c").arg(remount).output().expect("sh");
    assert!(out.status.success(), "remounting /mnt/rig with a page cache: {}", String::from_utf8_lossy(&out.stderr));
}

/// The `vmsnap` binary as the VM runs it (see [`install_vmsnap_locally`]).
pub fn vmsnap_bin() -> String {
    LOCAL_BIN.into()
}

/// Runs a bash script inside the VM; panics with its output unless it exits 0.
pub fn sh(script: &str) -> String {
    let out = std::process::Command::new("/bin/bash").arg("-c").arg(script).output().expect("bash");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{script}` failed: {text}");
    text
}
