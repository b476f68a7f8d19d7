//! `vmsnap mount` / `vmsnap umount`: single files out of a snapshot without restoring it.
//!
//! Every disk of the snapshot is opened read-only: a disk image through `qemu-nbd --read-only`
//! on the snapshot's own copy (`<mountpoint>/.zfs/snapshot/<snap>/…`, read-only by nature) with
//! the format the host defined (never probed: the guest wrote the image's first sector), a
//! zvol as a read-only clone (`<vol>-mnt-<snap>`, `readonly=on`). Each partition (or the whole
//! disk, when it has none) that holds a file system of a known kind (ext2/3/4, xfs, btrfs,
//! vfat, ntfs) is mounted below the chosen directory, which only root enters, as `disk<N>` or
//! `disk<N>-p<M>`: `ro,nosuid,nodev,noexec` (the guest's setuid files and device nodes are the
//! guest's, not the host's), without replaying a journal (`noload`, `norecovery`,
//! `rescue=nologreplay`: a crash-consistent snapshot is read as it is, never written). A hold
//! ([`HOLD`]) on the snapshot keeps pruning and restores from destroying it meanwhile.
//!
//! What was set up is written to `<state_dir>/mounts/<domain>@<snapshot>.json` *before* each
//! step, so `vmsnap umount` undoes exactly that, and `vmsnap recover` undoes a mount that was
//! interrupted half-way (a complete one stays until `umount`).

use super::find_unit;
use crate::config::Config;
use crate::engine::journal::fault_point;
use crate::integrity::saved_file;
use crate::zfs::{Dataset, SnapshotName, Zfs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The hold on every dataset's snapshot while it is mounted.
pub const HOLD: &str = "vmsnap-mount";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Restore(#[from] super::RestoreError),
    #[error("zfs: {0}")]
    Zfs(#[from] crate::zfs::ZfsError),
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {why}")]
    Step { what: String, why: String },
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> MountError {
    let what = what.into();
    move |why| MountError::Step { what, why }
}

/// One file system (or why a volume was not mounted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Volume {
    pub device: String,
    pub fstype: Option<String>,
    pub mountpoint: Option<PathBuf>,
    pub skipped: Option<String>,
}

/// Everything one mount set up; its file is the mount's journal.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountState {
    pub domain: String,
    pub snapshot: String,
    pub path: PathBuf,
    /// Set once every disk is open and mounted.
    pub complete: bool,
    /// Snapshots that carry [`HOLD`] (full names).
    pub holds: Vec<String>,
    /// Read-only clones of zvols.
    pub clones: Vec<String>,
    /// `/dev/nbdN` devices `qemu-nbd` serves.
    pub nbd: Vec<String>,
    /// Directories made and (perhaps) mounted, in order.
    pub mounts: Vec<PathBuf>,
    pub volumes: Vec<Volume>,
}

fn state_path(state_dir: &Path, domain: &str, snapshot: &str) -> PathBuf {
    state_dir.join("mounts").join(format!("{domain}@{snapshot}.json"))
}

impl MountState {
    fn save(&self, state_dir: &Path) -> Result<(), MountError> {
        let dir = crate::fsutil::Dir::private(state_dir, &["mounts"]).map_err(|e| MountError::Refused(e.to_string()))?;
        let text = serde_json::to_vec_pretty(self).expect("serialises");
        dir.write_atomic(&format!("{}@{}.json", self.domain, self.snapshot), &text, 0o600).map_err(|e| MountError::Refused(e.to_string()))
    }

    /// Writes the state, then lets a fault-injection test stop right after.
    fn record(&self, state_dir: &Path, name: &str) -> Result<(), MountError> {
        self.save(state_dir)?;
        fault_point("after", &format!("mount_{name}"));
        Ok(())
    }
}

/// Every mount state on this host (complete or not).
pub fn states(state_dir: &Path) -> Vec<(PathBuf, Result<MountState, String>)> {
    let Ok(dir) = std::fs::read_dir(state_dir.join("mounts")) else { return Vec::new() };
    let mut out: Vec<_> = dir
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let parsed = crate::fsutil::read_limited(&p, 1 << 20)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<MountState>(&b).map_err(|e| e.to_string()));
            (p, parsed)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The snapshots of `domain` that `vmsnap mount` set up (complete, or interrupted and waiting
/// for `vmsnap recover`): snapshot name → its state.
pub fn mounted(state_dir: &Path, domain: &str) -> std::collections::BTreeMap<String, MountState> {
    states(state_dir).into_iter().filter_map(|(_, s)| s.ok()).filter(|s| s.domain == domain).map(|s| (s.snapshot.clone(), s)).collect()
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{program} exited with {}: {}", out.status, err.trim().chars().take(400).collect::<String>()))
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// A disk to open, and its image format as the host defined it.
struct Disk {
    path: PathBuf,
    format: ImageFormat,
}

/// How `qemu-nbd` is told to read an image: never by probing its contents, which the guest
/// wrote (a raw disk whose first sector is a qcow2 header naming a host file would otherwise
/// open that file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// From the domain XML's `<driver type>`; without one, from the file name the host chose
    /// (`.qcow2`), else raw — a qcow2 image read as raw shows no file system, nothing worse.
    fn of(path: &Path, driver: Option<&str>) -> Result<Self, MountError> {
        match driver {
            Some("raw") => Ok(Self::Raw),
            Some("qcow2") => Ok(Self::Qcow2),
            Some(other) => Err(MountError::Refused(format!("{}: a {other:?} image, which vmsnap does not mount", path.display()))),
            None if path.extension().is_some_and(|e| e == "qcow2") => Ok(Self::Qcow2),
            None => Ok(Self::Raw),
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Self::Raw => "--format=raw",
            Self::Qcow2 => "--format=qcow2",
        }
    }
}

/// The disks the snapshot's own domain XML names (else the configured domain's).
async fn disks(cfg: &Config, zfs: &Zfs, unit: &[SnapshotName], domain: &str) -> Result<Vec<Disk>, MountError> {
    if let Some(xml) = saved_file(zfs, unit, domain, "domain.xml").await?.map(|f| f.frozen) {
        let text = crate::fsutil::read_limited(&xml, 4 << 20).map_err(|e| MountError::Refused(e.to_string()))?;
        let parsed = crate::libvirt::hook::parse_domain_xml(&String::from_utf8_lossy(&text))
            .map_err(|e| MountError::Refused(format!("the snapshot's domain XML {}: {e}", xml.display())))?;
        if !parsed.disks.is_empty() {
            return parsed
                .disks
                .iter()
                .map(|p| Ok(Disk { path: p.clone(), format: ImageFormat::of(p, parsed.formats.get(p).map(String::as_str))? }))
                .collect();
        }
    }
    match cfg.domains.get(domain) {
        Some(d) if !d.disks.is_empty() => d.disks.iter().map(|p| Ok(Disk { path: p.clone(), format: ImageFormat::of(p, None)? })).collect(),
        _ => Err(MountError::Refused(format!("the snapshot of {domain} names no disks (no domain XML in it, no configured disks)"))),
    }
}

/// Mounts every file system of `domain`'s snapshot read-only below `path`.
pub async fn mount(cfg: &Config, zfs: &Zfs, domain: &str, snapshot: &str, path: &Path) -> Result<MountState, MountError> {
    super::check_names(domain, snapshot).map_err(MountError::Refused)?;
    let state_file = state_path(&cfg.state_dir, domain, snapshot);
    if state_file.exists() {
        return Err(MountError::Refused(format!(
            "{domain}@{snapshot} is already mounted (or a mount of it was interrupted): `vmsnap umount {domain} {snapshot}` first"
        )));
    }
    if !path.is_absolute() {
        return Err(MountError::Refused(format!("{}: the mount directory must be an absolute path", path.display())));
    }
    if path.exists() && std::fs::read_dir(path).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(MountError::Refused(format!("{} exists and is not an empty directory", path.display())));
    }
    let (unit, _, _) = find_unit(zfs, domain, snapshot).await?;
    let disks = disks(cfg, zfs, &unit, domain).await?;
    private_dir(path)?;
    let mut st = MountState { domain: domain.into(), snapshot: snapshot.into(), path: path.to_owned(), ..Default::default() };
    st.holds = unit.iter().map(ToString::to_string).collect();
    st.record(&cfg.state_dir, "planned")?;
    let result = set_up(cfg, zfs, &unit, &disks, &mut st).await;
    if let Err(e) = result {
        // Undo what was made; the state says what.
        if let Err(undo) = tear_down(cfg, zfs, &st).await {
            tracing::error!("undoing the mount of {domain}@{snapshot}: {undo}");
        }
        return Err(e);
    }
    st.complete = true;
    st.record(&cfg.state_dir, "complete")?;
    Ok(st)
}

async fn set_up(cfg: &Config, zfs: &Zfs, unit: &[SnapshotName], disks: &[Disk], st: &mut MountState) -> Result<(), MountError> {
    match zfs.hold(HOLD, unit).await {
        Ok(()) | Err(crate::zfs::ZfsError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    st.record(&cfg.state_dir, "held")?;
    for (i, Disk { path: disk, format }) in disks.iter().enumerate() {
        let ds = zfs.dataset_of(disk).await?;
        let Some(snap) = unit.iter().find(|s| *s.dataset() == ds) else {
            st.volumes.push(Volume {
                device: disk.display().to_string(),
                skipped: Some(format!("not in the snapshot (dataset {ds})")),
                ..Default::default()
            });
            continue;
        };
        let device = if disk.starts_with("/dev/zvol/") {
            open_zvol(cfg, zfs, snap, st).await?
        } else {
            open_image(cfg, zfs, snap, disk, *format, st).await?
        };
        let parts = partitions(&device);
        let whole = parts.is_empty();
        for (m, dev) in if whole { vec![(0, device.clone())] } else { parts } {
            let name = if whole { format!("disk{i}") } else { format!("disk{i}-p{m}") };
            mount_volume(cfg, &dev, &st.path.join(name), st).await?;
        }
    }
    Ok(())
}

async fn open_zvol(cfg: &Config, zfs: &Zfs, snap: &SnapshotName, st: &mut MountState) -> Result<PathBuf, MountError> {
    let clone = Dataset::new(&format!("{}-mnt-{}", snap.dataset(), snap.snap())).map_err(|e| MountError::Refused(e.to_string()))?;
    st.clones.push(clone.to_string());
    st.record(&cfg.state_dir, "clone_planned")?;
    zfs.cli().zfs(crate::zargs!["clone", "-o", "readonly=on", snap.to_string(), clone.as_str()]).await?;
    // udev makes the device node (and its partitions' links) a moment later.
    let _ = run("udevadm", &[os("settle"), os("--timeout=10")]).await;
    crate::zfs::zvol_node(clone.as_str(), Duration::from_secs(10))
        .await
        .ok_or_else(|| MountError::Step { what: format!("clone {clone}"), why: format!("/dev/zvol/{clone} did not appear") })
}

async fn open_image(
    cfg: &Config,
    zfs: &Zfs,
    snap: &SnapshotName,
    disk: &Path,
    format: ImageFormat,
    st: &mut MountState,
) -> Result<PathBuf, MountError> {
    let mp = zfs.get_native(snap.dataset().as_str(), "mountpoint").await?.filter(|m| m.starts_with('/'));
    let Some(mp) = mp else {
        return Err(MountError::Refused(format!("{} is not mounted: its snapshot's files cannot be read", snap.dataset())));
    };
    let rel = disk.strip_prefix(&mp).map_err(|_| MountError::Refused(format!("{} is not below {mp}", disk.display())))?;
    let frozen = PathBuf::from(&mp).join(".zfs/snapshot").join(snap.snap()).join(rel);
    if !frozen.is_file() {
        return Err(MountError::Refused(format!("{} is not in the snapshot", frozen.display())));
    }
    // max_part: the kernel scans nbd devices for partitions.
    let _ = run("modprobe", &[os("nbd"), os("max_part=16")]).await;
    let dev = free_nbd().ok_or_else(|| MountError::Refused("no free /dev/nbd device (is the nbd module there?)".into()))?;
    st.nbd.push(dev.display().to_string());
    st.record(&cfg.state_dir, "nbd_planned")?;
    let connect = format!("--connect={}", dev.display());
    // Its control socket in vmsnap's own directory (the default, /var/lock, may not exist).
    let dev_name = dev.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let socket = format!("--socket={}", cfg.state_dir.join("mounts").join(format!("{dev_name}.sock")).display());
    run("qemu-nbd", &[os("--read-only"), os(format.arg()), os(&connect), os(&socket), frozen.as_os_str()])
        .await
        .map_err(step(format!("qemu-nbd of {}", frozen.display())))?;
    let name = dev.file_name().unwrap_or_default().to_string_lossy().into_owned();
    for _ in 0..50 {
        if Path::new(&format!("/sys/block/{name}/pid")).exists() {
            let _ = run("udevadm", &[os("settle"), os("--timeout=10")]).await;
            return Ok(dev);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(MountError::Step { what: format!("qemu-nbd of {}", frozen.display()), why: format!("{} did not connect", dev.display()) })
}

/// An nbd device no one serves.
fn free_nbd() -> Option<PathBuf> {
    (0..64)
        .map(|n| format!("nbd{n}"))
        .find(|n| Path::new(&format!("/sys/block/{n}")).exists() && !Path::new(&format!("/sys/block/{n}/pid")).exists())
        .map(|n| PathBuf::from("/dev").join(n))
}

/// The partitions of a block device (numbered), from sysfs.
fn partitions(device: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(real) = std::fs::canonicalize(device) else { return Vec::new() };
    let name = real.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/sys/class/block/{name}")) {
        for e in dir.filter_map(Result::ok) {
            let child = e.file_name().to_string_lossy().into_owned();
            if child.starts_with(&name) && e.path().join("partition").exists() {
                if let Ok(n) = std::fs::read_to_string(e.path().join("partition")).map(|s| s.trim().parse::<u32>().unwrap_or(0)) {
                    out.push((n, PathBuf::from("/dev").join(&child)));
                }
            }
        }
    }
    out.sort();
    out
}

/// The file systems vmsnap mounts (the kernel drivers most used and fuzzed; a guest must not
/// pick an obscure one to parse its crafted image): the kernel's type and the options, always
/// read-only with no setuid, device node or program honoured, and no journal replayed.
fn mount_options(blkid_type: &str) -> Option<(&'static str, String)> {
    const SAFE: &str = "ro,nosuid,nodev,noexec";
    let (kernel, extra) = match blkid_type {
        "ext2" => ("ext2", ""),
        "ext3" => ("ext3", ",noload"),
        "ext4" => ("ext4", ",noload"),
        "xfs" => ("xfs", ",norecovery"),
        "btrfs" => ("btrfs", ",rescue=nologreplay"),
        "vfat" => ("vfat", ""),
        "ntfs" => ("ntfs3", ""),
        _ => return None,
    };
    Some((kernel, format!("{SAFE}{extra}")))
}

/// Makes `at` (and what is missing above it) a directory only root enters: what is mounted
/// there is the guest's, with the guest's owners and modes.
fn private_dir(at: &Path) -> Result<(), MountError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let step = |e: std::io::Error| MountError::Step { what: format!("creating {}", at.display()), why: e.to_string() };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(at).map_err(step)?;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o700)).map_err(step)
}

async fn mount_volume(cfg: &Config, dev: &Path, at: &Path, st: &mut MountState) -> Result<(), MountError> {
    let probe = run("blkid", &[os("-o"), os("value"), os("-s"), os("TYPE"), dev.as_os_str()]).await.unwrap_or_default();
    let fstype = probe.trim().to_owned();
    let mut vol =
        Volume { device: dev.display().to_string(), fstype: Some(fstype.clone()).filter(|t| !t.is_empty()), ..Default::default() };
    let Some((kernel_type, options)) = mount_options(&fstype) else {
        vol.skipped =
            Some(if fstype.is_empty() { "no file system found".into() } else { format!("{fstype}: not a file system vmsnap mounts") });
        st.volumes.push(vol);
        return Ok(());
    };
    private_dir(at)?;
    st.mounts.push(at.to_owned());
    st.record(&cfg.state_dir, "mount_planned")?;
    run("mount", &[os("-t"), os(kernel_type), os("-o"), os(&options), dev.as_os_str(), at.as_os_str()])
        .await
        .map_err(step(format!("mounting {}", dev.display())))?;
    vol.mountpoint = Some(at.to_owned());
    st.volumes.push(vol);
    Ok(())
}

/// Undoes a mount (or what an interrupted one set up), newest first; each step checks the
/// system's state, so it can run twice.
pub async fn tear_down(cfg: &Config, zfs: &Zfs, st: &MountState) -> Result<(), MountError> {
    for at in st.mounts.iter().rev() {
        if is_mounted(at) {
            run("umount", &[at.as_os_str()]).await.map_err(step(format!("unmounting {}", at.display())))?;
        }
        let _ = std::fs::remove_dir(at);
    }
    for dev in st.nbd.iter().rev() {
        let name = Path::new(dev).file_name().unwrap_or_default().to_string_lossy().into_owned();
        if Path::new(&format!("/sys/block/{name}/pid")).exists() {
            run("qemu-nbd", &[os("--disconnect"), os(dev)]).await.map_err(step(format!("disconnecting {dev}")))?;
        }
    }
    for clone in st.clones.iter().rev() {
        if zfs.get_native(clone, "guid").await?.is_some() {
            let ds = Dataset::new(clone).map_err(|e| MountError::Refused(e.to_string()))?;
            zfs.destroy_dataset(&ds).await?;
        }
    }
    for full in &st.holds {
        let Ok(snap) = SnapshotName::new(full) else { continue };
        if zfs.get_native(full, "guid").await?.is_some() && zfs.holds(&snap).await?.iter().any(|h| h.tag == HOLD) {
            zfs.release(HOLD, &[snap]).await?;
        }
    }
    let _ = std::fs::remove_dir(&st.path);
    let file = state_path(&cfg.state_dir, &st.domain, &st.snapshot);
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MountError::Step { what: format!("removing {}", file.display()), why: e.to_string() }),
    }
}

/// `vmsnap umount`: the mount of `domain@snapshot`, undone.
pub async fn umount(cfg: &Config, zfs: &Zfs, domain: &str, snapshot: &str) -> Result<MountState, MountError> {
    super::check_names(domain, snapshot).map_err(MountError::Refused)?;
    let file = state_path(&cfg.state_dir, domain, snapshot);
    let text = crate::fsutil::read_limited(&file, 1 << 20)
        .map_err(|_| MountError::Refused(format!("{domain}@{snapshot} is not mounted by vmsnap (no {})", file.display())))?;
    let st: MountState = serde_json::from_slice(&text).map_err(|e| MountError::Refused(format!("{}: {e}", file.display())))?;
    tear_down(cfg, zfs, &st).await?;
    Ok(st)
}

fn is_mounted(at: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    let want = at.to_string_lossy().replace(' ', "\\040");
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// `vmsnap recover`: mounts interrupted half-way are undone; complete ones are only listed (they
/// stay until `vmsnap umount`, also after a reboot, which keeps their clones and holds).
pub async fn recover_interrupted(cfg: &Config, zfs: &Zfs) -> Result<Vec<(String, Vec<String>)>, MountError> {
    let mut out = Vec::new();
    for (file, parsed) in states(&cfg.state_dir) {
        let st = parsed.map_err(|e| MountError::Refused(format!("{}: {e}", file.display())))?;
        let what = format!("{}@{}", st.domain, st.snapshot);
        if st.complete {
            tracing::info!("{what} stays mounted at {} (vmsnap umount releases it)", st.path.display());
            continue;
        }
        tear_down(cfg, zfs, &st).await?;
        let mut actions = vec![format!("undid the interrupted mount of {what} at {}", st.path.display())];
        actions.extend(st.clones.iter().map(|c| format!("destroyed the read-only clone {c}")));
        actions.extend(st.nbd.iter().map(|d| format!("released {d}")));
        actions.push(format!("released the hold {HOLD} on {}", st.holds.join(", ")));
        out.push((st.domain.clone(), actions));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_file_systems_and_never_setuid_devices_or_programs() {
        for t in ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs"] {
            let (_, o) = mount_options(t).unwrap();
            assert!(o.starts_with("ro,nosuid,nodev,noexec"), "{t}: {o}");
        }
        assert_eq!(mount_options("ext4").unwrap().1, "ro,nosuid,nodev,noexec,noload");
        assert_eq!(mount_options("ntfs").unwrap().0, "ntfs3");
        for t in ["", "hfsplus", "minix", "swap", "zfs_member", "crypto_LUKS", "squashfs"] {
            assert!(mount_options(t).is_none(), "{t}");
        }
    }

    #[test]
    fn the_image_format_is_the_hosts_never_probed() {
        let p = Path::new("/tank/vms/web/disk0.img");
        assert_eq!(ImageFormat::of(p, Some("raw")).unwrap(), ImageFormat::Raw);
        assert_eq!(ImageFormat::of(p, None).unwrap(), ImageFormat::Raw);
        assert_eq!(ImageFormat::of(Path::new("/tank/vms/web/disk0.qcow2"), None).unwrap(), ImageFormat::Qcow2);
        assert_eq!(ImageFormat::of(Path::new("/tank/vms/web/disk0.qcow2"), Some("raw")).unwrap(), ImageFormat::Raw);
        assert!(ImageFormat::of(p, Some("vmdk")).is_err());
        assert_eq!(ImageFormat::Raw.arg(), "--format=raw");
    }
}
