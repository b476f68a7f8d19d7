//! One job started over D-Bus, exported at `…/Jobs/<n>`: its `State` (`running`, `succeeded`,
//! `failed`, `cancelled`), the step in `Progress`, a replication's stream in `Transfer`, the
//! report or error in `Result` (JSON), what kind of failure it was in `Failure`,
//! `Cancel()`, and a `Finished(success, result)` signal. Every property change is announced
//! with `PropertiesChanged`, so followers never poll. The job itself lives in
//! [`crate::daemon::jobs`]; this object only shows it.
//!
//! A job shows paths, snapshot and target names and error chains: only its starter (by uid) and
//! root read its properties, and its signals go to the starter's connection alone.

use super::VmsnapError;
use crate::daemon::jobs::{JobHandle, Jobs, Outcome};
use std::collections::HashMap;
use zbus::interface;
use zbus::message::Header;
use zbus::names::OwnedUniqueName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

/// How long a finished job object stays on the bus.
const JOB_LINGER: std::time::Duration = std::time::Duration::from_secs(600);

/// Who started a job: the caller's uid (from the bus daemon) and its connection.
#[derive(Debug, Clone)]
pub struct Starter {
    pub uid: u32,
    pub name: OwnedUniqueName,
}

impl Starter {
    /// The sender of the call that starts the job.
    pub async fn of(conn: &zbus::Connection, hdr: &Header<'_>) -> Result<Self, VmsnapError> {
        let uid = super::authz::caller_uid(conn, hdr).await?;
        let name = hdr.sender().ok_or_else(|| VmsnapError::NotAuthorized("the message has no sender".into()))?;
        Ok(Self { uid, name: name.to_owned().into() })
    }
}

/// The exported job object.
pub struct Job {
    handle: JobHandle,
    jobs: Jobs,
    starter: Starter,
    /// Readers' uids by unique bus name (the bus never reuses one), so a `GetAll` asks the bus
    /// daemon once, not once per property; bounded by [`READERS_KEPT`].
    readers: std::sync::Mutex<HashMap<OwnedUniqueName, u32>>,
}

/// How many readers' uids a job keeps before it forgets them all and asks again.
const READERS_KEPT: usize = 64;

impl Job {
    pub fn new(handle: JobHandle, jobs: Jobs, starter: Starter) -> Self {
        Self { handle, jobs, starter, readers: Default::default() }
    }

    /// The uid of `hdr`'s sender: the starter's own connection without asking, a reader seen
    /// before from memory, else the bus daemon.
    async fn reader_uid(&self, conn: &zbus::Connection, hdr: &Header<'_>) -> Result<u32, VmsnapError> {
        let sender: Option<OwnedUniqueName> = hdr.sender().map(|s| s.to_owned().into());
        if let Some(sender) = &sender {
            if *sender == self.starter.name {
                return Ok(self.starter.uid);
            }
            if let Some(uid) = self.readers.lock().expect("readers lock").get(sender) {
                return Ok(*uid);
            }
        }
        let uid = super::authz::caller_uid(conn, hdr).await?;
        if let Some(sender) = sender {
            let mut readers = self.readers.lock().expect("readers lock");
            if readers.len() >= READERS_KEPT {
                readers.clear();
            }
            readers.insert(sender, uid);
        }
        Ok(uid)
    }

    /// A property read by `hdr`'s sender: root's or the starter's. Without a header the daemon
    /// itself reads it for a `PropertiesChanged` sent to the starter alone.
    async fn readable(&self, conn: &zbus::Connection, hdr: Option<Header<'_>>) -> zbus::fdo::Result<()> {
        let Some(hdr) = hdr else { return Ok(()) };
        let uid = self.reader_uid(conn, &hdr).await.map_err(|e| zbus::fdo::Error::AccessDenied(e.to_string()))?;
        if uid == 0 || uid == self.starter.uid {
            Ok(())
        } else {
            Err(zbus::fdo::Error::AccessDenied(format!(
                "job {} is readable by root and by its starter (uid {}) only; the caller is uid {uid}",
                self.handle.id, self.starter.uid
            )))
        }
    }
}

#[interface(name = "io.github.vmsnap.Job1")]
impl Job {
    #[zbus(property)]
    async fn domain(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<String> {
        self.readable(conn, hdr).await?;
        Ok(self.handle.domain.clone())
    }

    #[zbus(property)]
    async fn state(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<String> {
        self.readable(conn, hdr).await?;
        Ok(self.handle.finished().map_or("running", |o| o.state()).to_owned())
    }

    #[zbus(property)]
    async fn progress(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<String> {
        self.readable(conn, hdr).await?;
        Ok(match self.handle.finished() {
            Some(_) => "done".to_owned(),
            None => self.handle.progress(),
        })
    }

    /// A replication job's stream in flight (or its last): `what` (s), `bytes` (t), `total` (t:
    /// the size as far as known, never below `bytes`, 0 unknown), `rate` (t: bytes/s), and
    /// `eta` (t: seconds left) once known. Empty for other jobs and before the first stream.
    #[zbus(property)]
    async fn transfer(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        self.readable(conn, hdr).await?;
        let mut m = HashMap::new();
        if let Some(t) = self.handle.transfer() {
            m.insert("what".to_owned(), OwnedValue::try_from(Value::from(t.what)).expect("a string has no fd"));
            m.insert("bytes".to_owned(), OwnedValue::from(t.bytes));
            m.insert("total".to_owned(), OwnedValue::from(t.total));
            m.insert("rate".to_owned(), OwnedValue::from(t.rate));
            if let Some(eta) = t.eta_seconds {
                m.insert("eta".to_owned(), OwnedValue::from(eta));
            }
        }
        Ok(m)
    }

    #[zbus(property)]
    async fn result(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<String> {
        self.readable(conn, hdr).await?;
        Ok(self.handle.finished().map(|o| o.result_text()).unwrap_or_default())
    }

    /// Why a failed job failed, for a client that acts on it: `diverged` (a replication target
    /// diverged from the source; nothing was sent or destroyed there), `target` (a replication
    /// target could not be reached or refused: ssh, its forced command), `untrusted` (what a
    /// target sent back for a restore was refused), `bug` (the job stopped on a bug in vmsnap;
    /// its journal was replayed) or `error` (anything else). Empty unless the job failed.
    #[zbus(property)]
    async fn failure(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<String> {
        self.readable(conn, hdr).await?;
        Ok(self.handle.finished().and_then(|o| o.failure()).map(|f| f.as_str().to_owned()).unwrap_or_default())
    }

    /// What the operator can do about a failure (the same hint `vmsnap` prints when it runs
    /// the job itself). Empty unless the job failed and there is an obvious next thing to try.
    #[zbus(property)]
    async fn hint(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<String> {
        self.readable(conn, hdr).await?;
        Ok(self.handle.finished().and_then(|o| o.hint().map(str::to_owned)).unwrap_or_default())
    }

    /// Stops the job at the step it is in and replays its domain's journal (thaw, resume,
    /// cancel the dump, merge overlays), as after a crash. Root only, like every mutating call.
    async fn cancel(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), VmsnapError> {
        super::authz::require_root(conn, &hdr, "Cancel").await?;
        if self.handle.finished().is_some() {
            return Err(VmsnapError::Failed("the job has already finished".into()));
        }
        self.jobs.cancel(self.handle.id).map_err(VmsnapError::Failed)
    }

    #[zbus(signal)]
    pub async fn finished(emitter: &SignalEmitter<'_>, success: bool, result: &str) -> zbus::Result<()>;
}

/// Announces the job's changes until it ends, then keeps the object readable for a while (the
/// daemon runs for months) and removes it.
pub async fn follow(conn: zbus::Connection, path: OwnedObjectPath, mut handle: JobHandle, starter: Starter) {
    let Ok(iface) = conn.object_server().interface::<_, Job>(&path).await else { return };
    let Ok(to_starter) = SignalEmitter::new(&conn, path.clone()) else { return };
    let to_starter = to_starter.set_destination(starter.name.into());
    let mut end = handle.clone();
    let mut moving = handle.clone();
    while handle.finished().is_none() {
        tokio::select! {
            changed = handle.progress_changed() => {
                if changed.is_none() {
                    break;
                }
                let _ = iface.get().await.progress_changed(&to_starter).await;
            }
            changed = moving.transfer_changed() => {
                if changed.is_none() {
                    break;
                }
                let _ = iface.get().await.transfer_changed(&to_starter).await;
            }
            _ = end.outcome() => break,
        }
    }
    let outcome = handle.outcome().await;
    {
        let job = iface.get().await;
        let emitter = &to_starter;
        let _ = job.state_changed(emitter).await;
        let _ = job.progress_changed(emitter).await;
        let _ = job.result_changed(emitter).await;
        let _ = job.failure_changed(emitter).await;
        let _ = job.hint_changed(emitter).await;
        let _ = job.transfer_changed(emitter).await;
        let _ = Job::finished(emitter, matches!(outcome, Outcome::Succeeded(_)), &outcome.result_text()).await;
    }
    tokio::time::sleep(JOB_LINGER).await;
    let _ = conn.object_server().remove::<Job, _>(&path).await;
}
