//! `vmsnap verify [DOM]`: every snapshot's RAM dump read and checked (see
//! [`vmsnap::restore::verify`]); exit 1 when one failed.

use anyhow::Result;
use vmsnap::zfs::Zfs;

pub async fn run(zfs: &Zfs, domain: Option<&str>, json: bool) -> Result<()> {
    let results = vmsnap::restore::verify::verify(zfs, domain, |s| {
        if !json {
            eprintln!("vmsnap: {s}")
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else if results.is_empty() {
        println!("no vmsnap snapshot{}", domain.map(|d| format!(" of {d}")).unwrap_or_default());
    } else {
        for r in &results {
            println!("{:<12} {:<60} {:<6} {}", r.domain, r.snapshot, if r.ok { "ok" } else { "FAILED" }, r.detail);
        }
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} snapshots failed verification", results.len());
    }
    Ok(())
}
