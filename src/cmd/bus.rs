//! Reaching a running daemon from the CLI: the system bus (or `VMSNAP_BUS_ADDRESS`), and only
//! when `io.github.vmsnap.Agent1` has an owner; otherwise the CLI works in-process. And
//! following one of its jobs to the end.

use anyhow::Result;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use vmsnap::daemon::dbus::client::Job1Proxy;
use vmsnap::daemon::dbus::BUS_NAME;
use vmsnap::replicate::Transfer;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

/// A connection to the bus where the daemon answers, if it does (within a second).
pub async fn daemon() -> Option<zbus::Connection> {
    let connect = async {
        let conn = match std::env::var("VMSNAP_BUS_ADDRESS") {
            Ok(a) => zbus::connection::Builder::address(a.as_str()).ok()?.build().await.ok()?,
            Err(_) => zbus::Connection::system().await.ok()?,
        };
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
        let name = zbus::names::BusName::try_from(BUS_NAME).ok()?;
        dbus.name_has_owner(name).await.ok()?.then_some(conn)
    };
    tokio::time::timeout(Duration::from_secs(1), connect).await.ok().flatten()
}

/// How a daemon job ended: its `State`, `Result`, `Failure` and `Hint`.
pub struct Ended {
    pub state: String,
    pub result: String,
    pub failure: String,
    pub hint: String,
}

impl Ended {
    /// A failed job's error as the job layer had it: its message and its hint (which `main`
    /// prints as it does for a job run in this process).
    pub fn error(&self) -> vmsnap::daemon::jobs::JobError {
        vmsnap::daemon::jobs::JobError { message: self.result.clone(), hint: Some(self.hint.clone()).filter(|h| !h.is_empty()) }
    }
}

/// Follows the job at `path` to its end: each step (`Progress`) goes to `on_step`, with the
/// stream in flight when the step is that stream's figures (a replication job says them in
/// words too); when `stop` fires, the job is asked to cancel (once) and followed on.
pub async fn follow(
    conn: &zbus::Connection,
    path: &OwnedObjectPath,
    mut on_step: impl FnMut(&str, Option<Transfer>),
    stop: Option<&tokio::sync::Notify>,
) -> Result<Ended> {
    // Uncached: State and Result are read fresh once the job says it has finished.
    let job = Job1Proxy::builder(conn).path(path.clone())?.cache_properties(CacheProperties::No).build().await?;
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(BUS_NAME)?
        .path(path.clone())?
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    // Subscribed before the first look, so no change between the two is missed; and the
    // daemon's name, so a daemon that dies (kill -9) does not leave this waiting for ever.
    let mut changes = props.receive_properties_changed().await?;
    let mut finished = job.receive_finished().await?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let mut owners = dbus.receive_name_owner_changed_with_args(&[(0, BUS_NAME)]).await?;
    let gone = |why: &str| {
        anyhow::anyhow!(
            "the daemon stopped while its job {} ran ({why}): what the job had begun is undone when the daemon starts again, or now by `vmsnap recover`",
            path.as_str()
        )
    };
    let lost = |e: zbus::Error| gone(&e.to_string());
    show(&job, &job.progress().await.map_err(lost)?, &mut on_step).await;
    let mut asked = false;
    if job.state().await.map_err(lost)? == "running" {
        loop {
            tokio::select! {
                Some(owner) = owners.next() => {
                    if owner.args().is_ok_and(|a| a.new_owner().is_none()) {
                        return Err(gone("it left the bus"));
                    }
                }
                Some(change) = changes.next() => {
                    let Ok(args) = change.args() else { continue };
                    let Some(v) = args.changed_properties().get("Progress") else { continue };
                    if let Ok(s) = String::try_from(v.try_clone()?) {
                        show(&job, &s, &mut on_step).await;
                    }
                }
                _ = finished.next() => break,
                () = async { stop.expect("guarded").notified().await }, if stop.is_some() && !asked => {
                    asked = true;
                    // Refused (it finished meanwhile, or a caller without the right): the job's
                    // own journal keeps whatever it must undo; this follows it to its end.
                    if let Err(e) = job.cancel().await {
                        on_step(&format!("the daemon did not cancel the job ({e}); following it to its end"), None);
                    }
                }
                else => break,
            }
        }
    }
    let read = async {
        // An older daemon has no `Hint`: none then.
        let hint = job.hint().await.unwrap_or_default();
        Ok::<_, zbus::Error>(Ended { state: job.state().await?, result: job.result().await?, failure: job.failure().await?, hint })
    };
    read.await.map_err(lost)
}

/// One step to `on_step`, with the stream in flight if the step is its figures (the job sets
/// its transfer before it says the figures).
async fn show(job: &Job1Proxy<'_>, s: &str, on_step: &mut impl FnMut(&str, Option<Transfer>)) {
    let t = transfer(job.transfer().await.unwrap_or_default()).filter(|t| s.ends_with(&t.to_string()));
    on_step(s, t);
}

/// A job's `Transfer` property as the library's [`Transfer`]; `None` when empty.
fn transfer(m: HashMap<String, OwnedValue>) -> Option<Transfer> {
    let what = String::try_from(m.get("what")?.try_clone().ok()?).ok()?;
    let n = |k: &str| m.get(k).and_then(|v| u64::try_from(v).ok());
    Some(Transfer { what, bytes: n("bytes")?, total: n("total").unwrap_or(0), rate: n("rate").unwrap_or(0), eta_seconds: n("eta") })
}
