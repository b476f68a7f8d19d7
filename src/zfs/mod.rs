//! ZFS: the datasets that hold a VM's disks, and their snapshots.
//!
//! [`names`] validates names, [`parse`] turns `zfs -H -p` text into types, [`command`] runs the
//! binaries; this module puts them together into the operations vmsnap needs. Every listing asks
//! for explicit columns with `-H -p`.

pub(crate) mod command;
pub(crate) mod error;
pub(crate) mod names;
pub(crate) mod parse;

pub use command::ZfsCli;
pub use error::ZfsError;
pub use names::{Dataset, NameError, PropName, SnapshotName};
pub use parse::{DatasetInfo, DatasetKind, Hold, SnapshotInfo};

use crate::zargs;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

/// Replication targets' trees on this host ([`Zfs::serve_roots`]): what lies below one is a
/// source's replica, never this host's own.
#[derive(Debug, Clone, Default)]
pub struct ServeRoots(Vec<String>);

impl ServeRoots {
    /// Whether `name` (a dataset or `dataset@snapshot`) is a serve root or lies below one.
    pub fn contain(&self, name: &str) -> bool {
        let dataset = name.split_once('@').map_or(name, |(d, _)| d);
        self.0.iter().any(|r| dataset == r || dataset.strip_prefix(r.as_str()).is_some_and(|rest| rest.starts_with('/')))
    }
}

/// The ZFS operations, over a [`ZfsCli`].
#[derive(Debug, Clone, Default)]
pub struct Zfs {
    cli: ZfsCli,
}

impl Zfs {
    pub fn new(cli: ZfsCli) -> Self {
        Self { cli }
    }

    pub fn cli(&self) -> &ZfsCli {
        &self.cli
    }

    /// Filesystems and volumes: all of them, or `root` and (if `recursive`) its descendants.
    ///
    /// # Errors
    /// [`ZfsError::NotFound`] for a missing root, [`ZfsError::Parse`] for output vmsnap cannot read.
    pub async fn list_datasets(&self, root: Option<&Dataset>, recursive: bool) -> Result<Vec<DatasetInfo>, ZfsError> {
        let mut args = zargs!["list", "-H", "-p", "-t", "filesystem,volume", "-o", parse::DATASET_COLUMNS.join(",")];
        if recursive {
            args.push("-r".into());
        }
        if let Some(root) = root {
            args.push(root.as_str().into());
        }
        Ok(parse::datasets(&self.cli.zfs(args).await?)?)
    }

    /// The snapshots of `dataset` (not of its children), oldest first by `createtxg`, with the
    /// user properties in `props`.
    pub async fn list_snapshots(&self, dataset: &Dataset, props: &[PropName]) -> Result<Vec<SnapshotInfo>, ZfsError> {
        let mut columns: Vec<&str> = parse::SNAPSHOT_COLUMNS.to_vec();
        columns.extend(props.iter().map(PropName::as_str));
        let args = zargs!["list", "-H", "-p", "-t", "snapshot", "-d", "1", "-s", "createtxg", "-o", columns.join(","), dataset.as_str()];
        Ok(parse::snapshots(&self.cli.zfs(args).await?, props)?)
    }

    /// Takes `snap` of every dataset in `datasets` in one `zfs snapshot` call, which OpenZFS makes
    /// atomic (all or none) within a pool. `props` are set on every new snapshot.
    ///
    /// # Errors
    /// [`ZfsError::AlreadyExists`], [`ZfsError::NotFound`]; nothing is created then.
    /// [`ZfsError::CrossPool`] before running anything when the datasets span pools: OpenZFS
    /// refuses such a call as a whole.
    pub async fn snapshot(
        &self,
        datasets: &[Dataset],
        snap: &str,
        props: &BTreeMap<PropName, String>,
    ) -> Result<Vec<SnapshotName>, ZfsError> {
        let pools: std::collections::BTreeSet<&str> = datasets.iter().map(Dataset::pool).collect();
        if pools.len() > 1 {
            return Err(ZfsError::CrossPool { pools: pools.into_iter().collect::<Vec<_>>().join(", ") });
        }
        let names = datasets.iter().map(|d| d.snapshot(snap)).collect::<Result<Vec<_>, _>>()?;
        let mut args = zargs!["snapshot"];
        for (k, v) in props {
            args.push("-o".into());
            args.push(format!("{k}={v}").into());
        }
        args.extend(names.iter().map(|n| OsString::from(n.to_string())));
        self.cli.zfs(args).await?;
        Ok(names)
    }

    /// Destroys one snapshot. Only a [`SnapshotName`] can be given.
    pub async fn destroy(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        match self.cli.zfs(zargs!["destroy", snap.to_string()]).await {
            Err(ZfsError::NotFound { name }) if name.is_empty() => Err(ZfsError::NotFound { name: snap.to_string() }),
            other => other.map(drop),
        }
    }

    /// Destroys several snapshots of one dataset in one call (`zfs destroy ds@a,b,c`): ZFS
    /// checks them all first and destroys none when one is held or has clones.
    pub async fn destroy_many(&self, dataset: &Dataset, snaps: &[&str]) -> Result<(), ZfsError> {
        if snaps.is_empty() {
            return Ok(());
        }
        // Each name is validated as a snapshot of this dataset: no ',' or '@' can slip in.
        for s in snaps {
            dataset.snapshot(s)?;
        }
        self.cli.zfs(zargs!["destroy", format!("{dataset}@{}", snaps.join(","))]).await?;
        Ok(())
    }

    /// Removes a user property set on a dataset or snapshot (`zfs inherit`).
    pub async fn inherit(&self, name: &str, prop: &PropName) -> Result<(), ZfsError> {
        self.cli.zfs(zargs!["inherit", prop.to_string(), name]).await?;
        Ok(())
    }

    /// Places hold `tag` on each snapshot (one call: all or none).
    pub async fn hold(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        let mut args = zargs!["hold", tag];
        args.extend(snaps.iter().map(|s| OsString::from(s.to_string())));
        self.cli.zfs(args).await?;
        Ok(())
    }

    /// Releases hold `tag` from each snapshot.
    pub async fn release(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        let mut args = zargs!["release", tag];
        args.extend(snaps.iter().map(|s| OsString::from(s.to_string())));
        self.cli.zfs(args).await?;
        Ok(())
    }

    /// The holds on `snap`.
    pub async fn holds(&self, snap: &SnapshotName) -> Result<Vec<Hold>, ZfsError> {
        self.holds_of(std::slice::from_ref(snap)).await
    }

    /// The holds on each of `snaps`, in one call (none for an empty list).
    pub async fn holds_of(&self, snaps: &[SnapshotName]) -> Result<Vec<Hold>, ZfsError> {
        if snaps.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = zargs!["holds", "-H", "-p"];
        args.extend(snaps.iter().map(|s| OsString::from(s.to_string())));
        Ok(parse::holds(&self.cli.zfs(args).await?)?)
    }

    /// The user properties set locally (or received) on a dataset or snapshot.
    pub async fn user_properties(&self, name: &str) -> Result<BTreeMap<PropName, String>, ZfsError> {
        let text = self.cli.zfs(zargs!["get", "-H", "-p", "-o", "name,property,value,source", "all", name]).await?;
        Ok(parse::user_properties(&text)?.remove(name).unwrap_or_default())
    }

    /// The given user properties of every snapshot of `dataset` (not of its children), only
    /// where they are set on the snapshot itself (`local`) or arrived with it (`received`):
    /// never a value inherited from the dataset, which anyone may have set.
    pub async fn local_snapshot_properties(
        &self,
        dataset: &Dataset,
        props: &[PropName],
    ) -> Result<BTreeMap<String, BTreeMap<PropName, String>>, ZfsError> {
        let names: Vec<&str> = props.iter().map(PropName::as_str).collect();
        let args = zargs![
            "get",
            "-H",
            "-p",
            "-d",
            "1",
            "-t",
            "snapshot",
            "-s",
            "local,received",
            "-o",
            "name,property,value,source",
            names.join(","),
            dataset.as_str()
        ];
        Ok(parse::user_properties(&self.cli.zfs(args).await?)?)
    }

    /// The given user properties of every snapshot on the system, where set on the snapshot
    /// itself or received with it (never inherited): snapshot name → properties.
    pub async fn all_snapshot_properties(&self, props: &[PropName]) -> Result<BTreeMap<String, BTreeMap<PropName, String>>, ZfsError> {
        let names: Vec<&str> = props.iter().map(PropName::as_str).collect();
        let args = zargs!["get", "-H", "-p", "-t", "snapshot", "-s", "local,received", "-o", "name,property,value,source", names.join(",")];
        Ok(parse::user_properties(&self.cli.zfs(args).await?)?)
    }

    /// A native property's parsable value (`-p`); `None` when ZFS says `-` or the dataset does
    /// not exist.
    pub async fn get_native(&self, name: &str, prop: &str) -> Result<Option<String>, ZfsError> {
        match self.cli.zfs(zargs!["get", "-H", "-p", "-o", "value", prop, name]).await {
            Ok(v) => Ok(Some(v.trim_end_matches('\n').to_owned()).filter(|v| v != "-" && !v.is_empty())),
            Err(ZfsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The value of `prop` set on `name` itself (`-s local`: never inherited or received);
    /// `None` when it is not set there or `name` does not exist.
    pub async fn get_local(&self, name: &str, prop: &PropName) -> Result<Option<String>, ZfsError> {
        match self.cli.zfs(zargs!["get", "-H", "-s", "local", "-o", "value", prop.as_str(), name]).await {
            Ok(v) => Ok(Some(v.trim_end_matches('\n').to_owned()).filter(|v| !v.is_empty())),
            Err(ZfsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Several native properties' parsable values in one call: property → value, without those
    /// ZFS says `-` of; `None` when the dataset does not exist.
    pub async fn get_natives(&self, name: &str, props: &[&str]) -> Result<Option<BTreeMap<String, String>>, ZfsError> {
        match self.cli.zfs(zargs!["get", "-H", "-p", "-o", "property,value", props.join(","), name]).await {
            Ok(text) => Ok(Some(
                text.lines()
                    .filter_map(|l| l.split_once('\t'))
                    .filter(|(_, v)| *v != "-" && !v.is_empty())
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )),
            Err(ZfsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The clones of each snapshot of `dataset` that has any (snapshot name after `@` → the
    /// clones' dataset names).
    pub async fn clones(&self, dataset: &Dataset) -> Result<BTreeMap<String, Vec<String>>, ZfsError> {
        let out = self.cli.zfs(zargs!["list", "-H", "-p", "-t", "snapshot", "-d", "1", "-o", "name,clones", dataset.as_str()]).await?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (name, clones) = l.split_once('\t')?;
                let clones: Vec<String> =
                    clones.split(',').map(str::trim).filter(|c| !c.is_empty() && *c != "-").map(str::to_owned).collect();
                Some((name.split_once('@')?.1.to_owned(), clones)).filter(|(_, c)| !c.is_empty())
            })
            .collect())
    }

    /// `zfs bookmark SNAP DATASET#NAME` (`name` is vmsnap's own, checked by the caller).
    pub async fn bookmark(&self, snap: &SnapshotName, name: &str) -> Result<(), ZfsError> {
        self.cli.zfs(zargs!["bookmark", snap.to_string(), format!("{}#{name}", snap.dataset())]).await?;
        Ok(())
    }

    /// The bookmarks of `dataset`: (name after `#`, guid, createtxg), oldest first.
    pub async fn bookmarks(&self, dataset: &Dataset) -> Result<Vec<(String, u64, u64)>, ZfsError> {
        let text = self
            .cli
            .zfs(zargs!["list", "-H", "-p", "-t", "bookmark", "-d", "1", "-s", "createtxg", "-o", "name,guid,createtxg", dataset.as_str()])
            .await?;
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            let parsed =
                (f.len() == 3).then(|| Some((f[0].split_once('#')?.1.to_owned(), f[1].parse().ok()?, f[2].parse().ok()?))).flatten();
            out.push(parsed.ok_or_else(|| ZfsError::Unexpected { what: format!("a bookmark line {line:?}") })?);
        }
        Ok(out)
    }

    /// Destroys the bookmark `dataset#name`.
    pub async fn destroy_bookmark(&self, dataset: &Dataset, name: &str) -> Result<(), ZfsError> {
        self.cli.zfs(zargs!["destroy", format!("{dataset}#{name}")]).await?;
        Ok(())
    }

    /// Sets a user property on a dataset or snapshot.
    pub async fn set_property(&self, name: &str, prop: &PropName, value: &str) -> Result<(), ZfsError> {
        self.cli.zfs(zargs!["set", format!("{prop}={value}"), name]).await?;
        Ok(())
    }

    /// Sets one user property to the same value on each of `names`, in one `zfs set` per
    /// hundred names (a receive that brought many snapshots marks them all).
    pub async fn set_property_on(&self, names: &[String], prop: &PropName, value: &str) -> Result<(), ZfsError> {
        for chunk in names.chunks(100) {
            let mut args = zargs!["set", format!("{prop}={value}")];
            args.extend(chunk.iter().map(OsString::from));
            self.cli.zfs(args).await?;
        }
        Ok(())
    }

    /// The given user properties of each of `names` (datasets or snapshots) in one `zfs get`,
    /// only where their source is one of `sources` (`"local"`, `"local,received"`): name →
    /// properties, without the names that have none of them.
    pub async fn properties_of(
        &self,
        names: &[String],
        props: &[PropName],
        sources: &str,
    ) -> Result<BTreeMap<String, BTreeMap<PropName, String>>, ZfsError> {
        if names.is_empty() || props.is_empty() {
            return Ok(BTreeMap::new());
        }
        let columns: Vec<&str> = props.iter().map(PropName::as_str).collect();
        let mut args = zargs!["get", "-H", "-p", "-s", sources, "-o", "name,property,value,source", columns.join(",")];
        args.extend(names.iter().map(OsString::from));
        Ok(parse::user_properties(&self.cli.zfs(args).await?)?)
    }

    /// Sets several user properties in one `zfs set` (one ioctl: all of them or none).
    pub async fn set_properties(&self, name: &str, props: &BTreeMap<PropName, String>) -> Result<(), ZfsError> {
        let mut args = zargs!["set"];
        args.extend(props.iter().map(|(k, v)| OsString::from(format!("{k}={v}"))));
        args.push(name.into());
        self.cli.zfs(args).await?;
        Ok(())
    }

    /// Rolls `snap`'s dataset back to it. With `destroy_newer`, newer snapshots are destroyed
    /// (`-r`); without, a newer snapshot makes it fail with [`ZfsError::NewerSnapshots`].
    pub async fn rollback(&self, snap: &SnapshotName, destroy_newer: bool) -> Result<(), ZfsError> {
        let mut args = zargs!["rollback"];
        if destroy_newer {
            args.push("-r".into());
        }
        args.push(snap.to_string().into());
        self.cli.zfs(args).await?;
        Ok(())
    }

    /// `zfs promote`: the clone `dataset` no longer depends on its origin snapshot.
    pub async fn promote(&self, dataset: &Dataset) -> Result<(), ZfsError> {
        self.cli.zfs(zargs!["promote", dataset.as_str()]).await?;
        Ok(())
    }

    /// Destroys the dataset `dataset` (no `-r`: one that has snapshots or children stays).
    pub async fn destroy_dataset(&self, dataset: &Dataset) -> Result<(), ZfsError> {
        self.cli.zfs(zargs!["destroy", dataset.as_str()]).await?;
        Ok(())
    }

    /// Clones `snap` into a new dataset `target`.
    pub async fn clone_snapshot(&self, snap: &SnapshotName, target: &Dataset, props: &BTreeMap<PropName, String>) -> Result<(), ZfsError> {
        let mut args = zargs!["clone"];
        for (k, v) in props {
            args.push("-o".into());
            args.push(format!("{k}={v}").into());
        }
        args.push(snap.to_string().into());
        args.push(target.as_str().into());
        self.cli.zfs(args).await?;
        Ok(())
    }

    /// The datasets (on every imported pool) having a snapshot whose own property `prop` is
    /// `value` (`-s local`: a value received with a replica does not count), in name order;
    /// never one below a replication target's root ([`ServeRoots`]).
    pub async fn datasets_with_snapshot_property(&self, prop: PropName, value: &str) -> Result<Vec<Dataset>, ZfsError> {
        let out = self.cli.zfs(zargs!["get", "-H", "-t", "snapshot", "-s", "local", "-o", "name,value", prop.as_str()]).await?;
        let roots = self.serve_roots().await?;
        let mut found: Vec<Dataset> = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(name, v)| *v == value && !roots.contain(name))
            .filter_map(|(name, _)| Dataset::new(name.split_once('@')?.0).ok())
            .collect();
        found.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        found.dedup();
        Ok(found)
    }

    /// The datasets where `prop` is set on the dataset itself (`-s local`), on every imported
    /// pool (or on `root` and below), in name order: never a value inherited or received.
    pub async fn datasets_with_local(&self, prop: &PropName, types: &str, root: Option<&Dataset>) -> Result<Vec<String>, ZfsError> {
        let mut args = zargs!["get", "-H", "-t", types, "-s", "local", "-o", "name", prop.as_str()];
        if let Some(root) = root {
            args.extend(zargs!["-r", root.as_str()]);
        }
        let mut names: Vec<String> = self.cli.zfs(args).await?.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
        names.sort();
        Ok(names)
    }

    /// The replication targets' trees on this host: datasets `vmsnap serve` marked as its root
    /// ([`crate::model::prop::SERVE_ROOT`], set locally).
    pub async fn serve_roots(&self) -> Result<ServeRoots, ZfsError> {
        let roots = self.datasets_with_local(&crate::model::prop::SERVE_ROOT, "filesystem,volume", None).await?;
        Ok(ServeRoots(roots))
    }

    /// The dataset a disk image lives on: `/dev/zvol/POOL/VOL` is the volume `POOL/VOL`; a file is
    /// on the mounted filesystem with the longest mountpoint that contains it.
    ///
    /// # Errors
    /// [`ZfsError::NoDatasetFor`] when no ZFS dataset holds the path.
    pub async fn dataset_of(&self, path: &Path) -> Result<Dataset, ZfsError> {
        if let Some(vol) = zvol_name(path) {
            return Ok(Dataset::new(&vol)?);
        }
        // A path that does not exist has no dataset (never "the nearest mounted parent").
        let real = std::fs::canonicalize(path).map_err(|_| ZfsError::NotFound { name: path.display().to_string() })?;
        if let Some(vol) = zvol_name(&real) {
            return Ok(Dataset::new(&vol)?);
        }
        let all = self.list_datasets(None, false).await?;
        longest_mount(&all, &real).ok_or_else(|| ZfsError::NoDatasetFor { path: path.display().to_string() })
    }
}

fn zvol_name(path: &Path) -> Option<String> {
    let rest = path.strip_prefix("/dev/zvol").ok()?;
    let name = rest.to_str()?.trim_matches('/');
    (!name.is_empty()).then(|| name.to_owned())
}

/// Pure: the mounted filesystem whose mountpoint is the longest prefix (by components) of `path`.
pub fn longest_mount(datasets: &[DatasetInfo], path: &Path) -> Option<Dataset> {
    datasets
        .iter()
        .filter(|d| d.mounted)
        .filter_map(|d| d.mountpoint.as_ref().map(|m| (m, &d.name)))
        .filter(|(m, _)| path.starts_with(m))
        .max_by_key(|(m, _)| m.components().count())
        .map(|(_, name)| name.clone())
}

/// The device node of zvol `volume` (`/dev/zvol/<volume>`), once udev has made it (a new clone's
/// appears a moment after `zfs clone`); `None` when it did not within `wait`.
pub async fn zvol_node(volume: &str, wait: std::time::Duration) -> Option<std::path::PathBuf> {
    let dev = std::path::Path::new("/dev/zvol").join(volume);
    let deadline = std::time::Instant::now() + wait;
    loop {
        if dev.exists() {
            return Some(dev);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zvol_paths_map_to_volumes() {
        assert_eq!(zvol_name(Path::new("/dev/zvol/tank/vms/vm1-disk0")).as_deref(), Some("tank/vms/vm1-disk0"));
        assert_eq!(zvol_name(Path::new("/var/lib/x.qcow2")), None);
        assert_eq!(zvol_name(Path::new("/dev/zvol/")), None);
    }

    #[test]
    fn file_maps_to_longest_mounted_mountpoint() {
        let ds = parse::datasets("tank\tfilesystem\t1\t/tank\tyes\ntank/vms\tfilesystem\t1\t/tank/vms\tyes\ntank/vmsx\tfilesystem\t1\t/tank/vmsx\tyes\ntank/off\tfilesystem\t1\t/tank/vms/off\tno\n").unwrap();
        let pick = |p: &str| longest_mount(&ds, Path::new(p)).map(|d| d.to_string());
        assert_eq!(pick("/tank/vms/vm1/disk.qcow2").as_deref(), Some("tank/vms"));
        assert_eq!(pick("/tank/vmsx/disk.qcow2").as_deref(), Some("tank/vmsx"));
        assert_eq!(pick("/tank/vms/off/disk.qcow2").as_deref(), Some("tank/vms"));
        assert_eq!(pick("/srv/disk.qcow2"), None);
    }

    #[test]
    fn serve_roots_contain_their_tree_only() {
        let roots = ServeRoots(vec!["backup/replica".into(), "usb/vmsnap".into()]);
        for name in ["backup/replica", "backup/replica/tank/vms/web", "backup/replica/tank/vms/web@autosnap_x", "usb/vmsnap@s"] {
            assert!(roots.contain(name), "{name}");
        }
        for name in ["backup/replica2", "backup/replica2/x@s", "backup", "tank/vms/web@s", "usb/vmsnapper/x"] {
            assert!(!roots.contain(name), "{name}");
        }
    }
}
