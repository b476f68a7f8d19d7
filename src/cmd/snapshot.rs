//! `vmsnap snapshot`: one consistent snapshot now — through the daemon when it runs (so it is
//! serialised with the scheduler's jobs and shows the job's progress), else in this process.

use crate::{MemoryArg, StrategyArg};
use anyhow::Result;
use vmsnap::config::Config;
use vmsnap::engine::{self, RamMode, SnapshotOptions, Strategy};
use vmsnap::zfs::Zfs;

pub struct Args {
    pub domain: String,
    pub memory: Option<MemoryArg>,
    pub strategy: StrategyArg,
    pub no_quiesce: bool,
    pub label: String,
    pub json: bool,
}

/// Through the daemon when one answers on D-Bus (unless `local`), else in-process.
pub async fn run(config: &std::path::Path, zfs: &Zfs, a: Args, local: bool) -> Result<()> {
    if !local {
        if let Some(conn) = super::bus::daemon().await {
            return via_daemon(&conn, a).await;
        }
    }
    in_process(&Config::load(config)?, zfs, a).await
}

async fn via_daemon(conn: &zbus::Connection, a: Args) -> Result<()> {
    use std::collections::HashMap;
    use vmsnap::dbus::{BUS_NAME, PATH};
    use zbus::zvariant::Value;
    let mut options: HashMap<&str, Value<'_>> = HashMap::new();
    if let Some(m) = a.memory {
        options.insert("memory", Value::from(if matches!(m, MemoryArg::Precopy) { "precopy" } else { "background" }));
    }
    options.insert("strategy", Value::from(if matches!(a.strategy, StrategyArg::Direct) { "direct" } else { "overlay" }));
    options.insert("quiesce", Value::from(!a.no_quiesce));
    options.insert("label", Value::from(a.label.as_str()));
    let agent = zbus::Proxy::new(conn, BUS_NAME, PATH, BUS_NAME).await?;
    let job: zbus::zvariant::OwnedObjectPath =
        agent.call("Snapshot", &(a.domain.as_str(), options)).await.map_err(|e| anyhow::anyhow!("domain {}: {e}", a.domain))?;
    // Uncached: the job's properties are read fresh each time (a cached proxy only learns of a
    // change from PropertiesChanged, and would wait forever on a stale `running`).
    let proxy: zbus::Proxy<'_> = zbus::proxy::Builder::new(conn)
        .destination(BUS_NAME)?
        .path(job.as_str())?
        .interface("io.github.vmsnap.Job1")?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let mut shown = String::new();
    let state = loop {
        let progress: String = proxy.get_property("Progress").await?;
        if progress != shown && !a.json {
            eprintln!("  {progress} (daemon job {})", job.as_str());
            shown = progress;
        }
        let state: String = proxy.get_property("State").await?;
        if state != "running" {
            break state;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let result: String = proxy.get_property("Result").await?;
    if state != "succeeded" {
        anyhow::bail!("{result}");
    }
    let report: serde_json::Value = serde_json::from_str(&result)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} @{}: {} ({})",
            report["domain"].as_str().unwrap_or(""),
            report["name"].as_str().unwrap_or(""),
            report["consistency"].as_str().unwrap_or(""),
            report["strategy"].as_str().unwrap_or("")
        );
        for s in report["snapshots"].as_array().into_iter().flatten() {
            println!("  {}", s.as_str().unwrap_or(""));
        }
        if let Some(f) = report["freeze_ms"].as_f64() {
            println!("  guest frozen {f:.1} ms");
        }
        if let Some(p) = report["pause_ms"].as_f64() {
            println!("  VM paused {p:.1} ms");
        }
        for w in report["warnings"].as_array().into_iter().flatten() {
            println!("  warning: {}", w.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

async fn in_process(cfg: &Config, zfs: &Zfs, a: Args) -> Result<()> {
    let Args { domain, memory, strategy, no_quiesce, label, json } = a;
    let dom = &vmsnap::registry::select(cfg, Some(&domain))?.remove(0);
    let opts = SnapshotOptions {
        strategy: match strategy {
            StrategyArg::Overlay => Strategy::Overlay,
            StrategyArg::Direct => Strategy::Direct,
        },
        memory: memory.map(|m| match m {
            MemoryArg::Precopy => RamMode::Precopy,
            MemoryArg::Background => RamMode::Background,
        }),
        quiesce: !no_quiesce,
        label,
        ..SnapshotOptions::default()
    };
    let progress = |step: &str| {
        if !json {
            eprintln!("  {step}");
        }
    };
    // Ctrl-C or SIGTERM mid-step: stop the engine where it is and undo through its journal
    // (thaw, resume, cancel the dump, merge the overlays) before exiting; further signals are
    // ignored until then.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let outcome = tokio::select! {
        r = engine::snapshot(cfg, dom, &opts, zfs, &progress) => Some(r),
        _ = int.recv() => None,
        _ = term.recv() => None,
    };
    let report = match outcome {
        Some(r) => r?,
        None => {
            eprintln!("vmsnap: interrupted: undoing the snapshot of {} before exiting", dom.name);
            let undone = engine::recover::recover_domain(cfg, &dom.name, zfs)
                .await
                .map_err(|e| anyhow::anyhow!("interrupted, and undoing failed (run `vmsnap recover`): {e}"))?;
            for a in undone.iter().flat_map(|r| &r.actions) {
                eprintln!("  {a}");
            }
            anyhow::bail!("interrupted; the snapshot of {} was undone", dom.name);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
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
    }
    Ok(())
}
