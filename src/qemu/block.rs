//! Typed helpers for the block graph: an overlay opened through an fdset, the `transaction` that
//! switches disks onto overlays, and removing nodes again.

use super::qmp::{Qmp, QmpError};
use qapi::qmp::{
    self, BlockdevOptions, BlockdevOptionsBase, BlockdevOptionsFile, BlockdevOptionsGenericCOWFormat, BlockdevOptionsGenericFormat,
};
use qapi::qmp::{BlockdevOptionsQcow2, BlockdevRef, BlockdevRefOrNull, BlockdevSnapshot, BlockdevSnapshotWrapper, TransactionAction};

fn base(node: &str) -> BlockdevOptionsBase {
    BlockdevOptionsBase {
        auto_read_only: None,
        cache: None,
        detect_zeroes: None,
        discard: None,
        force_share: None,
        node_name: Some(node.to_owned()),
        read_only: None,
    }
}

/// `blockdev-add` of a `file` protocol node for `filename` (a path, or `/dev/fdset/N`).
pub fn file_node(node: &str, filename: &str) -> BlockdevOptions {
    BlockdevOptions::file {
        base: base(node),
        file: BlockdevOptionsFile {
            aio: None,
            aio_max_batch: None,
            drop_cache: None,
            locking: None,
            pr_manager: None,
            x_check_cache_dropped: None,
            filename: filename.to_owned(),
        },
    }
}

/// `blockdev-add` of a qcow2 node on protocol node `file_node`, with no backing opened
/// (`backing: null`): `blockdev-snapshot` attaches the current disk as its backing.
pub fn qcow2_overlay_node(node: &str, file_node: &str) -> BlockdevOptions {
    BlockdevOptions::qcow2 {
        base: base(node),
        qcow2: BlockdevOptionsQcow2 {
            base: BlockdevOptionsGenericCOWFormat {
                base: BlockdevOptionsGenericFormat { file: BlockdevRef::reference(file_node.to_owned()) },
                backing: Some(BlockdevRefOrNull::null(())),
            },
            cache_clean_interval: None,
            cache_size: None,
            data_file: None,
            discard_no_unref: None,
            encrypt: None,
            l2_cache_entry_size: None,
            l2_cache_size: None,
            lazy_refcounts: None,
            overlap_check: None,
            pass_discard_other: None,
            pass_discard_request: None,
            pass_discard_snapshot: None,
            refcount_cache_size: None,
        },
    }
}

impl Qmp {
    /// `blockdev-add`.
    ///
    /// # Errors
    /// As [`Qmp::execute`]; QEMU answers `GenericError` for a file it cannot open.
    pub async fn blockdev_add(&self, options: BlockdevOptions) -> Result<(), QmpError> {
        self.execute(&qmp::blockdev_add(options)).await?;
        Ok(())
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&self, node: &str) -> Result<(), QmpError> {
        self.execute(&qmp::blockdev_del { node_name: node.to_owned() }).await?;
        Ok(())
    }

    /// One `transaction` of `blockdev-snapshot` actions: every `(disk node, overlay node)` pair
    /// switches at the same instant, or none does.
    pub async fn snapshot_transaction(&self, pairs: &[(String, String)]) -> Result<(), QmpError> {
        let actions = pairs
            .iter()
            .map(|(node, overlay)| {
                TransactionAction::blockdev_snapshot(BlockdevSnapshotWrapper {
                    data: BlockdevSnapshot { node: node.clone(), overlay: overlay.clone() },
                })
            })
            .collect();
        self.execute(&qmp::transaction { actions, properties: None }).await?;
        Ok(())
    }

    /// The names of every node in the block graph.
    pub async fn node_names(&self) -> Result<Vec<String>, QmpError> {
        let nodes = self.execute(&qmp::query_named_block_nodes { flat: Some(true) }).await?;
        Ok(nodes.into_iter().filter_map(|n| n.node_name).collect())
    }
}
