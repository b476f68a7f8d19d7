//! `vmsnap replicate` (source side) and `vmsnap serve` (the target side, an ssh forced command).

use anyhow::Result;
use std::path::PathBuf;
use vmsnap::config::Config;
use vmsnap::replicate::{replicate, Observer, Options, ReplicateError, ReplicationReport, Transfer};
use vmsnap::zfs::{Dataset, Zfs};

/// The exit status when a target diverged (nothing was sent or destroyed).
pub const EXIT_DIVERGED: i32 = 3;

/// Every domain (or one) to each of its targets (or only `only_target`). A target that fails
/// does not stop the others; the exit status says the worst: 0, 1 (a failure), 3 (diverged).
/// Ctrl-C (or SIGTERM) stops the stream in flight between two pieces: the target keeps a
/// resumable receive and the next run goes on from there.
pub async fn run(cfg: &Config, zfs: &Zfs, domain: Option<&str>, only_target: Option<&str>, mut opts: Options, json: bool) -> Result<()> {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    opts.cancel = Some(cancel.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!("vmsnap: stopping after the piece in flight (again to quit at once)");
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
    if let Some(t) = only_target.filter(|t| !cfg.targets.contains_key(*t)) {
        anyhow::bail!("no [target.{t}] in {} (known: {})", cfg.path.display(), cfg.targets.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    let domains = vmsnap::daemon::registry::select(cfg, domain)?;
    let steps = std::sync::Mutex::new(super::progress::Steps::new(json, "replicating", ""));
    let mut reports: Vec<ReplicationReport> = Vec::new();
    let mut worst = 0;
    let mut pairs = 0;
    for dom in &domains {
        for tname in dom.policy.replicate_to.iter().filter(|t| only_target.is_none_or(|o| o == t.as_str())) {
            pairs += 1;
            let target = &cfg.targets[tname];
            let show = Shown { steps: &steps, prefix: format!("{} → {tname}", dom.name) };
            match replicate(zfs, &cfg.state_dir, dom, target, opts.clone(), &show).await {
                Ok(r) => reports.push(r),
                Err(e) => {
                    eprintln!("vmsnap: error: {} → {tname}: {e}", dom.name);
                    if let Some(h) = e.hint() {
                        eprintln!("hint: {h}");
                    }
                    worst = worst.max(if matches!(e, ReplicateError::Diverged { .. }) { EXIT_DIVERGED } else { 1 });
                }
            }
        }
    }
    steps.lock().expect("not poisoned").done();
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else if pairs == 0 {
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

/// A run's steps and transfers on the CLI's spinner, each prefixed with its domain and target.
struct Shown<'a> {
    steps: &'a std::sync::Mutex<super::progress::Steps>,
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
pub async fn serve(root: &str, ram_dir: PathBuf, keep: Option<&str>, allow_rollback: bool, now: Option<i64>, zfs: Zfs) -> Result<()> {
    let root = Dataset::new(root)?;
    anyhow::ensure!(ram_dir.is_absolute(), "--ram-dir must be an absolute path");
    let keep = match keep {
        Some(spec) => {
            let policy = vmsnap::config::policy::parse_keep(spec).map_err(|b| anyhow::anyhow!("--keep {spec:?}: {}", b.why))?;
            Some(vmsnap::replicate::target_retention::TargetPolicy { spec: spec.to_owned(), policy })
        }
        None => None,
    };
    let server = vmsnap::replicate::server::Server { root, ram_dir, zfs, keep, allow_rollback, now };
    server.serve_stdio().await?;
    Ok(())
}
