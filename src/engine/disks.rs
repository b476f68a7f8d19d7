//! The disks of a running VM, as QEMU reports them (`query-block`), and the ZFS datasets under
//! them.

use crate::config::DomainConfig;
use crate::qemu::qmp::Qmp;
use crate::zfs::{Dataset, Zfs, ZfsError};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One writable disk of a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    /// QEMU's device name or qdev path, for messages.
    pub device: String,
    /// The node at the top of its chain: the one an overlay goes on.
    pub node: String,
    /// The image file or block device under that node.
    pub path: PathBuf,
    /// The image format (`qcow2`, `raw`).
    pub format: String,
    pub virtual_size: u64,
}

/// The writable disks with a medium.
///
/// # Errors
/// QMP errors; a disk without a node name (vmsnap needs `-blockdev`-style node names) is refused.
pub async fn live_disks(qmp: &Qmp) -> Result<Vec<LiveDisk>, super::StepError> {
    let blocks = qmp.execute(&qapi::qmp::query_block {}).await?;
    let mut out = Vec::new();
    for b in blocks {
        let Some(ins) = b.inserted else { continue };
        if ins.ro {
            continue;
        }
        let device = b.qdev.clone().filter(|q| !q.is_empty()).unwrap_or_else(|| b.device.clone());
        let node = ins.node_name.clone().ok_or_else(|| {
            super::StepError::Refused(format!("disk {device} has no node name; vmsnap needs QEMU's -blockdev configuration"))
        })?;
        if ins.file.starts_with("/dev/fdset/") {
            return Err(super::StepError::Refused(format!(
                "disk {device} is on {} (node {node}): an overlay is still on top of it; run `vmsnap recover`",
                ins.file
            )));
        }
        out.push(LiveDisk {
            device,
            node,
            path: PathBuf::from(&ins.file),
            format: ins.drv.clone(),
            virtual_size: ins.image.base.virtual_size.max(0) as u64,
        });
    }
    Ok(out)
}

/// The datasets under `paths`, grouped by pool (one atomic `zfs snapshot` per pool), without
/// duplicates.
pub async fn datasets_by_pool(zfs: &Zfs, paths: &[PathBuf]) -> Result<BTreeMap<String, Vec<Dataset>>, ZfsError> {
    let mut by_pool: BTreeMap<String, Vec<Dataset>> = BTreeMap::new();
    for p in paths {
        let ds = zfs.dataset_of(p).await?;
        let list = by_pool.entry(ds.pool().to_owned()).or_default();
        if !list.contains(&ds) {
            list.push(ds);
        }
    }
    Ok(by_pool)
}

/// The datasets of `dom`, grouped by pool: those under its configured (or registered) disks.
/// A domain configured without `disks` (its running VM's disks are read from QEMU at each
/// snapshot) has the datasets holding snapshots vmsnap took of it (`vmsnap:domain` set on the
/// snapshot itself), so that listing, pruning and replication find them too.
pub async fn domain_datasets(zfs: &Zfs, dom: &DomainConfig) -> Result<BTreeMap<String, Vec<Dataset>>, ZfsError> {
    if !dom.disks.is_empty() {
        return datasets_by_pool(zfs, &dom.disks).await;
    }
    let mut by_pool: BTreeMap<String, Vec<Dataset>> = BTreeMap::new();
    for ds in zfs.datasets_with_snapshot_property(crate::model::prop::DOMAIN, &dom.name).await? {
        by_pool.entry(ds.pool().to_owned()).or_default().push(ds);
    }
    Ok(by_pool)
}
