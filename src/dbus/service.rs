//! The `io.github.vmsnap.Agent1` object: its methods check the caller and the arguments, then
//! use the same engine, catalog, prune and registry as the CLI and the scheduler.

use super::job::{Job, JobState};
use super::polkit;
use super::{VmsnapError, BUS_NAME, JOBS, PATH};
use crate::catalog;
use crate::config::{Config, DomainConfig};
use crate::daemon::error_chain;
use crate::engine::lock::DomainLock;
use crate::engine::{self, RamMode, SnapshotOptions, Strategy};
use crate::registry::{all_domains, Registration, Registry};
use crate::zfs::Zfs;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use zbus::interface;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

/// How long a finished job object stays on the bus.
const JOB_LINGER: std::time::Duration = std::time::Duration::from_secs(600);

/// Which bus to serve on.
#[derive(Debug, Clone)]
pub enum Bus {
    System,
    Session,
    Address(String),
}

/// The service object; the daemon shares its config with it (replaced on reload).
pub struct Agent {
    pub cfg: Arc<RwLock<Arc<Config>>>,
    pub zfs: Arc<Zfs>,
    next_job: AtomicU64,
    /// Held (read) by every job while it works on a VM: the daemon's shutdown takes it (write)
    /// and so waits until each guest is thawed and resumed.
    running: Arc<tokio::sync::RwLock<()>>,
}

impl Agent {
    pub fn new(cfg: Arc<RwLock<Arc<Config>>>, zfs: Arc<Zfs>, running: Arc<tokio::sync::RwLock<()>>) -> Self {
        Self { cfg, zfs, next_job: AtomicU64::new(1), running }
    }

    fn config(&self) -> Arc<Config> {
        self.cfg.read().expect("config lock").clone()
    }

    fn registry(&self) -> Registry {
        Registry::new(&self.config().state_dir)
    }

    fn domain(&self, name: &str) -> Result<DomainConfig, VmsnapError> {
        let cfg = self.config();
        let all = all_domains(&cfg, &Registry::new(&cfg.state_dir));
        let known: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
        all.iter().find(|d| d.name == name).cloned().ok_or_else(|| {
            VmsnapError::NoSuchDomain(format!(
                "no domain named {name:?} (known: {})",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            ))
        })
    }
}

/// The caller's uid, from the bus daemon, for the message's sender.
pub(super) async fn caller_uid(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>) -> Result<u32, VmsnapError> {
    let sender = hdr.sender().ok_or_else(|| VmsnapError::NotAuthorized("the message has no sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    dbus.get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| VmsnapError::NotAuthorized(format!("cannot learn the caller's uid: {e}")))
}

/// Mutating methods: root, or a caller polkit authorizes for [`polkit::ACTION`].
pub(super) async fn require_root(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>, method: &str) -> Result<(), VmsnapError> {
    let uid = caller_uid(conn, hdr).await?;
    if uid == 0 {
        return Ok(());
    }
    let sender = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
    let why = match polkit::check(conn, &sender).await {
        polkit::Verdict::Authorized => return Ok(()),
        polkit::Verdict::NotAuthorized => format!("polkit does not grant {}", polkit::ACTION),
        polkit::Verdict::Unavailable(e) => format!("no polkit to grant {} ({e})", polkit::ACTION),
    };
    Err(VmsnapError::NotAuthorized(format!("{method} changes snapshots or domains and needs root; the caller is uid {uid}, and {why}")))
}

/// A registration names only what its QEMU really uses: something answers on the QMP socket,
/// and that process has every registered disk and the nvram open (as the kernel reports it).
/// So even root's hook cannot be steered into copying or snapshotting an unrelated file.
fn check_held_by_qemu(r: &Registration) -> Result<(), VmsnapError> {
    use crate::qemu::process::{has_open, socket_peer};
    let bad = VmsnapError::InvalidArgument;
    let Some(pid) = socket_peer(&r.qmp) else {
        return Err(bad(format!("qmp: nothing answers on {}: only a running domain can be registered", r.qmp.display())));
    };
    for (field, p) in r.disks.iter().map(|d| ("disks", d)).chain(r.nvram.iter().map(|n| ("nvram", n))) {
        if !has_open(pid, p) {
            return Err(bad(format!(
                "{field}: the QEMU process on {} (pid {pid}) does not have {} open; vmsnap registers only what the VM uses",
                r.qmp.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

/// Methods that make root connect to sockets and read files the caller names: root only, never
/// polkit's grant (the libvirt hook, their one legitimate caller, runs as root).
async fn require_uid0(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>, method: &str) -> Result<(), VmsnapError> {
    let uid = caller_uid(conn, hdr).await?;
    if uid == 0 {
        return Ok(());
    }
    Err(VmsnapError::NotAuthorized(format!(
        "{method} needs root: it makes vmsnap connect to the sockets and copy the files it names, so only root may \
         call it (polkit's {} does not cover it); the caller is uid {uid}",
        polkit::ACTION
    )))
}

/// `Snapshot` options: `memory` (s: "", "background", "precopy"), `strategy` (s: "overlay",
/// "direct"), `quiesce` (b), `label` (s). Anything else is refused.
fn parse_options(options: &HashMap<String, OwnedValue>, defaults: &DomainConfig) -> Result<SnapshotOptions, VmsnapError> {
    let bad = |m: String| VmsnapError::InvalidArgument(m);
    let string = |k: &str, v: &OwnedValue| {
        String::try_from(v.try_clone().map_err(|e| bad(e.to_string()))?).map_err(|_| bad(format!("option {k:?} must be a string")))
    };
    let mut o = SnapshotOptions { strategy: defaults.policy.strategy, ..SnapshotOptions::default() };
    for (k, v) in options {
        match k.as_str() {
            "memory" => {
                o.memory = match string(k, v)?.as_str() {
                    "" => None,
                    "background" => Some(RamMode::Background),
                    "precopy" => Some(RamMode::Precopy),
                    other => return Err(bad(format!("option memory = {other:?}: use \"\", \"background\" or \"precopy\""))),
                }
            }
            "strategy" => {
                o.strategy = match string(k, v)?.as_str() {
                    "overlay" => Strategy::Overlay,
                    "direct" => Strategy::Direct,
                    other => return Err(bad(format!("option strategy = {other:?}: use \"overlay\" or \"direct\""))),
                }
            }
            "quiesce" => o.quiesce = bool::try_from(v).map_err(|_| bad("option \"quiesce\" must be a boolean".into()))?,
            "label" => {
                let l = string(k, v)?;
                crate::engine::naming::check_label(&l).map_err(|why| bad(format!("option {why}")))?;
                o.label = l;
            }
            other => return Err(bad(format!("unknown option {other:?} (known: memory, strategy, quiesce, label)"))),
        }
    }
    Ok(o)
}

/// For a running VM (its QMP socket answers) under `require_quiesce`: the agent must answer.
async fn agent_answers(dom: &DomainConfig) -> Result<(), VmsnapError> {
    use crate::qemu::qga::{Qga, Timeouts};
    use crate::qemu::qmp::Qmp;
    if Qmp::connect(&dom.qmp, std::time::Duration::from_secs(2)).await.is_err() {
        return Ok(()); // not running: an offline snapshot needs no agent
    }
    let why = match &dom.qga {
        None => "the domain has no guest-agent socket".to_owned(),
        Some(p) => match Qga::connect(p, Timeouts::default()).await {
            Ok(mut q) => match q.ping().await {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        },
    };
    Err(VmsnapError::AgentUnavailable(format!("{}: require_quiesce is set and the guest agent is unavailable: {why}", dom.name)))
}

fn optional_path(field: &str, s: &str) -> Result<Option<PathBuf>, VmsnapError> {
    if s.is_empty() {
        return Ok(None);
    }
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(VmsnapError::InvalidArgument(format!("{field}: {s:?} is not an absolute path")));
    }
    Ok(Some(p))
}

#[interface(name = "io.github.vmsnap.Agent1")]
impl Agent {
    /// Every domain vmsnap knows: configured and registered.
    async fn domains(&self) -> Vec<String> {
        let cfg = self.config();
        all_domains(&cfg, &Registry::new(&cfg.state_dir)).into_iter().map(|d| d.name).collect()
    }

    /// A domain's snapshots: (name, creation time, consistency, RAM dump or "").
    async fn list(&self, domain: &str) -> Result<Vec<(String, i64, String, String)>, VmsnapError> {
        let dom = self.domain(domain)?;
        let cat = catalog::load(&self.zfs, &dom).await.map_err(|e| VmsnapError::Failed(error_chain(&e)))?;
        Ok(cat
            .entries
            .into_iter()
            .map(|e| (e.snap.name, e.snap.created, e.consistency.unwrap_or_default(), e.snap.ram_dump.unwrap_or_default()))
            .collect())
    }

    /// Applies (or, with `dry_run`, plans) retention; returns the report as JSON. Pruning for
    /// real needs root; a dry run does not.
    async fn prune(
        &self,
        domain: &str,
        dry_run: bool,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, VmsnapError> {
        if !dry_run {
            require_root(conn, &hdr, "Prune").await?;
        }
        let dom = self.domain(domain)?;
        let cfg = self.config();
        let now = chrono::Utc::now().timestamp();
        let report = crate::prune::prune(&cfg, &dom, &self.zfs, now, dry_run).await.map_err(|e| VmsnapError::Failed(error_chain(&e)))?;
        serde_json::to_string(&report).map_err(|e| VmsnapError::Failed(e.to_string()))
    }

    /// Starts a snapshot; returns the job object's path. See `Job1` for its progress.
    async fn snapshot(
        &self,
        domain: &str,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "Snapshot").await?;
        let dom = self.domain(domain)?;
        let opts = parse_options(&options, &dom)?;
        let cfg = self.config();
        // Fail fast when another operation holds the domain, or when quiescing is required and
        // the running VM's agent does not answer (the engine would refuse the same way, later).
        drop(DomainLock::acquire(&cfg.state_dir, &dom.name).map_err(|e| VmsnapError::Busy(e.to_string()))?);
        if opts.quiesce && opts.memory.is_none() && dom.quiesce == crate::config::QuiescePolicy::Require {
            agent_answers(&dom).await?;
        }
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let path = OwnedObjectPath::try_from(format!("{JOBS}/{id}")).map_err(|e| VmsnapError::Failed(e.to_string()))?;
        let shared = Arc::new(Mutex::new(JobState { state: "running".into(), progress: "starting".into(), result: String::new() }));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let job = Job { domain: dom.name.clone(), shared: shared.clone(), cancel: Arc::new(Mutex::new(Some(tx))) };
        server.at(&path, job).await?;
        let (zfs, conn, job_path) = (self.zfs.clone(), conn.clone(), path.clone());
        // Taken before the task runs, so a shutdown that starts now still waits for this job.
        let working = self.running.clone().read_owned().await;
        tokio::spawn(async move {
            let progress = {
                let (shared, conn, job_path) = (shared.clone(), conn.clone(), job_path.clone());
                move |step: &str| {
                    shared.lock().expect("job state").progress = step.to_owned();
                    // Followers learn of it from PropertiesChanged (no polling).
                    let (conn, job_path) = (conn.clone(), job_path.clone());
                    tokio::spawn(async move {
                        if let Ok(iface) = conn.object_server().interface::<_, Job>(&job_path).await {
                            let _ = iface.get().await.progress_changed(iface.signal_emitter()).await;
                        }
                    });
                }
            };
            let outcome = tokio::select! {
                r = engine::snapshot(&cfg, &dom, &opts, &zfs, &progress) => Some(r),
                Ok(()) = &mut rx => None,
            };
            let (state, result, ok, taken) = match outcome {
                Some(Ok(r)) => ("succeeded", serde_json::to_string(&r).unwrap_or_default(), true, Some((r.name.clone(), r.consistency))),
                Some(Err(e)) => ("failed", error_chain(&e), false, None),
                None => {
                    // The engine's future is gone mid-step: replay this domain's journal (and only
                    // its own: other domains may be mid-snapshot), as after a crash.
                    let undone = engine::recover::recover_domain(&cfg, &dom.name, &zfs).await;
                    let msg = match undone {
                        Ok(_) => {
                            "cancelled; the journal was replayed (guest thawed and resumed, dump cancelled, overlays merged)".to_owned()
                        }
                        Err(e) => format!("cancelled; recovery incomplete, run `vmsnap recover`: {e}"),
                    };
                    ("cancelled", msg, false, None)
                }
            };
            {
                let mut s = shared.lock().expect("job state");
                s.state = state.into();
                s.progress = "done".into();
                s.result = result.clone();
            }
            // The VM is left as it should be: a shutdown may go on.
            drop(working);
            if let Ok(iface) = conn.object_server().interface::<_, Job>(&job_path).await {
                let job = iface.get().await;
                let emitter = iface.signal_emitter();
                let _ = job.state_changed(emitter).await;
                let _ = job.progress_changed(emitter).await;
                let _ = job.result_changed(emitter).await;
                let _ = Job::finished(emitter, ok, &result).await;
                let _ = job.cancel.lock().map(|mut c| c.take());
            }
            if let Some((name, consistency)) = taken {
                if let Ok(iface) = conn.object_server().interface::<_, Agent>(PATH).await {
                    let _ = Agent::snapshot_taken(iface.signal_emitter(), &dom.name, &name, consistency).await;
                }
            }
            // The finished job stays readable for a while, then goes (the daemon runs for months).
            tokio::time::sleep(JOB_LINGER).await;
            let _ = conn.object_server().remove::<Job, _>(&job_path).await;
        });
        Ok(path)
    }

    /// Registers a domain (the libvirt hook calls this on `started`/`reconnect`). Empty
    /// strings mean "none". Root only (uid 0; polkit cannot grant it).
    #[allow(clippy::too_many_arguments)]
    async fn register_domain(
        &self,
        name: &str,
        uuid: &str,
        qmp: &str,
        qga: &str,
        disks: Vec<String>,
        nvram: &str,
        xml: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmsnapError> {
        require_uid0(conn, &hdr, "RegisterDomain").await?;
        let registry = self.registry();
        let mut r = Registration {
            name: name.to_owned(),
            uuid: (!uuid.is_empty()).then(|| uuid.to_owned()),
            qmp: optional_path("qmp", qmp)?.ok_or_else(|| VmsnapError::InvalidArgument("qmp: a QMP socket path is required".into()))?,
            qga: optional_path("qga", qga)?,
            disks: disks.iter().map(|d| optional_path("disks", d)).collect::<Result<Vec<_>, _>>()?.into_iter().flatten().collect(),
            nvram: optional_path("nvram", nvram)?,
            xml: None,
        };
        r.validate().map_err(|e| VmsnapError::InvalidArgument(e.to_string()))?;
        check_held_by_qemu(&r)?;
        if !xml.is_empty() {
            r.xml = Some(registry.save_xml(name, xml).map_err(|e| VmsnapError::Failed(error_chain(&e)))?);
        }
        registry.save(&r).map_err(|e| VmsnapError::Failed(error_chain(&e)))?;
        tracing::info!(domain = name, "domain registered");
        let _ = Self::domain_registered(&emitter, name).await;
        Ok(())
    }

    /// Forgets a registered domain; false when it was not registered. Root only.
    async fn unregister_domain(
        &self,
        name: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<bool, VmsnapError> {
        require_root(conn, &hdr, "UnregisterDomain").await?;
        let was = self.registry().remove(name).map_err(|e| VmsnapError::InvalidArgument(error_chain(&e)))?;
        if was {
            tracing::info!(domain = name, "domain unregistered");
            let _ = Self::domain_unregistered(&emitter, name).await;
        }
        Ok(was)
    }

    /// The daemon's last attempt per domain (JSON, as `<state_dir>/status.json`).
    async fn status(&self) -> Result<String, VmsnapError> {
        let st = crate::status::Status::load(&self.config().state_dir).map_err(|e| VmsnapError::Failed(e.to_string()))?;
        serde_json::to_string(&st).map_err(|e| VmsnapError::Failed(e.to_string()))
    }

    /// The interface version.
    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    #[zbus(signal)]
    async fn snapshot_taken(emitter: &SignalEmitter<'_>, domain: &str, snapshot: &str, consistency: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn domain_registered(emitter: &SignalEmitter<'_>, domain: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn domain_unregistered(emitter: &SignalEmitter<'_>, domain: &str) -> zbus::Result<()>;
}

/// Connects to `bus`, exports the agent and takes the bus name. Keep the connection alive.
pub async fn serve(bus: &Bus, agent: Agent) -> zbus::Result<zbus::Connection> {
    let builder = match bus {
        Bus::System => zbus::connection::Builder::system()?,
        Bus::Session => zbus::connection::Builder::session()?,
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    builder.name(BUS_NAME)?.serve_at(PATH, agent)?.build().await
}
