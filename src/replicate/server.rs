//! `vmsnap serve`: the target side of replication, run by sshd as the forced command of the
//! source's key (`command="vmsnap serve --root backup/vmsnap --ram-dir /srv/vmsnap-ram"`), or as
//! a child process for a local target. It answers one [`Request`] per run, on stdin/stdout.
//!
//! The target is in charge of itself: datasets are only ever under `--root`, RAM dumps only under
//! `--ram-dir`, receives are resumable and never forced (`-F`), nothing is destroyed on a
//! source's word, and the newest received snapshot of each dataset carries the hold
//! [`HOLD`] so the target's own pruning cannot take the common base away. What it destroys, by
//! its own rules only, is in [`super::target_retention`].

use super::protocol::{
    valid_sha256, valid_snapshot_name, Listing, RamCheck, RamState, Reply, Request, TargetSnapshot, MAX_REQUEST, PAGE_BYTES,
};
use crate::fsutil::Dir;
use crate::model::prop;
use crate::zfs::{Dataset, PropName, SnapshotInfo, SnapshotName, Zfs};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The hold on each replicated dataset's newest received snapshot.
pub const HOLD: &str = "vmsnap-replica";

/// The file in `--ram-dir` naming the source it serves.
const SOURCE_FILE: &str = ".vmsnap-source";

fn refused_source(what: &str, bound: &str) -> String {
    format!(
        "{what} serves the source {:?} (its key's forced command says --source {}): every source needs its own key, --root, --ram-dir and --source",
        super::protocol::shown(bound, 80),
        super::protocol::shown(bound, 80)
    )
}

/// The directory below `--ram-dir` where receives in progress are noted.
const PENDING: &str = ".receiving";

/// A note's file name: a hash of the dataset name (any length, no `/`).
fn pending_name(ds: &Dataset) -> String {
    Sha256::digest(ds.as_str().as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The lock a receive holds on its note while it runs (`<note>.lock`, beside it).
const LOCK_SUFFIX: &str = ".lock";

/// A snapshot and the properties a source asked to set on it, checked.
type Wanted = (SnapshotName, BTreeMap<PropName, String>);

/// Snapshots whose properties one `zfs get` reads for a listing's page.
const LIST_CHUNK: usize = 128;

/// How long a receive waits for an earlier one into the same dataset (a connection that was cut:
/// its `zfs receive` is ending) before it gives up.
const EARLIER_RECEIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where this target keeps what it receives, and what it lets sources ask.
#[derive(Debug, Clone)]
pub struct Server {
    pub root: Dataset,
    pub ram_dir: PathBuf,
    pub zfs: Zfs,
    /// Its own retention (`--keep`); `None`: it keeps everything.
    pub keep: Option<super::target_retention::TargetPolicy>,
    /// `--allow-rollback`: a source may ask to roll a dataset back to the common snapshot.
    pub allow_rollback: bool,
    /// `--source`: the one source the root and RAM directory serve ([`prop::SERVE_SOURCE`]).
    pub source: Option<String>,
    /// `--now`: the clock retention decides by (tests); `None`: the system's.
    pub now: Option<i64>,
}

/// Reads the request line from fd 0 a byte at a time (what follows it belongs to `zfs receive`
/// or the RAM upload, so nothing may be read ahead).
fn read_request() -> Result<Request, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(0, &mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(format!("reading the request: {e}")),
        }
        if line.len() > MAX_REQUEST {
            return Err(format!("the request is longer than {MAX_REQUEST} bytes"));
        }
    }
    serde_json::from_slice(&line).map_err(|e| format!("not a request vmsnap serves: {e}"))
}

impl Server {
    /// Serves one request from stdin; the reply goes to stdout. The exit status is 0 whenever a
    /// reply was written (the reply says whether it went well).
    /// A request that streams back ([`Request::streams_back`]) writes its reply line first and,
    /// when that says ok, the stream after it; a stream that fails half-way makes the exit
    /// status non-zero (the source's `zfs receive` or checksum sees the rest).
    pub async fn serve_stdio(&self) -> std::io::Result<()> {
        if let Err(e) = self.mark_root().await {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string(&Reply::err(e)).unwrap_or_default())?;
            return out.flush();
        }
        let reply = match read_request() {
            Ok(req) if req.streams_back() => {
                tracing::info!(?req, "request");
                return self.stream_back(req).await;
            }
            Ok(req) => {
                tracing::info!(?req, "request");
                self.handle(req).await.unwrap_or_else(Reply::err)
            }
            Err(e) => Reply::err(e),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&reply).unwrap_or_default())?;
        out.flush()
    }

    /// [`Request::Send`] and [`Request::RamGet`]: checked, answered, then streamed to fd 1.
    async fn stream_back(&self, req: Request) -> std::io::Result<()> {
        let reply_line = |r: &Reply| -> std::io::Result<()> {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default())?;
            out.flush()
        };
        let failed = |why: String| std::io::Error::other(why);
        match req {
            Request::Send { dataset, snapshot, from } => {
                let snap = match self.snapshot(&dataset, &snapshot) {
                    Ok(s) => s,
                    Err(e) => return reply_line(&Reply::err(e)),
                };
                if let Some(f) = from.as_deref().filter(|f| !valid_snapshot_name(f)) {
                    return reply_line(&Reply::err(format!("{f:?} is not a snapshot name vmsnap makes")));
                }
                let encrypted = match self.zfs.get_native(snap.dataset().as_str(), "encryption").await {
                    Ok(Some(e)) => e != "off",
                    Ok(None) => return reply_line(&Reply::err(format!("{} does not exist here", snap.dataset()))),
                    Err(e) => return reply_line(&Reply::err(e.to_string())),
                };
                let mut args: Vec<String> = vec!["send".into()];
                if encrypted {
                    args.push("-w".into());
                }
                if let Some(f) = from {
                    args.extend(["-i".into(), format!("@{f}")]);
                }
                args.push(snap.to_string());
                reply_line(&Reply::ok(serde_json::Value::Null))?;
                let status = tokio::process::Command::new(self.zfs.cli().zfs_program())
                    .args(&args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::inherit())
                    .status()
                    .await?;
                if !status.success() {
                    return Err(failed(format!("zfs send of {snap}: {status}")));
                }
                Ok(())
            }
            Request::RamGet { domain, snapshot, offset } => {
                let opened = ram_place(&self.ram_dir, &domain, &snapshot).and_then(|(dir, name)| {
                    let path = dir.join(name);
                    crate::fsutil::open_regular(&path).map_err(|e| format!("{}: {e}", path.display()))
                });
                let mut file = match opened {
                    Ok(f) => f,
                    Err(e) => return reply_line(&Reply::err(e)),
                };
                let size = file.metadata()?.len();
                if offset > size {
                    return reply_line(&Reply::err(format!("offset {offset} is past the dump's {size} bytes")));
                }
                reply_line(&Reply::ok(RamState { partial: size, complete: true, path: None, sealed: false, sha256: None }))?;
                tokio::task::spawn_blocking(move || {
                    file.seek(std::io::SeekFrom::Start(offset))?;
                    let mut out = std::io::stdout().lock();
                    std::io::copy(&mut file, &mut out)?;
                    out.flush()
                })
                .await
                .map_err(|e| failed(e.to_string()))?
            }
            other => reply_line(&Reply::err(format!("{other:?} does not stream back"))),
        }
    }

    /// A dataset named relative to the root.
    fn dataset(&self, rel: &str) -> Result<Dataset, String> {
        if rel.starts_with('/') || rel.split('/').any(|c| c == "." || c == "..") {
            return Err(format!("{rel:?} is not a relative dataset name"));
        }
        Dataset::new(&format!("{}/{rel}", self.root)).map_err(|e| e.to_string())
    }

    async fn handle(&self, req: Request) -> Result<Reply, String> {
        match req {
            Request::List { dataset, after } => Ok(Reply::ok(self.list(&self.dataset(&dataset)?, after).await?)),
            Request::Recv { dataset } => self.recv(&self.dataset(&dataset)?).await.map(Reply::ok),
            Request::Abort { dataset } => {
                let ds = self.dataset(&dataset)?;
                self.zfs.cli().zfs(crate::zargs!["receive", "-A", ds.as_str()]).await.map_err(|e| e.to_string())?;
                Ok(Reply::ok("aborted"))
            }
            Request::Props { dataset, snapshot, props } => {
                let answer = self.props_many(vec![(dataset, snapshot, props)]).await.pop().ok_or("no answer")?;
                Ok(Reply::ok(answer?))
            }
            Request::Prune { domain } => Ok(Reply::ok(self.prune(&domain).await?)),
            Request::Datasets { domain } => Ok(Reply::ok(self.datasets_of(&domain).await?)),
            Request::Rollback { dataset, to_guid } => Ok(Reply::ok(self.rollback(&self.dataset(&dataset)?, to_guid).await?)),
            Request::RamStat { domain, snapshot } => Ok(Reply::ok(self.ram_stat(&domain, &snapshot)?)),
            Request::Send { .. } | Request::RamGet { .. } => Err("this request streams back (served by stream_back)".into()),
            Request::Batch { requests } => {
                let mut replies = Vec::with_capacity(requests.len());
                // Consecutive `props` requests are served together (one `zfs get` reads all
                // their marks, one reads all their values back).
                let mut props = Vec::new();
                for r in requests {
                    if let Request::Props { dataset, snapshot, props: p } = r {
                        props.push((dataset, snapshot, p));
                        continue;
                    }
                    self.flush_props(&mut props, &mut replies).await;
                    replies.push(if r.batchable() {
                        Box::pin(self.handle(r)).await.unwrap_or_else(Reply::err)
                    } else {
                        Reply::err(format!("a {} request cannot be in a batch", r.verb()))
                    });
                }
                self.flush_props(&mut props, &mut replies).await;
                Ok(Reply::ok(replies))
            }
            Request::RamCheck { domain, snapshot, sha256 } => {
                if !valid_sha256(&sha256) {
                    return Err("sha256: not 64 lower-case hex digits".into());
                }
                let dir = self.ram_dir.clone();
                let checked = tokio::task::spawn_blocking(move || ram_check(&dir, &domain, &snapshot, &sha256))
                    .await
                    .map_err(|e| e.to_string())??;
                Ok(Reply::ok(checked))
            }
            Request::RamPut { domain, snapshot, sha256, offset, size, sealed } => {
                let sum = match (sealed, sha256.as_str()) {
                    (true, "") => Sum::Sealed,
                    (true, _) => return Err("sha256: a sealed dump is announced without one".into()),
                    (false, s) if valid_sha256(s) => Sum::Announced(sha256),
                    (false, _) => return Err("sha256: not 64 lower-case hex digits".into()),
                };
                let (domain, snapshot, dir) = (domain.clone(), snapshot.clone(), self.ram_dir.clone());
                let state = tokio::task::spawn_blocking(move || ram_put(&dir, &domain, &snapshot, sum, offset, size))
                    .await
                    .map_err(|e| e.to_string())??;
                Ok(Reply::ok(state))
            }
        }
    }

    fn snapshot(&self, dataset: &str, snapshot: &str) -> Result<SnapshotName, String> {
        if !valid_snapshot_name(snapshot) {
            return Err(format!("{snapshot:?} is not a snapshot name vmsnap makes"));
        }
        self.dataset(dataset)?.snapshot(snapshot).map_err(|e| e.to_string())
    }

    /// One page of the target's listing of `ds`: the snapshots created after txg `after`
    /// ([`Listing::page`]). The snapshots are listed without their properties (cheap), and only
    /// the page's are read with theirs, so that each page costs what it holds: a dataset with
    /// thousands of snapshots is listed in many pages, not in many whole listings.
    async fn list(&self, ds: &Dataset, after: Option<u64>) -> Result<Listing, String> {
        let Some(mut native) = self.zfs.get_natives(ds.as_str(), &["receive_resume_token", "written"]).await.map_err(|e| e.to_string())?
        else {
            return Ok(Listing::default());
        };
        let all = match self.zfs.list_snapshots(ds, &[]).await {
            Ok(all) => all,
            Err(crate::zfs::ZfsError::NotFound { .. }) => return Ok(Listing::default()),
            Err(e) => return Err(e.to_string()),
        };
        let rest: Vec<&SnapshotInfo> = all.iter().filter(|s| after.is_none_or(|a| s.createtxg > a)).collect();
        let mut fetched = Vec::new();
        let mut size = 0;
        let mut next = 0;
        // Whole chunks until the page is full and the last one's txg is over.
        while next < rest.len()
            && (size <= PAGE_BYTES || fetched.last().is_some_and(|l: &TargetSnapshot| l.createtxg == rest[next].createtxg))
        {
            let chunk = &rest[next..rest.len().min(next + LIST_CHUNK)];
            next += chunk.len();
            for snap in self.with_props(chunk).await? {
                size += serde_json::to_string(&snap).map_or(PAGE_BYTES, |t| t.len() + 1);
                fetched.push(snap);
            }
        }
        let listing = Listing {
            exists: true,
            snapshots: fetched,
            resume_token: native.remove("receive_resume_token"),
            written: native.get("written").and_then(|w| w.parse().ok()).unwrap_or(0),
            more: false,
        };
        let mut page = listing.page(after);
        page.more |= next < rest.len();
        Ok(page)
    }

    /// `snaps` as the target lists them, with their `vmsnap:*` properties (with
    /// `vmsnap:replica`, so a source sees which copies are complete and leaves them be), set on
    /// the snapshot or received with it: one `zfs get` for all; one that is gone meanwhile
    /// (destroyed by this target's retention) is left out.
    async fn with_props(&self, snaps: &[&SnapshotInfo]) -> Result<Vec<TargetSnapshot>, String> {
        let names: Vec<String> = snaps.iter().map(|s| s.name.to_string()).collect();
        let mut gone = std::collections::BTreeSet::new();
        let mut props = match self.zfs.properties_of(&names, &prop::ALL_AND_REPLICA, "local,received").await {
            Ok(p) => p,
            Err(crate::zfs::ZfsError::NotFound { .. }) => {
                let mut each = BTreeMap::new();
                for name in &names {
                    match self.zfs.properties_of(std::slice::from_ref(name), &prop::ALL_AND_REPLICA, "local,received").await {
                        Ok(p) => each.extend(p),
                        Err(crate::zfs::ZfsError::NotFound { .. }) => {
                            gone.insert(name.clone());
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                each
            }
            Err(e) => return Err(e.to_string()),
        };
        Ok(snaps
            .iter()
            .filter(|s| !gone.contains(&s.name.to_string()))
            .map(|s| TargetSnapshot {
                name: s.name.snap().to_owned(),
                guid: s.guid,
                createtxg: s.createtxg,
                props: props.remove(&s.name.to_string()).unwrap_or_default().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            })
            .collect())
    }

    /// `zfs receive` from this process's stdin, resumable, read-only and with nothing from the
    /// stream that reaches outside the root ([`super::receive`]); then the hold moves to the newest
    /// snapshot.
    async fn recv(&self, ds: &Dataset) -> Result<Listing, String> {
        // `zfs receive` makes the dataset but not its parents: they are unmounted containers.
        if let Some((parent, _)) = ds.as_str().rsplit_once('/') {
            if self.zfs.get_native(parent, "guid").await.map_err(|e| e.to_string())?.is_none() {
                self.zfs.cli().zfs(crate::zargs!["create", "-p", "-o", "canmount=off", parent]).await.map_err(|e| e.to_string())?;
                self.mark_root().await?;
            }
        }
        // An earlier receive into the same dataset (a cut connection's) may still be ending.
        let running = self.receiving_lock(ds).await?;
        // Its note, if a receive into `ds` stopped before marking what it brought, is finished
        // first (this process holds its lock now).
        self.finish_notes(Some(&pending_name(ds))).await?;
        // GUIDs only: a listing without user properties costs a fraction of a full one.
        let before: Vec<u64> = match self.zfs.list_snapshots(ds, &[]).await {
            Ok(snaps) => snaps.iter().map(|s| s.guid).collect(),
            Err(crate::zfs::ZfsError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.to_string()),
        };
        self.note_receiving(ds, &before)?;
        let out = tokio::process::Command::new(self.zfs.cli().zfs_program())
            .args(super::receive::argv(ds.as_str(), super::receive::Receiving::Replica))
            .stdin(std::process::Stdio::inherit())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .await
            .map_err(|e| format!("running zfs receive: {e}"))?;
        // Even a failed receive may have brought some snapshots of a package.
        drop(running);
        self.finish_pending().await?;
        if !out.status.success() {
            return Err(format!("zfs receive into {ds}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        self.move_hold(ds).await?;
        self.list(ds, None).await
    }

    /// The datasets below the root (relative names, sorted) with a received snapshot whose
    /// `vmsnap:domain` is `domain`.
    async fn datasets_of(&self, domain: &str) -> Result<Vec<String>, String> {
        if !crate::config::valid_domain_name(domain) {
            return Err(format!("{domain:?} is not a domain name"));
        }
        let args = crate::zargs![
            "get",
            "-H",
            "-r",
            "-t",
            "snapshot",
            "-s",
            "local",
            "-o",
            "name,value",
            prop::DOMAIN.as_str(),
            self.root.as_str()
        ];
        let text = match self.zfs.cli().zfs(args).await {
            Ok(t) => t,
            Err(crate::zfs::ZfsError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        let received = self.received_snapshots().await?;
        let prefix = format!("{}/", self.root);
        let mut out: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(name, v)| *v == domain && received.contains(*name))
            .filter_map(|(name, _)| name.split_once('@')?.0.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Sets [`prop::SERVE_ROOT`] on the root itself (once), so that this host's own verbs leave
    /// everything below it alone; nothing to do while the root does not exist yet.
    /// Also binds the root and the RAM directory to `--source` (the first source to use them):
    /// another source's requests are refused, so one source cannot read, abort or overwrite
    /// another's replicas even when an administrator gives two keys the same root.
    async fn mark_root(&self) -> Result<(), String> {
        self.bind_ram_dir()?;
        let props = format!("{},{}", prop::SERVE_ROOT, prop::SERVE_SOURCE);
        let args = crate::zargs!["get", "-H", "-o", "property,value,source", props, self.root.as_str()];
        let text = match self.zfs.cli().zfs(args).await {
            Ok(t) => t,
            Err(crate::zfs::ZfsError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let local = |p: &PropName| {
            text.lines()
                .map(|l| l.split('\t').collect::<Vec<_>>())
                .find(|f| f.len() == 3 && f[0] == p.as_str() && f[2] == "local")
                .map(|f| f[1].to_owned())
        };
        let marking = |e: crate::zfs::ZfsError| format!("marking {}: {e}", self.root);
        match (local(&prop::SERVE_SOURCE), &self.source) {
            (Some(bound), Some(me)) if bound != *me => return Err(refused_source(self.root.as_str(), &bound)),
            (Some(bound), None) => return Err(refused_source(self.root.as_str(), &bound)),
            (None, Some(me)) => self.zfs.set_property(self.root.as_str(), &prop::SERVE_SOURCE, me).await.map_err(marking)?,
            _ => {}
        }
        if local(&prop::SERVE_ROOT).is_none() {
            self.zfs.set_property(self.root.as_str(), &prop::SERVE_ROOT, "on").await.map_err(marking)?;
        }
        Ok(())
    }

    /// The RAM directory's `.vmsnap-source` names the source it serves (written by the first).
    fn bind_ram_dir(&self) -> Result<(), String> {
        let bound = crate::fsutil::read_limited(&self.ram_dir.join(SOURCE_FILE), 256).ok();
        let bound = bound.map(|b| String::from_utf8_lossy(&b).trim().to_owned());
        match (bound, &self.source) {
            (Some(b), Some(me)) if b == *me => Ok(()),
            (Some(b), _) => Err(refused_source(&self.ram_dir.display().to_string(), &b)),
            (None, Some(me)) => {
                let dir = Dir::private(&self.ram_dir, &[]).map_err(|e| e.to_string())?;
                dir.write_atomic(SOURCE_FILE, format!("{me}\n").as_bytes(), 0o600).map_err(|e| e.to_string())
            }
            (None, None) => Ok(()),
        }
    }

    /// Marks snapshots of `ds` this server received ([`prop::RECEIVED`], set locally, the time).
    async fn mark_received(&self, ds: &Dataset, snaps: &[&str]) -> Result<(), String> {
        let now = chrono::Utc::now().timestamp().to_string();
        let names = snaps.iter().map(|name| ds.snapshot(name).map(|s| s.to_string())).collect::<Result<Vec<_>, _>>();
        let names = names.map_err(|e| e.to_string())?;
        self.zfs.set_property_on(&names, &prop::RECEIVED, &now).await.map_err(|e| format!("marking what {ds} received: {e}"))
    }

    /// The snapshots below the root this server received ([`prop::RECEIVED`] set locally), full names.
    pub(super) async fn received_snapshots(&self) -> Result<std::collections::BTreeSet<String>, String> {
        match self.zfs.datasets_with_local(&prop::RECEIVED, "snapshot", Some(&self.root)).await {
            Ok(names) => Ok(names.into_iter().collect()),
            Err(crate::zfs::ZfsError::NotFound { .. }) => Ok(Default::default()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Which of `snaps` (full names) this server marked as received: one `zfs get` per 500;
    /// when one of them is gone meanwhile (that fails the whole call), each is asked alone.
    async fn marked_among(&self, snaps: &[String]) -> Result<std::collections::BTreeSet<String>, String> {
        let mut marked = std::collections::BTreeSet::new();
        for chunk in snaps.chunks(500) {
            match self.zfs.properties_of(chunk, &[prop::RECEIVED], "local").await {
                Ok(marks) => marked.extend(marks.into_iter().filter(|(_, p)| p.contains_key(&prop::RECEIVED)).map(|(n, _)| n)),
                Err(crate::zfs::ZfsError::NotFound { .. }) => {
                    for name in chunk {
                        if self.zfs.get_local(name, &prop::RECEIVED).await.map_err(|e| e.to_string())?.is_some() {
                            marked.insert(name.clone());
                        }
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(marked)
    }

    /// Notes, before a receive into `ds`, the GUIDs of the snapshots it has
    /// (`<ram_dir>/.receiving/`): whatever snapshot is there afterwards and not in the note came
    /// from that receive, and is marked by [`Self::finish_pending`] even when this process is
    /// stopped between the receive and the marking.
    fn note_receiving(&self, ds: &Dataset, before: &[u64]) -> Result<(), String> {
        let dir = Dir::private(&self.ram_dir, &[PENDING]).map_err(|e| e.to_string())?;
        let note = serde_json::json!({ "dataset": ds.as_str(), "before": before });
        dir.write_atomic(&pending_name(ds), note.to_string().as_bytes(), 0o600).map_err(|e| e.to_string())
    }

    /// The lock of the note of a receive into `ds`, held while the receive runs; waits up to
    /// [`EARLIER_RECEIVE_WAIT`] for an earlier receive's.
    async fn receiving_lock(&self, ds: &Dataset) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
        let t = std::time::Instant::now();
        loop {
            if let Some(lock) = self.try_note_lock(&pending_name(ds))? {
                return Ok(lock);
            }
            if t.elapsed() > EARLIER_RECEIVE_WAIT {
                return Err(format!("an earlier receive into {ds} still runs here after {} s", EARLIER_RECEIVE_WAIT.as_secs()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// The lock of note `name`, or `None` while a receive holds it.
    fn try_note_lock(&self, name: &str) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, String> {
        use nix::fcntl::{Flock, FlockArg};
        let dir = Dir::private(&self.ram_dir, &[PENDING]).map_err(|e| e.to_string())?;
        let file = dir.open_resumable(&format!("{name}{LOCK_SUFFIX}")).map_err(|e| e.to_string())?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(format!("locking the note of a receive: {e}")),
        }
    }

    /// Marks what each noted receive brought ([`Self::note_receiving`]), then drops the notes.
    /// A note whose receive still runs (in another `vmsnap serve`: its lock is held) is left to
    /// it, and one another process finished meanwhile is gone, not an error.
    pub(super) async fn finish_pending(&self) -> Result<(), String> {
        self.finish_notes(None).await
    }

    /// [`Self::finish_pending`]; `held`: the note whose lock this process holds already.
    async fn finish_notes(&self, held: Option<&str>) -> Result<(), String> {
        let dir = self.ram_dir.join(PENDING);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            if name.ends_with(LOCK_SUFFIX) || name.starts_with('.') {
                continue;
            }
            let _lock = match held {
                Some(h) if h == name => None,
                _ => match self.try_note_lock(&name)? {
                    Some(lock) => Some(lock),
                    None => continue,
                },
            };
            let text = match crate::fsutil::read_limited(&path, 1 << 20) {
                Ok(t) => t,
                Err(crate::fsutil::FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let note: serde_json::Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let ds = note["dataset"].as_str().and_then(|d| Dataset::new(d).ok()).filter(|d| self.root_contains(d));
            if let Some(ds) = ds {
                let before: Vec<u64> = note["before"].as_array().map(|a| a.iter().filter_map(|g| g.as_u64()).collect()).unwrap_or_default();
                match self.zfs.list_snapshots(&ds, &[]).await {
                    Ok(snaps) => {
                        // What the receive brought, less what is marked already (a note
                        // finished once but not removed): asked of those snapshots only.
                        let before: std::collections::HashSet<u64> = before.into_iter().collect();
                        let brought: Vec<String> = snaps.iter().filter(|s| !before.contains(&s.guid)).map(|s| s.name.to_string()).collect();
                        let marked = self.marked_among(&brought).await?;
                        let new: Vec<&str> = snaps
                            .iter()
                            .filter(|s| !before.contains(&s.guid) && !marked.contains(&s.name.to_string()))
                            .map(|s| s.name.snap())
                            .collect();
                        self.mark_received(&ds, &new).await?;
                    }
                    Err(crate::zfs::ZfsError::NotFound { .. }) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Ok(())
    }

    fn root_contains(&self, ds: &Dataset) -> bool {
        ds.as_str().strip_prefix(self.root.as_str()).is_some_and(|rest| rest.starts_with('/'))
    }

    /// Holds the newest snapshot of `ds` ([`HOLD`]: the next incremental's base cannot be
    /// destroyed here) and releases the older ones this server held.
    async fn move_hold(&self, ds: &Dataset) -> Result<(), String> {
        let snaps = self.zfs.list_snapshots(ds, &[]).await.map_err(|e| e.to_string())?;
        let Some(newest) = snaps.last() else { return Ok(()) };
        match self.zfs.hold(HOLD, std::slice::from_ref(&newest.name)).await {
            Ok(()) | Err(crate::zfs::ZfsError::AlreadyExists { .. }) => {}
            Err(e) => return Err(format!("hold {}: {e}", newest.name)),
        }
        // Only snapshots with a hold are asked which: a target keeps thousands of snapshots.
        let others: Vec<SnapshotName> = snaps.iter().filter(|s| s.name != newest.name && s.userrefs > 0).map(|s| s.name.clone()).collect();
        let held: Vec<SnapshotName> = self
            .zfs
            .holds_of(&others)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|h| h.tag == HOLD)
            .map(|h| h.snapshot)
            .collect();
        if !held.is_empty() {
            self.zfs.release(HOLD, &held).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Serves the `props` requests gathered in `pending`, appending their replies.
    async fn flush_props(&self, pending: &mut Vec<(String, String, BTreeMap<String, String>)>, replies: &mut Vec<Reply>) {
        if pending.is_empty() {
            return;
        }
        let answers = self.props_many(std::mem::take(pending)).await;
        replies.extend(answers.into_iter().map(|a| a.map_or_else(Reply::err, Reply::ok)));
    }

    /// Sets `vmsnap:*` properties on each snapshot (`dataset`, `snapshot`, properties), each
    /// one's answer in order: what it holds afterwards. `vmsnap:ram-dump` names this target's
    /// copy, and `vmsnap:replica=complete` is accepted only once that copy is whole and checked.
    /// Only on snapshots this server received, and only the properties a snapshot carries from
    /// when it is taken ([`prop::ALL`]), `vmsnap:replica` and `vmsnap:ram-sealed` (the sealed
    /// copy's sha256, the source's word as `vmsnap:ram-sha256` is): never this target's own marks.
    /// The marks are read in one `zfs get` and the values back in another; each snapshot's
    /// values are set in one `zfs set` (all or none of them).
    async fn props_many(&self, items: Vec<(String, String, BTreeMap<String, String>)>) -> Vec<Result<BTreeMap<String, String>, String>> {
        let mut wanted: Vec<Result<Wanted, String>> = items
            .into_iter()
            .map(|(ds, snap, props)| self.snapshot(&ds, &snap).and_then(|s| Ok((s.clone(), self.wanted(&s, props)?))))
            .collect();
        let names: Vec<String> = wanted.iter().flatten().map(|(s, _)| s.to_string()).collect();
        let received = match self.finish_pending().await {
            Ok(()) => self.marked_among(&names).await,
            Err(e) => Err(e),
        };
        for w in &mut wanted {
            let Ok((snap, props)) = &*w else { continue };
            let name = snap.to_string();
            let was = received.as_ref().map(|marked| marked.contains(&name)).map_err(Clone::clone);
            let set = match was {
                Ok(true) => self.zfs.set_properties(&name, props).await.map_err(|e| e.to_string()),
                Ok(false) => Err(format!("{name} was not received by this target: a source sets properties only on what it sent")),
                Err(e) => Err(e),
            };
            if let Err(e) = set {
                *w = Err(e);
            }
        }
        let set: Vec<String> = wanted.iter().flatten().map(|(s, _)| s.to_string()).collect();
        let keys: std::collections::BTreeSet<PropName> = wanted.iter().flatten().flat_map(|(_, p)| p.keys().cloned()).collect();
        let keys: Vec<PropName> = keys.into_iter().collect();
        let mut back = self.zfs.properties_of(&set, &keys, "local,received").await.map_err(|e| e.to_string());
        let mut answers = Vec::with_capacity(wanted.len());
        for w in wanted {
            answers.push(match w {
                Err(e) => Err(e),
                Ok((snap, _)) => {
                    let name = snap.to_string();
                    let values = match &mut back {
                        Ok(all) => Ok(all.remove(&name).unwrap_or_default()),
                        Err(_) => self.zfs.user_properties(&name).await.map_err(|e| e.to_string()),
                    };
                    values.map(|v| {
                        v.into_iter().filter(|(k, _)| k.as_str().starts_with("vmsnap:")).map(|(k, v)| (k.to_string(), v)).collect()
                    })
                }
            });
        }
        answers
    }

    /// The properties a source asked to set on `snap`, checked; the RAM dump's path is this
    /// target's.
    fn wanted(&self, snap: &SnapshotName, props: BTreeMap<String, String>) -> Result<BTreeMap<PropName, String>, String> {
        let mut set = BTreeMap::new();
        for (k, v) in props {
            let name = PropName::new(&k).map_err(|e| e.to_string())?;
            if !prop::ALL.contains(&name) && name != prop::REPLICA && name != prop::RAM_SEALED {
                return Err(format!("{k}: not a property a source sets on a target"));
            }
            if v.len() > 4096 || v.chars().any(char::is_control) {
                return Err(format!("{k}: the value is too long or has control characters"));
            }
            set.insert(name, v);
        }
        if set.contains_key(&prop::RAM_DUMP) {
            let domain = set.get(&prop::DOMAIN).ok_or("vmsnap:ram-dump without vmsnap:domain")?.clone();
            let state = self.ram_stat(&domain, snap.snap())?;
            set.insert(prop::RAM_DUMP, state.path.clone().unwrap_or_default());
            if set.get(&prop::REPLICA).map(String::as_str) == Some("complete") && !state.complete {
                return Err(format!("{snap}: its RAM dump is not here whole; it cannot be marked complete"));
            }
        }
        Ok(set)
    }

    fn ram_stat(&self, domain: &str, snapshot: &str) -> Result<RamState, String> {
        let (dir, name) = ram_place(&self.ram_dir, domain, snapshot)?;
        let complete = dir.join(&name);
        let partial = dir.join(format!("{name}.part"));
        let is_complete = std::fs::symlink_metadata(&complete).is_ok_and(|m| m.is_file());
        Ok(RamState {
            partial: std::fs::symlink_metadata(&partial).map(|m| m.len()).unwrap_or(0),
            complete: is_complete,
            sealed: is_complete && crate::ramcrypt::is_sealed(&complete),
            path: Some(complete.display().to_string()),
            sha256: None,
        })
    }
}

/// `<ram_dir>/<domain>` and `<snapshot>.ram`, both names checked.
pub(super) fn ram_place(ram_dir: &Path, domain: &str, snapshot: &str) -> Result<(PathBuf, String), String> {
    if !crate::config::valid_domain_name(domain) {
        return Err(format!("{domain:?} is not a domain name"));
    }
    if !valid_snapshot_name(snapshot) {
        return Err(format!("{snapshot:?} is not a snapshot name vmsnap makes"));
    }
    Ok((ram_dir.join(domain), format!("{snapshot}.ram")))
}

/// Reads the complete copy of a dump again and compares its sha256 with `sha256`.
fn ram_check(ram_dir: &Path, domain: &str, snapshot: &str, sha256: &str) -> Result<RamCheck, String> {
    let (dir, name) = ram_place(ram_dir, domain, snapshot)?;
    let path = dir.join(&name);
    let file = crate::fsutil::open_regular(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (bytes, got) = crate::fsutil::sha256_of(file, |_| {}).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(RamCheck { bytes, matches: got == sha256 })
}

/// Where a [`Request::RamPut`]'s whole-file sha256 is.
enum Sum {
    /// In the request.
    Announced(String),
    /// None: a sealed dump (it must begin as one); the target answers its copy's.
    Sealed,
}

/// Appends stdin to `<snapshot>.ram.part` at `offset` (which must be the partial file's length),
/// at most up to `size` bytes in all, then checks the whole file against the sha256 and only then
/// names it `<snapshot>.ram`.
fn ram_put(ram_dir: &Path, domain: &str, snapshot: &str, sum: Sum, offset: u64, size: u64) -> Result<RamState, String> {
    let (_, name) = ram_place(ram_dir, domain, snapshot)?;
    let dir = Dir::private(ram_dir, &[domain]).map_err(|e| e.to_string())?;
    let part = format!("{name}.part");
    let mut file = dir.open_resumable(&part).map_err(|e| e.to_string())?;
    let have = file.metadata().map_err(|e| e.to_string())?.len();
    if have != offset {
        return Err(format!("{part}: the target has {have} bytes, the source sends from {offset}"));
    }
    if offset > size {
        return Err(format!("{part}: offset {offset} is past the announced {size} bytes"));
    }
    file.seek(std::io::SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut input = std::io::stdin().lock().take(size - offset);
    std::io::copy(&mut input, &mut file).map_err(|e| format!("receiving {part}: {e}"))?;
    file.sync_all().map_err(|e| e.to_string())?;
    let path = dir.path().join(&name).display().to_string();
    let refuse = |why: String| {
        let _ = std::fs::remove_file(dir.path().join(&part));
        Err(format!("{path}: {why}; the partial copy was deleted"))
    };
    let have = file.metadata().map_err(|e| e.to_string())?.len();
    if have < size {
        return Err(format!("{part}: the source stopped after {have} of {size} bytes; the next run resumes from there"));
    }
    // Checked here, on the target's own copy: against the source's sum, or (sealed) as one.
    file.rewind().map_err(|e| e.to_string())?;
    let (_, got) = crate::fsutil::sha256_of(&mut file, |_| {}).map_err(|e| e.to_string())?;
    let sealed = match sum {
        Sum::Announced(want) if got != want => return refuse(format!("the copy's sha256 is {got}, the source's {want}")),
        Sum::Announced(_) => false,
        Sum::Sealed if !crate::ramcrypt::is_sealed(&dir.path().join(&part)) => {
            return refuse("announced sealed, but not a sealed RAM dump".into())
        }
        Sum::Sealed => true,
    };
    dir.rename(&part, &name).map_err(|e| e.to_string())?;
    Ok(RamState { partial: 0, complete: true, path: Some(path), sealed, sha256: sealed.then_some(got) })
}
