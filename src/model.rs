//! vmsnap's vocabulary, defined once: how disks are captured ([`Strategy`]), how RAM is saved
//! ([`RamMode`]), how consistent a snapshot is ([`Consistency`]), sanoid's retention periods
//! ([`Period`]), and the `vmsnap:*` ZFS properties every snapshot carries ([`prop`]).
//!
//! Each word type parses (`FromStr`, with an error naming the allowed words), prints
//! (`Display`), serialises as its lower-case word, and is a clap value, so the config file, the
//! CLI, D-Bus options and the snapshot properties all read and write the same words.

use std::fmt;
use std::str::FromStr;

/// A word that is not one of a vocabulary type's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a {what} (use {})", allowed.join(", "))]
pub struct UnknownWord {
    pub what: &'static str,
    /// What was given, cut to 64 characters.
    pub given: String,
    pub allowed: &'static [&'static str],
}

macro_rules! words {
    ($(#[$meta:meta])* pub enum $name:ident ($what:literal) { $($(#[$vmeta:meta])* $var:ident = $word:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $var,)+
        }

        impl $name {
            pub const ALL: [$name; [$($word,)+].len()] = [$($name::$var,)+];
            pub const WORDS: &'static [&'static str] = &[$($word,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $word,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($word => Ok($name::$var),)+
                    _ => Err(UnknownWord { what: $what, given: s.chars().take(64).collect(), allowed: Self::WORDS }),
                }
            }
        }
    };
}

words! {
    /// How disks are captured while the VM runs.
    pub enum Strategy("strategy") {
        /// Switch every disk to an overlay, snapshot ZFS, merge the overlays back.
        Overlay = "overlay",
        /// Take the ZFS snapshot while the guest is frozen (or paused), no overlay.
        Direct = "direct",
    }
}

words! {
    /// How RAM is saved with `--memory`.
    pub enum RamMode("RAM mode") {
        /// Live migration into a file; the VM pauses at the end of it.
        Precopy = "precopy",
        /// QEMU's background-snapshot: the RAM as it was at a short pause, written while the guest runs.
        Background = "background",
    }
}

words! {
    /// How a RAM dump's stream is compressed; recorded in `vmsnap:ram-compress`.
    pub enum RamCompress("RAM compression") {
        /// QEMU's stream as it comes.
        None = "none",
        /// zstd, as libvirt's save-image format 5 (`virsh restore` runs `zstd -dc`).
        Zstd = "zstd",
    }
}

words! {
    /// How consistent a snapshot is; recorded in `vmsnap:consistency`.
    pub enum Consistency("consistency") {
        /// The guest's filesystems were frozen by its agent.
        App = "app",
        /// Like pulling the power cord (the agent was missing or the freeze failed).
        Crash = "crash",
        /// Disks and RAM from the same instant: resumable.
        Ram = "ram",
        /// The VM was not running.
        Offline = "offline",
    }
}

words! {
    /// A retention period, as sanoid names them (the suffix of `autosnap_…_hourly`).
    pub enum Period("period") {
        Frequently = "frequently",
        Hourly = "hourly",
        Daily = "daily",
        Weekly = "weekly",
        Monthly = "monthly",
        Yearly = "yearly",
    }
}

/// The ZFS user properties vmsnap sets on its snapshots.
pub mod prop {
    use crate::zfs::PropName;

    /// [`super::Consistency`] of the snapshot.
    pub const CONSISTENCY: PropName = PropName::known("vmsnap:consistency");
    /// The vmsnap version that took it.
    pub const VERSION: PropName = PropName::known("vmsnap:version");
    /// The domain it belongs to (only snapshots whose own property names the domain are vmsnap's).
    pub const DOMAIN: PropName = PropName::known("vmsnap:domain");
    pub const FREEZE_MS: PropName = PropName::known("vmsnap:freeze-ms");
    pub const PAUSE_MS: PropName = PropName::known("vmsnap:pause-ms");
    /// The RAM dump's path.
    pub const RAM_DUMP: PropName = PropName::known("vmsnap:ram-dump");
    pub const RAM_SHA256: PropName = PropName::known("vmsnap:ram-sha256");
    /// `libvirt-save` (a `virsh restore`-able save image) or `qemu-stream` (a bare migration stream).
    pub const RAM_FORMAT: PropName = PropName::known("vmsnap:ram-format");
    /// [`super::RamCompress`] of the dump's stream (absent on dumps from before compression: none).
    pub const RAM_COMPRESS: PropName = PropName::known("vmsnap:ram-compress");
    /// The dump file's size in bytes.
    pub const RAM_SIZE: PropName = PropName::known("vmsnap:ram-size");
    pub const QEMU_VERSION: PropName = PropName::known("vmsnap:qemu-version");
    /// The machine type the RAM dump needs.
    pub const MACHINE: PropName = PropName::known("vmsnap:machine");
    /// `yes` when a RAM snapshot's disks were captured with the guest frozen (ram_quiesce):
    /// app-consistent on their own; a guest resumed from its dump wakes frozen.
    pub const RAM_QUIESCED: PropName = PropName::known("vmsnap:ram-quiesced");
    /// The first vCPU's QOM type when the RAM was saved (`qemu64-x86_64-cpu`).
    pub const CPU: PropName = PropName::known("vmsnap:cpu");
    /// The guest's RAM size in bytes when the RAM was saved.
    pub const RAM_BYTES: PropName = PropName::known("vmsnap:ram-bytes");
    /// The retention periods a scheduled snapshot serves (`hourly,daily`).
    pub const PERIODS: PropName = PropName::known("vmsnap:periods");
    /// When retention dropped the snapshot's RAM dump (unix seconds); `vmsnap:ram-dump` is then gone.
    pub const RAM_PRUNED: PropName = PropName::known("vmsnap:ram-pruned");

    /// Set on a target's copy whose RAM dump it holds sealed ([`crate::ramcrypt`]): the sha256 of
    /// the sealed file there (`vmsnap verify --target` rereads against it; `vmsnap:ram-sha256`
    /// stays the dump's own).
    pub const RAM_SEALED: PropName = PropName::known("vmsnap:ram-sealed");

    /// `vmsnap verify`'s last word on the snapshot: `<unix seconds> ok: <what was checked>` or
    /// `<unix seconds> failed: <why>`. Never replicated: each side verifies its own copy.
    pub const VERIFIED: PropName = PropName::known("vmsnap:verified");

    /// Set by a replication target on the copies it received (`complete` once the copy, its
    /// properties and its RAM dump are all there). A snapshot carrying it is a replica: restore,
    /// verify and the source's own pruning never take it for the domain's own.
    pub const REPLICA: PropName = PropName::known("vmsnap:replica");

    /// Set by `vmsnap serve` on its `--root` (so inherited by everything below it): the tree a
    /// replication target receives into. This host's own verbs (restore, verify, mount, list,
    /// prune, a disk-less domain's datasets) never take a dataset below one for a domain's own.
    pub const SERVE_ROOT: PropName = PropName::known("vmsnap:serve-root");

    /// Set by `vmsnap serve --source NAME` on its root: the one source that root serves.
    pub const SERVE_SOURCE: PropName = PropName::known("vmsnap:serve-source");

    /// Set by `vmsnap serve` itself (never by a source) on each snapshot it received: when (unix
    /// seconds). The target's retention and rollback destroy only snapshots carrying it, and a
    /// source may set properties on no other.
    pub const RECEIVED: PropName = PropName::known("vmsnap:received");

    /// Every property `vmsnap list` shows.
    pub const LISTED: [PropName; 12] =
        [CONSISTENCY, DOMAIN, FREEZE_MS, PAUSE_MS, RAM_DUMP, RAM_SHA256, RAM_FORMAT, RAM_COMPRESS, RAM_SIZE, PERIODS, RAM_PRUNED, VERIFIED];

    /// Every one a snapshot carries from when it is taken (replication sends these).
    pub const ALL: [PropName; 17] = [
        CONSISTENCY,
        VERSION,
        DOMAIN,
        FREEZE_MS,
        PAUSE_MS,
        RAM_DUMP,
        RAM_SHA256,
        RAM_FORMAT,
        RAM_COMPRESS,
        RAM_SIZE,
        QEMU_VERSION,
        MACHINE,
        CPU,
        RAM_BYTES,
        PERIODS,
        RAM_PRUNED,
        RAM_QUIESCED,
    ];

    /// [`ALL`] and [`REPLICA`]: what a target lists of its copies, and what tells a domain's own
    /// snapshot from a local replica of it.
    pub const ALL_AND_REPLICA: [PropName; 19] = [
        CONSISTENCY,
        VERSION,
        DOMAIN,
        FREEZE_MS,
        PAUSE_MS,
        RAM_DUMP,
        RAM_SHA256,
        RAM_FORMAT,
        RAM_COMPRESS,
        RAM_SIZE,
        QEMU_VERSION,
        MACHINE,
        CPU,
        RAM_BYTES,
        RAM_SEALED,
        PERIODS,
        RAM_PRUNED,
        RAM_QUIESCED,
        REPLICA,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zfs::PropName;

    #[test]
    fn words_round_trip_through_every_form() {
        fn all<T>(items: &[T])
        where
            T: Copy
                + fmt::Display
                + FromStr<Err = UnknownWord>
                + PartialEq
                + fmt::Debug
                + serde::Serialize
                + serde::de::DeserializeOwned
                + clap::ValueEnum,
        {
            for &v in items {
                let word = v.to_string();
                assert_eq!(word.parse::<T>().unwrap(), v);
                assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{word}\""));
                assert_eq!(serde_json::from_str::<T>(&format!("\"{word}\"")).unwrap(), v);
                assert_eq!(v.to_possible_value().unwrap().get_name(), word);
            }
        }
        all(&Strategy::ALL);
        all(&RamMode::ALL);
        all(&Consistency::ALL);
        all(&Period::ALL);
        let e = "snapshot".parse::<Strategy>().unwrap_err();
        assert_eq!(e.to_string(), "\"snapshot\" is not a strategy (use overlay, direct)");
        assert_eq!("x".repeat(500).parse::<Period>().unwrap_err().given.len(), 64);
    }

    #[test]
    fn every_property_name_is_valid() {
        for p in prop::ALL {
            assert_eq!(PropName::new(p.as_str()).unwrap(), p, "{p}");
            assert!(p.as_str().starts_with("vmsnap:"));
        }
    }
}
