//! Files root writes in places others may reach: the VM's dataset (`<mountpoint>/.vmsnap/<dom>/`),
//! and vmsnap's own directories (journal, overlays, RAM dumps, registry, status, metrics).
//!
//! Below a trusted base (a path from root's config, or a mountpoint from ZFS) every directory is
//! opened with `openat(O_NOFOLLOW | O_DIRECTORY)`, created 0700 when missing, and must be owned by
//! vmsnap's user (root) — a symlink, a FIFO or someone else's directory planted there is refused,
//! never followed or chmodded. Files are written whole to a fresh temporary name
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`), fsynced, renamed over the final name (`renameat` replaces a
//! symlink there instead of following it), and the directory is fsynced. Sources are opened
//! `O_NOFOLLOW | O_NONBLOCK` and must be regular files, so a FIFO never blocks the caller.

use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> FsError + 'a {
        move |e| FsError::Io { what, path: path.to_owned(), source: e.into() }
    }
}

/// An open directory that is vmsnap's own.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens `base` (created if missing; a path root chose, so it may be a symlink), then each
    /// of `below` without following symlinks, creating missing ones 0700. Every directory below
    /// the base must be a real directory owned by this user; it is made 0700.
    pub fn private(base: &Path, below: &[&str]) -> Result<Self, FsError> {
        if !base.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(base).map_err(|source| FsError::Io {
                what: "creating",
                path: base.to_owned(),
                source,
            })?;
        }
        let fd = openat(None, base, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(FsError::io("opening directory", base))?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let mut dir = Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, path: base.to_owned() };
        for name in below {
            dir = dir.child(name)?;
        }
        Ok(dir)
    }

    /// The directory `name` inside this one, created 0700 if missing; never a symlink, and owned
    /// by this user.
    fn child(&self, name: &str) -> Result<Self, FsError> {
        let path = self.path.join(name);
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(FsError::Refused { path, why: "not a plain name".into() });
        }
        match mkdirat(Some(self.fd.as_raw_fd()), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(FsError::io("creating", &path)(e)),
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match openat(Some(self.fd.as_raw_fd()), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::Error::ELOOP | nix::Error::ENOTDIR) => {
                // With O_DIRECTORY a symlink answers ENOTDIR: say which it is.
                let link = nix::sys::stat::fstatat(Some(self.fd.as_raw_fd()), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK);
                let why = if link { "is a symbolic link; vmsnap does not follow it" } else { "is not a directory" };
                return Err(FsError::Refused { path, why: why.into() });
            }
            Err(e) => return Err(FsError::io("opening directory", &path)(e)),
        };
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(fd.as_raw_fd()).map_err(FsError::io("checking", &path))?;
        let me = nix::unistd::geteuid().as_raw();
        if st.st_uid != me {
            return Err(FsError::Refused { path, why: format!("is owned by uid {}, not by vmsnap's uid {me}", st.st_uid) });
        }
        fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700)).map_err(FsError::io("chmod", &path))?;
        Ok(Self { fd, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` whole (temporary file, fsync, rename, fsync of the directory), mode `mode`.
    pub fn write_atomic(&self, name: &str, data: &[u8], mode: u32) -> Result<(), FsError> {
        self.replace(name, mode, |f| f.write_all(data))
    }

    /// Copies the regular file `src` into `name` (as [`Dir::write_atomic`]), streaming.
    pub fn copy_atomic(&self, name: &str, src: &Path, mode: u32) -> Result<(), FsError> {
        let mut input = open_regular(src)?;
        self.replace(name, mode, |f| std::io::copy(&mut input, f).map(drop))
    }

    /// Opens `name` to write a resumable upload into: created 0600 if missing, kept otherwise,
    /// never through a symlink and only if it is a regular file.
    pub fn open_resumable(&self, name: &str) -> Result<std::fs::File, FsError> {
        let path = self.path.join(name);
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(FsError::Refused { path, why: "not a plain name".into() });
        }
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(Some(self.fd.as_raw_fd()), name, flags, Mode::from_bits_truncate(0o600)).map_err(FsError::io("opening", &path))?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let st = fstat(file.as_raw_fd()).map_err(FsError::io("checking", &path))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(FsError::Refused { path, why: "is not a regular file".into() });
        }
        Ok(file)
    }

    /// Renames `from` to `to` in this directory, then syncs the directory.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FsError> {
        let path = self.path.join(to);
        renameat(Some(self.fd.as_raw_fd()), from, Some(self.fd.as_raw_fd()), to).map_err(FsError::io("renaming into", &path))?;
        nix::unistd::fsync(self.fd.as_raw_fd()).map_err(FsError::io("syncing the directory of", &path))
    }

    fn replace(&self, name: &str, mode: u32, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<(), FsError> {
        let target = self.path.join(name);
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(FsError::Refused { path: target, why: "not a plain name".into() });
        }
        let tmp = format!(".{name}.{:08x}.tmp", random_u32());
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(Some(self.fd.as_raw_fd()), tmp.as_str(), flags, Mode::from_bits_truncate(mode))
            .map_err(FsError::io("creating a temporary file for", &target))?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        let written = fill(&mut file)
            .and_then(|()| file.sync_all())
            .and_then(|()| fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(std::io::Error::from));
        let renamed = written.and_then(|()| {
            renameat(Some(self.fd.as_raw_fd()), tmp.as_str(), Some(self.fd.as_raw_fd()), name).map_err(std::io::Error::from)
        });
        if let Err(source) = renamed {
            let _ = nix::unistd::unlinkat(Some(self.fd.as_raw_fd()), tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            return Err(FsError::Io { what: "writing", path: target, source });
        }
        nix::unistd::fsync(self.fd.as_raw_fd()).map_err(FsError::io("syncing the directory of", &target))
    }
}

/// Opens `path` for reading only if it is a regular file (not a symlink, FIFO or device), without
/// blocking on a FIFO.
pub fn open_regular(path: &Path) -> Result<std::fs::File, FsError> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = match openat(None, path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::Error::ELOOP) => {
            return Err(FsError::Refused { path: path.to_owned(), why: "is a symbolic link; vmsnap does not follow it".into() })
        }
        Err(e) => return Err(FsError::io("opening", path)(e)),
    };
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let st = fstat(file.as_raw_fd()).map_err(FsError::io("checking", path))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(FsError::Refused { path: path.to_owned(), why: "is not a regular file".into() });
    }
    // Reads block normally from here on (O_NONBLOCK only kept open() from waiting on a FIFO).
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).map_err(FsError::io("opening", path))?;
    Ok(file)
}

/// Writes `path` whole (see [`Dir::write_atomic`]); its directory must exist and is opened as
/// root's own path (it comes from root's config).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let (dir, name) = split(path)?;
    if !dir.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory");
        return Err(FsError::Io { what: "writing into", path: dir.to_owned(), source });
    }
    Dir::private(dir, &[])?.write_atomic(name, data, mode)
}

/// Reads at most `limit` bytes of the regular file `path` (a bigger file is refused).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, FsError> {
    let f = open_regular(path)?;
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out).map_err(|source| FsError::Io { what: "reading", path: path.to_owned(), source })?;
    if out.len() as u64 > limit {
        return Err(FsError::Refused { path: path.to_owned(), why: format!("is larger than {limit} bytes") });
    }
    Ok(out)
}

fn split(path: &Path) -> Result<(&Path, &str), FsError> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) if !d.as_os_str().is_empty() => Ok((d, n)),
        _ => Err(FsError::Refused { path: path.to_owned(), why: "not a file path".into() }),
    }
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).is_ok() {
        return u32::from_ne_bytes(buf);
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos() ^ std::process::id()
}

/// Lower-case hex of bytes (a sha256 as vmsnap records it).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The length and sha256 (lower-case hex) of everything `r` reads, in 1 MiB pieces (never a
/// whole dump in memory); `progress` is told the bytes read so far after each piece.
pub fn sha256_of(mut r: impl Read, mut progress: impl FnMut(u64)) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        bytes += n as u64;
        progress(bytes);
    }
    Ok((bytes, hex(&hasher.finalize())))
}

/// `path` is a plain absolute path below `dir` (no `..` anywhere): where vmsnap deletes a file a
/// property or a peer named, it must lie in vmsnap's own directory.
pub fn inside(path: &Path, dir: &Path) -> bool {
    path.is_absolute() && path.starts_with(dir) && !path.components().any(|c| matches!(c, std::path::Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn writes_whole_files_in_private_directories() {
        let base = tempfile::tempdir().unwrap();
        let d = Dir::private(base.path(), &[".vmsnap", "vm"]).unwrap();
        d.write_atomic("domain.xml", b"<domain/>", 0o600).unwrap();
        d.write_atomic("domain.xml", b"<domain>2</domain>", 0o600).unwrap();
        let p = base.path().join(".vmsnap/vm/domain.xml");
        assert_eq!(std::fs::read(&p).unwrap(), b"<domain>2</domain>");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(base.path().join(".vmsnap/vm")).unwrap().permissions().mode() & 0o777, 0o700);
        // No temporary file is left.
        assert_eq!(std::fs::read_dir(base.path().join(".vmsnap/vm")).unwrap().count(), 1);
    }

    #[test]
    fn a_planted_symlink_directory_is_refused_and_its_target_untouched() {
        let base = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::set_permissions(target.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink(target.path(), base.path().join(".vmsnap")).unwrap();
        let e = Dir::private(base.path(), &[".vmsnap", "vm"]).unwrap_err().to_string();
        assert!(e.contains(".vmsnap") && e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::metadata(target.path()).unwrap().permissions().mode() & 0o777, 0o755, "not chmodded");
        assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 0, "nothing created in the target");
    }

    #[test]
    fn a_planted_file_or_fifo_in_place_of_a_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("journal"), b"x").unwrap();
        let e = Dir::private(base.path(), &["journal"]).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        nix::unistd::mkfifo(&base.path().join("ram"), Mode::from_bits_truncate(0o600)).unwrap();
        let e = Dir::private(base.path(), &["ram"]).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn a_symlink_at_the_final_name_is_replaced_not_followed() {
        let base = tempfile::tempdir().unwrap();
        let victim = base.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        symlink(&victim, base.path().join("status.json")).unwrap();
        write_atomic(&base.path().join("status.json"), b"{}", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(base.path().join("status.json")).unwrap().file_type().is_symlink());
    }

    #[test]
    fn sources_must_be_regular_files_and_a_fifo_does_not_block() {
        let base = tempfile::tempdir().unwrap();
        let fifo = base.path().join("nvram.fd");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let d = Dir::private(base.path(), &["out"]).unwrap();
        let e = d.copy_atomic("nvram.fd", &fifo, 0o600).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let real = base.path().join("real");
        std::fs::write(&real, b"vars").unwrap();
        symlink(&real, base.path().join("link")).unwrap();
        let e = d.copy_atomic("nvram.fd", &base.path().join("link"), 0o600).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        d.copy_atomic("nvram.fd", &real, 0o600).unwrap();
        assert_eq!(std::fs::read(base.path().join("out/nvram.fd")).unwrap(), b"vars");
    }

    #[test]
    fn someone_elses_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let theirs = base.path().join("vm");
        std::fs::create_dir(&theirs).unwrap();
        // Only root can give a directory away; as another user this case cannot be set up.
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = Dir::private(base.path(), &["vm"]).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        } else {
            assert!(Dir::private(base.path(), &["vm"]).is_ok());
        }
    }
}
