//! The D-Bus service the daemon offers (`io.github.vmsnap.Agent1` at `/io/github/vmsnap/Agent1`,
//! system bus; the session bus or any address for tests): snapshot, list, prune and the domain
//! registry, with one object per snapshot job.
//!
//! Authorization comes from the caller's credentials as the bus daemon reports them for the
//! message's sender (never from anything the caller says): mutating methods need uid 0, or polkit's
//! grant of `io.github.vmsnap.manage` when polkit is on the bus ([`polkit`]); reading methods are
//! open to whoever the bus policy lets in. `dist/dbus/io.github.vmsnap.Agent1.xml` is the committed
//! interface; a test diffs the live one against it.

mod authz;
pub mod client;
mod error;
mod job;
pub(crate) mod polkit;
mod service;

pub use error::VmsnapError;
pub use job::Job;
pub use service::{serve, Agent, Bus};

/// The bus name, versioned.
pub const BUS_NAME: &str = "io.github.vmsnap.Agent1";
/// The service object.
pub const PATH: &str = "/io/github/vmsnap/Agent1";
/// Where job objects live (`…/Jobs/<n>`).
pub const JOBS: &str = "/io/github/vmsnap/Agent1/Jobs";
