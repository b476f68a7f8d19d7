//! The few `virsh` calls restore makes (state, define, restore, the agent through libvirt): each
//! an argument vector against `LIBVIRT_DEFAULT_URI` or `qemu:///system`, stderr kept for the error.

use std::path::Path;
use std::process::Command;

/// What went wrong running virsh.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    #[error("running virsh (is libvirt-clients installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("virsh {args}: {stderr}")]
    Failed { args: String, stderr: String },
}

/// The connection URI: the environment's, or the system instance (where vmsnap's domains run).
fn uri() -> String {
    std::env::var("LIBVIRT_DEFAULT_URI").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "qemu:///system".into())
}

/// Runs `virsh -c URI ARGS`; its stdout.
pub fn run(args: &[&str]) -> Result<String, VirshError> {
    let out = Command::new("virsh").arg("-c").arg(uri()).args(args).output().map_err(VirshError::Spawn)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().chars().take(2000).collect();
        return Err(VirshError::Failed { args: args.join(" "), stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The QEMU binaries libvirt lists on this host (`virsh capabilities`, each guest's `<emulator>`).
pub fn host_emulators() -> Result<Vec<std::path::PathBuf>, VirshError> {
    let xml = run(&["capabilities"])?;
    Ok(emulators_in(&xml))
}

fn emulators_in(capabilities: &str) -> Vec<std::path::PathBuf> {
    let Ok(doc) = roxmltree::Document::parse(capabilities) else { return Vec::new() };
    let mut out: Vec<std::path::PathBuf> = doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "emulator")
        .filter_map(|n| n.text().map(|t| std::path::PathBuf::from(t.trim())))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The domain's state as virsh words it (`running`, `paused`, `shut off`, …); `None` when libvirt
/// has no domain of that name (or virsh is not installed: then libvirt runs nothing).
pub fn domstate(domain: &str) -> Result<Option<String>, VirshError> {
    match run(&["domstate", "--", domain]) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(VirshError::Failed { stderr, .. }) if stderr.contains("ailed to get domain") || stderr.contains("no domain with") => Ok(None),
        Err(VirshError::Spawn(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether libvirt has a persistent definition of the domain.
pub fn is_persistent(domain: &str) -> Result<bool, VirshError> {
    match run(&["dominfo", "--", domain]) {
        Ok(info) => Ok(info.lines().any(|l| l.starts_with("Persistent:") && l.trim_end().ends_with("yes"))),
        Err(VirshError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn define(xml: &Path) -> Result<(), VirshError> {
    run(&["define", &xml.to_string_lossy()]).map(drop)
}

/// `virsh restore` of a save image; the domain runs (or stays paused, `paused`) afterwards.
pub fn restore(image: &Path, paused: bool) -> Result<(), VirshError> {
    let image = image.to_string_lossy();
    let mut args = vec!["restore", image.as_ref()];
    if paused {
        args.push("--paused");
    }
    run(&args).map(drop)
}

/// `virsh start`, paused when `paused` (the caller sets it up, then [`resume`]s it).
pub fn start(domain: &str, paused: bool) -> Result<(), VirshError> {
    let mut args = vec!["start"];
    if paused {
        args.push("--paused");
    }
    args.extend(["--", domain]);
    run(&args).map(drop)
}

pub fn resume(domain: &str) -> Result<(), VirshError> {
    run(&["resume", "--", domain]).map(drop)
}

/// `virsh destroy` (QEMU killed); a domain that does not run is not an error.
pub fn destroy(domain: &str) -> Result<(), VirshError> {
    match run(&["destroy", "--", domain]) {
        Err(VirshError::Failed { stderr, .. }) if stderr.contains("not running") || stderr.contains("ailed to get domain") => Ok(()),
        r => r.map(drop),
    }
}

/// `virsh undefine`; the nvram file stays (its owner removes it). No definition is not an error.
pub fn undefine(domain: &str) -> Result<(), VirshError> {
    match run(&["undefine", "--keep-nvram", "--", domain]) {
        Err(VirshError::Failed { stderr, .. }) if stderr.contains("ailed to get domain") || stderr.contains("no domain with") => Ok(()),
        r => r.map(drop),
    }
}

/// The MAC addresses of the running domain's network interfaces.
pub fn macs(domain: &str) -> Result<Vec<String>, VirshError> {
    let xml = run(&["dumpxml", "--", domain])?;
    Ok(interface_macs(&xml))
}

fn interface_macs(xml: &str) -> Vec<String> {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return Vec::new() };
    doc.descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "interface" && n.parent().is_some_and(|p| p.has_tag_name("devices")))
        .filter_map(|i| i.children().find(|c| c.has_tag_name("mac"))?.attribute("address").map(str::to_owned))
        .collect()
}

/// Takes every network link of the domain down (`domif-setlink … down`): the guest sees its
/// cable pulled and QEMU drops what it sends.
pub fn links_down(domain: &str) -> Result<Vec<String>, VirshError> {
    let macs = macs(domain)?;
    for mac in &macs {
        run(&["domif-setlink", "--", domain, mac, "down"])?;
    }
    Ok(macs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hosts_emulators_from_capabilities() {
        let caps = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
            <emulator>/usr/bin/qemu-system-x86_64</emulator><domain type='qemu'/></arch></guest>\
            <guest><arch name='i686'><emulator>/usr/bin/qemu-system-i386</emulator></arch></guest></capabilities>";
        let found = super::emulators_in(caps);
        assert_eq!(found, [std::path::PathBuf::from("/usr/bin/qemu-system-i386"), "/usr/bin/qemu-system-x86_64".into()]);
        assert!(super::emulators_in("not xml").is_empty());
    }

    #[test]
    fn interface_macs_of_a_live_definition() {
        let xml = "<domain><devices>
            <interface type='network'><mac address='52:54:00:aa:bb:01'/><source network='default'/></interface>
            <interface type='bridge'><mac address='52:54:00:aa:bb:02'/><target dev='vnet3'/></interface>
            <hostdev><interface/></hostdev>
          </devices></domain>";
        assert_eq!(super::interface_macs(xml), ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"]);
        assert!(super::interface_macs("<domain><devices/></domain>").is_empty());
    }
}
