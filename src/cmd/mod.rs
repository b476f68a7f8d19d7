//! The binary's commands, one file each: `main.rs` parses the command line, these call the
//! library and print.

pub mod bus;
pub mod check;
pub mod enroll;
pub mod import_sanoid;
pub mod list;
pub mod man;
pub mod progress;
pub mod prune;
pub mod recover;
pub mod replicate;
pub mod restore;
pub mod setup;
pub mod snapshot;
pub mod verify;
