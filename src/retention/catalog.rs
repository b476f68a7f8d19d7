//! A domain's snapshots as vmsnap sees them: one entry per snapshot name across all the
//! domain's datasets, read from ZFS (creation times, holds, vmsnap's properties). Retention,
//! pruning, the scheduler and `vmsnap check` all start from here.

use crate::config::DomainConfig;
use crate::engine::disks::domain_datasets;
use crate::model::prop;
use crate::retention::{periods_of, Snap};
use crate::zfs::{Dataset, PropName, Zfs, ZfsError};
use std::collections::BTreeMap;

/// One snapshot name of a domain.
#[derive(Debug, Clone)]
pub struct Entry {
    pub snap: Snap,
    /// The datasets that have a snapshot of this name.
    pub datasets: Vec<Dataset>,
    pub consistency: Option<String>,
    /// `vmsnap verify`'s last word on it ([`prop::VERIFIED`]).
    pub verified: Option<String>,
}

/// Everything [`load`] found.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// The domain's datasets (from its configured disks).
    pub datasets: Vec<Dataset>,
    /// Oldest first.
    pub entries: Vec<Entry>,
}

impl Catalog {
    pub fn snaps(&self) -> Vec<Snap> {
        self.entries.iter().map(|e| e.snap.clone()).collect()
    }
}

const PROPS: [PropName; 5] = [prop::DOMAIN, prop::PERIODS, prop::RAM_DUMP, prop::CONSISTENCY, prop::VERIFIED];

/// The snapshots vmsnap took of `dom` (those whose `vmsnap:domain` names it).
pub async fn load(zfs: &Zfs, dom: &DomainConfig) -> Result<Catalog, ZfsError> {
    let by_pool = domain_datasets(zfs, dom).await?;
    let datasets: Vec<Dataset> = by_pool.into_values().flatten().collect();
    load_from(zfs, datasets, &dom.name).await
}

/// The snapshots of `domain` on `datasets` (a replication target passes every dataset it holds;
/// the catalog's datasets are then those that have one).
pub async fn load_from(zfs: &Zfs, datasets: Vec<Dataset>, domain: &str) -> Result<Catalog, ZfsError> {
    let mut groups: BTreeMap<String, Entry> = BTreeMap::new();
    for ds in &datasets {
        // Only properties set on the snapshot itself count: a `vmsnap:domain` inherited from the
        // dataset would make sanoid's or a person's snapshots look like vmsnap's.
        let local = zfs.local_snapshot_properties(ds, &PROPS).await?;
        for s in zfs.list_snapshots(ds, &[]).await? {
            let own = local.get(&s.name.to_string());
            let get = |k: PropName| own.and_then(|p| p.iter().find(|(p, _)| **p == k)).map(|(_, v)| v.clone()).filter(|v| v != "-");
            if get(prop::DOMAIN).as_deref() != Some(domain) {
                continue;
            }
            let holds = if s.userrefs > 0 { zfs.holds(&s.name).await?.into_iter().map(|h| h.tag).collect() } else { Vec::new() };
            let short = s.name.snap().to_owned();
            let e = groups.entry(short.clone()).or_insert_with(|| Entry {
                snap: Snap {
                    name: short.clone(),
                    created: s.creation,
                    // Scheduled snapshots say which periods they serve; one taken by hand serves
                    // none, whatever its label (`--label daily` is not a daily).
                    periods: get(prop::PERIODS).map(|p| periods_of(&short, Some(&p))).unwrap_or_default(),
                    holds: Vec::new(),
                    ram_dump: None,
                },
                datasets: Vec::new(),
                consistency: get(prop::CONSISTENCY),
                verified: get(prop::VERIFIED),
            });
            e.snap.created = e.snap.created.min(s.creation);
            e.snap.holds.extend(holds);
            if e.snap.ram_dump.is_none() {
                e.snap.ram_dump = get(prop::RAM_DUMP);
            }
            e.datasets.push(ds.clone());
        }
    }
    let mut entries: Vec<Entry> = groups.into_values().collect();
    entries.sort_by(|a, b| a.snap.created.cmp(&b.snap.created).then_with(|| a.snap.name.cmp(&b.snap.name)));
    Ok(Catalog { datasets, entries })
}
