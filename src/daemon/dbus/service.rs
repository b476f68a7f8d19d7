//! The `io.github.vmsnap.Agent1` object: its methods parse the arguments, check the caller
//! ([`super::authz`]), and start jobs through [`crate::daemon::jobs`] like the scheduler and the CLI.

use super::authz::{require_root, require_uid0};
use super::job::{Job, Starter};
use super::{VmsnapError, BUS_NAME, JOBS, PATH};
use crate::config::{Config, DomainConfig};
use crate::daemon::error_chain;
use crate::daemon::jobs::{JobEvent, JobHandle, Jobs, Origin, Outcome, Output, Request, RestoreRequest, StartError};
use crate::daemon::registry::{all_domains, Registration, Registry};
use crate::engine::SnapshotOptions;
use crate::model::{RamMode, Strategy};
use crate::retention::catalog;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use zbus::interface;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

/// Which bus to serve on.
#[derive(Debug, Clone)]
pub enum Bus {
    System,
    Session,
    Address(String),
}

/// Root's `zfs` processes that reads (List, Status, a dry-run Prune), open to every local user,
/// may run at once; more wait, up to [`READ_WAIT`], then are refused as busy.
const MAX_READS: usize = 4;
const READ_WAIT: Duration = Duration::from_secs(30);

/// The service object: methods parse, authorize, and hand work to the job layer.
pub struct Agent {
    jobs: Jobs,
    reads: Arc<Semaphore>,
}

impl Agent {
    pub fn new(jobs: Jobs) -> Self {
        Self { jobs, reads: Arc::new(Semaphore::new(MAX_READS)) }
    }

    fn config(&self) -> Arc<Config> {
        self.jobs.config()
    }

    /// A permit for one unauthenticated read.
    async fn read_permit(&self, method: &str) -> Result<tokio::sync::OwnedSemaphorePermit, VmsnapError> {
        match tokio::time::timeout(READ_WAIT, self.reads.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(VmsnapError::Busy(format!("{method}: {MAX_READS} reads are already running; try again later"))),
        }
    }

    /// Puts a started job on the bus at `…/Jobs/<id>` and follows it there.
    /// Only its starter (`hdr`'s sender) and root read it.
    async fn export(
        &self,
        handle: JobHandle,
        hdr: &zbus::message::Header<'_>,
        conn: &zbus::Connection,
        server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        let starter = Starter::of(conn, hdr).await?;
        let path = OwnedObjectPath::try_from(format!("{JOBS}/{}", handle.id)).map_err(|e| VmsnapError::Failed(e.to_string()))?;
        server.at(&path, Job::new(handle.clone(), self.jobs.clone(), starter.clone())).await?;
        tokio::spawn(super::job::follow(conn.clone(), path.clone(), handle, starter));
        Ok(path)
    }

    /// A configured or registered domain, else (a stopped libvirt domain) one known by name.
    fn known_or_named(&self, name: &str) -> Result<DomainConfig, VmsnapError> {
        crate::daemon::registry::known_or_named(&self.config(), name).map_err(|e| VmsnapError::NoSuchDomain(e.to_string()))
    }

    fn registry(&self) -> Registry {
        Registry::new(&self.config().state_dir)
    }

    /// A configured or registered domain, as every command selects one
    /// ([`crate::daemon::registry::select`]); the error names the known ones (not the config's
    /// path: a caller may be anyone).
    fn domain(&self, name: &str) -> Result<DomainConfig, VmsnapError> {
        match crate::daemon::registry::select(&self.config(), Some(name)) {
            Ok(mut found) => Ok(found.remove(0)),
            Err(crate::config::ConfigError::NoSuchDomain { known, .. }) => {
                Err(VmsnapError::NoSuchDomain(format!("no domain named {name:?} (known: {known})")))
            }
            Err(e) => Err(VmsnapError::NoSuchDomain(e.to_string())),
        }
    }
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
                    m => Some(m.parse::<RamMode>().map_err(|e| bad(format!("option memory: {e}, or \"\" for none")))?),
                }
            }
            "strategy" => o.strategy = string(k, v)?.parse::<Strategy>().map_err(|e| bad(format!("option strategy: {e}")))?,
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

/// A snapshot name argument (the part after the `@`).
fn snapshot_arg(s: &str) -> Result<String, VmsnapError> {
    if crate::zfs::names::valid_component(s) {
        Ok(s.to_owned())
    } else {
        Err(VmsnapError::InvalidArgument(format!("{:?} is not a snapshot name", s.chars().take(80).collect::<String>())))
    }
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
        let _permit = self.read_permit("List").await?;
        let cat = catalog::load(&self.jobs.zfs(), &dom).await.map_err(|e| VmsnapError::Failed(error_chain(&e)))?;
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
        let dom = self.domain(domain)?;
        let report = if dry_run {
            let _permit = self.read_permit("Prune").await?;
            let now = chrono::Utc::now().timestamp();
            crate::retention::prune::prune(&self.config(), &dom, &self.jobs.zfs(), now, true)
                .await
                .map_err(|e| VmsnapError::Failed(error_chain(&e)))?
        } else {
            require_root(conn, &hdr, "Prune").await?;
            let mut job = self.jobs.start(dom, Request::Prune { dry_run: false }, Origin::DBus).map_err(start_error)?;
            match job.outcome().await {
                Outcome::Succeeded(Output::Prune(r)) => *r,
                other => return Err(VmsnapError::Failed(other.result_text())),
            }
        };
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
        // Fail fast when quiescing is required and the running VM's agent does not answer (the
        // engine would refuse the same way, later).
        if opts.quiesce && opts.memory.is_none() && dom.quiesce == crate::config::QuiescePolicy::Require {
            agent_answers(&dom).await?;
        }
        let handle = self.jobs.start(dom, Request::Snapshot(opts), Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
    }

    /// Starts replicating `domain` to `target` ("" for each of its `replicate_to` targets);
    /// returns the job object's path, whose `Transfer` shows the stream in flight. Options:
    /// `dry_run` (b: plan and estimate), `rollback_target` (b: roll a diverged target back to
    /// the snapshot in common, if the target allows it). Root only: it connects with root's key.
    async fn replicate(
        &self,
        domain: &str,
        target: &str,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "Replicate").await?;
        let dom = self.domain(domain)?;
        let mut opts = crate::replicate::Options::default();
        for (k, v) in &options {
            let flag = || bool::try_from(v).map_err(|_| VmsnapError::InvalidArgument(format!("option {k:?} must be a boolean")));
            match k.as_str() {
                "dry_run" => opts.dry_run = flag()?,
                "rollback_target" => opts.rollback_target = flag()?,
                other => return Err(VmsnapError::InvalidArgument(format!("unknown option {other:?} (known: dry_run, rollback_target)"))),
            }
        }
        let targets = if target.is_empty() { Vec::new() } else { vec![target.to_owned()] };
        let handle = self.jobs.start(dom, Request::Replicate { targets, opts }, Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
    }

    /// Starts a restore of a stopped domain to `snapshot` (as `vmsnap restore`); returns the
    /// job's path. Options: `destroy_newer` (b), `resume` (b), `as` (s: a new domain beside
    /// the original; with `resume`, started from the snapshot's RAM), `promote` (b, with `as`), `from` (s: a replication target to bring
    /// the snapshot back from first), `trust_target` (b, with `from`: without this host's
    /// integrity record of the snapshot). A domain vmsnap does not know (a stopped libvirt domain)
    /// is found by its snapshots. Root only; not cancellable once started (it is journaled).
    async fn restore(
        &self,
        domain: &str,
        snapshot: &str,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "Restore").await?;
        let dom = self.known_or_named(domain)?;
        let mut r = RestoreRequest { snapshot: snapshot_arg(snapshot)?, ..RestoreRequest::default() };
        let bad = VmsnapError::InvalidArgument;
        for (k, v) in &options {
            let flag = || bool::try_from(v).map_err(|_| bad(format!("option {k:?} must be a boolean")));
            let text = || {
                String::try_from(v.try_clone().map_err(|e| bad(e.to_string()))?).map_err(|_| bad(format!("option {k:?} must be a string")))
            };
            match k.as_str() {
                "destroy_newer" => r.destroy_newer = flag()?,
                "trust_target" => r.trust_target = flag()?,
                "resume" => r.resume = flag()?,
                "promote" => r.promote = flag()?,
                "as" => {
                    let new = text()?;
                    if !crate::config::valid_domain_name(&new) {
                        return Err(bad(format!("option as: {:?} is not a domain name", new.chars().take(80).collect::<String>())));
                    }
                    r.as_name = Some(new);
                }
                "from" => {
                    let t = text()?;
                    if !self.config().targets.contains_key(&t) {
                        return Err(bad(format!("option from: no target named {:?}", t.chars().take(80).collect::<String>())));
                    }
                    r.from = Some(t);
                }
                other => {
                    return Err(bad(format!("unknown option {other:?} (known: destroy_newer, resume, as, promote, from, trust_target)")));
                }
            }
        }
        if r.as_name.is_some() && r.destroy_newer {
            return Err(bad("option as: not with destroy_newer (the original is left as it is)".into()));
        }
        if r.promote && r.as_name.is_none() {
            return Err(bad("option promote: only with as".into()));
        }
        let handle = self.jobs.start(dom, Request::Restore(r), Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
    }

    /// Starts `vmsnap verify` of one domain (every RAM dump read against its sha256, the
    /// outcome recorded on each snapshot); returns the job's path. Root only.
    async fn verify(
        &self,
        domain: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "Verify").await?;
        let dom = self.known_or_named(domain)?;
        let handle = self.jobs.start(dom, Request::Verify, Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
    }

    /// Starts `vmsnap verify --boot` of one domain: a scratch copy of `snapshot` (the newest when
    /// empty) resumed from its RAM or booted, until its guest agent answers, then removed; the
    /// outcome recorded on the snapshot. Returns the job's path. Root only.
    async fn verify_boot(
        &self,
        domain: &str,
        snapshot: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "VerifyBoot").await?;
        let snapshot = if snapshot.is_empty() { None } else { Some(snapshot_arg(snapshot)?) };
        let dom = self.known_or_named(domain)?;
        let handle = self.jobs.start(dom, Request::VerifyBoot { snapshot }, Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
    }

    /// Mounts a snapshot's file systems read-only at `/mnt/vmsnap/<domain>/<snapshot>` (never a
    /// directory the caller names); returns the job's path (its `Result` lists what is where).
    /// Root only.
    async fn mount(
        &self,
        domain: &str,
        snapshot: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "Mount").await?;
        let dom = self.known_or_named(domain)?;
        let handle = self.jobs.start(dom, Request::Mount { snapshot: snapshot_arg(snapshot)? }, Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
    }

    /// Undoes a `Mount` (or `vmsnap mount`); returns the job's path. Root only.
    async fn umount(
        &self,
        domain: &str,
        snapshot: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmsnapError> {
        require_root(conn, &hdr, "Umount").await?;
        let dom = self.known_or_named(domain)?;
        let handle = self.jobs.start(dom, Request::Umount { snapshot: snapshot_arg(snapshot)? }, Origin::DBus).map_err(start_error)?;
        self.export(handle, &hdr, conn, server).await
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
        let _permit = self.read_permit("Status").await?;
        let st = crate::daemon::status::Status::load(&self.config().state_dir).map_err(|e| VmsnapError::Failed(e.to_string()))?;
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

fn start_error(e: StartError) -> VmsnapError {
    match e {
        StartError::Busy { .. } | StartError::Locked(_) | StartError::ShuttingDown => VmsnapError::Busy(e.to_string()),
        StartError::Refused(m) => VmsnapError::InvalidArgument(m),
    }
}

/// Connects to `bus`, exports the agent over `jobs` and takes the bus name; every snapshot any
/// job takes (scheduled ones too) is announced as `SnapshotTaken`. Keep the connection alive.
pub async fn serve(bus: &Bus, jobs: Jobs) -> zbus::Result<zbus::Connection> {
    let builder = match bus {
        Bus::System => zbus::connection::Builder::system()?,
        Bus::Session => zbus::connection::Builder::session()?,
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    let mut events = jobs.subscribe();
    let conn = builder.name(BUS_NAME)?.serve_at(PATH, Agent::new(jobs))?.build().await?;
    let announcer = conn.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(JobEvent::SnapshotTaken { domain, snapshot, consistency, .. }) => {
                    if let Ok(iface) = announcer.object_server().interface::<_, Agent>(PATH).await {
                        let _ = Agent::snapshot_taken(iface.signal_emitter(), &domain, &snapshot, &consistency).await;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!("D-Bus signals: {n} job events missed"),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    Ok(conn)
}
