//! Talking to QEMU and to the guest agent inside the VM.
//!
//! Both protocols are JSON lines over a unix socket and share the error shape `{"class", "desc"}`;
//! everything else differs: QMP has ids, events and fd passing ([`qmp`]), the agent channel is a bare
//! byte stream that needs delimited syncs to stay in step ([`qga`]).

pub mod block;
pub mod blockjob;
pub mod fdpass;
pub mod process;
pub mod qga;
pub mod qmp;

use serde::Deserialize;
use std::fmt;

/// The `class` of a QMP or guest-agent error reply. Callers match on this, never on `desc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
    /// A class this version of vmsnap does not know; kept verbatim.
    Other(String),
}

impl ErrorClass {
    pub fn parse(class: &str) -> Self {
        match class {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GenericError => f.write_str("GenericError"),
            Self::CommandNotFound => f.write_str("CommandNotFound"),
            Self::DeviceNotActive => f.write_str("DeviceNotActive"),
            Self::DeviceNotFound => f.write_str("DeviceNotFound"),
            Self::KvmMissingCap => f.write_str("KVMMissingCap"),
            Self::Other(s) => f.write_str(s),
        }
    }
}

/// The `error` member of a reply, as both protocols send it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WireError {
    pub class: String,
    pub desc: String,
}
