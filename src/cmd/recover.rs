//! `vmsnap recover`: settle every journal a crash left, then thaw guests that are frozen while
//! nothing of vmsnap runs on them (resumed from a quiesced RAM snapshot): [`vmsnap::recovery`],
//! as the daemon does when it starts.

use anyhow::Result;
use vmsnap::config::Config;

pub async fn run(cfg: &Config, json: bool) -> Result<()> {
    let reports = vmsnap::recovery::everything(cfg, &vmsnap::zfs::Zfs::default()).await?;
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
