//! The QMP client against real QEMU 10 running the tiny guest (host lane): the overlay round
//! trip with an fd-passed overlay and an active commit, and RAM state written through an fd.
//! Needs the rig (`scripts/rig/rig.sh`); without it these tests fail, they never skip.

use qapi::qmp;
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::{Duration, Instant};
use vmsnap::qemu::block::{file_node, qcow2_overlay_node};
use vmsnap::qemu::blockjob::BlockJob;
use vmsnap::qemu::qmp::QmpError;
use vmsnap_testkit::rig::{Rig, TinyVm, TinyVmOptions};

fn rig() -> Rig {
    Rig::locate().expect("the test rig is required")
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn overlay_round_trip_with_fd_passed_overlay_and_active_commit() {
    let rig = rig();
    let (mut vm, qmp, mut qga, _) = TinyVm::boot(&rig, &TinyVmOptions::default()).await.unwrap();
    assert_eq!(qmp.version().major, 10, "the rig runs QEMU 10: {}", qmp.version());
    let base = vm.disks[0].clone();
    let overlay = vm.machine.dir().join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", overlay.to_str().unwrap()]);

    // vmsnap opens the overlay; QEMU gets the descriptor through an fdset.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&overlay).unwrap();
    let entry = qmp.add_fd(None, "overlay disk0", file.as_fd()).await.unwrap();
    drop(file);
    let t = Instant::now();
    qmp.blockdev_add(file_node("ov0-file", &entry.path())).await.unwrap();
    qmp.blockdev_add(qcow2_overlay_node("ov0-fmt", "ov0-file")).await.unwrap();
    let add_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    qmp.snapshot_transaction(&[("disk0-fmt".into(), "ov0-fmt".into())]).await.unwrap();
    let switch_ms = t.elapsed().as_secs_f64() * 1e3;

    // The guest writes while the overlay is on top.
    let out = qga
        .sh("dd if=/dev/urandom of=/mnt/vda/during bs=1M count=4 2>/dev/null && sync && md5sum /mnt/vda/during", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    let md5 = out.stdout_text().split_whitespace().next().unwrap().to_owned();
    let overlay_len = std::fs::metadata(&overlay).unwrap().len();
    assert!(overlay_len > 4 << 20, "the guest's 4 MiB went to the overlay ({overlay_len} bytes)");

    let t = Instant::now();
    let job = BlockJob::start_active_commit(&qmp, "commit-ov0", "ov0-fmt", Some("disk0-fmt")).await.unwrap();
    job.wait_ready(Duration::from_secs(60)).await.unwrap();
    let ready_ms = t.elapsed().as_secs_f64() * 1e3;
    job.complete().await.unwrap();
    job.wait_concluded(Duration::from_secs(60)).await.unwrap();
    job.dismiss().await.unwrap();
    let commit_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(qmp.query_jobs().await.unwrap().is_empty(), "the job is dismissed");

    qmp.blockdev_del("ov0-fmt").await.unwrap();
    qmp.blockdev_del("ov0-file").await.unwrap();
    qmp.remove_fd(entry.fdset_id).await.unwrap();
    let nodes = qmp.node_names().await.unwrap();
    assert!(!nodes.iter().any(|n| n.starts_with("ov0")), "overlay nodes left: {nodes:?}");
    let blocks = qmp.execute(&qmp::query_block {}).await.unwrap();
    let inserted = blocks[0].inserted.as_ref().unwrap();
    assert_eq!(inserted.node_name.as_deref(), Some("disk0-fmt"), "the chain is back on the base node");
    assert_eq!(inserted.backing_file_depth, 0);
    eprintln!(
        "METRIC overlay_add_ms={add_ms:.1} overlay_switch_ms={switch_ms:.1} commit_ready_ms={ready_ms:.1} commit_total_ms={commit_ms:.1}"
    );

    // The data written during the overlay is in the base image: boot a fresh guest on it.
    qmp.execute(&qmp::quit {}).await.ok();
    drop(qga);
    vm.machine.kill();
    let opts = TinyVmOptions { disk_images: Some(vec![base]), ..Default::default() };
    let (_vm2, _qmp2, mut qga2, _) = TinyVm::boot(&rig, &opts).await.unwrap();
    let out = qga2.sh("md5sum /mnt/vda/during", Duration::from_secs(30)).await.unwrap();
    assert_eq!(out.stdout_text().split_whitespace().next(), Some(md5.as_str()));
}

#[tokio::test]
async fn blockdev_add_of_a_missing_file_is_a_typed_generic_error() {
    let (_vm, qmp, _qga, _) = TinyVm::boot(&rig(), &TinyVmOptions::default()).await.unwrap();
    let err = qmp.blockdev_add(file_node("nope-file", "/nonexistent/overlay.qcow2")).await.unwrap_err();
    match err {
        QmpError::Command { class, desc, .. } => {
            assert_eq!(class, vmsnap::qemu::ErrorClass::GenericError);
            assert!(desc.contains("/nonexistent/overlay.qcow2"), "{desc}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn ram_state_to_a_file_through_getfd_then_cont() {
    let (vm, qmp, mut qga, _) = TinyVm::boot(&rig(), &TinyVmOptions::default()).await.unwrap();
    let dump = vm.machine.dir().join("ram.bin");
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&dump).unwrap();
    qmp.execute(&qmp::migrate_set_capabilities {
        capabilities: vec![qmp::MigrationCapabilityStatus { capability: qmp::MigrationCapability::events, state: true }],
    })
    .await
    .unwrap();
    qmp.getfd("vmsnap-ram", file.as_fd()).await.unwrap();
    drop(file);

    let mut events = qmp.subscribe().unwrap();
    let t = Instant::now();
    qmp.execute(&qmp::migrate { uri: Some("fd:vmsnap-ram".into()), channels: None, detach: None, resume: None }).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let done = events
        .wait_for("migration to finish", deadline, |e| {
            e.name == "MIGRATION" && matches!(e.str("status"), Some("completed" | "failed" | "cancelled"))
        })
        .await
        .unwrap();
    let migrate_ms = t.elapsed().as_millis();
    assert_eq!(done.str("status"), Some("completed"));
    // The completed event can come a moment before the runstate change.
    vmsnap::engine::ram::wait_postmigrate(&qmp, Duration::from_secs(10)).await.unwrap();
    let t = Instant::now();
    qmp.execute(&qmp::cont {}).await.unwrap();
    let cont_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(qmp.execute(&qmp::query_status {}).await.unwrap().status, qmp::RunState::running);
    qga.ping().await.unwrap();

    let meta = std::fs::metadata(&dump).unwrap();
    assert!(meta.len() > 10 << 20, "RAM dump is {} bytes", meta.len());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    eprintln!("METRIC ram_dump_ms={migrate_ms} ram_dump_bytes={} cont_ms={cont_ms:.1}", meta.len());
}

/// What vmsnap records of a QEMU and what it checks before a resume, read from real QEMU: the
/// same QEMU loads its own dumps; one with another RAM size, an unknown machine type or an older
/// version is refused with the reason.
#[tokio::test]
async fn a_resume_is_checked_against_what_the_dump_needs() {
    use vmsnap::engine::resumable::{check, Recorded, Target};
    let rig = rig();
    let (_vm, qmp, _qga, _) = TinyVm::boot(&rig, &TinyVmOptions { memory_mib: 160, ..Default::default() }).await.unwrap();
    let target = Target::probe(&qmp).await.unwrap();
    let machine = vmsnap::engine::ram::machine_type(&qmp).await.unwrap();
    eprintln!(
        "METRIC resume target: QEMU {:?}, machine {machine}, cpu {:?}, {} machine types",
        target.qemu_version,
        target.cpu,
        target.machines.len()
    );
    assert_eq!(target.ram_bytes, Some(160 << 20));
    assert!(target.cpu.as_deref().is_some_and(|c| c.ends_with("-cpu")), "{:?}", target.cpu);
    assert!(target.machines.contains(&machine), "{machine} not in {:?}", target.machines);
    let recorded =
        Recorded { qemu_version: target.qemu_version, machine: machine.clone(), cpu: target.cpu.clone(), ram_bytes: target.ram_bytes };
    assert!(check(&recorded, &target).is_empty());
    let (a, b, c) = target.qemu_version;
    let why =
        check(&Recorded { qemu_version: (a, b, c + 1), machine: "pc-i440fx-99.0".into(), ram_bytes: Some(512 << 20), ..recorded }, &target);
    assert_eq!(why.len(), 3, "{why:?}");
}
