//! `vmsnap verify [DOM]`: every snapshot's RAM dump read and checked (see
//! [`vmsnap::restore::verify`]); `--target T`: what a replication target holds (see
//! [`vmsnap::replicate::verify`]). Exit 1 when one failed.

use anyhow::Result;
use vmsnap::zfs::Zfs;

/// The dump checks; with `boot` (the configuration), then a scratch copy of the newest snapshot
/// (or `snapshot`) of each libvirt domain started.
pub async fn run(
    boot: Option<&vmsnap::config::Config>,
    zfs: &Zfs,
    domain: Option<&str>,
    snapshot: Option<&str>,
    boot_wait: std::time::Duration,
    json: bool,
) -> Result<()> {
    let show = move |s: &str| {
        if !json {
            eprintln!("vmsnap: {s}")
        }
    };
    let mut results = vmsnap::restore::verify::verify(zfs, domain, show).await?;
    if let Some(cfg) = boot {
        let booted = vmsnap::restore::boot::boot_all(cfg, zfs, domain, snapshot, boot_wait, std::sync::Arc::new(show)).await?;
        results.extend(booted);
    }
    let rows: Vec<Row> = results.iter().map(|r| (r.domain.as_str(), r.snapshot.as_str(), r.ok, r.detail.as_str())).collect();
    let none = format!("no vmsnap snapshot{}", domain.map(|d| format!(" of {d}")).unwrap_or_default());
    report(&results, &rows, json, &none, "")
}

/// (domain, snapshot, ok, detail) of one verified snapshot.
type Row<'a> = (&'a str, &'a str, bool, &'a str);

/// The results as JSON or a table (`none` when there are none); an error naming how many
/// failed (`on`: where, e.g. " on offsite").
fn report(results: &impl serde::Serialize, rows: &[Row], json: bool, none: &str, on: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(results)?);
    } else if rows.is_empty() {
        println!("{none}");
    } else {
        for (domain, snapshot, ok, detail) in rows {
            println!("{domain:<12} {snapshot:<60} {:<6} {detail}", if *ok { "ok" } else { "FAILED" });
        }
    }
    let failed = rows.iter().filter(|r| !r.2).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} snapshots{on} failed verification", rows.len());
    }
    Ok(())
}

/// `vmsnap verify [DOM] --target T`: each domain replicating to `T` (or `DOM`).
pub async fn target(cfg: &vmsnap::config::Config, zfs: &Zfs, domain: Option<&str>, tname: &str, json: bool) -> Result<()> {
    let target = cfg.target(tname)?;
    let domains: Vec<_> =
        vmsnap::daemon::registry::select(cfg, domain)?.into_iter().filter(|d| d.policy.replicate_to.iter().any(|t| t == tname)).collect();
    if domains.is_empty() {
        anyhow::bail!("no domain{} replicates to {tname} (replicate_to)", domain.map(|d| format!(" named {d}")).unwrap_or_default());
    }
    let show = |s: &str| {
        if !json {
            eprintln!("vmsnap: {s}")
        }
    };
    let mut results = Vec::new();
    for dom in &domains {
        let r = vmsnap::replicate::verify::verify_target(zfs, &cfg.state_dir, dom, target, &show)
            .await
            .map_err(|e| anyhow::anyhow!("{} on {tname}: {e}", dom.name))?;
        results.extend(r);
    }
    let rows: Vec<Row> = results.iter().map(|r| (r.domain.as_str(), r.snapshot.as_str(), r.ok, r.detail.as_str())).collect();
    let none = format!("{tname} holds no snapshot of {}", domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "));
    report(&results, &rows, json, &none, &format!(" on {tname}"))
}
