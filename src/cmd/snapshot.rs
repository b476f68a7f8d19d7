//! `vmsnap snapshot`: one consistent snapshot now, in this process.

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

pub async fn run(cfg: &Config, zfs: &Zfs, a: Args) -> Result<()> {
    let Args { domain, memory, strategy, no_quiesce, label, json } = a;
    let dom = cfg.domain(&domain)?;
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
    let report = engine::snapshot(cfg, dom, &opts, zfs, &progress).await?;
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
