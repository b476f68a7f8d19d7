//! Talking to QEMU and to the guest agent inside the VM.
//!
//! Both protocols are JSON lines over a unix socket and share the error shape `{"class", "desc"}`;
//! everything else differs: QMP has ids, events and fd passing ([`qmp`]), the agent channel is a bare
//! byte stream that needs delimited syncs to stay in step ([`qga`]).

pub mod block;
pub mod blockjob;
pub mod fdpass;
pub mod img;
pub(crate) mod process;
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

/// The longest QMP line vmsnap keeps (query-block of many disks is a few hundred KiB).
pub const QMP_LINE_MAX: usize = 8 << 20;
/// The longest guest-agent line vmsnap keeps: a `guest-exec-status` with output fits (qemu-ga
/// itself caps captured output); anything longer from the guest is dropped as it arrives.
pub const QGA_LINE_MAX: usize = 4 << 20;

/// Reads up to and including `delim`, keeping at most `max` bytes in `out`; the rest of a longer
/// line is read and dropped, so a peer that never ends its line costs no memory (the caller's
/// deadline ends the read). Returns how many bytes were read, and whether `delim` was seen (false
/// at end of stream).
pub(crate) async fn read_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    delim: u8,
    max: usize,
    out: &mut Vec<u8>,
) -> std::io::Result<(usize, bool)> {
    use tokio::io::AsyncBufReadExt;
    let mut total = 0usize;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok((total, false));
        }
        let (n, found) = match buf.iter().position(|&b| b == delim) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&buf[..n.min(room)]);
        r.consume(n);
        total = total.saturating_add(n);
        if found {
            return Ok((total, true));
        }
    }
}

/// `text` cut to `max` characters (with how much was left out): what a peer says goes into
/// errors and logs only abridged.
pub fn abridge(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max).collect();
    format!("{kept}… ({} more characters)", count - max)
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    #[tokio::test]
    async fn an_endless_line_is_dropped_as_it_arrives() {
        let data: Vec<u8> = std::iter::repeat_n(b'y', 3 << 20).chain(*b"\n{\"return\": 1}\n").collect();
        let mut r = tokio::io::BufReader::with_capacity(4096, &data[..]);
        let mut out = Vec::new();
        let (n, found) = read_bounded(&mut r, b'\n', 1024, &mut out).await.unwrap();
        assert!(found && n == (3 << 20) + 1 && out.len() == 1024);
        out.clear();
        let (_, found) = read_bounded(&mut r, b'\n', 1024, &mut out).await.unwrap();
        assert!(found && out == b"{\"return\": 1}\n");
        out.clear();
        assert_eq!(read_bounded(&mut r, b'\n', 1024, &mut out).await.unwrap(), (0, false));
    }

    #[test]
    fn abridged_text_says_how_much_is_missing() {
        assert_eq!(abridge("short", 10), "short");
        assert_eq!(abridge(&"é".repeat(30), 4), "éééé… (26 more characters)");
    }
}
