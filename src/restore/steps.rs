//! The restore's steps, top to bottom: take the domain's lock; check the domain is stopped and
//! (with `--resume`) that the dump is the one written; journal the plan; roll back each dataset;
//! put the nvram back; redefine the domain from the snapshot's XML; start it from its RAM dump;
//! thaw a guest that was saved frozen; set its clock from the host's.

use super::journal::Journal;
use super::{dump, ensure_stopped, Plan, RestoreError};
use crate::config::Config;
use crate::engine::lock::DomainLock;
use crate::libvirt::virsh;
use crate::model::RamCompress;
use crate::qemu::qga::{Qga, Timeouts};
use crate::zfs::{SnapshotName, Zfs};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the steps say what they do (a terminal line, a job's progress).
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub domain: String,
    pub snapshot: String,
    pub rolled_back: Vec<String>,
    /// Newer snapshots and bookmarks the rollback destroyed (`--destroy-newer`).
    pub destroyed: Vec<String>,
    /// Their RAM dumps, deleted with them.
    pub deleted_dumps: Vec<PathBuf>,
    pub nvram: Option<PathBuf>,
    pub redefined: bool,
    /// The dump it resumed from, checked (sha256, header) first.
    pub resumed_from: Option<dump::DumpCheck>,
    /// A guest saved frozen was thawed after the resume: the filesystems the agent's thaw
    /// counted (0 when an earlier attempt thawed it but answered too late; -1: through libvirt).
    pub thawed: Option<i64>,
    /// The guest clock was set from the host's after the resume.
    pub clock_set: bool,
    /// The guest clock minus the host's right after it was set (seconds).
    pub clock_offset_s: Option<f64>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// How long a resumed guest may take to answer its agent (nested TCG is slow to wake).
const AGENT_WAIT: Duration = Duration::from_secs(180);

/// Runs the plan. Refuses, changing nothing, when the domain runs, another operation holds it, an
/// earlier restore did not finish, or (`--resume`) the dump is not the one the snapshot recorded.
pub async fn apply(cfg: &Config, zfs: &Zfs, plan: Plan, progress: Progress) -> Result<RestoreReport, RestoreError> {
    let t = Instant::now();
    let domain = plan.domain.clone();
    let _locks = locks(cfg, &domain)?;
    // What a plan lists as refused is refused here, from the state as it is now (each
    // refusal's own error).
    ensure_stopped(&domain, plan.manager, cfg.domains.get(&domain)).await?;
    super::ensure_unmounted(cfg, &domain)?;
    // The plan was read before the locks: what a rollback destroys must still be what it said.
    let unit: Vec<SnapshotName> = plan.snapshots.iter().filter_map(|s| SnapshotName::new(s).ok()).collect();
    let newer = super::newer_than(zfs, &unit).await?;
    if !newer.is_empty() && !plan.destroy_newer {
        return Err(RestoreError::NewerSnapshots { snapshot: plan.snapshot.clone(), newer });
    }

    if newer != plan.newer {
        return Err(RestoreError::Changed {
            domain,
            why: format!("snapshots newer than {} changed since the plan: {}", plan.snapshot, newer.join(", ")),
        });
    }
    let checked = match &plan.resume {
        None => None,
        Some(r) => Some(check_dump(r, &progress).await?),
    };
    let mut journal = Journal::create(&cfg.state_dir, plan)?;
    let mut report = RestoreReport {
        domain: domain.clone(),
        snapshot: journal.state.plan.snapshot.clone(),
        rolled_back: Vec::new(),
        destroyed: if journal.state.plan.destroy_newer { journal.state.plan.newer.clone() } else { Vec::new() },
        deleted_dumps: Vec::new(),
        nvram: None,
        redefined: false,
        resumed_from: None,
        thawed: None,
        clock_set: false,
        clock_offset_s: None,
        warnings: journal.state.plan.warnings.clone(),
        seconds: 0.0,
    };
    let actions = complete(zfs, &mut journal, &progress).await?;
    report.rolled_back = journal.state.rolled_back.clone();
    report.nvram = journal.state.nvram_written.then(|| journal.state.plan.nvram.as_ref().map(|n| n.1.clone())).flatten();
    report.redefined = journal.state.redefined;
    if journal.state.dumps_removed {
        report.deleted_dumps = journal.state.plan.newer_dumps.clone();
    }
    tracing::debug!(?actions, "restored disks");
    if let (Some(r), Some(checked)) = (journal.state.plan.resume.clone(), checked) {
        journal.state.resume_started = true;
        journal.record("restore_resume_started")?;
        let agent = match journal.state.plan.manager {
            super::Manager::Libvirt => {
                progress("starting the domain from its RAM dump (virsh restore)");
                if r.compress == RamCompress::Zstd {
                    // It may have to be written raw for this libvirt: a crash then leaves it to recovery.
                    journal.state.image = Some(raw_image(cfg, &domain));
                    journal.record("restore_image_intended")?;
                }
                resume_libvirt(cfg, &domain, &r.dump, r.compress, &progress).await.map_err(|why| step(&journal, "virsh restore", why))?;
                Agent::of_libvirt(&domain)
            }
            super::Manager::Config => {
                let dom = cfg.domains.get(&domain).ok_or_else(|| step(&journal, "start QEMU", "no longer in the configuration".into()))?;
                progress(&format!("starting {}'s QEMU from its RAM dump ({} … -incoming defer)", domain, dom.start[0]));
                super::start_qemu::resume(cfg, dom, &r.dump).await.map_err(|why| step(&journal, "start QEMU", why))?;
                dom.qga.clone().map_or(Agent::None, Agent::Socket)
            }
        };
        report.resumed_from = Some(checked);
        journal.finish()?;
        let (thawed, clock_set, warnings) = after_resume(&domain, &agent, r.quiesced, &progress).await;
        report.thawed = thawed;
        report.clock_set = clock_set;
        if let (true, Agent::Socket(qga)) = (clock_set, &agent) {
            report.clock_offset_s = settle_clock(qga).await;
        }
        report.warnings.extend(warnings);
    } else {
        journal.finish()?;
    }
    report.seconds = t.elapsed().as_secs_f64();
    Ok(report)
}

/// The dump a resume starts from, read whole against the sha256 the snapshot recorded (before
/// anything changes); progress each second.
pub(super) async fn check_dump(r: &super::ResumePlan, progress: &Progress) -> Result<dump::DumpCheck, RestoreError> {
    progress(&format!("checking RAM dump {} (sha256)", r.dump.display()));
    let (path, want, p) = (r.dump.clone(), r.sha256.clone(), progress.clone());
    let mut last = Instant::now();
    let check = tokio::task::spawn_blocking(move || {
        dump::check(&path, want.as_deref(), |n| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                p(&format!("  {} MiB checked", n >> 20));
            }
        })
    });
    Ok(check.await.expect("the dump check does not panic")?)
}

/// The domain's lock (no snapshot or prune meanwhile) and its replication lock (no send).
fn locks(cfg: &Config, domain: &str) -> Result<(DomainLock, DomainLock), RestoreError> {
    let busy = |e| RestoreError::Busy { domain: domain.to_owned(), source: Box::new(e) };
    Ok((DomainLock::acquire(&cfg.state_dir, domain).map_err(busy)?, DomainLock::replication(&cfg.state_dir, domain).map_err(busy)?))
}

fn step(journal: &Journal, step: &'static str, why: String) -> RestoreError {
    RestoreError::Step { domain: journal.state.plan.domain.clone(), snapshot: journal.state.plan.snapshot.clone(), step, why }
}

/// The disk half, from wherever the journal says it stopped: each rollback not yet recorded,
/// the nvram, the definition. Each fact is journaled right after its step.
async fn complete(zfs: &Zfs, journal: &mut Journal, progress: &Progress) -> Result<Vec<String>, RestoreError> {
    let mut actions = Vec::new();
    let plan = journal.state.plan.clone();
    for s in &plan.snapshots {
        if journal.state.rolled_back.contains(s) {
            continue;
        }
        progress(&format!("rolling back {s}"));
        let snap = SnapshotName::new(s).map_err(|e| step(journal, "rollback", e.to_string()))?;
        zfs.rollback(&snap, plan.destroy_newer).await.map_err(|e| step(journal, "rollback", e.to_string()))?;
        journal.state.rolled_back.push(s.clone());
        journal.record("restore_rolled_back")?;
        actions.push(format!("rolled back {s}"));
    }
    if !journal.state.dumps_removed && !plan.newer_dumps.is_empty() {
        for d in &plan.newer_dumps {
            match std::fs::remove_file(d) {
                Ok(()) => actions.push(format!("deleted {} (the RAM dump of a destroyed snapshot)", d.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(step(journal, "delete newer RAM dumps", format!("{}: {e}", d.display()))),
            }
        }
        journal.state.dumps_removed = true;
        journal.record("restore_dumps_removed")?;
    }
    if let (Some((copy, home)), false) = (&plan.nvram, journal.state.nvram_written) {
        progress(&format!("nvram {} from the snapshot", home.display()));
        put_nvram(copy, home).map_err(|why| step(journal, "nvram", why))?;
        journal.state.nvram_written = true;
        journal.record("restore_nvram_written")?;
        actions.push(format!("nvram {} from the snapshot", home.display()));
    }
    if let (true, Some(xml), false) = (plan.redefine, &plan.xml, journal.state.redefined) {
        progress(&format!("virsh define {}", xml.display()));
        virsh::define(xml).map_err(|e| step(journal, "virsh define", e.to_string()))?;
        journal.state.redefined = true;
        journal.record("restore_redefined")?;
        actions.push(format!("redefined {} from the snapshot's XML", plan.domain));
    }
    Ok(actions)
}

/// Writes the snapshot's nvram over the domain's, keeping the owner and mode the domain's file
/// had (QEMU may run as another user).
fn put_nvram(copy: &Path, home: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let data = crate::fsutil::read_limited(copy, 64 << 20).map_err(|e| e.to_string())?;
    let old = std::fs::symlink_metadata(home).ok().filter(|m| m.is_file());
    let mode = old.as_ref().map_or(0o600, |m| m.mode() & 0o777);
    crate::fsutil::write_atomic(home, &data, mode).map_err(|e| e.to_string())?;
    if let Some(m) = old {
        nix::unistd::chown(home, Some(m.uid().into()), Some(m.gid().into())).map_err(|e| format!("chown {}: {e}", home.display()))?;
    }
    Ok(())
}

/// The name of the raw save image a resume writes into the RAM directory for a libvirt that
/// cannot read zstd ones (journaled, so `recover` deletes this name and no other).
fn raw_image_name(domain: &str) -> String {
    format!("restore-{domain}.save")
}

fn raw_image(cfg: &Config, domain: &str) -> PathBuf {
    cfg.ram_dir.join(raw_image_name(domain))
}

/// `virsh restore` of the dump; a zstd image this libvirt cannot read (9.0 cannot) is rewritten
/// raw into the RAM directory first, and removed after.
async fn resume_libvirt(cfg: &Config, domain: &str, dump: &Path, compress: RamCompress, progress: &Progress) -> Result<(), String> {
    let path = dump.to_owned();
    let first = tokio::task::spawn_blocking(move || virsh::restore(&path, false)).await.expect("virsh runs");
    match first {
        Ok(()) => Ok(()),
        Err(virsh::VirshError::Failed { stderr, .. }) if compress == RamCompress::Zstd && stderr.contains("save format") => {
            progress(&format!("this libvirt cannot read zstd save images ({stderr}): decompressing into {}", cfg.ram_dir.display()));
            let (src, dir, name) = (dump.to_owned(), cfg.ram_dir.clone(), raw_image_name(domain));
            let raw = tokio::task::spawn_blocking(move || dump::raw_save_image(&src, &dir, &name)).await.expect("decompression runs");
            let raw = raw.map_err(|e| e.to_string())?;
            let again = raw.clone();
            let res = tokio::task::spawn_blocking(move || virsh::restore(&again, false)).await.expect("virsh runs");
            let _ = std::fs::remove_file(&raw);
            res.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// How to reach a resumed guest's agent.
pub(super) enum Agent {
    /// vmsnap's own socket (an enrolled libvirt domain, a config domain's `qga`).
    Socket(PathBuf),
    /// Through libvirt (`virsh domfsthaw`, `domtime`).
    Libvirt,
    /// None configured.
    None,
}

impl Agent {
    /// vmsnap's socket when the libvirt domain is enrolled, else libvirt's.
    pub(super) fn of_libvirt(domain: &str) -> Self {
        let (_, qga) = crate::libvirt::enroll::sockets(domain);
        if qga.exists() {
            Agent::Socket(qga)
        } else {
            Agent::Libvirt
        }
    }
}

/// A resumed guest: thawed if it was saved frozen, its clock set from the host's (it has no idea
/// how long it slept). Failures are warnings: the guest runs either way.
pub(super) async fn after_resume(domain: &str, agent: &Agent, quiesced: bool, progress: &Progress) -> (Option<i64>, bool, Vec<String>) {
    let mut warnings = Vec::new();
    let mut thawed = None;
    let qga = match agent {
        Agent::Socket(p) => p.clone(),
        Agent::None => {
            if quiesced {
                warnings.push(format!("the guest was saved frozen and no agent socket is configured to thaw it ([domain.{domain}] qga)"));
            }
            warnings.push("the guest clock was not set: no agent socket is configured".into());
            return (thawed, false, warnings);
        }
        Agent::Libvirt => {
            if quiesced {
                match virsh::run(&["domfsthaw", "--", domain]) {
                    Ok(_) => thawed = Some(-1),
                    Err(e) => {
                        warnings.push(format!("the guest was saved frozen and could not be thawed: {e} (run `virsh domfsthaw {domain}`)"))
                    }
                }
            }
            let clock = virsh::run(&["domtime", "--now", "--", domain]);
            if let Err(e) = &clock {
                warnings.push(format!("the guest clock was not set: {e}"));
            }
            return (thawed, clock.is_ok(), warnings);
        }
    };
    progress("waiting for the guest agent");
    let deadline = Instant::now() + AGENT_WAIT;
    let patient = Timeouts { sync: Duration::from_secs(10), ..Timeouts::default() };
    let mut agent = loop {
        match Qga::connect(&qga, patient).await {
            Ok(a) => break Some(a),
            Err(e) if Instant::now() >= deadline => {
                warnings.push(format!("the guest agent did not answer within {} s: {e}", AGENT_WAIT.as_secs()));
                break None;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    if quiesced {
        drop(agent.take());
        progress("thawing the guest (it was saved frozen)");
        match crate::engine::recover::thaw(&qga).await {
            Ok(n) => thawed = Some(n),
            Err(e) => warnings.push(format!("the guest was saved frozen and could not be thawed: {e} (`vmsnap recover` thaws it)")),
        }
        agent = Qga::connect(&qga, patient).await.ok();
    }
    let mut clock_set = false;
    if let Some(mut a) = agent {
        progress("setting the guest clock from the host's");
        // A guest just resumed under heavy load can answer late: patient, then ask what it says.
        let t = Instant::now();
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(60));
        match a.execute(&qapi::qga::guest_set_time { time: Some(host_ns()) }, wait).await {
            Ok(_) => clock_set = true,
            Err(e) => match guest_offset(&qga, patient).await {
                Some(off) if off.abs() < 2.0 => {
                    clock_set = true;
                    warnings.push(format!("guest-set-time did not answer ({e}), but the guest clock is the host's ({off:+.1} s)"));
                }
                off => warnings.push(format!("the guest clock was not set: {e} (its offset from the host: {off:?} s)")),
            },
        }
        tracing::info!(domain, ms = t.elapsed().as_millis() as u64, clock_set, "guest clock after the resume");
    }
    (thawed, clock_set, warnings)
}

fn host_ns() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    i64::try_from(now).unwrap_or(i64::MAX)
}

/// The guest clock's offset from the host's after it was set. A guest slow to take the command
/// (nested TCG: over a second after a resume) lags by that delay, so the time is set again ahead
/// by the offset measured, up to three times while it is off by more than 0.25 s (the delay
/// shrinks as the guest settles). Returns the final offset (seconds).
pub(super) async fn settle_clock(qga: &Path) -> Option<f64> {
    let patient = Timeouts { sync: Duration::from_secs(10), ..Timeouts::default() };
    let mut ahead = 0f64;
    let mut off = guest_offset(qga, patient).await?;
    for _ in 0..3 {
        if off.abs() < 0.25 {
            break;
        }
        ahead -= off;
        let mut a = Qga::connect(qga, patient).await.ok()?;
        let at = host_ns().saturating_add((ahead * 1e9) as i64);
        a.execute(&qapi::qga::guest_set_time { time: Some(at) }, Duration::from_secs(60)).await.ok()?;
        drop(a);
        off = guest_offset(qga, patient).await?;
    }
    Some(off)
}

/// The guest clock minus the host's, in seconds (`guest-get-time` on a fresh connection, against
/// the host's clock halfway through the call).
async fn guest_offset(qga: &Path, timeouts: Timeouts) -> Option<f64> {
    let mut a = Qga::connect(qga, timeouts).await.ok()?;
    a.sync().await.ok()?;
    let before = host_ns();
    let guest = a.execute(&qapi::qga::guest_get_time {}, Duration::from_secs(30)).await.ok()?;
    let after = host_ns();
    // The guest read its clock somewhere between the two: the midpoint is the best guess.
    Some((guest as f64 - (before as f64 + after as f64) / 2.0) / 1e9)
}

/// The rest of a restore a crash interrupted (see [`super::journal`]).
pub(super) async fn finish_interrupted(cfg: &Config, zfs: &Zfs, mut journal: Journal) -> Result<Vec<String>, RestoreError> {
    let domain = journal.state.plan.domain.clone();
    let _locks = locks(cfg, &domain)?;
    let mut swept = Vec::new();
    if let Some(image) = journal.state.image.take() {
        // Only the one name a resume writes (the journal is root's, but recovery deletes nothing
        // else). libvirt has read it or never will: a restore still running holds it open.
        if image != raw_image(cfg, &domain) {
            return Err(step(&journal, "recover", format!("the journal names the save image {}, not this domain's", image.display())));
        }
        match std::fs::remove_file(&image) {
            Ok(()) => swept.push(format!("deleted {} (the raw save image of an interrupted resume)", image.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(step(&journal, "recover", format!("deleting {}: {e}", image.display()))),
        }
        journal.record("restore_image_swept")?;
    }
    let stopped = ensure_stopped(&domain, journal.state.plan.manager, cfg.domains.get(&domain)).await;
    if let Err(e) = stopped {
        if journal.state.resume_started {
            journal.finish()?;
            swept.push(format!("the restore had started {domain} from its RAM dump and it runs: nothing left to do"));
            return Ok(swept);
        }
        return Err(step(&journal, "recover", format!("{e}; the restore journal stays")));
    }
    let progress: Progress = Arc::new(|_: &str| {});
    // Someone took a snapshot since the crash (by hand: vmsnap's take the domain's lock): the
    // rollback would destroy it, which the user did not ask for. Say where things stand instead.
    let unit: Vec<SnapshotName> = journal
        .state
        .plan
        .snapshots
        .iter()
        .filter(|s| !journal.state.rolled_back.contains(s))
        .filter_map(|s| SnapshotName::new(s).ok())
        .collect();
    let newer = super::newer_than(zfs, &unit).await?;
    if let Some(extra) = newer.iter().find(|n| !journal.state.plan.newer.contains(n)) {
        let (done, plan) = (journal.state.rolled_back.join(", "), journal.state.plan.clone());
        journal.finish()?;
        swept.push(format!(
            "the restore of {domain} to {} was interrupted and {extra} was taken since: not finished (rolled back: {}); run `vmsnap restore {domain} {}` again",
            plan.snapshot,
            if done.is_empty() { "none".into() } else { done },
            plan.snapshot
        ));
        return Ok(swept);
    }
    let mut actions = swept;
    actions.extend(complete(zfs, &mut journal, &progress).await?);
    if journal.state.resume_started {
        actions.push(format!(
            "{domain} was being started from its RAM dump and does not run: its disks are at {} (run `vmsnap restore {domain} {} --resume` again)",
            journal.state.plan.snapshot, journal.state.plan.snapshot
        ));
    }
    actions.push(format!("finished the restore of {domain} to {}", journal.state.plan.snapshot));
    journal.finish()?;
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zfs::ZfsCli;

    fn plan(snapshot: &str) -> Plan {
        Plan {
            domain: "web".into(),
            snapshot: snapshot.into(),
            manager: super::super::Manager::Config,
            snapshots: Vec::new(),
            consistency: Some("ram".into()),
            newer: Vec::new(),
            newer_dumps: Vec::new(),
            destroy_newer: false,
            xml: None,
            redefine: false,
            nvram: None,
            resume: None,
            warnings: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// A resume killed while its raw save image existed: recovery deletes that image (it holds
    /// the guest's RAM) and nothing else, and the journal goes. A journal naming another file
    /// leaves it alone and says so.
    #[tokio::test]
    async fn recovery_deletes_the_raw_save_image_of_an_interrupted_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, ram) = (tmp.path().join("state"), tmp.path().join("ram"));
        let qmp = tmp.path().join("nobody-listens.qmp");
        let text = format!("state_dir = {state:?}\nram_dir = {ram:?}\n[domain.web]\nqmp = {qmp:?}\n");
        let cfg = Config::parse(&text, Path::new("vmsnap.toml")).unwrap();
        std::fs::create_dir_all(&ram).unwrap();
        let (image, dump) = (raw_image(&cfg, "web"), ram.join("web-dump.ram"));
        std::fs::write(&image, b"guest RAM").unwrap();
        std::fs::write(&dump, b"the snapshot's dump").unwrap();
        // No dataset to roll back: the stand-in zfs is never run.
        let zfs = Zfs::new(ZfsCli::with_binaries("/nonexistent/zfs".into(), "/nonexistent/zpool".into()));

        let mut journal = Journal::create(&state, plan("autosnap_x")).unwrap();
        journal.state.resume_started = true;
        journal.state.image = Some(image.clone());
        journal.record("restore_image_intended").unwrap();
        let said = super::super::recover_pending(&cfg, &zfs).await.unwrap();
        assert!(!image.exists() && dump.exists(), "{said:?}");
        let lines = &said[0].1;
        assert!(lines[0].contains("raw save image") && lines.iter().any(|l| l.contains("--resume")), "{lines:?}");
        assert!(super::super::recover_pending(&cfg, &zfs).await.unwrap().is_empty(), "the journal is left");

        let mut journal = Journal::create(&state, plan("autosnap_y")).unwrap();
        journal.state.image = Some(dump.clone());
        journal.record("restore_image_intended").unwrap();
        let e = super::super::recover_pending(&cfg, &zfs).await.unwrap_err().to_string();
        assert!(dump.exists() && e.contains("not this domain's"), "{e}");
    }
}
