//! `vmsnap list`: a domain's snapshots with consistency, periods and RAM dump (format,
//! compression, size, checksum), their clones and where one is mounted; with `--target`, what a
//! replication target holds of it.

use anyhow::{Context, Result};
use vmsnap::config::Config;
use vmsnap::engine;
use vmsnap::model::prop;
use vmsnap::zfs::PropName;
use vmsnap::zfs::Zfs;

/// A snapshot as `vmsnap list` shows it.
#[derive(serde::Serialize)]
struct Listed {
    domain: String,
    snapshot: String,
    creation: i64,
    consistency: Option<String>,
    /// The retention periods it serves (scheduled snapshots).
    periods: Option<String>,
    ram_dump: Option<String>,
    /// `libvirt-save` (`virsh restore` opens it) or `qemu-stream`; none on dumps older than the property.
    ram_format: Option<String>,
    /// `none` or `zstd`; none on dumps older than the property (which are not compressed).
    ram_compress: Option<String>,
    ram_sha256: Option<String>,
    /// The dump's size in bytes, when it is there.
    ram_bytes: Option<u64>,
    /// When retention dropped its RAM dump (unix seconds).
    ram_pruned: Option<String>,
    /// `vmsnap verify`'s last outcome: `<unix seconds> ok: …` or `<unix seconds> failed: …`.
    verified: Option<String>,
    /// Datasets cloned from it (`restore --as`, `mount`'s zvol clones, by hand).
    clones: Vec<String>,
    /// Where `vmsnap mount` has it, until `vmsnap umount`.
    mounted_at: Option<String>,
}

pub async fn run(cfg: &Config, zfs: &Zfs, only: Option<&str>, json: bool) -> Result<()> {
    let props = prop::LISTED;
    let mut rows = Vec::new();
    let domains = vmsnap::daemon::registry::select(cfg, only)?;
    for dom in &domains {
        let by_pool = engine::disks::domain_datasets(zfs, dom).await.with_context(|| format!("domain {}", dom.name))?;
        let mounts = vmsnap::restore::mount::mounted(&cfg.state_dir, &dom.name);
        for ds in by_pool.values().flatten() {
            let clones = zfs.clones(ds).await?;
            for s in zfs.list_snapshots(ds, &props).await? {
                let get = |k: PropName| s.props.iter().find(|(p, _)| **p == k).map(|(_, v)| v.clone());
                if get(prop::DOMAIN).as_deref() != Some(dom.name.as_str()) {
                    continue;
                }
                rows.push(Listed {
                    domain: dom.name.clone(),
                    snapshot: s.name.to_string(),
                    creation: s.creation,
                    consistency: get(prop::CONSISTENCY),
                    periods: get(prop::PERIODS),
                    ram_bytes: get(prop::RAM_DUMP).and_then(|d| std::fs::metadata(d).ok()).map(|m| m.len()),
                    ram_dump: get(prop::RAM_DUMP),
                    ram_format: get(prop::RAM_FORMAT),
                    ram_compress: get(prop::RAM_COMPRESS),
                    ram_sha256: get(prop::RAM_SHA256),
                    ram_pruned: get(prop::RAM_PRUNED),
                    verified: get(prop::VERIFIED),
                    clones: clones.get(s.name.snap()).cloned().unwrap_or_default(),
                    mounted_at: mounts.get(s.name.snap()).map(|m| {
                        let at = m.path.display().to_string();
                        if m.complete {
                            at
                        } else {
                            format!("{at} (interrupted: `vmsnap recover` undoes it)")
                        }
                    }),
                });
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        if rows.is_empty() {
            let names: Vec<&str> = domains.iter().map(|d| d.name.as_str()).collect();
            eprintln!("no snapshot of {} (taken by vmsnap) yet", if names.is_empty() { "any domain".into() } else { names.join(", ") });
        }
        for r in rows {
            let ram = match (&r.ram_dump, &r.ram_pruned) {
                (Some(d), _) => match (&r.ram_format, r.ram_bytes) {
                    (Some(f), Some(n)) => match r.ram_compress.as_deref().filter(|c| *c != "none") {
                        Some(c) => format!("{d} ({f}, {c}, {} MiB)", n >> 20),
                        None => format!("{d} ({f}, {} MiB)", n >> 20),
                    },
                    (None, Some(n)) => format!("{d} ({} MiB)", n >> 20),
                    (_, None) if std::path::Path::new(d).try_exists().is_ok_and(|e| !e) => format!("{d} (missing)"),
                    (_, None) => d.clone(),
                },
                (None, Some(_)) => "(RAM dump pruned)".into(),
                (None, None) => String::new(),
            };
            let mut also = String::new();
            if let Some(d) = &r.mounted_at {
                also.push_str(&format!(" [mounted at {d}]"));
            }
            if !r.clones.is_empty() {
                also.push_str(&format!(" [clones: {}]", r.clones.join(", ")));
            }
            println!(
                "{:<12} {:<70} {:<8} {:<18} {ram}{also}",
                r.domain,
                r.snapshot,
                r.consistency.as_deref().unwrap_or("-"),
                r.periods.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

/// A snapshot a replication target holds.
#[derive(serde::Serialize)]
struct OnTarget {
    domain: String,
    target: String,
    /// The source's dataset it is a copy of.
    dataset: String,
    snapshot: String,
    guid: u64,
    /// Its `vmsnap:*` properties there (`vmsnap:replica` = `complete` once its dump and
    /// properties are all there; `vmsnap:ram-dump` is the target's copy).
    props: std::collections::BTreeMap<String, String>,
}

/// `vmsnap list --target T`: each domain that replicates to `T` (or the one named), as `T` has it.
pub async fn target(cfg: &Config, zfs: &Zfs, only: Option<&str>, tname: &str, json: bool) -> Result<()> {
    let t = cfg.target(tname)?;
    let domains: Vec<_> = match only {
        // Named: whatever this host knows of it (a host that lost it knows only the name).
        Some(name) => vec![vmsnap::daemon::registry::known_or_named(cfg, name)?],
        None => {
            vmsnap::daemon::registry::select(cfg, None)?.into_iter().filter(|d| d.policy.replicate_to.iter().any(|r| r == tname)).collect()
        }
    };
    let mut rows = Vec::new();
    let mut in_progress = Vec::new();
    for dom in &domains {
        let listed = vmsnap::replicate::list_target(zfs, &cfg.state_dir, dom, t)
            .await
            .with_context(|| format!("domain {} on target {tname}", dom.name))?;
        for (ds, l) in listed {
            if l.resume_token.is_some() {
                in_progress.push(ds.to_string());
            }
            for s in l.snapshots {
                rows.push(OnTarget {
                    domain: dom.name.clone(),
                    target: tname.to_owned(),
                    dataset: ds.to_string(),
                    snapshot: s.name,
                    guid: s.guid,
                    props: s.props,
                });
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "target {tname} holds nothing of {}",
            if domains.is_empty() {
                "any domain (no domain replicates to it)".into()
            } else {
                domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
            }
        );
    }
    // Names and values are the target's word: shown without control characters.
    let shown = |s: &str| vmsnap::replicate::protocol::shown(s, 200);
    for r in rows {
        let get = |k: PropName| r.props.get(k.as_str()).map(|v| shown(v));
        let state = match get(prop::REPLICA).as_deref() {
            Some("complete") => "complete",
            _ if get(prop::DOMAIN).is_none() => "not vmsnap's",
            _ => "incomplete",
        };
        let ram = get(prop::RAM_DUMP).unwrap_or_default();
        println!(
            "{:<12} {:<70} {:<12} {:<8} {ram}",
            r.domain,
            format!("{}@{}", r.dataset, shown(&r.snapshot)),
            state,
            get(prop::CONSISTENCY).as_deref().unwrap_or("-")
        );
    }
    for ds in in_progress {
        println!("{ds}: an interrupted receive waits on the target (the next `vmsnap replicate` resumes it)");
    }
    Ok(())
}
