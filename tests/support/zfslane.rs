//! Running a test binary inside the rig's OpenZFS VM (the ZFS lane).
//!
//! OpenZFS cannot load on this host's kernel. A ZFS-lane test binary calls [`dispatch`]: on the
//! host it boots the OpenZFS VM, shares the cargo target directory into it over 9p (so the test
//! binary and the `vmsnap` binary are both there), and reruns itself inside through the guest
//! agent with `VMSNAP_INSIDE_ZFSVM=1`; its output and exit status become the host's. Without the
//! rig it fails; it never skips.

use std::time::Duration;
use vmsnap::rig::{Rig, ZfsVm};

pub const INSIDE: &str = "VMSNAP_INSIDE_ZFSVM";

/// Runs `inside` when already in the VM, else boots the VM and reruns this binary there.
pub fn dispatch(inside: fn()) {
    if std::env::var_os(INSIDE).is_some() {
        inside();
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        let rig = Rig::locate().expect("the test rig is required (scripts/rig/rig.sh)");
        let exe = std::env::current_exe().unwrap();
        // target/debug/deps/<test> : share target/debug, which also holds the vmsnap binary.
        let deps = exe.parent().unwrap();
        let share = deps.parent().unwrap();
        let mut vm = ZfsVm::boot(&rig, share).await.expect("booting the OpenZFS VM");
        eprintln!("METRIC zfsvm_boot_to_agent_s={:.1}", vm.boot_time.as_secs_f64());
        let inner = format!("/mnt/share/{}/{}", deps.file_name().unwrap().to_str().unwrap(), exe.file_name().unwrap().to_str().unwrap());
        let mut argv = vec![inner.as_str()];
        argv.extend(args.iter().map(String::as_str));
        let env = [
            format!("{INSIDE}=1"),
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "RUST_BACKTRACE=1".into(),
            "VMSNAP_RIG=/mnt/rig".into(),
            "HOME=/root".into(),
        ];
        let env: Vec<&str> = env.iter().map(String::as_str).collect();
        let out = vm.run(&argv, &env, Duration::from_secs(1500)).await.expect("running the tests inside the VM");
        print!("{}", out.stdout_text());
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.success() {
            eprintln!(
                "inner run exited {:?} (signal {:?})\n---- OpenZFS VM console ----\n{}",
                out.exit_code,
                out.signal,
                vm.machine.console()
            );
        }
        out.exit_code.unwrap_or(1) as i32
    });
    std::process::exit(code);
}

/// The `vmsnap` binary as the VM sees it.
pub fn vmsnap_bin() -> String {
    let host = std::path::Path::new(env!("CARGO_BIN_EXE_vmsnap"));
    format!("/mnt/share/{}", host.file_name().unwrap().to_str().unwrap())
}

/// Runs a bash script inside the VM; panics with its output unless it exits 0.
pub fn sh(script: &str) -> String {
    let out = std::process::Command::new("/bin/bash").arg("-c").arg(script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{script}` failed: {text}");
    text
}
