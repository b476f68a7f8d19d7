//! Enrolment: the edit of a persistent libvirt domain definition that gives vmsnap a QMP socket
//! and a guest-agent channel of its own through `<qemu:commandline>`. Pure text in, text out;
//! `vmsnap enroll` fetches and defines it with `virsh`.
//!
//! The guest's agent listens on the virtio-serial port `org.qemu.guest_agent.0`, and a socket
//! chardev takes one client: vmsnap can only have the agent if libvirt's own agent `<channel>`
//! goes. Enrolment therefore removes it and says so — libvirt's agent-based commands
//! (`virsh domfsfreeze`, `shutdown --mode agent`, `set-user-password`, …) stop working for the
//! domain. No way to share the channel was found, so no `--keep-libvirt-agent` is offered.
//! The sockets live in `/var/lib/libvirt/qemu/`, where QEMU (as `libvirt-qemu`) may create them.

use std::path::PathBuf;

const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The sockets vmsnap gives `domain`.
pub fn sockets(domain: &str) -> (PathBuf, PathBuf) {
    let dir = PathBuf::from("/var/lib/libvirt/qemu");
    (dir.join(format!("vmsnap-{domain}.qmp")), dir.join(format!("vmsnap-{domain}.qga")))
}

/// What enrolling changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub xml: String,
    pub name: String,
    /// Said to the user: what stops working.
    pub warnings: Vec<String>,
}

/// Whether `xml` already carries vmsnap's sockets.
pub fn is_enrolled(xml: &str) -> bool {
    xml.contains("id=vmsnap-qga")
}

/// Adds vmsnap's QMP socket and agent channel to an inactive domain definition.
pub fn enroll_xml(xml: &str) -> Result<Enrolled, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the domain XML does not parse: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("the XML's root is <{}>, not <domain>", root.tag_name().name()));
    }
    let name = root
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| crate::config::valid_domain_name(n))
        .ok_or("the domain has no <name> vmsnap can use (letters, digits, '-', '_', '.')")?
        .to_owned();
    let (qmp, qga) = sockets(&name);
    let mut warnings = Vec::new();
    // Edits as (byte range, replacement), applied from the end so ranges stay valid.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    if let Some(devices) = root.children().find(|c| c.is_element() && c.tag_name().name() == "devices") {
        for ch in devices.children().filter(|c| c.is_element() && c.tag_name().name() == "channel") {
            let is_agent =
                ch.children().any(|t| t.is_element() && t.tag_name().name() == "target" && t.attribute("name") == Some(AGENT_PORT));
            if is_agent {
                edits.push((line_range(xml, ch.range()), String::new()));
                warnings.push(format!(
                    "libvirt's guest-agent channel is removed: libvirt's agent commands (virsh domfsfreeze, shutdown --mode agent, set-user-password, …) stop working for {name}; vmsnap now talks to the agent"
                ));
            }
        }
    }
    let prefix = root.namespaces().find(|n| n.uri() == QEMU_NS).and_then(|n| n.name()).map(str::to_owned);
    let p = prefix.clone().unwrap_or_else(|| "qemu".into());
    let args = [
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-chardev".to_owned(),
        format!("socket,id=vmsnap-qga,path={},server=on,wait=off", qga.display()),
        // JSON, like libvirt's own `-device`s: QEMU creates every `key=value` device before any
        // JSON one, so a `key=value` controller here would take the PCI slot libvirt assigned to
        // one of its devices (measured: "slot 2 function 0 not available for virtio-serial-pci").
        "-device".to_owned(),
        r#"{"driver":"virtio-serial-pci","id":"vmsnap-vser"}"#.to_owned(),
        "-device".to_owned(),
        format!(r#"{{"driver":"virtserialport","bus":"vmsnap-vser.0","chardev":"vmsnap-qga","name":"{AGENT_PORT}"}}"#),
    ];
    let arg_lines: String = args.iter().map(|a| format!("    <{p}:arg value='{a}'/>\n")).collect();
    let existing =
        root.children().find(|c| c.is_element() && c.tag_name().name() == "commandline" && c.tag_name().namespace() == Some(QEMU_NS));
    match existing {
        Some(cl) => {
            // Inside the existing block, before its end tag.
            let end = cl.range().end;
            let close = xml[..end].rfind("</").ok_or("cannot find the end of <qemu:commandline>")?;
            edits.push((close..close, format!("{}  ", arg_lines.trim_start())));
        }
        None => {
            let close = xml.rfind("</domain>").ok_or("no </domain>")?;
            edits.push((close..close, format!("  <{p}:commandline>\n{arg_lines}  </{p}:commandline>\n")));
        }
    }
    if prefix.is_none() {
        let at = xml.find("<domain").ok_or("no <domain")? + "<domain".len();
        edits.push((at..at, format!(" xmlns:qemu='{QEMU_NS}'")));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_owned();
    for (r, with) in edits {
        out.replace_range(r, &with);
    }
    roxmltree::Document::parse(&out).map_err(|e| format!("vmsnap produced XML that does not parse (a bug): {e}"))?;
    Ok(Enrolled { xml: out, name, warnings })
}

/// `range` widened to whole lines when it stands alone on them (no blank line left behind).
fn line_range(xml: &str, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let start = xml[..range.start].rfind('\n').map_or(0, |i| i + 1);
    let end = xml[range.end..].find('\n').map_or(xml.len(), |i| range.end + i + 1);
    if xml[start..range.start].trim().is_empty() && xml[range.end..end].trim().is_empty() {
        start..end
    } else {
        range
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::hook::parse_domain_xml;

    const INACTIVE: &str = "<domain type='qemu'>
  <name>web</name>
  <uuid>8c051271-1ae4-41b5-b738-a0a76228e276</uuid>
  <devices>
    <disk type='file' device='disk'><source file='/tank/vms/web/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
";

    #[test]
    fn enrolment_adds_sockets_removes_libvirts_agent_and_the_hook_finds_them() {
        let e = enroll_xml(INACTIVE).unwrap();
        assert!(!e.xml.contains("<channel"), "{}", e.xml);
        assert!(e.warnings[0].contains("domfsfreeze"));
        let d = parse_domain_xml(&e.xml).unwrap();
        assert_eq!(d.qmp, Some(PathBuf::from("/var/lib/libvirt/qemu/vmsnap-web.qmp")));
        assert_eq!(d.qga, Some(PathBuf::from("/var/lib/libvirt/qemu/vmsnap-web.qga")));
        assert_eq!(d.disks, [PathBuf::from("/tank/vms/web/root.qcow2")]);
        assert!(is_enrolled(&e.xml) && !is_enrolled(INACTIVE));
        // Devices as JSON, created after libvirt's own (also JSON) in command-line order.
        assert!(e.xml.contains(r#"<qemu:arg value='{"driver":"virtio-serial-pci","id":"vmsnap-vser"}'/>"#), "{}", e.xml);
    }

    #[test]
    fn an_existing_commandline_and_prefix_are_kept() {
        let xml = "<domain type='qemu' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>db</name>
  <q:commandline>
    <q:arg value='-smbios'/>
    <q:arg value='type=0'/>
  </q:commandline>
</domain>";
        let e = enroll_xml(xml).unwrap();
        assert!(e.xml.contains("<q:arg value='-smbios'/>") && e.xml.contains("<q:arg value='-qmp'/>"), "{}", e.xml);
        assert_eq!(e.xml.matches("commandline>").count(), 2, "one block: {}", e.xml);
        assert!(e.warnings.is_empty());
        assert_eq!(parse_domain_xml(&e.xml).unwrap().qmp, Some(PathBuf::from("/var/lib/libvirt/qemu/vmsnap-db.qmp")));
    }

    #[test]
    fn the_recorded_libvirt_xml_enrolls() {
        let recorded = include_str!("../../protocol-fixtures/libvirt/hook-stdin-started-begin.xml");
        let e = enroll_xml(recorded).unwrap();
        let d = parse_domain_xml(&e.xml).unwrap();
        // Its existing extra -qmp comes first and stays; the agent chardev is vmsnap's.
        assert_eq!(d.qmp, Some(PathBuf::from("$RIG/lv/extra-qmp.sock")));
        assert_eq!(d.qga, Some(PathBuf::from("/var/lib/libvirt/qemu/vmsnap-tiny.qga")));
        assert!(!e.xml.contains("org.qemu.guest_agent.0' state="));
    }

    #[test]
    fn bad_xml_is_refused() {
        assert!(enroll_xml("<domain>").unwrap_err().contains("does not parse"));
        assert!(enroll_xml("<domain><name>a b</name></domain>").unwrap_err().contains("<name>"));
    }
}
