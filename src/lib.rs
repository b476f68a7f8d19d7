//! vmsnap: consistent, live snapshots of QEMU/libvirt virtual machines whose disks live on ZFS.
//!
//! # Layout
//! ```text
//! src/
//! ├── main.rs, cmd/        the CLI: one file per subcommand, the job's progress on a terminal
//! ├── model.rs             the vocabulary: strategy, RAM mode, consistency, period, vmsnap:* properties
//! ├── config/              the TOML file (mod.rs), sanoid-style policy (policy.rs), sanoid.conf import
//! ├── engine/              one consistent snapshot: flow.rs top to bottom, journal, recover, lock, ram
//! ├── retention/           the pure keep/destroy plan (mod.rs), what is due (schedule), the
//! │                        snapshots read back from ZFS (catalog), carrying the plan out (prune)
//! ├── daemon/              the scheduler (mod.rs), the job layer every entrance uses (jobs/),
//! │                        the registry, status.json, metrics, the Nagios check, the user's
//! │                        scripts, and the D-Bus service (dbus/)
//! ├── libvirt/             the qemu hook and enrolment of libvirt domains
//! ├── qemu/                QMP and guest-agent clients over unix sockets, block jobs, fd passing
//! ├── replicate/           off-site copies: the plan, `vmsnap serve` (the target), ssh transport
//! ├── restore/             back to a snapshot: in place, as a copy (--as), verify and verify --boot,
//! │                        mounts of single files; journaled like snapshots
//! ├── zfs/                 the only place that runs zfs/zpool: validated names, parsers, operations
//! ├── error.rs             how errors travel to the user: the rules, the chain, the operator's hint
//! ├── fsutil.rs            files root writes where others may reach: no symlink followed
//! ├── integrity.rs         what each snapshot held when it was taken, checked when a target sends it back
//! ├── recovery.rs          everything a crash left, settled in one call (`vmsnap recover`, daemon start)
//! ├── ramcrypt.rs          RAM dumps sealed (ChaCha20-Poly1305, chunked) for a target trusted with ciphertext only
//! └── setup.rs             installing the hook, unit, D-Bus files, config, completions, man page
//! ```
//!
//! The test rig, the protocol fixtures and shared test helpers live in the workspace's
//! `vmsnap-testkit` crate (`testkit/`), a dev-dependency: none of it is in the product.

pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod integrity;
pub mod libvirt;
pub mod model;
pub mod qemu;
pub mod ramcrypt;
pub mod recovery;
pub mod replicate;
pub mod restore;
pub mod retention;
pub mod setup;
pub mod zfs;

#[cfg(test)]
mod parser_properties;
