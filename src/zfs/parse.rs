//! Pure parsers: the text `zfs ... -H -p -o <columns>` prints, to types. The column lists live here
//! next to the parsers, so the command that asks and the code that reads always agree.
//!
//! `-H` gives tab-separated fields without a header, `-p` exact numbers (seconds for `creation`),
//! never human units or dates. A user property that is not set prints `-`.

use super::names::{Dataset, PropName, SnapshotName};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse `zfs {command}` output, line {line_no}: {why}: {line:?}")]
pub struct ParseError {
    pub command: &'static str,
    pub line_no: usize,
    pub line: String,
    pub why: String,
}

/// Columns of `zfs list -t snapshot` before the requested user properties.
pub const SNAPSHOT_COLUMNS: &[&str] = &["name", "creation", "used", "guid", "createtxg", "userrefs"];
/// Columns of `zfs list -t filesystem,volume`.
pub const DATASET_COLUMNS: &[&str] = &["name", "type", "used", "mountpoint", "mounted"];

/// One snapshot, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: SnapshotName,
    /// Seconds since the epoch (ZFS's own record, not the name).
    pub creation: i64,
    pub used: u64,
    pub guid: u64,
    pub createtxg: u64,
    /// Number of holds.
    pub userrefs: u64,
    /// The requested user properties that are set.
    pub props: BTreeMap<PropName, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Filesystem,
    Volume,
}

/// One filesystem or volume, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    pub name: Dataset,
    pub kind: DatasetKind,
    pub used: u64,
    /// For a filesystem with a path mountpoint; `None` for volumes, `none` and `legacy`.
    pub mountpoint: Option<PathBuf>,
    pub mounted: bool,
}

/// One user hold on a snapshot (`zfs holds -H -p`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub snapshot: SnapshotName,
    pub tag: String,
    pub since: i64,
}

struct Lines<'a> {
    command: &'static str,
    text: &'a str,
}

impl<'a> Lines<'a> {
    fn rows(&self, width: usize) -> impl Iterator<Item = Result<(usize, Vec<&'a str>), ParseError>> + '_ {
        let command = self.command;
        self.text.lines().enumerate().filter(|(_, l)| !l.is_empty()).map(move |(i, line)| {
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() != width {
                return Err(ParseError {
                    command,
                    line_no: i + 1,
                    line: line.to_owned(),
                    why: format!("expected {width} tab-separated fields, got {}", fields.len()),
                });
            }
            Ok((i + 1, fields))
        })
    }

    fn err(&self, line_no: usize, why: impl Into<String>) -> ParseError {
        let line = self.text.lines().nth(line_no - 1).unwrap_or_default().to_owned();
        ParseError { command: self.command, line_no, line, why: why.into() }
    }
}

fn num<T: std::str::FromStr>(lines: &Lines<'_>, line_no: usize, column: &str, value: &str) -> Result<T, ParseError> {
    value.parse().map_err(|_| lines.err(line_no, format!("{column} {value:?} is not a number")))
}

/// Parses `zfs list -H -p -t snapshot -o <SNAPSHOT_COLUMNS>,<props>`.
///
/// # Errors
/// [`ParseError`] naming the line and what was wrong with it.
pub fn snapshots(text: &str, props: &[PropName]) -> Result<Vec<SnapshotInfo>, ParseError> {
    let lines = Lines { command: "list -t snapshot", text };
    let mut out = Vec::new();
    for row in lines.rows(SNAPSHOT_COLUMNS.len() + props.len()) {
        let (n, f) = row?;
        let name = SnapshotName::new(f[0]).map_err(|e| lines.err(n, e.to_string()))?;
        let mut set = BTreeMap::new();
        for (prop, value) in props.iter().zip(&f[SNAPSHOT_COLUMNS.len()..]) {
            if *value != "-" {
                set.insert(prop.clone(), (*value).to_owned());
            }
        }
        out.push(SnapshotInfo {
            name,
            creation: num(&lines, n, "creation", f[1])?,
            used: num(&lines, n, "used", f[2])?,
            guid: num(&lines, n, "guid", f[3])?,
            createtxg: num(&lines, n, "createtxg", f[4])?,
            userrefs: num(&lines, n, "userrefs", f[5])?,
            props: set,
        });
    }
    Ok(out)
}

/// Parses `zfs list -H -p -t filesystem,volume -o <DATASET_COLUMNS>`.
pub fn datasets(text: &str) -> Result<Vec<DatasetInfo>, ParseError> {
    let lines = Lines { command: "list", text };
    let mut out = Vec::new();
    for row in lines.rows(DATASET_COLUMNS.len()) {
        let (n, f) = row?;
        let name = Dataset::new(f[0]).map_err(|e| lines.err(n, e.to_string()))?;
        let kind = match f[1] {
            "filesystem" => DatasetKind::Filesystem,
            "volume" => DatasetKind::Volume,
            other => return Err(lines.err(n, format!("type {other:?} is not filesystem or volume"))),
        };
        let mountpoint = (kind == DatasetKind::Filesystem && f[3].starts_with('/')).then(|| PathBuf::from(f[3]));
        out.push(DatasetInfo { name, kind, used: num(&lines, n, "used", f[2])?, mountpoint, mounted: f[4] == "yes" });
    }
    Ok(out)
}

/// Parses `zfs get -H -p -o name,property,value,source all ...`, keeping the user properties
/// (those with a `:`) that are set locally or received, per dataset or snapshot name.
pub fn user_properties(text: &str) -> Result<BTreeMap<String, BTreeMap<PropName, String>>, ParseError> {
    let lines = Lines { command: "get", text };
    let mut out: BTreeMap<String, BTreeMap<PropName, String>> = BTreeMap::new();
    for row in lines.rows(4) {
        let (_, f) = row?;
        let local = f[3] == "local" || f[3] == "received";
        if let (true, Ok(prop)) = (local, PropName::new(f[1])) {
            out.entry(f[0].to_owned()).or_default().insert(prop, f[2].to_owned());
        }
    }
    Ok(out)
}

/// Parses `zfs holds -H -p SNAP...` (`name<TAB>tag<TAB>timestamp`).
pub fn holds(text: &str) -> Result<Vec<Hold>, ParseError> {
    let lines = Lines { command: "holds", text };
    let mut out = Vec::new();
    for row in lines.rows(3) {
        let (n, f) = row?;
        let snapshot = SnapshotName::new(f[0]).map_err(|e| lines.err(n, e.to_string()))?;
        out.push(Hold { snapshot, tag: f[1].to_owned(), since: num(&lines, n, "timestamp", f[2])? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from OpenZFS 2.3.2 in the rig VM (`zfs list -H -p -t snapshot -o name,creation,used,guid,createtxg`
    // plus userrefs and one user property; see protocol-fixtures/zfs/).
    const SNAPS: &str = "tank/vms@snap1\t1795701687\t0\t5717956264852942166\t21\t0\t-\n\
tank/vms/vm1@multi1\t1795701687\t0\t17799268610851611761\t22\t1\tapp\n";

    #[test]
    fn snapshot_listing() {
        let prop = PropName::new("vmsnap:consistency").unwrap();
        let s = snapshots(SNAPS, std::slice::from_ref(&prop)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name.to_string(), "tank/vms@snap1");
        assert_eq!(s[0].guid, 5717956264852942166);
        assert!(s[0].props.is_empty());
        assert_eq!(s[1].guid, 17799268610851611761);
        assert_eq!(s[1].userrefs, 1);
        assert_eq!(s[1].props.get(&prop).map(String::as_str), Some("app"));
    }

    #[test]
    fn bad_snapshot_lines_name_the_line() {
        let e = snapshots("tank/vms@a\t17957\t0\n", &[]).unwrap_err();
        assert_eq!(e.line_no, 1);
        assert!(e.why.contains("expected 6"), "{e}");
        let e = snapshots("tank/vms@a\t1.5K\t0\t1\t2\t0\n", &[]).unwrap_err();
        assert!(e.to_string().contains("creation \"1.5K\" is not a number"), "{e}");
        let e = snapshots("tank/vms\t1\t0\t1\t2\t0\n", &[]).unwrap_err();
        assert!(e.why.contains("dataset@name"), "{e}");
    }

    #[test]
    fn dataset_listing() {
        let d = datasets(
            "tank\tfilesystem\t503808\t/tank\tyes\ntank/vms/vm1-disk0\tvolume\t264241152\t-\t-\ntank/x\tfilesystem\t1\tlegacy\tno\n",
        )
        .unwrap();
        assert_eq!(d[0].mountpoint.as_deref(), Some(std::path::Path::new("/tank")));
        assert!(d[0].mounted);
        assert_eq!(d[1].kind, DatasetKind::Volume);
        assert_eq!(d[1].mountpoint, None);
        assert_eq!(d[2].mountpoint, None);
    }

    #[test]
    fn user_props_keep_only_local_user_properties() {
        let text = "tank/vms/vm1\tcom.example:managed\tyes\tlocal\n\
tank/vms/vm1\tcompression\ton\tinherited from tank\n\
tank/vms/vm1\tvmsnap:x\ty\tinherited from tank/vms\n\
tank/vms/vm1@s\tvmsnap:consistency\tcrash\tlocal\n";
        let p = user_properties(text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["tank/vms/vm1"].len(), 1);
        assert_eq!(p["tank/vms/vm1@s"][&PropName::new("vmsnap:consistency").unwrap()], "crash");
    }

    #[test]
    fn hold_listing() {
        let h = holds("tank/vms/vm1@snap1\tvmsnap-keep\t1795701690\n").unwrap();
        assert_eq!(h[0].tag, "vmsnap-keep");
        assert_eq!(h[0].since, 1795701690);
    }
}
