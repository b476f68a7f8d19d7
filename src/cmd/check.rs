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
        match vmsnap::retention::catalog::load(zfs, dom).await {
            Ok(cat) => {
                let (f, p) = check::evaluate(dom, &cat.entries, status.domains.get(&dom.name), now);
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
