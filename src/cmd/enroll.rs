//! `vmsnap enroll` / `unenroll`: fetch the persistent definition with `virsh dumpxml --inactive`,
//! edit it ([`vmsnap::libvirt::enroll`]), `virsh define` it; the original is kept in
//! `<state_dir>/enroll/<domain>.xml` (0600) and put back by `unenroll`. Both are idempotent and
//! take effect at the domain's next start. Never behind libvirt's back: only through virsh.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use vmsnap::config::{valid_domain_name, Config};
use vmsnap::libvirt::enroll::{enroll_xml, is_enrolled};
// The library's one virsh wrapper: the same connection URI, deadline and bounded output as every
// other virsh call vmsnap makes.
use vmsnap::libvirt::virsh::run as virsh;

fn backup_path(cfg: &Config, domain: &str) -> PathBuf {
    cfg.state_dir.join("enroll").join(format!("{domain}.xml"))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        vmsnap::engine::journal::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    vmsnap::fsutil::write_atomic(path, text.as_bytes(), 0o600)?;
    Ok(())
}

pub fn enroll(cfg: &Config, domain: &str) -> Result<()> {
    if !valid_domain_name(domain) {
        bail!("domain name {domain:?}: use letters, digits, '-', '_' and '.'");
    }
    let xml = virsh(&["dumpxml", "--inactive", "--security-info", domain])?;
    if is_enrolled(&xml) {
        println!("{domain} is already enrolled");
        return Ok(());
    }
    let e = enroll_xml(&xml).map_err(|e| anyhow::anyhow!("editing the definition of {domain}: {e}"))?;
    let backup = backup_path(cfg, domain);
    if !backup.exists() {
        write_private(&backup, &xml)?;
    }
    // A leading '.' no domain name has: it cannot be another domain's saved definition.
    let new = backup.with_file_name(format!(".{domain}.enrolled.xml"));
    write_private(&new, &e.xml)?;
    virsh(&["define", &new.display().to_string()])?;
    let _ = std::fs::remove_file(&new);
    println!("{domain} enrolled: vmsnap's QMP socket and guest-agent channel are in its definition");
    for w in &e.warnings {
        println!("  warning: {w}");
    }
    println!("  effective at the next start of {domain} (shut it down and start it; a reboot inside the guest is not enough)");
    println!("  the original definition is kept in {}; `vmsnap unenroll {domain}` restores it", backup.display());
    Ok(())
}

pub fn unenroll(cfg: &Config, domain: &str) -> Result<()> {
    if !valid_domain_name(domain) {
        bail!("domain name {domain:?}: use letters, digits, '-', '_' and '.'");
    }
    let backup = backup_path(cfg, domain);
    if !backup.exists() {
        let xml = virsh(&["dumpxml", "--inactive", domain])?;
        if is_enrolled(&xml) {
            bail!("{domain} is enrolled but its original definition is not in {}: remove vmsnap's <qemu:commandline> args with `virsh edit {domain}`", backup.display());
        }
        println!("{domain} is not enrolled");
        return Ok(());
    }
    virsh(&["define", &backup.display().to_string()])?;
    std::fs::remove_file(&backup).with_context(|| format!("removing {}", backup.display()))?;
    println!("{domain} unenrolled: its original definition is back; effective at its next start");
    Ok(())
}
