//! `vmsnap daemon`: takes each enrolled domain's due snapshots and prunes after them,
//! replicates them (after each scheduled snapshot, or on a target's own `every_minutes`), and
//! verifies them when the policy has `verify_every`.
//!
//! Each tick (at the next preferred time of any policy, and at least once a minute) it reads
//! every domain's snapshots back from ZFS and asks [`crate::retention::schedule::due`] what is due; a due
//! domain gets a snapshot job from [`jobs`], the layer D-Bus and the CLI use too (one job per
//! domain, `max_parallel`, scripts, pruning after, status and metrics). SIGHUP reloads the config
//! (a bad one is refused and the old one keeps running); SIGTERM/SIGINT stop scheduling and wait
//! for every running job, whoever started it, which ends with its guest thawed and resumed.
//! Journals left by a crash are recovered at start-up. The domains are the config's plus those
//! registered by the libvirt hook or over D-Bus ([`crate::daemon::registry`]), which it also serves.

pub mod check;
pub mod dbus;
pub mod jobs;
pub(crate) mod metrics;
pub mod registry;
pub(crate) mod scripts;
pub mod status;

use crate::config::policy::{PerPeriod, Period, Policy};
use crate::config::{Config, ConfigError, DomainConfig};
use crate::daemon::registry::{all_domains, Registry};
use crate::engine::SnapshotOptions;
use crate::retention::catalog;
use crate::retention::schedule;
use crate::zfs::Zfs;
use chrono::Local;
use dbus::Bus;
pub use jobs::error_chain;
use jobs::{Jobs, Origin, Request};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("refusing to start")]
    Config(#[from] ConfigError),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("serving {name} on D-Bus (is another vmsnap daemon running? see `--bus`)", name = crate::daemon::dbus::BUS_NAME)]
    DBus(#[source] zbus::Error),
}

/// The longest the daemon sleeps between looks at the schedule.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// After a failed job (or a failed look at its snapshots), the domain is not tried again
/// sooner than this.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Runs until SIGTERM or SIGINT, serving D-Bus on `bus` unless it is `None`.
pub async fn run(config_path: &Path, zfs: Zfs, bus: Option<Bus>) -> Result<(), DaemonError> {
    let mut cfg = Arc::new(Config::load(config_path)?);
    let jobs = Jobs::new(cfg.clone(), Arc::new(zfs), true);
    // D-Bus is served from the start (the hook must never wait), and jobs asked for before the
    // recovery below is over wait for it.
    jobs.hold_until_recovered();
    let _bus = match &bus {
        Some(b) => Some(dbus::serve(b, jobs.clone()).await.map_err(DaemonError::DBus)?),
        None => None,
    };
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    tracing::info!(config = %config_path.display(), domains = cfg.domains.len(), "vmsnap daemon starting");
    // What `vmsnap recover` does: snapshot journals, restores, copies, mounts, woken-frozen guests.
    match crate::recovery::everything(&cfg, &jobs.zfs()).await {
        Ok(reports) => {
            reports.iter().for_each(|r| tracing::warn!(domain = %r.domain, "recovered an interrupted operation: {:?}", r.actions))
        }
        Err(e) => tracing::error!("recovering interrupted operations: {}", crate::error::chain(&e)),
    }
    jobs.recovered();
    for (name, why) in Registry::new(&cfg.state_dir).drop_stale() {
        tracing::warn!(domain = %name, "unregistered: {why}");
    }
    let mut not_before: HashMap<String, Instant> = HashMap::new();
    // When a replication to each (domain, target) with its own schedule was last tried.
    let mut replication_tried: HashMap<(String, String), Tried> = HashMap::new();
    // When a scheduled verification of each domain was last started.
    let mut verify_tried: HashMap<String, Instant> = HashMap::new();
    loop {
        let domains = all_domains(&cfg, &Registry::new(&cfg.state_dir));
        // Schedules of domains or targets gone since (a reload, an unregistered domain).
        replication_tried.retain(|(domain, target), _| {
            domains.iter().any(|d| &d.name == domain && d.policy.replicate_to.contains(target))
                && cfg.targets.get(target).is_some_and(|t| t.every.is_some())
        });
        for dom in &domains {
            start_due_replication(&jobs, &cfg, dom, &mut replication_tried);
            start_due_verify(&jobs, dom, &mut verify_tried).await;
            if jobs.running_for(&dom.name).is_some() || not_before.get(&dom.name).is_some_and(|t| Instant::now() < *t) {
                continue;
            }
            let due = match due_now(&jobs.zfs(), dom).await {
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
            not_before.insert(dom.name.clone(), Instant::now() + hold_back(&dom.policy, &Local::now()));
            if let Err(e) = jobs.start(dom.clone(), Request::Snapshot(scheduled(dom, &due)), Origin::Schedule) {
                tracing::warn!(domain = %dom.name, "scheduled snapshot not started: {e}");
            }
        }
        let busy = |d: &str| jobs.replicating(d).is_some();
        let sleep = next_wake(&cfg).min(next_replication(&cfg, &replication_tried, busy, Instant::now()));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = hup.recv() => match Config::load(config_path) {
                Ok(new) => {
                    tracing::info!(domains = new.domains.len(), "configuration reloaded");
                    cfg = Arc::new(new);
                    jobs.set_config(cfg.clone());
                    not_before.clear();
                }
                Err(e) => tracing::error!("reload refused, the previous configuration stays: {}", error_chain(&e)),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Every job, whoever started it, ends with its guest thawed and resumed.
    tracing::info!("stopping: waiting for running jobs");
    jobs.shutdown(false).await;
    tracing::info!("vmsnap daemon stopped");
    Ok(())
}

/// A replication to a target with its own schedule was tried `at`: due again `every` after it
/// started, or `RETRY_AFTER` after it could not (a replication by hand held the domain), read
/// against the configuration in force (a reload that shortens `every_minutes` counts at once).
#[derive(Clone, Copy)]
struct Tried {
    at: Instant,
    started: bool,
}

impl Tried {
    fn due(self, every: Duration) -> Instant {
        self.at + if self.started { every } else { RETRY_AFTER.min(every) }
    }
}

/// Replication to the targets of `dom` that have their own schedule (`every_minutes`), when
/// due (at start-up: at once, to catch up) and no replication of the domain runs.
fn start_due_replication(jobs: &Jobs, cfg: &Config, dom: &DomainConfig, tried: &mut HashMap<(String, String), Tried>) {
    if jobs.replicating(&dom.name).is_some() {
        return;
    }
    let now = Instant::now();
    let due: Vec<String> = dom
        .policy
        .replicate_to
        .iter()
        .filter_map(|t| Some((t, cfg.targets.get(t)?.every?)))
        .filter(|(t, every)| tried.get(&(dom.name.clone(), (*t).clone())).is_none_or(|last| last.due(*every) <= now))
        .map(|(t, _)| t.clone())
        .collect();
    if due.is_empty() {
        return;
    }
    let request = Request::Replicate { targets: due.clone(), opts: crate::replicate::Options::default() };
    let started = match jobs.start(dom.clone(), request, Origin::Schedule) {
        Ok(job) => {
            tracing::info!(domain = %dom.name, job = job.id, targets = ?due, "scheduled replication started");
            true
        }
        Err(e) => {
            tracing::info!(domain = %dom.name, "scheduled replication not started now: {e}");
            false
        }
    };
    for t in due {
        tried.insert((dom.name.clone(), t), Tried { at: now, started });
    }
}

/// `vmsnap verify` of `dom` when its policy has `verify_every` and no verification (any
/// outcome, read from its snapshots' `vmsnap:verified`) is that recent; tried at most once per
/// `verify_every` by this daemon (in its own lane: the domain's snapshots go on meanwhile).
async fn start_due_verify(jobs: &Jobs, dom: &DomainConfig, tried: &mut HashMap<String, Instant>) {
    let every = dom.policy.verify_every;
    if every == 0 || tried.get(&dom.name).is_some_and(|t| t.elapsed().as_secs() < every) {
        return;
    }
    let cat = match catalog::load(&jobs.zfs(), dom).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(domain = %dom.name, "reading snapshots for the verification schedule: {e}");
            return;
        }
    };
    let now = chrono::Utc::now().timestamp();
    if !verify_due(cat.entries.iter().filter_map(|e| e.verified.as_deref()), every, now) {
        return;
    }
    tried.insert(dom.name.clone(), Instant::now());
    match jobs.start(dom.clone(), Request::Verify, Origin::Schedule) {
        Ok(job) => tracing::info!(domain = %dom.name, job = job.id, "scheduled verification started"),
        Err(e) => tracing::info!(domain = %dom.name, "scheduled verification not started now: {e}"),
    }
}

/// Whether a verification is due: none of `verified` (`vmsnap:verified` values, `<unix time>
/// ok|failed: …`) is newer than `every` seconds before `now`.
fn verify_due<'a>(verified: impl Iterator<Item = &'a str>, every: u64, now: i64) -> bool {
    let newest = verified.filter_map(|v| v.split_once(' ')?.0.parse::<i64>().ok()).max();
    newest.is_none_or(|t| now.saturating_sub(t) >= every as i64)
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

/// After a scheduled snapshot starts, the domain is not looked at again for this long: its
/// snapshot makes it not due, and a failed one is tried again at the policy's next preferred
/// time or after `RETRY_AFTER`, whichever comes first. (A fixed minute would make the next
/// minute's snapshot of a one-minute period wait for the one after.)
fn hold_back<Tz: chrono::TimeZone>(policy: &Policy, now: &chrono::DateTime<Tz>) -> Duration {
    let next = schedule::next_preferred(policy, now).and_then(|t| (t - now.clone()).to_std().ok());
    next.map_or(RETRY_AFTER, |d| d.min(RETRY_AFTER))
}

/// How long until a target's own schedule (`every_minutes`) makes a replication due: without
/// it the daemon would look only at its next snapshot time or after `MAX_SLEEP`, and a target
/// replicated every minute would wait two. A domain whose replication runs (`replicating`) is
/// looked at again after it (within `MAX_SLEEP`).
fn next_replication(cfg: &Config, tried: &HashMap<(String, String), Tried>, replicating: impl Fn(&str) -> bool, now: Instant) -> Duration {
    tried
        .iter()
        .filter(|((domain, _), _)| !replicating(domain))
        .filter_map(|((_, target), last)| Some(last.due(cfg.targets.get(target)?.every?)))
        .map(|due| due.saturating_duration_since(now) + Duration::from_millis(200))
        .min()
        .unwrap_or(MAX_SLEEP)
}

/// The options of a scheduled snapshot of `dom` serving `due`: labelled by its longest
/// period, with RAM when one of them is in the policy's `ram_with`.
fn scheduled(dom: &DomainConfig, due: &BTreeSet<Period>) -> SnapshotOptions {
    let policy = &dom.policy;
    SnapshotOptions {
        strategy: policy.strategy,
        memory: due.iter().any(|p| policy.ram_with.contains(p)).then_some(policy.ram_mode),
        label: due.iter().next_back().map_or("manual", |p| p.as_str()).to_owned(),
        periods: due.iter().copied().collect(),
        name_at: Some(SystemTime::now()),
        ..SnapshotOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::{hold_back, next_replication, verify_due, Tried, MAX_SLEEP, RETRY_AFTER};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    #[test]
    fn a_failed_snapshot_waits_for_its_next_slot_or_a_minute() {
        use chrono::TimeZone;
        let at = chrono::Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 40).unwrap();
        let mut policy = crate::config::policy::Policy::default();
        // Hourly and coarser: the next slot is far, a minute it is.
        assert_eq!(hold_back(&policy, &at), RETRY_AFTER);
        // Every minute: until the next minute, not past it.
        policy.keep.0[0] = 4;
        policy.frequent_period = 1;
        assert_eq!(hold_back(&policy, &at), Duration::from_secs(20));
        policy.frequent_period = 15;
        assert_eq!(hold_back(&policy, &at), RETRY_AFTER);
    }

    #[test]
    fn the_daemon_wakes_when_a_targets_schedule_is_due() {
        let cfg = |every: u32| {
            let text = format!(
                "[target.offsite]\nhost = \"backup\"\nevery_minutes = {every}\n[target.manual]\nhost = \"other\"\n\
                 [domain.web]\nqmp = \"/run/web.qmp\"\nreplicate_to = [\"offsite\", \"manual\"]\n"
            );
            crate::config::Config::parse(&text, std::path::Path::new("/x.toml")).unwrap()
        };
        let now = Instant::now();
        let key = |d: &str, t: &str| (d.to_owned(), t.to_owned());
        let mut tried = HashMap::new();
        assert_eq!(next_replication(&cfg(10), &tried, |_| false, now), MAX_SLEEP, "nothing tried: the longest sleep");
        let ago = |s: u64| now - Duration::from_secs(s);
        tried.insert(key("web", "offsite"), Tried { at: ago(590), started: true });
        // A target without a schedule of its own is never waited for.
        tried.insert(key("web", "manual"), Tried { at: ago(5), started: true });
        let wake = next_replication(&cfg(10), &tried, |_| false, now);
        assert!(wake > Duration::from_secs(10) && wake < Duration::from_secs(11), "{wake:?}");
        // A reload that shortens the schedule counts at once.
        assert!(next_replication(&cfg(5), &tried, |_| false, now) < Duration::from_secs(1));
        // One that could not start is tried again after RETRY_AFTER, not its whole period.
        tried.insert(key("web", "offsite"), Tried { at: ago(40), started: false });
        let wake = next_replication(&cfg(10), &tried, |_| false, now);
        assert!(wake > Duration::from_secs(20) && wake < Duration::from_secs(21), "{wake:?}");
        // A domain whose replication runs is not waited for (once due, it would spin).
        tried.insert(key("web", "offsite"), Tried { at: ago(900), started: true });
        assert_eq!(next_replication(&cfg(10), &tried, |d| d == "web", now), MAX_SLEEP);
    }

    #[test]
    fn a_verification_is_due_when_none_is_recent() {
        let day = 86_400;
        assert!(verify_due([].into_iter(), day, 10 * day as i64));
        assert!(!verify_due(["863000 ok: RAM dump sha256", "12 failed: x"].into_iter(), day, 864_000));
        // A failed one counts as tried: the next is a period later, not every minute.
        assert!(!verify_due(["864000 failed: sha256"].into_iter(), day, 864_100));
        assert!(verify_due(["777600 ok: x", "garbage", ""].into_iter(), day, 864_000));
    }
}
