//! One snapshot of one domain, as steps.
//!
//! Running VM, overlay strategy (the default):
//! 1. ask QEMU for the disks, map them to datasets, copy the domain XML and nvram next to them;
//! 2. connect to the guest agent (a missing agent refuses here, VM untouched, if quiescing is required);
//! 3. create an overlay file per disk, open it, hand QEMU the fd (`add-fd`) and `blockdev-add` it;
//! 4. freeze the guest → one `transaction` switches every disk onto its overlay → thaw;
//! 5. one `zfs snapshot` per pool of every dataset under the disks, with vmsnap's properties;
//! 6. active-commit each overlay back, delete its nodes, its fdset and its file.
//!
//! With RAM (`--memory`), the disks switch in the pause that fixes the RAM image: at the end of a
//! precopy dump, or (background) before QEMU streams the RAM while the guest runs; then the
//! `zfs snapshot` and the merge do not wait for the dump, and the snapshot is labelled `ram` with
//! its dump (one `zfs set`) once the dump is complete and synced.
//!
//! Direct strategy: freeze (or, without an agent, pause) → `zfs snapshot` → thaw (or resume).
//! Stopped VM: XML and nvram copied next to the disks, then `zfs snapshot` of the configured disks'
//! datasets.
//!
//! Every step that changes the VM is journaled before it is done. On any error the engine replays
//! its own journal through [`super::recover`], so the guest is thawed, a VM it paused is resumed
//! and no overlay stays behind; after a crash `vmsnap recover` does the same from the file.

use super::disks::{datasets_by_pool, live_disks, LiveDisk};
use super::journal::{self, create_private_dir, Journal, OverlayRecord, Record};
use super::lock::DomainLock;
use super::naming;
use super::ram::PauseMarks;
use super::recover::{self, fdset_tag};
use super::{ram, ramstream, saveimage, Consistency, EngineError, RamMode, SnapshotOptions, SnapshotReport, StepError, Strategy};
use crate::config::{Config, DomainConfig, QuiescePolicy};
use crate::model::prop;
use crate::qemu::block::{file_node, qcow2_overlay_node};
use crate::qemu::process::{holders_of, ProcessId};
use crate::qemu::qga::{Qga, Timeouts};
use crate::qemu::qmp::{Qmp, QmpError};
use crate::zfs::{Dataset, DatasetKind, PropName, SnapshotName, Zfs};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Progress callback: called with a short description as each step starts.
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// Takes one snapshot of `dom`.
///
/// # Errors
/// [`EngineError::Busy`] when another operation holds the domain; [`EngineError::Step`] naming
/// the step that failed (after everything it had changed was undone);
/// [`EngineError::CleanupFailed`] when undoing failed too (the journal stays for `vmsnap recover`).
pub async fn snapshot(
    cfg: &Config,
    dom: &DomainConfig,
    opts: &SnapshotOptions,
    zfs: &Zfs,
    progress: Progress<'_>,
) -> Result<SnapshotReport, EngineError> {
    let fail = |step: &'static str, source: StepError| EngineError::Step { domain: dom.name.clone(), step, source: Box::new(source) };
    // Every name vmsnap makes carries the label: check it before anything is touched.
    naming::check_label(&opts.label).map_err(|why| fail("check arguments", StepError::Refused(why)))?;
    let _lock = DomainLock::acquire(&cfg.state_dir, &dom.name)?;
    // A journal left by an earlier crash of this domain is settled first.
    let leftover = Journal::path_of(&cfg.state_dir, &dom.name);
    if leftover.exists() {
        progress("recovering an interrupted earlier operation");
        recover::recover_journal(&leftover, recover::Places::of(cfg), zfs)
            .await
            .map_err(|e| fail("recover", StepError::Recover(Box::new(e))))?;
    }
    let name = naming::snapshot_name(opts.name_at.unwrap_or_else(SystemTime::now), &opts.label);
    let qmp = match Qmp::connect(&dom.qmp, Duration::from_secs(5)).await {
        Ok(q) => q,
        // Stopped only when nothing listens: no socket (QEMU removes it when it exits), or a
        // socket nobody accepts on (QEMU died without removing it: the disks are
        // crash-consistent). Any other error (permissions, a full backlog) is an error.
        Err(QmpError::Connect { source, .. }) if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            let down = if source.kind() == ErrorKind::NotFound { Down::ShutDown } else { Down::Crashed };
            let mut report = offline(dom, opts, zfs, name, down, progress).await.map_err(|(s, e)| fail(s, e))?;
            record_integrity(cfg, zfs, &mut report).await;
            return Ok(report);
        }
        Err(e) => return Err(fail("connect to QMP", e.into())),
    };
    // Read before anything changes; the journal exists from here on, and so does the Run.
    let t = Instant::now();
    let mut prepared = prepare(&qmp, zfs, dom, progress).await.map_err(|(s, e)| fail(s, e))?;
    let prepare_ms = ms(t.elapsed());
    let journal = Journal::create(
        &cfg.state_dir,
        &dom.name,
        Record::Begin {
            format: journal::FORMAT,
            domain: dom.name.clone(),
            qmp: dom.qmp.clone(),
            qga: dom.qga.clone(),
            snapshot: name.clone(),
            pid: std::process::id(),
            qemu: qmp.peer_pid().and_then(ProcessId::of),
        },
    )
    .map_err(|e| fail("journal", e.into()))?;
    let mut run = Run {
        cfg,
        dom,
        opts,
        zfs,
        qmp,
        qga: None,
        name,
        journal,
        machine: None,
        ram_quiesced: false,
        cpu: None,
        ram_bytes: None,
        ram_format: saveimage::FORMAT_STREAM,
        was_running: false,
        report: SnapshotReport {
            domain: dom.name.clone(),
            name: String::new(),
            snapshots: Vec::new(),
            consistency: Consistency::Crash,
            strategy: opts.strategy.to_string(),
            freeze_ms: None,
            pause_ms: None,
            ram_dump: None,
            ram_sha256: None,
            ram_file_bytes: None,
            ram_compress: None,
            pause_phases: Vec::new(),
            warnings: std::mem::take(&mut prepared.warnings),
            steps: vec![("prepare".to_owned(), prepare_ms)],
        },
        progress,
    };
    run.report.name = run.name.clone();
    match run.steps(&prepared).await {
        Ok(()) => {
            let t = Instant::now();
            let mut journal = run.journal;
            journal.append(Record::End).map_err(|e| fail("finish", e.into()))?;
            journal.remove().map_err(|e| fail("finish", e.into()))?;
            let mut report = run.report;
            report.steps.push(("finish".to_owned(), ms(t.elapsed())));
            record_integrity(cfg, zfs, &mut report).await;
            Ok(report)
        }
        Err((step, source)) => Err(run.undo(step, source).await),
    }
}

/// What a snapshot reads before it changes anything (and before its journal exists).
struct Prepared {
    disks: Vec<LiveDisk>,
    by_pool: BTreeMap<String, Vec<Dataset>>,
    /// The VM ran (it was not paused).
    running: bool,
    warnings: Vec<String>,
}

/// The VM's disks and their datasets, the domain's XML and nvram saved beside them, and
/// whether the VM runs.
async fn prepare(qmp: &Qmp, zfs: &Zfs, dom: &DomainConfig, progress: Progress<'_>) -> StepResult<Prepared> {
    progress("querying disks");
    let disks = live_disks(qmp).await.at("query disks")?;
    if disks.is_empty() {
        return Err(("query disks", StepError::Refused("the VM has no writable disk".into())));
    }
    let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
    let by_pool = datasets_by_pool(zfs, &paths).await.at("resolve datasets")?;
    let warnings = save_domain_files(zfs, dom, &by_pool).await.at("save XML and nvram")?.into_iter().collect();
    let running = qmp.execute(&qapi::qmp::query_status {}).await.at("query status")?.running;
    Ok(Prepared { disks, by_pool, running, warnings })
}

type StepResult<T = ()> = Result<T, (&'static str, StepError)>;

trait At<T> {
    fn at(self, step: &'static str) -> StepResult<T>;
}

impl<T, E: Into<StepError>> At<T> for Result<T, E> {
    fn at(self, step: &'static str) -> StepResult<T> {
        self.map_err(|e| (step, e.into()))
    }
}

struct Run<'a> {
    cfg: &'a Config,
    dom: &'a DomainConfig,
    opts: &'a SnapshotOptions,
    zfs: &'a Zfs,
    qmp: Qmp,
    qga: Option<Qga>,
    name: String,
    /// Created before the first step that changes anything; every such step is recorded in it.
    journal: Journal,
    /// QEMU's machine type, recorded with a RAM dump.
    machine: Option<String>,
    /// The RAM snapshot's disks were captured with the guest frozen.
    ram_quiesced: bool,
    cpu: Option<String>,
    ram_bytes: Option<u64>,
    /// How the RAM dump is stored ([`saveimage::FORMAT_LIBVIRT`] or a bare stream).
    ram_format: &'static str,
    /// The VM ran when the snapshot began (a VM paused by an I/O error later is resumed).
    was_running: bool,
    report: SnapshotReport,
    progress: Progress<'a>,
}

impl Run<'_> {
    async fn steps(&mut self, prepared: &Prepared) -> StepResult {
        let Prepared { disks, by_pool, running, .. } = prepared;
        let (by_pool, running) = (by_pool, *running);
        let t = Instant::now();
        self.was_running = running;
        if self.opts.memory.is_some() && !running {
            return Err(("save RAM", StepError::Refused("the VM is paused; vmsnap saves the RAM of running VMs".into())));
        }
        if self.opts.quiesce && running && self.opts.memory.is_none() {
            self.connect_agent().await?;
        } else if self.opts.quiesce && running && self.dom.policy.ram_quiesce && self.dom.qga.is_some() {
            // With RAM the snapshot is resumable as it stands; the freeze (ram_quiesce) keeps its
            // disks app-consistent for when the dump is gone. Without an answer it goes on.
            self.connect_agent_for_ram().await;
        } else if self.opts.quiesce && !running {
            self.report.warnings.push("the VM is paused: no freeze, crash-consistent".into());
        }
        self.timed("journal and agent", t);

        let overlays = match self.opts.strategy {
            Strategy::Overlay => self.create_overlays(disks).await?,
            Strategy::Direct => Vec::new(),
        };
        let consistency = match self.opts.memory {
            Some(mode) => self.with_ram(mode, &overlays, by_pool).await?,
            None => self.disk_only(running, &overlays, by_pool).await?,
        };
        if self.opts.strategy == Strategy::Overlay && !self.snapshot_taken() {
            self.zfs_snapshot(by_pool, consistency).await?;
            self.merge(&overlays).await?;
        }
        Ok(())
    }

    /// Freeze (or, for `direct` without an agent, pause) → capture the disks → thaw (resume).
    async fn disk_only(
        &mut self,
        running: bool,
        overlays: &[OverlayRecord],
        by_pool: &BTreeMap<String, Vec<Dataset>>,
    ) -> StepResult<Consistency> {
        let window = Instant::now();
        let frozen = self.freeze().await?;
        let consistency = if frozen { Consistency::App } else { Consistency::Crash };
        let paused = !frozen && self.opts.strategy == Strategy::Direct && running;
        let pause = Instant::now();
        if paused {
            // Without a freeze, pausing makes QEMU drain and flush every disk, so the image files
            // are consistent on the host while ZFS snapshots them.
            self.record(Record::PauseStarted).await?;
            self.qmp.execute(&qapi::qmp::stop {}).await.at("pause")?;
        }
        self.capture_disks(overlays, by_pool, consistency).await?;
        if paused {
            self.qmp.execute(&qapi::qmp::cont {}).await.at("resume")?;
            self.record(Record::Resumed).await?;
            self.report.pause_ms = Some(ms(pause.elapsed()));
        }
        if frozen {
            let t = Instant::now();
            self.thaw().await?;
            self.timed("thaw", t);
            self.report.freeze_ms = Some(ms(window.elapsed()));
        }
        self.timed(if frozen { "frozen window" } else { "window" }, window);
        if self.opts.strategy == Strategy::Direct {
            // The snapshot was taken inside the window, before its length was known.
            let mut props = BTreeMap::new();
            if let Some(f) = self.report.freeze_ms {
                props.insert(prop::FREEZE_MS, format!("{f:.1}"));
            }
            if let Some(p) = self.report.pause_ms {
                props.insert(prop::PAUSE_MS, format!("{p:.1}"));
            }
            if !props.is_empty() {
                self.label_snapshots(&props).await.at("record the window")?;
            }
        }
        Ok(consistency)
    }

    /// The disks at this instant: onto their overlays, or (direct) straight into ZFS.
    async fn capture_disks(
        &mut self,
        overlays: &[OverlayRecord],
        by_pool: &BTreeMap<String, Vec<Dataset>>,
        consistency: Consistency,
    ) -> StepResult {
        let t = Instant::now();
        match self.opts.strategy {
            Strategy::Overlay => self.switch(overlays).await?,
            Strategy::Direct => self.zfs_snapshot(by_pool, consistency).await?,
        }
        self.timed(if self.opts.strategy == Strategy::Overlay { "switch" } else { "zfs snapshot (in window)" }, t);
        Ok(())
    }

    /// Saves the RAM with the disks captured at the same instant.
    async fn with_ram(
        &mut self,
        mode: RamMode,
        overlays: &[OverlayRecord],
        by_pool: &BTreeMap<String, Vec<Dataset>>,
    ) -> StepResult<Consistency> {
        let t = Instant::now();
        ram::check(&self.qmp).await.at("prepare RAM dump")?;
        let previous = ram::current_capabilities(&self.qmp).await.at("prepare RAM dump")?;
        // The dump's bandwidth (policy `ram_bandwidth`): the previous one is journaled with the
        // capabilities and put back with them.
        let bandwidth = match self.dom.policy.ram_bandwidth.bytes() {
            Some(new) => Some((ram::current_bandwidth(&self.qmp).await.at("prepare RAM dump")?, new)),
            None => None,
        };
        self.record(Record::CapabilitiesSet { previous: previous.clone(), max_bandwidth: bandwidth.map(|(old, _)| old) }).await?;
        let (mode, fallback) = ram::set_mode(&self.qmp, mode).await.at("prepare RAM dump")?;
        if let Some((_, new)) = bandwidth {
            ram::set_bandwidth(&self.qmp, new).await.at("prepare RAM dump")?;
        }
        if let Some(why) = fallback {
            tracing::warn!(domain = %self.dom.name, "{why}");
            self.report.warnings.push(why);
        }
        self.machine = Some(ram::machine_type(&self.qmp).await.at("prepare RAM dump")?);
        // What a resume must match (engine::resumable checks it before one starts).
        self.cpu = super::resumable::cpu_type(&self.qmp).await.at("prepare RAM dump")?;
        self.ram_bytes = super::resumable::ram_bytes(&self.qmp).await.at("prepare RAM dump")?;
        let path = ram::dump_path(&self.cfg.ram_dir, &self.dom.name, &self.name);
        // Journaled before the file exists, so a crash in between deletes what was made.
        self.record(Record::RamDumpStarted { path: path.clone() }).await?;
        let drain = self.start_drain(&path, mode).await?;
        let mut events = self.qmp.subscribe().at("save RAM")?;
        let mut pauses = self.qmp.subscribe().at("save RAM")?;
        let mut marks = PauseMarks::default();
        self.timed("prepare RAM dump", t);
        let window = Instant::now();
        let frozen;
        // "save RAM" is the dump itself: from `migrate` until the file is synced and hashed.
        let dump_started;
        match mode {
            RamMode::Precopy => {
                // Frozen for the whole dump: precopy pauses the VM only at its own end.
                frozen = self.freeze_for_ram().await?;
                (self.progress)("saving RAM (precopy; the VM pauses at the end)");
                self.record(Record::PauseStarted).await?;
                self.record(Record::MigrationStarted).await?;
                dump_started = Instant::now();
                ram::migrate(&self.qmp).await.at("save RAM")?;
                self.wait_dump(&mut events, &drain).await?;
                ram::wait_postmigrate(&self.qmp, Duration::from_secs(30)).await.at("save RAM")?;
                marks.mark("paused (postmigrate)");
                self.capture_disks_paused(overlays, by_pool, &mut marks).await?;
                marks.mark("cont sent");
                self.qmp.execute(&qapi::qmp::cont {}).await.at("resume")?;
                self.record(Record::Resumed).await?;
                if self.opts.strategy == Strategy::Overlay {
                    self.record(Record::Switched).await?;
                }
                self.record(Record::MigrationDone).await?;
                self.thaw_after_ram(frozen, window).await?;
            }
            RamMode::Background => {
                frozen = self.freeze_for_ram().await?;
                // Intents, journaled before the pause so no fsync is inside it: recovery checks
                // each in QEMU (is it paused, is the overlay in the chain, does a migration run).
                self.record(Record::PauseStarted).await?;
                if self.opts.strategy == Strategy::Overlay {
                    self.record(Record::SwitchStarted).await?;
                }
                self.record(Record::MigrationStarted).await?;
                marks.mark("stop sent");
                self.qmp.execute(&qapi::qmp::stop {}).await.at("pause")?;
                self.capture_disks_paused(overlays, by_pool, &mut marks).await?;
                dump_started = Instant::now();
                ram::migrate(&self.qmp).await.at("save RAM")?;
                marks.mark("migrate accepted");
                ram::wait_saving_started(&self.qmp, Duration::from_secs(60)).await.at("save RAM")?;
                marks.mark("device state saved");
                self.qmp.execute(&qapi::qmp::cont {}).await.at("resume")?;
                marks.mark("cont answered");
                self.record(Record::Resumed).await?;
                if self.opts.strategy == Strategy::Overlay {
                    self.record(Record::Switched).await?;
                }
                self.thaw_after_ram(frozen, window).await?;
                (self.progress)("saving RAM (background; the VM runs)");
                if self.opts.strategy == Strategy::Overlay {
                    // The disks were captured in the pause and the guest now writes into the
                    // overlays: the ZFS snapshot and the merge need not wait for the dump, so an
                    // overlay lives seconds rather than as long as the RAM takes to save.
                    let disks = if frozen { Consistency::App } else { Consistency::Crash };
                    self.zfs_snapshot(by_pool, disks).await?;
                    self.merge(overlays).await?;
                }
                self.wait_dump(&mut events, &drain).await?;
                self.record(Record::MigrationDone).await?;
            }
        }
        let streamed = Instant::now();
        ram::restore_capabilities(&self.qmp, &previous).await.at("save RAM")?;
        if let Some((old, _)) = bandwidth {
            ram::set_bandwidth(&self.qmp, old).await.at("save RAM")?;
        }
        self.record(Record::CapabilitiesReset).await?;
        let drained = self.finish_drain(drain, &path).await?;
        if self.ram_format == saveimage::FORMAT_LIBVIRT {
            // The stream is whole and synced: only now does the image say so.
            let file = drained.file;
            tokio::task::spawn_blocking(move || saveimage::finish(&file))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|source| StepError::Io { what: format!("completing the save image {}", path.display()), source })
                .at("save RAM")?;
        }
        self.timed("finish RAM dump", streamed);
        self.timed("save RAM", dump_started);
        let paused = ram::pauses(&mut pauses).await;
        self.report.pause_ms = paused.ms();
        self.report.pause_phases = marks.phases(&paused);
        // The checksum was taken as the bytes went by: no second read of the dump.
        self.record(Record::RamDumpDone { path: path.clone(), sha256: drained.sha256.clone() }).await?;
        self.report.ram_dump = Some(path);
        self.report.ram_sha256 = Some(drained.sha256);
        self.report.ram_file_bytes = Some(drained.file_bytes);
        self.report.ram_compress = Some(self.dom.policy.ram_compress);
        if self.snapshot_taken() {
            // The snapshots were taken (labelled by their disks alone) before the dump was
            // complete: one `zfs set` per snapshot makes each a `ram` snapshot with its dump.
            let mut props = self.ram_properties();
            props.insert(prop::CONSISTENCY, Consistency::Ram.as_str().into());
            self.label_snapshots(&props).await.at("record RAM dump")?;
            self.record(Record::RamLabelled).await?;
            self.report.consistency = Consistency::Ram;
        }
        Ok(Consistency::Ram)
    }

    /// Creates the dump file (a save image's header first, for a domain with an XML), starts the
    /// drain that writes QEMU's stream into it (or hashes it behind QEMU), and hands QEMU its
    /// descriptor (before any pause).
    ///
    /// A raw background dump is written by QEMU itself and hashed behind it where that is the
    /// fastest way (not on OpenZFS: [`ramstream::qemu_writes_well_into`]), and safe, since a
    /// background migration that finishes after vmsnap died leaves the VM running.
    /// Precopy goes through the pipe: if vmsnap dies, QEMU's writes fail and the migration ends
    /// instead of completing into a VM paused in `postmigrate` that nobody resumes. zstd goes
    /// through the pipe too (vmsnap compresses).
    async fn start_drain(&mut self, path: &Path, mode: RamMode) -> StepResult<ramstream::Drain> {
        let mut file = ram::create_dump(path).at("create RAM dump")?;
        let compress = self.dom.policy.ram_compress;
        // A domain with an XML gets a libvirt save image (`virsh restore` opens it); the header
        // goes first and QEMU's stream follows it.
        let prefix = match &self.dom.xml {
            Some(xml_path) => {
                let xml = crate::fsutil::read_limited(xml_path, 16 << 20)
                    .map_err(|e| StepError::Refused(format!("reading the domain XML for the save image: {e}")))
                    .at("create RAM dump")?;
                let xml = String::from_utf8(xml)
                    .map_err(|_| StepError::Refused(format!("{} is not UTF-8", xml_path.display())))
                    .at("create RAM dump")?;
                self.ram_format = saveimage::FORMAT_LIBVIRT;
                saveimage::write_start(&mut file, &xml, true, compress)
                    .map_err(|source| StepError::Io { what: format!("writing the save image header of {}", path.display()), source })
                    .at("create RAM dump")?
            }
            None => Vec::new(),
        };
        let behind_qemu =
            mode == RamMode::Background && compress == crate::model::RamCompress::None && ramstream::qemu_writes_well_into(&file);
        let started = if behind_qemu {
            ramstream::follow(file, prefix)
        } else {
            ramstream::drain_into(file, prefix, compress, self.dom.policy.ram_compress_level)
        };
        let (qemu_end, drain) = started
            .map_err(|source| StepError::Io { what: format!("starting the RAM dump's writer for {}", path.display()), source })
            .at("create RAM dump")?;
        // QEMU keeps its own copy; ours goes, so a pipe's drain ends when QEMU closes its end.
        ram::pass_fd(&self.qmp, qemu_end.as_fd()).await.at("prepare RAM dump")?;
        drop(qemu_end);
        Ok(drain)
    }

    /// Waits until the drain has the whole stream in the file, synced and hashed (QEMU closed the
    /// pipe when the migration ended; a hasher behind QEMU catches up with the file's end). Fails
    /// when it moves no byte for 120 s.
    async fn finish_drain(&mut self, drain: ramstream::Drain, path: &Path) -> StepResult<ramstream::Drained> {
        const STALL: Duration = Duration::from_secs(120);
        let mut last = (drain.received(), Instant::now());
        let received = {
            let counter = drain.counter();
            move || counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        let finish = drain.finish();
        tokio::pin!(finish);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = &mut finish => {
                    return r
                        .map_err(|source| StepError::Io { what: format!("writing the RAM dump {}", path.display()), source })
                        .at("save RAM");
                }
                _ = tick.tick() => {
                    let now = received();
                    if now != last.0 {
                        last = (now, Instant::now());
                    } else if last.1.elapsed() > STALL {
                        return Err(StepError::Refused(format!(
                            "the RAM dump's writer moved no byte for {} s after the migration ended ({} MiB in)",
                            STALL.as_secs(),
                            now >> 20
                        )))
                        .at("save RAM");
                    }
                }
            }
        }
    }

    /// Waits for the migration to complete, showing how much of the RAM the drain has written.
    async fn wait_dump(&mut self, events: &mut crate::qemu::qmp::EventStream, drain: &ramstream::Drain) -> StepResult {
        let t = Instant::now();
        let done = ram::wait_completed(&self.qmp, events, RAM_TIMEOUT);
        tokio::pin!(done);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut done => return r.at("save RAM"),
                _ = tick.tick() => {
                    let n = drain.received();
                    let rate = n as f64 / t.elapsed().as_secs_f64().max(1e-3) / 1048576.0;
                    (self.progress)(&format!("saving RAM: {} MiB at {rate:.0} MiB/s", n >> 20));
                }
            }
        }
    }

    /// The disks captured while the VM is paused: the overlay switch alone (its records are
    /// written around the pause), or (direct) the zfs snapshot with its own records.
    async fn capture_disks_paused(
        &mut self,
        overlays: &[OverlayRecord],
        by_pool: &BTreeMap<String, Vec<Dataset>>,
        marks: &mut PauseMarks,
    ) -> StepResult {
        let t = Instant::now();
        match self.opts.strategy {
            Strategy::Overlay => {
                if !self.journal_has_switch_intent() {
                    self.record(Record::SwitchStarted).await?;
                }
                let pairs: Vec<(String, String)> = overlays.iter().map(|o| (o.disk_node.clone(), o.overlay_node.clone())).collect();
                self.qmp.snapshot_transaction(&pairs).await.at("switch to overlays")?;
                marks.mark("disks switched");
            }
            Strategy::Direct => {
                self.zfs_snapshot(by_pool, Consistency::Ram).await?;
                marks.mark("zfs snapshot taken");
            }
        }
        self.timed(if self.opts.strategy == Strategy::Overlay { "switch" } else { "zfs snapshot (in window)" }, t);
        Ok(())
    }

    fn journal_has_switch_intent(&self) -> bool {
        self.journal.records().iter().any(|r| matches!(r, Record::SwitchStarted))
    }

    /// Sets `props` on each snapshot taken, in one `zfs set` each (direct strategy: the
    /// snapshot was taken before these were known).
    async fn label_snapshots(&self, props: &BTreeMap<PropName, String>) -> Result<(), crate::zfs::ZfsError> {
        for snap in &self.report.snapshots {
            self.zfs.set_properties(snap, props).await?;
        }
        Ok(())
    }

    /// The ZFS snapshot exists (a RAM snapshot's may be taken before its dump is complete).
    fn snapshot_taken(&self) -> bool {
        !self.report.snapshots.is_empty()
    }

    fn timed(&mut self, step: &str, since: Instant) {
        self.report.steps.push((step.to_owned(), ms(since.elapsed())));
    }

    async fn record(&mut self, r: Record) -> StepResult {
        let step = r.name();
        self.journal.append(r).at(step)
    }

    /// Connects to the guest agent. A missing agent refuses the snapshot when quiescing is
    /// required; otherwise the snapshot goes on crash-consistent.
    async fn connect_agent(&mut self) -> StepResult {
        let attempt = match &self.dom.qga {
            None => Err("the domain has no guest-agent socket configured".to_owned()),
            Some(path) => match Qga::connect(path, Timeouts::default()).await {
                Ok(mut qga) => match qga.ping().await {
                    Ok(()) => Ok(qga),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            },
        };
        match (attempt, self.dom.quiesce) {
            (Ok(qga), _) => self.qga = Some(qga),
            (Err(why), QuiescePolicy::Require) => {
                return Err((
                    "connect to guest agent",
                    StepError::Refused(format!("require_quiesce is set and the guest agent is unavailable: {why}")),
                ))
            }
            (Err(why), QuiescePolicy::BestEffort) => self.report.warnings.push(format!("no freeze, crash-consistent: {why}")),
        }
        Ok(())
    }

    /// The agent for a RAM snapshot's freeze: when it does not answer, the snapshot goes on
    /// (its RAM is what makes it resumable) and says its disks alone are crash-consistent.
    async fn connect_agent_for_ram(&mut self) {
        let Some(path) = &self.dom.qga else { return };
        let attempt = match Qga::connect(path, Timeouts::default()).await {
            Ok(mut qga) => qga.ping().await.map(|()| qga).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(qga) => self.qga = Some(qga),
            Err(why) => self.report.warnings.push(format!("no freeze with the RAM: the disks alone are crash-consistent ({why})")),
        }
    }

    /// Creates, opens and adds one overlay per disk (before the freeze, to keep it short).
    async fn create_overlays(&mut self, disks: &[LiveDisk]) -> StepResult<Vec<OverlayRecord>> {
        (self.progress)("creating overlays");
        let t = Instant::now();
        let dir = self.cfg.overlay_dir.join(&self.dom.name);
        create_private_dir(&dir)
            .map_err(|source| StepError::Io { what: format!("creating {}", dir.display()), source })
            .at("create overlays")?;
        let overlays: Vec<OverlayRecord> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| OverlayRecord {
                disk_node: d.node.clone(),
                overlay_node: format!("vmsnap-ov{i}"),
                file_node: format!("vmsnap-ov{i}-f"),
                path: dir.join(format!("{}-{i}.qcow2", self.name)),
                fdset_id: None,
                job_id: format!("vmsnap-commit{i}"),
                base: Some(d.path.clone()),
                base_format: Some(d.format.clone()),
            })
            .collect();
        // Journaled before any file exists, so a crash in the middle removes what was made.
        self.record(Record::OverlaysCreated { overlays: overlays.clone() }).await?;
        for (ov, disk) in overlays.iter().zip(disks) {
            make_overlay_file(&ov.path, disk).await.at("create overlays")?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(&ov.path)
                .map_err(|source| StepError::Io { what: format!("opening {}", ov.path.display()), source })
                .at("create overlays")?;
            let set = self.qmp.add_fd(None, &fdset_tag(&ov.overlay_node), file.as_fd()).await.at("create overlays")?;
            drop(file);
            self.qmp.blockdev_add(file_node(&ov.file_node, &set.path())).await.at("create overlays")?;
            self.qmp.blockdev_add(qcow2_overlay_node(&ov.overlay_node, &ov.file_node)).await.at("create overlays")?;
        }
        self.timed("create overlays", t);
        Ok(overlays)
    }

    /// Freezes the guest if there is an agent. False when the snapshot goes on unfrozen.
    async fn freeze(&mut self) -> StepResult<bool> {
        if self.qga.is_none() {
            return Ok(false);
        }
        (self.progress)("freezing the guest");
        self.record(Record::FreezeStarted).await?;
        let t = Instant::now();
        let qga = self.qga.as_mut().expect("checked");
        match qga.freeze_within(self.cfg.freeze_timeout).await {
            Ok(_) => {
                self.timed("freeze", t);
                Ok(true)
            }
            Err(e) => {
                // The freeze may have happened, or may still be running in the guest, and this
                // connection is out of step: drop it, thaw on a fresh one (the agent finishes
                // the freeze first), and journal Thawed only once the agent says so. If that
                // fails the obligation stays and the undo (or `vmsnap recover`) tries again.
                self.qga = None;
                let n = recover::thaw(self.dom.qga.as_deref().expect("an agent was connected"))
                    .await
                    .map_err(|why| StepError::Refused(format!("{e}; then the thaw failed: {why}")))
                    .at("thaw after a failed freeze")?;
                tracing::info!(domain = %self.dom.name, "freeze failed ({e}); thawed {n} filesystems");
                self.record(Record::Thawed).await?;
                match self.dom.quiesce {
                    QuiescePolicy::Require => Err(("freeze", e.into())),
                    QuiescePolicy::BestEffort => {
                        self.report.warnings.push(format!("freeze failed, crash-consistent: {e}"));
                        Ok(false)
                    }
                }
            }
        }
    }

    /// The freeze of a RAM snapshot (ram_quiesce), when the agent is there.
    async fn freeze_for_ram(&mut self) -> StepResult<bool> {
        let frozen = self.freeze().await?;
        self.ram_quiesced = frozen;
        Ok(frozen)
    }

    async fn thaw_after_ram(&mut self, frozen: bool, window: Instant) -> StepResult {
        if frozen {
            let t = Instant::now();
            self.thaw().await?;
            self.timed("thaw", t);
            self.report.freeze_ms = Some(ms(window.elapsed()));
        }
        Ok(())
    }

    async fn thaw(&mut self) -> StepResult {
        let qga = self.qga.as_mut().expect("frozen through this agent");
        qga.thaw().await.at("thaw")?;
        self.record(Record::Thawed).await
    }

    /// One transaction: every disk onto its overlay at the same instant.
    async fn switch(&mut self, overlays: &[OverlayRecord]) -> StepResult {
        self.record(Record::SwitchStarted).await?;
        let pairs: Vec<(String, String)> = overlays.iter().map(|o| (o.disk_node.clone(), o.overlay_node.clone())).collect();
        self.qmp.snapshot_transaction(&pairs).await.at("switch to overlays")?;
        self.record(Record::Switched).await
    }

    /// One `zfs snapshot` per pool.
    async fn zfs_snapshot(&mut self, by_pool: &BTreeMap<String, Vec<Dataset>>, consistency: Consistency) -> StepResult {
        (self.progress)("taking the zfs snapshot");
        let t = Instant::now();
        // Direct + RAM: the dump is not complete yet, so the snapshot starts crash-consistent
        // and becomes `ram` in one `zfs set` once the dump is (see `with_ram`).
        let label =
            if consistency == Consistency::Ram && self.opts.strategy == Strategy::Direct { Consistency::Crash } else { consistency };
        self.report.consistency = label;
        let props = self.properties(label);
        let intended: Vec<String> = by_pool.values().flatten().map(|d| format!("{d}@{}", self.name)).collect();
        self.record(Record::ZfsSnapshotStarted { names: intended }).await?;
        // Inside the frozen or paused window (direct) a hung `zfs` must not keep the guest
        // stopped: past the deadline the call is killed, and the undo thaws/resumes first.
        let deadline = if self.opts.strategy == Strategy::Direct { self.cfg.window_timeout } else { Duration::from_secs(3600) };
        let mut names = Vec::new();
        for datasets in by_pool.values() {
            let made = tokio::time::timeout(deadline, self.zfs.snapshot(datasets, &self.name, &props))
                .await
                .map_err(|_| StepError::Refused(format!("zfs snapshot did not finish within {deadline:?} (window_timeout)")))
                .at("zfs snapshot")?
                .at("zfs snapshot")?;
            names.extend(made.into_iter().map(|n| n.to_string()));
        }
        self.report.snapshots = names.clone();
        self.timed("zfs snapshot", t);
        self.record(Record::ZfsSnapshotDone { names }).await
    }

    fn properties(&self, consistency: Consistency) -> BTreeMap<PropName, String> {
        let mut p = BTreeMap::new();
        let mut set = |k: PropName, v: String| {
            p.insert(k, v);
        };
        set(prop::CONSISTENCY, consistency.as_str().into());
        set(prop::VERSION, env!("CARGO_PKG_VERSION").into());
        set(prop::DOMAIN, self.dom.name.clone());
        set(prop::QEMU_VERSION, self.qmp.version().to_string());
        if !self.opts.periods.is_empty() {
            set(prop::PERIODS, periods_value(&self.opts.periods));
        }
        if let Some(f) = self.report.freeze_ms {
            set(prop::FREEZE_MS, format!("{f:.1}"));
        }
        p.extend(self.ram_properties());
        p
    }

    /// What a resume needs to know, once the dump exists.
    fn ram_properties(&self) -> BTreeMap<PropName, String> {
        let mut p = BTreeMap::new();
        let mut set = |k: PropName, v: String| {
            p.insert(k, v);
        };
        if let (Some(path), Some(sum)) = (&self.report.ram_dump, &self.report.ram_sha256) {
            set(prop::RAM_DUMP, path.display().to_string());
            set(prop::RAM_SHA256, sum.clone());
        }
        if self.report.ram_dump.is_some() {
            set(prop::RAM_FORMAT, self.ram_format.into());
            set(prop::RAM_COMPRESS, self.dom.policy.ram_compress.as_str().into());
            if let Some(n) = self.report.ram_file_bytes {
                set(prop::RAM_SIZE, n.to_string());
            }
            // Disks alone: app-consistent when the guest was frozen around the pause.
            set(prop::RAM_QUIESCED, if self.ram_quiesced { "yes" } else { "no" }.into());
        }
        if let Some(m) = &self.machine {
            set(prop::MACHINE, m.clone());
        }
        if let Some(c) = &self.cpu {
            set(prop::CPU, c.clone());
        }
        if let Some(n) = self.ram_bytes {
            set(prop::RAM_BYTES, n.to_string());
        }
        if let Some(ms) = self.report.pause_ms {
            set(prop::PAUSE_MS, format!("{ms:.1}"));
        }
        p
    }

    /// Commits every overlay back and removes it.
    async fn merge(&mut self, overlays: &[OverlayRecord]) -> StepResult {
        (self.progress)("merging overlays back");
        let t = Instant::now();
        for ov in overlays {
            recover::merge_overlay(&self.qmp, ov, &mut self.journal).await.map_err(StepError::Refused).at("merge overlays")?;
        }
        // A full overlay directory stops the VM with an I/O error; its requests are retried on
        // the base now that the overlay is merged.
        if self.was_running && recover::resume_after_io_error(&self.qmp).await.at("merge overlays")? {
            let w = "the VM stopped on an I/O error writing its overlay (is overlay_dir full?); resumed it once the overlay was merged";
            tracing::warn!(domain = %self.dom.name, "{w}");
            self.report.warnings.push(w.into());
        }
        self.timed("merge overlays", t);
        self.record(Record::Committed).await
    }

    /// After a failed step: carry out the journal's obligations, then report the step's error.
    async fn undo(mut self, step: &'static str, source: StepError) -> EngineError {
        let domain = self.dom.name.clone();
        // The agent connection may be the one that just failed: recovery opens its own.
        self.qga = None;
        let mut journal = self.journal;
        let mut actions = Vec::new();
        match recover::settle(&mut journal, Some(&self.qmp), recover::Places::of(self.cfg), self.zfs, &mut actions).await {
            Ok(()) => {
                for a in &actions {
                    tracing::info!(domain = %domain, "undo: {a}");
                }
                // Everything is undone; a journal that stays is settled again, with nothing
                // left to do, by the next snapshot or `vmsnap recover`.
                let _ = journal.remove();
                EngineError::Step { domain, step, source: Box::new(source) }
            }
            Err(cleanup) => EngineError::CleanupFailed { domain, step, cleanup, source: Box::new(source) },
        }
    }
}

/// Records what the snapshot holds ([`crate::integrity`]) on this host: what `restore --from`
/// later checks a target's copy against. A failure is a warning: the snapshot is there all the
/// same (a pull of it then needs `--trust-target`).
async fn record_integrity(cfg: &Config, zfs: &Zfs, report: &mut SnapshotReport) {
    let unit: Vec<SnapshotName> = report.snapshots.iter().filter_map(|s| SnapshotName::new(s).ok()).collect();
    let written = match crate::integrity::held(zfs, &unit, &report.domain, report.ram_sha256.clone()).await {
        Ok(r) => crate::integrity::write(&cfg.state_dir, &r).map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        report.warnings.push(format!("the snapshot's integrity record was not written: {e}"));
    }
}

/// `qemu-img create` of an overlay whose backing is `disk` (vmsnap never attaches it through the
/// header: `blockdev-snapshot` links the live node, `-u` spares opening the backing here).
async fn make_overlay_file(path: &Path, disk: &LiveDisk) -> Result<(), StepError> {
    crate::qemu::img::create_overlay(path, &disk.path, &disk.format, disk.virtual_size)
        .await
        .map_err(|e| StepError::Refused(e.to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| StepError::Io { what: format!("chmod {}", path.display()), source })
}

/// Copies the domain XML and nvram into `<mountpoint>/.vmsnap/<domain>/` of the first mounted
/// filesystem under the disks, so the ZFS snapshot holds them. Returns a warning when there is
/// something to save but no filesystem to hold it (zvols only).
async fn save_domain_files(zfs: &Zfs, dom: &DomainConfig, by_pool: &BTreeMap<String, Vec<Dataset>>) -> Result<Option<String>, StepError> {
    let files: Vec<(&Path, &str)> = [(dom.xml.as_deref(), "domain.xml"), (dom.nvram.as_deref(), "nvram.fd")]
        .into_iter()
        .filter_map(|(p, n)| p.map(|p| (p, n)))
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    let mut target = None;
    for ds in by_pool.values().flatten() {
        let info = zfs.list_datasets(Some(ds), false).await?;
        if let Some(mp) = info.first().filter(|i| i.kind == DatasetKind::Filesystem && i.mounted).and_then(|i| i.mountpoint.clone()) {
            target = Some(mp);
            break;
        }
    }
    let Some(mountpoint) = target else {
        return Ok(Some("no filesystem dataset under the disks (zvols only): domain XML and nvram not saved".into()));
    };
    // The dataset is the VM's: whatever is planted under its mountpoint is never followed.
    let fs_err = |e: crate::fsutil::FsError| StepError::Refused(e.to_string());
    let dir = crate::fsutil::Dir::private(&mountpoint, &[".vmsnap", &dom.name]).map_err(fs_err)?;
    for (src, name) in files {
        dir.copy_atomic(name, src, 0o600).map_err(fs_err)?;
    }
    Ok(None)
}

/// A VM that is not running: one `zfs snapshot` per pool of its configured disks' datasets.
async fn offline(
    dom: &DomainConfig,
    opts: &SnapshotOptions,
    zfs: &Zfs,
    name: String,
    down: Down,
    progress: Progress<'_>,
) -> Result<SnapshotReport, (&'static str, StepError)> {
    let refuse = |why: String| Err(("check the VM is stopped", StepError::Refused(why)));
    if opts.memory.is_some() {
        return refuse(format!("the VM is not running ({} does not answer): --memory saves the RAM of a running VM", dom.qmp.display()));
    }
    if dom.disks.is_empty() {
        return Err(("resolve datasets", StepError::Refused("the VM is not running and the config lists no disks for it".into())));
    }
    for disk in &dom.disks {
        if std::fs::symlink_metadata(disk).is_err() {
            return refuse(format!("disk {} does not exist", disk.display()));
        }
        let held = holders_of(disk);
        if !held.is_empty() {
            return refuse(format!(
                "{} does not answer, but process {held:?} holds disk {}: is the VM running with another QMP socket? \
                 Not snapshotting it as stopped",
                dom.qmp.display(),
                disk.display()
            ));
        }
    }
    let consistency = match down {
        Down::ShutDown => Consistency::Offline,
        Down::Crashed => Consistency::Crash,
    };
    progress("the VM is not running: snapshotting its datasets");
    let t = Instant::now();
    let by_pool = datasets_by_pool(zfs, &dom.disks).await.at("resolve datasets")?;
    let mut warnings: Vec<String> = save_domain_files(zfs, dom, &by_pool).await.at("save XML and nvram")?.into_iter().collect();
    if down == Down::Crashed {
        warnings.push(format!("{} is a stale socket (QEMU did not shut down cleanly): the disks are crash-consistent", dom.qmp.display()));
    }
    let mut props = BTreeMap::new();
    props.insert(prop::CONSISTENCY, consistency.as_str().to_owned());
    props.insert(prop::VERSION, env!("CARGO_PKG_VERSION").to_owned());
    props.insert(prop::DOMAIN, dom.name.clone());
    if !opts.periods.is_empty() {
        props.insert(prop::PERIODS, periods_value(&opts.periods));
    }
    let mut names = Vec::new();
    for datasets in by_pool.values() {
        names.extend(zfs.snapshot(datasets, &name, &props).await.at("zfs snapshot")?.into_iter().map(|n| n.to_string()));
    }
    Ok(SnapshotReport {
        domain: dom.name.clone(),
        name,
        snapshots: names,
        consistency,
        strategy: "offline".into(),
        freeze_ms: None,
        pause_ms: None,
        ram_dump: None,
        ram_sha256: None,
        ram_file_bytes: None,
        ram_compress: None,
        pause_phases: Vec::new(),
        warnings,
        steps: vec![("zfs snapshot".into(), ms(t.elapsed()))],
    })
}

/// How a VM that does not answer on QMP went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// No socket: QEMU exited and removed it.
    ShutDown,
    /// A socket nobody accepts on: QEMU died.
    Crashed,
}

fn periods_value(periods: &[crate::model::Period]) -> String {
    periods.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

/// How long a RAM dump may take.
const RAM_TIMEOUT: Duration = Duration::from_secs(3600);

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}
