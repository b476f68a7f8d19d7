//! `vmsnap snapshot`: one consistent snapshot now — through the daemon when it runs (its job
//! layer serialises it with the scheduler's jobs; the CLI follows the job's signals), else
//! through a job layer in this process. Either way the report is one typed
//! [`SnapshotReport`], printed by [`print_report`].

use super::progress::Steps;
use anyhow::{bail, Result};
use std::sync::Arc;
use vmsnap::config::Config;
use vmsnap::daemon::dbus::client::Agent1Proxy;
use vmsnap::daemon::jobs::{Jobs, Origin, Outcome, Output, Request};
use vmsnap::engine::{RamMode, SnapshotOptions, SnapshotReport, Strategy};
use vmsnap::zfs::Zfs;

pub struct Args {
    pub domain: String,
    pub memory: Option<RamMode>,
    pub strategy: Strategy,
    pub no_quiesce: bool,
    pub label: String,
    pub json: bool,
}

/// Through the daemon when one answers on D-Bus (unless `local`), else in-process.
pub async fn run(config: &std::path::Path, zfs: &Zfs, a: Args, local: bool) -> Result<()> {
    let report = match (local, if local { None } else { super::bus::daemon().await }) {
        (false, Some(conn)) => via_daemon(&conn, &a).await?,
        _ => in_process(Config::load(config)?, zfs, &a).await?,
    };
    print_report(&report, a.json)
}

async fn via_daemon(conn: &zbus::Connection, a: &Args) -> Result<SnapshotReport> {
    use std::collections::HashMap;
    use zbus::zvariant::Value;
    let mut options: HashMap<&str, Value<'_>> = HashMap::new();
    if let Some(m) = a.memory {
        options.insert("memory", Value::from(m.as_str()));
    }
    options.insert("strategy", Value::from(a.strategy.as_str()));
    options.insert("quiesce", Value::from(!a.no_quiesce));
    options.insert("label", Value::from(a.label.as_str()));
    // Ctrl-C or SIGTERM: the daemon cancels the job (it undoes what it did, as in-process);
    // this waits for that, unless asked again. Caught from before the job is asked for: a
    // signal while the daemon starts it cancels it as soon as it has a path.
    let stop = Arc::new(tokio::sync::Notify::new());
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
        let (stop, domain) = (stop.clone(), a.domain.clone());
        tokio::spawn(async move {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            eprintln!("vmsnap: interrupted: the daemon undoes the snapshot of {domain} (again to quit at once)");
            stop.notify_one();
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            std::process::exit(130);
        })
    };
    let agent = Agent1Proxy::new(conn).await?;
    let path = match agent.snapshot(&a.domain, options).await {
        Ok(p) => p,
        Err(e) => {
            signals.abort();
            bail!("domain {}: {e}", a.domain);
        }
    };
    let mut steps = Steps::new(a.json, &a.domain, &format!("daemon job {}", path.as_str()));
    let end = super::bus::follow(conn, &path, |s, _| steps.step(s), Some(&stop)).await;
    signals.abort();
    let end = end?;
    steps.done();
    match end.state.as_str() {
        "succeeded" => {}
        "cancelled" => bail!("interrupted; the snapshot of {} was {}", a.domain, end.result),
        _ => return Err(end.error().into()),
    }
    Ok(serde_json::from_str(&end.result)?)
}

async fn in_process(cfg: Config, zfs: &Zfs, a: &Args) -> Result<SnapshotReport> {
    let dom = vmsnap::daemon::registry::select(&cfg, Some(&a.domain))?.remove(0);
    let opts = SnapshotOptions {
        strategy: a.strategy,
        memory: a.memory,
        quiesce: !a.no_quiesce,
        label: a.label.clone(),
        ..SnapshotOptions::default()
    };
    // The job layer as the daemon runs it (scripts, status), here in this process; the metrics
    // file stays the daemon's.
    let jobs = Jobs::new(Arc::new(cfg), Arc::new(zfs.clone()), false);
    let mut handle = jobs.start(dom, Request::Snapshot(opts), Origin::Cli)?;
    let mut steps = Steps::new(a.json, &a.domain, "");
    // Ctrl-C or SIGTERM mid-step: the job stops where it is and undoes through its journal
    // (thaw, resume, cancel the dump, merge the overlays) before this process exits; further
    // signals are ignored until then.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut end = handle.clone();
    loop {
        tokio::select! {
            Some(s) = handle.progress_changed() => steps.step(&s),
            _ = end.outcome() => break,
            _ = int.recv() => break interrupt(&jobs, &steps, &a.domain).await,
            _ = term.recv() => break interrupt(&jobs, &steps, &a.domain).await,
        }
    }
    steps.done();
    match end.outcome().await {
        Outcome::Succeeded(Output::Snapshot(r)) => Ok(*r),
        Outcome::Cancelled(m) => bail!("interrupted; the snapshot of {} was {}", a.domain, m),
        Outcome::Failed(e, _) => Err(e.into()),
        other => bail!("{}", other.result_text()),
    }
}

async fn interrupt(jobs: &Jobs, steps: &Steps, domain: &str) {
    steps.note(&format!("vmsnap: interrupted: undoing the snapshot of {domain} before exiting"));
    jobs.shutdown(true).await;
}

/// The report, as JSON (`--json`) or as lines.
pub fn print_report(report: &SnapshotReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("{} @{}: {} ({})", report.domain, report.name, report.consistency, report.strategy);
    for s in &report.snapshots {
        println!("  {s}");
    }
    if let Some(f) = report.freeze_ms {
        println!("  guest frozen {f:.1} ms");
    }
    if let Some(p) = report.pause_ms {
        println!("  VM paused {p:.1} ms");
    }
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    Ok(())
}
