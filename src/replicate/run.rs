//! Replicating one domain to one target, top to bottom:
//! 1. for each of the domain's datasets: list the target, [`plan`], send (resuming an interrupted
//!    receive first, aborting and replanning once when its token is of no use), until the
//!    target has the domain's newest snapshot; move the source's cursor bookmark;
//! 2. for each snapshot the target now has: its RAM dump (resumable, checked by sha256 on the
//!    target), then every `vmsnap:*` property set there and read back, with
//!    `vmsnap:replica=complete` last;
//! 3. the target applies its own retention to the domain ([`Request::Prune`]).
//!
//! A diverged dataset stops the domain, unless `--rollback-target` asks the target (which must
//! allow it) to go back to the snapshot in common; then the plan is made again, once.

use super::plan::{plan, Base, Cursor, Plan, SourceSnap, Step};
use super::progress::Transfer;
use super::protocol::{Listing, PruneOutcome, RamState, Reply, Request, RollbackOutcome};
use super::transport::{Payload, Transport};
use crate::config::SealRam;
use crate::config::{DomainConfig, TargetConfig};
use crate::model::prop;
use crate::ramcrypt::RamKey;
use crate::zfs::{Dataset, PropName, Zfs, ZfsError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set on a target snapshot once it, its properties and its RAM dump (if any) are all there.
pub const REPLICA: PropName = prop::REPLICA;

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("{dataset} on target {target} has diverged: {why}; nothing was sent or destroyed")]
    Diverged { target: String, dataset: String, why: String },
    #[error("target {target}: {why}")]
    Target { target: String, why: String },
    /// What a target sent back is not what this host recorded when it took the snapshot, or
    /// there is no record to check it against: it was received and removed again.
    #[error("target {target}: {why} (removed again: {undone})")]
    Untrusted { target: String, why: String, undone: String },
    #[error("target {target}: cancelled; the next run resumes where this one stopped")]
    Cancelled { target: String },
    #[error("{domain}'s RAM dumps go to {target} sealed ({why}), but {key}")]
    RamKey { domain: String, target: String, why: String, key: String },
    #[error(
        "target {target} holds the RAM dump of {snapshot} sealed, and only this host's RAM key opens it, but {key}; nothing was received"
    )]
    SealedDumpKey { target: String, snapshot: String, key: String },
    /// Encrypted datasets come back raw (as they were sent): nothing of them can be read or
    /// checked here until their key is loaded. What was received stays.
    #[error(
        "{snapshot} came back from {target} encrypted, and the key of {datasets} is not loaded here; what was received stays: load it, then run the same restore again"
    )]
    KeyNotLoaded { target: String, snapshot: String, datasets: String },
    #[error("nothing to replicate: the config lists no disks for {domain} and no dataset holds a snapshot vmsnap took of it")]
    NoDatasets { domain: String },
    /// This host's own lock on the domain (a restore, or another replication of it): not
    /// the target's doing.
    #[error("{domain}: a restore or another replication of it runs")]
    Busy {
        domain: String,
        #[source]
        source: Box<crate::engine::EngineError>,
    },
    #[error("cannot tell whether a snapshot of {domain} is being taken")]
    Journal {
        domain: String,
        #[source]
        source: crate::engine::journal::JournalError,
    },
    #[error(transparent)]
    Zfs(#[from] ZfsError),
}

/// What to do about a diverged target.
pub const DIVERGED_HINT: &str = "look at the target's snapshots: vmsnap never forces a receive; `--rollback-target` destroys the target's newer vmsnap snapshots (if its `vmsnap serve` has --allow-rollback), or remove what diverged there by hand";

/// What to check when a target fails as a target.
pub const TARGET_HINT: &str =
    "can this host reach the target (`ssh` with the configured key), and does its forced command run `vmsnap serve`?";

/// What to do about a missing RAM key.
pub const RAM_KEY_HINT: &str = "`vmsnap setup` draws a key into ram_key's file (default /etc/vmsnap/ram.key); keep a copy off this host: a restore from the target opens sealed dumps only with it";

/// How to load the key of a dataset that came back raw.
pub const LOAD_KEY_HINT: &str = "a raw receive leaves the key location at `prompt`: `zfs load-key DATASET` asks for the passphrase, or `zfs set keylocation=file:///path/to/key DATASET && zfs load-key DATASET` reads your key file (and keeps reading it at boot)";

/// What to do about a snapshot a target sent back unchecked or changed.
pub const UNTRUSTED_HINT: &str = "vmsnap checks what a target sends back against the sha256s this host recorded when it took the snapshot (integrity records in its state directory); a snapshot with no record here comes back only with --trust-target";

impl ReplicateError {
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ReplicateError::Diverged { .. } => Some(DIVERGED_HINT),
            ReplicateError::Target { .. } => Some(TARGET_HINT),
            ReplicateError::Untrusted { .. } => Some(UNTRUSTED_HINT),
            ReplicateError::KeyNotLoaded { .. } => Some(LOAD_KEY_HINT),
            ReplicateError::RamKey { .. } | ReplicateError::SealedDumpKey { .. } => Some(RAM_KEY_HINT),
            ReplicateError::Busy { .. } => {
                Some("wait for it to end (`vmsnap check` shows what runs), or run `vmsnap recover` if none does")
            }
            ReplicateError::Journal { source, .. } => source.hint(),
            ReplicateError::Zfs(_) | ReplicateError::Cancelled { .. } | ReplicateError::NoDatasets { .. } => None,
        }
    }
}

/// What one dataset's replication did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DatasetReport {
    pub dataset: String,
    /// The steps sent (or, dry run, planned), in words.
    pub steps: Vec<String>,
    /// Stream bytes sent (dry run: `zfs send -nP`'s estimate).
    pub bytes: u64,
    /// What `--rollback-target` destroyed on the target before sending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RollbackOutcome>,
}

/// What a run did (also the `Result` of a D-Bus replication job: a list of these, as JSON).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicationReport {
    pub domain: String,
    pub target: String,
    pub dry_run: bool,
    pub datasets: Vec<DatasetReport>,
    /// RAM dumps copied and checked on the target (snapshot names).
    pub ram_dumps: Vec<String>,
    /// Snapshots marked `vmsnap:replica=complete` on the target in this run.
    pub completed: Vec<String>,
    pub ram_bytes: u64,
    /// What the target's own retention did afterwards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_pruned: Option<PruneOutcome>,
    /// Why the target's retention did not run (the replication itself succeeded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_prune_error: Option<String>,
    pub seconds: f64,
}

pub type Progress<'a> = &'a dyn super::progress::Observer;

pub(super) struct Run<'a> {
    zfs: &'a Zfs,
    dom: &'a DomainConfig,
    target: &'a TargetConfig,
    pub(super) transport: Transport,
    progress: Progress<'a>,
    dry_run: bool,
    rollback_target: bool,
    cancel: Option<Arc<AtomicBool>>,
}

/// How a replication run may act.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Plan and estimate only.
    pub dry_run: bool,
    /// A diverged target dataset is rolled back to the snapshot in common (if the target allows
    /// it), destroying its newer vmsnap-made snapshots, instead of stopping the domain.
    pub rollback_target: bool,
    /// Set to stop the run: the stream in flight stops between two pieces (the target's
    /// receive stays resumable), and no further step starts.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// Replicates `dom`'s snapshots to `target`.
/// `state_dir` holds ssh's shared connections (`<state_dir>/ssh`, root only).
pub async fn replicate(
    zfs: &Zfs,
    state_dir: &std::path::Path,
    dom: &DomainConfig,
    target: &TargetConfig,
    opts: Options,
    progress: Progress<'_>,
) -> Result<ReplicationReport, ReplicateError> {
    let t = Instant::now();
    let dry_run = opts.dry_run;
    // Not while a restore rolls the same datasets back (snapshots and pruning go on meanwhile).
    let _lock = if dry_run {
        None
    } else {
        Some(
            crate::engine::lock::DomainLock::replication(state_dir, &dom.name)
                .map_err(|e| ReplicateError::Busy { domain: dom.name.clone(), source: Box::new(e) })?,
        )
    };
    let run = Run::open(zfs, state_dir, dom, target, opts, progress)?;
    let mut report = ReplicationReport { domain: dom.name.clone(), target: target.name.clone(), dry_run, ..Default::default() };
    let by_pool = crate::engine::disks::domain_datasets(zfs, dom).await?;
    if by_pool.is_empty() {
        return Err(ReplicateError::NoDatasets { domain: dom.name.clone() });
    }
    let datasets: Vec<Dataset> = by_pool.into_values().flatten().collect();
    // A domain whose dumps travel sealed needs the RAM key before anything goes: found missing
    // only at the first dump, the streams would have gone and the run would stop half done.
    // Asked once: `complete` seals the dumps with it (and asks itself only if a dump appeared
    // since, a RAM snapshot finishing meanwhile).
    let seal = if !dry_run && run.has_ram_dumps(&datasets).await? { Some(run.ram_seal_key(&datasets).await?) } else { None };
    let mut listings = Vec::new();
    for ds in datasets {
        let (done, listing) = run.dataset(&ds).await?;
        report.datasets.push(done);
        listings.extend(listing.map(|l| (ds, l)));
    }
    if !dry_run {
        // A snapshot still being taken (a RAM snapshot is labelled `ram` once its dump is
        // complete) is sent but not completed: the next run brings its labels and its dump.
        let in_progress = crate::engine::journal::Journal::snapshot_in_progress(state_dir, &dom.name)
            .map_err(|source| ReplicateError::Journal { domain: dom.name.clone(), source })?;
        run.complete(&listings, in_progress.as_deref(), seal, &mut report).await?;
    }
    report.seconds = t.elapsed().as_secs_f64();
    Ok(report)
}

impl<'a> Run<'a> {
    /// A run's way to the target: one shared ssh connection (`<state_dir>/ssh`, root only).
    pub(super) fn open(
        zfs: &'a Zfs,
        state_dir: &std::path::Path,
        dom: &'a DomainConfig,
        target: &'a TargetConfig,
        opts: Options,
        progress: Progress<'a>,
    ) -> Result<Self, ReplicateError> {
        let control = crate::fsutil::Dir::private(state_dir, &["ssh"]).map_err(|e| ReplicateError::Target {
            target: target.name.clone(),
            why: format!("the directory for ssh's shared connections: {e}"),
        })?;
        let mut transport = Transport::for_target(target, Some(control.path()));
        if let Some(flag) = &opts.cancel {
            transport = transport.cancelled_by(flag.clone());
        }
        Ok(Run { zfs, dom, target, transport, progress, dry_run: opts.dry_run, rollback_target: opts.rollback_target, cancel: opts.cancel })
    }

    /// Stops the run here if it was cancelled.
    fn go_on(&self) -> Result<(), ReplicateError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(ReplicateError::Cancelled { target: self.target.name.clone() }),
            _ => Ok(()),
        }
    }

    fn err(&self, why: impl Into<String>) -> ReplicateError {
        ReplicateError::Target { target: self.target.name.clone(), why: why.into() }
    }

    /// One request, off the async threads; a stream's [`Transfer`] is reported at its start,
    /// every second and at its end (`estimate`: its size, if known).
    pub(super) async fn call(&self, req: Request, payload: Payload) -> Result<(serde_json::Value, u64), ReplicateError> {
        self.call_sized(req, payload, None).await
    }

    /// `size`: the payload's size when known (0 until it is).
    async fn call_sized(
        &self,
        req: Request,
        payload: Payload,
        size: Option<&AtomicU64>,
    ) -> Result<(serde_json::Value, u64), ReplicateError> {
        let moved = Arc::new(AtomicU64::new(0));
        let (transport, counter) = (self.transport.clone(), moved.clone());
        let what = match &req {
            Request::Recv { dataset } => format!("sending {dataset}"),
            Request::RamPut { snapshot, .. } => format!("sending the RAM dump of {snapshot}"),
            _ => String::new(),
        };
        let t = Instant::now();
        let report = |n: u64| {
            if !what.is_empty() {
                let total = size.map(|s| s.load(Ordering::Relaxed)).filter(|&s| s > 0);
                self.progress.transfer(&Transfer::measure(&what, n, total, t.elapsed()));
            }
        };
        report(0);
        let mut task = tokio::task::spawn_blocking(move || transport.call(&req, payload, &counter));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut task => break r.map_err(|e| self.err(e.to_string()))?,
                _ = tick.tick() => report(moved.load(Ordering::Relaxed)),
            }
        };
        let n = moved.load(Ordering::Relaxed);
        if result.is_ok() {
            report(n);
        }
        self.go_on()?;
        Ok((result.map_err(|why| self.err(why))?, n))
    }

    /// Decodes the target's resume token with this host's own `zfs send -nv -t` and checks it
    /// names a snapshot of `ds` ([`super::token`]).
    async fn check_token(
        &self,
        ds: &Dataset,
        token: &str,
        encrypted: bool,
        snaps: &[crate::zfs::SnapshotInfo],
        bookmarks: &[(String, u64, u64)],
    ) -> Result<(), String> {
        let text = self.zfs.cli().zfs(crate::zargs!["send", "-n", "-v", "-t", token]).await.map_err(|e| e.to_string())?;
        let decoded = super::token::parse(&text)?;
        let own: Vec<(String, u64)> = snaps.iter().map(|s| (s.name.snap().to_owned(), s.guid)).collect();
        let marks: Vec<u64> = bookmarks.iter().map(|b| b.1).collect();
        super::token::check(&decoded, ds, &own, &marks, encrypted)
    }

    /// The domain's datasets, to list or bring back from the target: this host's (under its
    /// disks), unless they are lost here — a disk that does not exist, or no dataset found —
    /// then the ones the target holds replicas of the domain in (the names are the same on
    /// both sides). A target that does not know the question answers with an error, and this
    /// host's own answer stands.
    pub(super) async fn datasets_to_bring_back(&self) -> Result<Vec<Dataset>, ReplicateError> {
        let lost = self.dom.disks.iter().any(|d| std::fs::symlink_metadata(d).is_err());
        let here = match lost {
            true => None,
            false => {
                crate::engine::disks::domain_datasets(self.zfs, self.dom).await.ok().map(|p| p.into_values().flatten().collect::<Vec<_>>())
            }
        };
        if let Some(here) = here.filter(|h| !h.is_empty()) {
            return Ok(here);
        }
        let (v, _) = self.call(Request::Datasets { domain: self.dom.name.clone() }, Payload::None).await?;
        let names: Vec<String> = serde_json::from_value(v).map_err(|e| self.err(format!("an answer vmsnap cannot read: {e}")))?;
        if names.is_empty() {
            return Err(self.err(format!("it holds no replica of {} (and its datasets are not here)", self.dom.name)));
        }
        names.iter().map(|n| Dataset::new(n).map_err(|e| self.err(format!("{}: {e}", super::protocol::shown(n, 200))))).collect()
    }

    /// The target's whole listing of `ds`, page by page.
    pub(super) async fn list(&self, ds: &Dataset) -> Result<Listing, ReplicateError> {
        let mut whole: Option<Listing> = None;
        let mut after = None;
        loop {
            let (v, _) = self.call(Request::List { dataset: ds.to_string(), after }, Payload::None).await?;
            let page: Listing = serde_json::from_value(v).map_err(|e| self.err(format!("a listing vmsnap cannot read: {e}")))?;
            let (more, last) = (page.more, page.snapshots.last().map(|s| s.createtxg));
            // Each page must start after the one before (oldest first), or the target loops.
            if let (Some(a), Some(first)) = (after, page.snapshots.first()) {
                if first.createtxg <= a {
                    return Err(self.err(format!("a listing page of {ds} goes back to txg {} (asked after {a})", first.createtxg)));
                }
            }
            match &mut whole {
                None => whole = Some(page),
                Some(w) => w.snapshots.extend(page.snapshots),
            }
            if whole.as_ref().is_some_and(|w| w.snapshots.len() > super::protocol::MAX_LISTED) {
                return Err(self.err(format!("the target lists more than {} snapshots of {ds}", super::protocol::MAX_LISTED)));
            }
            if !more {
                break;
            }
            after = Some(last.ok_or_else(|| self.err(format!("an empty listing page of {ds} says more follow")))?);
        }
        let mut whole = whole.unwrap_or_default();
        whole.more = false;
        Ok(whole)
    }

    fn bookmark_prefix(&self) -> String {
        format!("vmsnap-{}-", self.target.name)
    }

    /// Brings the target's copy of `ds` up to the domain's newest snapshot; with the target's
    /// listing once it is (not on a dry run).
    async fn dataset(&self, ds: &Dataset) -> Result<(DatasetReport, Option<Listing>), ReplicateError> {
        let mut report = DatasetReport { dataset: ds.to_string(), ..Default::default() };
        let mut aborted = false;
        // The target's listing once it is up to date, for the cursor.
        let mut up_to_date = None;
        // This side, read once: nothing below changes it (a snapshot taken meanwhile goes next time).
        let snaps = self.zfs.list_snapshots(ds, &[]).await?;
        let local = self.zfs.local_snapshot_properties(ds, &[prop::DOMAIN]).await?;
        let source: Vec<SourceSnap> =
            snaps.iter().map(|s| SourceSnap { name: s.name.snap().to_owned(), guid: s.guid, createtxg: s.createtxg }).collect();
        let newest = snaps
            .iter()
            .rev()
            .find(|s| local.get(&s.name.to_string()).and_then(|p| p.get(&prop::DOMAIN)) == Some(&self.dom.name))
            .map(|s| s.name.snap().to_owned());
        let bookmarks = self.zfs.bookmarks(ds).await?;
        let cursor = self.cursor(&bookmarks);
        // What the target answered to the last receive: its listing right after it.
        let mut fresh: Option<Listing> = None;
        for _ in 0..6 {
            self.go_on()?;
            let listing = match fresh.take() {
                Some(l) => l,
                None => self.list(ds).await?,
            };
            let steps = match plan(&source, newest.as_deref(), cursor.as_ref(), &listing) {
                Plan::UpToDate => {
                    up_to_date = Some(listing);
                    break;
                }
                Plan::Diverged(why, Some(common)) if self.rollback_target && report.rolled_back.is_none() => {
                    if self.dry_run {
                        report.steps.push(format!(
                            "roll the target back to {} (guid {}), destroying its newer vmsnap snapshots ({why}), then send",
                            common.name, common.guid
                        ));
                        break;
                    }
                    self.progress.step(&format!("{ds}: rolling the target back to {}", common.name));
                    let (v, _) = self.call(Request::Rollback { dataset: ds.to_string(), to_guid: common.guid }, Payload::None).await?;
                    let done: RollbackOutcome = serde_json::from_value(v).map_err(|e| self.err(e.to_string()))?;
                    tracing::warn!(dataset = %ds, target = %self.target.name, destroyed = ?done.destroyed, "target rolled back to {}", done.to);
                    report.steps.push(format!("target rolled back to {}, destroying {}", done.to, done.destroyed.join(", ")));
                    report.rolled_back = Some(done);
                    continue;
                }
                Plan::Diverged(why, _) => {
                    return Err(ReplicateError::Diverged { target: self.target.name.clone(), dataset: ds.to_string(), why })
                }
                Plan::Send(steps) => steps,
            };
            let raw = self.zfs.get_native(ds.as_str(), "encryption").await?.is_some_and(|e| e != "off");
            for step in steps {
                let argv = send_argv(ds, &step, raw, &snaps);
                if self.dry_run {
                    report.steps.push(describe(&step));
                    report.bytes += self.estimate(&argv).await.unwrap_or(0);
                    continue;
                }
                self.progress.step(&format!("{ds}: {}", describe(&step)));
                let mut cmd = std::process::Command::new(self.zfs.cli().zfs_program());
                cmd.args(&argv);
                // The size estimate is for progress only: it is made while the stream starts.
                let size = AtomicU64::new(0);
                let estimated = async {
                    if let Some(n) = self.estimate(&argv).await {
                        size.store(n, Ordering::Relaxed);
                    }
                };
                let refused = match &step {
                    Step::Resume { token } => self.check_token(ds, token, raw, &snaps, &bookmarks).await.err(),
                    _ => None,
                };
                let sent = match refused {
                    Some(why) => Err(self.err(format!("the target's resume token was not used: {why}"))),
                    None => {
                        let sent = self.call_sized(Request::Recv { dataset: ds.to_string() }, Payload::Command(cmd), Some(&size));
                        tokio::join!(sent, estimated).0
                    }
                };
                match sent {
                    Ok((v, n)) => {
                        report.bytes += n;
                        report.steps.push(describe(&step));
                        // The target lists the dataset after each receive (an older one answers null).
                        // (A long one comes in pages: then it is listed again, whole.)
                        fresh = serde_json::from_value::<Listing>(v).ok().filter(|l| !l.more);
                    }
                    // A token whose snapshot is gone on the source, or that names anything but
                    // this dataset's own snapshot (token.rs): drop the partial receive and plan
                    // again, once.
                    Err(e) if matches!(step, Step::Resume { .. }) && !aborted => {
                        tracing::warn!(dataset = %ds, "resuming failed ({e}); aborting the partial receive and planning again");
                        self.call(Request::Abort { dataset: ds.to_string() }, Payload::None).await?;
                        report.steps.push(format!("aborted an interrupted receive that could not resume ({e})"));
                        aborted = true;
                        fresh = None;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.dry_run {
                break;
            }
        }
        if self.dry_run {
            return Ok((report, None));
        }
        let listing = match up_to_date {
            Some(l) => l,
            None => self.list(ds).await?,
        };
        self.move_cursor(ds, &snaps, &bookmarks, &listing).await?;
        Ok((report, Some(listing)))
    }

    /// The newest of this target's cursor bookmarks among `bookmarks` (name, guid, createtxg).
    fn cursor(&self, bookmarks: &[(String, u64, u64)]) -> Option<Cursor> {
        let prefix = self.bookmark_prefix();
        bookmarks
            .iter()
            .filter(|(n, _, _)| n.starts_with(&prefix))
            .map(|(bookmark, guid, createtxg)| Cursor { bookmark: bookmark.clone(), guid: *guid, createtxg: *createtxg })
            .max_by_key(|c| c.createtxg)
    }

    /// One bookmark per target, at the newest snapshot the target has; the older ones go.
    /// `snaps` and `existing` are the dataset's snapshots and bookmarks as read before sending.
    async fn move_cursor(
        &self,
        ds: &Dataset,
        snaps: &[crate::zfs::SnapshotInfo],
        existing: &[(String, u64, u64)],
        listing: &Listing,
    ) -> Result<(), ReplicateError> {
        let Some(newest) = snaps.iter().rev().find(|s| listing.snapshots.iter().any(|t| t.guid == s.guid)) else { return Ok(()) };
        let name = format!("{}{}", self.bookmark_prefix(), newest.createtxg);
        if !existing.iter().any(|(n, _, _)| *n == name) {
            self.zfs.bookmark(&newest.name, &name).await?;
        }
        for (old, _, _) in existing.iter().filter(|(n, _, _)| n.starts_with(&self.bookmark_prefix()) && *n != name) {
            self.zfs.destroy_bookmark(ds, old).await?;
        }
        Ok(())
    }

    /// `zfs send -nP`'s size estimate.
    async fn estimate(&self, argv: &[String]) -> Option<u64> {
        let mut args: Vec<std::ffi::OsString> = vec!["send".into(), "-n".into(), "-P".into()];
        args.extend(argv.iter().skip(1).map(Into::into));
        let out = self.zfs.cli().zfs(args).await.ok()?;
        out.lines().find_map(|l| l.strip_prefix("size\t")).and_then(|n| n.trim().parse().ok())
    }

    /// Requests that carry no stream, in as few connections as their lines allow; each one's
    /// answer, in order. A target that does not know `batch` (an older `vmsnap serve`) is
    /// asked one request at a time.
    async fn call_many(&self, requests: Vec<Request>) -> Result<Vec<Result<serde_json::Value, String>>, ReplicateError> {
        let mut out = Vec::with_capacity(requests.len());
        for batch in Request::batches(requests) {
            let n = batch.len();
            match self.call(Request::Batch { requests: batch.clone() }, Payload::None).await {
                Ok((v, _)) => {
                    let replies: Vec<Reply> =
                        serde_json::from_value(v).map_err(|e| self.err(format!("a batch answer vmsnap cannot read: {e}")))?;
                    if replies.len() != n {
                        return Err(self.err(format!("{} answers to a batch of {n} requests", replies.len())));
                    }
                    out.extend(replies.into_iter().map(|r| match r {
                        Reply { ok: true, value, .. } => Ok(value),
                        Reply { error, .. } => Err(format!("the target says: {}", error.unwrap_or_default())),
                    }));
                }
                Err(ReplicateError::Target { why, .. }) if why.contains("not a request vmsnap serves") => {
                    for r in batch {
                        out.push(self.call(r, Payload::None).await.map(|(v, _)| v).map_err(|e| e.to_string()));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// RAM dumps and properties for every snapshot of the domain the target has that is not
    /// complete there yet (`listings`: the target's, up to date), then the target's retention.
    /// `seal`: the RAM key as the run found it (`None`: not asked yet).
    async fn complete(
        &self,
        listings: &[(Dataset, Listing)],
        in_progress: Option<&str>,
        mut seal: Option<Option<RamKey>>,
        report: &mut ReplicationReport,
    ) -> Result<(), ReplicateError> {
        // snapshot name → (its vmsnap properties, datasets whose target copy is incomplete)
        let mut todo: BTreeMap<String, (BTreeMap<PropName, String>, Vec<Dataset>)> = BTreeMap::new();
        for (ds, listing) in listings {
            let local = self.zfs.local_snapshot_properties(ds, &prop::ALL).await?;
            for t in listing.snapshots.iter().filter(|t| t.props.get(REPLICA.as_str()).map(String::as_str) != Some("complete")) {
                let Some(props) = local.get(&format!("{ds}@{}", t.name)) else { continue };
                if props.get(&prop::DOMAIN) != Some(&self.dom.name) {
                    continue;
                }
                if in_progress == Some(t.name.as_str()) {
                    (self.progress)
                        .step(&format!("{}@{}: sent; completed by the next run (the snapshot is still being taken)", ds, t.name));
                    continue;
                }
                todo.entry(t.name.clone()).or_insert_with(|| (props.clone(), Vec::new())).1.push(ds.clone());
            }
        }
        // How far the target has each dump, asked all at once.
        let with_ram: Vec<&String> = todo.iter().filter(|(_, (p, _))| p.contains_key(&prop::RAM_DUMP)).map(|(s, _)| s).collect();
        let asked = with_ram.iter().map(|s| Request::RamStat { domain: self.dom.name.clone(), snapshot: (*s).clone() }).collect();
        let mut ram_states: BTreeMap<String, RamState> = BTreeMap::new();
        for (snap, answer) in with_ram.iter().zip(self.call_many(asked).await?) {
            let state = answer.and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string())).map_err(|e| self.err(e))?;
            ram_states.insert((*snap).clone(), state);
        }
        // The properties go in batches: those of the snapshots done so far before each dump
        // upload (an interrupted upload does not hold back the others), the rest at the end
        // with the target's retention.
        let mut pending: Vec<(Dataset, String, BTreeMap<String, String>)> = Vec::new();
        for (snap, (mut props, on)) in todo {
            self.go_on()?;
            // This host's verification is of this host's dump: the target's copy is proven by
            // `vmsnap verify --target`, not by the source's word.
            props.remove(&prop::VERIFIED);
            if let (Some(path), Some(sum)) = (props.get(&prop::RAM_DUMP).cloned(), props.get(&prop::RAM_SHA256).cloned()) {
                match crate::fsutil::open_regular(std::path::Path::new(&path)) {
                    Ok(file) => {
                        let state = ram_states.remove(&snap).unwrap_or_default();
                        if seal.is_none() {
                            let all: Vec<Dataset> = listings.iter().map(|(ds, _)| ds.clone()).collect();
                            seal = Some(self.ram_seal_key(&all).await?);
                        }
                        let key = seal.as_ref().and_then(Option::as_ref);
                        let sealed_sum = if !state.complete {
                            self.push_props(std::mem::take(&mut pending), None).await?;
                            let (bytes, sealed_sum) = self.send_ram(&snap, file, &sum, &state, key).await?;
                            report.ram_bytes += bytes;
                            sealed_sum
                        } else {
                            self.sealed_sum_of_complete(&snap, file, &sum, &state, key).await?
                        };
                        if let Some(s) = sealed_sum {
                            props.insert(prop::RAM_SEALED, s);
                        }
                        report.ram_dumps.push(snap.clone());
                    }
                    Err(e) => {
                        // Pruned since (or lost): the snapshot travels without it, and says so.
                        tracing::warn!(snapshot = %snap, "its RAM dump is not here ({e}); replicated without it");
                        props.remove(&prop::RAM_DUMP);
                        props.remove(&prop::RAM_SHA256);
                        props.entry(prop::RAM_PRUNED).or_insert_with(|| "not replicated: missing on the source".into());
                    }
                }
            }
            props.insert(REPLICA, "complete".into());
            let wanted: BTreeMap<String, String> = props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            pending.extend(on.into_iter().map(|ds| (ds, snap.clone(), wanted.clone())));
            report.completed.push(snap);
        }
        self.go_on()?;
        // Everything is on the target by now: a retention that fails there (or an older
        // `vmsnap serve` without it) is reported, not a failed replication.
        let pruned = match self.push_props(pending, Some(Request::Prune { domain: self.dom.name.clone() })).await? {
            Some(Ok(v)) => serde_json::from_value::<PruneOutcome>(v).map_err(|e| format!("a prune report vmsnap cannot read: {e}")),
            Some(Err(e)) => Err(e),
            None => Err("no answer".into()),
        };
        match pruned {
            Ok(p) => {
                if !p.destroyed.is_empty() || !p.ram_dropped.is_empty() {
                    tracing::info!(target = %self.target.name, domain = %self.dom.name, destroyed = ?p.destroyed, ram_dropped = ?p.ram_dropped, "target retention");
                }
                report.target_pruned = Some(p);
            }
            Err(e) => {
                tracing::warn!(target = %self.target.name, domain = %self.dom.name, "the target's retention: {e}");
                report.target_prune_error = Some(e);
            }
        }
        Ok(())
    }

    /// Uploads a dump from where the target's copy (`state`) stops, sealed under `key` when
    /// given: the bytes sent, and the sealed copy's sha256.
    async fn send_ram(
        &self,
        snap: &str,
        file: std::fs::File,
        sha256: &str,
        state: &RamState,
        key: Option<&RamKey>,
    ) -> Result<(u64, Option<String>), ReplicateError> {
        let len = file.metadata().map_err(|e| self.err(e.to_string()))?.len();
        let size = if key.is_some() { crate::ramcrypt::sealed_len(len) } else { len };
        if state.partial > size {
            return Err(self.err(format!("the target has {} bytes of the {size}-byte RAM dump of {snap}", state.partial)));
        }
        let how = if key.is_some() { "sealed, " } else { "" };
        self.progress.step(&format!("RAM dump of {snap} ({how}{} MiB to send)", (size - state.partial) >> 20));
        let (dom, offset) = (self.dom.name.clone(), state.partial);
        let req = Request::RamPut {
            domain: dom.clone(),
            snapshot: snap.into(),
            sha256: if key.is_some() { String::new() } else { sha256.into() },
            offset,
            size,
            sealed: key.is_some(),
        };
        let left = AtomicU64::new(size - offset);
        let Some(key) = key else {
            let (_, n) = self.call_sized(req, Payload::File(file, offset), Some(&left)).await?;
            return Ok((n, None));
        };
        let sealer =
            crate::ramcrypt::Sealer::for_dump(file, len, key, (&dom, snap, sha256), offset).map_err(|e| self.err(e.to_string()))?;
        let (v, n) = self.call_sized(req, Payload::Reader(Box::new(sealer)), Some(&left)).await?;
        let state: RamState = serde_json::from_value(v).map_err(|e| self.err(format!("a RAM upload's answer vmsnap cannot read: {e}")))?;
        let sum = state.sha256.filter(|s| super::protocol::valid_sha256(s));
        let sum = sum.ok_or_else(|| self.err(format!("the target did not say the sha256 of its sealed copy of {snap}'s RAM dump")))?;
        Ok((n, Some(sum)))
    }

    /// The sha256 of the target's complete sealed copy of `snap`'s dump (an earlier run sent it
    /// and did not record it): sealed again here to hash, as it is deterministic. `None` when the
    /// target's copy is not sealed.
    async fn sealed_sum_of_complete(
        &self,
        snap: &str,
        file: std::fs::File,
        sum: &str,
        state: &RamState,
        key: Option<&RamKey>,
    ) -> Result<Option<String>, ReplicateError> {
        let Some(key) = key else { return Ok(None) };
        if !state.sealed {
            tracing::warn!(snapshot = %snap, "the target holds this RAM dump unsealed, from before it was sealed");
            return Ok(None);
        }
        let (id, key) = ((self.dom.name.clone(), snap.to_owned(), sum.to_owned()), key.clone());
        let len = file.metadata().map_err(|e| self.err(e.to_string()))?.len();
        let sealed = tokio::task::spawn_blocking(move || crate::ramcrypt::sealed_sha256(file, len, &key, (&id.0, &id.1, &id.2)));
        Ok(Some(sealed.await.expect("hashing runs").map_err(|e| self.err(e.to_string()))?))
    }

    /// Whether any snapshot of the domain here still has its RAM dump.
    async fn has_ram_dumps(&self, datasets: &[Dataset]) -> Result<bool, ReplicateError> {
        for ds in datasets {
            let props = self.zfs.local_snapshot_properties(ds, &[prop::DOMAIN, prop::RAM_DUMP, prop::RAM_PRUNED]).await?;
            if props.values().any(|p| {
                p.get(&prop::DOMAIN) == Some(&self.dom.name) && p.contains_key(&prop::RAM_DUMP) && !p.contains_key(&prop::RAM_PRUNED)
            }) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The key this domain's RAM dumps are sealed with for this target, if they travel sealed
    /// (`seal_ram`: by default when one of its datasets is encrypted).
    async fn ram_seal_key(&self, datasets: &[Dataset]) -> Result<Option<RamKey>, ReplicateError> {
        let why = match self.target.seal_ram {
            SealRam::Never => return Ok(None),
            SealRam::Always => "seal_ram = \"always\"",
            SealRam::Auto => {
                let mut encrypted = None;
                for ds in datasets {
                    if self.zfs.get_native(ds.as_str(), "encryption").await?.is_some_and(|e| e != "off") {
                        encrypted = Some(ds);
                        break;
                    }
                }
                match encrypted {
                    Some(_) => "its datasets are encrypted, so the target gets ciphertext only",
                    None => return Ok(None),
                }
            }
        };
        RamKey::load(&self.target.ram_key).map(Some).map_err(|e| ReplicateError::RamKey {
            domain: self.dom.name.clone(),
            target: self.target.name.clone(),
            why: why.into(),
            key: e.to_string(),
        })
    }

    /// Sets each snapshot's properties on the target (`dataset`, `snapshot`, properties) and
    /// checks what it reads back; `then`, a request sent in the same batch after them, and its
    /// answer.
    async fn push_props(
        &self,
        props: Vec<(Dataset, String, BTreeMap<String, String>)>,
        then: Option<Request>,
    ) -> Result<Option<Result<serde_json::Value, String>>, ReplicateError> {
        let mut requests: Vec<Request> = props
            .iter()
            .map(|(ds, snap, wanted)| Request::Props { dataset: ds.to_string(), snapshot: snap.clone(), props: wanted.clone() })
            .collect();
        requests.extend(then);
        if requests.is_empty() {
            return Ok(None);
        }
        let mut answers = self.call_many(requests).await?.into_iter();
        for ((ds, snap, wanted), answer) in props.iter().zip(answers.by_ref()) {
            let back: BTreeMap<String, String> = answer
                .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
                .map_err(|e| self.err(format!("{ds}@{snap}: {e}")))?;
            for (k, v) in wanted {
                // The dump's path is the target's own.
                if k != prop::RAM_DUMP.as_str() && back.get(k) != Some(v) {
                    return Err(self.err(format!("{ds}@{snap}: {k} reads back as {:?}, not {v:?}", back.get(k))));
                }
            }
        }
        Ok(answers.next())
    }
}

/// The `zfs` arguments of a step (`-w`: encrypted datasets go raw, the target needs no key).
/// An incremental from a snapshot carries every snapshot between (`-I`); with none between, it
/// is a plain `-i`: `-I` makes a stream package, which the target's `zfs receive` takes
/// longer to apply.
fn send_argv(ds: &Dataset, step: &Step, raw: bool, snaps: &[crate::zfs::SnapshotInfo]) -> Vec<String> {
    let mut a = vec!["send".to_owned()];
    match step {
        Step::Resume { token } => {
            // Raw whatever the token says: the target never gets an encrypted dataset's plaintext.
            if raw {
                a.push("-w".into());
            }
            a.extend(["-t".to_owned(), token.clone()])
        }
        Step::Full { to } => {
            if raw {
                a.push("-w".into());
            }
            a.push(format!("{ds}@{to}"));
        }
        Step::Incremental { from, to } => {
            if raw {
                a.push("-w".into());
            }
            match from {
                Base::Snapshot(s) => {
                    let txg = |name: &str| snaps.iter().find(|x| x.name.snap() == name).map(|x| x.createtxg);
                    let between = match (txg(s), txg(to)) {
                        (Some(a), Some(b)) => snaps.iter().any(|x| x.createtxg > a && x.createtxg < b),
                        _ => true,
                    };
                    a.extend([if between { "-I" } else { "-i" }.to_owned(), format!("{ds}@{s}")])
                }
                Base::Bookmark(b) => a.extend(["-i".to_owned(), format!("{ds}#{b}")]),
            }
            a.push(format!("{ds}@{to}"));
        }
    }
    a
}

fn describe(step: &Step) -> String {
    match step {
        Step::Resume { .. } => "resume an interrupted receive".into(),
        Step::Full { to } => format!("full send of {to}"),
        Step::Incremental { from: Base::Snapshot(f), to } => format!("incremental {f} → {to} (with every snapshot between)"),
        Step::Incremental { from: Base::Bookmark(b), to } => format!("incremental from bookmark {b} → {to}"),
    }
}

/// How far `target` has `datasets`: the creation time of the snapshot under the source's cursor
/// bookmark for it, the oldest across the datasets (`None` when one has no cursor yet). Read on
/// this host only, so `vmsnap check` needs no connection to the target.
pub async fn replicated_up_to(zfs: &Zfs, datasets: &[Dataset], target: &str) -> Result<Option<i64>, ZfsError> {
    let prefix = format!("vmsnap-{target}-");
    let mut oldest: Option<i64> = None;
    for ds in datasets {
        let newest = zfs.bookmarks(ds).await?.into_iter().filter(|(n, _, _)| n.starts_with(&prefix)).max_by_key(|(_, _, txg)| *txg);
        let Some((bookmark, _, _)) = newest else { return Ok(None) };
        let Some(created) = zfs.get_native(&format!("{ds}#{bookmark}"), "creation").await?.and_then(|c| c.parse::<i64>().ok()) else {
            return Ok(None);
        };
        oldest = Some(oldest.map_or(created, |o| o.min(created)));
    }
    Ok(oldest)
}

/// What `target` holds of `dom`: its listing of each of the domain's datasets (`vmsnap list
/// --target`).
pub async fn list_target(
    zfs: &Zfs,
    state_dir: &std::path::Path,
    dom: &DomainConfig,
    target: &TargetConfig,
) -> Result<Vec<(Dataset, Listing)>, ReplicateError> {
    let noop = |_: &str| {};
    let run = Run::open(zfs, state_dir, dom, target, Options { dry_run: true, ..Options::default() }, &noop)?;
    let mut out = Vec::new();
    for ds in run.datasets_to_bring_back().await? {
        let listing = run.list(&ds).await?;
        out.push((ds, listing));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(ds: &Dataset, names: &[&str]) -> Vec<crate::zfs::SnapshotInfo> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| crate::zfs::SnapshotInfo {
                name: ds.snapshot(n).unwrap(),
                creation: i as i64,
                used: 0,
                guid: 100 + i as u64,
                createtxg: 10 * (i as u64 + 1),
                userrefs: 0,
                props: BTreeMap::new(),
            })
            .collect()
    }

    #[test]
    fn incrementals_carry_the_snapshots_between_with_dash_capital_i_only_when_there_are_some() {
        let ds = Dataset::new("tank/vms/web").unwrap();
        let step = |from: &str, to: &str| Step::Incremental { from: Base::Snapshot(from.into()), to: to.into() };
        let all = snaps(&ds, &["a", "b", "c"]);
        assert_eq!(send_argv(&ds, &step("a", "c"), false, &all), ["send", "-I", "tank/vms/web@a", "tank/vms/web@c"]);
        assert_eq!(send_argv(&ds, &step("b", "c"), false, &all), ["send", "-i", "tank/vms/web@b", "tank/vms/web@c"]);
        assert_eq!(send_argv(&ds, &step("a", "b"), true, &all), ["send", "-w", "-i", "tank/vms/web@a", "tank/vms/web@b"]);
        // A base this side no longer lists: every snapshot between is asked for.
        assert_eq!(send_argv(&ds, &step("gone", "c"), false, &all)[1], "-I");
        let mark = Step::Incremental { from: Base::Bookmark("vmsnap-off-10".into()), to: "b".into() };
        assert_eq!(send_argv(&ds, &mark, false, &all), ["send", "-i", "tank/vms/web#vmsnap-off-10", "tank/vms/web@b"]);
    }
}
