//! vmsnap's QMP and guest-agent clients against recorded sessions (`protocol-fixtures/`), for the
//! paths that are hard to provoke live. Each test drives the client the way the recording did and
//! then checks the replay server saw exactly the recorded commands.

use serde_json::json;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmsnap::qemu::block::{file_node, qcow2_overlay_node};
use vmsnap::qemu::blockjob::{BlockJob, JobError};
use vmsnap::qemu::qga::{FreezeStatus, Qga, QgaError, Timeouts};
use vmsnap::qemu::qmp::{Qmp, QmpError};
use vmsnap::qemu::ErrorClass;
use vmsnap_testkit::fixtures::replay::ReplayServer;
use vmsnap_testkit::fixtures::transcript::Transcript;

struct Replay {
    server: Option<ReplayServer>,
    _dir: tempfile::TempDir,
}

impl Replay {
    fn start(fixture: &str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol-fixtures").join(fixture);
        let transcript = Transcript::load(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = ReplayServer::start(transcript, &dir.path().join("replay.sock")).unwrap();
        Self { server: Some(server), _dir: dir }
    }

    fn path(&self) -> PathBuf {
        self.server.as_ref().unwrap().path().to_owned()
    }

    async fn finish(mut self) {
        self.server.take().unwrap().finish().await.expect("the client followed the recording");
    }
}

#[tokio::test]
async fn qga_late_reply_is_skipped_by_the_resync() {
    let replay = Replay::start("qga/late-reply.jsonl");
    let mut qga = Qga::connect(&replay.path(), Timeouts::default()).await.unwrap();
    let err = qga.execute_raw("guest-ping", json!({}), Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(err, QgaError::Timeout { .. }), "{err}");
    // The ping's late `{"return": {}}` arrives now; without the resync it would be read as the
    // status and fail to parse.
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Thawed);
    drop(qga);
    replay.finish().await;
}

#[tokio::test]
async fn qga_absent_agent_is_agent_not_running() {
    let replay = Replay::start("qga/agent-absent.jsonl");
    let err = Qga::connect(&replay.path(), Timeouts { sync: Duration::from_secs(1), ..Timeouts::default() }).await.unwrap_err();
    assert!(matches!(err, QgaError::AgentNotRunning { .. }), "{err}");
    assert!(err.to_string().contains("qemu-ga is not running"), "{err}");
    replay.finish().await;
}

#[tokio::test]
async fn qga_freeze_while_frozen_is_already_frozen() {
    let replay = Replay::start("qga/freeze-while-frozen.jsonl");
    let mut qga = Qga::connect(&replay.path(), Timeouts::default()).await.unwrap();
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Thawed);
    assert_eq!(qga.freeze().await.unwrap(), 1);
    assert!(matches!(qga.freeze().await, Err(QgaError::AlreadyFrozen { .. })));
    assert_eq!(qga.freeze_status().await.unwrap(), FreezeStatus::Frozen);
    assert_eq!(qga.thaw().await.unwrap(), 1);
    assert_eq!(qga.thaw().await.unwrap(), 0);
    drop(qga);
    replay.finish().await;
}

#[tokio::test]
async fn qmp_generic_error_on_blockdev_add() {
    let replay = Replay::start("qmp/blockdev-add-error.jsonl");
    let qmp = Qmp::connect(&replay.path(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(qmp.version().major, 10);
    let err = qmp.blockdev_add(file_node("missing-file", "/nonexistent/overlay.qcow2")).await.unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::GenericError), "{err}");
    assert!(err.to_string().contains("blockdev-add"), "{err}");
    drop(qmp);
    replay.finish().await;
}

/// The QMP side of the recorder's overlay set-up (the guest's writes went over the agent).
async fn add_overlay(qmp: &Qmp, filter: Option<serde_json::Value>) {
    let devnull = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
    let entry = qmp.add_fd(None, "overlay disk0", devnull.as_fd()).await.unwrap();
    qmp.blockdev_add(file_node("ov-file", &entry.path())).await.unwrap();
    let file_ref = match filter {
        Some(f) => {
            qmp.execute_raw("blockdev-add", Some(f), Duration::from_secs(5)).await.unwrap();
            "ov-filter"
        }
        None => "ov-file",
    };
    qmp.blockdev_add(qcow2_overlay_node("ov-fmt", file_ref)).await.unwrap();
    qmp.snapshot_transaction(&[("disk0-fmt".into(), "ov-fmt".into())]).await.unwrap();
}

#[tokio::test]
async fn qmp_events_between_a_command_and_its_reply_reach_subscribers() {
    let replay = Replay::start("qmp/commit-round-trip.jsonl");
    let qmp = Qmp::connect(&replay.path(), Duration::from_secs(5)).await.unwrap();
    add_overlay(&qmp, None).await;
    let mut events = qmp.subscribe().unwrap();
    let job = BlockJob::start_active_commit(&qmp, "commit-ov", "ov-fmt", Some("disk0-fmt")).await.unwrap();
    // JOB_STATUS_CHANGE created/running came before block-commit's {"return": {}}: both are
    // already queued for this subscriber when the command returns.
    let soon = tokio::time::Instant::now() + Duration::from_millis(50);
    let created = events.wait_for("created", soon, |e| e.name == "JOB_STATUS_CHANGE").await.unwrap();
    assert_eq!(created.str("status"), Some("created"));
    assert_eq!(created.str("id"), Some("commit-ov"));
    job.wait_ready(Duration::from_secs(10)).await.unwrap();
    job.complete().await.unwrap();
    job.wait_concluded(Duration::from_secs(10)).await.unwrap();
    job.dismiss().await.unwrap();
    qmp.blockdev_del("ov-fmt").await.unwrap();
    qmp.blockdev_del("ov-file").await.unwrap();
    drop((qmp, events, job));
    replay.finish().await;
}

#[tokio::test]
async fn qmp_block_job_error_is_typed() {
    let replay = Replay::start("qmp/block-job-error.jsonl");
    let qmp = Qmp::connect(&replay.path(), Duration::from_secs(5)).await.unwrap();
    let filter = json!({"driver": "blkdebug", "node-name": "ov-filter", "image": "ov-file",
        "inject-error": [{"event": "read_aio", "errno": 5, "sector": 4096, "once": false}]});
    add_overlay(&qmp, Some(filter)).await;
    let job = BlockJob::start_active_commit(&qmp, "commit-ov", "ov-fmt", Some("disk0-fmt")).await.unwrap();
    match job.wait_ready(Duration::from_secs(10)).await {
        Err(JobError::Io { id, operation, action }) => {
            assert_eq!((id.as_str(), operation.as_str(), action.as_str()), ("commit-ov", "read", "report"));
        }
        other => panic!("{other:?}"),
    }
    match job.wait_concluded(Duration::from_secs(10)).await {
        Err(JobError::Failed { reason, .. }) => assert_eq!(reason, "Input/output error"),
        other => panic!("{other:?}"),
    }
    job.dismiss().await.unwrap();
    drop((qmp, job));
    replay.finish().await;
}

#[tokio::test]
async fn qmp_socket_closing_mid_job_is_disconnected() {
    let replay = Replay::start("qmp/qemu-exits-mid-job.jsonl");
    let qmp = Qmp::connect(&replay.path(), Duration::from_secs(5)).await.unwrap();
    add_overlay(&qmp, None).await;
    qmp.execute_raw(
        "block-commit",
        Some(json!({"job-id": "commit-ov", "device": "ov-fmt", "auto-dismiss": false, "speed": 65536})),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let job = BlockJob::attach(&qmp, "commit-ov");
    let err = job.wait_ready(Duration::from_secs(10)).await.unwrap_err();
    assert!(matches!(err, JobError::Qmp(QmpError::Disconnected { .. })), "{err}");
    assert!(qmp.is_closed());
    let after = qmp.execute(&qapi::qmp::query_status {}).await.unwrap_err();
    assert!(matches!(after, QmpError::Disconnected { .. }), "{after}");
    replay.finish().await;
}
