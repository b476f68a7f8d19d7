//! `vmsnap recover`: settle every journal a crash left, then thaw guests that are frozen while
//! nothing of vmsnap runs on them (resumed from a quiesced RAM snapshot).

use anyhow::{Context, Result};
use vmsnap::config::Config;
use vmsnap::engine;

pub async fn run(cfg: &Config, json: bool) -> Result<()> {
    let mut reports =
        engine::recover::recover_all(cfg, &vmsnap::zfs::Zfs::default()).await.context("recovery incomplete; the journals stay")?;
    // Restores a crash interrupted: finished once their domain is stopped.
    for (domain, actions) in vmsnap::restore::recover_pending(cfg, &vmsnap::zfs::Zfs::default()).await.context("an interrupted restore")? {
        reports.push(engine::recover::RecoveryReport { journal: Default::default(), domain, actions });
    }
    // Copies (`restore --as`, `verify --boot`'s scratch copies) a crash interrupted: undone,
    // unless the user's copy runs.
    for (domain, actions) in
        vmsnap::restore::recover_copies(&cfg.state_dir, &vmsnap::zfs::Zfs::default()).await.context("an interrupted copy")?
    {
        reports.push(engine::recover::RecoveryReport { journal: Default::default(), domain, actions });
    }
    // Mounts a crash interrupted half-way: undone (complete ones stay until `vmsnap umount`).
    for (domain, actions) in
        vmsnap::restore::mount::recover_interrupted(cfg, &vmsnap::zfs::Zfs::default()).await.context("an interrupted mount")?
    {
        reports.push(engine::recover::RecoveryReport { journal: Default::default(), domain, actions });
    }
    // Then guests that woke frozen (resumed from a quiesced RAM snapshot) and nothing runs on.
    let registry = vmsnap::daemon::registry::Registry::new(&cfg.state_dir);
    for dom in vmsnap::daemon::registry::all_domains(cfg, &registry) {
        let Some(qga) = &dom.qga else { continue };
        match engine::recover::thaw_woken_frozen(cfg, &dom.name, &dom.qmp, qga).await {
            Ok(Some(action)) => reports.push(engine::recover::RecoveryReport {
                journal: Default::default(),
                domain: dom.name.clone(),
                actions: vec![action],
            }),
            Ok(None) => {}
            // An operation runs on it and thaws it itself.
            Err(engine::recover::RecoverError::Busy(_)) => {}
            Err(e) => return Err(e).context(format!("domain {}", dom.name)),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else if reports.is_empty() {
        println!("nothing to recover");
    } else {
        for r in reports {
            if r.journal.as_os_str().is_empty() {
                println!("{}: recovered", r.domain);
            } else {
                println!("{}: recovered ({})", r.domain, r.journal.display());
            }
            for a in r.actions {
                println!("  {a}");
            }
        }
    }
    Ok(())
}
