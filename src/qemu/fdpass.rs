//! Passing a file descriptor to QEMU over its QMP socket (SCM_RIGHTS).
//!
//! vmsnap opens overlay and RAM-dump files itself and hands QEMU the descriptor: `getfd` names one
//! for a `fd:` migration, `add-fd` puts one into an fdset that `blockdev-add` opens as
//! `/dev/fdset/N`. QEMU then needs no access to the path (sandbox, AppArmor and file ownership
//! under libvirt never get in the way) and no shell or `exec:` URI is involved.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Writes `bytes` on `stream`, with `fd` attached to the first byte, then the rest normally.
///
/// # Errors
/// The socket's I/O error.
pub(crate) async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    send_with_fds(stream, bytes, &[fd.as_raw_fd()]).await
}

/// Writes `bytes` on `stream` with all of `fds` attached to the first byte.
pub async fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
        });
        match attempt {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

use super::qmp::{Qmp, QmpError};
use qapi::qmp;

/// What `add-fd` answered: the set the descriptor went into and QEMU's number for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdsetEntry {
    pub fdset_id: i64,
    pub fd: i64,
}

impl FdsetEntry {
    /// The filename under which block drivers open this set.
    pub fn path(&self) -> String {
        format!("/dev/fdset/{}", self.fdset_id)
    }
}

impl Qmp {
    /// `getfd`: gives QEMU a copy of `fd` under `name` (for `migrate` to `fd:<name>`).
    /// The caller may close its own copy afterwards.
    ///
    /// # Errors
    /// As [`Qmp::execute`].
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd(&qmp::getfd { fdname: name.to_owned() }, fd).await?;
        Ok(())
    }

    /// `closefd`: drops a descriptor passed with [`Qmp::getfd`] that was not consumed.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute(&qmp::closefd { fdname: name.to_owned() }).await?;
        Ok(())
    }

    /// `add-fd`: puts a copy of `fd` into fdset `fdset_id` (a new set when `None`). Open flags must
    /// match what the block driver asks for (O_RDWR for a writable overlay; O_DIRECT counts too).
    pub async fn add_fd(&self, fdset_id: Option<i64>, opaque: &str, fd: BorrowedFd<'_>) -> Result<FdsetEntry, QmpError> {
        let info = self.execute_with_fd(&qmp::add_fd { fdset_id, opaque: Some(opaque.to_owned()) }, fd).await?;
        Ok(FdsetEntry { fdset_id: info.fdset_id, fd: info.fd })
    }

    /// `remove-fd`: releases the set's own copy; the set disappears once no node uses it.
    pub async fn remove_fd(&self, fdset_id: i64) -> Result<(), QmpError> {
        self.execute(&qmp::remove_fd { fdset_id, fd: None }).await?;
        Ok(())
    }
}
