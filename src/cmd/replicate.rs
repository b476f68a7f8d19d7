//! `vmsnap replicate` (source side) and `vmsnap serve` (the target side, an ssh forced command).

use anyhow::Result;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vmsnap::config::Config;
use vmsnap::daemon::dbus::client::Agent1Proxy;
use vmsnap::replicate::{replicate, Observer, Options, ReplicateError, ReplicationReport, Transfer, DIVERGED_HINT, TARGET_HINT};
use vmsnap::zfs::{Dataset, Zfs};

/// The exit status when a target diverged (nothing was sent or destroyed).
pub const EXIT_DIVERGED: i32 = 3;

/// Every domain (or one) to each of its targets (or only `only_target`): through the daemon
/// when it runs (unless `local`), one job per domain and target, so its metrics and logs count
/// them and its own replications wait their turn; else in this process. A target that fails
/// does not stop the others; the exit status says the worst: 0, 1 (a failure), 3 (diverged).
/// Ctrl-C (or SIGTERM) stops the stream in flight between two pieces: the target keeps a
/// resumable receive and the next run goes on from there.
pub async fn run(
    cfg: &Config,
    zfs: &Zfs,
    domain: Option<&str>,
    only_target: Option<&str>,
    mut opts: Options,
    json: bool,
    local: bool,
) -> Result<()> {
    if let Some(t) = only_target {
        cfg.target(t)?;
    }
    let domains = vmsnap::daemon::registry::select(cfg, domain)?;
    let pairs: Vec<(&vmsnap::config::DomainConfig, &str)> = domains
        .iter()
        .flat_map(|d| d.policy.replicate_to.iter().map(move |t| (d, t.as_str())))
        .filter(|(_, t)| only_target.is_none_or(|o| o == *t))
        .collect();
    let daemon = if local || pairs.is_empty() { None } else { super::bus::daemon().await };
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(tokio::sync::Notify::new());
    opts.cancel = Some(cancel.clone());
    let interrupted = cancel.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            cancel.store(true, Ordering::Relaxed);
            stop.notify_one();
            eprintln!("vmsnap: stopping after the piece in flight (again to quit at once)");
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        });
    }
    let tag = daemon.as_ref().map_or(String::new(), |_| "through the daemon".to_owned());
    let steps = Mutex::new(super::progress::Steps::new(json, "replicating", &tag));
    let mut reports: Vec<ReplicationReport> = Vec::new();
    let mut worst = 0;
    for (dom, tname) in &pairs {
        if interrupted.load(Ordering::Relaxed) {
            steps.lock().expect("not poisoned").note(&format!("vmsnap: {} → {tname}: not started (interrupted)", dom.name));
            worst = worst.max(1);
            continue;
        }
        let done = match &daemon {
            Some(conn) => via_daemon(conn, &dom.name, tname, &opts, &steps, &stop).await,
            None => {
                let show = Shown { steps: &steps, prefix: format!("{} → {tname}", dom.name) };
                replicate(zfs, &cfg.state_dir, dom, &cfg.targets[*tname], opts.clone(), &show).await.map_err(|e| Failure {
                    diverged: matches!(e, ReplicateError::Diverged { .. }),
                    hint: e.hint(),
                    message: vmsnap::error::chain(&e),
                })
            }
        };
        match done {
            Ok(r) => reports.push(r),
            Err(f) => {
                steps.lock().expect("not poisoned").note(&format!("vmsnap: error: {} → {tname}: {}", dom.name, f.message));
                if let Some(h) = f.hint {
                    steps.lock().expect("not poisoned").note(&format!("hint: {h}"));
                }
                worst = worst.max(if f.diverged { EXIT_DIVERGED } else { 1 });
            }
        }
    }
    steps.lock().expect("not poisoned").done();
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else if pairs.is_empty() {
        println!("nothing to replicate: no domain has replicate_to{}", only_target.map(|t| format!(" naming {t}")).unwrap_or_default());
    } else {
        for r in &reports {
            print(r);
        }
    }
    if worst != 0 {
        std::process::exit(worst);
    }
    Ok(())
}

/// Why one domain's replication to one target failed.
struct Failure {
    message: String,
    diverged: bool,
    hint: Option<&'static str>,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self { message: format!("{e:#}"), diverged: false, hint: None }
    }
}

/// One domain to one target as a daemon job (D-Bus `Replicate`), followed to its end: its
/// steps and streams on the CLI's spinner, a cancel when `stop` fires.
async fn via_daemon(
    conn: &zbus::Connection,
    domain: &str,
    target: &str,
    opts: &Options,
    steps: &Mutex<super::progress::Steps>,
    stop: &tokio::sync::Notify,
) -> Result<ReplicationReport, Failure> {
    use zbus::zvariant::Value;
    let options = HashMap::from([("dry_run", Value::from(opts.dry_run)), ("rollback_target", Value::from(opts.rollback_target))]);
    let agent = Agent1Proxy::new(conn).await.map_err(anyhow::Error::from)?;
    let path = agent.replicate(domain, target, options).await.map_err(|e| anyhow::anyhow!("the daemon refused: {e}"))?;
    let prefix = format!("{domain} → {target}");
    let shown = |s: &str, t: Option<Transfer>| {
        let mut steps = steps.lock().expect("not poisoned");
        // The daemon says which target it replicates to: said once, in the prefix.
        let s = s.strip_prefix(&format!("replicating to {target}: ")).unwrap_or(s);
        match t {
            Some(t) => steps.transfer(&Transfer { what: format!("{prefix}: {}", t.what), ..t }),
            None => steps.step(&format!("{prefix}: {s}")),
        }
    };
    let end = super::bus::follow(conn, &path, shown, Some(stop)).await?;
    match end.state.as_str() {
        "succeeded" => {
            let mut reports: Vec<ReplicationReport> =
                serde_json::from_str(&end.result).map_err(|e| anyhow::anyhow!("the daemon's report of {}: {e}", path.as_str()))?;
            reports.pop().ok_or_else(|| anyhow::anyhow!("the daemon's job {} reported nothing", path.as_str()).into())
        }
        _ => {
            let diverged = end.failure == "diverged";
            let hint = match end.failure.as_str() {
                "diverged" => Some(DIVERGED_HINT),
                "target" => Some(TARGET_HINT),
                _ => None,
            };
            // The job's message names the target already ("offsite: …").
            let message = end.result.strip_prefix(&format!("{target}: ")).unwrap_or(&end.result).to_owned();
            Err(Failure { message, diverged, hint })
        }
    }
}

/// A run's steps and transfers on the CLI's spinner, each prefixed with its domain and target.
struct Shown<'a> {
    steps: &'a Mutex<super::progress::Steps>,
    prefix: String,
}

impl Observer for Shown<'_> {
    fn step(&self, s: &str) {
        self.steps.lock().expect("not poisoned").step(&format!("{}: {s}", self.prefix));
    }
    fn transfer(&self, t: &Transfer) {
        let t = Transfer { what: format!("{}: {}", self.prefix, t.what), ..t.clone() };
        self.steps.lock().expect("not poisoned").transfer(&t);
    }
}

fn print(r: &ReplicationReport) {
    let verb = if r.dry_run { "would send" } else { "sent" };
    println!("{} → {}: {:.1} s", r.domain, r.target, r.seconds);
    for d in &r.datasets {
        if d.steps.is_empty() {
            println!("  {}: up to date", d.dataset);
        } else {
            println!("  {}: {verb} {} MiB: {}", d.dataset, d.bytes >> 20, d.steps.join("; "));
        }
    }
    if !r.ram_dumps.is_empty() {
        println!("  RAM dumps copied and checked: {} ({} MiB)", r.ram_dumps.join(", "), r.ram_bytes >> 20);
    }
    if !r.completed.is_empty() {
        println!("  complete on the target: {}", r.completed.join(", "));
    }
    match &r.target_pruned {
        Some(p) if p.policy.is_none() => println!("  the target has no retention of its own (vmsnap serve --keep): it keeps everything"),
        Some(p) => {
            if !p.destroyed.is_empty() {
                println!("  the target's retention ({}) destroyed: {}", p.policy.as_deref().unwrap_or_default(), p.destroyed.join(", "));
            }
            if !p.ram_dropped.is_empty() {
                println!("  the target's retention dropped the RAM dumps of: {}", p.ram_dropped.join(", "));
            }
        }
        None => {}
    }
    if let Some(e) = &r.target_prune_error {
        println!("  warning: the target's retention did not run: {e}");
    }
}

/// `vmsnap serve`: one request on stdin, its answer on stdout.
pub async fn serve(
    root: &str,
    ram_dir: PathBuf,
    keep: Option<&str>,
    allow_rollback: bool,
    source: Option<String>,
    now: Option<i64>,
    zfs: Zfs,
) -> Result<()> {
    let root = Dataset::new(root)?;
    anyhow::ensure!(ram_dir.is_absolute(), "--ram-dir must be an absolute path");
    if let Some(s) = &source {
        anyhow::ensure!(vmsnap::config::valid_domain_name(s), "--source {s:?}: letters, digits, '-', '_', '.' only");
    }
    let keep = match keep {
        Some(spec) => {
            let policy = vmsnap::config::policy::parse_keep(spec).map_err(|b| anyhow::anyhow!("--keep {spec:?}: {}", b.why))?;
            Some(vmsnap::replicate::target_retention::TargetPolicy { spec: spec.to_owned(), policy })
        }
        None => None,
    };
    let server = vmsnap::replicate::server::Server { root, ram_dir, zfs, keep, allow_rollback, source, now };
    server.serve_stdio().await?;
    Ok(())
}
