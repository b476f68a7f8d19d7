//! `vmsnap import-sanoid`: the edge of `vmsnap::config::sanoid_import` (reads files, asks ZFS where the
//! domains' disks are).

use anyhow::{Context, Result};
use vmsnap::config::Config;
use vmsnap::engine;
use vmsnap::zfs::Zfs;

pub async fn run(config: &std::path::Path, sanoid_conf: &std::path::Path, zfs: &Zfs) -> Result<()> {
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
    let (out, notes) = vmsnap::config::sanoid_import::translate(&text, &sanoid_conf.display().to_string(), cfg.as_ref(), &domains)?;
    print!("{out}");
    for n in notes {
        eprintln!("note: {n}");
    }
    Ok(())
}
