//! `vmsnap hook DOM OPERATION SUBOP EXTRA`, run by libvirt's qemu hook with the domain XML on
//! stdin: on `started` and `reconnect` it registers the domain with the daemon, on `stopped` and
//! `release` it unregisters it; every other operation does nothing.
//!
//! It must never hold up or fail a domain's start: it always reads stdin to the end, never calls
//! libvirt (that would deadlock), writes nothing to stdout (libvirt reads hook stdout as XML for
//! some operations), gives the daemon [`DAEMON_TIMEOUT`] and no more, and always exits 0. Why it
//! did nothing goes to its stderr; where libvirt puts that was not checked (on the rig libvirtd
//! runs detached).

use crate::daemon::dbus::client::Agent1Proxy;
use std::path::PathBuf;
use std::time::Duration;

/// How long the hook waits for the daemon, in all.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(2);

/// What the hook learns from the domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDomain {
    pub name: String,
    pub uuid: Option<String>,
    /// The QMP socket vmsnap may use: a `-qmp unix:PATH,…` in `<qemu:commandline>`.
    pub qmp: Option<PathBuf>,
    /// The agent socket vmsnap may use: `-chardev socket,id=vmsnap-qga,path=PATH,…`.
    pub qga: Option<PathBuf>,
    /// Disk images and block devices (`<disk device='disk'>` sources).
    pub disks: Vec<PathBuf>,
    /// Each disk's image format as the host defined it (`<driver type='qcow2'/>`), by source.
    pub formats: std::collections::BTreeMap<PathBuf, String>,
    pub nvram: Option<PathBuf>,
    /// The QEMU binary (`<devices><emulator>`).
    pub emulator: Option<PathBuf>,
}

/// The first child element called `name` (libvirt's own namespace, i.e. none).
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none())
}

fn text(n: Option<roxmltree::Node<'_, '_>>) -> Option<String> {
    n.and_then(|n| n.text()).map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Reads a libvirt domain XML.
pub fn parse_domain_xml(xml: &str) -> Result<HookDomain, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the domain XML does not parse: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("the XML's root is <{}>, not <domain>", root.tag_name().name()));
    }
    let name = text(child(root, "name")).ok_or("the domain XML has no <name>")?;
    let uuid = text(child(root, "uuid"));
    let nvram = text(child(root, "os").and_then(|os| child(os, "nvram"))).map(PathBuf::from);
    let mut disks = Vec::new();
    let mut formats = std::collections::BTreeMap::new();
    if let Some(devices) = child(root, "devices") {
        for d in devices.children().filter(|c| c.is_element() && c.tag_name().name() == "disk") {
            if d.attribute("device").unwrap_or("disk") != "disk" {
                continue;
            }
            if let Some(src) = child(d, "source") {
                if let Some(p) = src.attribute("file").or_else(|| src.attribute("dev")) {
                    disks.push(PathBuf::from(p));
                    if let Some(t) = child(d, "driver").and_then(|drv| drv.attribute("type")) {
                        formats.insert(PathBuf::from(p), t.to_owned());
                    }
                }
            }
        }
    }
    let args: Vec<&str> = root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "commandline" && c.tag_name().namespace() == Some(QEMU_NS))
        .flat_map(|c| c.children().filter(|a| a.is_element() && a.tag_name().name() == "arg"))
        .filter_map(|a| a.attribute("value"))
        .collect();
    let mut qmp = None;
    let mut qga = None;
    for w in args.windows(2) {
        match w[0] {
            "-qmp" => {
                if let Some(path) = w[1].strip_prefix("unix:").map(|r| r.split(',').next().unwrap_or("")) {
                    qmp.get_or_insert_with(|| PathBuf::from(path));
                }
            }
            "-chardev" => {
                let opts: Vec<&str> = w[1].split(',').collect();
                if opts.first() == Some(&"socket") && opts.contains(&"id=vmsnap-qga") {
                    qga = opts.iter().find_map(|o| o.strip_prefix("path=")).map(PathBuf::from);
                }
            }
            _ => {}
        }
    }
    let emulator = text(child(root, "devices").and_then(|d| child(d, "emulator"))).map(PathBuf::from);
    Ok(HookDomain { name, uuid, qmp, qga, disks, formats, nvram, emulator })
}

/// What the hook does for an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Register,
    Unregister,
    Nothing,
}

pub fn action(operation: &str) -> Action {
    match operation {
        "started" | "reconnect" => Action::Register,
        "stopped" | "release" => Action::Unregister,
        _ => Action::Nothing,
    }
}

/// Runs the hook; returns what happened, for stderr. Never fails, never waits long.
pub async fn run(args: &[String], xml: &str, bus_address: Option<&str>) -> String {
    let (Some(dom_arg), Some(op)) = (args.first(), args.get(1)) else {
        return format!("vmsnap hook: expected DOMAIN OPERATION SUBOP EXTRA, got {args:?}");
    };
    let act = action(op);
    // `verify --boot`'s scratch copies live for a minute and are never scheduled.
    if act == Action::Nothing || dom_arg.starts_with(crate::restore::clone::SCRATCH_PREFIX) {
        return String::new();
    }
    match tokio::time::timeout(DAEMON_TIMEOUT, call(act, dom_arg, xml, bus_address)).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => format!("vmsnap hook: {dom_arg} {op}: {e}"),
        Err(_) => format!("vmsnap hook: {dom_arg} {op}: the vmsnap daemon did not answer within {DAEMON_TIMEOUT:?}; it re-checks its registry when it starts"),
    }
}

async fn call(act: Action, dom_arg: &str, xml: &str, bus_address: Option<&str>) -> Result<String, String> {
    let conn = match bus_address {
        Some(a) => zbus::connection::Builder::address(a).map_err(|e| e.to_string())?.build().await,
        None => zbus::Connection::system().await,
    }
    .map_err(|e| format!("no D-Bus connection ({e}); is the vmsnap daemon running?"))?;
    let proxy = Agent1Proxy::new(&conn).await.map_err(|e| e.to_string())?;
    match act {
        Action::Register => {
            let d = parse_domain_xml(xml)?;
            if d.name != dom_arg {
                return Err(format!("the XML names domain {:?}, libvirt said {dom_arg:?}", d.name));
            }
            let Some(qmp) = &d.qmp else {
                return Ok(format!(
                    "vmsnap hook: {}: no vmsnap QMP socket in <qemu:commandline> (run `vmsnap enroll {}`); not registered",
                    d.name, d.name
                ));
            };
            let s = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            let disks: Vec<String> = d.disks.iter().map(|p| p.display().to_string()).collect();
            let disks: Vec<&str> = disks.iter().map(String::as_str).collect();
            let uuid = d.uuid.clone().unwrap_or_default();
            proxy
                .register_domain(&d.name, &uuid, &qmp.display().to_string(), &s(&d.qga), &disks, &s(&d.nvram), xml)
                .await
                .map_err(|e| format!("RegisterDomain: {e}"))?;
            Ok(String::new())
        }
        Action::Unregister => {
            proxy.unregister_domain(dom_arg).await.map_err(|e| format!("UnregisterDomain: {e}"))?;
            Ok(String::new())
        }
        Action::Nothing => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `started begin` stdin recorded from libvirt 9 (protocol-fixtures/libvirt/).
    const RECORDED: &str = include_str!("../../protocol-fixtures/libvirt/hook-stdin-started-begin.xml");

    #[test]
    fn reads_the_recorded_domain_xml() {
        let d = parse_domain_xml(RECORDED).unwrap();
        assert_eq!(d.name, "tiny");
        assert_eq!(d.uuid.as_deref(), Some("8c051271-1ae4-41b5-b738-a0a76228e276"));
        assert_eq!(d.qmp, Some(PathBuf::from("$RIG/lv/extra-qmp.sock")));
        assert_eq!(d.disks, [PathBuf::from("$RIG/lv/data.qcow2")]);
        // libvirt's own agent channel is libvirt's: not vmsnap's.
        assert_eq!(d.qga, None);
    }

    #[test]
    fn enrolled_sockets_nvram_and_block_disks() {
        let xml = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web</name><os><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'><source dev='/dev/zvol/tank/web'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/debian.iso'/></disk>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/><qemu:arg value='unix:/run/vmsnap/web.qmp,server=on,wait=off'/>
    <qemu:arg value='-chardev'/><qemu:arg value='socket,id=vmsnap-qga,path=/run/vmsnap/web.qga,server=on,wait=off'/>
  </qemu:commandline>
</domain>"#;
        let d = parse_domain_xml(xml).unwrap();
        assert_eq!(d.qmp, Some(PathBuf::from("/run/vmsnap/web.qmp")));
        assert_eq!(d.qga, Some(PathBuf::from("/run/vmsnap/web.qga")));
        assert_eq!(d.disks, [PathBuf::from("/dev/zvol/tank/web")]);
        assert_eq!(d.nvram, Some(PathBuf::from("/var/lib/libvirt/qemu/nvram/web_VARS.fd")));
    }

    #[test]
    fn bad_xml_says_what_is_wrong() {
        assert!(parse_domain_xml("<domain><name>x</name>").unwrap_err().contains("does not parse"));
        assert!(parse_domain_xml("<network/>").unwrap_err().contains("<network>"));
        assert!(parse_domain_xml("<domain/>").unwrap_err().contains("<name>"));
    }

    #[test]
    fn operations() {
        assert_eq!(action("started"), Action::Register);
        assert_eq!(action("reconnect"), Action::Register);
        assert_eq!(action("stopped"), Action::Unregister);
        assert_eq!(action("release"), Action::Unregister);
        for op in ["prepare", "start", "migrate", "restore", "attach"] {
            assert_eq!(action(op), Action::Nothing);
        }
    }
}
