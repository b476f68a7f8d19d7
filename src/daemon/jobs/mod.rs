//! The job layer: the one way any entrance (the scheduler, D-Bus, the CLI's local mode) makes
//! vmsnap act on a domain.
//!
//! [`Jobs::start`] takes a domain, a [`Request`] and who asks ([`Origin`]) and returns a
//! [`JobHandle`]. This module alone owns what every job must get right, whoever started it:
//! one job per domain at a time (and a cross-process check of the domain's lock), at most
//! `max_parallel` jobs working at once, the pre/post snapshot scripts, the engine call, pruning
//! after a scheduled snapshot, `status.json`, the metrics file, the events that become D-Bus
//! signals ([`Jobs::subscribe`]), and cancellation: [`Jobs::cancel`] stops the job at the step it
//! is in and replays *that domain's* journal (thaw, resume, cancel the dump, merge overlays), as
//! after a crash (a replication stops between two pieces, resumable). [`Jobs::shutdown`] refuses
//! new jobs, then cancels or awaits every running one. What each kind of job does is in
//! [`work`].

use crate::config::{Config, DomainConfig};
use crate::daemon::metrics::Metrics;
use crate::engine::lock::DomainLock;
use crate::engine::{self, SnapshotOptions, SnapshotReport};
use crate::replicate::{self, ReplicationReport, Transfer};
use crate::retention::prune::{self, PruneReport};
use crate::zfs::Zfs;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{broadcast, watch, Semaphore};

/// What a job is asked to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// A snapshot now; one serving retention periods (`opts.periods`, the scheduler's) is followed
    /// by pruning when the policy has `autoprune`.
    Snapshot(SnapshotOptions),
    /// Retention carried out now (or only planned, with `dry_run`).
    Prune { dry_run: bool },
    /// The domain's snapshots to each of its `replicate_to` targets (or to `targets` only).
    /// Runs in its own lane: a domain's snapshots and other domains' jobs go on meanwhile.
    Replicate { targets: Vec<String>, opts: replicate::Options },
    /// A restore of a stopped domain (in place, or beside it as a new one), from a target first
    /// when asked. Not cancellable once started: it is journaled and `vmsnap recover` finishes it.
    Restore(RestoreRequest),
    /// Every RAM dump of the domain read against its sha256 (`vmsnap verify`).
    Verify,
    /// A scratch copy of a snapshot (the newest when `None`) started until its agent answers,
    /// then removed (`vmsnap verify --boot`).
    VerifyBoot { snapshot: Option<String> },
    /// A snapshot's file systems mounted read-only at `/mnt/vmsnap/<domain>/<snapshot>`.
    Mount { snapshot: String },
    /// What [`Request::Mount`] set up, undone.
    Umount { snapshot: String },
}

/// What a restore job is asked (the CLI's `vmsnap restore` options).
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub snapshot: String,
    pub destroy_newer: bool,
    /// With `from`: use the target's copy even without this host's integrity record.
    pub trust_target: bool,
    pub resume: bool,
    /// A new libvirt domain of this name beside the original (`--as`).
    pub as_name: Option<String>,
    pub promote: bool,
    /// The replication target to bring the snapshot back from first (`--from`).
    pub from: Option<String>,
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Self::Snapshot(_) => "snapshot",
            Self::Prune { .. } => "prune",
            Self::Replicate { .. } => "replicate",
            Self::Restore(_) => "restore",
            Self::Verify => "verify",
            Self::VerifyBoot { .. } => "verify-boot",
            Self::Mount { .. } => "mount",
            Self::Umount { .. } => "umount",
        }
    }

    /// Cancelling stops it part-way (the others, once started, end by themselves).
    fn cancellable(&self) -> bool {
        matches!(self, Self::Snapshot(_) | Self::Prune { .. } | Self::Replicate { .. })
    }

    fn lane(&self) -> Lane {
        match self {
            Self::Replicate { .. } => Lane::Replication,
            // It reads a snapshot and makes a copy beside the domain: its snapshots go on.
            Self::Verify | Self::VerifyBoot { .. } => Lane::Reading,
            _ => Lane::Local,
        }
    }
}

/// A domain has one job at a time in each lane: snapshots, pruning, restores and mounts change
/// its datasets here; replication only reads them (under holds) and may take hours, and a
/// verification reads every RAM dump, so neither holds them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    Local,
    Replication,
    Reading,
}

/// Who started a job (logged, and kept on the job for whoever lists it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Schedule,
    DBus,
    Cli,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::DBus => "dbus",
            Self::Cli => "cli",
        }
    }
}

/// What a job produced.
#[derive(Debug, Clone)]
pub enum Output {
    Snapshot(Box<SnapshotReport>),
    Prune(Box<PruneReport>),
    /// One report per target.
    Replicate(Vec<ReplicationReport>),
    /// A restore's, verify's or mount's report.
    Report(serde_json::Value),
}

impl Output {
    /// The report as JSON (the D-Bus job's `Result`).
    pub fn to_json(&self) -> String {
        match self {
            Self::Snapshot(r) => serde_json::to_string(r),
            Self::Prune(r) => serde_json::to_string(r),
            Self::Replicate(r) => serde_json::to_string(r),
            Self::Report(r) => serde_json::to_string(r),
        }
        .expect("reports serialise")
    }
}

/// Why a job failed: the error with its causes, once ([`crate::error::chain`]), and what the
/// operator can do about it ([`crate::error::hint_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub message: String,
    pub hint: Option<String>,
}

impl JobError {
    /// From a typed error: its chain and its hint.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        JobError { message: crate::error::chain(e), hint: crate::error::hint_of(e) }
    }
}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        JobError { message, hint: None }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded(Output),
    /// The error and what kind of failure it was.
    Failed(JobError, Failure),
    /// Cancelled; what the undo did (or why it is incomplete).
    Cancelled(String),
}

impl Outcome {
    pub fn state(&self) -> &'static str {
        match self {
            Self::Succeeded(_) => "succeeded",
            Self::Failed(..) => "failed",
            Self::Cancelled(_) => "cancelled",
        }
    }

    /// The report as JSON on success, else the message.
    pub fn result_text(&self) -> String {
        match self {
            Self::Succeeded(o) => o.to_json(),
            Self::Failed(e, _) => e.message.clone(),
            Self::Cancelled(m) => m.clone(),
        }
    }

    /// What the operator can do about a failure, when there is an obvious next thing.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Self::Failed(e, _) => e.hint.as_deref(),
            _ => None,
        }
    }

    /// What kind of failure it was, if it failed.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            Self::Failed(_, f) => Some(*f),
            _ => None,
        }
    }
}

/// What kind of failure ended a job, for a client that acts on it (the CLI's exit status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A replication target diverged from the source: nothing was sent or destroyed there.
    Diverged,
    /// A replication target could not be reached or refused the run (ssh, its forced command,
    /// its `vmsnap serve`).
    Target,
    /// What a target sent back for a restore was not what this host recorded (or there was no
    /// record and the restore did not say `trust_target`): it was removed again.
    Untrusted,
    /// The job panicked (a bug in vmsnap): its journal was replayed as after a kill.
    Bug,
    /// Anything else.
    Error,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Diverged => "diverged",
            Self::Target => "target",
            Self::Untrusted => "untrusted",
            Self::Bug => "bug",
            Self::Error => "error",
        }
    }
}

/// What happens to jobs, for whoever listens (the D-Bus service turns these into signals).
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// A step starts.
    Progress {
        id: u64,
        domain: String,
        step: String,
    },
    /// A snapshot was taken (by any job, whoever started it).
    SnapshotTaken {
        id: u64,
        domain: String,
        snapshot: String,
        consistency: String,
    },
    Finished {
        id: u64,
        domain: String,
        state: &'static str,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{domain}: job {id} ({kind}) is still running for it; one job per domain at a time")]
    Busy { domain: String, id: u64, kind: &'static str },
    #[error("{0}")]
    Locked(String),
    #[error("vmsnap is shutting down and starts no new job")]
    ShuttingDown,
    #[error("{0}")]
    Refused(String),
}

/// A started job: its id, and its outcome once it is over.
#[derive(Debug, Clone)]
pub struct JobHandle {
    pub id: u64,
    pub domain: String,
    done: watch::Receiver<Option<Outcome>>,
    progress: watch::Receiver<String>,
    transfer: watch::Receiver<Option<Transfer>>,
}

impl JobHandle {
    /// Waits for the job to end.
    pub async fn outcome(&mut self) -> Outcome {
        match self.done.wait_for(Option::is_some).await {
            Ok(o) => o.clone().expect("waited for Some"),
            Err(_) => Outcome::Failed("the job's task ended without an outcome".to_owned().into(), Failure::Error),
        }
    }

    /// The step it is at now.
    pub fn progress(&self) -> String {
        self.progress.borrow().clone()
    }

    /// Resolves when the step changes (or the job is gone).
    pub async fn progress_changed(&mut self) -> Option<String> {
        self.progress.changed().await.ok().map(|()| self.progress.borrow_and_update().clone())
    }

    /// The stream a replication job is sending (or sent last).
    pub fn transfer(&self) -> Option<Transfer> {
        self.transfer.borrow().clone()
    }

    /// Resolves when the transfer figures change (or the job is gone).
    pub async fn transfer_changed(&mut self) -> Option<()> {
        self.transfer.changed().await.ok()
    }

    /// Its outcome, if it is over.
    pub fn finished(&self) -> Option<Outcome> {
        self.done.borrow().clone()
    }
}

struct Running {
    kind: &'static str,
    cancellable: bool,
    cancel: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    cfg: RwLock<Arc<Config>>,
    zfs: Arc<Zfs>,
    /// At most `max_parallel` jobs work at once in each lane (replaced on a reload that
    /// changes it): local, replication.
    slots: RwLock<(usize, Arc<Semaphore>, Arc<Semaphore>)>,
    running: Mutex<HashMap<(String, Lane), (u64, Running)>>,
    record: Mutex<Records>,
    events: broadcast::Sender<JobEvent>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// False while the daemon's start-up recovery runs ([`Jobs::hold_until_recovered`]): it
    /// holds domain locks, and a job started meanwhile waits for it instead of failing busy.
    ready: watch::Sender<bool>,
}

/// The daemon's counters, and whether this process writes the metrics file (only the daemon
/// does: the counters live in its memory).
struct Records {
    metrics: Metrics,
    write_metrics: bool,
}

/// The job layer; cheap to clone.
#[derive(Clone)]
pub struct Jobs(Arc<Inner>);

impl Jobs {
    /// `write_metrics`: keep counters and write `metrics_file` (the daemon); the CLI's local
    /// mode leaves the file to the daemon.
    pub fn new(cfg: Arc<Config>, zfs: Arc<Zfs>, write_metrics: bool) -> Self {
        let n = cfg.max_parallel.max(1);
        Self(Arc::new(Inner {
            cfg: RwLock::new(cfg),
            zfs,
            slots: RwLock::new((n, Arc::new(Semaphore::new(n)), Arc::new(Semaphore::new(n)))),
            running: Mutex::new(HashMap::new()),
            record: Mutex::new(Records { metrics: Metrics::default(), write_metrics }),
            ready: watch::channel(true).0,
            events: broadcast::channel(1024).0,
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        }))
    }

    pub fn config(&self) -> Arc<Config> {
        self.0.cfg.read().expect("config lock").clone()
    }

    pub fn zfs(&self) -> Arc<Zfs> {
        self.0.zfs.clone()
    }

    /// A reloaded config: new jobs use it; a new `max_parallel` applies to jobs not yet working.
    pub fn set_config(&self, cfg: Arc<Config>) {
        let n = cfg.max_parallel.max(1);
        let mut slots = self.0.slots.write().expect("slots lock");
        if slots.0 != n {
            *slots = (n, Arc::new(Semaphore::new(n)), Arc::new(Semaphore::new(n)));
        }
        *self.0.cfg.write().expect("config lock") = cfg;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.0.events.subscribe()
    }

    /// Jobs started from now on wait until [`Jobs::recovered`] before they do anything (the
    /// daemon's start-up recovery holds domain locks while it settles what a crash left).
    pub fn hold_until_recovered(&self) {
        self.0.ready.send_replace(false);
    }

    /// The start-up recovery is over: waiting jobs go on.
    pub fn recovered(&self) {
        self.0.ready.send_replace(true);
    }

    /// Is a snapshot or prune job of `domain` running (its id)?
    pub fn running_for(&self, domain: &str) -> Option<u64> {
        self.0.running.lock().expect("jobs lock").get(&(domain.to_owned(), Lane::Local)).map(|(id, _)| *id)
    }

    /// Is a replication job of `domain` running (its id)?
    pub fn replicating(&self, domain: &str) -> Option<u64> {
        self.0.running.lock().expect("jobs lock").get(&(domain.to_owned(), Lane::Replication)).map(|(id, _)| *id)
    }

    /// Starts `request` on `dom`. Refused when the domain already has a job (here, or in another
    /// vmsnap process holding its lock) or when shutting down.
    pub fn start(&self, dom: DomainConfig, request: Request, origin: Origin) -> Result<JobHandle, StartError> {
        if self.0.closed.load(Ordering::SeqCst) {
            return Err(StartError::ShuttingDown);
        }
        let cfg = self.config();
        let lane = request.lane();
        let key = (dom.name.clone(), lane);
        let mut running = self.0.running.lock().expect("jobs lock");
        if let Some((id, r)) = running.get(&key) {
            return Err(StartError::Busy { domain: dom.name.clone(), id: *id, kind: r.kind });
        }
        // Another process (a `vmsnap snapshot --local`, a `vmsnap prune`, a `vmsnap replicate`,
        // a restore) may hold the domain; during the start-up recovery this daemon does, and
        // the job waits for it instead ([`Self::run`]).
        let recovering = !*self.0.ready.borrow();
        match &request {
            Request::Prune { dry_run: true }
            | Request::Verify
            | Request::VerifyBoot { .. }
            | Request::Mount { .. }
            | Request::Umount { .. } => {}
            Request::Replicate { targets, opts } => {
                if dom.policy.replicate_to.is_empty() {
                    return Err(StartError::Refused(format!("{}: nothing to replicate to (no replicate_to)", dom.name)));
                }
                if let Some(t) = targets.iter().find(|t| !dom.policy.replicate_to.contains(t)) {
                    return Err(StartError::Refused(format!(
                        "{}: {t:?} is not one of its targets (replicate_to: {})",
                        dom.name,
                        dom.policy.replicate_to.join(", ")
                    )));
                }
                if !opts.dry_run && !recovering {
                    drop(DomainLock::replication(&cfg.state_dir, &dom.name).map_err(|e| StartError::Locked(e.to_string()))?);
                }
            }
            _ if recovering => {}
            _ => drop(DomainLock::acquire(&cfg.state_dir, &dom.name).map_err(|e| StartError::Locked(e.to_string()))?),
        }
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let (cancel, cancelled) = watch::channel(false);
        let (done_tx, done) = watch::channel(None);
        let (progress_tx, progress) = watch::channel("waiting to start".to_owned());
        let (transfer_tx, transfer) = watch::channel(None);
        let kind = request.kind();
        let cancellable = request.cancellable();
        tracing::info!(job = id, domain = %dom.name, origin = origin.as_str(), kind, "job started");
        let this = self.clone();
        let domain = dom.name.clone();
        let task = tokio::spawn(async move {
            // The work runs in a task of its own, so that a panic in it (a bug) ends this job as
            // failed and frees the domain, instead of leaving it busy until a restart.
            let is_snapshot = matches!(request, Request::Snapshot(_));
            let work = {
                let (this, cfg, dom) = (this.clone(), cfg.clone(), dom.clone());
                tokio::spawn(async move { this.run(id, &cfg, &dom, request, cancelled, progress_tx, transfer_tx).await })
            };
            let outcome = match work.await {
                Ok(outcome) => outcome,
                Err(e) => this.after_panic(&cfg, &dom, e, is_snapshot).await,
            };
            let state = outcome.state();
            match &outcome {
                Outcome::Failed(e, _) => tracing::error!(job = id, domain = %dom.name, kind, "job failed: {e}"),
                Outcome::Cancelled(m) => tracing::warn!(job = id, domain = %dom.name, kind, "job cancelled: {m}"),
                Outcome::Succeeded(_) => tracing::info!(job = id, domain = %dom.name, kind, "job succeeded"),
            }
            this.0.running.lock().expect("jobs lock").remove(&(dom.name.clone(), lane));
            let _ = done_tx.send(Some(outcome));
            let _ = this.0.events.send(JobEvent::Finished { id, domain: dom.name.clone(), state });
        });
        running.insert(key, (id, Running { kind, cancellable, cancel, task: Some(task) }));
        Ok(JobHandle { id, domain, done, progress, transfer })
    }

    /// Cancels job `id`; why not, when it cannot be.
    pub fn cancel(&self, id: u64) -> Result<(), String> {
        let running = self.0.running.lock().expect("jobs lock");
        match running.values().find(|(i, _)| *i == id) {
            Some((_, r)) if !r.cancellable => {
                Err(format!("a {} job is not cancelled part-way: it is journaled and ends by itself (`vmsnap recover` finishes one a crash interrupted)", r.kind))
            }
            Some((_, r)) if r.cancel.send(true).is_ok() => Ok(()),
            _ => Err("the job has already finished".into()),
        }
    }

    /// Refuses new jobs, then cancels (`cancel`) or awaits every running job; replications are
    /// always stopped (resumable). Returns when each has ended, its guest thawed and resumed.
    pub async fn shutdown(&self, cancel: bool) {
        self.0.closed.store(true, Ordering::SeqCst);
        let tasks: Vec<_> = {
            let mut running = self.0.running.lock().expect("jobs lock");
            running
                .iter_mut()
                .filter_map(|((_, lane), (_, r))| {
                    // A replication may have hours to go: it stops between two pieces and the
                    // next run resumes it.
                    if (cancel && r.cancellable) || *lane == Lane::Replication {
                        let _ = r.cancel.send(true);
                    }
                    r.task.take()
                })
                .collect()
        };
        tracing::info!(jobs = tasks.len(), cancel, "waiting for running jobs");
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Replays `dom`'s journal (only its own: other domains may be mid-snapshot), as after a
    /// crash; what it did, in words.
    async fn replay_journal(&self, cfg: &Config, dom: &DomainConfig) -> String {
        match engine::recover::recover_domain(cfg, &dom.name, &self.0.zfs).await {
            Ok(Some(r)) => format!("the journal was replayed: {}", r.actions.join("; ")),
            Ok(None) => "nothing had been changed".to_owned(),
            Err(e) => format!("recovery incomplete, run `vmsnap recover`: {}", crate::error::chain(&e)),
        }
    }

    /// A job whose work panicked (or was aborted): its domain's journal is replayed as after a
    /// kill (the guest thawed and resumed, the overlays merged), and it ends as failed.
    async fn after_panic(&self, cfg: &Config, dom: &DomainConfig, e: tokio::task::JoinError, is_snapshot: bool) -> Outcome {
        let what = match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into()),
            Err(e) => e.to_string(),
        };
        tracing::error!(domain = %dom.name, "the job panicked: {what}; replaying its journal");
        let msg = format!("the job stopped on a bug in vmsnap ({what}); {}", self.replay_journal(cfg, dom).await);
        if is_snapshot {
            self.record(cfg, dom, &Err(msg.clone().into()), 0);
        }
        Outcome::Failed(msg.into(), Failure::Bug)
    }

    /// The job itself: waits for a slot, then does the work unless cancelled first.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        id: u64,
        cfg: &Config,
        dom: &DomainConfig,
        request: Request,
        mut cancelled: watch::Receiver<bool>,
        progress: watch::Sender<String>,
        transfer: watch::Sender<Option<Transfer>>,
    ) -> Outcome {
        let step: crate::restore::Progress = {
            let (progress, events, domain) = (progress.clone(), self.0.events.clone(), dom.name.clone());
            Arc::new(move |s: &str| {
                progress.send_replace(s.to_owned());
                let _ = events.send(JobEvent::Progress { id, domain: domain.clone(), step: s.to_owned() });
            })
        };
        let lane = request.lane();
        let slots = {
            let s = self.0.slots.read().expect("slots lock");
            match lane {
                Lane::Local => s.1.clone(),
                // The background lanes share theirs.
                Lane::Replication | Lane::Reading => s.2.clone(),
            }
        };
        // Replication stops between two pieces of a stream when this is set (nothing to undo:
        // the target keeps a resumable receive).
        let stop_sending = Arc::new(AtomicBool::new(false));
        // Set when a replication target diverged, or failed as a target, or a restore refused
        // what a target sent back (the failure's kind).
        let (diverged, target_failed, untrusted) = (AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false));
        let mut ready = self.0.ready.subscribe();
        let work = async {
            if !*ready.borrow() {
                step("waiting for the daemon's start-up recovery");
                let _ = ready.wait_for(|r| *r).await;
            }
            if slots.available_permits() == 0 {
                step("waiting for a free slot (max_parallel)");
            }
            let _slot = slots.acquire_owned().await.map_err(|_| JobError::from("the job slots are gone".to_owned()))?;
            match &request {
                Request::Snapshot(opts) => self.snapshot(id, cfg, dom, opts, &*step).await.map(|r| Output::Snapshot(Box::new(r))),
                Request::Prune { dry_run } => {
                    step(if *dry_run { "planning retention" } else { "pruning" });
                    let now = chrono::Utc::now().timestamp();
                    prune::prune(cfg, dom, &self.0.zfs, now, *dry_run)
                        .await
                        .map(|r| Output::Prune(Box::new(r)))
                        .map_err(|e| JobError::of(&e))
                }
                Request::Replicate { targets, opts } => {
                    let opts = replicate::Options { cancel: Some(stop_sending.clone()), ..opts.clone() };
                    let watcher = work::Watcher::new(&*step, &transfer, &diverged, &target_failed);
                    self.replicate(cfg, dom, targets, opts, &watcher).await.map(Output::Replicate)
                }
                Request::Restore(r) => self.restore(cfg, dom, r, step.clone(), &untrusted).await.map(Output::Report),
                Request::Verify => {
                    step("verifying every RAM dump");
                    let zfs = &*self.0.zfs;
                    let v = crate::restore::verify::verify(zfs, Some(&dom.name), |s| step(s)).await.map_err(|e| JobError::of(&e))?;
                    Ok(Output::Report(serde_json::to_value(v).expect("serialises")))
                }
                Request::VerifyBoot { snapshot } => {
                    step("starting a scratch copy");
                    let zfs = &*self.0.zfs;
                    let wait = crate::restore::boot::AGENT_WAIT;
                    let v = crate::restore::boot::boot(cfg, zfs, &dom.name, snapshot.as_deref(), wait, step.clone())
                        .await
                        .map_err(|e| JobError::of(&e))?;
                    Ok(Output::Report(serde_json::to_value(v).expect("serialises")))
                }
                Request::Mount { snapshot } => {
                    step("mounting");
                    let at = std::path::Path::new("/mnt/vmsnap").join(&dom.name).join(snapshot);
                    let st =
                        crate::restore::mount::mount(cfg, &self.0.zfs, &dom.name, snapshot, &at).await.map_err(|e| JobError::of(&e))?;
                    Ok(Output::Report(serde_json::to_value(st).expect("serialises")))
                }
                Request::Umount { snapshot } => {
                    step("unmounting");
                    let st = crate::restore::mount::umount(cfg, &self.0.zfs, &dom.name, snapshot).await.map_err(|e| JobError::of(&e))?;
                    Ok(Output::Report(serde_json::to_value(st).expect("serialises")))
                }
            }
        };
        let mut work = Box::pin(work);
        let stop = async move {
            let _ = cancelled.wait_for(|c| *c).await;
        };
        tokio::select! {
            r = &mut work => {
                return match r {
                    Ok(out) => Outcome::Succeeded(out),
                    Err(e) => {
                        let kind = if diverged.load(Ordering::Relaxed) {
                            Failure::Diverged
                        } else if target_failed.load(Ordering::Relaxed) {
                            Failure::Target
                        } else if untrusted.load(Ordering::Relaxed) {
                            Failure::Untrusted
                        } else {
                            Failure::Error
                        };
                        Outcome::Failed(e, kind)
                    }
                }
            }
            () = stop => {}
        }
        if lane == Lane::Replication {
            // It stops by itself at the next piece; nothing to undo.
            step("cancelling: stopping the stream in flight");
            stop_sending.store(true, Ordering::Relaxed);
            let _ = work.await;
            return Outcome::Cancelled("cancelled; the target keeps what it received and the next run resumes from there".into());
        }
        // The work's future goes mid-step — with it the locks it holds — and this domain's
        // journal (only its own: other domains may be mid-snapshot) is replayed, as after a crash.
        drop(work);
        step("cancelled: undoing");
        let msg = format!("cancelled; {}", self.replay_journal(cfg, dom).await);
        if matches!(request, Request::Snapshot(_)) {
            self.record(cfg, dom, &Err(msg.clone().into()), 0);
        }
        Outcome::Cancelled(msg)
    }
}

mod work;

/// `a: b: c` from an error and its sources ([`crate::error::chain`]).
pub use crate::error::chain as error_chain;
