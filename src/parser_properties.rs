//! Every parser that reads bytes from outside vmsnap — QMP and guest-agent lines, `zfs -H -p`
//! output, the hook's domain XML, the config, the journal, the registry, RAM dump headers — over arbitrary input
//! and over real samples with bytes flipped, cut and inserted: no panic, a clear error.

use proptest::prelude::*;

/// Real samples of each input, to mutate.
const QMP: &[&str] = &[
    r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#,
    r#"{"return": {}, "id": 3}"#,
    r#"{"error": {"class": "GenericError", "desc": "Device 'x' not found"}, "id": 4}"#,
    r#"{"timestamp": {"seconds": 1795698037, "microseconds": 419715}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "commit1"}}"#,
];
const QGA: &[&str] =
    &[r#"{"return": 401706099}"#, r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#, r#"{"return": "thawed"}"#];
const ZFS_DATASETS: &str = "tank\tfilesystem\t1\t/tank\tyes\ntank/vms\tfilesystem\t12345\t/tank/vms\tyes\ntank/v1\tvolume\t99\t-\t-\n";
const ZFS_SNAPSHOTS: &str = "tank/vms@autosnap_2026-11-26_16:30:00_hourly\t1795698037\t0\t123456789\t42\t0\tdemo\n";
const ZFS_PROPS: &str = "tank/vms@a\tvmsnap:domain\tdemo\tlocal\ntank/vms@a\tvmsnap:periods\thourly\treceived\n";
const ZFS_HOLDS: &str = "tank/vms@a\tvmsnap-send\t1795698037\n";
const DOMAIN_XML: &str = "<domain type='kvm'><name>web</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid><devices><disk type='file' device='disk'><source file='/tank/vms/web/root.qcow2'/></disk></devices></domain>";
const CONFIG: &str = "state_dir = \"/var/lib/vmsnap\"\n[template.production]\nhourly = 36\nram = [\"daily\"]\n[domain.web]\nuse_template = \"production\"\nqmp = \"/run/vmsnap/web.qmp\"\ndisks = [\"/tank/vms/web/root.qcow2\"]\n";
const JOURNAL: &str = r#"[{"record":"begin","format":2,"domain":"vm","qmp":"/q","qga":null,"snapshot":"s","pid":1,"qemu":{"pid":7,"start_ticks":9}},{"record":"overlays_created","overlays":[]},{"record":"freeze_started"}]"#;
const REGISTRATION: &str =
    r#"{"name":"web","uuid":null,"qmp":"/run/vmsnap/web.qmp","qga":null,"disks":["/tank/vms/web/root.qcow2"],"nvram":null,"xml":null}"#;

/// A sample with bytes flipped, cut and inserted.
fn mutated(samples: &'static [&'static str]) -> impl Strategy<Value = String> {
    (0..samples.len(), prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 0..8)).prop_map(move |(i, edits)| {
        let mut b = samples[i].as_bytes().to_vec();
        for (pos, byte, kind) in edits {
            if b.is_empty() {
                b.push(byte);
                continue;
            }
            let at = usize::from(pos) % b.len();
            match kind {
                0 => b[at] = byte,
                1 => b.truncate(at),
                _ => b.insert(at, byte),
            }
        }
        String::from_utf8_lossy(&b).into_owned()
    })
}

fn input(samples: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), mutated(samples)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn qmp_lines(line in input(QMP)) {
        let _ = crate::qemu::qmp::classify(&line);
    }

    #[test]
    fn agent_lines(line in input(QGA)) {
        let _ = crate::qemu::qga::parse_reply(&line);
    }

    #[test]
    fn zfs_output(text in input(&[ZFS_DATASETS, ZFS_SNAPSHOTS, ZFS_PROPS, ZFS_HOLDS])) {
        let props = [crate::zfs::PropName::new("vmsnap:domain").unwrap()];
        if let Err(e) = crate::zfs::parse::datasets(&text) { prop_assert!(e.to_string().contains("cannot parse")); }
        let _ = crate::zfs::parse::snapshots(&text, &props);
        let _ = crate::zfs::parse::user_properties(&text);
        let _ = crate::zfs::parse::holds(&text);
    }

    #[test]
    fn hook_domain_xml(xml in input(&[DOMAIN_XML])) {
        if let Err(e) = crate::libvirt::hook::parse_domain_xml(&xml) { prop_assert!(!e.is_empty()); }
    }

    #[test]
    fn config_text(text in input(&[CONFIG])) {
        if let Err(e) = crate::config::Config::parse(&text, std::path::Path::new("/etc/vmsnap/vmsnap.toml")) {
            prop_assert!(e.to_string().contains("vmsnap.toml"), "{e}");
        }
    }

    #[test]
    fn journal_files(text in input(&[JOURNAL])) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(&p, &text).unwrap();
        match crate::engine::journal::Journal::load(&p) {
            Ok(j) => { let _ = crate::engine::journal::obligations(j.records()); }
            Err(e) => prop_assert!(e.to_string().contains("vm.json"), "{e}"),
        }
    }

    #[test]
    fn registry_files(text in input(&[REGISTRATION])) {
        let dir = tempfile::tempdir().unwrap();
        let reg = crate::daemon::registry::Registry::new(dir.path());
        std::fs::create_dir_all(dir.path().join("registry")).unwrap();
        std::fs::write(dir.path().join("registry/web.json"), &text).unwrap();
        let (ok, bad) = reg.load_all();
        prop_assert_eq!(ok.len() + bad.len(), 1);
    }

    /// RAM dump headers (a restore reads dumps from the replica or a user's disk): any bytes at
    /// the start of a real save image's header, or none, give an answer and never a panic.
    #[test]
    fn save_image_headers(edits in prop::collection::vec((0usize..200, any::<u8>()), 0..12), cut in 0usize..70_000) {
        use crate::engine::saveimage;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.ram");
        let mut f = std::fs::File::create(&path).unwrap();
        saveimage::write_start(&mut f, "<domain><name>web</name></domain>", true, crate::model::RamCompress::Zstd).unwrap();
        std::io::Write::write_all(&mut f, b"QEVM stream").unwrap();
        saveimage::finish(&f).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, b) in edits {
            bytes[at] = b;
        }
        bytes.truncate(cut.min(bytes.len()));
        std::fs::write(&path, &bytes).unwrap();
        let _ = saveimage::read(&path);
        let _ = saveimage::locate(&path);
        let _ = saveimage::incoming_uri(&path);
    }
}
