//! `vmsnap import-sanoid`: reads a sanoid.conf and prints the equivalent vmsnap config.
//! Templates (`[template_NAME]`) carry over as `[template.NAME]`; a dataset section applies to the
//! vmsnap domains whose disks live on that dataset (or below it, when `recursive`). Keys vmsnap
//! has no use for are reported, as comments in the output and in the returned notes, never
//! silently dropped. Pure: the caller supplies the domains and where their disks are.

use crate::config::DomainConfig;
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error)]
#[error("{path} line {line}: {why}")]
pub struct ImportError {
    pub path: String,
    pub line: usize,
    pub why: String,
}

/// One `key = value` with its line.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    value: String,
    line: usize,
}

#[derive(Debug, Clone)]
struct Section {
    name: String,
    entries: Vec<Entry>,
}

fn parse_ini(text: &str, path: &str) -> Result<Vec<Section>, ImportError> {
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.push(Section { name: name.trim().to_owned(), entries: Vec::new() });
            continue;
        }
        let err = |why: &str| ImportError { path: path.to_owned(), line: i + 1, why: why.to_owned() };
        let (k, v) = line.split_once('=').ok_or_else(|| err("expected `key = value` or `[section]`"))?;
        let section = sections.last_mut().ok_or_else(|| err("a key before any [section]"))?;
        section.entries.push(Entry { key: k.trim().to_owned(), value: v.trim().to_owned(), line: i + 1 });
    }
    Ok(sections)
}

const COUNTS: [&str; 18] = [
    "frequently",
    "hourly",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "frequent_period",
    "hourly_min",
    "daily_hour",
    "daily_min",
    "weekly_wday",
    "weekly_hour",
    "weekly_min",
    "monthly_mday",
    "monthly_hour",
    "monthly_min",
    "yearly_mon",
    "yearly_mday",
];
const MORE_COUNTS: [&str; 3] = ["yearly_hour", "yearly_min", "script_timeout"];
const TOGGLES: [&str; 4] = ["autosnap", "autoprune", "force_post_snapshot_script", "no_inconsistent_snapshot"];
const STRINGS: [&str; 16] = [
    "pre_snapshot_script",
    "post_snapshot_script",
    "pre_pruning_script",
    "pruning_script",
    "frequently_warn",
    "frequently_crit",
    "hourly_warn",
    "hourly_crit",
    "daily_warn",
    "daily_crit",
    "weekly_warn",
    "weekly_crit",
    "monthly_warn",
    "monthly_crit",
    "yearly_warn",
    "yearly_crit",
];

fn toggle(v: &str) -> Option<bool> {
    match v {
        "1" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Some(true),
        "0" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" | "" => Some(false),
        _ => None,
    }
}

/// The section's policy keys as TOML lines, plus notes on what did not carry over.
fn policy_lines(section: &Section, path: &str, notes: &mut Vec<String>) -> Result<(Vec<String>, bool), ImportError> {
    let mut lines = Vec::new();
    let mut recursive = false;
    for e in &section.entries {
        let err = |why: String| ImportError { path: path.to_owned(), line: e.line, why };
        let k = e.key.as_str();
        if k == "use_template" {
            let names: Vec<String> = e.value.split(',').map(|t| format!("{:?}", t.trim())).collect();
            lines.push(format!("use_template = [{}]", names.join(", ")));
        } else if COUNTS.contains(&k) || MORE_COUNTS.contains(&k) {
            let n: u64 = e.value.parse().map_err(|_| err(format!("[{}] {k} = {:?}: not a number", section.name, e.value)))?;
            lines.push(format!("{k} = {n}"));
        } else if TOGGLES.contains(&k) {
            let b = toggle(&e.value).ok_or_else(|| err(format!("[{}] {k} = {:?}: not yes/no", section.name, e.value)))?;
            lines.push(format!("{k} = {b}"));
        } else if STRINGS.contains(&k) {
            if !e.value.is_empty() {
                lines.push(format!("{k} = {:?}", e.value));
            }
        } else if k == "recursive" {
            recursive = toggle(&e.value).unwrap_or(true);
            if recursive {
                lines.push(format!("# sanoid: recursive = {} (applied: the domains below this dataset use this section)", e.value));
            }
        } else {
            let note = format!("[{}] {k} = {} (line {}): vmsnap has no such key; not carried over", section.name, e.value, e.line);
            lines.push(format!("# {note}"));
            notes.push(note);
        }
    }
    Ok((lines, recursive))
}

/// Translates `text` (sanoid.conf, read from `path`) for `domains`, each with the datasets of
/// its disks. Returns the TOML text and the notes (unknown keys, unmatched sections).
/// `current` is the vmsnap config being replaced: its top-level keys (directories, limits,
/// deadlines) carry over as they are.
pub fn translate(
    text: &str,
    path: &str,
    current: Option<&crate::config::Config>,
    domains: &[(&DomainConfig, Vec<String>)],
) -> Result<(String, Vec<String>), ImportError> {
    let sections = parse_ini(text, path)?;
    let mut notes = Vec::new();
    let mut out = format!("# vmsnap configuration imported from {path} by `vmsnap import-sanoid`\n");
    if let Some(c) = current {
        write_top_level(&mut out, c);
    }
    let mut datasets: Vec<(&Section, Vec<String>, bool)> = Vec::new();
    for s in &sections {
        let (lines, recursive) = policy_lines(s, path, &mut notes)?;
        if let Some(t) = s.name.strip_prefix("template_") {
            let _ = writeln!(out, "\n[template.{}]", toml_key(t));
            lines.iter().for_each(|l| out.push_str(&format!("{l}\n")));
        } else {
            datasets.push((s, lines, recursive));
        }
    }
    for (dom, on) in domains {
        // The most specific section wins: the dataset itself, else the nearest recursive parent.
        let best = datasets
            .iter()
            .filter(|(s, _, rec)| on.iter().any(|d| *d == s.name || (*rec && d.starts_with(&format!("{}/", s.name)))))
            .max_by_key(|(s, _, _)| s.name.len());
        let _ = writeln!(out, "\n[domain.{}]", toml_key(&dom.name));
        match best {
            Some((s, lines, _)) => {
                let _ = writeln!(out, "# from [{}] of {path}", s.name);
                lines.iter().for_each(|l| out.push_str(&format!("{l}\n")));
            }
            None => {
                let note =
                    format!("domain {}: no sanoid section covers its datasets ({}); it keeps vmsnap's defaults", dom.name, on.join(", "));
                let _ = writeln!(out, "# {note}");
                notes.push(note);
            }
        }
        write_location(&mut out, dom);
    }
    for (s, _, rec) in &datasets {
        let used = domains.iter().any(|(_, on)| on.iter().any(|d| *d == s.name || (*rec && d.starts_with(&format!("{}/", s.name)))));
        if !used {
            let note = format!("[{}]: no vmsnap domain has a disk on this dataset; not carried over", s.name);
            let _ = writeln!(out, "\n# {note}");
            notes.push(note);
        }
    }
    Ok((out, notes))
}

/// The current config's top-level keys, so the imported file keeps its directories and limits.
fn write_top_level(out: &mut String, c: &crate::config::Config) {
    let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let _ = writeln!(out, "# carried over from {}", c.path.display());
    let _ = writeln!(out, "state_dir = {}", q(&c.state_dir));
    let _ = writeln!(out, "overlay_dir = {}", q(&c.overlay_dir));
    let _ = writeln!(out, "ram_dir = {}", q(&c.ram_dir));
    if let Some(m) = &c.metrics_file {
        let _ = writeln!(out, "metrics_file = {}", q(m));
    }
    let _ = writeln!(out, "max_parallel = {}", c.max_parallel);
    let _ = writeln!(out, "require_quiesce = {}", c.require_quiesce);
    let _ = writeln!(out, "freeze_timeout = {}", c.freeze_timeout.as_secs());
    let _ = writeln!(out, "window_timeout = {}", c.window_timeout.as_secs());
}

/// The domain's own keys (where it is), as the current config has them.
fn write_location(out: &mut String, d: &DomainConfig) {
    let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let _ = writeln!(out, "qmp = {}", q(&d.qmp));
    if let Some(p) = &d.qga {
        let _ = writeln!(out, "qga = {}", q(p));
    }
    if !d.disks.is_empty() {
        let _ = writeln!(out, "disks = [{}]", d.disks.iter().map(|p| q(p)).collect::<Vec<_>>().join(", "));
    }
    if let Some(p) = &d.nvram {
        let _ = writeln!(out, "nvram = {}", q(p));
    }
    if let Some(p) = &d.xml {
        let _ = writeln!(out, "xml = {}", q(p));
    }
    if let Some(u) = &d.uuid {
        let _ = writeln!(out, "uuid = {u:?}");
    }
    if d.quiesce == crate::config::QuiescePolicy::Require {
        let _ = writeln!(out, "require_quiesce = true");
    }
}

fn toml_key(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

/// Every sanoid key this module carries over (each is also a vmsnap policy key: tested).
pub fn known_keys() -> Vec<&'static str> {
    COUNTS.iter().chain(&MORE_COUNTS).chain(&TOGGLES).chain(&STRINGS).copied().chain(["use_template"]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::{Period, RawPolicy};
    use crate::config::Config;
    use std::path::Path;

    const SANOID: &str = "
[tank/vms]
\tuse_template = production
\trecursive = yes
\tprocess_children_only = yes

[tank/vms/db]
\tuse_template = production,ram
\thourly = 72

[tank/backup]
\tuse_template = production

#############################
[template_production]
\tfrequently = 0
\thourly = 36
\tdaily = 30
\tmonthly = 3
\tyearly = 0
\tautosnap = yes
\tautoprune = yes
\thourly_warn = 90m
\tcapacity_crit = 95
\tpre_snapshot_script = /usr/local/bin/pre.sh

[template_ram]
\tdaily = 7
";

    #[test]
    fn every_known_key_is_a_vmsnap_policy_key() {
        for k in known_keys() {
            let text = match k {
                "use_template" => format!("{k} = \"x\""),
                k if TOGGLES.contains(&k) => format!("{k} = true"),
                k if STRINGS.contains(&k) => format!("{k} = \"/x\""),
                _ => format!("{k} = 1"),
            };
            toml::from_str::<RawPolicy>(&text).unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }

    #[test]
    fn templates_datasets_and_unknown_keys() {
        let cfg = Config::parse(
            "state_dir = \"/srv/vmsnap\"\nram_dir = \"/cheap/ram\"\nmax_parallel = 3\nwindow_timeout = 20\n[domain.web]\nqmp = \"/run/web.qmp\"\ndisks = [\"/tank/vms/web/root.qcow2\"]\n[domain.db]\nqmp = \"/run/db.qmp\"\n[domain.lab]\nqmp = \"/run/lab.qmp\"\n",
            Path::new("/etc/vmsnap/vmsnap.toml"),
        )
        .unwrap();
        let doms = vec![
            (cfg.domain("web").unwrap(), vec!["tank/vms/web".to_owned()]),
            (cfg.domain("db").unwrap(), vec!["tank/vms/db".to_owned()]),
            (cfg.domain("lab").unwrap(), vec!["scratch/lab".to_owned()]),
        ];
        let (text, notes) = translate(SANOID, "/etc/sanoid/sanoid.conf", Some(&cfg), &doms).unwrap();
        // The output is a valid vmsnap config with the same policies.
        let back = Config::parse(&text, Path::new("imported.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let web = &back.domain("web").unwrap().policy;
        assert_eq!((web.keep.get(Period::Hourly), web.keep.get(Period::Daily), web.keep.get(Period::Monthly)), (36, 30, 3));
        assert_eq!(web.scripts.pre_snapshot.as_deref(), Some(Path::new("/usr/local/bin/pre.sh")));
        let db = &back.domain("db").unwrap().policy;
        assert_eq!((db.keep.get(Period::Hourly), db.keep.get(Period::Daily)), (72, 7));
        assert_eq!(back.domain("web").unwrap().disks, cfg.domain("web").unwrap().disks);
        // The current config's top-level keys carry over.
        assert_eq!((back.state_dir.as_path(), back.ram_dir.as_path()), (Path::new("/srv/vmsnap"), Path::new("/cheap/ram")));
        assert_eq!((back.overlay_dir, back.max_parallel, back.window_timeout.as_secs()), (cfg.overlay_dir.clone(), 3, 20));
        let all = notes.join("\n");
        assert!(all.contains("capacity_crit") && all.contains("process_children_only"), "{all}");
        assert!(all.contains("[tank/backup]: no vmsnap domain"), "{all}");
        assert!(all.contains("domain lab: no sanoid section"), "{all}");
        assert!(text.contains("# [template_production] capacity_crit = 95"), "{text}");
    }

    #[test]
    fn bad_values_name_the_line() {
        let e = translate("[tank/x]\nhourly = many\n", "s.conf", None, &[]).unwrap_err().to_string();
        assert!(e.contains("s.conf line 2") && e.contains("hourly"), "{e}");
        let e = translate("hourly = 1\n", "s.conf", None, &[]).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
