//! `vmsnap check`: the Nagios/Icinga plugin's edge (the findings are `vmsnap::daemon::check`).

use vmsnap::config::{self, Config};
use vmsnap::zfs::Zfs;

/// The check plugin never fails with a Rust error: anything unexpected is UNKNOWN, on one line.
pub async fn run(path: &std::path::Path, zfs: &Zfs, only: Option<&str>) -> (vmsnap::daemon::check::State, String) {
    use vmsnap::daemon::check::{self, State};
    let unknown = |e: String| (State::Unknown, format!("VMSNAP UNKNOWN - {e}"));
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return unknown(vmsnap::daemon::error_chain(&e)),
    };
    let domains: Vec<config::DomainConfig> = match vmsnap::daemon::registry::select(&cfg, only) {
        Ok(d) if only.is_some() => d,
        Ok(d) => d.into_iter().filter(|d| d.policy.autosnap).collect(),
        Err(e) => return unknown(e.to_string()),
    };
    let status = vmsnap::daemon::status::Status::load(&cfg.state_dir).unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    let (mut findings, mut perf) = (Vec::new(), Vec::new());
    for dom in &domains {
        let read = async {
            let cat = vmsnap::retention::catalog::load(zfs, dom).await?;
            let replicas = replicas(zfs, dom, &cat.datasets).await?;
            Ok::<_, vmsnap::zfs::ZfsError>((cat, replicas))
        };
        match read.await {
            Ok((cat, replicas)) => {
                let (f, p) = check::evaluate(dom, &cat.entries, &replicas, status.domains.get(&dom.name), now);
                findings.extend(f);
                perf.extend(p);
            }
            Err(e) => {
                findings.push(check::Finding { state: State::Unknown, text: format!("{}: {}", dom.name, vmsnap::daemon::error_chain(&e)) })
            }
        }
    }
    check::line(&findings, &perf, domains.len())
}

/// Each of the domain's replication targets, and how far it has the domain (from the source's
/// cursor bookmarks: no connection to the target).
async fn replicas(
    zfs: &Zfs,
    dom: &config::DomainConfig,
    datasets: &[vmsnap::zfs::Dataset],
) -> Result<Vec<vmsnap::daemon::check::Replica>, vmsnap::zfs::ZfsError> {
    let mut out = Vec::new();
    for target in &dom.policy.replicate_to {
        let newest = vmsnap::replicate::replicated_up_to(zfs, datasets, target).await?;
        out.push(vmsnap::daemon::check::Replica { target: target.clone(), newest });
    }
    Ok(out)
}
