//! Debian's real sanoid, unpacked by `scripts/rig/rig.sh` into `$VMSNAP_RIG/sanoid`, run against
//! a snapshot listing: a `zfs` stand-in on its PATH prints the listing for the one command
//! sanoid's pruning reads (`zfs get -Hrpt snapshot creation`) and refuses anything else, so
//! sanoid runs `--readonly` on exactly the snapshots vmsnap is given.

use super::{Rig, RigError, ScratchDir};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// One dataset's policy, as a `[dataset]` section of sanoid.conf.
pub struct SanoidSection<'a> {
    pub dataset: &'a str,
    /// `key = value` lines (`hourly = 24`, …).
    pub keys: Vec<(String, String)>,
}

/// A prepared sanoid: its files in a scratch directory.
pub struct Sanoid {
    root: PathBuf,
    work: ScratchDir,
}

impl Sanoid {
    /// The unpacked sanoid in the rig.
    ///
    /// # Errors
    /// [`RigError::NotBuilt`] when `scripts/rig/rig.sh` has not unpacked it.
    pub fn locate(rig: &Rig) -> Result<Self, RigError> {
        let root = rig.require("sanoid")?;
        rig.require("sanoid/usr/sbin/sanoid")?;
        let work = ScratchDir::new("vmsnap-sanoid")?;
        Ok(Self { root, work })
    }

    /// The snapshots `sanoid --prune-snapshots --readonly` would destroy (`dataset@name`), given
    /// `listing` (lines of `zfs get -Hrpt snapshot creation`) and `sections`.
    ///
    /// # Errors
    /// [`RigError::Failed`] with sanoid's output when it fails.
    pub fn would_prune(&self, listing: &str, sections: &[SanoidSection<'_>]) -> Result<BTreeSet<String>, RigError> {
        let out = self.run(listing, sections)?;
        Ok(out
            .lines()
            .filter_map(|l| {
                l.strip_prefix("INFO: pruning ")
                    .and_then(|r| r.strip_suffix(" ... "))
                    .or_else(|| l.strip_prefix("INFO: pruning ").and_then(|r| r.strip_suffix(" ...")).map(str::trim))
            })
            .map(str::to_owned)
            .collect())
    }

    /// Runs sanoid's pruning, read-only, and returns its stdout.
    pub fn run(&self, listing: &str, sections: &[SanoidSection<'_>]) -> Result<String, RigError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| RigError::Io { what, source }
        };
        let w = self.work.path();
        let (conf, cache, run, bin) = (w.join("conf"), w.join("cache"), w.join("run"), w.join("bin"));
        for d in [&conf, &cache, &run, &bin] {
            std::fs::create_dir_all(d).map_err(io("sanoid scratch dirs"))?;
        }
        let mut text = String::new();
        for s in sections {
            text.push_str(&format!("[{}]\n", s.dataset));
            for (k, v) in &s.keys {
                text.push_str(&format!("\t{k} = {v}\n"));
            }
        }
        std::fs::write(conf.join("sanoid.conf"), text).map_err(io("sanoid.conf"))?;
        let listing_file = w.join("listing");
        std::fs::write(&listing_file, listing).map_err(io("listing"))?;
        let _ = std::fs::remove_file(cache.join("snapshots.txt"));
        write_exec(
            &bin.join("zfs"),
            &format!(
                "#!/bin/sh\nif [ \"$*\" = \"get -Hrpt snapshot creation\" ]; then exec cat {}; fi\necho \"zfs stand-in: unexpected: $*\" >&2\nexit 1\n",
                listing_file.display()
            ),
        )
        .map_err(io("zfs stand-in"))?;
        // Debian's sanoid reads its defaults from a fixed /usr/share path: a copy points at the
        // unpacked file instead (that one string is all that changes).
        let defaults = self.root.join("usr/share/sanoid/sanoid.defaults.conf");
        let script = std::fs::read_to_string(self.root.join("usr/sbin/sanoid")).map_err(io("reading sanoid"))?;
        let fixed = "\"/usr/share/sanoid/sanoid.defaults.conf\"";
        if !script.contains(fixed) {
            return Err(RigError::Failed("sanoid no longer names /usr/share/sanoid/sanoid.defaults.conf".into()));
        }
        let copy = w.join("sanoid");
        std::fs::write(&copy, script.replace(fixed, &format!("\"{}\"", defaults.display()))).map_err(io("sanoid copy"))?;
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let out = std::process::Command::new("perl")
            .arg(&copy)
            .args(["--prune-snapshots", "--readonly", "--verbose"])
            .arg(format!("--configdir={}", conf.display()))
            .arg(format!("--cache-dir={}", cache.display()))
            .arg(format!("--run-dir={}", run.display()))
            .env("PATH", path)
            .env("PERL5LIB", self.root.join("usr/share/perl5"))
            .output()
            .map_err(io("running sanoid"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(RigError::Failed(format!("sanoid failed: {stdout}{}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(stdout)
    }
}

fn write_exec(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}
