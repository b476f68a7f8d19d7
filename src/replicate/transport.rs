//! Reaching a target: `ssh` (the system's OpenSSH client, `BatchMode`, the target's forced
//! command answers) or, for a local target, `vmsnap serve` as a child. One process per request;
//! the request line, then the payload (a `zfs send` stream, a RAM dump) on its stdin, and one
//! reply line back. The remote command line is a fixed string: nothing from a request is in it.

use super::protocol::{Reply, Request};
use crate::config::TargetConfig;
use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What follows the request line.
pub enum Payload {
    None,
    /// The stdout of this command (`zfs send …`).
    Command(Command),
    /// A file from an offset.
    File(std::fs::File, u64),
    /// What a reader makes (a sealed RAM dump, [`crate::ramcrypt::Sealer`]).
    Reader(Box<dyn Read + Send>),
}

#[derive(Debug, Clone)]
pub struct Transport {
    argv: Vec<OsString>,
    /// Bytes per second, 0 for no limit.
    rate_limit: u64,
    /// Set to stop a request: its session is killed (the target's receive stays resumable).
    cancel: Option<Arc<AtomicBool>>,
    /// A request's session is killed once no byte moved for this long.
    idle_limit: Duration,
}

/// What makes two targets' ssh connections interchangeable: name, identity, options and
/// compression, hashed (12 hex digits: the socket path must stay short).
fn connection_identity(t: &TargetConfig) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(t.name.as_bytes());
    h.update([0]);
    if let Some(i) = &t.identity {
        h.update(i.as_os_str().as_encoded_bytes());
    }
    h.update([0]);
    for o in &t.ssh_options {
        h.update(o.as_bytes());
        h.update([0]);
    }
    h.update([u8::from(t.compress)]);
    h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

impl Transport {
    /// `control_dir`: a private directory for ssh's connection sharing (one TCP connection and
    /// key exchange per target for a whole run, not one per request); `None` for none.
    pub fn for_target(t: &TargetConfig, control_dir: Option<&std::path::Path>) -> Self {
        let argv = match &t.host {
            Some(host) => {
                let mut a: Vec<OsString> = ["ssh", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=30"].map(OsString::from).to_vec();
                if let Some(dir) = control_dir {
                    a.extend(["-o".into(), "ControlMaster=auto".into(), "-o".into(), "ControlPersist=60".into(), "-o".into()]);
                    // A shared connection runs under the key (so the forced command) and options it
                    // was opened with: two targets on one host with different keys must never
                    // share one, or the second's requests run under the first's `vmsnap serve`
                    // (its root, retention, rollback leave). So the path carries a hash of the
                    // target's name, key and options, compression included.
                    a.push(OsString::from(format!("ControlPath={}/%C-{}", dir.display(), connection_identity(t))));
                }
                if let Some(p) = t.port {
                    a.extend(["-p".into(), p.to_string().into()]);
                }
                if let Some(i) = &t.identity {
                    a.extend(["-i".into(), i.clone().into_os_string()]);
                }
                if t.compress {
                    a.push("-C".into());
                }
                a.extend(t.ssh_options.iter().map(OsString::from));
                let dest = match &t.user {
                    Some(u) => format!("{u}@{host}"),
                    None => host.clone(),
                };
                a.extend(["--".into(), dest.into(), "vmsnap serve".into()]);
                a
            }
            None => {
                let exe = std::env::current_exe().map(OsString::from).unwrap_or_else(|_| "vmsnap".into());
                let mut a = vec![exe, "serve".into(), "--root".into()];
                a.push(t.dataset.clone().unwrap_or_default().into());
                a.push("--ram-dir".into());
                a.push(t.ram_dir.clone().unwrap_or_default().into_os_string());
                if let Some(keep) = &t.keep {
                    a.extend(["--keep".into(), keep.into()]);
                }
                a
            }
        };
        Self { argv, rate_limit: t.rate_limit, cancel: None, idle_limit: t.idle_timeout }
    }

    /// Payloads stop (the request fails) once `flag` is set.
    pub fn cancelled_by(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Starts the target's `vmsnap serve` (through ssh); its stderr is read, bounded, aside.
    fn session(&self) -> Result<Session, String> {
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.argv[0].to_string_lossy()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let err = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = (&mut stderr).take(64 << 10).read_to_end(&mut b);
            b
        });
        Ok(Session { child, stdin, stdout, err })
    }

    /// Sends `req` and its payload; the target's answer. `moved` counts payload bytes as they go.
    pub fn call(&self, req: &Request, payload: Payload, moved: &AtomicU64) -> Result<serde_json::Value, String> {
        let t = Instant::now();
        let answer = self.exchange(req, payload, moved);
        tracing::debug!(verb = req.verb(), ms = t.elapsed().as_millis() as u64, ok = answer.is_ok(), "target request");
        answer
    }

    fn exchange(&self, req: &Request, payload: Payload, moved: &AtomicU64) -> Result<serde_json::Value, String> {
        let Session { child, mut stdin, mut stdout, err } = self.session()?;
        let replied = AtomicU64::new(0);
        let abandon = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let dog = scope.spawn(|| self.supervise(child, &[moved, &replied], &abandon));
            // Read the answer while the payload goes, so neither side blocks on a full pipe.
            let out = scope.spawn(|| read_counted(&mut stdout, MAX_REPLY, &replied));
            let line = serde_json::to_string(req).map_err(|e| e.to_string())? + "\n";
            let mut sender = None;
            let sent = stdin.write_all(line.as_bytes()).map_err(|e| e.to_string()).and_then(|()| match payload {
                Payload::None => Ok(()),
                Payload::File(mut f, offset) => {
                    f.seek(std::io::SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
                    self.forward(f.as_fd(), stdin.as_fd(), moved)
                }
                Payload::Reader(mut r) => {
                    // Pieces of a MiB into a pipe that holds one (as `forward` sizes it).
                    let _ = nix::fcntl::fcntl(stdin.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIECE as i32));
                    let mut to = stdin.as_fd().try_clone_to_owned().map(std::fs::File::from).map_err(|e| e.to_string())?;
                    self.copy(&mut r, &mut to, moved)
                }
                Payload::Command(mut cmd) => {
                    let mut send = cmd
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .stdin(Stdio::null())
                        .spawn()
                        .map_err(|e| format!("cannot run zfs send: {e}"))?;
                    let from = send.stdout.take().expect("piped");
                    let copied = self.forward(from.as_fd(), stdin.as_fd(), moved);
                    sender = Some(send);
                    copied
                }
            });
            drop(stdin);
            let send_status = sender.map(|s| s.wait_with_output());
            let (status, killed) = dog.join().unwrap_or_else(|_| (Err("the session's watcher failed".into()), None));
            let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            if let Some(why) = killed {
                return Err(why);
            }
            let status = status?;
            if out.len() >= MAX_REPLY {
                return Err(format!("the target answered more than {} MiB (the most vmsnap reads): refused", MAX_REPLY >> 20));
            }
            let reply = String::from_utf8_lossy(&out).lines().last().and_then(|l| serde_json::from_str::<Reply>(l).ok());
            if let Some(Ok(o)) = &send_status {
                if !o.status.success() {
                    // A target that refused closes its end, and the send dies of it with nothing
                    // to say: the target's words are the cause, the send's the consequence.
                    let said = abridge(&String::from_utf8_lossy(&o.stderr));
                    let send = if said.is_empty() { format!("zfs send stopped ({})", o.status) } else { format!("zfs send: {said}") };
                    return Err(match reply {
                        Some(Reply { ok: false, error, .. }) => {
                            format!("the target says: {} ({send})", abridge(&error.unwrap_or_default()))
                        }
                        _ => send,
                    });
                }
            }
            match reply {
                Some(Reply { ok: true, value, .. }) => Ok(value),
                Some(Reply { error, .. }) => Err(format!("the target says: {}", abridge(&error.unwrap_or_default()))),
                None => Err(format!(
                    "no answer from the target ({}{}{}): {}",
                    status,
                    if sent.is_err() { "; sending failed: " } else { "" },
                    sent.err().unwrap_or_default(),
                    abridge(&String::from_utf8_lossy(&err))
                )),
            }
        })
    }

    /// Waits for a session's process (ssh, or the local `vmsnap serve`) and kills it at once
    /// when the run is cancelled or `abandon` is set, or when none of `counters` moved for the
    /// idle limit (a target that stopped reading or answering, a receive stuck on a suspended
    /// pool): its exit status, and why it was killed. Killed, the session's pipes close and
    /// every thread waiting on them returns.
    fn supervise(
        &self,
        mut child: Child,
        counters: &[&AtomicU64],
        abandon: &AtomicBool,
    ) -> (Result<std::process::ExitStatus, String>, Option<String>) {
        let sum = || counters.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
        let (start, mut last, mut since) = (Instant::now(), sum(), Instant::now());
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return (Ok(status), None),
                Ok(None) => {}
                Err(e) => return (Err(e.to_string()), None),
            }
            // Quick requests end within milliseconds: look often at first.
            std::thread::sleep(Duration::from_millis(if start.elapsed() < Duration::from_secs(1) { 5 } else { 100 }));
            let why = if self.cancelled() {
                Some("cancelled".to_owned())
            } else if abandon.load(Ordering::Relaxed) {
                None
            } else if sum() != last {
                (last, since) = (sum(), Instant::now());
                continue;
            } else if since.elapsed() >= self.idle_limit {
                Some(format!("the target moved no byte for {} s: its session was ended (idle_timeout_s)", self.idle_limit.as_secs()))
            } else {
                continue;
            };
            let _ = child.kill();
            return (child.wait().map_err(|e| e.to_string()), why);
        }
    }

    /// Sends `req` (one that streams back) and copies what follows the target's reply line into
    /// `sink`, counting in `moved`; the reply's value. Fails when the target refuses, or when
    /// it (ssh) ends badly after streaming.
    /// `bound`: the most bytes the reply announces (a dump's size from `offset`); a target that
    /// sends more is cut off there and the pull fails.
    pub fn pull(
        &self,
        req: &Request,
        sink: &mut dyn Write,
        moved: &AtomicU64,
        bound: &dyn Fn(&serde_json::Value) -> Option<u64>,
    ) -> Result<serde_json::Value, String> {
        let Session { child, mut stdin, mut stdout, err } = self.session()?;
        let replied = AtomicU64::new(0);
        let abandon = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let dog = scope.spawn(|| self.supervise(child, &[moved, &replied], &abandon));
            let line = serde_json::to_string(req).map_err(|e| e.to_string())? + "\n";
            let sent = stdin.write_all(line.as_bytes());
            drop(stdin);
            // The reply line, a byte at a time (the stream follows it).
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            let mut read_failed = None;
            while head.len() < super::protocol::MAX_REQUEST {
                match stdout.read(&mut byte) {
                    Ok(0) => break,
                    Ok(_) if byte[0] == b'\n' => break,
                    Ok(_) => {
                        head.push(byte[0]);
                        replied.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        read_failed = Some(format!("reading the target's answer: {e}"));
                        break;
                    }
                }
            }
            let reply = serde_json::from_slice::<Reply>(&head).ok();
            let copied = match (&reply, &read_failed) {
                (Some(Reply { ok: true, value, .. }), None) => match bound(value) {
                    None => self.copy(&mut stdout, sink, moved),
                    Some(limit) => self.copy(&mut (&mut stdout).take(limit), sink, moved).and_then(|()| {
                        let mut more = [0u8; 1];
                        match stdout.read(&mut more) {
                            Ok(0) => Ok(()),
                            _ => Err(format!("the target sent more than the {limit} bytes it announced")),
                        }
                    }),
                },
                _ => Ok(()),
            };
            drop(stdout);
            if copied.is_err() {
                // The target may still be writing: it must not hold this run up.
                abandon.store(true, Ordering::Relaxed);
            }
            let (status, killed) = dog.join().unwrap_or_else(|_| (Err("the session's watcher failed".into()), None));
            let err = err.join().unwrap_or_default();
            if let Some(why) = killed {
                return Err(why);
            }
            if let Some(e) = read_failed {
                return Err(e);
            }
            let status = status?;
            match reply {
                Some(Reply { ok: true, value, .. }) => {
                    copied?;
                    if !status.success() {
                        return Err(format!("the target's stream ended badly ({status}): {}", abridge(&String::from_utf8_lossy(&err))));
                    }
                    Ok(value)
                }
                Some(Reply { error, .. }) => Err(format!("the target says: {}", abridge(&error.unwrap_or_default()))),
                None => Err(format!(
                    "no answer from the target ({status}{}): {}",
                    sent.err().map(|e| format!("; sending failed: {e}")).unwrap_or_default(),
                    abridge(&String::from_utf8_lossy(&err))
                )),
            }
        })
    }

    /// Moves everything `from` (a pipe or a file) has into `to` (a pipe) with splice(2): the
    /// bytes never pass through this process, and both pipes are widened to a [`PIECE`] so
    /// `zfs send`, this thread and ssh wake up once per MiB, not once per 64 KiB. Where the
    /// kernel cannot splice `from`, read and write.
    fn forward(&self, from: BorrowedFd<'_>, to: BorrowedFd<'_>, moved: &AtomicU64) -> Result<(), String> {
        for fd in [from, to] {
            // Not a pipe (a file), or over the system's limit: the default size will do.
            let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIECE as i32));
        }
        let mut pace = Pace::new(self);
        loop {
            let flags = nix::fcntl::SpliceFFlags::SPLICE_F_MOVE | nix::fcntl::SpliceFFlags::SPLICE_F_MORE;
            let n = match nix::fcntl::splice(from, None, to, None, PIECE, flags) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EINVAL) if pace.total == 0 => {
                    let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map(std::fs::File::from).map_err(|e| e.to_string());
                    return self.copy(&mut dup(from)?, &mut dup(to)?, moved);
                }
                Err(e) => return Err(format!("sending to the target: {e}")),
            };
            pace.went(n, moved)?;
        }
    }

    /// Copies in [`PIECE`]s through a buffer, counting, and sleeping to keep under the rate limit.
    fn copy(&self, from: &mut dyn Read, to: &mut dyn Write, moved: &AtomicU64) -> Result<(), String> {
        let mut buf = vec![0u8; PIECE];
        let mut pace = Pace::new(self);
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading the payload: {e}")),
            };
            to.write_all(&buf[..n]).map_err(|e| format!("sending to the target: {e}"))?;
            pace.went(n, moved)?;
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// The most a payload moves at once, and the pipes' size.
const PIECE: usize = 1 << 20;

/// The most of a target's answer vmsnap reads (a listing comes in pages well under it).
const MAX_REPLY: usize = 1 << 20;

/// A payload's count, rate limit and cancel check between two pieces.
/// A running `vmsnap serve` on the target: its input, its output, its stderr being read aside.
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    err: std::thread::JoinHandle<Vec<u8>>,
}

struct Pace<'a> {
    transport: &'a Transport,
    start: Instant,
    total: u64,
}

impl<'a> Pace<'a> {
    fn new(transport: &'a Transport) -> Self {
        Self { transport, start: Instant::now(), total: 0 }
    }

    /// `n` more bytes went: counted in `moved`; then a sleep if they went faster than the rate
    /// limit, and an error if the run was cancelled.
    fn went(&mut self, n: usize, moved: &AtomicU64) -> Result<(), String> {
        self.total += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        if self.transport.rate_limit > 0 {
            let due = Duration::from_secs_f64(self.total as f64 / self.transport.rate_limit as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if self.transport.cancelled() {
            return Err("cancelled".into());
        }
        Ok(())
    }
}

/// At most 500 characters of what a remote side said.
/// Reads `from` to its end (at most `limit` bytes kept), counting what comes in `count` until
/// the limit.
fn read_counted(from: &mut dyn Read, limit: usize, count: &AtomicU64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = limit.saturating_sub(out.len());
                // Past the limit the rest is drained but not counted: endless output is idle.
                if room > 0 {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                out.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    out
}

fn abridge(s: &str) -> String {
    super::protocol::shown(s, 500)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(compress: bool) -> TargetConfig {
        TargetConfig {
            name: "offsite".into(),
            host: Some("backup.example.org".into()),
            user: None,
            port: None,
            identity: None,
            ssh_options: Vec::new(),
            compress,
            rate_limit: 0,
            dataset: None,
            ram_dir: None,
            keep: None,
            every: None,
            idle_timeout: Duration::from_secs(300),
            seal_ram: crate::config::SealRam::Auto,
            ram_key: crate::config::DEFAULT_RAM_KEY.into(),
        }
    }

    /// `forward` of what `fill` writes into a pipe, read out of another pipe: (bytes out, count).
    fn forwarded(t: &Transport, from: BorrowedFd<'_>, fill: impl FnOnce() + Send + 'static) -> (Result<(), String>, Vec<u8>, u64) {
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            std::fs::File::from(out_r).read_to_end(&mut b).unwrap();
            b
        });
        let writer = std::thread::spawn(fill);
        let moved = AtomicU64::new(0);
        let r = t.forward(from, out_w.as_fd(), &moved);
        drop(out_w);
        writer.join().unwrap();
        (r, reader.join().unwrap(), moved.load(Ordering::Relaxed))
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn forwards_a_pipe_and_a_file_from_an_offset_byte_for_byte() {
        let t = Transport::for_target(&target(false), None);
        // A pipe, as `zfs send`'s stdout: 5 MiB and a bit, in odd pieces.
        let data = pattern((5 << 20) + 12345);
        let (in_r, in_w) = nix::unistd::pipe().unwrap();
        let sent = data.clone();
        let (r, out, n) = forwarded(&t, in_r.as_fd(), move || {
            let mut w = std::fs::File::from(in_w);
            for piece in sent.chunks(77777) {
                w.write_all(piece).unwrap();
            }
        });
        assert_eq!(r, Ok(()));
        assert_eq!(n, data.len() as u64);
        assert!(out == data, "the bytes differ");

        // A file from an offset, as a RAM dump's resumed upload.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        file.seek(std::io::SeekFrom::Start(1000)).unwrap();
        let (r, out, n) = forwarded(&t, file.as_fd(), || {});
        assert_eq!(r, Ok(()));
        assert_eq!(n, data.len() as u64 - 1000);
        assert!(out == data[1000..], "the bytes differ");
    }

    #[test]
    fn a_cancelled_forward_stops_after_a_piece() {
        let flag = Arc::new(AtomicBool::new(true));
        let t = Transport::for_target(&target(false), None).cancelled_by(flag);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&pattern(8 << 20)).unwrap();
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        let (r, out, n) = forwarded(&t, file.as_fd(), || {});
        assert_eq!(r, Err("cancelled".to_owned()));
        assert!(n > 0 && n <= PIECE as u64 && out.len() as u64 == n, "{n} bytes counted, {} moved", out.len());
    }

    #[test]
    fn connections_are_shared_only_by_the_same_key_and_options() {
        let path = |t: &TargetConfig| {
            Transport::for_target(t, Some(std::path::Path::new("/run/ssh")))
                .argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .find(|a| a.starts_with("ControlPath="))
                .unwrap()
        };
        let plain = target(false);
        let zipped = target(true);
        let other_key = TargetConfig { name: "offsite2".into(), identity: Some("/root/.ssh/id_other".into()), ..target(false) };
        let other_opts = TargetConfig { ssh_options: vec!["-oCiphers=aes128-ctr".into()], ..target(false) };
        let p = path(&plain);
        assert!(p.starts_with("ControlPath=/run/ssh/%C-") && p.len() == "ControlPath=/run/ssh/%C-".len() + 12, "{p}");
        assert_eq!(p, path(&target(false)));
        for t in [&zipped, &other_key, &other_opts] {
            assert_ne!(p, path(t), "{t:?}");
        }
    }

    /// A target that neither reads nor answers (here: `sleep`) is killed after the idle limit;
    /// a cancelled one at once.
    #[test]
    fn a_silent_target_is_ended_after_the_idle_limit_and_at_once_when_cancelled() {
        let silent = |idle_ms: u64| Transport {
            argv: vec!["sleep".into(), "30".into()],
            rate_limit: 0,
            cancel: None,
            idle_limit: Duration::from_millis(idle_ms),
        };
        let req = Request::List { dataset: "tank/vms/web".into(), after: None };
        let t0 = Instant::now();
        let r = silent(300).call(&req, Payload::None, &AtomicU64::new(0));
        assert!(r.as_ref().is_err_and(|e| e.contains("moved no byte")), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let flag = Arc::new(AtomicBool::new(false));
        let t = silent(60_000).cancelled_by(flag.clone());
        let t0 = Instant::now();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            flag.store(true, Ordering::Relaxed);
        });
        let r = t.pull(&req, &mut Vec::new(), &AtomicU64::new(0), &|_| None);
        setter.join().unwrap();
        assert_eq!(r, Err("cancelled".to_owned()));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}
