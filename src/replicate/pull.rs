//! `vmsnap restore --from TARGET`: a snapshot and its RAM dump brought back from a replication
//! target, so the restore then goes on as from a local snapshot.
//!
//! Every dataset is planned before anything changes: the target must hold the snapshot complete
//! (`vmsnap:replica`); here it is received incrementally onto the newest snapshot both sides have
//! (by GUID), or in full when the dataset is gone here. Snapshots newer than that base are in
//! the way of a receive: like an in-place restore, they are destroyed only with
//! `--destroy-newer` (a `zfs rollback -r` to the base), and listed otherwise. A dataset here with
//! no snapshot in common is never overwritten. Then the snapshot's `vmsnap:*` properties are set
//! here from the target's (they do not travel in the stream), and its RAM dump is copied back
//! (resumable) and checked against the recorded sha256 before it is named.

use super::protocol::{RamState, Request};
use super::run::{Options, ReplicateError, Run};
use super::transport::Transport;
use crate::config::{DomainConfig, TargetConfig};
use crate::model::prop;
use crate::zfs::{Dataset, PropName, SnapshotName, Zfs, ZfsError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a pull did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PullReport {
    pub target: String,
    pub snapshot: String,
    /// Per dataset, in words.
    pub steps: Vec<String>,
    /// Stream bytes received.
    pub bytes: u64,
    /// The RAM dump copied back and checked (its path here).
    pub ram_dump: Option<String>,
    pub ram_bytes: u64,
    /// Snapshots (and bookmarks) destroyed here to make way (`--destroy-newer`).
    pub destroyed: Vec<String>,
}

/// How a pull may go.
#[derive(Debug, Clone, Copy, Default)]
pub struct PullOptions {
    /// Snapshots here newer than the common base may be destroyed to receive onto it.
    pub destroy_newer: bool,
    /// Use what the target sends even when this host has no integrity record of the snapshot
    /// (a host rebuilt after a disaster): the target's word is then all there is.
    pub trust_target: bool,
}

/// One dataset's part of the plan.
struct Receive {
    ds: Dataset,
    /// Incremental from this snapshot (after the `@`); `None`: in full, the dataset is new.
    from: Option<String>,
    /// Rolled back to first (`-r`), destroying what is listed in the report.
    rollback_to: Option<SnapshotName>,
}

/// Brings `dom`'s `snapshot` back from `target` (see the module doc). `ram_dir` is where this
/// host keeps RAM dumps.
#[allow(clippy::too_many_arguments)]
pub async fn pull(
    zfs: &Zfs,
    state_dir: &Path,
    ram_dir: &Path,
    dom: &DomainConfig,
    target: &TargetConfig,
    snapshot: &str,
    how: PullOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PullReport, ReplicateError> {
    let PullOptions { destroy_newer, trust_target } = how;
    let err = |why: String| ReplicateError::Target { target: target.name.clone(), why };
    if !super::protocol::valid_snapshot_name(snapshot) {
        return Err(err(format!("{snapshot:?} is not a snapshot name vmsnap makes")));
    }
    let _lock = crate::engine::lock::DomainLock::replication(state_dir, &dom.name)
        .map_err(|e| err(format!("{e} (a replication of {} runs)", dom.name)))?;
    let run = Run::open(zfs, state_dir, dom, target, Options::default(), &progress)?;
    let all_datasets: Vec<Dataset> = run.datasets_to_bring_back().await?;
    let record = crate::integrity::read(state_dir, &dom.name, snapshot).map_err(err)?;
    let mut report = PullReport { target: target.name.clone(), snapshot: snapshot.to_owned(), ..Default::default() };
    let mut todo = Vec::new();
    let mut props = BTreeMap::new();
    let mut stale_dumps = Vec::new();
    for ds in all_datasets.iter().cloned() {
        let listing = run.list(&ds).await?;
        let Some(t) = listing.snapshots.iter().find(|t| t.name == snapshot) else {
            return Err(err(format!(
                "it holds no {ds}@{snapshot} (`vmsnap list {} --target {}` shows what it has)",
                dom.name, target.name
            )));
        };
        if t.props.get(prop::DOMAIN.as_str()) != Some(&dom.name) {
            return Err(err(format!("its {ds}@{snapshot} is not a snapshot of {}", dom.name)));
        }
        if t.props.get(prop::REPLICA.as_str()).map(String::as_str) != Some("complete") {
            return Err(err(format!("its {ds}@{snapshot} is not complete there (a replication has not finished it)")));
        }
        props = t.props.clone();
        let local = match zfs.list_snapshots(&ds, &[]).await {
            Ok(l) => l,
            Err(ZfsError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if let Some(l) = local.iter().find(|l| l.name.snap() == snapshot) {
            if l.guid != t.guid {
                return Err(err(format!("{ds}@{snapshot} here is other data than the target's (guid {} here, {} there)", l.guid, t.guid)));
            }
            report.steps.push(format!("{ds}: {snapshot} is here already"));
            continue;
        }
        let older_there: BTreeMap<u64, u64> =
            listing.snapshots.iter().filter(|s| s.createtxg < t.createtxg).map(|s| (s.guid, s.createtxg)).collect();
        match local.iter().rev().find(|l| older_there.contains_key(&l.guid)) {
            Some(base) => {
                let newer: Vec<String> = local.iter().filter(|l| l.createtxg > base.createtxg).map(|l| l.name.to_string()).collect();
                let marks: Vec<String> =
                    zfs.bookmarks(&ds).await?.into_iter().filter(|b| b.2 > base.createtxg).map(|b| format!("{ds}#{}", b.0)).collect();
                if !newer.is_empty() && !destroy_newer {
                    return Err(ReplicateError::Diverged {
                        target: target.name.clone(),
                        dataset: ds.to_string(),
                        why: format!(
                            "receiving {snapshot} onto {} here needs the newer {} destroyed (`--destroy-newer`, as an in-place restore would)",
                            base.name.snap(),
                            newer.join(", ")
                        ),
                    });
                }
                // Written since its newest snapshot (a domain's disks, its saved XML): with
                // `--destroy-newer` those writes are discarded too, as an in-place restore would;
                // without, the receive is tried (and says so if it refuses).
                let written = if newer.is_empty() && destroy_newer {
                    zfs.get_native(ds.as_str(), "written").await?.and_then(|w| w.parse::<u64>().ok()).unwrap_or(0)
                } else {
                    0
                };
                let rollback_to = (!newer.is_empty() || written > 0).then(|| base.name.clone());
                if rollback_to.is_some() {
                    // Their RAM dumps go with them (from this host's RAM directory only).
                    let dumps = zfs.local_snapshot_properties(&ds, &[prop::RAM_DUMP]).await?;
                    stale_dumps.extend(
                        newer
                            .iter()
                            .filter_map(|n| dumps.get(n)?.get(&prop::RAM_DUMP).map(std::path::PathBuf::from))
                            .filter(|d| crate::fsutil::inside(d, ram_dir)),
                    );
                    report.destroyed.extend(newer.into_iter().chain(marks));
                }
                todo.push(Receive { ds, from: Some(base.name.snap().to_owned()), rollback_to });
            }
            None if zfs.get_native(ds.as_str(), "guid").await?.is_none() => {
                todo.push(Receive { ds, from: None, rollback_to: None });
            }
            None => {
                return Err(err(format!(
                "{ds} here has no snapshot in common with the target's copy; vmsnap does not overwrite it (rename or destroy it by hand)"
            )))
            }
        }
    }
    // A dump the target holds sealed opens only with this host's RAM key: without it, nothing
    // is received.
    let ram_key = if props.contains_key(prop::RAM_SEALED.as_str()) && !props.contains_key(prop::RAM_PRUNED.as_str()) {
        let key = crate::ramcrypt::RamKey::load(&target.ram_key).map_err(|e| ReplicateError::SealedDumpKey {
            target: target.name.clone(),
            snapshot: snapshot.to_owned(),
            key: e.to_string(),
        })?;
        Some(key)
    } else {
        None
    };
    for r in &todo {
        let ds = &r.ds;
        if let Some(base) = &r.rollback_to {
            progress(&format!("{ds}: rolling back to {} (destroying what is newer)", base.snap()));
            zfs.rollback(base, true).await?;
        }
        let new = r.from.is_none();
        if new {
            if let Some((parent, _)) = ds.as_str().rsplit_once('/') {
                zfs.cli().zfs(crate::zargs!["create", "-p", parent]).await?;
            }
        }
        let how = match &r.from {
            Some(f) => format!("incremental from {f}"),
            None => "in full".to_owned(),
        };
        progress(&format!("{ds}: receiving {snapshot} from {} ({how})", target.name));
        let req = Request::Send { dataset: ds.to_string(), snapshot: snapshot.to_owned(), from: r.from.clone() };
        let (zfs_program, name) = (zfs.cli().zfs_program().to_owned(), ds.to_string());
        let bytes = ticking(&format!("receiving {ds}"), progress, run.transport.clone(), move |t, moved| {
            let mut recv = std::process::Command::new(&zfs_program)
                .args(super::receive::argv(&name, super::receive::Receiving::Restore))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("running zfs receive: {e}"))?;
            let mut sink = recv.stdin.take().expect("piped");
            let pulled = t.pull(&req, &mut sink, moved, &|_| None);
            drop(sink);
            let out = recv.wait_with_output().map_err(|e| e.to_string())?;
            // A receive that refused ends the stream with a broken pipe: its own words first.
            match (out.status.success(), pulled) {
                (true, pulled) => pulled.map(|_| ()),
                (false, Ok(_)) => Err(format!("zfs receive into {name}: {}", String::from_utf8_lossy(&out.stderr).trim())),
                (false, Err(e)) => Err(format!("zfs receive into {name}: {} ({e})", String::from_utf8_lossy(&out.stderr).trim())),
            }
        })
        .await
        .map_err(err)?;
        report.bytes += bytes;
        report.steps.push(format!("{ds}: received {snapshot} {how} ({} MiB)", bytes >> 20));
    }
    mount_if_unlocked(zfs, &all_datasets, snapshot, &target.name).await?;
    // What came back is what this host recorded when it took the snapshot, or it goes again.
    let unit: Vec<SnapshotName> = all_datasets.iter().filter_map(|d| d.snapshot(snapshot).ok()).collect();
    let held = crate::integrity::held(zfs, &unit, &dom.name, props.get(prop::RAM_SHA256.as_str()).cloned()).await.map_err(err)?;
    let refusal = match &record {
        Some(r) => {
            let d = crate::integrity::differences(r, &held);
            (!d.is_empty()).then(|| format!("what it sent is not what this host recorded when it took {snapshot}: {}", d.join("; ")))
        }
        None if !trust_target => Some(format!(
            "this host has no record of what {snapshot} held (it was taken on another host, or this one was rebuilt), so what the \
             target sent cannot be checked; {}. If you trust {}, run it again with --trust-target",
            what_it_would_run(zfs, &unit, &dom.name).await,
            target.name
        )),
        None => None,
    };
    if let Some(why) = refusal {
        let undone = undo_receives(zfs, &todo, snapshot).await;
        let undone = if undone.is_empty() { "nothing".into() } else { undone.join(", ") };
        return Err(ReplicateError::Untrusted { target: target.name.clone(), why, undone });
    }
    stale_dumps.sort();
    stale_dumps.dedup();
    for d in stale_dumps {
        match std::fs::remove_file(&d) {
            Ok(()) => report.destroyed.push(format!("{} (a destroyed snapshot's RAM dump)", d.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: {e}", d.display()),
        }
    }
    // The RAM dump, then the properties (the dump's path is this host's).
    let mut local_props: BTreeMap<PropName, String> = props
        .iter()
        // The dump's path and the sealed copy's sum are the target's own.
        .filter(|(k, _)| ![prop::REPLICA.as_str(), prop::RAM_DUMP.as_str(), prop::RAM_SEALED.as_str()].contains(&k.as_str()))
        .filter_map(|(k, v)| Some((PropName::new(k).ok()?, v.clone())))
        .collect();
    let dumped = props.contains_key(prop::RAM_DUMP.as_str()) && !props.contains_key(prop::RAM_PRUNED.as_str());
    // The dump is checked against this host's record when there is one (equal to the target's
    // word by now), never only against a sum the target returned.
    let want = record.as_ref().and_then(|r| r.ram_sha256.clone()).or_else(|| props.get(prop::RAM_SHA256.as_str()).cloned());
    if let (true, Some(sum)) = (dumped, want.as_ref()) {
        let path = pull_dump(&run, ram_dir, ram_key.as_ref(), &dom.name, snapshot, sum, progress).await.map_err(err)?;
        report.ram_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        local_props.insert(prop::RAM_DUMP, path.display().to_string());
        report.ram_dump = Some(path.display().to_string());
    }
    for ds in &all_datasets {
        zfs.set_properties(&format!("{ds}@{snapshot}"), &local_props).await?;
    }
    Ok(report)
}

/// What a pulled snapshot's domain XML would run, for a user deciding whether to trust it.
async fn what_it_would_run(zfs: &Zfs, unit: &[SnapshotName], domain: &str) -> String {
    let shown = |s: &str| super::protocol::shown(s, 200);
    let Ok(Some(crate::integrity::SavedFile { frozen: xml, .. })) = crate::integrity::saved_file(zfs, unit, domain, "domain.xml").await
    else {
        return "it holds no domain XML".into();
    };
    let parsed = crate::fsutil::read_limited(&xml, 4 << 20)
        .map_err(|e| e.to_string())
        .and_then(|t| crate::libvirt::hook::parse_domain_xml(&String::from_utf8_lossy(&t)));
    match parsed {
        Ok(d) => format!(
            "its domain XML runs {} on disks {}{}",
            d.emulator.map(|e| shown(&e.display().to_string())).unwrap_or_else(|| "libvirt's default QEMU".into()),
            d.disks.iter().map(|p| shown(&p.display().to_string())).collect::<Vec<_>>().join(", "),
            d.nvram.map(|n| format!(" with nvram {}", shown(&n.display().to_string()))).unwrap_or_default()
        ),
        Err(e) => format!("its domain XML does not read: {}", shown(&e)),
    }
}

/// Readies what came back for the restore, which reads the saved XML and nvram under
/// `.zfs/snapshot` and the disks: file systems are mounted. An encrypted dataset received raw
/// stays locked until its key is loaded here, and then nothing of the unit can be checked: the
/// pull stops, naming them, and keeps what it received (a second run finds it here already).
async fn mount_if_unlocked(zfs: &Zfs, datasets: &[Dataset], snapshot: &str, target: &str) -> Result<(), ReplicateError> {
    let (mut locked, mut to_mount) = (Vec::new(), Vec::new());
    for ds in datasets {
        let Some(p) = zfs.get_natives(ds.as_str(), &["type", "keystatus", "mounted", "canmount"]).await? else { continue };
        let is = |k: &str, v: &str| p.get(k).map(String::as_str) == Some(v);
        if is("keystatus", "unavailable") {
            locked.push(ds.to_string());
        } else if is("type", "filesystem") && is("mounted", "no") && is("canmount", "on") {
            to_mount.push(ds);
        }
    }
    if !locked.is_empty() {
        return Err(ReplicateError::KeyNotLoaded { target: target.to_owned(), snapshot: snapshot.to_owned(), datasets: locked.join(", ") });
    }
    for ds in to_mount {
        zfs.cli().zfs(crate::zargs!["mount", ds.as_str()]).await?;
    }
    Ok(())
}

/// Takes back what this pull received: a dataset it made is destroyed, one it received onto is
/// rolled back to the base (which destroys the received snapshot). What was undone, in words.
async fn undo_receives(zfs: &Zfs, todo: &[Receive], snapshot: &str) -> Vec<String> {
    let mut done = Vec::new();
    for r in todo {
        let undone = match &r.from {
            // Made by this pull (received whole), with its snapshots.
            None => zfs.cli().zfs(crate::zargs!["destroy", "-r", r.ds.as_str()]).await.map(|_| format!("{} (received whole)", r.ds)),
            Some(base) => match r.ds.snapshot(base) {
                Ok(b) => zfs.rollback(&b, true).await.map(|()| format!("{}@{snapshot}", r.ds)),
                Err(e) => Err(ZfsError::Unexpected { what: e.to_string() }),
            },
        };
        match undone {
            Ok(what) => done.push(what),
            Err(e) => tracing::error!(dataset = %r.ds, "undoing a refused receive: {e}"),
        }
    }
    done
}

/// The dump copied back to `<ram_dir>/<domain>/<snapshot>.ram` (0600 in a 0700 directory),
/// resuming a partial copy, named only once its sha256 is the recorded one. A sealed copy is
/// opened with `ram_key` (loaded when the target's properties say it is sealed) and proven to be
/// this snapshot's dump on the way.
#[allow(clippy::too_many_arguments)]
async fn pull_dump(
    run: &Run<'_>,
    ram_dir: &Path,
    ram_key: Option<&crate::ramcrypt::RamKey>,
    domain: &str,
    snapshot: &str,
    sha256: &str,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<std::path::PathBuf, String> {
    let dir = crate::fsutil::Dir::private(ram_dir, &[domain]).map_err(|e| e.to_string())?;
    let name = format!("{snapshot}.ram");
    let path = dir.path().join(&name);
    if let Ok(f) = crate::fsutil::open_regular(&path) {
        if crate::fsutil::sha256_of(f, |_| {}).map_err(|e| e.to_string())?.1 == sha256 {
            progress(&format!("the RAM dump of {snapshot} is here already"));
            return Ok(path);
        }
        return Err(format!("{} is here with other contents; move it away first", path.display()));
    }
    let part = format!("{name}.part");
    let file = dir.open_resumable(&part).map_err(|e| e.to_string())?;
    let offset = file.metadata().map_err(|e| e.to_string())?.len();
    progress(&format!(
        "copying the RAM dump of {snapshot} back{}",
        if offset > 0 { format!(" from byte {offset}") } else { String::new() }
    ));
    let req = Request::RamGet { domain: domain.to_owned(), snapshot: snapshot.to_owned(), offset };
    ticking(&format!("copying the RAM dump of {snapshot}"), progress, run.transport.clone(), move |t, moved| {
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?;
        // At most what the target announced from `offset` (its own answer: the whole-file
        // check against the recorded sha256 below is what makes the copy trusted).
        let v = t.pull(&req, &mut file, moved, &|v| {
            serde_json::from_value::<RamState>(v.clone()).ok().map(|s| s.partial.saturating_sub(offset))
        })?;
        let state: RamState = serde_json::from_value(v).map_err(|e| format!("an answer vmsnap cannot read: {e}"))?;
        file.sync_all().map_err(|e| e.to_string())?;
        let have = file.metadata().map_err(|e| e.to_string())?.len();
        if have != state.partial {
            return Err(format!("got {have} of the dump's {} bytes; run it again to resume", state.partial));
        }
        Ok(())
    })
    .await?;
    let part_path = dir.path().join(&part);
    let drop_copy = |why: String| {
        let _ = std::fs::remove_file(&part_path);
        Err(format!("{why}; the copy was deleted"))
    };
    if crate::ramcrypt::is_sealed(&part_path) {
        let Some(key) = ram_key.cloned() else {
            return drop_copy(format!("the target sent the RAM dump of {snapshot} sealed, though its properties do not say so"));
        };
        progress(&format!("opening the sealed RAM dump of {snapshot}"));
        let opened = format!("{name}.open");
        let out = dir.open_resumable(&opened).map_err(|e| e.to_string())?;
        let (input, ids) = (crate::fsutil::open_regular(&part_path).map_err(|e| e.to_string())?, (domain.to_owned(), snapshot.to_owned()));
        let done = tokio::task::spawn_blocking(move || -> Result<String, String> {
            let mut out = out;
            out.set_len(0).map_err(|e| e.to_string())?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut out);
            let mut r = std::io::BufReader::with_capacity(1 << 20, input);
            let (_, sum) = crate::ramcrypt::open_as(&mut r, &mut w, &key, &ids.0, &ids.1).map_err(|e| e.to_string())?;
            std::io::Write::flush(&mut w).map_err(|e| e.to_string())?;
            drop(w);
            out.sync_all().map_err(|e| e.to_string())?;
            Ok(sum)
        })
        .await
        .map_err(|e| e.to_string())?;
        let got = match done {
            Ok(sum) => sum,
            Err(e) => {
                let _ = std::fs::remove_file(dir.path().join(&opened));
                return drop_copy(format!("the sealed RAM dump of {snapshot} does not open: {e}"));
            }
        };
        if got != sha256 {
            let _ = std::fs::remove_file(dir.path().join(&opened));
            return drop_copy(format!("the opened dump's sha256 is {got}, the snapshot records {sha256}"));
        }
        dir.rename(&opened, &name).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&part_path);
        return Ok(path);
    }
    let (_, got) =
        crate::fsutil::sha256_of(crate::fsutil::open_regular(&part_path).map_err(|e| e.to_string())?, |_| {}).map_err(|e| e.to_string())?;
    if got != sha256 {
        return drop_copy(format!("the copy's sha256 is {got}, the snapshot records {sha256}"));
    }
    dir.rename(&part, &name).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Runs `work` (blocking: it moves a stream) off the async threads, telling `progress` the bytes
/// moved each second; the bytes in all.
async fn ticking(
    what: &str,
    progress: &(dyn Fn(&str) + Sync),
    transport: Transport,
    work: impl FnOnce(&Transport, &AtomicU64) -> Result<(), String> + Send + 'static,
) -> Result<u64, String> {
    let moved = Arc::new(AtomicU64::new(0));
    let counter = moved.clone();
    let mut task = tokio::task::spawn_blocking(move || work(&transport, &counter));
    let t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut task => {
                r.map_err(|e| e.to_string())??;
                return Ok(moved.load(Ordering::Relaxed));
            }
            _ = tick.tick() => {
                let tr = super::Transfer::measure(what, moved.load(Ordering::Relaxed), None, t.elapsed());
                progress(&tr.to_string());
            }
        }
    }
}
