//! Replication off the host: every snapshot of a domain, its RAM dump and its `vmsnap:*`
//! properties, to a target that keeps them by its own rules.
//!
//! - [`protocol`]: what a source may ask a target and what it answers;
//! - [`receive`]: how a peer's stream is received (what it may not set);
//! - [`server`]: `vmsnap serve`, the target side (an ssh forced command, or a local child);
//! - [`target_retention`]: the target's own pruning, and the rollback it may allow;
//! - [`token`]: a target's resume token, checked before the source sends on it;
//! - [`transport`]: reaching it (OpenSSH, or the local child);
//! - [`plan`]: what to send, pure;
//! - [`progress`]: what a run tells whoever watches it (steps, and each stream's bytes, size, rate);
//! - [`run`]: one domain to one target, top to bottom;
//! - [`pull`]: a snapshot and its dump brought back from a target (`restore --from`);
//! - [`verify`]: what a target holds, proven against the source (GUIDs, completeness, dumps).

pub mod plan;
pub mod progress;
pub mod protocol;
pub mod pull;
pub mod receive;
pub mod run;
pub mod server;
pub mod target_retention;
pub mod token;
pub mod transport;
pub mod verify;

pub use progress::{Observer, Transfer};
pub use run::{list_target, replicate, replicated_up_to, Options, ReplicateError, ReplicationReport, DIVERGED_HINT, TARGET_HINT};
