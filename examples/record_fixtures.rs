//! Re-records every transcript in `protocol-fixtures/` from real QEMU and qemu-ga on the rig.
//!
//! Run with `scripts/record-fixtures` (or `cargo run --example record_fixtures -- [OUT_DIR]`).
//! Each scenario drives vmsnap's own clients through a recording proxy; nothing is hand-written.

use serde_json::json;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmsnap::qemu::block::{file_node, qcow2_overlay_node};
use vmsnap::qemu::blockjob::{BlockJob, JobError};
use vmsnap::qemu::qga::{Qga, QgaError, Timeouts};
use vmsnap::qemu::qmp::{Qmp, QmpError};
use vmsnap_testkit::fixtures::record::Recorder;
use vmsnap_testkit::fixtures::transcript::Header;
use vmsnap_testkit::rig::{Rig, TinyVm, TinyVmOptions};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

struct Session {
    out: PathBuf,
    recorded_with: String,
}

impl Session {
    fn save(&self, rec: Recorder, protocol: &str, scenario: &str, about: &str) -> Res {
        let t = rec.finish(Header {
            protocol: protocol.into(),
            scenario: scenario.into(),
            recorded_with: self.recorded_with.clone(),
            about: about.into(),
        });
        let path = self.out.join(protocol).join(format!("{scenario}.jsonl"));
        t.save(&path)?;
        println!("recorded {} ({} lines)", path.display(), t.entries.len());
        Ok(())
    }
}

fn qemu_img_overlay(base: &Path, overlay: &Path) -> Res {
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", "qcow2"])
        .arg(overlay)
        .status()?;
    if !st.success() {
        return Err("qemu-img create failed".into());
    }
    Ok(())
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Adds an fd-passed overlay on top of disk0 and has the guest write 4 MiB into it.
async fn overlay_with_data(vm: &TinyVm, qmp: &Qmp, qga: &mut Qga, middle: Option<serde_json::Value>) -> Res {
    let overlay = vm.machine.dir().join("ov.qcow2");
    qemu_img_overlay(&vm.disks[0], &overlay)?;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&overlay)?;
    let entry = qmp.add_fd(None, "overlay disk0", file.as_fd()).await?;
    qmp.blockdev_add(file_node("ov-file", &entry.path())).await?;
    let file_ref = match middle {
        Some(filter) => {
            qmp.execute_raw("blockdev-add", Some(filter), Duration::from_secs(10)).await?;
            "ov-filter"
        }
        None => "ov-file",
    };
    qmp.blockdev_add(qcow2_overlay_node("ov-fmt", file_ref)).await?;
    qmp.snapshot_transaction(&[("disk0-fmt".into(), "ov-fmt".into())]).await?;
    let out = qga.sh("dd if=/dev/urandom of=/mnt/vda/data bs=1M count=4 2>/dev/null && sync", Duration::from_secs(60)).await?;
    if !out.success() {
        return Err(format!("guest write failed: {out:?}").into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Res {
    let out = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("protocol-fixtures"));
    let rig = Rig::locate()?;

    // ---- VM 1: agent scenarios, a refused blockdev-add, a full commit with its events.
    let (mut vm, qmp, qga, _) = TinyVm::boot(&rig, &TinyVmOptions::default()).await?;
    let mut direct_qga = qga;
    let agent = direct_qga.info().await?.version;
    let s = Session { out: out.clone(), recorded_with: format!("QEMU {}, qemu-ga {agent}, TCG", qmp.version()) };
    drop(direct_qga);
    let dir = vm.machine.dir().to_owned();
    settle().await;

    let rec = Recorder::start(&vm.machine.qga_path, &dir.join("rec-qga.sock"))?;
    {
        let mut qga = Qga::connect(rec.path(), Timeouts::default()).await?;
        qmp.execute(&qapi::qmp::stop {}).await?; // the agent cannot answer while the VM is paused
        let late = qga.execute_raw("guest-ping", json!({}), Duration::from_millis(500)).await;
        assert!(matches!(late, Err(QgaError::Timeout { .. })), "{late:?}");
        qmp.execute(&qapi::qmp::cont {}).await?;
        qga.freeze_status().await?;
    }
    settle().await;
    s.save(rec, "qga", "late-reply", "guest-ping times out while the VM is paused; after cont its reply arrives ahead of the resync")?;

    let rec = Recorder::start(&vm.machine.qga_path, &dir.join("rec-qga.sock"))?;
    {
        let mut qga = Qga::connect(rec.path(), Timeouts::default()).await?;
        qga.freeze_status().await?;
        qga.freeze().await?;
        let again = qga.freeze().await;
        assert!(matches!(again, Err(QgaError::AlreadyFrozen { .. })), "{again:?}");
        qga.freeze_status().await?;
        qga.thaw().await?;
        qga.thaw().await?;
    }
    settle().await;
    s.save(rec, "qga", "freeze-while-frozen", "freeze, a second freeze refused in frozen state, thaw, thaw again (0)")?;

    drop(qmp);
    settle().await;
    let rec = Recorder::start(&vm.machine.qmp_path, &dir.join("rec-qmp.sock"))?;
    {
        let qmp = Qmp::connect(rec.path(), Duration::from_secs(10)).await?;
        let err = qmp.blockdev_add(file_node("missing-file", "/nonexistent/overlay.qcow2")).await;
        assert!(matches!(err, Err(QmpError::Command { .. })), "{err:?}");
    }
    settle().await;
    s.save(rec, "qmp", "blockdev-add-error", "blockdev-add of a file that does not exist: GenericError")?;

    let rec = Recorder::start(&vm.machine.qmp_path, &dir.join("rec-qmp.sock"))?;
    {
        let qmp = Qmp::connect(rec.path(), Duration::from_secs(10)).await?;
        let mut qga = vm.machine.wait_agent(Duration::from_secs(10)).await?;
        overlay_with_data(&vm, &qmp, &mut qga, None).await?;
        let job = BlockJob::start_active_commit(&qmp, "commit-ov", "ov-fmt", Some("disk0-fmt")).await?;
        job.wait_ready(Duration::from_secs(60)).await?;
        job.complete().await?;
        job.wait_concluded(Duration::from_secs(60)).await?;
        job.dismiss().await?;
        qmp.blockdev_del("ov-fmt").await?;
        qmp.blockdev_del("ov-file").await?;
    }
    settle().await;
    s.save(
        rec,
        "qmp",
        "commit-round-trip",
        "fd-passed overlay, transaction, active commit: job events arrive before the block-commit reply",
    )?;

    // The agent killed inside the guest: the socket still accepts, nothing answers.
    {
        let mut qga = vm.machine.wait_agent(Duration::from_secs(10)).await?;
        // Fire and forget: the agent dies before it could report the command's end.
        let _ = qga.exec_start("/bin/sh", &["-c", "sleep 0.2; kill $(pidof qemu-ga)"], &[]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    settle().await;
    let rec = Recorder::start(&vm.machine.qga_path, &dir.join("rec-qga.sock"))?;
    {
        let err = Qga::connect(rec.path(), Timeouts { sync: Duration::from_secs(2), ..Timeouts::default() }).await;
        assert!(matches!(err, Err(QgaError::AgentNotRunning { .. })), "{err:?}");
    }
    settle().await;
    s.save(rec, "qga", "agent-absent", "qemu-ga is not running: the sync is never answered")?;
    vm.machine.kill();

    // ---- VM 2: a commit that hits a read error (blkdebug under the overlay).
    let (vm, qmp, mut qga, _) = TinyVm::boot(&rig, &TinyVmOptions::default()).await?;
    let dir = vm.machine.dir().to_owned();
    drop(qmp);
    settle().await;
    let rec = Recorder::start(&vm.machine.qmp_path, &dir.join("rec-qmp.sock"))?;
    {
        let qmp = Qmp::connect(rec.path(), Duration::from_secs(10)).await?;
        // Reads of the overlay's data area (from 2 MiB on) fail with EIO; its metadata reads work.
        let filter = json!({"driver": "blkdebug", "node-name": "ov-filter", "image": "ov-file",
            "inject-error": [{"event": "read_aio", "errno": 5, "sector": 4096, "once": false}]});
        overlay_with_data(&vm, &qmp, &mut qga, Some(filter)).await?;
        let job = BlockJob::start_active_commit(&qmp, "commit-ov", "ov-fmt", Some("disk0-fmt")).await?;
        let err = job.wait_ready(Duration::from_secs(60)).await;
        assert!(matches!(err, Err(JobError::Io { .. })), "{err:?}");
        let concluded = job.wait_concluded(Duration::from_secs(60)).await;
        assert!(matches!(concluded, Err(JobError::Failed { .. })), "{concluded:?}");
        job.dismiss().await?;
    }
    settle().await;
    s.save(
        rec,
        "qmp",
        "block-job-error",
        "active commit reads an EIO from the overlay: BLOCK_JOB_ERROR, then the job concludes with an error",
    )?;
    drop(vm);

    // ---- VM 3: QEMU killed while a slow commit runs.
    let (mut vm, qmp, mut qga, _) = TinyVm::boot(&rig, &TinyVmOptions::default()).await?;
    let dir = vm.machine.dir().to_owned();
    drop(qmp);
    settle().await;
    let rec = Recorder::start(&vm.machine.qmp_path, &dir.join("rec-qmp.sock"))?;
    {
        let qmp = Qmp::connect(rec.path(), Duration::from_secs(10)).await?;
        overlay_with_data(&vm, &qmp, &mut qga, None).await?;
        qmp.execute_raw(
            "block-commit",
            Some(json!({"job-id": "commit-ov", "device": "ov-fmt", "auto-dismiss": false, "speed": 65536})),
            Duration::from_secs(10),
        )
        .await?;
        let job = BlockJob::attach(&qmp, "commit-ov");
        let killer = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            vm.machine.kill();
        };
        let (res, ()) = tokio::join!(job.wait_ready(Duration::from_secs(60)), killer);
        assert!(matches!(res, Err(JobError::Qmp(QmpError::Disconnected { .. }))), "{res:?}");
    }
    settle().await;
    s.save(rec, "qmp", "qemu-exits-mid-job", "QEMU is killed while a rate-limited active commit runs: the socket closes")?;
    Ok(())
}
