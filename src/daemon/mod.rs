//! `vmsnap daemon`: takes each enrolled domain's due snapshots and prunes after them.
//!
//! Each tick (at the next preferred time of any policy, and at least once a minute) it reads
//! every domain's snapshots back from ZFS and asks [`crate::schedule::due`] what is due; a due
//! domain gets one job (never two at once; at most `max_parallel` domains at a time). A job runs
//! the pre-snapshot script, the engine, the post-snapshot script, then pruning. SIGHUP reloads
//! the config (a bad one is refused and the old one keeps running); SIGTERM/SIGINT stop
//! scheduling and wait for running jobs, which the engine always leaves thawed and resumed.
//! Journals left by a crash are recovered at start-up. The domains are the config's plus those
//! registered by the libvirt hook or over D-Bus ([`crate::registry`]), which it also serves.

use crate::catalog;
use crate::config::{Config, ConfigError, DomainConfig};
use crate::dbus::{self, Bus};
use crate::engine::{self, naming, SnapshotOptions};
use crate::metrics::Metrics;
use crate::policy::{PerPeriod, Period};
use crate::prune;
use crate::registry::{all_domains, Registry};
use crate::schedule;
use crate::scripts::{self, ScriptEnv};
use crate::status::{Attempt, Status};
use crate::zfs::Zfs;
use chrono::Local;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("refusing to start")]
    Config(#[from] ConfigError),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("serving {name} on D-Bus (is another vmsnap daemon running? see `--bus`)", name = crate::dbus::BUS_NAME)]
    DBus(#[source] zbus::Error),
}

/// The longest the daemon sleeps between looks at the schedule.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// After a failed job, the domain is not tried again sooner than this.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Shared by the jobs: counters for the metrics file and the status file.
struct Shared {
    metrics: Metrics,
    status: Status,
}

/// Runs until SIGTERM or SIGINT, serving D-Bus on `bus` unless it is `None`.
pub async fn run(config_path: &Path, zfs: Zfs, bus: Option<Bus>) -> Result<(), DaemonError> {
    let mut cfg = Arc::new(Config::load(config_path)?);
    let zfs = Arc::new(zfs);
    let shared_cfg = Arc::new(std::sync::RwLock::new(cfg.clone()));
    // D-Bus jobs hold this while they work on a VM; shutdown waits for all of them.
    let dbus_jobs = Arc::new(tokio::sync::RwLock::new(()));
    let _bus = match &bus {
        Some(b) => {
            Some(dbus::serve(b, dbus::Agent::new(shared_cfg.clone(), zfs.clone(), dbus_jobs.clone())).await.map_err(DaemonError::DBus)?)
        }
        None => None,
    };
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    tracing::info!(config = %config_path.display(), domains = cfg.domains.len(), "vmsnap daemon starting");
    match engine::recover::recover_all(&cfg, &zfs).await {
        Ok(reports) => {
            reports.iter().for_each(|r| tracing::warn!(domain = %r.domain, "recovered an interrupted operation: {:?}", r.actions))
        }
        Err(e) => tracing::error!("recovering interrupted operations: {e}"),
    }
    for (name, why) in Registry::new(&cfg.state_dir).drop_stale() {
        tracing::warn!(domain = %name, "unregistered: {why}");
    }
    let status = Status::load(&cfg.state_dir).unwrap_or_else(|e| {
        tracing::warn!("ignoring unreadable status file: {e}");
        Status::default()
    });
    let shared = Arc::new(Mutex::new(Shared { metrics: Metrics::default(), status }));
    let mut slots = Arc::new(Semaphore::new(cfg.max_parallel));
    let mut jobs: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut not_before: HashMap<String, Instant> = HashMap::new();
    loop {
        jobs.retain(|_, j| !j.is_finished());
        for dom in &all_domains(&cfg, &Registry::new(&cfg.state_dir)) {
            if jobs.contains_key(&dom.name) || not_before.get(&dom.name).is_some_and(|t| Instant::now() < *t) {
                continue;
            }
            let due = match due_now(&zfs, dom).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(domain = %dom.name, "reading snapshots: {e:#}");
                    not_before.insert(dom.name.clone(), Instant::now() + RETRY_AFTER);
                    continue;
                }
            };
            if due.is_empty() {
                continue;
            }
            not_before.insert(dom.name.clone(), Instant::now() + RETRY_AFTER);
            let (cfg, dom, zfs, shared, slots) = (cfg.clone(), dom.clone(), zfs.clone(), shared.clone(), slots.clone());
            let name = dom.name.clone();
            jobs.insert(
                name,
                tokio::spawn(async move {
                    let Ok(_slot) = slots.acquire().await else { return };
                    job(&cfg, &dom, &zfs, due, &shared).await;
                }),
            );
        }
        let sleep = next_wake(&cfg);
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = hup.recv() => match Config::load(config_path) {
                Ok(new) => {
                    tracing::info!(domains = new.domains.len(), "configuration reloaded");
                    if new.max_parallel != cfg.max_parallel {
                        slots = Arc::new(Semaphore::new(new.max_parallel));
                    }
                    cfg = Arc::new(new);
                    *shared_cfg.write().expect("config lock") = cfg.clone();
                    not_before.clear();
                }
                Err(e) => tracing::error!("reload refused, the previous configuration stays: {}", error_chain(&e)),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    jobs.retain(|_, j| !j.is_finished());
    tracing::info!(running = jobs.len(), "stopping: waiting for running jobs");
    for (_, j) in jobs {
        let _ = j.await;
    }
    // And the jobs started over D-Bus: each ends with its guest thawed and resumed.
    tracing::info!("stopping: waiting for D-Bus jobs");
    let _all_done = dbus_jobs.write().await;
    tracing::info!("vmsnap daemon stopped");
    Ok(())
}

/// The periods due for `dom` now, from its snapshots in ZFS.
async fn due_now(zfs: &Zfs, dom: &DomainConfig) -> Result<BTreeSet<Period>, crate::zfs::ZfsError> {
    if !dom.policy.autosnap {
        return Ok(BTreeSet::new());
    }
    let cat = catalog::load(zfs, dom).await?;
    let mut newest: PerPeriod<Option<i64>> = PerPeriod([None; 6]);
    for e in &cat.entries {
        for p in &e.snap.periods {
            if newest.get(*p).is_none_or(|t| t < e.snap.created) {
                newest.set(*p, Some(e.snap.created));
            }
        }
    }
    Ok(schedule::due(&dom.policy, &newest, &Local::now()))
}

/// How long to sleep: until the next preferred time of any domain, at most a minute.
fn next_wake(cfg: &Config) -> Duration {
    let now = Local::now();
    cfg.domains
        .values()
        .filter_map(|d| schedule::next_preferred(&d.policy, &now))
        .map(|t| (t - now).to_std().unwrap_or_default() + Duration::from_millis(200))
        .min()
        .unwrap_or(MAX_SLEEP)
        .min(MAX_SLEEP)
}

/// One scheduled snapshot of `dom` serving `due`, with its scripts, then pruning.
async fn job(cfg: &Config, dom: &DomainConfig, zfs: &Zfs, due: BTreeSet<Period>, shared: &Mutex<Shared>) {
    let policy = &dom.policy;
    let at = SystemTime::now();
    let label = due.iter().next_back().map_or("manual", |p| p.as_str());
    let name = naming::snapshot_name(at, label);
    let periods: Vec<Period> = due.iter().copied().collect();
    let opts = SnapshotOptions {
        strategy: policy.strategy,
        memory: due.iter().any(|p| policy.ram_with.contains(p)).then_some(policy.ram_mode),
        label: label.to_owned(),
        periods: periods.clone(),
        name_at: Some(at),
        ..SnapshotOptions::default()
    };
    // Like sanoid, scripts are told dataset names (the datasets under the domain's disks).
    let targets: Vec<String> = match crate::engine::disks::datasets_by_pool(zfs, &dom.disks).await {
        Ok(by_pool) => by_pool.into_values().flatten().map(|d| d.to_string()).collect(),
        Err(e) => {
            tracing::warn!(domain = %dom.name, "scripts get no SANOID_TARGETS: {e}");
            Vec::new()
        }
    };
    let env = |script: &'static str| ScriptEnv {
        domain: dom.name.clone(),
        script,
        targets: targets.clone(),
        snapnames: vec![name.clone()],
        types: periods.iter().map(|p| p.as_str().to_owned()).collect(),
    };
    let mut pre_failed = false;
    if let Some(s) = &policy.scripts.pre_snapshot {
        if let Err(e) = scripts::run(s, &env("pre"), policy.scripts.timeout).await {
            tracing::warn!(domain = %dom.name, "pre_snapshot_script failed: {e}");
            pre_failed = true;
        }
    }
    let result = if pre_failed && policy.scripts.no_inconsistent_snapshot {
        Err("pre_snapshot_script failed and no_inconsistent_snapshot is set: snapshot skipped".to_owned())
    } else {
        engine::snapshot(cfg, dom, &opts, zfs, &|_| {}).await.map_err(|e| error_chain(&e))
    };
    if let Some(s) = &policy.scripts.post_snapshot {
        if !pre_failed || policy.scripts.force_post {
            if let Err(e) = scripts::run(s, &env("post"), policy.scripts.timeout).await {
                tracing::warn!(domain = %dom.name, "post_snapshot_script failed: {e}");
            }
        }
    }
    let now = chrono::Utc::now().timestamp();
    let attempt = match &result {
        Ok(r) => {
            tracing::info!(
                domain = %dom.name,
                snapshot = %r.name,
                consistency = r.consistency,
                freeze_ms = r.freeze_ms.unwrap_or(0.0),
                pause_ms = r.pause_ms.unwrap_or(0.0),
                ram = r.ram_dump.is_some(),
                "snapshot taken"
            );
            for w in &r.warnings {
                tracing::warn!(domain = %dom.name, snapshot = %r.name, "{w}");
            }
            Attempt { at: now, ok: true, snapshot: Some(r.name.clone()), consistency: Some(r.consistency.to_owned()), error: None }
        }
        Err(e) => {
            tracing::error!(domain = %dom.name, snapshot = %name, "snapshot failed: {e}");
            Attempt { at: now, ok: false, snapshot: None, consistency: None, error: Some(e.clone()) }
        }
    };
    let mut destroyed = 0;
    if policy.autoprune {
        match prune::prune(cfg, dom, zfs, now, false).await {
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
    record(cfg, dom, shared, &result.map(|r| (r.consistency, r.freeze_ms, r.pause_ms)), attempt, destroyed);
}

type Outcome<'a> = Result<(&'a str, Option<f64>, Option<f64>), String>;

fn record(cfg: &Config, dom: &DomainConfig, shared: &Mutex<Shared>, outcome: &Outcome<'_>, attempt: Attempt, destroyed: u64) {
    let mut s = shared.lock().expect("no job panics while holding the lock");
    let m = s.metrics.domain(&dom.name);
    m.pruned += destroyed;
    match outcome {
        Ok((consistency, freeze, pause)) => {
            *m.taken.entry((*consistency).to_owned()).or_default() += 1;
            m.last_success = Some(attempt.at);
            if let Some(f) = freeze {
                m.freeze_ms.observe(*f);
            }
            if let Some(p) = pause {
                m.pause_ms.observe(*p);
            }
        }
        Err(_) => {
            m.failed += 1;
            m.last_failure = Some(attempt.at);
        }
    }
    s.status.domains.insert(dom.name.clone(), attempt);
    if let Err(e) = s.status.save(&cfg.state_dir) {
        tracing::error!("saving {}: {e}", Status::path(&cfg.state_dir).display());
    }
    if let Some(path) = &cfg.metrics_file {
        if let Err(e) = s.metrics.write(path) {
            tracing::error!("writing metrics to {}: {e}", path.display());
        }
    }
}

/// `a: b: c` from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
