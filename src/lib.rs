//! vmsnap: consistent, live snapshots of QEMU/libvirt virtual machines whose disks live on ZFS.
//!
//! # Layout
//! - [`model`]: the vocabulary (strategy, RAM mode, consistency, period, `vmsnap:*` properties), defined once.
//! - [`config`]: the TOML file: directories, policy, the domains.
//! - [`engine`]: the consistent snapshot flow, its journal, crash recovery, the per-domain lock.
//! - [`policy`]: sanoid-style retention counts, preferred times, RAM cadence, scripts.
//! - [`catalog`]: a domain's snapshots read back from ZFS, one entry per name across datasets.
//! - [`retention`]: the pure keep/destroy plan; [`prune`] carries it out.
//! - [`setup`]: installing the hook, unit, D-Bus files, config, completions and man page.
//! - [`sanoid_import`]: an existing sanoid.conf as a vmsnap config.
//! - [`schedule`]: which periods are due (pure); [`scripts`]: the user's pre/post/pruning scripts.
//! - [`hook`]: libvirt's qemu hook; [`registry`]: domains registered by it or over [`dbus`].
//! - [`daemon`]: the scheduler and the D-Bus service; [`status`] and [`metrics`] are what it leaves for [`check`]
//!   (the Nagios plugin) and Prometheus.
//! - [`qemu`]: the two protocol clients vmsnap speaks directly over unix sockets: QMP to QEMU
//!   ([`qemu::qmp`], with block-job and fd-passing helpers) and the guest agent ([`qemu::qga`]).
//! - [`zfs`]: the only place that runs `zfs`/`zpool`: validated names, pure parsers, operations.
//! - [`fsutil`]: files root writes where others may reach: no symlink followed, whole files only.
//!
//! The test rig, the protocol fixtures and shared test helpers live in the workspace's
//! `vmsnap-testkit` crate (`testkit/`), a dev-dependency: none of it is in the product.

pub mod catalog;
pub mod check;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod engine;
pub mod enroll;
pub mod fsutil;
pub mod hook;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod prune;
pub mod qemu;
pub mod registry;
pub mod retention;
pub mod sanoid_import;
pub mod schedule;
pub mod scripts;
pub mod setup;
pub mod status;
pub mod zfs;

#[cfg(test)]
mod parser_properties;
