//! `vmsnap restore DOMAIN SNAPSHOT --as NEW`: a second VM from a snapshot, beside the first.
//! Every dataset of the snapshot is cloned under a new name (the domain's name in it replaced),
//! the snapshot's XML is rewritten for the new VM ([`super::rename`]) and defined in libvirt, and
//! its nvram is a copy of the snapshot's. With `--resume` the copy starts from the snapshot's RAM
//! dump: a save image of it under the new XML (libvirt refuses another UUID for an image's
//! own), `virsh restore`d paused, its network links taken down (the guest's RAM still holds the
//! original's MAC addresses), resumed, thawed and its clock set. The original, its snapshots and
//! its definition are not touched. Everything it creates is new, so a failure — or a crash,
//! through [`super::copy_journal`] — removes what it made; `--promote` detaches the clones from
//! the original's snapshots (`zfs promote`). `verify --boot` makes a scratch copy the same way.

use super::copy_journal::CopyJournal;
use super::dump::DumpCheck;
use super::rename::{self, Renames};
use super::steps::{self, Progress};
use super::{find_unit, RestoreError, ResumePlan};
use crate::config::Config;
use crate::engine::lock::DomainLock;
use crate::integrity::saved_file;
use crate::libvirt::virsh;
use crate::zfs::{Dataset, SnapshotName, Zfs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Names `verify --boot` gives its scratch copies; the hook does not register them and `--as`
/// refuses them.
pub const SCRATCH_PREFIX: &str = "vmsnap-verify-";

/// What the new VM does once defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Defined only: `virsh start NEW` is the user's.
    No,
    /// Started from the snapshot's RAM dump.
    Resume,
    /// Booted from its disks.
    Boot,
}

/// What `--as` will do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClonePlan {
    pub domain: String,
    pub snapshot: String,
    pub new_name: String,
    /// Who runs the copy: libvirt (defined there) or vmsnap's config (a `[domain.NEW]`).
    pub manager: super::Manager,
    /// (snapshot, the clone it becomes).
    pub clones: Vec<(String, String)>,
    /// The snapshot's XML (inside the snapshot) a libvirt copy is defined from.
    pub xml_from: Option<PathBuf>,
    /// The snapshot's nvram copy and the new VM's nvram file.
    pub nvram: Option<(PathBuf, PathBuf)>,
    pub promote: bool,
    pub start: Start,
    /// The dump `Start::Resume` starts from.
    pub resume: Option<ResumePlan>,
    /// A verification's copy: removed once checked, even when it runs.
    pub scratch: bool,
    /// Said before it starts.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CloneReport {
    pub domain: String,
    pub snapshot: String,
    pub new_name: String,
    /// The libvirt copy's UUID (none for a config domain's).
    pub uuid: String,
    pub clones: Vec<String>,
    /// The new VM's definition: the XML defined in libvirt, or the configuration file that
    /// holds its `[domain.NEW]`.
    pub xml: PathBuf,
    /// Its guest agent's socket, when it has one of vmsnap's.
    pub agent: Option<PathBuf>,
    pub nvram: Option<PathBuf>,
    pub promoted: bool,
    pub started: Start,
    /// The dump it resumed from, checked (sha256, header) before anything was made.
    pub resumed_from: Option<DumpCheck>,
    /// Network links taken down after the start (MAC addresses).
    pub links_down: Vec<String>,
    /// A guest saved frozen was thawed after the resume (see [`super::RestoreReport::thawed`]).
    pub thawed: Option<i64>,
    pub clock_set: bool,
    pub clock_offset_s: Option<f64>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

fn refuse(why: impl Into<String>) -> RestoreError {
    RestoreError::BadName(why.into())
}

/// Reads what the clone needs; refuses names that exist (domain, datasets, nvram file).
pub async fn plan(
    cfg: &Config,
    zfs: &Zfs,
    domain: &str,
    snapshot: &str,
    new: &str,
    promote: bool,
    start: Start,
) -> Result<ClonePlan, RestoreError> {
    if !crate::config::valid_domain_name(new) || new == domain {
        return Err(refuse(format!(
            "--as {:?}: a new domain name is needed (letters, digits, '-', '_', '.')",
            new.chars().take(80).collect::<String>()
        )));
    }
    if new.starts_with(SCRATCH_PREFIX) {
        return Err(refuse(format!("--as {new}: names starting with {SCRATCH_PREFIX} are verify --boot's scratch copies")));
    }
    plan_copy(cfg, zfs, domain, snapshot, new, promote, start).await
}

/// [`plan`] without the check of the new name's prefix (`verify --boot` uses it).
pub(super) async fn plan_copy(
    cfg: &Config,
    zfs: &Zfs,
    domain: &str,
    snapshot: &str,
    new: &str,
    promote: bool,
    start: Start,
) -> Result<ClonePlan, RestoreError> {
    let config_dom = cfg.domains.get(domain);
    let manager = if config_dom.is_some() { super::Manager::Config } else { super::Manager::Libvirt };
    // A libvirt domain of that name would clash with the copy's name; a host without libvirt
    // running (a config domain's) has none.
    let in_libvirt = match virsh::domstate(new) {
        Ok(state) => state.is_some(),
        Err(_) if manager == super::Manager::Config => false,
        Err(e) => return Err(e.into()),
    };
    if cfg.domains.contains_key(new) || in_libvirt {
        return Err(refuse(format!("a domain {new} exists already")));
    }
    if let (Some(d), true) = (config_dom, start != Start::No) {
        if d.start.is_empty() {
            return Err(refuse(format!(
                "{domain} is a config domain without `start`: vmsnap does not know how to start its copy (add the argument vector you start its QEMU with to [domain.{domain}])"
            )));
        }
    }
    let (unit, props, _) = find_unit(zfs, domain, snapshot).await?;
    let mut clones = Vec::new();
    for s in &unit {
        let target = rename::clone_name(s.dataset().as_str(), domain, new);
        if zfs.get_native(&target, "type").await?.is_some() {
            return Err(refuse(format!("dataset {target} exists already")));
        }
        clones.push((s.to_string(), target));
    }
    let mut warnings = Vec::new();
    let nvram_copy = saved_file(zfs, &unit, domain, "nvram.fd").await?.map(|f| f.frozen);
    let (xml_from, emulator, nvram) = match config_dom {
        Some(d) => {
            let home = d.nvram.as_ref().map(|h| rename::own_file(h, new, &[]));
            (None, d.start.first().map(PathBuf::from), nvram_copy.zip(home))
        }
        None => {
            let xml_from = saved_file(zfs, &unit, domain, "domain.xml")
                .await?
                .map(|f| f.frozen)
                .ok_or_else(|| refuse(format!("snapshot {snapshot} holds no domain XML to define {new} from")))?;
            let old = crate::fsutil::read_limited(&xml_from, 4 << 20).map_err(|e| refuse(e.to_string()))?;
            let saved = crate::libvirt::hook::parse_domain_xml(&String::from_utf8_lossy(&old)).ok();
            let home = saved
                .as_ref()
                .and_then(|d| d.nvram.as_ref())
                .map(|h| h.parent().unwrap_or(std::path::Path::new("/")).join(format!("{new}_VARS.fd")));
            (Some(xml_from), super::host_emulator(saved.and_then(|d| d.emulator), &mut warnings), nvram_copy.zip(home))
        }
    };
    if let Some((_, home)) = &nvram {
        if home.exists() {
            return Err(refuse(format!("{} exists already", home.display())));
        }
    }
    let resume = match start {
        Start::Resume => Some(super::resume_plan(domain, snapshot, &props, emulator, &mut warnings).await?),
        Start::No | Start::Boot => None,
    };
    Ok(ClonePlan {
        domain: domain.into(),
        snapshot: snapshot.into(),
        new_name: new.into(),
        manager,
        clones,
        xml_from,
        nvram,
        promote,
        start,
        resume,
        scratch: false,
        warnings,
    })
}

/// Makes the clones, the nvram and the definition, and starts the copy as planned; removes what
/// it made when a step fails. The dump (`Start::Resume`) is checked before anything is made.
pub async fn apply(cfg: &Config, zfs: &Zfs, plan: ClonePlan, progress: Progress) -> Result<CloneReport, RestoreError> {
    let (report, journal, _lock) = create(cfg, zfs, plan, progress).await?;
    journal.finish()?;
    Ok(report)
}

/// A verification's copy, running until [`Scratch::remove`] (or `vmsnap recover` after a crash).
pub struct Scratch {
    journal: CopyJournal,
    _lock: DomainLock,
}

impl Scratch {
    /// Stops and removes the copy: its domain, clones, nvram. One line per action.
    pub async fn remove(self, zfs: &Zfs) -> Result<Vec<String>, RestoreError> {
        let done = self.journal.undo(zfs).await;
        self.journal.finish()?;
        Ok(done)
    }
}

/// [`apply`] for a scratch copy: its journal stays until it is removed.
pub(super) async fn scratch(
    cfg: &Config,
    zfs: &Zfs,
    mut plan: ClonePlan,
    progress: Progress,
) -> Result<(CloneReport, Scratch), RestoreError> {
    plan.scratch = true;
    let (report, journal, lock) = create(cfg, zfs, plan, progress).await?;
    Ok((report, Scratch { journal, _lock: lock }))
}

async fn create(
    cfg: &Config,
    zfs: &Zfs,
    plan: ClonePlan,
    progress: Progress,
) -> Result<(CloneReport, CopyJournal, DomainLock), RestoreError> {
    let t = Instant::now();
    let lock = DomainLock::acquire(&cfg.state_dir, &plan.new_name)
        .map_err(|e| RestoreError::Busy { domain: plan.new_name.clone(), source: Box::new(e) })?;
    let checked = match &plan.resume {
        Some(r) => Some(steps::check_dump(r, &progress).await?),
        None => None,
    };
    let mut journal = CopyJournal::create(&cfg.state_dir, plan)?;
    let made = async {
        let made = make(cfg, zfs, &mut journal, &progress).await?;
        let started = start(cfg, &mut journal, &made, &progress).await?;
        Ok::<_, RestoreError>((made, started))
    }
    .await;
    let (made, started) = match made {
        Ok(m) => m,
        Err(e) => {
            for line in journal.undo(zfs).await {
                tracing::warn!("after a failed copy: {line}");
            }
            journal.finish()?;
            return Err(e);
        }
    };
    let plan = journal.state.plan.clone();
    // Last, once nothing can fail and need the clones undone (a promoted clone holds the
    // origin's snapshots and could no longer simply be destroyed).
    let mut warnings = plan.warnings.clone();
    warnings.extend(made.warnings);
    warnings.extend(started.warnings);
    let mut promoted = plan.promote;
    for ds in made.clones.iter().filter(|_| plan.promote) {
        progress(&format!("zfs promote {ds}"));
        if let Err(e) = zfs.promote(ds).await {
            promoted = false;
            warnings.push(format!("zfs promote {ds}: {e} (the clone still depends on the snapshot)"));
        }
    }
    let report = CloneReport {
        domain: plan.domain,
        snapshot: plan.snapshot,
        new_name: plan.new_name,
        uuid: made.uuid,
        clones: made.clones.iter().map(ToString::to_string).collect(),
        xml: made.definition,
        agent: made.agent,
        nvram: plan.nvram.map(|(_, home)| home),
        promoted,
        started: plan.start,
        resumed_from: checked,
        links_down: started.links_down,
        thawed: started.thawed,
        clock_set: started.clock_set,
        clock_offset_s: started.clock_offset_s,
        warnings,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok((report, journal, lock))
}

/// What [`make`] made.
struct Made {
    uuid: String,
    /// The XML defined in libvirt, or the configuration file.
    definition: PathBuf,
    clones: Vec<Dataset>,
    /// A config domain's copy, as appended to the configuration.
    config: Option<crate::config::DomainConfig>,
    agent: Option<PathBuf>,
    warnings: Vec<String>,
}

/// The clones, the nvram copy and the definition (libvirt's, or a `[domain.NEW]` in the
/// configuration), each intent journaled first.
async fn make(cfg: &Config, zfs: &Zfs, journal: &mut CopyJournal, progress: &Progress) -> Result<Made, RestoreError> {
    let plan = journal.state.plan.clone();
    let fail =
        |step: &'static str, why: String| RestoreError::Step { domain: plan.new_name.clone(), snapshot: plan.snapshot.clone(), step, why };
    let mut paths = Vec::new();
    let mut made = Vec::new();
    for (snap, target) in &plan.clones {
        progress(&format!("zfs clone {snap} {target}"));
        let snap = SnapshotName::new(snap).map_err(|e| fail("clone", e.to_string()))?;
        let target_ds = Dataset::new(target).map_err(|e| fail("clone", e.to_string()))?;
        zfs.clone_snapshot(&snap, &target_ds, &BTreeMap::new()).await?;
        made.push(target_ds);
        let old = snap.dataset().as_str();
        match zfs.get_native(old, "type").await?.as_deref() {
            Some("volume") => {
                // udev makes the clone's device node a moment later; QEMU needs it there.
                let dev = crate::zfs::zvol_node(target, std::time::Duration::from_secs(60))
                    .await
                    .ok_or_else(|| fail("clone", format!("/dev/zvol/{target} did not appear within 60 s (is udev running?)")))?;
                paths.push((PathBuf::from(format!("/dev/zvol/{old}")), dev));
            }
            _ => {
                if let (Some(o), Some(n)) = (zfs.get_native(old, "mountpoint").await?, zfs.get_native(target, "mountpoint").await?) {
                    if o.starts_with('/') && n.starts_with('/') {
                        paths.push((PathBuf::from(o), PathBuf::from(n)));
                    }
                }
            }
        }
    }
    if let Some((copy, home)) = &plan.nvram {
        progress(&format!("nvram {} from the snapshot", home.display()));
        journal.state.nvram_intended = true;
        journal.record("copy_nvram_intended")?;
        let data = crate::fsutil::read_limited(copy, 64 << 20).map_err(|e| fail("nvram", e.to_string()))?;
        crate::fsutil::write_atomic(home, &data, 0o600).map_err(|e| fail("nvram", e.to_string()))?;
    }
    if plan.manager == super::Manager::Config {
        let dom = cfg.domains.get(&plan.domain).ok_or_else(|| fail("configuration", format!("{} is no longer configured", plan.domain)))?;
        let nvram = plan.nvram.as_ref().map(|(_, home)| home.as_path());
        let t = super::config_copy::table(dom, &plan.new_name, &plan.snapshot, &paths, nvram).map_err(|e| fail("configuration", e))?;
        progress(&format!("[domain.{}] added to {}", plan.new_name, cfg.path.display()));
        journal.state.config = Some((cfg.path.clone(), t.text.clone(), t.domain.qmp.clone()));
        journal.record("copy_config_intended")?;
        super::config_copy::append(&cfg.path, &t.text).map_err(|e| fail("configuration", e))?;
        return Ok(Made {
            uuid: String::new(),
            definition: cfg.path.clone(),
            clones: made,
            agent: t.domain.qga.clone(),
            config: Some(t.domain),
            warnings: t.warnings,
        });
    }
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(|e| fail("uuid", e.to_string()))?.trim().to_owned();
    let (old_qmp, old_qga) = crate::libvirt::enroll::sockets(&plan.domain);
    let (new_qmp, new_qga) = crate::libvirt::enroll::sockets(&plan.new_name);
    let renames = Renames {
        name: plan.new_name.clone(),
        uuid: uuid.clone(),
        paths,
        nvram: plan.nvram.as_ref().map(|(_, home)| home.clone()),
        args: vec![
            (old_qmp.display().to_string(), new_qmp.display().to_string()),
            (old_qga.display().to_string(), new_qga.display().to_string()),
        ],
    };
    let xml_from = plan.xml_from.as_ref().ok_or_else(|| fail("read the snapshot's XML", "none planned".into()))?;
    let old = crate::fsutil::read_limited(xml_from, 4 << 20).map_err(|e| fail("read the snapshot's XML", e.to_string()))?;
    let xml = rename::rewrite(&String::from_utf8_lossy(&old), &renames).map_err(|e| fail("rewrite the XML", e))?;
    let dir = crate::fsutil::Dir::private(&cfg.state_dir, &["restore"]).map_err(|e| fail("write the XML", e.to_string()))?;
    let name = format!("{}.xml", plan.new_name);
    dir.write_atomic(&name, xml.as_bytes(), 0o600).map_err(|e| fail("write the XML", e.to_string()))?;
    let path = dir.path().join(&name);
    progress(&format!("virsh define {}", path.display()));
    journal.state.uuid = Some(uuid.clone());
    journal.record("copy_define_intended")?;
    virsh::define(&path)?;
    let agent = crate::libvirt::hook::parse_domain_xml(&xml).ok().and_then(|d| d.qga);
    Ok(Made { uuid, definition: path, clones: made, config: None, agent, warnings: Vec::new() })
}

/// What starting the copy did.
#[derive(Default)]
struct Started {
    links_down: Vec<String>,
    thawed: Option<i64>,
    clock_set: bool,
    clock_offset_s: Option<f64>,
    warnings: Vec<String>,
}

/// Starts the copy as planned, paused; takes its network links down; lets it run; after a
/// resume thaws a guest saved frozen and sets its clock.
async fn start(cfg: &Config, journal: &mut CopyJournal, made: &Made, progress: &Progress) -> Result<Started, RestoreError> {
    let plan = journal.state.plan.clone();
    let new = plan.new_name.as_str();
    let fail = |step: &'static str, why: String| RestoreError::Step { domain: new.to_owned(), snapshot: plan.snapshot.clone(), step, why };
    if let Some(dom) = &made.config {
        return start_config(cfg, journal, dom, progress).await;
    }
    let xml = made.definition.as_path();
    match (plan.start, &plan.resume) {
        (Start::No, _) => return Ok(Started::default()),
        (Start::Resume, Some(r)) => {
            let name = format!("restore-{new}.save");
            journal.state.image = Some(cfg.ram_dir.join(&name));
            journal.record("copy_image_intended")?;
            progress(&format!("writing {}: the snapshot's RAM under {new}'s definition", cfg.ram_dir.join(&name).display()));
            let text = crate::fsutil::read_limited(xml, 4 << 20).map_err(|e| fail("read the new XML", e.to_string()))?;
            let text = String::from_utf8(text).map_err(|_| fail("read the new XML", "not UTF-8".into()))?;
            let (src, dir) = (r.dump.clone(), cfg.ram_dir.clone());
            let image = tokio::task::spawn_blocking(move || super::dump::copy_save_image(&src, &dir, &name, Some(&text)))
                .await
                .expect("the copy does not panic")
                .map_err(|e| fail("write the save image", e.to_string()))?;
            journal.state.start_intended = true;
            journal.record("copy_start_intended")?;
            progress(&format!("virsh restore {} --paused", image.display()));
            let again = image.clone();
            let restored = tokio::task::spawn_blocking(move || virsh::restore(&again, true)).await.expect("virsh runs");
            let _ = std::fs::remove_file(&image);
            restored.map_err(|e| fail("virsh restore", e.to_string()))?;
        }
        (Start::Resume, None) => return Err(fail("resume", "no RAM dump planned".into())),
        (Start::Boot, _) => {
            journal.state.start_intended = true;
            journal.record("copy_start_intended")?;
            progress(&format!("virsh start {new} --paused"));
            virsh::start(new, true).map_err(|e| fail("virsh start", e.to_string()))?;
        }
    }
    let mut started =
        Started { links_down: virsh::links_down(new).map_err(|e| fail("network links down", e.to_string()))?, ..Started::default() };
    if !started.links_down.is_empty() {
        progress(&format!("network links of {new} down: {}", started.links_down.join(", ")));
        if !plan.scratch {
            started.warnings.push(format!(
                "{new}'s network links are down: its guest still uses the original's MAC addresses (its RAM holds them); reboot it (it takes its own then) and `virsh domif-setlink {new} MAC up` each"
            ));
        }
    }
    virsh::resume(new).map_err(|e| fail("virsh resume", e.to_string()))?;
    if let Some(r) = plan.resume.as_ref().filter(|_| plan.start == Start::Resume) {
        let agent = steps::Agent::of_libvirt(new);
        let (thawed, clock_set, warnings) = steps::after_resume(new, &agent, r.quiesced, progress).await;
        started.thawed = thawed;
        started.clock_set = clock_set;
        started.warnings.extend(warnings);
        if let (true, steps::Agent::Socket(qga)) = (clock_set, &agent) {
            started.clock_offset_s = steps::settle_clock(qga).await;
        }
    }
    Ok(started)
}

/// [`start`] of a config domain's copy: its QEMU started by vmsnap from its `start` (from the
/// dump with `-incoming defer`, or booted), then thawed and its clock set after a resume.
async fn start_config(
    cfg: &Config,
    journal: &mut CopyJournal,
    dom: &crate::config::DomainConfig,
    progress: &Progress,
) -> Result<Started, RestoreError> {
    let plan = journal.state.plan.clone();
    let new = plan.new_name.as_str();
    let fail = |step: &'static str, why: String| RestoreError::Step { domain: new.to_owned(), snapshot: plan.snapshot.clone(), step, why };
    if plan.start == Start::No {
        return Ok(Started::default());
    }
    journal.state.start_intended = true;
    journal.record("copy_start_intended")?;
    let mut started = Started::default();
    match &plan.resume {
        Some(r) if plan.start == Start::Resume => {
            progress(&format!("starting {new}'s QEMU from the RAM dump ({} … -incoming defer)", dom.start[0]));
            super::start_qemu::resume(cfg, dom, &r.dump).await.map_err(|e| fail("start QEMU", e))?;
            let agent = dom.qga.clone().map_or(steps::Agent::None, steps::Agent::Socket);
            let (thawed, clock_set, warnings) = steps::after_resume(new, &agent, r.quiesced, progress).await;
            started.thawed = thawed;
            started.clock_set = clock_set;
            started.warnings.extend(warnings);
            if let (true, steps::Agent::Socket(qga)) = (clock_set, &agent) {
                started.clock_offset_s = steps::settle_clock(qga).await;
            }
        }
        _ => {
            progress(&format!("starting {new}'s QEMU ({})", dom.start[0]));
            super::start_qemu::boot(cfg, dom).await.map_err(|e| fail("start QEMU", e))?;
        }
    }
    Ok(started)
}
