//! What a replication target destroys, and only by its own rules:
//! - [`prune`]: the target's own retention (`vmsnap serve --keep …`), applied to one domain's
//!   replicas when a source has finished sending; the source chooses neither the policy nor the
//!   time. The RAM dumps of destroyed snapshots go with them, and `ram_keep` drops older ones.
//! - [`rollback`]: `--rollback-target` on the source, honoured only when the target's forced
//!   command says `--allow-rollback`: snapshots newer than the common one are destroyed only
//!   when this target received them (a hand-made one refuses the whole request), then the dataset is
//!   rolled back to the common snapshot, which takes the replication hold.

use super::protocol::{PruneOutcome, RollbackOutcome};
use super::server::{ram_place, Server, HOLD};
use crate::config::policy::Policy;
use crate::model::prop;
use crate::retention::catalog;
use crate::zfs::{Dataset, SnapshotName};

/// The target's retention, from its command line.
#[derive(Debug, Clone)]
pub struct TargetPolicy {
    /// `--keep` as given (shown in replies).
    pub spec: String,
    pub policy: Policy,
}

impl Server {
    /// Every dataset below the root (the root itself holds nothing).
    async fn received_datasets(&self) -> Result<Vec<Dataset>, String> {
        let all = self.zfs.list_datasets(Some(&self.root), true).await.map_err(|e| e.to_string())?;
        Ok(all.into_iter().map(|d| d.name).filter(|d| *d != self.root).collect())
    }

    /// Applies the target's own policy to `domain`'s replicas (the snapshots below the root
    /// whose own `vmsnap:domain` names it and that this server received, [`prop::RECEIVED`]).
    pub(super) async fn prune(&self, domain: &str) -> Result<PruneOutcome, String> {
        if !crate::config::valid_domain_name(domain) {
            return Err(format!("{domain:?} is not a domain name"));
        }
        let Some(keep) = &self.keep else {
            return Ok(PruneOutcome { policy: None, ..Default::default() });
        };
        let now = self.now.unwrap_or_else(|| chrono::Utc::now().timestamp());
        let mut cat = catalog::load_from(&self.zfs, self.received_datasets().await?, domain).await.map_err(|e| e.to_string())?;
        // Only what this target received counts: a snapshot made on the target by hand is kept,
        // whatever `vmsnap:*` a source gave it.
        self.finish_pending().await?;
        let received = self.received_snapshots().await?;
        cat.entries.retain(|e| e.datasets.iter().all(|ds| received.contains(&format!("{ds}@{}", e.snap.name))));
        let decisions = crate::retention::plan(&cat.snaps(), &keep.policy, now);
        let mut out = PruneOutcome { policy: Some(keep.spec.clone()), now, ..Default::default() };
        let doomed: Vec<&str> = decisions.iter().filter(|d| !d.keep).map(|d| d.name.as_str()).collect();
        for ds in &cat.datasets {
            let here: Vec<&str> = cat
                .entries
                .iter()
                .filter(|e| doomed.contains(&e.snap.name.as_str()) && e.datasets.contains(ds))
                .map(|e| e.snap.name.as_str())
                .collect();
            if !here.is_empty() {
                tracing::info!(dataset = %ds, "target retention destroys {}", here.join(","));
                self.zfs.destroy_many(ds, &here).await.map_err(|e| format!("destroying {} on {ds}: {e}", here.join(",")))?;
            }
        }
        out.destroyed = doomed.iter().map(|s| s.to_string()).collect();
        for name in &out.destroyed {
            out.ram_deleted.extend(self.delete_dump(domain, name)?);
        }
        for d in decisions.iter().filter(|d| d.keep && d.drop_ram) {
            let Some(e) = cat.entries.iter().find(|e| e.snap.name == d.name) else { continue };
            if e.snap.ram_dump.is_none() {
                continue;
            }
            for ds in &e.datasets {
                let full = format!("{ds}@{}", d.name);
                self.zfs.set_property(&full, &prop::RAM_PRUNED, &now.to_string()).await.map_err(|e| format!("{full}: {e}"))?;
                self.zfs.inherit(&full, &prop::RAM_DUMP).await.map_err(|e| format!("{full}: {e}"))?;
            }
            out.ram_deleted.extend(self.delete_dump(domain, &d.name)?);
            out.ram_dropped.push(d.name.clone());
        }
        out.kept = decisions.iter().filter(|d| d.keep).count();
        Ok(out)
    }

    /// Deletes this target's copy of a dump (whole or partial): the path is the target's own
    /// rule, never a property's value.
    fn delete_dump(&self, domain: &str, snapshot: &str) -> Result<Vec<String>, String> {
        let (dir, name) = ram_place(&self.ram_dir, domain, snapshot)?;
        let mut gone = Vec::new();
        for file in [dir.join(&name), dir.join(format!("{name}.part"))] {
            match std::fs::remove_file(&file) {
                Ok(()) => gone.push(file.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("deleting {}: {e}", file.display())),
            }
        }
        Ok(gone)
    }

    /// Rolls `ds` back to its snapshot whose GUID is `to_guid`, destroying the newer ones, when
    /// this target allows it and it received every one of them.
    pub(super) async fn rollback(&self, ds: &Dataset, to_guid: u64) -> Result<RollbackOutcome, String> {
        if !self.allow_rollback {
            return Err("this target does not let sources roll it back: its forced command would need --allow-rollback; \
                        clean it up on the target host instead"
                .into());
        }
        let snaps = self.zfs.list_snapshots(ds, &[]).await.map_err(|e| e.to_string())?;
        let Some(at) = snaps.iter().position(|s| s.guid == to_guid) else {
            return Err(format!("{ds} has no snapshot with guid {to_guid}"));
        };
        let newer = &snaps[at + 1..];
        let own = self.zfs.local_snapshot_properties(ds, &[prop::DOMAIN]).await.map_err(|e| e.to_string())?;
        self.finish_pending().await?;
        let received = self.received_snapshots().await?;
        let foreign: Vec<String> =
            newer.iter().filter(|s| !received.contains(&s.name.to_string())).map(|s| format!("{} (guid {})", s.name, s.guid)).collect();
        if !foreign.is_empty() {
            return Err(format!(
                "not rolled back: {} not made by vmsnap: {}",
                if foreign.len() == 1 { "this snapshot is" } else { "these snapshots are" },
                foreign.join(", ")
            ));
        }
        let base: &SnapshotName = &snaps[at].name;
        let mut out = RollbackOutcome { to: base.snap().to_owned(), destroyed: Vec::new(), ram_deleted: Vec::new() };
        for s in newer {
            if self.zfs.holds(&s.name).await.map_err(|e| e.to_string())?.iter().any(|h| h.tag == HOLD) {
                self.zfs.release(HOLD, std::slice::from_ref(&s.name)).await.map_err(|e| format!("release {}: {e}", s.name))?;
            }
        }
        // `zfs rollback -r` destroys the newer snapshots and the changes since the base.
        self.zfs.rollback(base, true).await.map_err(|e| format!("rollback to {base}: {e}"))?;
        // A dump goes once no other dataset of its domain still has the snapshot: one catalog
        // per domain, read after the rollback.
        let mut by_domain: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
        for s in newer {
            out.destroyed.push(s.name.snap().to_owned());
            if let Some(domain) = own.get(&s.name.to_string()).and_then(|p| p.get(&prop::DOMAIN)) {
                by_domain.entry(domain.as_str()).or_default().push(s.name.snap());
            }
        }
        if !by_domain.is_empty() {
            let datasets = self.received_datasets().await?;
            for (domain, gone) in by_domain {
                let left = catalog::load_from(&self.zfs, datasets.clone(), domain).await.map_err(|e| e.to_string())?;
                for snap in gone.into_iter().filter(|g| !left.entries.iter().any(|e| e.snap.name == *g)) {
                    out.ram_deleted.extend(self.delete_dump(domain, snap)?);
                }
            }
        }
        match self.zfs.hold(HOLD, std::slice::from_ref(base)).await {
            Ok(()) | Err(crate::zfs::ZfsError::AlreadyExists { .. }) => {}
            Err(e) => return Err(format!("hold {base}: {e}")),
        }
        Ok(out)
    }
}
