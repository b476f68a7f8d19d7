//! The domain XML of a restore `--as NEW`: the snapshot's definition rewritten for a second VM
//! that runs beside the first — its name, a new UUID, no MAC address (libvirt makes new ones),
//! its disks on the clones, its own nvram file and vmsnap's own sockets for it. Edits are made
//! on the text at the ranges the parser reports, so everything else stays byte for byte.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// What changes.
#[derive(Debug, Clone)]
pub struct Renames {
    pub name: String,
    pub uuid: String,
    /// (old, new) path prefixes of the disks: dataset mountpoints and `/dev/zvol/` names.
    pub paths: Vec<(PathBuf, PathBuf)>,
    /// The new VM's nvram file, when the domain has one.
    pub nvram: Option<PathBuf>,
    /// (old, new) strings in `<qemu:arg value=…>`: vmsnap's QMP and agent socket paths.
    pub args: Vec<(String, String)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

/// The path under the new prefix, if `p` is under one of the old ones.
pub(super) fn moved(p: &Path, paths: &[(PathBuf, PathBuf)]) -> Option<PathBuf> {
    paths
        .iter()
        .find_map(|(old, new)| p.strip_prefix(old).ok().map(|rest| if rest.as_os_str().is_empty() { new.clone() } else { new.join(rest) }))
}

/// The whole line of an element when it stands alone on it, else just the element.
fn line_of(xml: &str, r: Range<usize>) -> Range<usize> {
    let start = xml[..r.start].rfind('\n').map_or(0, |i| i + 1);
    let end = xml[r.end..].find('\n').map_or(xml.len(), |i| r.end + i + 1);
    if xml[start..r.start].trim().is_empty() && xml[r.end..end].trim().is_empty() {
        start..end
    } else {
        r
    }
}

/// The new VM's copy of a per-VM file: on the clones if it was on the datasets, else beside
/// the original with the new name in front (`console.log` → `web2-console.log`).
pub(super) fn own_file(p: &Path, new: &str, paths: &[(PathBuf, PathBuf)]) -> PathBuf {
    if let Some(m) = moved(p, paths) {
        return m;
    }
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.with_file_name(format!("{new}-{name}"))
}

/// Rewrites `xml` (a libvirt domain definition). A disk (`device='disk'`) whose source is not on
/// the cloned datasets is refused: the two VMs would write one image.
pub fn rewrite(xml: &str, r: &Renames) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the snapshot's domain XML does not parse: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("the snapshot's XML is a <{}>, not a <domain>", root.tag_name().name()));
    }
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let text_of = |n: roxmltree::Node| n.first_child().filter(|t| t.is_text()).map(|t| t.range());
    let name = child(root, "name").and_then(text_of).ok_or("the snapshot's XML has no <name>")?;
    edits.push((name, escape(&r.name)));
    match child(root, "uuid").and_then(text_of) {
        Some(u) => edits.push((u, r.uuid.clone())),
        None => return Err("the snapshot's XML has no <uuid>".into()),
    }
    // A live definition carries the running domain's id.
    if let Some(id) = root.attribute_node("id") {
        edits.push((id.range(), String::new()));
    }
    if let Some(os) = child(root, "os") {
        if let Some(nv) = child(os, "nvram") {
            let new = r.nvram.as_ref().ok_or("the domain has an <nvram> but the snapshot holds no nvram copy")?;
            match text_of(nv) {
                Some(t) => edits.push((t, escape(&new.to_string_lossy()))),
                None => edits.push((nv.range(), format!("<nvram>{}</nvram>", escape(&new.to_string_lossy())))),
            }
        }
    }
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(|c| c.is_element()) {
            match dev.tag_name().name() {
                "interface" => {
                    if let Some(mac) = child(dev, "mac") {
                        edits.push((line_of(xml, mac.range()), String::new()));
                    }
                }
                // A file-backed console or serial log is the VM's own: two VMs cannot share it
                // (virtlogd locks it). Renamed beside the original.
                "serial" | "console" | "parallel" | "channel" if dev.attribute("type") == Some("file") => {
                    let logs = dev.children().filter(|c| c.is_element() && c.tag_name().name() == "log");
                    for (node, attr) in child(dev, "source").map(|s| (s, "path")).into_iter().chain(logs.map(|l| (l, "file"))) {
                        if let Some(a) = node.attribute_node(attr) {
                            edits.push((a.range_value(), escape(&own_file(Path::new(a.value()), &r.name, &r.paths).to_string_lossy())));
                        }
                    }
                }
                "disk" => {
                    let Some(src) = child(dev, "source") else { continue };
                    let is_disk = dev.attribute("device").unwrap_or("disk") == "disk";
                    // A storage-pool volume or a network disk names no file vmsnap can move to
                    // the clone: the copy would run on the original's.
                    if is_disk && matches!(dev.attribute("type"), Some("volume" | "network")) {
                        return Err(format!(
                            "a <disk type='{}'> is not a file or block device vmsnap can move to the clone: the new VM would write the original's",
                            dev.attribute("type").unwrap_or_default()
                        ));
                    }
                    for attr in src.attributes().filter(|a| matches!(a.name(), "file" | "dev")) {
                        match moved(Path::new(attr.value()), &r.paths) {
                            Some(new) => edits.push((attr.range_value(), escape(&new.to_string_lossy()))),
                            None if is_disk => {
                                return Err(format!(
                                    "disk {} is not on the snapshot's datasets: the new VM would write the same image",
                                    attr.value()
                                ))
                            }
                            None => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for n in root.descendants().filter(|n| n.is_element() && n.tag_name().name() == "arg") {
        if let Some(a) = n.attribute_node("value") {
            let mut v = a.value().to_owned();
            for (old, new) in &r.args {
                v = v.replace(old.as_str(), new);
            }
            if v != a.value() {
                edits.push((a.range_value(), escape(&v)));
            }
        }
    }
    edits.sort_by_key(|(range, _)| std::cmp::Reverse(range.start));
    let mut out = xml.to_owned();
    for (range, with) in edits {
        out.replace_range(range, &with);
    }
    Ok(out)
}

/// The clone's dataset name for `dataset` of domain `old` restored as `new`: the domain's name in
/// its last component replaced (`tank/vms/web-data` → `tank/vms/web2-data`), else `-<new>` added.
pub fn clone_name(dataset: &str, old: &str, new: &str) -> String {
    let (parent, last) = dataset.rsplit_once('/').map_or(("", dataset), |(p, l)| (p, l));
    let renamed = if last.contains(old) { last.replacen(old, new, 1) } else { format!("{last}-{new}") };
    if parent.is_empty() {
        renamed
    } else {
        format!("{parent}/{renamed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='qemu' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web</name>
  <uuid>5e1f0d1c-8a53-4b1e-9a3c-6c0e2b7d9f41</uuid>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/tank/vms/web/disk0.qcow2'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/zvol/tank/vms/web-data'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/debian.iso'/>
    </disk>
    <serial type='file'>
      <source path='/var/log/vm/web-console.log'/>
      <log file='/var/log/vm/web-serial.log' append='on'/>
      <target port='0'/>
    </serial>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/vmsnap/web.qmp,server=on,wait=off'/>
    <qemu:arg value='socket,id=vmsnap-qga,path=/run/vmsnap/web.qga,server=on,wait=off'/>
  </qemu:commandline>
</domain>
";

    fn renames() -> Renames {
        Renames {
            name: "web2".into(),
            uuid: "0b7e1d2c-0000-4000-8000-000000000002".into(),
            paths: vec![
                ("/tank/vms/web".into(), "/tank/vms/web2".into()),
                ("/dev/zvol/tank/vms/web-data".into(), "/dev/zvol/tank/vms/web2-data".into()),
            ],
            nvram: Some("/var/lib/libvirt/qemu/nvram/web2_VARS.fd".into()),
            args: vec![
                ("/run/vmsnap/web.qmp".into(), "/run/vmsnap/web2.qmp".into()),
                ("/run/vmsnap/web.qga".into(), "/run/vmsnap/web2.qga".into()),
            ],
        }
    }

    #[test]
    fn a_second_vm_gets_its_own_everything() {
        let out = rewrite(XML, &renames()).unwrap();
        for want in [
            "<name>web2</name>",
            "<uuid>0b7e1d2c-0000-4000-8000-000000000002</uuid>",
            "<nvram>/var/lib/libvirt/qemu/nvram/web2_VARS.fd</nvram>",
            "<source file='/tank/vms/web2/disk0.qcow2'/>",
            "<source dev='/dev/zvol/tank/vms/web2-data'/>",
            "<source file='/srv/iso/debian.iso'/>",
            "unix:/run/vmsnap/web2.qmp,server=on",
            "path=/run/vmsnap/web2.qga,server=on",
            "<source network='default'/>",
            "<source path='/var/log/vm/web2-web-console.log'/>",
            "<log file='/var/log/vm/web2-web-serial.log' append='on'/>",
        ] {
            assert!(out.contains(want), "{want} missing in\n{out}");
        }
        for gone in ["52:54:00", "id='7'", "/tank/vms/web/", "/run/vmsnap/web."] {
            assert!(!out.contains(gone), "{gone} left in\n{out}");
        }
        let doc = roxmltree::Document::parse(&out).unwrap();
        assert_eq!(doc.root_element().children().filter(|c| c.is_element()).count(), 5);
        assert!(out.contains("<source path='/var/log/vm/web2-web-console.log'/>"));
    }

    #[test]
    fn a_disk_outside_the_snapshot_is_refused() {
        let xml = XML.replace("/tank/vms/web/disk0.qcow2", "/srv/shared/disk0.qcow2");
        let e = rewrite(&xml, &renames()).unwrap_err();
        assert!(e.contains("/srv/shared/disk0.qcow2"), "{e}");
        let e = rewrite(&XML.replace("<nvram>", "<nvramx>").replace("</nvram>", "</nvramx>"), &renames());
        assert!(e.is_ok(), "no nvram element: nothing to rename");
        let e = rewrite(XML, &Renames { nvram: None, ..renames() }).unwrap_err();
        assert!(e.contains("nvram"), "{e}");
        // A pool volume or a network disk names nothing vmsnap can move: refused, not warned.
        let volume = XML.replace(
            "<disk type='block' device='disk'>\n      <source dev='/dev/zvol/tank/vms/web-data'/>",
            "<disk type='volume' device='disk'>\n      <source pool='tank' volume='vms/web-data'/>",
        );
        assert_ne!(volume, XML);
        assert!(rewrite(&volume, &renames()).unwrap_err().contains("type='volume'"));
        let network = XML.replace(
            "<disk type='block' device='disk'>\n      <source dev='/dev/zvol/tank/vms/web-data'/>",
            "<disk type='network' device='disk'>\n      <source protocol='nbd' name='web'/>",
        );
        assert!(rewrite(&network, &renames()).unwrap_err().contains("type='network'"));
    }

    #[test]
    fn clone_names_follow_the_domain_name() {
        assert_eq!(clone_name("tank/vms/web", "web", "web2"), "tank/vms/web2");
        assert_eq!(clone_name("tank/vms/web-data", "web", "web2"), "tank/vms/web2-data");
        assert_eq!(clone_name("tank/vms/lv", "lvguest", "copy"), "tank/vms/lv-copy");
        assert_eq!(clone_name("tank", "web", "x"), "tank-x");
    }
}
