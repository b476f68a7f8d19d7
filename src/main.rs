//! The `vmsnap` command line: parses arguments, runs one command, prints its result (human or
//! `--json`) or the whole error chain with a hint.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vmsnap::config::{self, Config};
use vmsnap::engine::{self, naming, RamMode, SnapshotOptions, Strategy};
use vmsnap::zfs::Zfs;

/// Consistent, live snapshots of QEMU/libvirt virtual machines on ZFS.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Take a consistent snapshot of a domain now.
    Snapshot {
        domain: String,
        /// Save the RAM too (resumable snapshot).
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "background")]
        memory: Option<MemoryArg>,
        #[arg(long, value_enum, default_value = "overlay")]
        strategy: StrategyArg,
        /// Do not freeze the guest's filesystems (crash-consistent).
        #[arg(long)]
        no_quiesce: bool,
        /// The label at the end of the snapshot name.
        #[arg(long, default_value = "manual")]
        label: String,
        #[arg(long)]
        json: bool,
    },
    /// List a domain's snapshots (or every configured domain's).
    List {
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Destroy the snapshots the retention policy no longer keeps, and their RAM dumps.
    Prune {
        /// One domain (default: every configured domain).
        domain: Option<String>,
        /// Show what would be destroyed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Plan as if it were this time (RFC 3339, e.g. 2026-11-26T12:00:00Z).
        #[arg(long, value_parser = parse_time)]
        now: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Run the scheduler: take due snapshots of every configured domain, prune after them; serve D-Bus.
    Daemon {
        /// Where to offer the D-Bus service.
        #[arg(long, value_enum, default_value = "system")]
        bus: BusArg,
        /// A bus address (e.g. unix:path=/run/test-bus), instead of --bus.
        #[arg(long)]
        bus_address: Option<String>,
    },
    /// Nagios/Icinga plugin: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, one line with perfdata.
    Check {
        /// One domain (default: every configured domain).
        domain: Option<String>,
    },
    /// Print the vmsnap config equivalent to a sanoid.conf, for the domains of the current config.
    ImportSanoid {
        #[arg(default_value = "/etc/sanoid/sanoid.conf")]
        sanoid_conf: PathBuf,
    },
    /// libvirt's qemu hook (install hooks/qemu as /etc/libvirt/hooks/qemu.d/vmsnap): registers
    /// domains on started/reconnect, unregisters on stopped/release. Always exits 0, prints nothing.
    Hook {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Finish or undo operations a crash interrupted: thaw, resume, merge overlays, delete partial dumps.
    Recover {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BusArg {
    System,
    Session,
    /// No D-Bus service.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    Overlay,
    Direct,
}

#[derive(Clone, Copy, ValueEnum)]
enum MemoryArg {
    Precopy,
    Background,
}

/// The daemon logs what it does (one line per snapshot); other commands only warnings.
fn default_log_level() -> &'static str {
    if std::env::args().any(|a| a == "daemon") {
        "info"
    } else {
        "warn"
    }
}

fn main() {
    // journald adds its own timestamps and shows no colours: plain lines when stderr goes there.
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMSNAP_LOG").unwrap_or_else(|_| default_log_level().into());
    let plain = std::env::var_os("JOURNAL_STREAM").is_some() || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(!plain);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("vmsnap: error: {e:#}");
        if let Some(hint) = e.downcast_ref::<engine::EngineError>().and_then(engine::EngineError::hint) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let zfs = Zfs::default();
    if let Command::Daemon { bus, bus_address } = &cli.command {
        use vmsnap::dbus::Bus;
        let bus = match (bus_address, bus) {
            (Some(a), _) => Some(Bus::Address(a.clone())),
            (None, BusArg::System) => Some(Bus::System),
            (None, BusArg::Session) => Some(Bus::Session),
            (None, BusArg::None) => None,
        };
        return Ok(vmsnap::daemon::run(&cli.config, zfs, bus).await?);
    }
    if let Command::Check { domain } = &cli.command {
        let (state, line) = check(&cli.config, &zfs, domain.as_deref()).await;
        println!("{line}");
        std::process::exit(state as i32);
    }
    if let Command::Hook { args } = &cli.command {
        // stdin is read to the end whatever happens: libvirt writes the domain XML there.
        let mut xml = String::new();
        let read = std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml);
        let bus = std::env::var("VMSNAP_BUS_ADDRESS").ok();
        let said = match read {
            Ok(_) => vmsnap::hook::run(args, &xml, bus.as_deref()).await,
            Err(e) => format!("vmsnap hook: reading the domain XML from stdin: {e}"),
        };
        if !said.is_empty() {
            eprintln!("{said}");
        }
        std::process::exit(0);
    }
    if let Command::ImportSanoid { sanoid_conf } = &cli.command {
        return import_sanoid(&cli.config, sanoid_conf, &zfs).await;
    }
    let cfg = Config::load(&cli.config)?;
    match cli.command {
        Command::Daemon { .. } | Command::Check { .. } | Command::ImportSanoid { .. } | Command::Hook { .. } => {
            unreachable!("handled above")
        }
        Command::Snapshot { domain, memory, strategy, no_quiesce, label, json } => {
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
            let report = engine::snapshot(&cfg, dom, &opts, &zfs, &progress).await?;
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
        }
        Command::Prune { domain, dry_run, now, json } => {
            let now = now.unwrap_or_else(|| chrono::Utc::now().timestamp());
            let domains: Vec<&config::DomainConfig> = match &domain {
                Some(name) => vec![cfg.domain(name)?],
                None => cfg.domains.values().collect(),
            };
            let mut reports = Vec::new();
            for dom in domains {
                reports.push(vmsnap::prune::prune(&cfg, dom, &zfs, now, dry_run).await?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                for r in &reports {
                    print_prune(r);
                }
            }
        }
        Command::List { domain, json } => list(&cfg, &zfs, domain.as_deref(), json).await?,
        Command::Recover { json } => {
            let reports =
                engine::recover::recover_all(&cfg).await.map_err(anyhow::Error::msg).context("recovery incomplete; the journals stay")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else if reports.is_empty() {
                println!("nothing to recover");
            } else {
                for r in reports {
                    println!("{}: recovered ({})", r.domain, r.journal.display());
                    for a in r.actions {
                        println!("  {a}");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn import_sanoid(config: &std::path::Path, sanoid_conf: &std::path::Path, zfs: &Zfs) -> Result<()> {
    let text = std::fs::read_to_string(sanoid_conf).with_context(|| format!("reading {}", sanoid_conf.display()))?;
    // Without a vmsnap config yet, only the templates carry over.
    let cfg = if config.exists() { Some(Config::load(config)?) } else { None };
    let mut domains = Vec::new();
    for dom in cfg.iter().flat_map(|c| c.domains.values()) {
        let on = engine::disks::datasets_by_pool(zfs, &dom.disks)
            .await
            .with_context(|| format!("finding the datasets of domain {}", dom.name))?
            .into_values()
            .flatten()
            .map(|d| d.to_string())
            .collect();
        domains.push((dom, on));
    }
    let (out, notes) = vmsnap::sanoid_import::translate(&text, &sanoid_conf.display().to_string(), &domains)?;
    print!("{out}");
    for n in notes {
        eprintln!("note: {n}");
    }
    Ok(())
}

/// The check plugin never fails with a Rust error: anything unexpected is UNKNOWN, on one line.
async fn check(path: &std::path::Path, zfs: &Zfs, only: Option<&str>) -> (vmsnap::check::State, String) {
    use vmsnap::check::{self, State};
    let unknown = |e: String| (State::Unknown, format!("VMSNAP UNKNOWN - {e}"));
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return unknown(vmsnap::daemon::error_chain(&e)),
    };
    let domains: Vec<&config::DomainConfig> = match only {
        Some(name) => match cfg.domain(name) {
            Ok(d) => vec![d],
            Err(e) => return unknown(e.to_string()),
        },
        None => cfg.domains.values().filter(|d| d.policy.autosnap).collect(),
    };
    let status = vmsnap::status::Status::load(&cfg.state_dir).unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    let (mut findings, mut perf) = (Vec::new(), Vec::new());
    for dom in &domains {
        match vmsnap::catalog::load(zfs, dom).await {
            Ok(cat) => {
                let (f, p) = check::evaluate(dom, &cat.entries, status.domains.get(&dom.name), now);
                findings.extend(f);
                perf.extend(p);
            }
            Err(e) => {
                findings.push(check::Finding { state: State::Unknown, text: format!("{}: {}", dom.name, vmsnap::daemon::error_chain(&e)) })
            }
        }
    }
    check::line(&findings, &perf, domains.len())
}

fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp()).map_err(|e| format!("{s:?} is not an RFC 3339 time ({e})"))
}

fn print_prune(r: &vmsnap::prune::PruneReport) {
    let verb = if r.dry_run { "would destroy" } else { "destroyed" };
    println!("{}: {verb} {} of {} snapshots", r.domain, r.destroyed.len(), r.decisions.len());
    for d in &r.decisions {
        let why = serde_json::to_value(&d.rule).ok().map(|v| rule_text(&v)).unwrap_or_default();
        let what = if d.keep { "keep   " } else { "destroy" };
        let ram = if d.drop_ram { " (RAM dump dropped)" } else { "" };
        println!("  {what} {:<48} {why}{ram}", d.name);
    }
    for p in &r.ram_deleted {
        println!("  {} RAM dump {}", if r.dry_run { "would delete" } else { "deleted" }, p.display());
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
}

/// `{"rule":"within_count","period":"hourly","count":24}` → `within_count hourly=24`.
fn rule_text(v: &serde_json::Value) -> String {
    let rule = v["rule"].as_str().unwrap_or("");
    match (v["period"].as_str(), v["count"].as_u64(), v["tag"].as_str()) {
        (Some(p), Some(c), _) => format!("{rule} {p}={c}"),
        (_, _, Some(tag)) => format!("{rule} ({tag})"),
        _ => rule.to_owned(),
    }
}

/// A snapshot as `vmsnap list` shows it.
#[derive(serde::Serialize)]
struct Listed {
    domain: String,
    snapshot: String,
    creation: i64,
    consistency: Option<String>,
    /// The retention periods it serves (scheduled snapshots).
    periods: Option<String>,
    ram_dump: Option<String>,
    /// When retention dropped its RAM dump (unix seconds).
    ram_pruned: Option<String>,
}

async fn list(cfg: &Config, zfs: &Zfs, only: Option<&str>, json: bool) -> Result<()> {
    let props = naming::listed_properties();
    let mut rows = Vec::new();
    let domains: Vec<&config::DomainConfig> = match only {
        Some(name) => vec![cfg.domain(name)?],
        None => cfg.domains.values().collect(),
    };
    for dom in domains {
        let by_pool = engine::disks::datasets_by_pool(zfs, &dom.disks).await.with_context(|| format!("domain {}", dom.name))?;
        for ds in by_pool.values().flatten() {
            for s in zfs.list_snapshots(ds, &props).await? {
                let get = |k: &str| s.props.iter().find(|(p, _)| p.as_str() == k).map(|(_, v)| v.clone());
                if get(naming::DOMAIN).as_deref() != Some(dom.name.as_str()) {
                    continue;
                }
                rows.push(Listed {
                    domain: dom.name.clone(),
                    snapshot: s.name.to_string(),
                    creation: s.creation,
                    consistency: get(naming::CONSISTENCY),
                    periods: get(naming::PERIODS),
                    ram_dump: get(naming::RAM_DUMP),
                    ram_pruned: get(naming::RAM_PRUNED),
                });
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for r in rows {
            let ram = match (&r.ram_dump, &r.ram_pruned) {
                (Some(d), _) => d.clone(),
                (None, Some(_)) => "(RAM dump pruned)".into(),
                (None, None) => String::new(),
            };
            println!(
                "{:<12} {:<70} {:<8} {:<18} {ram}",
                r.domain,
                r.snapshot,
                r.consistency.as_deref().unwrap_or("-"),
                r.periods.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}
