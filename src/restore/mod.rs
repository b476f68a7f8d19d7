//! Restore: a stopped domain brought back to one of its snapshots, in place. Every dataset that
//! holds the snapshot is rolled back as one unit; snapshots (and bookmarks) newer than it are
//! never destroyed unless the user names them (`--destroy-newer`, which lists them first); the
//! domain's XML and nvram come from the snapshot, not from today's definition; with `--resume`
//! the guest continues from its RAM dump, checked against its sha256 before anything changes.
//!
//! [`plan`] only reads (ZFS, libvirt, the dump); [`apply`] journals every step in
//! `<state_dir>/restore/<domain>.json` before it is done, so `vmsnap recover` finishes a restore
//! a crash interrupted ([`recover_pending`]) — and never rolls back under a running VM.

pub mod boot;
pub mod clone;
mod config_copy;
mod copy_journal;
pub mod dump;
mod journal;
pub mod mount;
pub mod rename;
mod start_qemu;
mod state_file;
mod steps;
pub mod verify;

pub use copy_journal::recover_copies;
pub use journal::recover_pending;
pub use steps::{apply, Progress, RestoreReport};

use crate::config::{Config, DomainConfig};
use crate::integrity::saved_file;
use crate::libvirt::virsh;
use crate::model::{prop, RamCompress};
use crate::qemu::qmp::Qmp;
use crate::zfs::{PropName, SnapshotName, Zfs, ZfsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Why a restore is refused or failed, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    BadName(String),
    #[error("domain {domain} has no snapshot {snapshot} (its newest: {known})")]
    NoSuchSnapshot { domain: String, snapshot: String, known: String },
    #[error("domain {domain} is {state}: a restore rolls its disks back, so stop it first ({how})")]
    Running { domain: String, state: String, how: String },
    #[error("a rollback to {snapshot} would destroy newer snapshots and bookmarks: {} (pass --destroy-newer to destroy them, or take a clone of the snapshot)", .newer.join(", "))]
    NewerSnapshots { snapshot: String, newer: Vec<String> },
    #[error("--resume: snapshot {snapshot} has no RAM dump ({why})")]
    NoDump { snapshot: String, why: String },
    #[error("--resume refused before anything changed: {0}")]
    BadDump(#[from] dump::BadDump),
    #[error("--resume of {domain}: {why}")]
    CannotResume { domain: String, why: String },
    #[error("zfs: {0}")]
    Zfs(#[from] ZfsError),
    #[error("libvirt: {0}")]
    Virsh(#[from] virsh::VirshError),
    #[error("{domain}: {source}")]
    Busy {
        domain: String,
        #[source]
        source: Box<crate::engine::EngineError>,
    },
    #[error("restore of {domain}: {why}; nothing was changed, run it again")]
    Changed { domain: String, why: String },
    #[error("restore journal {path}: {why}")]
    Journal { path: PathBuf, why: String },
    #[error("restore of {domain} to {snapshot} stopped at {step}: {why} (`vmsnap recover` finishes it once the domain is stopped)")]
    Step { domain: String, snapshot: String, step: &'static str, why: String },
}

/// Who runs the domain's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    /// A `[domain.NAME]` of the config: its own QEMU, started by the user.
    Config,
    Libvirt,
}

/// The RAM half of a restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumePlan {
    pub dump: PathBuf,
    pub sha256: Option<String>,
    pub compress: RamCompress,
    /// Taken frozen (`ram_quiesce`): the guest wakes frozen and is thawed right after.
    pub quiesced: bool,
}

/// What a restore will do, all of it known before anything changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub domain: String,
    pub snapshot: String,
    pub manager: Manager,
    /// One snapshot per dataset, rolled back together.
    pub snapshots: Vec<String>,
    pub consistency: Option<String>,
    /// Newer snapshots and bookmarks of those datasets: a rollback destroys them.
    pub newer: Vec<String>,
    /// The RAM dumps of those newer snapshots, deleted with them.
    pub newer_dumps: Vec<PathBuf>,
    pub destroy_newer: bool,
    /// The snapshot's domain XML (its path once rolled back), if it saved one.
    pub xml: Option<PathBuf>,
    /// `virsh define` the snapshot's XML (a persistent libvirt domain).
    pub redefine: bool,
    /// The snapshot's nvram copy (once rolled back) and where the domain keeps its nvram.
    pub nvram: Option<(PathBuf, PathBuf)>,
    pub resume: Option<ResumePlan>,
    /// Said before it starts: what the restored disks are and are not.
    pub warnings: Vec<String>,
    /// What the real run would refuse (a dry run shows it; [`apply`] refuses it again, from the
    /// state it finds then).
    #[serde(default)]
    pub refused: Vec<Refusal>,
}

/// Something a restore would refuse: why, and the flag that lifts it (none: something to do
/// first, such as stopping the domain).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub why: String,
    pub needs: Option<String>,
}

/// What the caller asked for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub domain: String,
    pub snapshot: String,
    pub destroy_newer: bool,
    pub resume: bool,
    /// The snapshot came back from a target (`--from`): a libvirt domain this host no longer
    /// knows is defined again from the snapshot's XML. Otherwise a domain libvirt does not know
    /// (a transient one that stopped) is left undefined, as it was.
    pub from_target: bool,
}

/// vmsnap's snapshots on this host (`vmsnap:domain` set on the snapshot itself, never
/// inherited), by domain, then snapshot name: one snapshot per dataset (sorted), and the first's
/// properties. Replicas (a local replication target's copies, [`prop::REPLICA`], and anything
/// below a `vmsnap serve` root, whatever properties a source gave it) are not the domain's: a
/// restore must never roll them back with it, nor read a source's XML or dump for its own.
pub(crate) type Units = BTreeMap<String, BTreeMap<String, (Vec<SnapshotName>, BTreeMap<PropName, String>)>>;

pub(crate) async fn units(zfs: &Zfs) -> Result<Units, ZfsError> {
    let mut out: Units = BTreeMap::new();
    let roots = zfs.serve_roots().await?;
    for (name, mut props) in zfs.all_snapshot_properties(&prop::ALL_AND_REPLICA).await? {
        if props.remove(&prop::REPLICA).is_some() || roots.contain(&name) {
            continue;
        }
        let (Some(domain), Ok(snap)) = (props.get(&prop::DOMAIN).cloned(), SnapshotName::new(&name)) else { continue };
        let unit = out.entry(domain).or_default().entry(snap.snap().to_owned()).or_insert_with(|| (Vec::new(), props.clone()));
        unit.0.push(snap);
    }
    Ok(out)
}

type Mine = BTreeMap<String, (Vec<SnapshotName>, BTreeMap<PropName, String>)>;

/// The snapshots named `snapshot` that vmsnap took of `domain`, with the properties of the
/// first; also all of the domain's ([`Units`]), to find the RAM dumps of newer ones a rollback
/// destroys.
async fn find_unit(zfs: &Zfs, domain: &str, snapshot: &str) -> Result<(Vec<SnapshotName>, BTreeMap<PropName, String>, Mine), RestoreError> {
    let mine = units(zfs).await?.remove(domain).unwrap_or_default();
    let Some((unit, props)) = mine.get(snapshot).cloned() else {
        // vmsnap's names start with the time: the last by name are the newest.
        let newest: Vec<&str> = mine.keys().rev().take(5).map(String::as_str).collect();
        return Err(RestoreError::NoSuchSnapshot {
            domain: domain.to_owned(),
            snapshot: snapshot.to_owned(),
            known: if newest.is_empty() { "none".into() } else { newest.join(", ") },
        });
    };
    Ok((unit, props, mine))
}

/// Refuses a domain with a mounted snapshot: it is held, and a zvol's read-only clone hangs on
/// it, so a rollback past it would stop half-way.
fn ensure_unmounted(cfg: &Config, domain: &str) -> Result<(), RestoreError> {
    let mounted: Vec<String> = mount::states(&cfg.state_dir)
        .into_iter()
        .filter_map(|(_, s)| s.ok())
        .filter(|s| s.domain == domain)
        .map(|s| format!("{} (at {})", s.snapshot, s.path.display()))
        .collect();
    if mounted.is_empty() {
        return Ok(());
    }
    Err(RestoreError::BadName(format!("{domain} has mounted snapshots: {}; `vmsnap umount {domain} SNAPSHOT` first", mounted.join(", "))))
}

/// Refuses a domain whose QEMU runs (or may run): a rollback under it would lose the guest's
/// writes and corrupt its filesystems.
async fn ensure_stopped(domain: &str, manager: Manager, dom: Option<&DomainConfig>) -> Result<(), RestoreError> {
    let running =
        |state: &str, how: &str| RestoreError::Running { domain: domain.to_owned(), state: state.to_owned(), how: how.to_owned() };
    match manager {
        Manager::Libvirt => match virsh::domstate(domain)? {
            Some(s) if s == "shut off" => Ok(()),
            Some(s) => Err(running(&s, &format!("`virsh shutdown {domain}`, or `virsh destroy {domain}`"))),
            None => Ok(()),
        },
        Manager::Config => {
            let qmp = dom.map(|d| d.qmp.clone()).unwrap_or_default();
            match Qmp::connect(&qmp, Duration::from_secs(3)).await {
                Ok(q) => {
                    let status = q.execute(&qapi::qmp::query_status {}).await.map(|s| format!("{:?}", s.status).to_lowercase());
                    Err(running(
                        &status.unwrap_or_else(|_| "running".into()),
                        &format!("its QEMU answers on {}: shut the guest down", qmp.display()),
                    ))
                }
                Err(_) => Ok(()),
            }
        }
    }
}

/// The snapshots and bookmarks a rollback to `unit` destroys, by full name.
async fn newer_than(zfs: &Zfs, unit: &[SnapshotName]) -> Result<Vec<String>, RestoreError> {
    let mut newer = Vec::new();
    for s in unit {
        let listed = zfs.list_snapshots(s.dataset(), &[]).await?;
        let txg = listed.iter().find(|l| l.name == *s).map(|l| l.createtxg).unwrap_or(u64::MAX);
        newer.extend(listed.iter().filter(|l| l.createtxg > txg).map(|l| l.name.to_string()));
        newer.extend(zfs.bookmarks(s.dataset()).await?.into_iter().filter(|b| b.2 > txg).map(|b| format!("{}#{}", s.dataset(), b.0)));
    }
    Ok(newer)
}

/// A domain and snapshot name as a caller gave them, checked before they name a file or a
/// dataset: what is wrong with them, the first shown abridged.
pub(crate) fn check_names(domain: &str, snapshot: &str) -> Result<(), String> {
    let shown = |s: &str| s.chars().take(80).collect::<String>();
    if !crate::config::valid_domain_name(domain) {
        return Err(format!("{:?} is not a domain name", shown(domain)));
    }
    if !crate::zfs::names::valid_component(snapshot) {
        return Err(format!("{:?} is not a snapshot name (the part after the @, as `vmsnap list` shows it)", shown(snapshot)));
    }
    Ok(())
}

/// Everything a restore will do, read from ZFS, libvirt and the dump; changes nothing.
pub async fn plan(cfg: &Config, zfs: &Zfs, req: &Request) -> Result<Plan, RestoreError> {
    check_names(&req.domain, &req.snapshot).map_err(RestoreError::BadName)?;
    let dom = cfg.domains.get(&req.domain);
    let manager = if dom.is_some() { Manager::Config } else { Manager::Libvirt };
    let (unit, props, mine) = find_unit(zfs, &req.domain, &req.snapshot).await?;
    // What the real run would refuse is planned too (a dry run shows all of it).
    let mut refused = Vec::new();
    match ensure_stopped(&req.domain, manager, dom).await {
        Ok(()) => {}
        Err(e @ RestoreError::Running { .. }) => refused.push(Refusal { why: e.to_string(), needs: None }),
        Err(e) => return Err(e),
    }
    if let Err(e) = ensure_unmounted(cfg, &req.domain) {
        refused.push(Refusal { why: e.to_string(), needs: None });
    }

    let newer = newer_than(zfs, &unit).await?;
    // The RAM dumps of the newer vmsnap snapshots go with them (as pruning does), only from
    // vmsnap's RAM directory (recovery's rule for what it may delete).
    let places = crate::engine::recover::Places::of(cfg);
    let mut newer_dumps: Vec<PathBuf> = newer
        .iter()
        .filter_map(|n| mine.get(SnapshotName::new(n).ok()?.snap())?.1.get(&prop::RAM_DUMP).map(PathBuf::from))
        .filter(|d| places.ram(d).is_ok())
        .collect();
    newer_dumps.sort();
    newer_dumps.dedup();
    if !newer.is_empty() && !req.destroy_newer {
        let e = RestoreError::NewerSnapshots { snapshot: req.snapshot.clone(), newer: newer.clone() };
        refused.push(Refusal { why: e.to_string(), needs: Some("--destroy-newer".into()) });
    }

    let xml = saved_file(zfs, &unit, &req.domain, "domain.xml").await?;
    let nvram_copy = saved_file(zfs, &unit, &req.domain, "nvram.fd").await?;
    let saved_domain = match (manager, &xml) {
        (Manager::Libvirt, Some(saved)) => {
            let text = crate::fsutil::read_limited(&saved.frozen, 4 << 20).map_err(|e| RestoreError::Step {
                domain: req.domain.clone(),
                snapshot: req.snapshot.clone(),
                step: "read the snapshot's XML",
                why: e.to_string(),
            })?;
            crate::libvirt::hook::parse_domain_xml(&String::from_utf8_lossy(&text)).ok()
        }
        _ => None,
    };
    let nvram_home = match manager {
        Manager::Config => dom.and_then(|d| d.nvram.clone()),
        Manager::Libvirt => saved_domain.as_ref().and_then(|d| d.nvram.clone()),
    };
    let nvram = nvram_copy.zip(nvram_home).map(|(copy, home)| (copy.live, home));
    // A persistent domain gets the snapshot's definition back, and so does one libvirt does not
    // know when it came back from a target (a host that lost it); a transient one is left as it is.
    let redefine = manager == Manager::Libvirt
        && xml.is_some()
        && (virsh::is_persistent(&req.domain)? || (req.from_target && virsh::domstate(&req.domain)?.is_none()));

    let get = |p: &PropName| props.get(p).cloned();
    let consistency = get(&prop::CONSISTENCY);
    let quiesced = get(&prop::RAM_QUIESCED).as_deref() == Some("yes");
    let mut warnings = Vec::new();
    let resume = if req.resume {
        let emulator = match (manager, dom) {
            (Manager::Config, Some(d)) if d.start.is_empty() => {
                return Err(RestoreError::CannotResume {
                    domain: req.domain.clone(),
                    why: format!(
                        "vmsnap does not know how to start its QEMU: add `start = [\"/usr/bin/qemu-system-x86_64\", …]` (the argument vector you start it with) to [domain.{}] in {}",
                        req.domain,
                        cfg.path.display()
                    ),
                });
            }
            (Manager::Config, d) => d.and_then(|d| d.start.first()).map(PathBuf::from),
            (Manager::Libvirt, _) => host_emulator(saved_domain.as_ref().and_then(|d| d.emulator.clone()), &mut warnings),
        };
        Some(resume_plan(&req.domain, &req.snapshot, &props, emulator, &mut warnings).await?)
    } else {
        match consistency.as_deref() {
            Some("crash") => warnings.push("this snapshot is crash-consistent: the guest boots as after a power cut (its journal replays)".into()),
            Some("ram") if !quiesced => warnings.push(
                "the disks of this RAM snapshot alone are crash-consistent (the guest was not frozen): restore them with --resume to continue from the RAM instead"
                    .into(),
            ),
            _ => {}
        }
        None
    };
    if xml.is_none() {
        warnings.push("the snapshot holds no domain XML (zvols only, or none configured): the domain's definition stays as it is".into());
    }
    Ok(Plan {
        domain: req.domain.clone(),
        snapshot: req.snapshot.clone(),
        manager,
        snapshots: unit.iter().map(ToString::to_string).collect(),
        consistency,
        newer,
        newer_dumps,
        destroy_newer: req.destroy_newer,
        xml: xml.map(|saved| saved.live),
        redefine,
        nvram,
        resume,
        warnings,
        refused,
    })
}

/// A snapshot's `<emulator>`, to ask what it can load, only when libvirt lists it among this
/// host's QEMU binaries (`virsh capabilities`): the XML in a snapshot (a target's, after
/// `--from`) is never a reason for root to run a program. Otherwise `None`, and why in `warnings`.
pub(crate) fn host_emulator(saved: Option<PathBuf>, warnings: &mut Vec<String>) -> Option<PathBuf> {
    let saved = saved?;
    match crate::libvirt::virsh::host_emulators() {
        Ok(known) if known.contains(&saved) => Some(saved),
        Ok(known) => {
            warnings.push(format!(
                "not checked whether QEMU can load the dump: the snapshot's <emulator> {} is not one libvirt lists on this host ({})",
                crate::replicate::protocol::shown(&saved.display().to_string(), 200),
                known.iter().map(|k| k.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
            None
        }
        Err(e) => {
            warnings.push(format!("not checked whether QEMU can load the dump: {e}"));
            None
        }
    }
}

/// The RAM half of a restore of `snapshot` (its properties `props`): the dump it recorded, and
/// whether `emulator` (the saved XML's `<emulator>`, a config domain's `start` program) can load it (QEMU finds out what it
/// cannot load half-way through the load: said before anything changes). What could not be
/// checked goes to `warnings`.
pub(crate) async fn resume_plan(
    domain: &str,
    snapshot: &str,
    props: &BTreeMap<PropName, String>,
    emulator: Option<PathBuf>,
    warnings: &mut Vec<String>,
) -> Result<ResumePlan, RestoreError> {
    use crate::engine::resumable;
    let get = |p: &PropName| props.get(p).cloned();
    let dump = get(&prop::RAM_DUMP).map(PathBuf::from).ok_or_else(|| RestoreError::NoDump {
        snapshot: snapshot.to_owned(),
        why: match get(&prop::RAM_PRUNED) {
            Some(_) => "retention pruned it (ram_keep)".into(),
            None => "it was taken without --memory".into(),
        },
    })?;
    let cannot = |why: String| RestoreError::CannotResume { domain: domain.to_owned(), why };
    match (resumable::Recorded::from_properties(get), emulator) {
        (Ok(recorded), Some(emulator)) => {
            let here = resumable::Target::of_binary(&emulator).await.map_err(cannot)?;
            let why = resumable::check(&recorded, &here);
            if !why.is_empty() {
                return Err(cannot(format!("{} cannot load this dump: {}", emulator.display(), why.join("; "))));
            }
        }
        (Err(e), _) => warnings.push(format!("not checked whether this QEMU can load the dump: {e}")),
        (Ok(_), None) => warnings.push("not checked whether this QEMU can load the dump: the snapshot's XML names no <emulator>".into()),
    }
    let compress = get(&prop::RAM_COMPRESS).and_then(|c| c.parse().ok()).unwrap_or(RamCompress::None);
    Ok(ResumePlan { dump, sha256: get(&prop::RAM_SHA256), compress, quiesced: get(&prop::RAM_QUIESCED).as_deref() == Some("yes") })
}
