//! `vmsnap restore DOMAIN SNAPSHOT --as NEW`: a second VM from a snapshot, beside the first.
//! Every dataset of the snapshot is cloned under a new name (the domain's name in it replaced),
//! the snapshot's XML is rewritten for the new VM ([`super::rename`]) and defined in libvirt, and
//! its nvram is a copy of the snapshot's. The original, its snapshots and its definition are not
//! touched. Everything it creates is new, so a failure removes what it made; `--promote` detaches
//! the clones from the original's snapshots (`zfs promote`).

use super::rename::{self, Renames};
use super::{find_unit, saved_file, RestoreError};
use crate::config::Config;
use crate::libvirt::virsh;
use crate::zfs::{Dataset, SnapshotName, Zfs};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// What `--as` will do.
#[derive(Debug, Clone, Serialize)]
pub struct ClonePlan {
    pub domain: String,
    pub snapshot: String,
    pub new_name: String,
    /// (snapshot, the clone it becomes).
    pub clones: Vec<(String, String)>,
    /// The snapshot's XML (inside the snapshot).
    pub xml_from: PathBuf,
    /// The snapshot's nvram copy and the new VM's nvram file.
    pub nvram: Option<(PathBuf, PathBuf)>,
    pub promote: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CloneReport {
    pub domain: String,
    pub snapshot: String,
    pub new_name: String,
    pub uuid: String,
    pub clones: Vec<String>,
    /// The new VM's definition as defined in libvirt.
    pub xml: PathBuf,
    pub nvram: Option<PathBuf>,
    pub promoted: bool,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

fn refuse(why: impl Into<String>) -> RestoreError {
    RestoreError::BadName(why.into())
}

/// Reads what the clone needs; refuses names that exist (domain, datasets, nvram file).
pub async fn plan(cfg: &Config, zfs: &Zfs, domain: &str, snapshot: &str, new: &str, promote: bool) -> Result<ClonePlan, RestoreError> {
    if !crate::config::valid_domain_name(new) || new == domain {
        return Err(refuse(format!(
            "--as {:?}: a new domain name is needed (letters, digits, '-', '_', '.')",
            new.chars().take(80).collect::<String>()
        )));
    }
    if cfg.domains.contains_key(domain) {
        return Err(refuse(format!(
            "--as is done for libvirt domains only; {domain} is a config domain (clone its datasets with `zfs clone` and add a [domain.{new}])"
        )));
    }
    if cfg.domains.contains_key(new) || virsh::domstate(new)?.is_some() {
        return Err(refuse(format!("a domain {new} exists already")));
    }
    let (unit, _, _) = find_unit(zfs, domain, snapshot).await?;
    let mut clones = Vec::new();
    for s in &unit {
        let target = rename::clone_name(s.dataset().as_str(), domain, new);
        if zfs.get_native(&target, "type").await?.is_some() {
            return Err(refuse(format!("dataset {target} exists already")));
        }
        clones.push((s.to_string(), target));
    }
    let (xml_from, _) = saved_file(zfs, &unit, domain, "domain.xml")
        .await?
        .ok_or_else(|| refuse(format!("snapshot {snapshot} holds no domain XML to define {new} from")))?;
    let old = crate::fsutil::read_limited(&xml_from, 4 << 20).map_err(|e| refuse(e.to_string()))?;
    let old_nvram = crate::libvirt::hook::parse_domain_xml(&String::from_utf8_lossy(&old)).ok().and_then(|d| d.nvram);
    let nvram = match (saved_file(zfs, &unit, domain, "nvram.fd").await?, old_nvram) {
        (Some((copy, _)), Some(home)) => {
            let new_home = home.parent().unwrap_or(std::path::Path::new("/")).join(format!("{new}_VARS.fd"));
            if new_home.exists() {
                return Err(refuse(format!("{} exists already", new_home.display())));
            }
            Some((copy, new_home))
        }
        _ => None,
    };
    Ok(ClonePlan { domain: domain.into(), snapshot: snapshot.into(), new_name: new.into(), clones, xml_from, nvram, promote })
}

/// Makes the clones, the nvram and the definition; removes what it made when a step fails.
pub async fn apply(cfg: &Config, zfs: &Zfs, plan: ClonePlan, progress: super::Progress) -> Result<CloneReport, RestoreError> {
    let t = Instant::now();
    let _lock = crate::engine::lock::DomainLock::acquire(&cfg.state_dir, &plan.new_name)
        .map_err(|e| RestoreError::Busy { domain: plan.new_name.clone(), source: Box::new(e) })?;
    let mut made: Vec<Dataset> = Vec::new();
    let mut nvram_made = None;
    let res = make(cfg, zfs, &plan, &progress, &mut made, &mut nvram_made).await;
    match res {
        Ok((uuid, xml)) => {
            // Last, once nothing can fail and need the clones undone (a promoted clone holds
            // the origin's snapshots and could no longer simply be destroyed).
            let mut warnings = Vec::new();
            let mut promoted = plan.promote;
            for ds in made.iter().filter(|_| plan.promote) {
                progress(&format!("zfs promote {ds}"));
                if let Err(e) = zfs.promote(ds).await {
                    promoted = false;
                    warnings.push(format!("zfs promote {ds}: {e} (the clone still depends on the snapshot)"));
                }
            }
            Ok(CloneReport {
                domain: plan.domain,
                snapshot: plan.snapshot,
                new_name: plan.new_name,
                uuid,
                clones: made.iter().map(ToString::to_string).collect(),
                xml,
                nvram: nvram_made,
                promoted,
                warnings,
                seconds: t.elapsed().as_secs_f64(),
            })
        }
        Err(e) => {
            for ds in made.iter().rev() {
                if let Err(undo) = zfs.destroy_dataset(ds).await {
                    tracing::warn!("removing the clone {ds} after a failed --as: {undo}");
                }
            }
            if let Some(n) = nvram_made {
                let _ = std::fs::remove_file(n);
            }
            Err(e)
        }
    }
}

async fn make(
    cfg: &Config,
    zfs: &Zfs,
    plan: &ClonePlan,
    progress: &super::Progress,
    made: &mut Vec<Dataset>,
    nvram_made: &mut Option<PathBuf>,
) -> Result<(String, PathBuf), RestoreError> {
    let fail =
        |step: &'static str, why: String| RestoreError::Step { domain: plan.new_name.clone(), snapshot: plan.snapshot.clone(), step, why };
    let mut paths = Vec::new();
    for (snap, target) in &plan.clones {
        progress(&format!("zfs clone {snap} {target}"));
        let snap = SnapshotName::new(snap).map_err(|e| fail("clone", e.to_string()))?;
        let target_ds = Dataset::new(target).map_err(|e| fail("clone", e.to_string()))?;
        zfs.clone_snapshot(&snap, &target_ds, &BTreeMap::new()).await?;
        made.push(target_ds);
        let old = snap.dataset().as_str();
        match zfs.get_native(old, "type").await?.as_deref() {
            Some("volume") => paths.push((PathBuf::from(format!("/dev/zvol/{old}")), PathBuf::from(format!("/dev/zvol/{target}")))),
            _ => {
                if let (Some(o), Some(n)) = (zfs.get_native(old, "mountpoint").await?, zfs.get_native(target, "mountpoint").await?) {
                    if o.starts_with('/') && n.starts_with('/') {
                        paths.push((PathBuf::from(o), PathBuf::from(n)));
                    }
                }
            }
        }
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
    let old = crate::fsutil::read_limited(&plan.xml_from, 4 << 20).map_err(|e| fail("read the snapshot's XML", e.to_string()))?;
    let xml = rename::rewrite(&String::from_utf8_lossy(&old), &renames).map_err(|e| fail("rewrite the XML", e))?;
    let dir = crate::fsutil::Dir::private(&cfg.state_dir, &["restore"]).map_err(|e| fail("write the XML", e.to_string()))?;
    let name = format!("{}.xml", plan.new_name);
    dir.write_atomic(&name, xml.as_bytes(), 0o600).map_err(|e| fail("write the XML", e.to_string()))?;
    if let Some((copy, home)) = &plan.nvram {
        progress(&format!("nvram {} from the snapshot", home.display()));
        let data = crate::fsutil::read_limited(copy, 64 << 20).map_err(|e| fail("nvram", e.to_string()))?;
        crate::fsutil::write_atomic(home, &data, 0o600).map_err(|e| fail("nvram", e.to_string()))?;
        *nvram_made = Some(home.clone());
    }
    let path = dir.path().join(&name);
    progress(&format!("virsh define {}", path.display()));
    virsh::define(&path)?;
    Ok((uuid, path))
}
