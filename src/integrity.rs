//! Integrity records: what this host knows each of its snapshots held when it took it — the
//! sha256 of the domain XML and nvram saved in it and of its RAM dump — kept in
//! `<state_dir>/integrity/<domain>/<YYYY-MM>.jsonl` (one line per snapshot, by the month in its
//! name; a few hundred bytes each, kept after the snapshot is pruned here: the target may
//! still hold it), never sent to a replication target.
//!
//! `restore --from` checks what a target sends back against them: a target can keep or lose a
//! snapshot, but what it changed (a domain XML with another `<emulator>`, a host disk, a
//! `<qemu:commandline>`; an nvram; a RAM dump) is refused and removed again, whatever
//! checksums the target's own properties claim. A host rebuilt after a disaster has no records:
//! then a pulled snapshot is used only when the user says they trust the target.

use crate::fsutil::{Dir, FsError};
use crate::zfs::{SnapshotName, Zfs, ZfsError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a snapshot held, by sha256 (lower-case hex); `None`: it held no such file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub domain: String,
    pub snapshot: String,
    pub xml_sha256: Option<String>,
    pub nvram_sha256: Option<String>,
    pub ram_sha256: Option<String>,
}

const DIR: &str = "integrity";

/// A domain file a snapshot saved in `.vmsnap/<domain>/` of its first mounted file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedFile {
    /// The copy as the snapshot holds it, under `.zfs/snapshot/` (what restores and checks read).
    pub frozen: PathBuf,
    /// Where the live file system keeps it (what a rollback brings back).
    pub live: PathBuf,
}

/// The saved domain file `file` of `unit`: read under `.zfs/snapshot/` (what the snapshot holds,
/// not the live file); `None` when no mounted file system of the unit holds it.
pub async fn saved_file(zfs: &Zfs, unit: &[SnapshotName], domain: &str, file: &str) -> Result<Option<SavedFile>, ZfsError> {
    for s in unit {
        let Some(mp) = zfs.get_native(s.dataset().as_str(), "mountpoint").await? else { continue };
        if !mp.starts_with('/') {
            continue;
        }
        let frozen = PathBuf::from(&mp).join(".zfs/snapshot").join(s.snap()).join(".vmsnap").join(domain).join(file);
        if frozen.is_file() {
            let live = PathBuf::from(&mp).join(".vmsnap").join(domain).join(file);
            return Ok(Some(SavedFile { frozen, live }));
        }
    }
    Ok(None)
}

/// The sha256 of a regular file (never a symlink or a FIFO), streamed.
pub fn sha256_file(path: &Path) -> Result<String, FsError> {
    let f = crate::fsutil::open_regular(path)?;
    let (_, sum) = crate::fsutil::sha256_of(f, |_| {}).map_err(|source| FsError::Io { what: "reading", path: path.to_owned(), source })?;
    Ok(sum)
}

/// What `unit` (a domain's snapshot, one per dataset) holds now: its saved XML and nvram hashed;
/// `ram_sha256` as given.
pub async fn held(zfs: &Zfs, unit: &[SnapshotName], domain: &str, ram_sha256: Option<String>) -> Result<Record, String> {
    let mut r = Record {
        domain: domain.into(),
        snapshot: unit.first().map(|s| s.snap().to_owned()).unwrap_or_default(),
        ram_sha256,
        ..Record::default()
    };
    for (file, slot) in [("domain.xml", &mut r.xml_sha256), ("nvram.fd", &mut r.nvram_sha256)] {
        if let Some(SavedFile { frozen: path, .. }) = saved_file(zfs, unit, domain, file).await.map_err(|e| e.to_string())? {
            *slot = Some(sha256_file(&path).map_err(|e| e.to_string())?);
        }
    }
    Ok(r)
}

/// The file a snapshot's record is in: its name's month (`autosnap_2026-12-01_…` → `2026-12.jsonl`).
fn file_of(snapshot: &str) -> String {
    let month = snapshot.strip_prefix("autosnap_").and_then(|r| r.get(..7)).filter(|m| m.bytes().all(|b| b.is_ascii_digit() || b == b'-'));
    format!("{}.jsonl", month.unwrap_or("other"))
}

/// Appends the record (the file 0600, in a root-only directory) and syncs it.
pub fn write(state_dir: &Path, r: &Record) -> Result<(), FsError> {
    use std::io::{Seek, Write};
    let dir = Dir::private(state_dir, &[DIR, &r.domain])?;
    let name = file_of(&r.snapshot);
    let path = dir.path().join(&name);
    let io = |source| FsError::Io { what: "writing", path: path.clone(), source };
    let mut f = dir.open_resumable(&name)?;
    let end = f.seek(std::io::SeekFrom::End(0)).map_err(io)?;
    // After a line a crash cut short, a new line first.
    let mut last = [b'\n'];
    if end > 0 {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut last, end - 1).map_err(io)?;
    }
    let mut line = if last[0] == b'\n' { Vec::new() } else { vec![b'\n'] };
    line.extend(serde_json::to_vec(r).unwrap_or_default());
    line.push(b'\n');
    f.write_all(&line).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The record of `domain`'s `snapshot`, if this host has one (the last written; a line cut
/// by a crash is skipped).
pub fn read(state_dir: &Path, domain: &str, snapshot: &str) -> Result<Option<Record>, String> {
    let path = state_dir.join(DIR).join(domain).join(file_of(snapshot));
    let text = match crate::fsutil::read_limited(&path, 64 << 20) {
        Ok(t) => t,
        Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    Ok(text
        .split(|b| *b == b'\n')
        .rev()
        .filter_map(|l| serde_json::from_slice::<Record>(l).ok())
        .find(|r| r.domain == domain && r.snapshot == snapshot))
}

/// Where `held` differs from `recorded`, in words (empty: the same).
pub fn differences(recorded: &Record, held: &Record) -> Vec<String> {
    let mut out = Vec::new();
    for (what, r, h) in [
        ("domain.xml", &recorded.xml_sha256, &held.xml_sha256),
        ("nvram.fd", &recorded.nvram_sha256, &held.nvram_sha256),
        ("the RAM dump", &recorded.ram_sha256, &held.ram_sha256),
    ] {
        match (r, h) {
            (Some(r), Some(h)) if r != h => out.push(format!("{what} has sha256 {h}, this host recorded {r}")),
            (Some(_), None) => out.push(format!("{what} is missing")),
            (None, Some(_)) => out.push(format!("{what} is there, but this host recorded none")),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn rec() -> Record {
        Record {
            domain: "web".into(),
            snapshot: "autosnap_2026-12-01_03:00:00_daily".into(),
            xml_sha256: Some("aa".into()),
            nvram_sha256: None,
            ram_sha256: Some("cc".into()),
        }
    }

    #[test]
    fn records_append_by_month_and_read_back_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &rec()).unwrap();
        let other = Record { snapshot: "autosnap_2026-12-02_03:00:00_daily".into(), xml_sha256: Some("bb".into()), ..rec() };
        write(dir.path(), &other).unwrap();
        assert_eq!(read(dir.path(), "web", "autosnap_2026-12-01_03:00:00_daily").unwrap(), Some(rec()));
        assert_eq!(read(dir.path(), "web", "autosnap_2026-12-02_03:00:00_daily").unwrap(), Some(other));
        assert_eq!(read(dir.path(), "web", "autosnap_2026-11-02_03:00:00_daily").unwrap(), None);
        assert_eq!(read(dir.path(), "db", "autosnap_2026-12-01_03:00:00_daily").unwrap(), None);
        let file = dir.path().join("integrity/web/2026-12.jsonl");
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions()) & 0o777, 0o600);
        let d = std::fs::metadata(dir.path().join("integrity/web")).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&d.permissions()) & 0o777, 0o700);
        // A line cut by a crash is skipped; the next record is still read.
        std::fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(b"{\"domain\":\"web\",\"snap").unwrap();
        let third = Record { snapshot: "autosnap_2026-12-03_03:00:00_daily".into(), ..rec() };
        write(dir.path(), &third).unwrap();
        assert_eq!(read(dir.path(), "web", "autosnap_2026-12-03_03:00:00_daily").unwrap(), Some(third), "after a cut line");
        assert_eq!(file_of("autosnap_2026-12-03_03:00:00_daily"), "2026-12.jsonl");
        assert_eq!(file_of("x"), "other.jsonl");
    }

    #[test]
    fn differences_name_each_file() {
        assert!(differences(&rec(), &rec()).is_empty());
        let changed = Record { xml_sha256: Some("ab".into()), nvram_sha256: Some("dd".into()), ram_sha256: None, ..rec() };
        let d = differences(&rec(), &changed);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("domain.xml") && d[1].contains("nvram.fd") && d[2].contains("RAM dump is missing"));
    }
}
