//! One snapshot job started over D-Bus, exported at `…/Jobs/<n>`: its `State`
//! (`running`, `succeeded`, `failed`, `cancelled`), the step in `Progress`, the report or error
//! in `Result` (JSON), `Cancel()`, and a `Finished(success, result)` signal.

use super::VmsnapError;
use std::sync::{Arc, Mutex};
use zbus::interface;
use zbus::object_server::SignalEmitter;

/// What the job has come to; shared with the task that runs it.
#[derive(Debug, Clone, Default)]
pub struct JobState {
    pub state: String,
    pub progress: String,
    pub result: String,
}

/// The exported job object.
pub struct Job {
    pub domain: String,
    pub shared: Arc<Mutex<JobState>>,
    /// Aborts the running snapshot; set by the service once the task exists.
    pub cancel: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

#[interface(name = "io.github.vmsnap.Job1")]
impl Job {
    #[zbus(property)]
    fn domain(&self) -> String {
        self.domain.clone()
    }

    #[zbus(property)]
    fn state(&self) -> String {
        self.shared.lock().expect("job state").state.clone()
    }

    #[zbus(property)]
    fn progress(&self) -> String {
        self.shared.lock().expect("job state").progress.clone()
    }

    #[zbus(property)]
    fn result(&self) -> String {
        self.shared.lock().expect("job state").result.clone()
    }

    /// Stops the snapshot: the task is dropped and the domain's journal is replayed (thaw,
    /// resume, merge overlays), as after a crash. Only the job's starter or root may do it —
    /// root only, like every mutating call.
    async fn cancel(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), VmsnapError> {
        super::service::require_root(conn, &hdr, "Cancel").await?;
        match self.cancel.lock().expect("cancel").take() {
            Some(tx) => {
                let _ = tx.send(());
                Ok(())
            }
            None => Err(VmsnapError::Failed("the job has already finished".into())),
        }
    }

    #[zbus(signal)]
    pub async fn finished(emitter: &SignalEmitter<'_>, success: bool, result: &str) -> zbus::Result<()>;
}
