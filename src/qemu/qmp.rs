//! One QMP connection to a QEMU process, shared by many tasks.
//!
//! Owns the framing (one JSON object per line), the command ids, and the fan-out of asynchronous
//! events. A background task reads the socket: replies go to the caller waiting on their id, events
//! go to every [`EventStream`] subscribed at that moment. Subscribe *before* sending the command that
//! causes an event: QEMU may emit it before the command's reply (a `block-commit` emits
//! `JOB_STATUS_CHANGE created/running` before its `{"return": {}}`).
//!
//! Every call has a deadline. A reply that arrives after its caller gave up is matched by id and
//! dropped, so it can never be mistaken for another command's answer.

use super::{fdpass, ErrorClass, WireError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::time::{timeout_at, Instant};

/// Default deadline of a QMP command that is not a long operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_BACKLOG: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad QMP greeting: {0}")]
    Greeting(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: ErrorClass, desc: String },
    #[error("QMP connection closed (QEMU exited or closed the socket) during {during}")]
    Disconnected { during: String },
    #[error("QMP {during}: no answer within {timeout:?}")]
    Timeout { during: String, timeout: Duration },
    #[error("unexpected QMP reply to {command}: {detail}")]
    UnexpectedReply { command: String, detail: String },
    #[error("QMP events were lost: a subscriber fell {0} events behind")]
    EventsLost(u64),
    #[error("I/O error on the QMP socket during {during}")]
    Io {
        during: String,
        #[source]
        source: std::io::Error,
    },
}

impl QmpError {
    /// The error class when QEMU answered with an error.
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Self::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// QEMU's own timestamp, in microseconds since the epoch.
    pub timestamp_us: u64,
}

impl Event {
    /// `data[key]` as a string, if present.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

type Reply = Result<Value, (ErrorClass, String)>;

struct Shared {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    events: Mutex<Option<broadcast::Sender<Arc<Event>>>>,
    next_id: AtomicU64,
}

/// A QMP connection. Cheap to clone; all clones share one socket.
#[derive(Clone)]
pub struct Qmp {
    shared: Arc<Shared>,
    version: QemuVersion,
    path: PathBuf,
    /// The process at the other end of the socket (`SO_PEERCRED`), when the kernel says.
    peer_pid: Option<u32>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).field("version", &self.version).finish()
    }
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}
#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}
#[derive(Deserialize)]
struct GreetingVersion {
    qemu: VersionTriple,
    #[serde(default)]
    package: String,
}
#[derive(Deserialize)]
struct VersionTriple {
    major: u32,
    minor: u32,
    micro: u32,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    ///
    /// # Errors
    /// [`QmpError::Connect`] when nothing listens on `path`, [`QmpError::Greeting`] when the peer
    /// does not speak QMP, [`QmpError::Timeout`] when it says nothing within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = timeout_at(deadline, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout { during: "connect".into(), timeout })?
            .map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut bytes = Vec::new();
        let (n, _) = timeout_at(deadline, super::read_bounded(&mut reader, b'\n', 64 << 10, &mut bytes))
            .await
            .map_err(|_| QmpError::Timeout { during: "greeting".into(), timeout })?
            .map_err(|source| QmpError::Io { during: "greeting".into(), source })?;
        if n == 0 {
            return Err(QmpError::Disconnected { during: "greeting".into() });
        }
        let line = String::from_utf8_lossy(&bytes);
        let greeting: Greeting =
            serde_json::from_str(&line).map_err(|e| QmpError::Greeting(format!("{e}: {}", super::abridge(line.trim(), 200))))?;
        let version = QemuVersion {
            major: greeting.qmp.version.qemu.major,
            minor: greeting.qmp.version.qemu.minor,
            micro: greeting.qmp.version.qemu.micro,
            package: greeting.qmp.version.package,
        };
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(write),
            pending: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(events)),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(read_loop(reader, Arc::downgrade(&shared)));
        let qmp = Qmp { shared, version, path: path.to_owned(), peer_pid };
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        qmp.execute_raw("qmp_capabilities", None, remaining).await?;
        tracing::debug!(path = %path.display(), version = %qmp.version, "QMP connected");
        Ok(qmp)
    }

    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The QEMU process serving this connection, as the kernel reports the socket's peer.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Runs a typed command (from `qapi::qmp`) with the default deadline.
    ///
    /// # Errors
    /// [`QmpError::Command`] when QEMU refuses it; see [`Qmp::execute_raw`] for the rest.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the reply: it is discarded when it arrives. The command itself
    /// may still have run in QEMU.
    pub async fn execute<C: qapi::Command>(&self, cmd: &C) -> Result<C::Ok, QmpError> {
        self.execute_within(cmd, DEFAULT_TIMEOUT).await
    }

    /// Runs a typed command with an explicit deadline.
    pub async fn execute_within<C: qapi::Command>(&self, cmd: &C, timeout: Duration) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd)
            .map_err(|e| QmpError::UnexpectedReply { command: C::NAME.into(), detail: format!("cannot encode arguments: {e}") })?;
        let value = self.send(C::NAME, Some(args), timeout, None).await?;
        decode(C::NAME, value)
    }

    /// Runs a typed command and passes `fd` along with it (SCM_RIGHTS), as `getfd` and `add-fd` need.
    pub async fn execute_with_fd<C: qapi::Command>(&self, cmd: &C, fd: BorrowedFd<'_>) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd)
            .map_err(|e| QmpError::UnexpectedReply { command: C::NAME.into(), detail: format!("cannot encode arguments: {e}") })?;
        let value = self.send(C::NAME, Some(args), DEFAULT_TIMEOUT, Some(fd)).await?;
        decode(C::NAME, value)
    }

    /// Runs a command given by name with JSON arguments; the reply's `return` value.
    ///
    /// # Errors
    /// [`QmpError::Command`], [`QmpError::Timeout`], [`QmpError::Disconnected`], [`QmpError::Io`].
    pub async fn execute_raw(&self, name: &str, args: Option<Value>, timeout: Duration) -> Result<Value, QmpError> {
        self.send(name, args, timeout, None).await
    }

    /// A new subscription to every event QEMU sends from now on.
    ///
    /// # Errors
    /// [`QmpError::Disconnected`] when the connection is already gone.
    pub fn subscribe(&self) -> Result<EventStream, QmpError> {
        let guard = self.shared.events.lock().expect("events lock");
        match guard.as_ref() {
            Some(tx) => Ok(EventStream { rx: tx.subscribe() }),
            None => Err(QmpError::Disconnected { during: "subscribe".into() }),
        }
    }

    /// True once the socket has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.events.lock().expect("events lock").is_none()
    }

    async fn send(&self, name: &str, args: Option<Value>, timeout: Duration, fd: Option<BorrowedFd<'_>>) -> Result<Value, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": name, "id": id });
        if let Some(args) = args {
            if !args.as_object().is_some_and(|o| o.is_empty()) {
                msg["arguments"] = args;
            }
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value always serialises");
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            // Register before writing: the reply can come back before write_all returns.
            let mut pending = self.shared.pending.lock().expect("pending lock");
            if self.is_closed() {
                return Err(QmpError::Disconnected { during: name.into() });
            }
            pending.insert(id, tx);
        }
        let deadline = Instant::now() + timeout;
        tracing::debug!(command = name, id, "QMP ->");
        let written = timeout_at(deadline, async {
            let mut writer = self.shared.writer.lock().await;
            match fd {
                Some(fd) => fdpass::send_with_fd(writer.as_ref(), &line, fd).await,
                None => writer.write_all(&line).await,
            }
        })
        .await;
        let outcome = match written {
            Err(_) => Err(QmpError::Timeout { during: format!("sending {name}"), timeout }),
            Ok(Err(source)) => Err(QmpError::Io { during: name.into(), source }),
            Ok(Ok(())) => match timeout_at(deadline, rx).await {
                Err(_) => Err(QmpError::Timeout { during: name.into(), timeout }),
                Ok(Err(_)) => Err(QmpError::Disconnected { during: name.into() }),
                Ok(Ok(Ok(value))) => Ok(value),
                Ok(Ok(Err((class, desc)))) => Err(QmpError::Command { command: name.into(), class, desc }),
            },
        };
        if outcome.is_err() {
            self.shared.pending.lock().expect("pending lock").remove(&id);
        }
        outcome
    }
}

fn decode<T: DeserializeOwned>(command: &str, value: Value) -> Result<T, QmpError> {
    serde_json::from_value(value.clone())
        .map_err(|e| QmpError::UnexpectedReply { command: command.into(), detail: format!("{e}: {value}") })
}

/// One line from QEMU, classified.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    Reply {
        id: u64,
        reply: Result<Value, (ErrorClass, String)>,
    },
    Event(Event),
    /// A reply without a numeric id (vmsnap always sends one), or something that is not QMP.
    Stray(String),
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.data == other.data && self.timestamp_us == other.timestamp_us
    }
}

/// Pure classification of one received line.
pub(crate) fn classify(line: &str) -> Incoming {
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
        return Incoming::Stray(line.to_owned());
    };
    if let Some(Value::String(name)) = obj.remove("event") {
        let ts = obj.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_u64).unwrap_or(0);
        let micros = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_u64).unwrap_or(0);
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Incoming::Event(Event { name, data, timestamp_us: secs.saturating_mul(1_000_000).saturating_add(micros) });
    }
    let Some(id) = obj.get("id").and_then(Value::as_u64) else {
        return Incoming::Stray(line.to_owned());
    };
    if let Some(ret) = obj.remove("return") {
        return Incoming::Reply { id, reply: Ok(ret) };
    }
    if let Some(err) = obj.remove("error") {
        if let Ok(err) = serde_json::from_value::<WireError>(err) {
            return Incoming::Reply { id, reply: Err((ErrorClass::parse(&err.class), err.desc)) };
        }
    }
    Incoming::Stray(line.to_owned())
}

async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: std::sync::Weak<Shared>) {
    let fd = reader.get_ref().as_ref().as_raw_fd();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match super::read_bounded(&mut reader, b'\n', super::QMP_LINE_MAX, &mut buf).await {
            Ok((n, _)) => n,
            Err(e) => {
                tracing::warn!(fd, error = %e, "QMP read failed");
                0
            }
        };
        let Some(shared) = shared.upgrade() else { return };
        if n == 0 {
            // Closing: drop the event sender and every pending reply sender, which wakes their
            // waiters with Disconnected.
            shared.events.lock().expect("events lock").take();
            shared.pending.lock().expect("pending lock").clear();
            tracing::debug!(fd, "QMP socket closed");
            return;
        }
        if n > super::QMP_LINE_MAX {
            tracing::warn!(fd, bytes = n, "QMP line longer than {} bytes dropped", super::QMP_LINE_MAX);
            continue;
        }
        let line = String::from_utf8_lossy(&buf);
        match classify(line.trim_end()) {
            Incoming::Reply { id, reply } => {
                let waiter = shared.pending.lock().expect("pending lock").remove(&id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => tracing::debug!(id, "QMP reply nobody waits for (caller timed out)"),
                }
            }
            Incoming::Event(event) => {
                tracing::debug!(event = %event.name, data = %event.data, "QMP event");
                if let Some(tx) = shared.events.lock().expect("events lock").as_ref() {
                    let _ = tx.send(Arc::new(event));
                }
            }
            Incoming::Stray(text) => tracing::warn!(line = %super::abridge(&text, 200), "unexpected line on QMP socket"),
        }
    }
}

/// A subscription to QMP events, made with [`Qmp::subscribe`].
pub struct EventStream {
    rx: broadcast::Receiver<Arc<Event>>,
}

impl EventStream {
    /// The next event for which `pred` holds, waiting until `deadline`.
    ///
    /// # Errors
    /// [`QmpError::Timeout`] naming `what`, [`QmpError::Disconnected`], [`QmpError::EventsLost`].
    ///
    /// # Cancel safety
    /// Cancel safe: an event is consumed only when it is returned or skipped.
    pub async fn wait_for(&mut self, what: &str, deadline: Instant, mut pred: impl FnMut(&Event) -> bool) -> Result<Arc<Event>, QmpError> {
        loop {
            let next = timeout_at(deadline, self.rx.recv()).await.map_err(|_| QmpError::Timeout {
                during: format!("waiting for {what}"),
                timeout: deadline.saturating_duration_since(Instant::now()),
            })?;
            match next {
                Ok(event) if pred(&event) => return Ok(event),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected { during: format!("waiting for {what}") }),
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(QmpError::EventsLost(n)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_event_reply_error_and_stray() {
        let ev = classify(
            r#"{"timestamp": {"seconds": 1795698037, "microseconds": 419715}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "commit1"}}"#,
        );
        match ev {
            Incoming::Event(e) => {
                assert_eq!(e.name, "JOB_STATUS_CHANGE");
                assert_eq!(e.str("status"), Some("created"));
                assert_eq!(e.timestamp_us, 1_795_698_037_419_715);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(classify(r#"{"return": {}, "id": 7}"#), Incoming::Reply { id: 7, reply: Ok(json!({})) });
        assert_eq!(
            classify(r#"{"error": {"class": "GenericError", "desc": "Cannot find device='nope' nor node-name='nope'"}, "id": 3}"#),
            Incoming::Reply { id: 3, reply: Err((ErrorClass::GenericError, "Cannot find device='nope' nor node-name='nope'".into())) }
        );
        assert!(matches!(classify(r#"{"return": {}}"#), Incoming::Stray(_)));
        assert!(matches!(classify("not json"), Incoming::Stray(_)));
    }
}
