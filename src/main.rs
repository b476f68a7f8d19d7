//! The `vmsnap` command line: parses arguments, runs one command, prints its result (human or
//! `--json`) or the whole error chain with a hint.

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vmsnap::config::{self, Config};

mod cmd;
use vmsnap::engine;
use vmsnap::model::{RamMode, Strategy};
use vmsnap::zfs::Zfs;

/// Consistent, live snapshots of QEMU/libvirt virtual machines on ZFS.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
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
        memory: Option<RamMode>,
        #[arg(long, value_enum, default_value = "overlay")]
        strategy: Strategy,
        /// Do not freeze the guest's filesystems (crash-consistent).
        #[arg(long)]
        no_quiesce: bool,
        /// Run in this process even when the daemon is running.
        #[arg(long)]
        local: bool,
        /// The label at the end of the snapshot name (1 to 64 letters, digits, '-', '_', '.').
        #[arg(long, default_value = "manual", value_parser = parse_label)]
        label: String,
        #[arg(long)]
        json: bool,
    },
    /// List a domain's snapshots (or every configured domain's).
    List {
        domain: Option<String>,
        /// What this replication target holds of the domain(s) instead (asked over its ssh link).
        #[arg(long)]
        target: Option<String>,
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
        #[arg(long, value_parser = cmd::prune::parse_time)]
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
    /// Send each domain's snapshots, RAM dumps and properties to its replication targets
    /// (`replicate_to`). Exit 3 when a target diverged (nothing is sent or destroyed then).
    Replicate {
        /// One domain (default: every domain with `replicate_to`).
        domain: Option<String>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Show the plan and its sizes (`zfs send -nP`), send nothing.
        #[arg(long)]
        dry_run: bool,
        /// A target that diverged (after a restore to an older snapshot, say) is rolled back to
        /// the snapshot in common, destroying its newer vmsnap-made snapshots, if its `vmsnap
        /// serve` has --allow-rollback. A snapshot made there by hand refuses it.
        #[arg(long)]
        rollback_target: bool,
        /// Run in this process even when the daemon is running.
        #[arg(long)]
        local: bool,
        #[arg(long)]
        json: bool,
    },
    /// Bring a stopped domain back to one of its snapshots, in place: every dataset rolled back
    /// as one unit, XML and nvram from the snapshot; with --resume the guest continues from its RAM.
    Restore {
        domain: String,
        /// The snapshot's name (after the `@`), as `vmsnap list` shows it.
        snapshot: String,
        /// Destroy the snapshots and bookmarks newer than it (a rollback needs that; they are listed first).
        #[arg(long)]
        destroy_newer: bool,
        /// Start the domain from the snapshot's RAM dump (checked against its sha256 first).
        #[arg(long)]
        resume: bool,
        /// A new libvirt domain from the snapshot, beside the original: clones of its datasets,
        /// its XML with a new name, UUID, MACs, disk and nvram paths; the original is untouched.
        /// With --resume it starts from the snapshot's RAM, its network links down.
        #[arg(long = "as", value_name = "NEW", conflicts_with = "destroy_newer")]
        as_name: Option<String>,
        /// With --as: `zfs promote` the clones (they no longer depend on the snapshot).
        #[arg(long, requires = "as_name")]
        promote: bool,
        /// Bring the snapshot and its RAM dump back from this replication target first (when it
        /// is not here any more), then restore from it.
        #[arg(long, value_name = "TARGET")]
        from: Option<String>,
        /// With --from: use what the target sends even though this host has no record of what
        /// the snapshot held (a rebuilt host); otherwise such a snapshot is refused.
        #[arg(long, requires = "from")]
        trust_target: bool,
        /// Show the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Prove what can be proven without starting anything: each snapshot's RAM dump read whole and
    /// checked against its sha256, header and size; the outcome recorded on the snapshot
    /// (`vmsnap:verified`). Exit 1 when one failed.
    Verify {
        /// One domain (default: every domain with vmsnap snapshots on this host).
        domain: Option<String>,
        /// Verify what this replication target holds instead: each replica matched with the
        /// source's snapshot by GUID, complete, and its RAM dump read again on the target.
        #[arg(long, value_name = "TARGET")]
        target: Option<String>,
        /// Also start a scratch copy of the newest snapshot (libvirt domains): resumed from its
        /// RAM dump or booted from its disks, network links down, until its guest agent
        /// answers; then removed. The outcome is recorded on the snapshot.
        #[arg(long, conflicts_with = "target")]
        boot: bool,
        /// With --boot: this snapshot instead of the newest.
        #[arg(long, requires_all = ["boot", "domain"])]
        snapshot: Option<String>,
        /// With --boot: how long the copy's guest agent may take to answer (seconds).
        #[arg(long, requires = "boot", value_name = "SECONDS", default_value_t = 600)]
        boot_timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// The target side of replication, one request on stdin: run by sshd as the forced command of
    /// the source's key (`command="vmsnap serve --root pool/backup --ram-dir /srv/ram"`).
    Serve {
        /// Every received dataset goes under this one.
        #[arg(long)]
        root: String,
        /// Where received RAM dumps go (root only, files 0600).
        #[arg(long)]
        ram_dir: PathBuf,
        /// This target's own retention, applied when a source has sent a domain:
        /// `hourly=48,daily=30,…` over sanoid's defaults (frequently, hourly, daily, weekly,
        /// monthly, yearly, frequent_period, ram_keep). Without it the target keeps everything.
        #[arg(long)]
        keep: Option<String>,
        /// Let sources ask (`vmsnap replicate --rollback-target`) to destroy vmsnap-made
        /// snapshots newer than the one in common and roll back to it.
        #[arg(long)]
        allow_rollback: bool,
        /// The source this key is (a name you choose, one per key): the root and the RAM
        /// directory are bound to the first source that uses them, and every other is refused.
        #[arg(long)]
        source: Option<String>,
        /// The time retention decides by (unix seconds; for tests).
        #[arg(long, hide = true)]
        now: Option<i64>,
    },
    /// Single files out of a snapshot: every disk opened read-only (images through qemu-nbd, zvols
    /// as read-only clones), each file system mounted read-only below PATH, the snapshot held.
    Mount {
        domain: String,
        /// The snapshot's name (after the `@`), as `vmsnap list` shows it.
        snapshot: String,
        /// An empty or new directory (default: /mnt/vmsnap/DOMAIN/SNAPSHOT).
        path: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Undo `vmsnap mount`: unmount, disconnect, destroy the clones, release the hold.
    Umount {
        domain: String,
        snapshot: String,
        #[arg(long)]
        json: bool,
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
    /// Install the libvirt hook, systemd unit, D-Bus policy, default config, completions and man page.
    Setup {
        /// Show what would be installed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Install under this root instead of / (packaging, tests).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Where the binary will run from, for the unit and the hook (packaging: /usr/bin/vmsnap);
        /// default: this binary.
        #[arg(long)]
        exe: Option<PathBuf>,
    },
    /// Give a libvirt domain vmsnap's own QMP socket and agent channel (persistent definition, via virsh).
    Enroll { domain: String },
    /// Put back the definition `enroll` saved.
    Unenroll { domain: String },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Manpage,
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

fn parse_label(s: &str) -> Result<String, String> {
    engine::naming::check_label(s).map(|()| s.to_owned())
}

/// The most domain XML the hook reads from libvirt (real definitions are a few KiB).
const HOOK_XML_MAX: u64 = 4 << 20;

/// Logging to stderr (`VMSNAP_LOG` filters it). The daemon logs what it does (one line per
/// snapshot); other commands only warnings. Set up once the arguments are parsed: a domain named
/// `daemon` is not the daemon.
fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMSNAP_LOG").unwrap_or_else(|_| default.into());
    // journald adds its own timestamps and shows no colours: plain lines when stderr goes there.
    let plain = std::env::var_os("JOURNAL_STREAM").is_some() || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(!plain);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
}

/// Whether the subcommand (the first argument after the global `--config PATH`) is `hook`,
/// read before the arguments parse: a domain named `hook` is not the hook.
fn subcommand_is_hook() -> bool {
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--config" {
            args.next();
        } else if !a.to_string_lossy().starts_with("--config=") {
            return a == "hook";
        }
    }
    false
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // The hook (`vmsnap hook ARGS`, as hooks/qemu runs it) always exits 0 (libvirt would
        // refuse to start the domain otherwise), even on arguments it cannot read.
        Err(e) if subcommand_is_hook() && e.use_stderr() => {
            eprintln!("vmsnap hook: {}", e.to_string().lines().next().unwrap_or("bad arguments"));
            std::process::exit(0);
        }
        Err(e) => e.exit(),
    };
    init_logging(matches!(cli.command, Command::Daemon { .. }));
    // Two workers: one domain's blocking step (a checksum, a fsync) never holds up another
    // domain's frozen window, D-Bus or the hook.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("vmsnap: error: {e:#}");
        // The first hint along the chain, from whichever layer gave one (a job's travels with
        // it, through the daemon too).
        if let Some(hint) = vmsnap::error::hint_of(e.as_ref()) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let zfs = Zfs::default();
    let load = || Config::load(&cli.config);
    match cli.command {
        Command::Snapshot { domain, memory, strategy, no_quiesce, local, label, json } => {
            cmd::snapshot::run(&cli.config, &zfs, cmd::snapshot::Args { domain, memory, strategy, no_quiesce, label, json }, local).await
        }
        Command::List { domain, target: None, json } => cmd::list::run(&load()?, &zfs, domain.as_deref(), json).await,
        Command::List { domain, target: Some(t), json } => cmd::list::target(&load()?, &zfs, domain.as_deref(), &t, json).await,
        Command::Prune { domain, dry_run, now, json } => cmd::prune::run(&load()?, &zfs, domain, dry_run, now, json).await,
        Command::Replicate { domain, target, dry_run, rollback_target, local, json } => {
            let opts = vmsnap::replicate::Options { dry_run, rollback_target, ..Default::default() };
            cmd::replicate::run(&load()?, &zfs, domain.as_deref(), target.as_deref(), opts, json, local).await
        }
        Command::Restore { domain, snapshot, as_name, promote, destroy_newer, resume, from, trust_target, dry_run, json } => {
            let cfg = load()?;
            if let Some(t) = &from {
                let how = vmsnap::replicate::pull::PullOptions { destroy_newer, trust_target };
                if cmd::restore::pull(&cfg, &zfs, &domain, &snapshot, t, how, dry_run, json).await? {
                    return Ok(());
                }
            }
            match as_name {
                Some(new) => {
                    let start = if resume { vmsnap::restore::clone::Start::Resume } else { vmsnap::restore::clone::Start::No };
                    cmd::restore::run_as(&cfg, &zfs, &domain, &snapshot, &new, promote, start, dry_run, json).await
                }
                None => {
                    let req = vmsnap::restore::Request { domain, snapshot, destroy_newer, resume, from_target: from.is_some() };
                    cmd::restore::run(&cfg, &zfs, req, dry_run, json).await
                }
            }
        }
        Command::Verify { domain, target: None, boot, snapshot, boot_timeout, json } => {
            let cfg = if boot { Some(load()?) } else { None };
            let wait = std::time::Duration::from_secs(boot_timeout.max(1));
            cmd::verify::run(cfg.as_ref(), &zfs, domain.as_deref(), snapshot.as_deref(), wait, json).await
        }
        Command::Verify { domain, target: Some(t), json, .. } => cmd::verify::target(&load()?, &zfs, domain.as_deref(), &t, json).await,
        Command::Serve { root, ram_dir, keep, allow_rollback, source, now } => {
            cmd::replicate::serve(&root, ram_dir, keep.as_deref(), allow_rollback, source, now, zfs).await
        }
        Command::Mount { domain, snapshot, path, json } => cmd::restore::mount(&load()?, &zfs, &domain, &snapshot, path, json).await,
        Command::Umount { domain, snapshot, json } => cmd::restore::umount(&load()?, &zfs, &domain, &snapshot, json).await,
        Command::Recover { json } => cmd::recover::run(&load()?, json).await,
        Command::Daemon { bus, bus_address } => {
            use vmsnap::daemon::dbus::Bus;
            let bus = match (bus_address, bus) {
                (Some(a), _) => Some(Bus::Address(a)),
                (None, BusArg::System) => Some(Bus::System),
                (None, BusArg::Session) => Some(Bus::Session),
                (None, BusArg::None) => None,
            };
            Ok(vmsnap::daemon::run(&cli.config, zfs, bus).await?)
        }
        Command::Check { domain } => {
            let (state, line) = cmd::check::run(&cli.config, &zfs, domain.as_deref()).await;
            println!("{line}");
            std::process::exit(state as i32);
        }
        Command::Hook { args } => {
            // stdin is read to the end whatever happens: libvirt writes the domain XML there.
            // Up to HOOK_XML_MAX is kept; the rest is drained, so libvirt never blocks on a pipe.
            let mut bytes = Vec::new();
            let mut stdin = std::io::stdin().lock();
            let read = std::io::Read::read_to_end(&mut std::io::Read::take(&mut stdin, HOOK_XML_MAX), &mut bytes)
                .and_then(|_| std::io::copy(&mut stdin, &mut std::io::sink()))
                .map_err(|e| e.to_string())
                .and_then(|rest| match rest {
                    0 => String::from_utf8(bytes).map_err(|_| "the domain XML is not UTF-8".to_owned()),
                    n => Err(format!("the domain XML is larger than {HOOK_XML_MAX} bytes (by {n})")),
                });
            let xml = read.as_deref().unwrap_or("");
            let bus = std::env::var("VMSNAP_BUS_ADDRESS").ok();
            let said = match read {
                Ok(_) => vmsnap::libvirt::hook::run(&args, xml, bus.as_deref()).await,
                Err(e) => format!("vmsnap hook: reading the domain XML from stdin: {e}"),
            };
            if !said.is_empty() {
                eprintln!("{said}");
            }
            std::process::exit(0);
        }
        Command::ImportSanoid { sanoid_conf } => cmd::import_sanoid::run(&cli.config, &sanoid_conf, &zfs).await,
        Command::Enroll { domain } => cmd::enroll::enroll(&load()?, &domain),
        Command::Unenroll { domain } => cmd::enroll::unenroll(&load()?, &domain),
        Command::Setup { dry_run, root, exe } => cmd::setup::run(&cli.config, &root, exe, dry_run),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics when its writer fails (a closed pipe).
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vmsnap", &mut buf);
            Ok(std::io::Write::write_all(&mut std::io::stdout(), &buf)?)
        }
        Command::Manpage => Ok(clap_mangen::Man::new(Cli::command()).section("8").render(&mut std::io::stdout())?),
    }
}
