//! What each kind of job does once the job layer ([`super`]) has started it: a snapshot with
//! its scripts and the pruning after it, a restore, a replication to each target; and what is
//! recorded of them (`status.json`, the metrics file).

use super::{error_chain, JobError, JobEvent, Jobs, Origin, Records, Request, RestoreRequest};
use crate::config::{Config, DomainConfig};
use crate::daemon::scripts::{self, ScriptEnv};
use crate::daemon::status::{Attempt, Status};
use crate::engine::{self, SnapshotOptions, SnapshotReport};
use crate::replicate::{self, ReplicateError, ReplicationReport, Transfer};
use crate::retention::prune;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;
use tokio::sync::watch;

impl Jobs {
    /// A restore as `vmsnap restore` does it: from the target first when asked, then in place or
    /// as a new domain; the report as JSON. `untrusted` is set when the target's snapshot was
    /// refused ([`ReplicateError::Untrusted`]).
    pub(super) async fn restore(
        &self,
        cfg: &Config,
        dom: &DomainConfig,
        r: &RestoreRequest,
        step: crate::restore::Progress,
        untrusted: &AtomicBool,
    ) -> Result<serde_json::Value, JobError> {
        use crate::restore;
        let zfs = &*self.0.zfs;
        if r.resume && cfg.domains.contains_key(&dom.name) {
            // QEMU would be a process of the daemon's service: stopping the daemon would stop it.
            return Err(JobError::from(format!(
                "a config domain is resumed from a shell (`vmsnap restore {} {} --resume`), not by the daemon: its QEMU would run in the daemon's service and stop with it",
                dom.name, r.snapshot
            )));
        }
        let mut pulled = None;
        if let Some(tname) = &r.from {
            let target = cfg.targets.get(tname).ok_or_else(|| JobError::from(format!("no [target.{tname}] in the configuration")))?;
            let how = replicate::pull::PullOptions { destroy_newer: r.destroy_newer, trust_target: r.trust_target };
            let report =
                replicate::pull::pull(zfs, &cfg.state_dir, &cfg.ram_dir, dom, target, &r.snapshot, how, &*step).await.map_err(|e| {
                    if matches!(e, ReplicateError::Untrusted { .. }) {
                        untrusted.store(true, Ordering::Relaxed);
                    }
                    let e = JobError::of(&e);
                    JobError { message: format!("bringing {} back from {tname}: {}", r.snapshot, e.message), ..e }
                })?;
            pulled = Some(report);
        }
        let mut out = match &r.as_name {
            Some(new) => {
                let start = if r.resume { restore::clone::Start::Resume } else { restore::clone::Start::No };
                let plan =
                    restore::clone::plan(cfg, zfs, &dom.name, &r.snapshot, new, r.promote, start).await.map_err(|e| JobError::of(&e))?;
                serde_json::to_value(restore::clone::apply(cfg, zfs, plan, step).await.map_err(|e| JobError::of(&e))?)
            }
            None => {
                let req = restore::Request {
                    domain: dom.name.clone(),
                    snapshot: r.snapshot.clone(),
                    destroy_newer: r.destroy_newer,
                    resume: r.resume,
                    from_target: r.from.is_some(),
                };
                let plan = restore::plan(cfg, zfs, &req).await.map_err(|e| JobError::of(&e))?;
                for w in &plan.warnings {
                    tracing::warn!(domain = %dom.name, snapshot = %r.snapshot, "{w}");
                }
                serde_json::to_value(restore::apply(cfg, zfs, plan, step).await.map_err(|e| JobError::of(&e))?)
            }
        }
        .expect("reports serialise");
        if let (Some(p), Some(o)) = (pulled, out.as_object_mut()) {
            o.insert("pulled".into(), serde_json::to_value(p).expect("serialises"));
        }
        Ok(out)
    }

    /// To each target in turn (all of `replicate_to` when `only` is empty); a target that fails
    /// does not stop the others, and the job fails naming each one that did.
    pub(super) async fn replicate(
        &self,
        cfg: &Config,
        dom: &DomainConfig,
        only: &[String],
        opts: replicate::Options,
        watcher: &Watcher<'_>,
    ) -> Result<Vec<ReplicationReport>, JobError> {
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        let mut hint = None;
        for tname in dom.policy.replicate_to.iter().filter(|t| only.is_empty() || only.contains(t)) {
            let Some(target) = cfg.targets.get(tname) else {
                failed.push(format!("{tname}: no [target.{tname}] in the configuration"));
                continue;
            };
            *watcher.target.lock().expect("not poisoned") = tname.clone();
            replicate::Observer::step(watcher, "starting");
            match replicate::replicate(&self.0.zfs, &cfg.state_dir, dom, target, opts.clone(), watcher).await {
                Ok(r) => {
                    let bytes: u64 = r.datasets.iter().map(|d| d.bytes).sum::<u64>() + r.ram_bytes;
                    tracing::info!(domain = %dom.name, target = %tname, completed = ?r.completed, bytes, dry_run = opts.dry_run, "replicated");
                    if !opts.dry_run {
                        self.record_replication(cfg, dom, tname, Some(bytes));
                    }
                    reports.push(r);
                }
                Err(e @ ReplicateError::Cancelled { .. }) => return Err(JobError::of(&e)),
                Err(e) => {
                    match e {
                        ReplicateError::Diverged { .. } => watcher.diverged.store(true, Ordering::Relaxed),
                        ReplicateError::Target { .. } => watcher.target_failed.store(true, Ordering::Relaxed),
                        _ => {}
                    }
                    tracing::error!(domain = %dom.name, target = %tname, "replication failed: {}", error_chain(&e));
                    if !opts.dry_run {
                        self.record_replication(cfg, dom, tname, None);
                    }
                    failed.push(format!("{tname}: {}", error_chain(&e)));
                    hint = hint.or(e.hint().map(str::to_owned));
                }
            }
        }
        if failed.is_empty() {
            Ok(reports)
        } else {
            Err(JobError { message: failed.join("; "), hint })
        }
    }

    /// A snapshot with its scripts, then pruning when it serves retention periods.
    pub(super) async fn snapshot(
        &self,
        id: u64,
        cfg: &Config,
        dom: &DomainConfig,
        opts: &SnapshotOptions,
        step: &(dyn Fn(&str) + Sync),
    ) -> Result<SnapshotReport, JobError> {
        let zfs = &*self.0.zfs;
        let policy = &dom.policy;
        // The name is fixed now so the pre-snapshot script is told the one taken.
        let opts = SnapshotOptions { name_at: Some(opts.name_at.unwrap_or_else(SystemTime::now)), ..opts.clone() };
        let name = engine::naming::snapshot_name(opts.name_at.expect("set"), &opts.label);
        let scripted = policy.scripts.pre_snapshot.is_some() || policy.scripts.post_snapshot.is_some();
        // Like sanoid, scripts are told dataset names (the datasets under the domain's disks).
        let targets: Vec<String> = if scripted {
            match engine::disks::domain_datasets(zfs, dom).await {
                Ok(by_pool) => by_pool.into_values().flatten().map(|d| d.to_string()).collect(),
                Err(e) => {
                    tracing::warn!(domain = %dom.name, "scripts get no SANOID_TARGETS: {e}");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let env = |script: &'static str| ScriptEnv {
            domain: dom.name.clone(),
            script,
            targets: targets.clone(),
            snapnames: vec![name.clone()],
            types: opts.periods.iter().map(|p| p.as_str().to_owned()).collect(),
        };
        let mut pre_failed = false;
        if let Some(s) = &policy.scripts.pre_snapshot {
            step("running pre_snapshot_script");
            if let Err(e) = scripts::run(s, &env("pre"), policy.scripts.timeout).await {
                tracing::warn!(domain = %dom.name, "pre_snapshot_script failed: {e}");
                pre_failed = true;
            }
        }
        let result = if pre_failed && policy.scripts.no_inconsistent_snapshot {
            Err(JobError::from("pre_snapshot_script failed and no_inconsistent_snapshot is set: snapshot skipped".to_owned()))
        } else {
            engine::snapshot(cfg, dom, &opts, zfs, step).await.map_err(|e| JobError::of(&e))
        };
        if let Some(s) = &policy.scripts.post_snapshot {
            if !pre_failed || policy.scripts.force_post {
                step("running post_snapshot_script");
                if let Err(e) = scripts::run(s, &env("post"), policy.scripts.timeout).await {
                    tracing::warn!(domain = %dom.name, "post_snapshot_script failed: {e}");
                }
            }
        }
        if let Ok(r) = &result {
            tracing::info!(
                domain = %dom.name,
                snapshot = %r.name,
                consistency = r.consistency.as_str(),
                freeze_ms = r.freeze_ms.unwrap_or(0.0),
                pause_ms = r.pause_ms.unwrap_or(0.0),
                ram = r.ram_dump.is_some(),
                "snapshot taken"
            );
            for w in &r.warnings {
                tracing::warn!(domain = %dom.name, snapshot = %r.name, "{w}");
            }
        }
        let mut destroyed = 0;
        if policy.autoprune && !opts.periods.is_empty() {
            step("pruning");
            match prune::prune(cfg, dom, zfs, chrono::Utc::now().timestamp(), false).await {
                Ok(p) => {
                    destroyed = p.destroyed.len() as u64;
                    if destroyed > 0 || !p.ram_deleted.is_empty() {
                        tracing::info!(domain = %dom.name, destroyed = ?p.destroyed, ram_deleted = ?p.ram_deleted, "pruned");
                    }
                    for w in &p.warnings {
                        tracing::warn!(domain = %dom.name, "prune: {w}");
                    }
                }
                Err(e) => tracing::error!(domain = %dom.name, "prune failed: {}", error_chain(&e)),
            }
        }
        self.record(cfg, dom, &result, destroyed);
        // Announced once `status.json` says so too: a listener that runs `vmsnap check` on the
        // signal sees this snapshot, not the attempt before it.
        if let Ok(r) = &result {
            let _ = self.0.events.send(JobEvent::SnapshotTaken {
                id,
                domain: dom.name.clone(),
                snapshot: r.name.clone(),
                consistency: r.consistency.to_string(),
            });
        }
        // Off the host after each scheduled snapshot, in the replication lane: the next
        // snapshots do not wait for it. Targets with their own schedule (`every_minutes`) are
        // the daemon's to start.
        if result.is_ok() && !opts.periods.is_empty() {
            let after: Vec<String> =
                policy.replicate_to.iter().filter(|t| cfg.targets.get(*t).is_some_and(|t| t.every.is_none())).cloned().collect();
            if !after.is_empty() {
                match self.start(dom.clone(), Request::Replicate { targets: after, opts: replicate::Options::default() }, Origin::Schedule)
                {
                    Ok(job) => tracing::info!(domain = %dom.name, job = job.id, "replication started"),
                    // Still sending an earlier one: it, or the next, carries this snapshot too.
                    Err(e) => tracing::info!(domain = %dom.name, "replication not started now: {e}"),
                }
            }
        }
        result
    }

    /// The attempt into `status.json` (read back first: another vmsnap process may have written
    /// other domains) and, in the daemon, into the metrics file.
    pub(super) fn record(&self, cfg: &Config, dom: &DomainConfig, result: &Result<SnapshotReport, JobError>, destroyed: u64) {
        let at = chrono::Utc::now().timestamp();
        let attempt = match result {
            Ok(r) => Attempt { at, ok: true, snapshot: Some(r.name.clone()), consistency: Some(r.consistency.to_string()), error: None },
            Err(e) => Attempt { at, ok: false, snapshot: None, consistency: None, error: Some(e.message.clone()) },
        };
        let mut rec = self.0.record.lock().expect("no job panics while holding the records");
        let mut status = Status::load(&cfg.state_dir).unwrap_or_else(|e| {
            tracing::warn!("replacing an unreadable {}: {e}", Status::path(&cfg.state_dir).display());
            Status::default()
        });
        status.domains.insert(dom.name.clone(), attempt);
        if let Err(e) = status.save(&cfg.state_dir) {
            tracing::error!("saving {}: {e}", Status::path(&cfg.state_dir).display());
        }
        if !rec.write_metrics {
            return;
        }
        let m = rec.metrics.domain(&dom.name);
        m.pruned += destroyed;
        match result {
            Ok(r) => {
                *m.taken.entry(r.consistency.to_string()).or_default() += 1;
                m.last_success = Some(at);
                if let Some(f) = r.freeze_ms {
                    m.freeze_ms.observe(f);
                }
                if let Some(p) = r.pause_ms {
                    m.pause_ms.observe(p);
                }
            }
            Err(_) => {
                m.failed += 1;
                m.last_failure = Some(at);
            }
        }
        rec.write(cfg);
    }

    /// One target's replication into the daemon's metrics: the bytes sent, or a failure.
    pub(super) fn record_replication(&self, cfg: &Config, dom: &DomainConfig, target: &str, sent: Option<u64>) {
        let mut rec = self.0.record.lock().expect("no job panics while holding the records");
        if !rec.write_metrics {
            return;
        }
        let r = rec.metrics.domain(&dom.name).replication.entry(target.to_owned()).or_default();
        match sent {
            Some(bytes) => {
                r.bytes += bytes;
                r.last_success = Some(chrono::Utc::now().timestamp());
            }
            None => r.failed += 1,
        }
        rec.write(cfg);
    }
}

impl Records {
    fn write(&self, cfg: &Config) {
        if let Some(path) = &cfg.metrics_file {
            if let Err(e) = self.metrics.write(path) {
                tracing::error!("writing metrics to {}: {e}", path.display());
            }
        }
    }
}

/// A replication job's observer: each step, prefixed with its target, is the job's progress;
/// each transfer is its `Transfer` (and, in words, its progress).
pub(super) struct Watcher<'a> {
    step: &'a (dyn Fn(&str) + Sync),
    transfer: &'a watch::Sender<Option<Transfer>>,
    target: Mutex<String>,
    /// Set when a target diverged.
    diverged: &'a AtomicBool,
    /// Set when a target could not be reached or refused.
    target_failed: &'a AtomicBool,
}

impl<'a> Watcher<'a> {
    pub(super) fn new(
        step: &'a (dyn Fn(&str) + Sync),
        transfer: &'a watch::Sender<Option<Transfer>>,
        diverged: &'a AtomicBool,
        target_failed: &'a AtomicBool,
    ) -> Self {
        Self { step, transfer, target: Mutex::new(String::new()), diverged, target_failed }
    }
}

impl replicate::Observer for Watcher<'_> {
    fn step(&self, s: &str) {
        let target = self.target.lock().expect("not poisoned").clone();
        (self.step)(&format!("replicating to {target}: {s}"));
    }

    fn transfer(&self, t: &Transfer) {
        self.transfer.send_replace(Some(t.clone()));
        self.step(&t.to_string());
    }
}
