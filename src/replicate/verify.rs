//! `vmsnap verify --target T`: what a target holds of a domain, proven against the source. Each
//! target snapshot of the domain is matched with the source's snapshot of the same name by GUID
//! on every dataset (the same name with other data is a failure, a replica the source has pruned
//! is fine), must be complete there (`vmsnap:replica`), and its RAM dump is read again *on the
//! target* and compared with the sha256 the snapshot records (cheap storage rots). Nothing is
//! sent or changed, on either side.

use super::protocol::{RamCheck, Request};
use super::run::{Options, ReplicateError, Run};
use super::transport::Payload;
use crate::config::{DomainConfig, TargetConfig};
use crate::model::prop;
use crate::zfs::Zfs;
use std::collections::BTreeMap;

/// One target snapshot's verification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetVerified {
    pub domain: String,
    pub target: String,
    pub snapshot: String,
    /// Datasets it is on, on the target.
    pub datasets: usize,
    pub ok: bool,
    /// What was checked, or each reason it failed.
    pub detail: String,
}

/// What is known of one snapshot name while the datasets are read.
#[derive(Default)]
struct Seen {
    datasets: usize,
    matched: usize,
    problems: Vec<String>,
    /// The sha256 the target's copy of the RAM dump must have (the dump's own, or its sealed
    /// copy's), unless pruned there.
    ram_sha256: Option<String>,
    /// The target holds the dump sealed.
    sealed: bool,
}

/// Verifies what `target` holds of `dom`; `progress` hears each step.
pub async fn verify_target(
    zfs: &Zfs,
    state_dir: &std::path::Path,
    dom: &DomainConfig,
    target: &TargetConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<TargetVerified>, ReplicateError> {
    let run = Run::open(zfs, state_dir, dom, target, Options { dry_run: true, ..Options::default() }, &progress)?;
    let by_pool = crate::engine::disks::domain_datasets(zfs, dom).await?;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    for ds in by_pool.into_values().flatten() {
        progress(&format!("{ds}: listing the target"));
        let listing = run.list(&ds).await?;
        let local: BTreeMap<String, u64> =
            zfs.list_snapshots(&ds, &[]).await?.into_iter().map(|s| (s.name.snap().to_owned(), s.guid)).collect();
        for t in listing.snapshots.iter().filter(|t| t.props.get(prop::DOMAIN.as_str()) == Some(&dom.name)) {
            let e = seen.entry(t.name.clone()).or_default();
            e.datasets += 1;
            match local.get(&t.name) {
                Some(&g) if g == t.guid => e.matched += 1,
                Some(&g) => e.problems.push(format!("{ds}: the target's copy has guid {}, the source's {g} (other data)", t.guid)),
                None => {}
            }
            if t.props.get(prop::REPLICA.as_str()).map(String::as_str) != Some("complete") {
                e.problems.push(format!("{ds}: not complete on the target (a replication has not finished it)"));
            }
            // A dump the target's `ram_keep` dropped has no path any more (its sha256 stays).
            let dumped = t.props.contains_key(prop::RAM_DUMP.as_str()) && !t.props.contains_key(prop::RAM_PRUNED.as_str());
            if let Some(sum) = t.props.get(prop::RAM_SHA256.as_str()).filter(|_| dumped) {
                // The target's dump is read against this host's word (its integrity record),
                // not only against the sum the target itself keeps: a target that changed both
                // does not pass.
                match crate::integrity::read(state_dir, &dom.name, &t.name) {
                    Ok(Some(r)) if r.ram_sha256.as_ref().is_some_and(|mine| mine != sum) => e.problems.push(format!(
                        "the target records RAM dump sha256 {}, this host recorded {}",
                        super::protocol::shown(sum, 80),
                        r.ram_sha256.unwrap_or_default()
                    )),
                    Ok(Some(r)) => e.ram_sha256 = r.ram_sha256.or_else(|| Some(sum.clone())),
                    Ok(None) | Err(_) => e.ram_sha256 = Some(sum.clone()),
                }
                // A sealed copy is read against the sealed file's sum (the source's word when it
                // sent it): the dump's own sum is checked when it is opened, on a restore.
                if let Some(sealed) = t.props.get(prop::RAM_SEALED.as_str()) {
                    e.sealed = true;
                    if e.problems.is_empty() {
                        e.ram_sha256 = Some(sealed.clone());
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for (snapshot, mut e) in seen {
        let mut checked = vec![if e.matched == e.datasets {
            format!("guid matches the source on {} dataset(s)", e.matched)
        } else {
            format!("guid matches on {} of {} dataset(s) (the source has pruned the others)", e.matched, e.datasets)
        }];
        if let Some(sum) = &e.ram_sha256 {
            progress(&format!("{snapshot}: the target reads its RAM dump"));
            let req = Request::RamCheck { domain: dom.name.clone(), snapshot: snapshot.clone(), sha256: sum.clone() };
            match run.call(req, Payload::None).await {
                Ok((v, _)) => match serde_json::from_value::<RamCheck>(v) {
                    Ok(c) if c.matches => checked.push(format!(
                        "{}RAM dump sha256 ok on the target ({} MiB)",
                        if e.sealed { "sealed " } else { "" },
                        c.bytes >> 20
                    )),
                    Ok(c) => e.problems.push(format!("the target's RAM dump ({} bytes) does not match its sha256 {sum}", c.bytes)),
                    Err(err) => e.problems.push(format!("an answer vmsnap cannot read: {err}")),
                },
                Err(err) => e.problems.push(format!("RAM dump: {err}")),
            }
        }
        let ok = e.problems.is_empty();
        let detail = if ok { checked.join("; ") } else { e.problems.join("; ") };
        out.push(TargetVerified { domain: dom.name.clone(), target: target.name.clone(), snapshot, datasets: e.datasets, ok, detail });
    }
    Ok(out)
}
