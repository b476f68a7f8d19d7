//! `vmsnap prune`: retention for one domain or all, and how it is printed.

use anyhow::Result;
use vmsnap::config::Config;
use vmsnap::zfs::Zfs;

pub async fn run(cfg: &Config, zfs: &Zfs, domain: Option<String>, dry_run: bool, now: Option<i64>, json: bool) -> Result<()> {
    let now = now.unwrap_or_else(|| chrono::Utc::now().timestamp());
    let domains = vmsnap::daemon::registry::select(cfg, domain.as_deref())?;
    let mut reports = Vec::new();
    for dom in &domains {
        reports.push(vmsnap::retention::prune::prune(cfg, dom, zfs, now, dry_run).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print_prune(r);
        }
    }
    Ok(())
}

pub fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp()).map_err(|e| format!("{s:?} is not an RFC 3339 time ({e})"))
}

fn print_prune(r: &vmsnap::retention::prune::PruneReport) {
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
