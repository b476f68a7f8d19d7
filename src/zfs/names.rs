//! Validated ZFS names. The types are the guard: a [`SnapshotName`] always holds an `@`, so an
//! operation that takes one (`destroy`) can never be handed a filesystem or volume.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ZFS {kind} name {name:?}: {why}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
    pub why: &'static str,
}

/// ZFS's own limit on a full name (ZFS_MAX_DATASET_NAME_LEN - 1).
const MAX_NAME: usize = 255;

pub(crate) fn valid_component(c: &str) -> bool {
    !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.' | ':' | ' '))
}

/// A filesystem or volume: `pool` or `pool/a/b`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dataset(String);

impl Dataset {
    /// # Errors
    /// [`NameError`] naming what is wrong.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let err = |why| NameError { kind: "dataset", name: name.to_owned(), why };
        if name.is_empty() {
            return Err(err("empty"));
        }
        if name.len() > MAX_NAME {
            return Err(err("longer than 255 bytes"));
        }
        if name.contains('@') || name.contains('#') {
            return Err(err("a dataset name has no '@' or '#'"));
        }
        if name.split('/').any(|c| !valid_component(c) || c == "." || c == "..") {
            return Err(err("components are non-empty and use only letters, digits, '_', '-', '.', ':' and space"));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(err("a pool name starts with a letter"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn pool(&self) -> &str {
        self.0.split('/').next().expect("non-empty")
    }

    /// `self@snap`.
    pub fn snapshot(&self, snap: &str) -> Result<SnapshotName, NameError> {
        SnapshotName::from_parts(self.clone(), snap)
    }

    /// `self/child`.
    pub fn child(&self, child: &str) -> Result<Dataset, NameError> {
        Dataset::new(&format!("{}/{}", self.0, child))
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Dataset {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// `dataset@snap`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotName {
    dataset: Dataset,
    snap: String,
}

impl SnapshotName {
    /// Parses `dataset@snap`.
    ///
    /// # Errors
    /// [`NameError`] when there is no `@` or either side is invalid.
    pub fn new(full: &str) -> Result<Self, NameError> {
        let Some((ds, snap)) = full.split_once('@') else {
            return Err(NameError { kind: "snapshot", name: full.to_owned(), why: "a snapshot name has the form dataset@name" });
        };
        let dataset = Dataset::new(ds).map_err(|e| NameError { kind: "snapshot", name: full.to_owned(), why: e.why })?;
        Self::from_parts(dataset, snap)
    }

    pub fn from_parts(dataset: Dataset, snap: &str) -> Result<Self, NameError> {
        let full = format!("{dataset}@{snap}");
        let err = |why| NameError { kind: "snapshot", name: full.clone(), why };
        if !valid_component(snap) {
            return Err(err("the part after '@' is non-empty and uses only letters, digits, '_', '-', '.', ':' and space"));
        }
        if full.len() > MAX_NAME {
            return Err(err("longer than 255 bytes"));
        }
        Ok(Self { dataset, snap: snap.to_owned() })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The part after `@`.
    pub fn snap(&self) -> &str {
        &self.snap
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.dataset, self.snap)
    }
}

impl FromStr for SnapshotName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// A user property name: `module:property`, lower case, as `zfs` requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PropName(std::borrow::Cow<'static, str>);

impl PropName {
    /// One of vmsnap's own names, as a constant ([`crate::model::prop`]; a test checks each
    /// against [`PropName::new`]'s rules).
    pub const fn known(name: &'static str) -> Self {
        Self(std::borrow::Cow::Borrowed(name))
    }

    /// # Errors
    /// [`NameError`] unless the name has a `:` and only lower-case letters, digits, `:-_.`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let err = |why| NameError { kind: "user property", name: name.to_owned(), why };
        if !name.contains(':') {
            return Err(err("a user property is named module:property"));
        }
        if name.len() > 255 || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, ':' | '-' | '_' | '.')) {
            return Err(err("lower-case letters, digits, ':', '-', '_' and '.' only, at most 255 bytes"));
        }
        Ok(Self(std::borrow::Cow::Owned(name.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PropName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets() {
        assert_eq!(Dataset::new("tank/vms/vm1").unwrap().pool(), "tank");
        for bad in ["", "tank@x", "tank//a", "/tank", "tank/", "tank/a#b", "1tank", "tank/../x"] {
            assert!(Dataset::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn snapshots_need_an_at() {
        let s = SnapshotName::new("tank/vms/vm1@autosnap_2026-11-26_14:00:00_hourly").unwrap();
        assert_eq!(s.dataset().as_str(), "tank/vms/vm1");
        assert_eq!(s.snap(), "autosnap_2026-11-26_14:00:00_hourly");
        assert_eq!(s.to_string(), "tank/vms/vm1@autosnap_2026-11-26_14:00:00_hourly");
        for bad in ["tank/vms/vm1", "tank@", "@x", "tank@a@b", "tank@a/b", "tank@a,b", "tank@a%b"] {
            assert!(SnapshotName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn property_names() {
        assert!(PropName::new("vmsnap:consistency").is_ok());
        for bad in ["consistency", "Vmsnap:x", "vmsnap:a b", "vmsnap:a=b"] {
            assert!(PropName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
