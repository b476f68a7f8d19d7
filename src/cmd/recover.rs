//! `vmsnap recover`: settle every journal a crash left.

use anyhow::{Context, Result};
use vmsnap::config::Config;
use vmsnap::engine;

pub async fn run(cfg: &Config, json: bool) -> Result<()> {
    let reports =
        engine::recover::recover_all(cfg, &vmsnap::zfs::Zfs::default()).await.context("recovery incomplete; the journals stay")?;
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
    Ok(())
}
