//! Boots the rig's OpenZFS VM and runs a bash script in it, printing the output: a developer's
//! window into the ZFS lane. `cargo run --example zfsvm_run -- 'zfs version; ls /mnt/rig'`.
//! The cargo target directory is shared on `/mnt/share`, the rig on `/mnt/rig`.

use std::time::Duration;
use vmsnap_testkit::rig::{Rig, ZfsVm};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let script = std::env::args().nth(1).ok_or("usage: zfsvm_run SCRIPT")?;
    let rig = Rig::locate()?;
    let share = std::env::current_exe()?.parent().and_then(|p| p.parent()).ok_or("no target dir")?.to_owned();
    let mut vm = ZfsVm::boot(&rig, &share).await?;
    eprintln!("OpenZFS VM up in {:.1} s", vm.boot_time.as_secs_f64());
    let out = vm
        .run(&["/bin/bash", "-c", &format!("{{ {script}\n}} 2>&1")], &["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], Duration::from_secs(1800))
        .await?;
    print!("{}", out.stdout_text());
    std::process::exit(out.exit_code.unwrap_or(1) as i32);
}
