//! `vmsnap verify --boot`: proves a snapshot starts. A scratch copy of it (clones, its own name
//! `vmsnap-verify-<domain>`, UUID, sockets and nvram, network links down: see [`super::clone`];
//! a config domain's copy is a `[domain.vmsnap-verify-<domain>]` started through its `start`)
//! is resumed from the snapshot's RAM dump when it has one (the dump checked against its sha256
//! first), booted from its disks otherwise, until its guest agent answers; then it is removed.
//! The outcome is recorded on the snapshot (`vmsnap:verified`, as the dump check's is). A crash
//! in between leaves a journal `vmsnap recover` undoes, scratch copy included.

use super::clone::{self, Start, SCRATCH_PREFIX};
use super::steps::Progress;
use super::verify::Verified;
use super::RestoreError;
use crate::config::Config;
use crate::libvirt::virsh;
use crate::model::prop;
use crate::qemu::qga::{Qga, Timeouts};
use crate::zfs::Zfs;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a booted or resumed copy may take to answer its agent, unless told (`--boot-timeout`).
pub const AGENT_WAIT: Duration = Duration::from_secs(600);

/// Boots a copy of `snapshot` (default: the domain's newest) and records the outcome. `Err` only
/// when no verdict could be reached (no such snapshot, a config domain without `start`, a copy
/// left by an earlier run);
/// a backup that does not start is an `Ok` with `ok: false` and the reason.
pub async fn boot(
    cfg: &Config,
    zfs: &Zfs,
    domain: &str,
    snapshot: Option<&str>,
    agent_wait: Duration,
    progress: Progress,
) -> Result<Verified, RestoreError> {
    if cfg.domains.get(domain).is_some_and(|d| d.start.is_empty() || d.qga.is_none()) {
        return Err(RestoreError::BadName(format!(
            "--boot: config domain {domain} needs `start` (how vmsnap starts its QEMU) and `qga` (whose answer proves it started)"
        )));
    }
    let scratch_name = format!("{SCRATCH_PREFIX}{domain}");
    if !crate::config::valid_domain_name(&scratch_name) {
        return Err(RestoreError::BadName(format!("--boot: the domain name {domain} is too long for a scratch copy's ({scratch_name})")));
    }
    let mine = super::units(zfs).await?.remove(domain).unwrap_or_default();
    let snapshot = match snapshot {
        Some(s) => s.to_owned(),
        // vmsnap's names start with the time: the last by name is the newest.
        None => mine.keys().next_back().cloned().ok_or_else(|| RestoreError::NoSuchSnapshot {
            domain: domain.to_owned(),
            snapshot: "(the newest)".into(),
            known: "none".into(),
        })?,
    };
    let Some((members, props)) = mine.get(&snapshot) else {
        return Err(RestoreError::NoSuchSnapshot {
            domain: domain.to_owned(),
            snapshot,
            known: mine.keys().rev().take(5).cloned().collect::<Vec<_>>().join(", "),
        });
    };
    let start = if props.contains_key(&prop::RAM_DUMP) { Start::Resume } else { Start::Boot };
    let t = Instant::now();
    let verdict = match copy_and_wait(cfg, zfs, domain, &snapshot, start, agent_wait, &progress).await {
        Ok((detail, cleanup)) => {
            let failed: Vec<&String> = cleanup.iter().filter(|l| l.starts_with("could not")).collect();
            for line in &failed {
                tracing::warn!(domain, snapshot, "verify --boot clean-up: {line}");
            }
            (
                true,
                format!(
                    "{detail}{}",
                    if failed.is_empty() {
                        String::new()
                    } else {
                        format!(" (clean-up: {})", failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; "))
                    }
                ),
            )
        }
        Err(Verdict::Failed(why)) => (false, why),
        Err(Verdict::NoVerdict(e)) => return Err(e),
    };
    let (ok, detail) = verdict;
    tracing::info!(domain, snapshot, ok, seconds = t.elapsed().as_secs_f64(), "verify --boot: {detail}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let word: String = format!("{now} {}: boot: {detail}", if ok { "ok" } else { "failed" }).chars().take(1000).collect();
    for m in members {
        zfs.set_property(&m.to_string(), &prop::VERIFIED, &word).await?;
    }
    Ok(Verified { domain: domain.to_owned(), snapshot, datasets: members.len(), ok, detail })
}

enum Verdict {
    /// The backup did not start: recorded on the snapshot.
    Failed(String),
    /// Nothing was learnt about the backup (the copy could not be made at all).
    NoVerdict(RestoreError),
}

impl From<RestoreError> for Verdict {
    fn from(e: RestoreError) -> Self {
        match e {
            // The snapshot's own: a dump that is not the one written, or this QEMU cannot load,
            // or a copy that would not start.
            RestoreError::BadDump(_) | RestoreError::NoDump { .. } | RestoreError::CannotResume { .. } | RestoreError::Step { .. } => {
                Verdict::Failed(e.to_string())
            }
            other => Verdict::NoVerdict(other),
        }
    }
}

/// The copy made and started, its agent awaited, the copy removed (whatever happened once it
/// was made): (what was proven, the clean-up's lines).
async fn copy_and_wait(
    cfg: &Config,
    zfs: &Zfs,
    domain: &str,
    snapshot: &str,
    start: Start,
    agent_wait: Duration,
    progress: &Progress,
) -> Result<(String, Vec<String>), Verdict> {
    let scratch_name = &format!("{SCRATCH_PREFIX}{domain}");
    let plan = clone::plan_copy(cfg, zfs, domain, snapshot, scratch_name, false, start).await?;
    let t = Instant::now();
    let (report, scratch) = clone::scratch(cfg, zfs, plan, progress.clone()).await?;
    progress(&format!("waiting for {scratch_name}'s guest agent"));
    // A libvirt copy has a UUID; a config domain's copy is a `[domain.NEW]` without one.
    let libvirt = !report.uuid.is_empty();
    let answered = wait_agent(scratch_name, report.agent.as_deref(), libvirt, agent_wait).await;
    let took = t.elapsed().as_secs_f64();
    progress(&format!("removing {scratch_name}"));
    let cleanup = scratch.remove(zfs).await.map_err(Verdict::NoVerdict)?;
    let how = match &report.resumed_from {
        Some(d) => format!("resumed a copy from its RAM dump (sha256 {}… checked)", &d.sha256[..16]),
        None => "booted a copy from its disks".to_owned(),
    };
    match answered {
        Ok(()) => Ok((format!("{how}; its guest agent answered {took:.1} s after the copy started"), cleanup)),
        Err(why) => Err(Verdict::Failed(format!("{how}, but {why}"))),
    }
}

/// Pings the copy's agent until it answers: through vmsnap's socket when it has one (an enrolled
/// domain's copy, a config domain's), else through libvirt's.
async fn wait_agent(name: &str, qga: Option<&Path>, libvirt: bool, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if libvirt && virsh::domstate(name).ok().flatten().is_some_and(|s| s != "running") {
            return Err(format!(
                "the copy stopped before its agent answered ({})",
                virsh::domstate(name).ok().flatten().unwrap_or_default()
            ));
        }
        let res = match qga {
            Some(path) => ping(path).await,
            None => tokio::task::spawn_blocking({
                let name = name.to_owned();
                move || virsh::run(&["qemu-agent-command", "--timeout", "10", "--", &name, r#"{"execute":"guest-ping"}"#]).map(drop)
            })
            .await
            .expect("virsh runs")
            .map_err(|e| e.to_string()),
        };
        match res {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("its guest agent did not answer within {} s ({last})", wait.as_secs()))
}

async fn ping(path: &Path) -> Result<(), String> {
    let timeouts = Timeouts { sync: Duration::from_secs(10), ..Timeouts::default() };
    let mut a = Qga::connect(path, timeouts).await.map_err(|e| e.to_string())?;
    a.ping().await.map_err(|e| e.to_string())
}

/// [`boot`] for `only` (or every domain with vmsnap snapshots here that vmsnap can start: libvirt
/// domains, config domains with `start` and `qga`), one verdict each, in name order.
pub async fn boot_all(
    cfg: &Config,
    zfs: &Zfs,
    only: Option<&str>,
    snapshot: Option<&str>,
    agent_wait: Duration,
    progress: Progress,
) -> Result<Vec<Verified>, RestoreError> {
    let domains: Vec<String> = match only {
        Some(d) => vec![d.to_owned()],
        None => super::units(zfs)
            .await?
            .into_keys()
            .filter(|d| cfg.domains.get(d).is_none_or(|c| !c.start.is_empty() && c.qga.is_some()))
            .collect(),
    };
    let mut out = Vec::new();
    for d in domains {
        out.push(boot(cfg, zfs, &d, snapshot, agent_wait, progress.clone()).await?);
    }
    Ok(out)
}
