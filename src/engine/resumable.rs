//! Can this QEMU resume that RAM dump? Checked before anything starts, from what the snapshot
//! recorded of the QEMU that wrote the dump (`vmsnap:qemu-version`, `vmsnap:machine`,
//! `vmsnap:cpu`, `vmsnap:ram-bytes`) and what the QEMU that would load it says of itself over
//! QMP (a QEMU started with `-incoming defer` for the resume).
//!
//! QEMU loads migration streams from the same or an older QEMU, for a machine type it still
//! has, into a VM of the same RAM size and CPU model; anything else fails half-way through the
//! load, after the disks were already set up. So each mismatch is a sentence up front.

use crate::model::prop;
use crate::qemu::qmp::{Qmp, QmpError};
use crate::zfs::PropName;
use std::time::Duration;

/// A QEMU version, `major.minor.micro`.
pub type Version = (u32, u32, u32);

/// What the snapshot says of the QEMU that wrote its dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub qemu_version: Version,
    pub machine: String,
    /// The first vCPU's QOM type (`qemu64-x86_64-cpu`); absent on older snapshots.
    pub cpu: Option<String>,
    /// Guest RAM in bytes; absent on older snapshots.
    pub ram_bytes: Option<u64>,
}

/// What a QEMU that would load the dump says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub qemu_version: Version,
    /// Every machine type it has (names and aliases).
    pub machines: Vec<String>,
    pub cpu: Option<String>,
    pub ram_bytes: Option<u64>,
}

/// `10.0.2` (a package suffix after a space or `(` is ignored).
pub fn parse_version(s: &str) -> Option<Version> {
    let core = s.split([' ', '(']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u32>().ok());
    let v = (it.next()??, it.next()??, it.next().unwrap_or(Some(0))?);
    it.next().is_none().then_some(v)
}

impl Recorded {
    /// From a snapshot's properties (`get` returns a property's value).
    pub fn from_properties(get: impl Fn(&PropName) -> Option<String>) -> Result<Self, String> {
        let need = |p: &PropName| get(p).ok_or_else(|| format!("the snapshot has no {p}: it records no RAM dump vmsnap can check"));
        let version = need(&prop::QEMU_VERSION)?;
        Ok(Self {
            qemu_version: parse_version(&version).ok_or_else(|| format!("{}: {version:?} is not a QEMU version", prop::QEMU_VERSION))?,
            machine: need(&prop::MACHINE)?,
            cpu: get(&prop::CPU),
            ram_bytes: match get(&prop::RAM_BYTES) {
                Some(v) => Some(v.parse().map_err(|_| format!("{}: {v:?} is not a byte count", prop::RAM_BYTES))?),
                None => None,
            },
        })
    }
}

impl Target {
    /// Asks the QEMU on `qmp`.
    pub async fn probe(qmp: &Qmp) -> Result<Self, QmpError> {
        let v = qmp.version();
        let t = Duration::from_secs(10);
        let machines = qmp.execute_raw("query-machines", None, t).await?;
        let machines = machines
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| [m["name"].as_str(), m["alias"].as_str()])
            .flatten()
            .map(str::to_owned)
            .collect();
        Ok(Self { qemu_version: (v.major, v.minor, v.micro), machines, cpu: cpu_type(qmp).await?, ram_bytes: ram_bytes(qmp).await? })
    }
}

impl Target {
    /// What the QEMU binary `emulator` (a libvirt domain's `<emulator>`) can load, asked without
    /// starting a VM: its version (`--version`) and machine types (`-machine help`). CPU and RAM
    /// come from the saved XML libvirt restores with, so they are not compared.
    pub async fn of_binary(emulator: &std::path::Path) -> Result<Self, String> {
        let run = |args: &'static [&'static str]| async move {
            let out = tokio::time::timeout(Duration::from_secs(20), tokio::process::Command::new(emulator).args(args).output())
                .await
                .map_err(|_| format!("{} {}: no answer in 20 s", emulator.display(), args.join(" ")))?
                .map_err(|e| format!("{}: {e}", emulator.display()))?;
            if !out.status.success() {
                return Err(format!("{} {}: {}", emulator.display(), args.join(" "), out.status));
            }
            Ok::<_, String>(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let version = run(&["--version"]).await?;
        let qemu_version = parse_version_banner(&version)
            .ok_or_else(|| format!("{} --version: no version in {:?}", emulator.display(), version.lines().next().unwrap_or_default()))?;
        let machines = parse_machine_help(&run(&["-machine", "help"]).await?);
        Ok(Self { qemu_version, machines, cpu: None, ram_bytes: None })
    }
}

/// `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)` → `(10, 0, 2)`.
pub fn parse_version_banner(text: &str) -> Option<Version> {
    let line = text.lines().next()?;
    parse_version(line.split("version ").nth(1)?)
}

/// The machine types (and aliases) `-machine help` lists: the first word of each line after
/// the heading.
pub fn parse_machine_help(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().skip_while(|l| !l.starts_with("Supported machines")).skip(1) {
        if let Some(name) = line.split_whitespace().next() {
            out.push(name.to_owned());
        }
        if let Some(alias) = line.split("(alias of ").nth(1).and_then(|r| r.split(')').next()) {
            out.push(alias.to_owned());
        }
    }
    out
}

/// The first vCPU's QOM type.
pub async fn cpu_type(qmp: &Qmp) -> Result<Option<String>, QmpError> {
    let t = Duration::from_secs(10);
    let cpus = qmp.execute_raw("query-cpus-fast", None, t).await?;
    let Some(path) = cpus.as_array().and_then(|c| c.first()).and_then(|c| c["qom-path"].as_str()).map(str::to_owned) else {
        return Ok(None);
    };
    let ty = qmp.execute_raw("qom-get", Some(serde_json::json!({"path": path, "property": "type"})), t).await?;
    Ok(ty.as_str().map(str::to_owned))
}

/// The guest's base RAM in bytes.
pub async fn ram_bytes(qmp: &Qmp) -> Result<Option<u64>, QmpError> {
    let m = qmp.execute_raw("query-memory-size-summary", None, Duration::from_secs(10)).await?;
    Ok(m["base-memory"].as_u64())
}

/// Every reason `target` cannot load a dump `recorded` describes; empty when it can.
pub fn check(recorded: &Recorded, target: &Target) -> Vec<String> {
    let v = |(a, b, c): Version| format!("{a}.{b}.{c}");
    let mut why = Vec::new();
    if target.qemu_version < recorded.qemu_version {
        why.push(format!(
            "the dump was written by QEMU {} and this QEMU is {}: QEMU does not load streams from a newer QEMU",
            v(recorded.qemu_version),
            v(target.qemu_version)
        ));
    }
    if !target.machines.contains(&recorded.machine) {
        why.push(format!("this QEMU has no machine type {} (the dump's); it cannot load its devices' state", recorded.machine));
    }
    if let (Some(want), Some(have)) = (&recorded.cpu, &target.cpu) {
        if want != have {
            why.push(format!("the dump's CPU model is {want}, this VM's is {have}: start it with the same -cpu"));
        }
    }
    if let (Some(want), Some(have)) = (recorded.ram_bytes, target.ram_bytes) {
        if want != have {
            why.push(format!("the dump holds {} MiB of RAM, this VM has {} MiB: start it with -m {}M", want >> 20, have >> 20, want >> 20));
        }
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_qemu_binary_says_of_itself() {
        let banner = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version_banner(banner), Some((10, 0, 2)));
        assert_eq!(parse_version_banner("no banner"), None);
        let help = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\npc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\nnone                 empty machine\n";
        let m = parse_machine_help(help);
        for want in ["microvm", "pc", "pc-i440fx-10.0", "q35", "pc-q35-10.0", "none"] {
            assert!(m.iter().any(|x| x == want), "{want} in {m:?}");
        }
        assert!(!m.iter().any(|x| x.starts_with("Supported")));
    }

    fn recorded() -> Recorded {
        Recorded {
            qemu_version: (10, 0, 2),
            machine: "pc-i440fx-10.0".into(),
            cpu: Some("qemu64-x86_64-cpu".into()),
            ram_bytes: Some(160 << 20),
        }
    }

    fn target() -> Target {
        Target {
            qemu_version: (10, 0, 2),
            machines: vec!["pc-i440fx-10.0".into(), "pc".into(), "pc-q35-10.0".into()],
            cpu: Some("qemu64-x86_64-cpu".into()),
            ram_bytes: Some(160 << 20),
        }
    }

    #[test]
    fn versions_parse_with_or_without_a_package_suffix() {
        assert_eq!(parse_version("10.0.2"), Some((10, 0, 2)));
        assert_eq!(parse_version("10.0.2 (Debian 1:10.0.2+ds-2~bpo12+1)"), Some((10, 0, 2)));
        assert_eq!(parse_version("9.2"), Some((9, 2, 0)));
        for bad in ["", "ten", "1.2.3.4", "1..2"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_same_or_a_newer_qemu_loads_it() {
        assert!(check(&recorded(), &target()).is_empty());
        let newer = Target { qemu_version: (10, 1, 0), ..target() };
        assert!(check(&recorded(), &newer).is_empty());
        // Older snapshots recorded no CPU and RAM size: nothing to compare, nothing refused.
        let old = Recorded { cpu: None, ram_bytes: None, ..recorded() };
        assert!(check(&old, &Target { cpu: Some("max-x86_64-cpu".into()), ram_bytes: Some(1 << 30), ..target() }).is_empty());
    }

    #[test]
    fn every_mismatch_is_named() {
        let t = Target {
            qemu_version: (9, 2, 0),
            machines: vec!["pc-q35-9.2".into()],
            cpu: Some("max-x86_64-cpu".into()),
            ram_bytes: Some(512 << 20),
        };
        let why = check(&recorded(), &t).join("\n");
        for part in
            ["QEMU 10.0.2 and this QEMU is 9.2.0", "no machine type pc-i440fx-10.0", "CPU model is qemu64-x86_64-cpu", "160 MiB", "-m 160M"]
        {
            assert!(why.contains(part), "{part}: {why}");
        }
    }

    #[test]
    fn recorded_from_properties() {
        let props = |p: &PropName| match p.as_str() {
            "vmsnap:qemu-version" => Some("10.0.2".to_owned()),
            "vmsnap:machine" => Some("pc-i440fx-10.0".to_owned()),
            "vmsnap:ram-bytes" => Some("167772160".to_owned()),
            _ => None,
        };
        let r = Recorded::from_properties(props).unwrap();
        assert_eq!((r.qemu_version, r.ram_bytes, r.cpu), ((10, 0, 2), Some(160 << 20), None));
        let e = Recorded::from_properties(|_| None).unwrap_err();
        assert!(e.contains("vmsnap:qemu-version"), "{e}");
        let e = Recorded::from_properties(|p| if p.as_str() == "vmsnap:qemu-version" { Some("new".into()) } else { Some("x".into()) })
            .unwrap_err();
        assert!(e.contains("not a QEMU version"), "{e}");
    }
}
