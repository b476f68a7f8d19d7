//! RAM dumps checksummed as they are written, in one of two ways:
//!
//! - **Through a pipe** ([`drain_into`]): QEMU migrates into a pipe whose write end it gets with
//!   `getfd`; a thread drains the read end into the dump file, hashing (sha256) and, when asked,
//!   compressing (zstd) as the bytes go by. If vmsnap dies, QEMU's next write fails (EPIPE) and
//!   the migration ends by itself: a precopy dump never completes into a paused VM nobody resumes.
//! - **Behind QEMU** ([`follow`]): QEMU writes the file itself and a thread hashes it a little
//!   behind, reading what was just written back from the page cache. One copy of the RAM instead
//!   of three (QEMU → pipe → vmsnap → file), so on a small host the dump goes at the speed of
//!   QEMU writing alone. For raw background-snapshot dumps, where QEMU finishing the dump on its own
//!   after vmsnap died leaves the VM running.
//!
//! Which one a raw background dump takes depends on the file system it lands on
//! ([`qemu_writes_well_into`]): on OpenZFS the pipe, elsewhere the follower.
//!
//! Either way the dump is never held in memory (fixed 1 MiB buffers), never read back in a second
//! pass after it is written, and its progress is a counter anyone can read.
//!
//! The reverse, [`feed`], decompresses a dump into a pipe that a QEMU started with `-incoming`
//! reads: vmsnap's own resume path for dumps QEMU cannot read from a file by itself.
//!
//! The thread ends when QEMU closes its end (the migration completed, failed or was cancelled, or
//! QEMU died), or at the first write error (a full disk): then the read end closes, QEMU's next
//! write fails with EPIPE and the migration fails instead of waiting.

use crate::model::RamCompress;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Bytes moved per read and write.
const CHUNK: usize = 1 << 20;

/// What the drain wrote.
#[derive(Debug)]
pub struct Drained {
    /// The dump file, written and synced (a save image still says it is incomplete).
    pub file: File,
    /// Bytes QEMU sent.
    pub stream_bytes: u64,
    /// Bytes in the file, header included.
    pub file_bytes: u64,
    /// sha256 of the file as it reads once complete.
    pub sha256: String,
}

/// The running drain of one dump.
pub struct Drain {
    received: Arc<AtomicU64>,
    done: Option<tokio::sync::oneshot::Receiver<io::Result<Drained>>>,
    /// A [`follow`]er's end: [`RUNNING`] until told the stream is complete or abandoned.
    ending: Option<Arc<AtomicU8>>,
}

const RUNNING: u8 = 0;
const COMPLETE: u8 = 1;
const ABANDONED: u8 = 2;

impl Drain {
    /// Bytes of QEMU's stream received (a pipe) or hashed (a follower) so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The counter behind [`Self::received`], to watch it while [`Self::finish`] runs.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }

    /// Waits until everything is in the file, synced, and hashed. A pipe's drain ends when QEMU
    /// closes its end; a follower must only be finished once QEMU said the migration completed
    /// (it then hashes up to the end of the file). Dropping a drain unfinished abandons it.
    pub async fn finish(mut self) -> io::Result<Drained> {
        if let Some(ending) = &self.ending {
            ending.store(COMPLETE, Ordering::Release);
        }
        let done = self.done.take().expect("a drain is finished once");
        done.await.unwrap_or_else(|_| Err(io::Error::other("the RAM dump's writer thread died")))
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        if let Some(ending) = &self.ending {
            let _ = ending.compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// A pipe with both ends close-on-exec, as large as the system lets root make it (fewer wake-ups).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let _ = nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&w), nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
    Ok((r, w))
}

/// Starts draining a new pipe into `file`, whose first bytes (the save image header, if any)
/// are already written: `hashed_prefix` is what those bytes read once the image is complete.
/// Returns the end to give QEMU (hand it over, then drop it: the drain ends when the last
/// writer closes).
pub fn drain_into(file: File, hashed_prefix: Vec<u8>, compress: RamCompress, level: i32) -> io::Result<(OwnedFd, Drain)> {
    let (read_end, write_end) = pipe()?;
    let received = Arc::new(AtomicU64::new(0));
    let (tx, done) = tokio::sync::oneshot::channel();
    let counter = received.clone();
    std::thread::Builder::new().name("vmsnap-ram-drain".into()).spawn(move || {
        let _ = tx.send(drain(File::from(read_end), file, &hashed_prefix, compress, level, &counter));
    })?;
    Ok((write_end, Drain { received, done: Some(done), ending: None }))
}

/// Starts hashing `file` (open for reading and writing) behind QEMU, which writes a raw stream into it from its current offset,
/// where the first bytes (the save image header, if any) end: `hashed_prefix` is what those
/// bytes read once the image is complete. Returns the descriptor to give QEMU (the same open
/// file; hand it over, then drop it). [`Drain::finish`] once QEMU reports the migration completed.
///
/// The thread reads what QEMU appended (a read never returns bytes past the file's size, and the
/// size grows only once a write's bytes are in the page cache), so it hashes the file exactly as
/// written; when it has caught up it sleeps a millisecond or a few. Abandoned (dropped unfinished:
/// the migration failed or was cancelled), it stops at once and the file is the caller's to delete.
pub fn follow(file: File, hashed_prefix: Vec<u8>) -> io::Result<(OwnedFd, Drain)> {
    let qemu_end = OwnedFd::from(file.try_clone()?);
    let received = Arc::new(AtomicU64::new(0));
    let ending = Arc::new(AtomicU8::new(RUNNING));
    let (tx, done) = tokio::sync::oneshot::channel();
    let (counter, end) = (received.clone(), ending.clone());
    std::thread::Builder::new().name("vmsnap-ram-hash".into()).spawn(move || {
        let _ = tx.send(hash_behind(file, &hashed_prefix, &counter, &end));
    })?;
    Ok((qemu_end, Drain { received, done: Some(done), ending: Some(ending) }))
}

/// `statfs`'s type of an OpenZFS file system.
const ZFS_SUPER_MAGIC: i64 = 0x2fc1_2fc1;

/// Whether QEMU writing the dump `file` by itself, with [`follow`] hashing behind it, is the
/// fastest way on the file system that holds it. Not on OpenZFS: QEMU's writes there (a page
/// and its 8-byte header at a time, unaligned) were slower than vmsnap's whole-MiB writes
/// through the pipe (median 29 s against 23 s for 82 MiB), and a reader near the end of a file
/// QEMU appends to waits on ZFS's range locks while QEMU's next write waits for it (88 s;
/// measured with `cargo bench --bench ramdump` on the ZFS lane). Elsewhere (ext4, xfs, tmpfs) the page cache takes QEMU's writes as they come and
/// the follower saves the pipe's copy. When the file system cannot be told, the follower.
// `f_type`'s width depends on the platform (i64 on x86_64 glibc).
#[allow(clippy::unnecessary_cast)]
pub fn qemu_writes_well_into(file: &File) -> bool {
    match nix::sys::statfs::fstatfs(file) {
        Ok(fs) => fs.filesystem_type().0 as i64 != ZFS_SUPER_MAGIC,
        Err(_) => true,
    }
}

/// How much of a dump [`LetGo`] hands to writeback at a time.
const LET_GO: u64 = 8 << 20;

/// Lets go of a dump's bytes once they are written (and hashed): every [`LET_GO`] bytes the
/// range behind is advised `DONTNEED`, so its writeback starts now (the final sync has only the
/// tail left instead of the whole dump: on a host with plenty of RAM nothing would be written
/// before it) and, once written, it leaves the page cache instead of pushing out what the host
/// uses. Advice only: a file system that ignores it changes nothing. Each range starts half a
/// step before the last one ended, so pages still being written then are dropped now.
#[derive(Default)]
struct LetGo {
    from: u64,
}

impl LetGo {
    /// The file's first `done` bytes are written and hashed.
    fn done(&mut self, file: &File, done: u64) {
        use std::os::fd::AsRawFd;
        if done < self.from + 2 * LET_GO {
            return;
        }
        let to = done - LET_GO;
        let again = self.from.saturating_sub(LET_GO / 2);
        if let (Ok(off), Ok(len)) = (i64::try_from(again), i64::try_from(to - again)) {
            let _ = nix::fcntl::posix_fadvise(file.as_raw_fd(), off, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        }
        self.from = to;
    }
}

/// One thread reads behind QEMU and a second hashes what it read (reading and hashing in turn
/// ran at 1/(1/read + 1/hash); sha256 alone is the slower one); the final sync runs while the
/// hash finishes. Buffers are recycled: at most `IN_FLIGHT + 2` of `CHUNK` bytes exist.
fn hash_behind(file: File, prefix: &[u8], hashed: &AtomicU64, ending: &AtomicU8) -> io::Result<Drained> {
    use std::sync::mpsc::sync_channel;
    let start = prefix.len() as u64;
    let mut hasher = Sha256::new();
    hasher.update(prefix);
    let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(IN_FLIGHT);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
    let (end, hasher) = std::thread::scope(|scope| -> io::Result<(u64, Sha256)> {
        let hashing = std::thread::Builder::new().name("vmsnap-ram-sha".into()).spawn_scoped(scope, move || {
            let mut total = 0u64;
            for (buf, n) in full_rx {
                hasher.update(&buf[..n]);
                total += n as u64;
                hashed.store(total, Ordering::Relaxed);
                let _ = empty_tx.try_send(buf); // never blocks (see drain_raw)
            }
            hasher
        })?;
        let end = read_behind(&file, start, ending, &full_tx, &empty_rx);
        drop(full_tx);
        let synced = end.and_then(|end| file.sync_data().map(|()| end));
        let hasher = hashing.join().map_err(|_| io::Error::other("the RAM dump's hashing thread panicked"))?;
        Ok((synced?, hasher))
    })?;
    Ok(Drained { file, stream_bytes: end - start, file_bytes: end, sha256: crate::fsutil::hex(&hasher.finalize()) })
}

/// How far behind the end of the file the follower stays until QEMU has completed: more than
/// the largest ZFS record QEMU may be filling (`recordsize` is at most 1 MiB by default).
const TAIL_MARGIN: u64 = 2 << 20;
/// Reads end on this boundary (a record's, for file systems whose records are up to 1 MiB).
const ALIGN: u64 = 1 << 20;

/// Reads the file from `start` as QEMU appends to it, handing each piece to the hashing thread,
/// until QEMU completed and nothing is left. Returns the offset of the file's end.
fn read_behind(
    file: &File,
    start: u64,
    ending: &AtomicU8,
    full: &std::sync::mpsc::SyncSender<(Vec<u8>, usize)>,
    empty: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;
    const MIN_NAP: Duration = Duration::from_micros(500);
    let mut at = start;
    let mut nap = MIN_NAP;
    let mut let_go = LetGo::default();
    let mut spare = None;
    // How far the file may be read: asked of the file again only once `at` gets there.
    let mut readable = start;
    loop {
        // Read the state before reading the file: a read that finds nothing after QEMU said it
        // completed is the end of the stream.
        let state = ending.load(Ordering::Acquire);
        if state == ABANDONED {
            return Err(io::Error::other("the RAM dump was abandoned before its stream completed"));
        }
        // Never near the end QEMU is writing: on OpenZFS a read there waits for the range lock
        // and the block QEMU is filling, and QEMU's next write waits for the read in turn.
        if at >= readable || state == COMPLETE {
            let end = file.metadata()?.len();
            readable = if state == COMPLETE { end } else { end.saturating_sub(TAIL_MARGIN) / ALIGN * ALIGN };
        }
        let want = usize::try_from(readable.saturating_sub(at)).unwrap_or(CHUNK).min(CHUNK);
        let mut buf = spare.take().or_else(|| empty.try_recv().ok()).unwrap_or_else(|| vec![0u8; CHUNK]);
        let n = if want == 0 { Ok(0) } else { file.read_at(&mut buf[..want], at) };
        let n = match n {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n > 0 {
            at += n as u64;
            if full.send((buf, n)).is_err() {
                return Err(io::Error::other("the RAM dump's hashing thread ended early"));
            }
            nap = MIN_NAP;
            let_go.done(file, at);
        } else if state == COMPLETE {
            return Ok(at);
        } else {
            spare = Some(buf);
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(8));
        }
    }
}

/// Writes what it is given to the file and to the hash.
struct Hashing {
    out: io::BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
    let_go: LetGo,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.let_go.done(self.out.get_ref(), self.bytes);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// zstd's worker threads: half the cores (QEMU and the guest need the rest), at most 4.
fn zstd_workers() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (cores / 2).clamp(1, 4)
}

fn drain(mut input: File, file: File, prefix: &[u8], compress: RamCompress, level: i32, received: &AtomicU64) -> io::Result<Drained> {
    let mut hasher = Sha256::new();
    hasher.update(prefix);
    if let RamCompress::None = compress {
        return drain_raw(input, file, hasher, prefix.len() as u64, received);
    }
    let mut out = Hashing { out: io::BufWriter::with_capacity(CHUNK, file), hasher, bytes: prefix.len() as u64, let_go: LetGo::default() };
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut enc = zstd::stream::write::Encoder::new(out, level)?;
    let workers = zstd_workers();
    if workers > 1 {
        enc.multithread(workers)?;
    }
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        enc.write_all(&buf[..n])?;
        total += n as u64;
        received.store(total, Ordering::Relaxed);
    }
    out = enc.finish()?;
    out.flush()?;
    let Hashing { out, hasher, bytes, .. } = out;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_data()?;
    Ok(Drained { file, stream_bytes: total, file_bytes: bytes, sha256: crate::fsutil::hex(&hasher.finalize()) })
}

/// Buffers in flight between the reading thread and the writing one.
const IN_FLIGHT: usize = 4;

/// A raw stream: this thread reads and hashes, a second one writes, so hashing and the copy
/// into the file overlap (one thread doing both ran at 1/(1/write + 1/hash), about 0.65 of
/// writing alone). Buffers are recycled: at most `IN_FLIGHT + 2` of `CHUNK` bytes exist.
fn drain_raw(mut input: File, mut file: File, mut hasher: Sha256, prefix_len: u64, received: &AtomicU64) -> io::Result<Drained> {
    use std::sync::mpsc::sync_channel;
    let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(IN_FLIGHT);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
    let writer = std::thread::Builder::new().name("vmsnap-ram-write".into()).spawn(move || -> io::Result<File> {
        let (mut at, mut let_go) = (prefix_len, LetGo::default());
        for (buf, n) in full_rx {
            file.write_all(&buf[..n])?;
            at += n as u64;
            let_go.done(&file, at);
            // Never blocks: a blocking send here deadlocked once the reader, done, was joining
            // this thread while the recycling channel was full (a dump that never finished).
            let _ = empty_tx.try_send(buf);
        }
        file.sync_data()?;
        Ok(file)
    })?;
    let mut total = 0u64;
    let mut read_error = None;
    'stream: loop {
        let mut buf = empty_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        let mut n = 0;
        // Fill most of the buffer: the pipe hands over what QEMU wrote so far, often 32 KiB.
        while n < CHUNK / 2 {
            match input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(got) => {
                    hasher.update(&buf[n..n + got]);
                    n += got;
                    total += got as u64;
                    received.store(total, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        if n == 0 || read_error.is_some() {
            if n > 0 {
                let _ = full_tx.send((buf, n));
            }
            break 'stream;
        }
        if full_tx.send((buf, n)).is_err() {
            break; // the writer failed: its error is reported below
        }
        if n < CHUNK / 2 {
            break; // end of stream
        }
    }
    // Closing our end first makes the writer finish; dropping `input` afterwards, on an early
    // return, makes QEMU's next write fail instead of blocking.
    drop(full_tx);
    let file = writer.join().map_err(|_| io::Error::other("the RAM dump's writing thread panicked"))??;
    if let Some(e) = read_error {
        return Err(e);
    }
    Ok(Drained { file, stream_bytes: total, file_bytes: prefix_len + total, sha256: crate::fsutil::hex(&hasher.finalize()) })
}

/// A running [`feed`]: its result once QEMU has read everything (or closed its end).
pub struct Feed(tokio::sync::oneshot::Receiver<io::Result<u64>>);

impl Feed {
    /// Bytes of stream written into the pipe.
    pub async fn finish(self) -> io::Result<u64> {
        self.0.await.unwrap_or_else(|_| Err(io::Error::other("the RAM dump's reader thread died")))
    }
}

/// Starts feeding the stream of the dump `file` (at `offset`, packed as `compress`) into a new
/// pipe; returns the end QEMU reads (hand it over with `getfd`, then drop it).
pub fn feed(mut file: File, offset: u64, compress: RamCompress) -> io::Result<(OwnedFd, Feed)> {
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(offset))?;
    let (read_end, write_end) = pipe()?;
    let (tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("vmsnap-ram-feed".into()).spawn(move || {
        let mut out = File::from(write_end);
        let input = io::BufReader::with_capacity(CHUNK, file);
        let copied = match compress {
            RamCompress::None => io::copy(&mut { input }, &mut out),
            RamCompress::Zstd => zstd::stream::read::Decoder::with_buffer(input).and_then(|mut d| io::copy(&mut d, &mut out)),
        };
        let _ = tx.send(copied);
    })?;
    Ok((read_end, Feed(done)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(bytes: &[u8]) -> String {
        crate::fsutil::hex(&Sha256::digest(bytes))
    }

    /// A stream that compresses but is not trivial.
    fn stream() -> Vec<u8> {
        (0..3_000_000u32).map(|i| ((i / 7) ^ (i % 251)) as u8).collect()
    }

    async fn through(compress: RamCompress, prefix: &[u8]) -> (Vec<u8>, Drained, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump");
        let mut file = File::create(&path).unwrap();
        file.write_all(prefix).unwrap();
        let (w, drain) = drain_into(file, prefix.to_vec(), compress, 3).unwrap();
        let data = stream();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || File::from(w).write_all(&data).unwrap())
        };
        let drained = drain.finish().await.unwrap();
        writer.join().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        (data, drained, on_disk)
    }

    #[tokio::test]
    async fn raw_streams_land_whole_and_hashed_in_flight() {
        let (data, drained, on_disk) = through(RamCompress::None, b"HEADER").await;
        assert_eq!(&on_disk[..6], b"HEADER");
        assert_eq!(&on_disk[6..], &data[..]);
        assert_eq!(drained.stream_bytes, data.len() as u64);
        assert_eq!(drained.file_bytes, on_disk.len() as u64);
        assert_eq!(drained.sha256, sha256(&on_disk));
    }

    #[tokio::test]
    async fn the_hash_covers_the_prefix_as_it_will_read() {
        // The save image's magic is flipped after the stream: the hash must be of the final bytes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump");
        let mut file = File::create(&path).unwrap();
        let prefix = super::super::saveimage::write_start(&mut file, "<domain/>", true, RamCompress::None).unwrap();
        let (w, drain) = drain_into(file, prefix, RamCompress::None, 3).unwrap();
        File::from(w).write_all(b"QEVM stream").unwrap();
        let drained = drain.finish().await.unwrap();
        super::super::saveimage::finish(&drained.file).unwrap();
        assert_eq!(drained.sha256, sha256(&std::fs::read(&path).unwrap()));
    }

    #[tokio::test]
    async fn a_follower_hashes_the_image_qemu_wrote_from_the_header_on() {
        // QEMU's descriptor shares the file's offset: its stream lands right after the header.
        // It writes in pieces with pauses, so the hasher catches up and waits more than once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump");
        let mut file = super::super::ram::create_dump(&path).unwrap();
        let prefix = super::super::saveimage::write_start(&mut file, "<domain/>", true, RamCompress::None).unwrap();
        let (qemu_end, drain) = follow(file, prefix.clone()).unwrap();
        let data = stream();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut w = File::from(qemu_end);
                for (i, piece) in data.chunks(40_000).enumerate() {
                    w.write_all(piece).unwrap();
                    if i % 15 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(3));
                    }
                }
            })
        };
        writer.join().unwrap(); // QEMU reports the migration completed only after its last write
        let drained = drain.finish().await.unwrap();
        super::super::saveimage::finish(&drained.file).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[prefix.len()..], &data[..]);
        assert_eq!(drained.stream_bytes, data.len() as u64);
        assert_eq!(drained.file_bytes, on_disk.len() as u64);
        assert_eq!(drained.sha256, sha256(&on_disk));
    }

    #[tokio::test]
    async fn a_follower_counts_what_it_hashed_and_stops_when_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let file = super::super::ram::create_dump(&dir.path().join("dump")).unwrap();
        let (qemu_end, drain) = follow(file, Vec::new()).unwrap();
        // Until QEMU completes, the follower stays TAIL_MARGIN behind the end, on an ALIGN boundary.
        let written = 2 * TAIL_MARGIN + 300_000;
        File::from(qemu_end).write_all(&vec![1u8; written as usize]).unwrap();
        let readable = (written - TAIL_MARGIN) / ALIGN * ALIGN;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while drain.received() < readable {
            assert!(std::time::Instant::now() < deadline, "hashed {} of {readable}", drain.received());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(drain.received(), readable, "the follower read into the end QEMU is still writing");
        let ending = drain.ending.clone().unwrap();
        drop(drain);
        assert_eq!(ending.load(Ordering::Acquire), ABANDONED);
        // The thread sees it at its next look and lets go of the file.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while Arc::strong_count(&ending) > 1 {
            assert!(std::time::Instant::now() < deadline, "the hashing thread still runs");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn qemu_writes_the_dump_itself_off_zfs() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("dump")).unwrap();
        assert!(qemu_writes_well_into(&file), "the test's temporary directory is not on ZFS");
    }

    #[tokio::test]
    async fn zstd_streams_decompress_to_the_stream_and_feed_it_back() {
        let (data, drained, on_disk) = through(RamCompress::Zstd, b"HDR").await;
        assert!(on_disk.len() < data.len() / 2, "{} bytes for {}", on_disk.len(), data.len());
        assert_eq!(drained.sha256, sha256(&on_disk));
        assert_eq!(zstd::decode_all(&on_disk[3..]).unwrap(), data);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump");
        std::fs::write(&path, &on_disk).unwrap();
        let (r, feed) = feed(File::open(&path).unwrap(), 3, RamCompress::Zstd).unwrap();
        let mut back = Vec::new();
        File::from(r).read_to_end(&mut back).unwrap();
        assert_eq!(feed.finish().await.unwrap(), data.len() as u64);
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn a_slow_disk_never_deadlocks_the_end_of_the_stream() {
        // The file is slower than the stream, so every buffer gets allocated, and the stream ends
        // in a part-filled one (sent too); at the end the
        // writer hands them all back while the reader waits for it. (A blocking hand-back once
        // hung here for good: the dump never finished.)
        let (slow_r, slow_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let consumer = std::thread::spawn(move || {
            let mut r = File::from(slow_r);
            let mut buf = vec![0u8; 65536];
            let mut total = 0u64;
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
            total
        });
        let (w, drain) = drain_into(File::from(slow_w), Vec::new(), RamCompress::None, 3).unwrap();
        let producer = std::thread::spawn(move || {
            let mut w = File::from(w);
            let data = vec![7u8; (12 << 20) + 100_000];
            w.write_all(&data).unwrap();
        });
        let done = tokio::time::timeout(std::time::Duration::from_secs(60), drain.finish()).await;
        producer.join().unwrap();
        // fsync of a pipe fails (EINVAL): what matters is that the drain ended, every byte through.
        assert!(done.is_ok(), "the drain hung at the end of the stream");
        assert_eq!(consumer.join().unwrap(), (12 << 20) + 100_000);
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_drain_and_qemus_writes() {
        // /dev/full: every write is ENOSPC. The writer thread fails, the reading end closes, and
        // the producer (QEMU) gets EPIPE instead of blocking on a pipe nobody drains.
        for compress in [RamCompress::None, RamCompress::Zstd] {
            let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
            let (w, drain) = drain_into(full, Vec::new(), compress, 3).unwrap();
            let producer = std::thread::spawn(move || {
                let mut w = File::from(w);
                // Incompressible (zstd's window at level 3 is smaller than the block), so the
                // compressed path writes as it goes too.
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let data: Vec<u8> = (0..4 << 20).map(|_| (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x as u8).3).collect();
                (0..50).try_for_each(|_| w.write_all(&data))
            });
            let err = drain.finish().await.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
            let written = producer.join().unwrap();
            assert_eq!(written.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        }
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_fails_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dump"), stream()).unwrap();
        let (r, feed) = feed(File::open(dir.path().join("dump")).unwrap(), 0, RamCompress::None).unwrap();
        drop(r);
        assert!(feed.finish().await.is_err());
    }
}
