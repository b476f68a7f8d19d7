//! The guest-agent client: qemu-ga inside the VM, reached over QEMU's virtio-serial chardev socket.
//!
//! The channel is a byte stream without ids, and it outlives our connections: a reply to a request
//! that timed out (or was sent on an earlier connection) arrives later, in front of the answer to
//! the next request. So before the first command and after every timeout the client resyncs: it
//! sends `0xFF` + `guest-sync-delimited` with a fresh random id, then discards everything up to a
//! `0xFF` sentinel followed by that id. The `0xFF` itself makes the agent answer with a parse error
//! first; that is skipped too.
//!
//! The chardev serves one client at a time: a second connection is accepted but hears nothing, so
//! it looks exactly like an agent that is not running ([`QgaError::AgentNotRunning`]).

use super::{abridge, read_bounded, ErrorClass, WireError, QGA_LINE_MAX};
use qapi::qga;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};

/// Deadlines per kind of call. Freezing flushes dirty data and can take long; a thaw must be tried
/// even when the freeze went wrong, so it gets its own, shorter, deadline.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub sync: Duration,
    pub ping: Duration,
    pub freeze: Duration,
    pub thaw: Duration,
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            sync: Duration::from_secs(3),
            ping: Duration::from_secs(3),
            freeze: Duration::from_secs(60),
            thaw: Duration::from_secs(10),
            other: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("cannot connect to guest-agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent on {path} did not answer a sync within {waited:?}: qemu-ga is not running in the guest, or another client holds the channel")]
    AgentNotRunning { path: PathBuf, waited: Duration },
    #[error("guest agent: {command} got no answer within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("guest agent is in frozen state: {command} refused")]
    AlreadyFrozen { command: String },
    #[error("guest agent: {command} failed: {class}: {desc}")]
    Command { command: String, class: ErrorClass, desc: String },
    #[error("guest agent closed the channel during {command}")]
    Disconnected { command: String },
    #[error("the guest agent sent a line of {bytes} bytes during {command} (at most {QGA_LINE_MAX} are read): dropped")]
    LineTooLong { command: String, bytes: usize },
    #[error("unexpected guest-agent reply to {command}: {detail}")]
    UnexpectedReply { command: String, detail: String },
    #[error("I/O error on the guest-agent socket during {command}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// A finished `guest-exec`.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// What `guest-info` says: the agent's version and which commands it will run.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub version: String,
    pub enabled: Vec<String>,
}

/// One connection to a guest agent. Calls take `&mut self`: the channel carries one exchange at a
/// time.
pub struct Qga {
    stream: BufReader<UnixStream>,
    path: PathBuf,
    timeouts: Timeouts,
    in_step: bool,
    next_sync: u32,
}

impl std::fmt::Debug for Qga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qga").field("path", &self.path).field("in_step", &self.in_step).finish()
    }
}

impl Qga {
    /// Connects and syncs.
    ///
    /// # Errors
    /// [`QgaError::Connect`] when the socket does not accept, [`QgaError::AgentNotRunning`] when it
    /// accepts but nothing answers the sync.
    pub async fn connect(path: &Path, timeouts: Timeouts) -> Result<Self, QgaError> {
        let stream = UnixStream::connect(path).await.map_err(|source| QgaError::Connect { path: path.to_owned(), source })?;
        let mut qga = Self { stream: BufReader::new(stream), path: path.to_owned(), timeouts, in_step: false, next_sync: random_u32() };
        qga.sync().await?;
        Ok(qga)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resynchronises the stream: after this, the next line read answers the next request.
    ///
    /// # Errors
    /// [`QgaError::AgentNotRunning`] when no sync answer arrives in time.
    pub async fn sync(&mut self) -> Result<(), QgaError> {
        self.in_step = false;
        // Ids stay below 2^31: qemu-ga parses them as int64, libvirt's as int; keep both happy.
        self.next_sync = self.next_sync.wrapping_add(1) & 0x7fff_ffff;
        let id = i64::from(self.next_sync.max(1));
        let waited = self.timeouts.sync;
        let deadline = Instant::now() + waited;
        let mut msg = vec![0xFF];
        msg.extend(serde_json::to_vec(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})).expect("json"));
        msg.push(b'\n');
        let path = self.path.clone();
        let not_running = || QgaError::AgentNotRunning { path: path.clone(), waited };
        timeout_at(deadline, self.stream.get_mut().write_all(&msg))
            .await
            .map_err(|_| not_running())?
            .map_err(|source| QgaError::Io { command: "guest-sync-delimited".into(), source })?;
        loop {
            // Everything before the sentinel is stale output or the parse error caused by 0xFF.
            // Only the first 256 bytes of what is skipped are kept (for the debug log).
            let mut skipped = Vec::new();
            let (n, found) = timeout_at(deadline, read_bounded(&mut self.stream, 0xFF, 256, &mut skipped))
                .await
                .map_err(|_| not_running())?
                .map_err(|source| QgaError::Io { command: "guest-sync-delimited".into(), source })?;
            if !found {
                return Err(QgaError::Disconnected { command: "guest-sync-delimited".into() });
            }
            if n > 1 {
                let shown = String::from_utf8_lossy(&skipped[..skipped.len().min(n) - 1]).into_owned();
                tracing::debug!(skipped = %abridge(shown.trim(), 200), bytes = n - 1, "QGA: discarded before sync");
            }
            let line = match timeout_at(deadline, self.read_line("guest-sync-delimited")).await.map_err(|_| not_running())? {
                Ok(l) => l,
                // An overlong line after a sentinel is not our answer: look for the next one.
                Err(QgaError::LineTooLong { .. }) => continue,
                Err(e) => return Err(e),
            };
            match parse_reply(&line) {
                Some(Ok(v)) if v.as_i64() == Some(id) => {
                    self.in_step = true;
                    return Ok(());
                }
                _ => tracing::debug!(line = %abridge(line.trim(), 200), "QGA: stale reply after sentinel"),
            }
        }
    }

    /// Runs a typed command (from `qapi::qga`) within `timeout`, syncing first if needed.
    ///
    /// # Errors
    /// [`QgaError::Timeout`] (the next call will resync), [`QgaError::AlreadyFrozen`],
    /// [`QgaError::Command`], [`QgaError::Disconnected`], [`QgaError::AgentNotRunning`].
    ///
    /// # Cancel safety
    /// Not cancel safe in the sense that a dropped call leaves a reply in flight; the connection
    /// notices (it is no longer in step) and resyncs before the next call.
    pub async fn execute<C: qapi::Command>(&mut self, cmd: &C, timeout: Duration) -> Result<C::Ok, QgaError> {
        let args = serde_json::to_value(cmd).map_err(|e| QgaError::UnexpectedReply { command: C::NAME.into(), detail: e.to_string() })?;
        let value = self.execute_raw(C::NAME, args, timeout).await?;
        decode(C::NAME, value)
    }

    /// Runs a command given by name; its `return` value.
    pub async fn execute_raw(&mut self, name: &str, args: Value, timeout: Duration) -> Result<Value, QgaError> {
        if !self.in_step {
            self.sync().await?;
        }
        let mut msg = json!({ "execute": name });
        if !args.as_object().is_some_and(|o| o.is_empty()) && !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        // Out of step until the answer is read: a timeout or a cancelled call leaves it in flight.
        self.in_step = false;
        let deadline = Instant::now() + timeout;
        let timed_out = || QgaError::Timeout { command: name.to_owned(), timeout };
        tracing::debug!(command = name, "QGA ->");
        timeout_at(deadline, self.stream.get_mut().write_all(&line))
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| QgaError::Io { command: name.into(), source })?;
        loop {
            let reply = timeout_at(deadline, self.read_line(name)).await.map_err(|_| timed_out())??;
            let text = reply.trim_matches(|c: char| c.is_whitespace() || c == '\u{FFFD}');
            if text.is_empty() {
                continue;
            }
            self.in_step = true;
            return match parse_reply(text) {
                Some(Ok(value)) => Ok(value),
                Some(Err(err)) => Err(command_error(name, err)),
                None => Err(QgaError::UnexpectedReply { command: name.into(), detail: abridge(text, 200) }),
            };
        }
    }

    /// One line, at most [`QGA_LINE_MAX`] bytes: a longer one is dropped as it arrives and
    /// reported as [`QgaError::LineTooLong`] (the connection is then out of step and resyncs).
    async fn read_line(&mut self, command: &str) -> Result<String, QgaError> {
        let mut buf = Vec::new();
        let (n, _) = read_bounded(&mut self.stream, b'\n', QGA_LINE_MAX, &mut buf)
            .await
            .map_err(|source| QgaError::Io { command: command.into(), source })?;
        if n == 0 {
            return Err(QgaError::Disconnected { command: command.into() });
        }
        if n > QGA_LINE_MAX {
            self.in_step = false;
            return Err(QgaError::LineTooLong { command: command.into(), bytes: n });
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// `guest-ping`, with the short ping deadline.
    pub async fn ping(&mut self) -> Result<(), QgaError> {
        self.execute(&qga::guest_ping {}, self.timeouts.ping).await?;
        Ok(())
    }

    /// `guest-info`: version and enabled commands.
    pub async fn info(&mut self) -> Result<AgentInfo, QgaError> {
        let info = self.execute(&qga::guest_info {}, self.timeouts.other).await?;
        Ok(AgentInfo {
            version: info.version,
            enabled: info.supported_commands.into_iter().filter(|c| c.enabled).map(|c| c.name).collect(),
        })
    }

    /// `guest-fsfreeze-status`.
    pub async fn freeze_status(&mut self) -> Result<FreezeStatus, QgaError> {
        let v = self.execute_raw("guest-fsfreeze-status", json!({}), self.timeouts.other).await?;
        match v.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            _ => Err(QgaError::UnexpectedReply { command: "guest-fsfreeze-status".into(), detail: v.to_string() }),
        }
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    pub async fn freeze(&mut self) -> Result<i64, QgaError> {
        self.freeze_within(self.timeouts.freeze).await
    }

    /// `guest-fsfreeze-freeze` with its own deadline.
    pub async fn freeze_within(&mut self, timeout: Duration) -> Result<i64, QgaError> {
        self.execute(&qga::guest_fsfreeze_freeze {}, timeout).await
    }

    /// `guest-fsfreeze-freeze-list`: freezes only the given mountpoints.
    pub async fn freeze_list(&mut self, mountpoints: &[String]) -> Result<i64, QgaError> {
        self.execute(&qga::guest_fsfreeze_freeze_list { mountpoints: Some(mountpoints.to_vec()) }, self.timeouts.freeze).await
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed (0 when nothing was frozen).
    pub async fn thaw(&mut self) -> Result<i64, QgaError> {
        self.execute(&qga::guest_fsfreeze_thaw {}, self.timeouts.thaw).await
    }

    /// `guest-exec` with captured output: the guest pid.
    pub async fn exec_start(&mut self, path: &str, args: &[&str], env: &[&str]) -> Result<i64, QgaError> {
        let cmd = qga::guest_exec {
            path: path.to_owned(),
            arg: Some(args.iter().map(|s| s.to_string()).collect()),
            env: (!env.is_empty()).then(|| env.iter().map(|s| s.to_string()).collect()),
            input_data: None,
            capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
        };
        Ok(self.execute(&cmd, self.timeouts.other).await?.pid)
    }

    /// `guest-exec-status`: `None` while the process runs.
    pub async fn exec_status(&mut self, pid: i64) -> Result<Option<ExecOutput>, QgaError> {
        let st = self.execute(&qga::guest_exec_status { pid }, self.timeouts.other).await?;
        Ok(st.exited.then(|| ExecOutput {
            exit_code: st.exitcode,
            signal: st.signal,
            stdout: st.out_data.unwrap_or_default(),
            stderr: st.err_data.unwrap_or_default(),
        }))
    }

    /// Runs a program in the guest and waits for it to exit, polling `guest-exec-status`.
    pub async fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecOutput, QgaError> {
        let deadline = Instant::now() + timeout;
        let pid = self.exec_start(path, args, &[]).await?;
        self.exec_wait(pid, path, deadline).await
    }

    /// Polls a started `guest-exec` until it exits or `deadline` passes.
    pub async fn exec_wait(&mut self, pid: i64, what: &str, deadline: Instant) -> Result<ExecOutput, QgaError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            if let Some(out) = self.exec_status(pid).await? {
                return Ok(out);
            }
            if Instant::now() + pause > deadline {
                return Err(QgaError::Timeout { command: format!("guest-exec {what} (pid {pid})"), timeout: started.elapsed() });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Runs a shell command line in the guest with `/bin/sh -c` (test helper; the line is ours).
    pub async fn sh(&mut self, script: &str, timeout: Duration) -> Result<ExecOutput, QgaError> {
        self.exec("/bin/sh", &["-c", script], timeout).await
    }
}

fn command_error(name: &str, err: WireError) -> QgaError {
    let class = ErrorClass::parse(&err.class);
    // qemu-ga reports "disabled because frozen" with the class CommandNotFound; only the text
    // tells it from a command that does not exist, so this one case looks at the text.
    if class == ErrorClass::CommandNotFound && err.desc.contains("frozen state") {
        return QgaError::AlreadyFrozen { command: name.to_owned() };
    }
    QgaError::Command { command: name.to_owned(), class, desc: abridge(&err.desc, 200) }
}

/// `Some(Ok(return))`, `Some(Err(error))`, or `None` when the line is not a reply.
pub(crate) fn parse_reply(line: &str) -> Option<Result<Value, WireError>> {
    let Value::Object(mut obj) = serde_json::from_str::<Value>(line.trim()).ok()? else {
        return None;
    };
    if let Some(v) = obj.remove("return") {
        return Some(Ok(v));
    }
    obj.remove("error").and_then(|e| serde_json::from_value::<WireError>(e).ok()).map(Err)
}

fn decode<T: DeserializeOwned>(command: &str, value: Value) -> Result<T, QgaError> {
    serde_json::from_value(value.clone())
        .map_err(|e| QgaError::UnexpectedReply { command: command.into(), detail: abridge(&format!("{e}: {value}"), 200) })
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)).is_ok() {
        return u32::from_ne_bytes(buf);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.subsec_nanos() ^ std::process::id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_refusal_is_its_own_error() {
        let err = WireError {
            class: "CommandNotFound".into(),
            desc: "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state".into(),
        };
        assert!(matches!(command_error("guest-fsfreeze-freeze", err), QgaError::AlreadyFrozen { .. }));
        let err = WireError { class: "CommandNotFound".into(), desc: "The command no-such-cmd has not been found".into() };
        assert!(matches!(command_error("no-such-cmd", err), QgaError::Command { class: ErrorClass::CommandNotFound, .. }));
    }

    #[test]
    fn parses_replies_from_the_rig_transcript() {
        assert_eq!(parse_reply(r#"{"return": 401706099}"#).unwrap().unwrap(), json!(401706099));
        let e = parse_reply(r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\ufffd'"}}"#).unwrap().unwrap_err();
        assert_eq!(e.class, "GenericError");
        assert!(parse_reply("garbage").is_none());
    }
}
