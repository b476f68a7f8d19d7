//! Driving QEMU block jobs (the active `block-commit` that merges an overlay back) to their end.
//!
//! Jobs are started with `auto-dismiss: false`, so a finished or failed job stays visible in
//! `query-jobs` until vmsnap dismisses it: a job outlives the QMP connection that started it, and a
//! vmsnap that crashed mid-commit can [`BlockJob::attach`] to it again and learn how it ended.
//!
//! Waiting always subscribes to events first, then reads the job's current status with
//! `query-jobs`, so a state reached before the wait started is not missed.

use super::qmp::{Event, Qmp, QmpError};
use qapi::qmp::{self, JobInfo, JobStatus};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("block job {id} failed: {reason}")]
    Failed { id: String, reason: String },
    #[error("block job {id} hit an I/O error ({operation}, action {action})")]
    Io { id: String, operation: String, action: String },
    #[error("block job {id} does not exist in QEMU")]
    NotFound { id: String },
}

impl Qmp {
    /// `query-jobs`.
    ///
    /// # Errors
    /// As [`Qmp::execute`].
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>, QmpError> {
        self.execute(&qmp::query_jobs {}).await
    }
}

/// A block job in QEMU, known by its id.
#[derive(Debug, Clone)]
pub struct BlockJob {
    qmp: Qmp,
    id: String,
}

/// Where a job stands, as `query-jobs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProgress {
    pub status: String,
    pub current: i64,
    pub total: i64,
}

impl BlockJob {
    /// Starts an active commit of `top_node` (an overlay on top of a running disk) into
    /// `base_node`, or into the bottom of the chain when `None` (only right for a one-image disk).
    /// The job becomes ready once the overlay's data is in the base; the guest keeps writing
    /// through it until [`BlockJob::complete`] pivots back to the base.
    ///
    /// # Errors
    /// [`JobError::Qmp`] when QEMU refuses to start it (unknown node, a node that has no backing).
    pub async fn start_active_commit(qmp: &Qmp, job_id: &str, top_node: &str, base_node: Option<&str>) -> Result<Self, JobError> {
        let cmd = qmp::block_commit {
            job_id: Some(job_id.to_owned()),
            device: top_node.to_owned(),
            base_node: base_node.map(str::to_owned),
            auto_dismiss: Some(false),
            auto_finalize: Some(true),
            ..empty_block_commit()
        };
        qmp.execute(&cmd).await?;
        Ok(Self { qmp: qmp.clone(), id: job_id.to_owned() })
    }

    /// A handle on a job that already exists (started by an earlier connection or process).
    pub fn attach(qmp: &Qmp, job_id: &str) -> Self {
        Self { qmp: qmp.clone(), id: job_id.to_owned() }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's entry in `query-jobs`, or `None` when QEMU has no such job.
    pub async fn info(&self) -> Result<Option<JobInfo>, QmpError> {
        Ok(self.qmp.query_jobs().await?.into_iter().find(|j| j.id == self.id))
    }

    /// Current status and progress.
    pub async fn progress(&self) -> Result<JobProgress, JobError> {
        let info = self.info().await?.ok_or_else(|| JobError::NotFound { id: self.id.clone() })?;
        Ok(JobProgress { status: status_name(info.status).to_owned(), current: info.current_progress, total: info.total_progress })
    }

    /// Waits until the job is ready to complete (an active commit has copied everything).
    ///
    /// # Errors
    /// [`JobError::Io`] on `BLOCK_JOB_ERROR`, [`JobError::Failed`] when the job concluded instead,
    /// [`JobError::NotFound`], or a QMP error (timeout, disconnect).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), JobError> {
        self.wait_status(JobStatus::ready, timeout).await
    }

    /// `job-complete`: pivots an active commit back to the base node.
    pub async fn complete(&self) -> Result<(), JobError> {
        self.qmp.execute(&qmp::job_complete { id: self.id.clone() }).await?;
        Ok(())
    }

    /// `job-cancel`: abandons the job (for a commit before `job-complete`, the overlay stays on top).
    pub async fn cancel(&self) -> Result<(), JobError> {
        self.qmp.execute(&qmp::job_cancel { id: self.id.clone() }).await?;
        Ok(())
    }

    /// Waits until the job has concluded, successfully.
    ///
    /// # Errors
    /// [`JobError::Failed`] with QEMU's reason when it concluded with an error.
    pub async fn wait_concluded(&self, timeout: Duration) -> Result<(), JobError> {
        self.wait_status(JobStatus::concluded, timeout).await
    }

    /// `job-dismiss`: removes a concluded job from `query-jobs`.
    pub async fn dismiss(&self) -> Result<(), JobError> {
        self.qmp.execute(&qmp::job_dismiss { id: self.id.clone() }).await?;
        Ok(())
    }

    /// Drives a job from wherever it stands to the end: wait ready → complete → wait concluded →
    /// dismiss. Works on a job found again after a reconnect, in any state.
    pub async fn finish(&self, timeout: Duration) -> Result<(), JobError> {
        let deadline = Instant::now() + timeout;
        let info = self.info().await?.ok_or_else(|| JobError::NotFound { id: self.id.clone() })?;
        if !matches!(info.status, JobStatus::waiting | JobStatus::pending | JobStatus::concluded | JobStatus::null) {
            self.wait_ready(left(deadline)).await?;
            self.complete().await?;
        }
        let outcome = self.wait_concluded(left(deadline)).await;
        if !matches!(outcome, Err(JobError::Qmp(_))) {
            self.dismiss().await?;
        }
        outcome
    }

    async fn wait_status(&self, want: JobStatus, timeout: Duration) -> Result<(), JobError> {
        let deadline = Instant::now() + timeout;
        let mut events = self.qmp.subscribe()?;
        let info = self.info().await?.ok_or_else(|| JobError::NotFound { id: self.id.clone() })?;
        let mut status = info.status;
        let mut error = info.error;
        loop {
            if status == want && (want != JobStatus::concluded || error.is_none()) {
                return Ok(());
            }
            if matches!(status, JobStatus::concluded | JobStatus::null | JobStatus::aborting) {
                // A job that ends without reaching `want` failed or was cancelled; ask why.
                let reason = match error {
                    Some(e) => e,
                    None => self.info().await?.and_then(|i| i.error).unwrap_or_else(|| format!("ended in state {}", status_name(status))),
                };
                return Err(JobError::Failed { id: self.id.clone(), reason });
            }
            let what = format!("block job {} to become {}", self.id, status_name(want));
            let id = self.id.clone();
            let event = events.wait_for(&what, deadline, |e| concerns(e, &id)).await?;
            match event.name.as_str() {
                "JOB_STATUS_CHANGE" => {
                    if let Some(s) = event.str("status").and_then(|s| s.parse().ok()) {
                        status = s;
                    }
                }
                "BLOCK_JOB_ERROR" => {
                    return Err(JobError::Io {
                        id: self.id.clone(),
                        operation: event.str("operation").unwrap_or("?").to_owned(),
                        action: event.str("action").unwrap_or("?").to_owned(),
                    })
                }
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                    if let Some(e) = event.str("error") {
                        error = Some(e.to_owned());
                    }
                }
                _ => {}
            }
        }
    }
}

fn concerns(event: &Event, id: &str) -> bool {
    match event.name.as_str() {
        "JOB_STATUS_CHANGE" => event.str("id") == Some(id),
        "BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_READY" => event.str("device") == Some(id),
        _ => false,
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

pub fn status_name(s: JobStatus) -> &'static str {
    qapi::Enum::name(&s)
}

#[allow(deprecated)]
fn empty_block_commit() -> qmp::block_commit {
    qmp::block_commit {
        auto_dismiss: None,
        auto_finalize: None,
        backing_file: None,
        backing_mask_protocol: None,
        base: None,
        base_node: None,
        filter_node_name: None,
        job_id: None,
        on_error: None,
        speed: None,
        top: None,
        top_node: None,
        device: String::new(),
    }
}
