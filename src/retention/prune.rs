//! Carrying out a retention plan: one `zfs destroy ds@a,b,c` per dataset, RAM dumps deleted
//! when no remaining snapshot references them, RAM dumps of old kept snapshots dropped (the
//! snapshot's properties then say so), and the user's pruning scripts around it.

use crate::config::{Config, DomainConfig};
use crate::daemon::scripts::{self, ScriptEnv};
use crate::fsutil::inside;
use crate::model::prop;
use crate::retention::catalog::{self, Catalog};
use crate::retention::{self, Decision};
use crate::zfs::{Zfs, ZfsError};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Busy(#[from] crate::engine::EngineError),
    #[error("domain {domain}: reading its snapshots")]
    List {
        domain: String,
        #[source]
        source: ZfsError,
    },
    #[error("domain {domain}: destroying {snapshots} on {dataset}")]
    Destroy {
        domain: String,
        dataset: String,
        snapshots: String,
        #[source]
        source: ZfsError,
    },
    #[error("domain {domain}: marking {snapshot}'s RAM dump as pruned")]
    MarkRam {
        domain: String,
        snapshot: String,
        #[source]
        source: ZfsError,
    },
}

/// What pruning a domain did (or, dry, would do), and why.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub domain: String,
    pub dry_run: bool,
    pub now: i64,
    pub decisions: Vec<Decision>,
    /// Snapshot names destroyed (on every dataset of the domain that had them).
    pub destroyed: Vec<String>,
    /// Kept snapshots whose RAM dump was dropped.
    pub ram_dropped: Vec<String>,
    pub ram_deleted: Vec<PathBuf>,
    /// Left alone, with why (a failed pre-pruning script, a dump outside `ram_dir`, …).
    pub warnings: Vec<String>,
}

/// Plans and (unless `dry_run`) carries out retention for `dom` at `now` (unix seconds).
pub async fn prune(cfg: &Config, dom: &DomainConfig, zfs: &Zfs, now: i64, dry_run: bool) -> Result<PruneReport, PruneError> {
    let list = |source| PruneError::List { domain: dom.name.clone(), source };
    // Never while a snapshot (or another prune) of the domain runs: a dump it is writing, or a
    // snapshot it is labelling, must not be judged half-made. A dry run changes nothing.
    let _lock = if dry_run { None } else { Some(crate::engine::lock::DomainLock::acquire(&cfg.state_dir, &dom.name)?) };
    let cat = catalog::load(zfs, dom).await.map_err(list)?;
    let decisions = retention::plan(&cat.snaps(), &dom.policy, now);
    let mut report = PruneReport {
        domain: dom.name.clone(),
        dry_run,
        now,
        decisions: decisions.clone(),
        destroyed: Vec::new(),
        ram_dropped: Vec::new(),
        ram_deleted: Vec::new(),
        warnings: Vec::new(),
    };
    let mut doomed: Vec<&str> = decisions.iter().filter(|d| !d.keep).map(|d| d.name.as_str()).collect();
    let dropping: Vec<&str> = decisions.iter().filter(|d| d.keep && d.drop_ram).map(|d| d.name.as_str()).collect();
    if dry_run {
        report.destroyed = doomed.iter().map(|s| s.to_string()).collect();
        report.ram_dropped = dropping.iter().map(|s| s.to_string()).collect();
        report.ram_deleted = unreferenced_dumps(cfg, &cat, &doomed, &dropping, &mut report.warnings);
        return Ok(report);
    }
    let policy = &dom.policy;
    if let Some(script) = &policy.scripts.pre_pruning {
        let mut allowed = Vec::new();
        for name in doomed {
            match scripts::run(script, &script_env(dom, &cat, name, "prune"), policy.scripts.timeout).await {
                Ok(()) => allowed.push(name),
                Err(e) => report.warnings.push(format!("{name} kept: pre_pruning_script failed: {e}")),
            }
        }
        doomed = allowed;
    }
    // One destroy per dataset: ZFS checks every name first and destroys none if one is held.
    let mut per_dataset: BTreeMap<String, (crate::zfs::Dataset, Vec<&str>)> = BTreeMap::new();
    for e in cat.entries.iter().filter(|e| doomed.contains(&e.snap.name.as_str())) {
        for ds in &e.datasets {
            per_dataset.entry(ds.to_string()).or_insert_with(|| (ds.clone(), Vec::new())).1.push(e.snap.name.as_str());
        }
    }
    for (ds, names) in per_dataset.values() {
        tracing::info!(domain = %dom.name, dataset = %ds, "destroying {}", names.join(","));
        zfs.destroy_many(ds, names).await.map_err(|source| PruneError::Destroy {
            domain: dom.name.clone(),
            dataset: ds.to_string(),
            snapshots: names.join(","),
            source,
        })?;
    }
    report.destroyed = doomed.iter().map(|s| s.to_string()).collect();
    let ram_dump = prop::RAM_DUMP;
    let ram_pruned = prop::RAM_PRUNED;
    for e in cat.entries.iter().filter(|e| dropping.contains(&e.snap.name.as_str())) {
        for ds in &e.datasets {
            let full = format!("{ds}@{}", e.snap.name);
            let mark = |source| PruneError::MarkRam { domain: dom.name.clone(), snapshot: full.clone(), source };
            zfs.set_property(&full, &ram_pruned, &now.to_string()).await.map_err(mark)?;
            zfs.inherit(&full, &ram_dump).await.map_err(mark)?;
        }
        report.ram_dropped.push(e.snap.name.clone());
    }
    // Dumps go only once no snapshot references them any more (read back from ZFS).
    let after = catalog::load(zfs, dom).await.map_err(list)?;
    let gone: Vec<PathBuf> = unreferenced_dumps(cfg, &cat, &doomed, &dropping, &mut report.warnings);
    let still: BTreeSet<&str> = after.entries.iter().filter_map(|e| e.snap.ram_dump.as_deref()).collect();
    for dump in gone {
        if still.contains(dump.to_string_lossy().as_ref()) {
            continue;
        }
        match std::fs::remove_file(&dump) {
            Ok(()) => report.ram_deleted.push(dump),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.warnings.push(format!("could not delete RAM dump {}: {e}", dump.display())),
        }
    }
    if let Some(script) = &policy.scripts.pruning {
        for name in &report.destroyed {
            if let Err(e) = scripts::run(script, &script_env(dom, &cat, name, "prune"), policy.scripts.timeout).await {
                report.warnings.push(format!("pruning_script after {name}: {e}"));
            }
        }
    }
    Ok(report)
}

fn script_env(dom: &DomainConfig, cat: &Catalog, name: &str, script: &'static str) -> ScriptEnv {
    let e = cat.entries.iter().find(|e| e.snap.name == name);
    ScriptEnv {
        domain: dom.name.clone(),
        script,
        targets: e.map(|e| e.datasets.iter().map(ToString::to_string).collect()).unwrap_or_default(),
        snapnames: vec![name.to_owned()],
        types: e.map(|e| e.snap.periods.iter().map(|p| p.as_str().to_owned()).collect()).unwrap_or_default(),
    }
}

/// The dumps of `doomed` and `dropping` snapshots that no other snapshot of the catalog
/// references, and that lie inside `ram_dir` (a property is data: vmsnap deletes only its own
/// files).
fn unreferenced_dumps(cfg: &Config, cat: &Catalog, doomed: &[&str], dropping: &[&str], warnings: &mut Vec<String>) -> Vec<PathBuf> {
    let going = |n: &str| doomed.contains(&n) || dropping.contains(&n);
    let kept: BTreeSet<&str> = cat.entries.iter().filter(|e| !going(&e.snap.name)).filter_map(|e| e.snap.ram_dump.as_deref()).collect();
    let mut out = BTreeSet::new();
    for e in cat.entries.iter().filter(|e| going(&e.snap.name)) {
        let Some(dump) = e.snap.ram_dump.as_deref() else { continue };
        if kept.contains(dump) {
            continue;
        }
        let path = Path::new(dump);
        if !inside(path, &cfg.ram_dir) {
            warnings.push(format!("RAM dump {dump} of {} is outside ram_dir {}: left alone", e.snap.name, cfg.ram_dir.display()));
            continue;
        }
        out.insert(path.to_owned());
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dumps_inside_ram_dir() {
        let d = Path::new("/srv/ram");
        assert!(inside(Path::new("/srv/ram/web/x.ram"), d));
        assert!(!inside(Path::new("/srv/ram/../etc/passwd"), d));
        assert!(!inside(Path::new("/etc/passwd"), d));
        assert!(!inside(Path::new("srv/ram/x"), d));
    }
}
