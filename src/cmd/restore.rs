//! `vmsnap restore DOM SNAPSHOT`: the plan first (what is rolled back, what a rollback would
//! destroy, what the restored disks are), then the steps with a line each, then the report.

use anyhow::{Context, Result};
use std::sync::Arc;
use vmsnap::config::Config;
use vmsnap::restore::{self, Plan, Request};
use vmsnap::zfs::Zfs;

/// `--from TARGET`: the snapshot and its dump brought back first (see
/// [`vmsnap::replicate::pull`]). With `--dry-run` it says what it would pull and returns true
/// (the restore's own plan needs the snapshot here).
#[allow(clippy::too_many_arguments)]
pub async fn pull(
    cfg: &Config,
    zfs: &Zfs,
    domain: &str,
    snapshot: &str,
    tname: &str,
    how: vmsnap::replicate::pull::PullOptions,
    dry_run: bool,
    json: bool,
) -> Result<bool> {
    let target = cfg.target(tname)?;
    // A libvirt domain is in no registry once it stopped, nor anywhere on a host that lost it.
    let dom = vmsnap::daemon::registry::known_or_named(cfg, domain)?;
    if dry_run {
        println!("would bring {snapshot} of {domain} back from {tname} (and its RAM dump), then restore from it; `vmsnap list {domain} --target {tname}` shows what it holds");
        return Ok(true);
    }
    let show = |s: &str| {
        if !json {
            eprintln!("vmsnap: {s}")
        }
    };
    let r = vmsnap::replicate::pull::pull(zfs, &cfg.state_dir, &cfg.ram_dir, &dom, target, snapshot, how, &show)
        .await
        .with_context(|| format!("bringing {snapshot} back from {tname}"))?;
    if !json {
        for s in &r.steps {
            eprintln!("vmsnap: {s}");
        }
        for d in &r.destroyed {
            eprintln!("vmsnap: destroyed {d} (newer, to receive onto the common snapshot)");
        }
        if let Some(d) = &r.ram_dump {
            eprintln!("vmsnap: RAM dump back at {d} ({} MiB, sha256 checked)", r.ram_bytes >> 20);
        }
    }
    Ok(false)
}

pub async fn run(cfg: &Config, zfs: &Zfs, req: Request, dry_run: bool, json: bool) -> Result<()> {
    let what = format!("restore of {} to {}", req.domain, req.snapshot);
    let plan = restore::plan(cfg, zfs, &req).await.with_context(|| what.clone())?;
    if dry_run {
        if json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            show(&plan);
        }
        return Ok(());
    }
    // Said before it starts, not after.
    for w in &plan.warnings {
        eprintln!("vmsnap: warning: {w}");
    }
    let progress: restore::Progress = if json { Arc::new(|_: &str| {}) } else { Arc::new(|s: &str| eprintln!("vmsnap: {s}")) };
    let report = restore::apply(cfg, zfs, plan, progress).await.with_context(|| what.clone())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("restored {} to {} in {:.1} s", report.domain, report.snapshot, report.seconds);
    for s in &report.rolled_back {
        println!("  rolled back {s}");
    }
    for s in &report.destroyed {
        println!("  destroyed   {s}");
    }
    for d in &report.deleted_dumps {
        println!("  deleted     {} (its RAM dump)", d.display());
    }
    if let Some(n) = &report.nvram {
        println!("  nvram       {}", n.display());
    }
    if report.redefined {
        println!("  redefined   from the snapshot's XML");
    }
    if let Some(d) = &report.resumed_from {
        show_resumed(d, report.thawed, report.clock_set);
    }
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    Ok(())
}

/// What a resume did: the dump it checked, the thaw, the clock (an in-place restore's and a copy's).
fn show_resumed(d: &restore::dump::DumpCheck, thawed: Option<i64>, clock_set: bool) {
    println!("  resumed     from {} ({} MiB, sha256 {} checked)", d.path.display(), d.bytes >> 20, &d.sha256[..16]);
    match thawed {
        Some(n) if n >= 0 => println!("  thawed      {n} filesystems (saved frozen)"),
        Some(_) => println!("  thawed      (through libvirt)"),
        None => {}
    }
    if clock_set {
        println!("  clock       set from the host");
    }
}

fn show(p: &Plan) {
    let manager = match p.manager {
        restore::Manager::Config => "config",
        restore::Manager::Libvirt => "libvirt",
    };
    println!("restore {} ({manager} domain) to {}:", p.domain, p.snapshot);
    println!("  consistency {}", p.consistency.as_deref().unwrap_or("unknown"));
    for s in &p.snapshots {
        println!("  roll back   {s}");
    }
    for s in &p.newer {
        println!("  destroy     {s} (newer)");
    }
    for d in &p.newer_dumps {
        println!("  delete      {} (a destroyed snapshot's RAM dump)", d.display());
    }
    if let Some((_, home)) = &p.nvram {
        println!("  nvram       {} from the snapshot", home.display());
    }
    match (&p.xml, p.redefine, p.manager) {
        (Some(x), true, _) => println!("  virsh define {}", x.display()),
        (Some(x), false, restore::Manager::Libvirt) if p.resume.is_none() => {
            println!("  domain XML  {} (libvirt has no definition of it: start it with `virsh create` of that file)", x.display())
        }
        (Some(x), false, _) => println!("  domain XML  {} (the snapshot's)", x.display()),
        (None, _, _) => {}
    }
    if let Some(r) = &p.resume {
        println!("  resume      from {} ({}), checked against its sha256 first", r.dump.display(), r.compress);
        if r.quiesced {
            println!("  thaw        the guest after the resume (saved frozen)");
        }
        println!("  clock       set from the host's after the resume");
    }
    for w in &p.warnings {
        println!("  warning: {w}");
    }
    for r in &p.refused {
        match &r.needs {
            Some(flag) => println!("  refused:    {} (needs {flag})", r.why),
            None => println!("  refused:    {}", r.why),
        }
    }
    if !p.refused.is_empty() {
        println!("  (a dry run: nothing was changed; the real run stops at the first refusal)");
    }
}

/// `--as NEW`: the clone plan, then the clones, nvram and definition.
#[allow(clippy::too_many_arguments)]
pub async fn run_as(
    cfg: &Config,
    zfs: &Zfs,
    domain: &str,
    snapshot: &str,
    new: &str,
    promote: bool,
    start: restore::clone::Start,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    let what = format!("restore of {domain} {snapshot} as {new}");
    let plan = restore::clone::plan(cfg, zfs, domain, snapshot, new, promote, start).await.with_context(|| what.clone())?;
    if dry_run {
        if json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            println!("restore {domain} {snapshot} as a new domain {new}:");
            for (s, c) in &plan.clones {
                println!("  zfs clone   {s} {c}");
            }
            if let Some((_, home)) = &plan.nvram {
                println!("  nvram       {} (a copy of the snapshot's)", home.display());
            }
            match plan.manager {
                restore::Manager::Libvirt => println!("  virsh define the snapshot's XML with a new name, UUID, MACs, disk and nvram paths"),
                restore::Manager::Config => println!(
                    "  [domain.{new}] appended to {}: disks on the clones, its own sockets and nvram, its `start` rewritten, autosnap = false",
                    cfg.path.display()
                ),
            }
            if let Some(r) = &plan.resume {
                println!(
                    "  resume      from {} ({}), checked against its sha256 first, its network links down",
                    r.dump.display(),
                    r.compress
                );
                if r.quiesced {
                    println!("  thaw        the guest after the resume (saved frozen)");
                }
                println!("  clock       set from the host's after the resume");
            }
            if promote {
                println!("  zfs promote each clone");
            }
            for w in &plan.warnings {
                println!("  warning: {w}");
            }
        }
        return Ok(());
    }
    for w in &plan.warnings {
        eprintln!("vmsnap: warning: {w}");
    }
    let progress: restore::Progress = if json { Arc::new(|_: &str| {}) } else { Arc::new(|s: &str| eprintln!("vmsnap: {s}")) };
    let report = restore::clone::apply(cfg, zfs, plan, progress).await.with_context(|| what.clone())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if report.uuid.is_empty() {
        println!("made {} from {} {} in {:.1} s", report.new_name, report.domain, report.snapshot, report.seconds);
    } else {
        println!(
            "defined {} (uuid {}) from {} {} in {:.1} s",
            report.new_name, report.uuid, report.domain, report.snapshot, report.seconds
        );
    }
    for c in &report.clones {
        println!("  clone       {c}{}", if report.promoted { " (promoted)" } else { "" });
    }
    if let Some(n) = &report.nvram {
        println!("  nvram       {}", n.display());
    }
    match &report.resumed_from {
        Some(d) => show_resumed(d, report.thawed, report.clock_set),
        None if report.uuid.is_empty() => {
            println!("  configured  [domain.{}] in {} (autosnap = false)", report.new_name, report.xml.display())
        }
        None => println!("  start it:   virsh start {}", report.new_name),
    }
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    Ok(())
}

/// `vmsnap mount`: prints where each file system of the snapshot is (read-only).
pub async fn mount(cfg: &Config, zfs: &Zfs, domain: &str, snapshot: &str, path: Option<std::path::PathBuf>, json: bool) -> Result<()> {
    let path = path.unwrap_or_else(|| std::path::Path::new("/mnt/vmsnap").join(domain).join(snapshot));
    let st = restore::mount::mount(cfg, zfs, domain, snapshot, &path).await.with_context(|| format!("mounting {domain}@{snapshot}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!(
        "{domain}@{snapshot} mounted read-only at {} (the snapshot is held until `vmsnap umount {domain} {snapshot}`):",
        st.path.display()
    );
    for v in &st.volumes {
        match (&v.mountpoint, &v.skipped) {
            (Some(m), _) => println!("  {} ({}) → {}", v.device, v.fstype.as_deref().unwrap_or("?"), m.display()),
            (None, Some(why)) => println!("  {}: not mounted: {why}", v.device),
            (None, None) => {}
        }
    }
    Ok(())
}

/// `vmsnap umount`.
pub async fn umount(cfg: &Config, zfs: &Zfs, domain: &str, snapshot: &str, json: bool) -> Result<()> {
    let st = restore::mount::umount(cfg, zfs, domain, snapshot).await.with_context(|| format!("unmounting {domain}@{snapshot}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!("{domain}@{snapshot}: unmounted from {}, hold released", st.path.display());
    }
    Ok(())
}
