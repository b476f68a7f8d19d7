//! The guest-agent client against the real qemu-ga in the tiny guest (host lane).
//! Needs the rig (`scripts/rig/rig.sh`); without it these tests fail, they never skip.

use std::time::{Duration, Instant};
use vmsnap::qemu::qga::{FreezeStatus, QgaError};
use vmsnap_testkit::rig::{Rig, TinyVm, TinyVmOptions};

fn rig() -> Rig {
    Rig::locate().expect("the test rig is required")
}

#[tokio::test]
async fn freeze_blocks_guest_writes_until_thaw() {
    let (vm, _qmp, mut qga, boot) = TinyVm::boot(&rig(), &TinyVmOptions::default()).await.unwrap();
    eprintln!("METRIC boot_to_agent_ms={}", boot.as_millis());

    let info = qga.info().await.unwrap();
    for needed in ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-exec", "guest-sync-delimited"] {
        assert!(info.enabled.iter().any(|c| c == needed), "{needed} not enabled in qemu-ga {}", info.version);
    }
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Thawed);

    // A writer started before the freeze: it records the guest's uptime, sleeps past the freeze,
    // writes to the ext4 disk, then records the uptime again (in /run, a tmpfs that never freezes).
    let writer = qga
        .exec_start("/bin/sh", &["-c", "cut -d' ' -f1 /proc/uptime > /run/t0; sleep 0.5; echo payload > /mnt/vda/during-freeze; cut -d' ' -f1 /proc/uptime > /run/t1"], &[])
        .await
        .unwrap();

    let t = Instant::now();
    let frozen = qga.freeze().await.unwrap();
    let freeze_ms = t.elapsed().as_millis();
    assert_eq!(frozen, 1, "exactly the data disk is frozen");
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Frozen);
    // While frozen the agent refuses a second freeze with its own error...
    assert!(matches!(qga.freeze().await, Err(QgaError::AlreadyFrozen { .. })));
    // ...and refuses guest-exec too, so the writer cannot even be polled.
    assert!(matches!(qga.exec_status(writer).await, Err(QgaError::AlreadyFrozen { .. })));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t = Instant::now();
    assert_eq!(qga.thaw().await.unwrap(), 1);
    let thaw_ms = t.elapsed().as_millis();
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Thawed);
    assert_eq!(qga.thaw().await.unwrap(), 0, "thawing a thawed guest is a harmless no-op");
    eprintln!("METRIC freeze_ms={freeze_ms} thaw_ms={thaw_ms}");

    let done = qga.exec_wait(writer, "writer", tokio::time::Instant::now() + Duration::from_secs(20)).await.unwrap();
    assert!(done.success(), "writer failed: {done:?}");
    let out = qga.sh("cat /run/t0 /run/t1 /mnt/vda/during-freeze", Duration::from_secs(10)).await.unwrap();
    let text = out.stdout_text();
    let mut lines = text.lines();
    let t0: f64 = lines.next().unwrap().parse().unwrap();
    let t1: f64 = lines.next().unwrap().parse().unwrap();
    assert_eq!(lines.next(), Some("payload"));
    // The write waited for the thaw: it took most of the 2 s the guest stayed frozen.
    assert!(t1 - t0 >= 1.5, "the write did not block while frozen: took {:.2} s", t1 - t0);
    drop(vm);
}

#[tokio::test]
async fn reconnect_after_timeout_skips_the_stale_reply() {
    let (vm, qmp, mut qga, _) = TinyVm::boot(&rig(), &TinyVmOptions::default()).await.unwrap();
    // Pause the VM so the agent cannot answer; the ping times out and its reply stays queued.
    qmp.execute(&qapi::qmp::stop {}).await.unwrap();
    let err = qga.execute_raw("guest-ping", serde_json::json!({}), Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(err, QgaError::Timeout { .. }), "{err}");
    qmp.execute(&qapi::qmp::cont {}).await.unwrap();
    // The next call resyncs first, so the late `{"return": {}}` of the ping is not taken as the
    // answer to guest-fsfreeze-status (which would fail to parse as "thawed"/"frozen").
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Thawed);
    drop(vm);
}

#[tokio::test]
async fn agent_not_running_is_its_own_error() {
    let (vm, _qmp, mut qga, _) = TinyVm::boot(&rig(), &TinyVmOptions::default()).await.unwrap();
    // Kill qemu-ga inside the guest; the chardev socket still accepts connections.
    // Fire and forget: the agent dies before it could report the command's end.
    let _ = qga.exec_start("/bin/sh", &["-c", "sleep 0.2; kill $(pidof qemu-ga)"], &[]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(qga);
    let timeouts = vmsnap::qemu::qga::Timeouts { sync: Duration::from_secs(1), ..Default::default() };
    let err = vmsnap::qemu::qga::Qga::connect(&vm.machine.qga_path, timeouts).await.unwrap_err();
    assert!(matches!(err, QgaError::AgentNotRunning { .. }), "{err}");
}
