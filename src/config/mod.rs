//! The configuration file (`/etc/vmsnap/vmsnap.toml` by default): where vmsnap keeps its state,
//! overlays and RAM dumps, and the domains it snapshots. Parsing is pure ([`Config::parse`]);
//! every error names the file and what was wrong.
//!
//! ```toml
//! state_dir = "/var/lib/vmsnap"          # journals and locks
//! overlay_dir = "/var/lib/vmsnap/overlays" # outside the snapshotted datasets
//! ram_dir = "/srv/cheap/vmsnap-ram"      # RAM dumps (root only, files 0600)
//! require_quiesce = false
//! metrics_file = "/var/lib/prometheus/node-exporter/vmsnap.prom"
//! max_parallel = 2                       # domains snapshotted at once by the daemon
//!
//! [template.production]                # sanoid's keys and defaults
//! hourly = 36
//! daily = 30
//! monthly = 3
//! ram = ["daily"]                        # the daily snapshots also save the RAM
//! ram_keep = 7                           # RAM dumps of the newest 7 snapshots that have one
//!
//! [domain.web]
//! use_template = "production"
//! hourly = 48                            # overrides the template
//! qmp = "/run/vmsnap/web.qmp"
//! qga = "/run/vmsnap/web.qga"
//! disks = ["/tank/vms/web/root.qcow2", "/dev/zvol/tank/vms/web-data"]
//! nvram = "/var/lib/libvirt/qemu/nvram/web_VARS.fd"
//! xml = "/etc/libvirt/qemu/web.xml"
//! replicate_to = ["offsite"]             # a policy key: templates may set it too
//!
//! [target.offsite]                       # replication over ssh (the target runs `vmsnap serve`)
//! host = "backup.example.org"
//! identity = "/root/.ssh/vmsnap_offsite"
//! rate_limit = 52428800                  # bytes/s
//! idle_timeout_s = 300                   # a request fails once no byte moved for this long
//!
//! [target.usb]                           # or a local pool
//! dataset = "usb/vmsnap"
//! ram_dir = "/usb/vmsnap-ram"
//! ```

pub mod policy;
pub mod sanoid_import;

use crate::config::policy::{policy_section, Policy, RawPolicy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/vmsnap/vmsnap.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no domain named {name:?} in {path} (known: {known})")]
    NoSuchDomain { name: String, path: PathBuf, known: String },
    #[error("no [target.{name}] in {path} (known: {known})")]
    NoSuchTarget { name: String, path: PathBuf, known: String },
    #[error("nothing to do: {path} configures no domain and none is registered (add a [domain.NAME] table, or install the libvirt hook with `vmsnap setup`)")]
    NothingConfigured { path: PathBuf },
}

/// How a snapshot stays consistent when the guest agent is missing or the freeze fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuiescePolicy {
    /// Abort, leaving the VM untouched.
    Require,
    /// Go on crash-consistent and record it.
    BestEffort,
}

/// One domain as vmsnap sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainConfig {
    pub name: String,
    pub uuid: Option<String>,
    /// QEMU's QMP socket (a vmsnap-owned one under libvirt).
    pub qmp: PathBuf,
    /// The guest agent's chardev socket, if the domain has one vmsnap may use.
    pub qga: Option<PathBuf>,
    /// Disk images or zvols; needed to snapshot a stopped VM. For a running VM the disks come
    /// from QEMU itself.
    pub disks: Vec<PathBuf>,
    pub nvram: Option<PathBuf>,
    pub xml: Option<PathBuf>,
    /// How to start the domain's QEMU (a config domain's `start`, an argument vector): what
    /// `restore --resume` runs, with `-incoming defer` added. Empty: vmsnap cannot start it.
    pub start: Vec<String>,
    pub quiesce: QuiescePolicy,
    pub policy: Policy,
}

impl DomainConfig {
    /// A libvirt domain known only by its name: one that is not running is in no registry, and
    /// its snapshots are found by their `vmsnap:domain` (restore, verify, mount).
    pub fn by_name(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            uuid: None,
            qmp: PathBuf::new(),
            qga: None,
            disks: Vec::new(),
            nvram: None,
            xml: None,
            start: Vec::new(),
            quiesce: QuiescePolicy::BestEffort,
            policy: Policy::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub overlay_dir: PathBuf,
    pub ram_dir: PathBuf,
    /// Prometheus textfile the daemon rewrites after each job.
    pub metrics_file: Option<PathBuf>,
    /// How many domains the daemon snapshots at once (one job at a time per domain).
    pub max_parallel: usize,
    pub domains: BTreeMap<String, DomainConfig>,
    /// The policy of domains registered at run time (libvirt hook, D-Bus): the built-in
    /// defaults and `[template.default]`.
    pub registered_policy: Policy,
    /// `require_quiesce` at the top level, for registered domains.
    pub require_quiesce: bool,
    /// How long `guest-fsfreeze-freeze` may take before vmsnap gives up and thaws
    /// (`freeze_timeout`, seconds, default 60).
    pub freeze_timeout: std::time::Duration,
    /// How long a `zfs snapshot` inside the frozen or paused window may take before vmsnap
    /// thaws/resumes the guest and fails (`window_timeout`, seconds, default 60).
    pub window_timeout: std::time::Duration,
    /// Replication targets by name.
    pub targets: BTreeMap<String, TargetConfig>,
    /// The key file RAM dumps are sealed with for targets (`ram_key`, default
    /// [`DEFAULT_RAM_KEY`]).
    pub ram_key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    overlay_dir: Option<PathBuf>,
    ram_dir: Option<PathBuf>,
    metrics_file: Option<PathBuf>,
    max_parallel: Option<usize>,
    require_quiesce: Option<bool>,
    freeze_timeout: Option<u64>,
    window_timeout: Option<u64>,
    ram_key: Option<PathBuf>,
    #[serde(default)]
    template: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    domain: BTreeMap<String, RawDomain>,
    #[serde(default)]
    target: BTreeMap<String, RawTarget>,
}

/// A `[target.NAME]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    host: Option<String>,
    user: Option<String>,
    port: Option<u16>,
    identity: Option<PathBuf>,
    #[serde(default)]
    ssh_options: Vec<String>,
    #[serde(default)]
    compress: bool,
    rate_limit: Option<u64>,
    dataset: Option<String>,
    ram_dir: Option<PathBuf>,
    /// The daemon replicates on this schedule instead of after each scheduled snapshot.
    every_minutes: Option<u32>,
    /// A request to the target fails (its session killed) once no byte moved for this long.
    idle_timeout_s: Option<u64>,
    /// Whether RAM dumps travel sealed: `auto` (when the domain's datasets are encrypted),
    /// `always`, `never`.
    seal_ram: Option<String>,
    /// A local target's retention (`[target.NAME.policy]`, the period counts and `use_template`).
    policy: Option<RawPolicy>,
}

/// A replication target: another host reached with ssh (its `vmsnap serve`, pinned by the
/// forced command of the source's key, decides where things go there), or a local pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub name: String,
    /// `None`: a local target.
    pub host: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
    /// Appended to ssh's options (each one argument).
    pub ssh_options: Vec<String>,
    /// ssh's `-C`.
    pub compress: bool,
    /// Bytes per second, 0 for none.
    pub rate_limit: u64,
    /// Local targets: the dataset received datasets go under, and the RAM dump directory.
    pub dataset: Option<String>,
    pub ram_dir: Option<PathBuf>,
    /// A local target's retention as `vmsnap serve --keep` spells it; `None`: it keeps
    /// everything. A remote target's retention is on its own forced command line.
    pub keep: Option<String>,
    /// The daemon replicates to it this often (`every_minutes`); `None`: after each scheduled
    /// snapshot.
    pub every: Option<std::time::Duration>,
    /// A request fails, its ssh session killed, once no byte moved for this long
    /// (`idle_timeout_s`, default 300): a stuck or hostile target never pins a run.
    pub idle_timeout: std::time::Duration,
    /// Whether RAM dumps go to it sealed ([`crate::ramcrypt`]).
    pub seal_ram: SealRam,
    /// The key file sealed dumps are sealed with and opened with (the top-level `ram_key`).
    pub ram_key: PathBuf,
}

/// When a target gets a domain's RAM dumps sealed (`seal_ram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SealRam {
    /// When any of the domain's datasets is encrypted: a target trusted with its disks'
    /// ciphertext only gets its RAM's ciphertext only.
    #[default]
    Auto,
    Always,
    Never,
}

/// Where the RAM key is unless `ram_key` says (`vmsnap setup` writes one there).
pub const DEFAULT_RAM_KEY: &str = "/etc/vmsnap/ram.key";

policy_section! {
    /// A `[domain.NAME]` table: where the domain is, and its policy keys.
    RawDomain {
        uuid: Option<String>,
        qmp: PathBuf,
        qga: Option<PathBuf>,
        #[serde(default)]
        disks: Vec<PathBuf>,
        nvram: Option<PathBuf>,
        xml: Option<PathBuf>,
        #[serde(default)]
        start: Vec<String>,
        require_quiesce: Option<bool>,
    }
}

impl Config {
    /// Reads and checks a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` is only used in messages and as [`Config::path`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        // Errors found after parsing name the line of the key they are about.
        let at = |table: &str, name: &str, key: &str, why: String| {
            let line = locate(text, table, name, key).map(|l| format!("line {l}: ")).unwrap_or_default();
            invalid(format!("{line}[{table}.{name}] {key}: {why}"))
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| invalid(e.to_string().trim().replace('\n', " ")))?;
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/vmsnap"));
        let overlay_dir = raw.overlay_dir.unwrap_or_else(|| state_dir.join("overlays"));
        let ram_dir = raw.ram_dir.unwrap_or_else(|| state_dir.join("ram"));
        for (key, dir) in [("state_dir", &state_dir), ("overlay_dir", &overlay_dir), ("ram_dir", &ram_dir)] {
            if !dir.is_absolute() {
                return Err(invalid(format!("{key} must be an absolute path, got {}", dir.display())));
            }
        }
        if let Some(p) = raw.metrics_file.as_ref().filter(|p| !p.is_absolute()) {
            return Err(invalid(format!("metrics_file must be an absolute path, got {}", p.display())));
        }
        let max_parallel = raw.max_parallel.unwrap_or(2);
        if max_parallel == 0 {
            return Err(invalid("max_parallel must be at least 1".into()));
        }
        let default_quiesce = raw.require_quiesce.unwrap_or(false);
        let seconds = |key: &str, v: Option<u64>| match v.unwrap_or(60) {
            0 => Err(invalid(format!("{key} must be at least 1 (seconds)"))),
            n if n > 86_400 => Err(invalid(format!("{key} must be at most 86400 (seconds), got {n}"))),
            n => Ok(std::time::Duration::from_secs(n)),
        };
        let freeze_timeout = seconds("freeze_timeout", raw.freeze_timeout)?;
        let window_timeout = seconds("window_timeout", raw.window_timeout)?;
        let mut domains = BTreeMap::new();
        for (name, d) in raw.domain {
            if !valid_domain_name(&name) {
                return Err(invalid(format!("domain name {name:?}: use letters, digits, '-', '_' and '.'")));
            }
            let policy = resolve(&raw.template, &d.policy(), &name).map_err(|(table, tname, key, why)| at(table, &tname, key, why))?;
            let paths = std::iter::once(("qmp", Some(&d.qmp)))
                .chain([("qga", d.qga.as_ref()), ("nvram", d.nvram.as_ref()), ("xml", d.xml.as_ref())])
                .chain(d.disks.iter().map(|p| ("disks", Some(p))));
            for (key, p) in paths {
                if let Some(p) = p {
                    if !p.is_absolute() {
                        return Err(at("domain", &name, key, format!("{} is not an absolute path", p.display())));
                    }
                }
            }
            check_start(&d.start, &d.qmp).map_err(|why| at("domain", &name, "start", why))?;
            let quiesce = if d.require_quiesce.unwrap_or(default_quiesce) { QuiescePolicy::Require } else { QuiescePolicy::BestEffort };
            domains.insert(
                name.clone(),
                DomainConfig {
                    name,
                    uuid: d.uuid,
                    qmp: d.qmp,
                    qga: d.qga,
                    disks: d.disks,
                    nvram: d.nvram,
                    xml: d.xml,
                    start: d.start,
                    quiesce,
                    policy,
                },
            );
        }
        let registered_policy = resolve(&raw.template, &RawPolicy::default(), "(registered)")
            .map_err(|(table, tname, key, why)| at(table, &tname, key, why))?;
        let ram_key = raw.ram_key.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_RAM_KEY));
        if !ram_key.is_absolute() {
            return Err(invalid(format!("ram_key: {} is not an absolute path", ram_key.display())));
        }
        let mut targets = BTreeMap::new();
        for (name, t) in raw.target {
            let keep = match (&t.host, &t.policy) {
                (None, Some(own)) => {
                    let policy = resolve(&raw.template, own, &name).map_err(|(table, tname, key, why)| {
                        if table == "domain" {
                            at("target", &name, key, why)
                        } else {
                            at(table, &tname, key, why)
                        }
                    })?;
                    Some(policy::keep_spec(&policy))
                }
                (Some(_), Some(_)) => {
                    return Err(at(
                        "target",
                        &name,
                        "policy",
                        "a remote target prunes by its own policy only: put it on the target host's forced command (vmsnap serve --keep hourly=48,daily=30,…)".into(),
                    ))
                }
                _ => None,
            };
            let mut t = target(&name, t).map_err(|(key, why)| at("target", &name, key, why))?;
            t.keep = keep;
            t.ram_key = ram_key.clone();
            targets.insert(name.clone(), t);
        }
        for (dname, d) in domains.iter().map(|(n, d)| (n.as_str(), &d.policy)).chain([("(registered)", &registered_policy)]) {
            if let Some(t) = d.replicate_to.iter().find(|t| !targets.contains_key(*t)) {
                return Err(invalid(format!("domain {dname}: replicate_to names {t:?}, which no [target.{t}] defines")));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            state_dir,
            overlay_dir,
            ram_dir,
            metrics_file: raw.metrics_file,
            max_parallel,
            domains,
            registered_policy,
            require_quiesce: default_quiesce,
            freeze_timeout,
            window_timeout,
            targets,
            ram_key,
        })
    }

    /// The domain called `name`.
    ///
    /// # Errors
    /// [`ConfigError::NoSuchDomain`] listing the known ones.
    pub fn domain(&self, name: &str) -> Result<&DomainConfig, ConfigError> {
        self.domains.get(name).ok_or_else(|| ConfigError::NoSuchDomain {
            name: name.to_owned(),
            path: self.path.clone(),
            known: known(self.domains.keys()),
        })
    }

    /// The replication target called `name`.
    ///
    /// # Errors
    /// [`ConfigError::NoSuchTarget`] listing the known ones.
    pub fn target(&self, name: &str) -> Result<&TargetConfig, ConfigError> {
        self.targets.get(name).ok_or_else(|| ConfigError::NoSuchTarget {
            name: name.chars().take(80).collect(),
            path: self.path.clone(),
            known: known(self.targets.keys()),
        })
    }
}

/// Names for an error message: "a, b", or "none".
fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Checks a `[target.NAME]` table: (key, why) on error.
fn target(name: &str, t: RawTarget) -> Result<TargetConfig, (&'static str, String)> {
    if !valid_domain_name(name) {
        return Err(("name", "use letters, digits, '-', '_' and '.'".into()));
    }
    // Words that go on ssh's command line must not read as options or carry spaces.
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'))
    };
    if let Some(h) = t.host.as_deref().filter(|h| !plain(h)) {
        return Err(("host", format!("{h:?} is not a host name or address")));
    }
    if let Some(u) = t.user.as_deref().filter(|u| !plain(u) || u.contains(':')) {
        return Err(("user", format!("{u:?} is not a user name")));
    }
    if let Some(i) = t.identity.as_ref().filter(|i| !i.is_absolute()) {
        return Err(("identity", format!("{} is not an absolute path", i.display())));
    }
    match (&t.host, &t.dataset, &t.ram_dir) {
        (Some(_), None, None) => {}
        (Some(_), _, _) => {
            return Err((
                "dataset",
                "a remote target's dataset and ram_dir are set on the target host (vmsnap serve --root, --ram-dir)".into(),
            ))
        }
        (None, Some(ds), Some(dir)) => {
            crate::zfs::Dataset::new(ds).map_err(|e| ("dataset", e.to_string()))?;
            if !dir.is_absolute() {
                return Err(("ram_dir", format!("{} is not an absolute path", dir.display())));
            }
        }
        (None, _, _) => return Err(("host", "a target has a host (ssh), or dataset and ram_dir (a local pool)".into())),
    }
    if t.every_minutes == Some(0) {
        return Err(("every_minutes", "0: leave it out to replicate after each scheduled snapshot".into()));
    }
    if t.idle_timeout_s == Some(0) {
        return Err(("idle_timeout_s", "0: it must be at least 1 second (the default is 300)".into()));
    }
    let seal_ram = match t.seal_ram.as_deref() {
        None | Some("auto") => SealRam::Auto,
        Some("always") => SealRam::Always,
        Some("never") => SealRam::Never,
        Some(other) => {
            return Err(("seal_ram", format!("{other:?}: use \"auto\" (when the datasets are encrypted), \"always\" or \"never\"")))
        }
    };
    Ok(TargetConfig {
        name: name.to_owned(),
        host: t.host,
        user: t.user,
        port: t.port,
        identity: t.identity,
        ssh_options: t.ssh_options,
        compress: t.compress,
        rate_limit: t.rate_limit.unwrap_or(0),
        dataset: t.dataset,
        ram_dir: t.ram_dir,
        keep: None,
        every: t.every_minutes.map(|m| std::time::Duration::from_secs(u64::from(m) * 60)),
        idle_timeout: std::time::Duration::from_secs(t.idle_timeout_s.unwrap_or(300)),
        seal_ram,
        ram_key: PathBuf::from(DEFAULT_RAM_KEY),
    })
}

/// A domain name vmsnap accepts (it names files and locks): letters, digits, '-', '_', '.',
/// not starting with '.' or '-' (it would read as an option to the programs it is passed to).
/// A config domain's `start`: an absolute program, no `-incoming` or `-daemonize` (vmsnap adds
/// the one and waits on the process itself), and the QMP socket vmsnap talks to among its
/// arguments.
fn check_start(start: &[String], qmp: &Path) -> Result<(), String> {
    let Some(program) = start.first() else { return Ok(()) };
    if !program.starts_with('/') {
        return Err(format!("{program:?}: the program must be an absolute path"));
    }
    if let Some(a) = start.iter().find(|a| matches!(a.as_str(), "-incoming" | "--incoming" | "-daemonize" | "--daemonize")) {
        return Err(format!("{a}: vmsnap adds -incoming when it resumes the domain, and runs QEMU in the foreground"));
    }
    let qmp = qmp.to_string_lossy();
    if !start.iter().any(|a| a.contains(qmp.as_ref())) {
        return Err(format!("no argument names the QMP socket {qmp} (`-qmp unix:{qmp},server=on,wait=off`)"));
    }
    Ok(())
}

pub fn valid_domain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
        && !name.starts_with('-')
}

/// A bad key found while resolving: (table kind, table name, key, why).
type BadAt = (&'static str, String, &'static str, String);

/// A domain's policy: built-in defaults (sanoid's), then `[template.default]`, then its
/// `use_template` chain (templates may use templates), then its own keys.
fn resolve(templates: &BTreeMap<String, RawPolicy>, own: &RawPolicy, domain: &str) -> Result<Policy, BadAt> {
    let mut policy = Policy::default();
    if let Some(d) = templates.get("default") {
        apply_template(templates, "default", d, &mut policy, &mut Vec::new())?;
    }
    for t in own.use_template.iter().flat_map(|u| u.names()) {
        let Some(raw) = templates.get(t) else {
            return Err(("domain", domain.to_owned(), "use_template", unknown_template(t, templates)));
        };
        apply_template(templates, t, raw, &mut policy, &mut Vec::new())?;
    }
    own.apply(&mut policy).map_err(|b| ("domain", domain.to_owned(), b.key, b.why))?;
    Ok(policy)
}

fn apply_template(
    templates: &BTreeMap<String, RawPolicy>,
    name: &str,
    raw: &RawPolicy,
    policy: &mut Policy,
    chain: &mut Vec<String>,
) -> Result<(), BadAt> {
    if chain.iter().any(|c| c == name) {
        chain.push(name.to_owned());
        return Err(("template", chain[0].clone(), "use_template", format!("templates use each other in a loop: {}", chain.join(" → "))));
    }
    chain.push(name.to_owned());
    for t in raw.use_template.iter().flat_map(|u| u.names()) {
        let Some(inner) = templates.get(t) else {
            return Err(("template", name.to_owned(), "use_template", unknown_template(t, templates)));
        };
        apply_template(templates, t, inner, policy, chain)?;
    }
    chain.pop();
    raw.apply(policy).map_err(|b| ("template", name.to_owned(), b.key, b.why))
}

fn unknown_template(t: &str, templates: &BTreeMap<String, RawPolicy>) -> String {
    let known: Vec<&str> = templates.keys().map(String::as_str).collect();
    format!("no template named {t:?} (known: {})", if known.is_empty() { "none".into() } else { known.join(", ") })
}

/// The 1-based line of `key` in the `[table.name]` section of `text`, if it can be found.
fn locate(text: &str, table: &str, name: &str, key: &str) -> Option<usize> {
    let headers = [format!("[{table}.{name}]"), format!("[{table}.\"{name}\"]")];
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            inside = headers.iter().any(|h| l.replace(' ', "") == *h);
            continue;
        }
        if inside && l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::Period;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/vmsnap/vmsnap.toml"))
    }

    #[test]
    fn a_local_target_has_its_own_retention_a_remote_one_on_its_host() {
        let ok = parse(
            "[template.backup]\nhourly = 3\n[target.usb]\ndataset = \"usb/v\"\nram_dir = \"/usb/ram\"\n\
             [target.usb.policy]\nuse_template = \"backup\"\ndaily = 7\n[target.off]\nhost = \"b\"\n",
        )
        .unwrap();
        let keep = ok.targets["usb"].keep.as_deref().unwrap();
        assert!(keep.contains("hourly=3") && keep.contains("daily=7"), "{keep}");
        assert_eq!(ok.targets["off"].keep, None);
        let e = parse("[target.off]\nhost = \"b\"\n[target.off.policy]\nhourly = 3\n").unwrap_err().to_string();
        assert!(e.contains("vmsnap serve --keep"), "{e}");
        let e = parse("[target.usb]\ndataset = \"usb/v\"\nram_dir = \"/r\"\n[target.usb.policy]\nuse_template = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    /// `seal_ram` and `ram_key`: defaults, every value, and bad ones named.
    #[test]
    fn sealed_ram_settings_are_checked() {
        let ok = parse(
            "[target.a]\nhost = \"b\"\n[target.n]\nhost = \"b\"\nseal_ram = \"never\"\n[target.y]\nhost = \"b\"\nseal_ram = \"always\"\n",
        )
        .unwrap();
        assert_eq!(ok.ram_key, PathBuf::from(DEFAULT_RAM_KEY));
        assert_eq!(
            (ok.targets["a"].seal_ram, ok.targets["n"].seal_ram, ok.targets["y"].seal_ram),
            (SealRam::Auto, SealRam::Never, SealRam::Always)
        );
        let ok = parse("ram_key = \"/root/k\"\n[target.a]\nhost = \"b\"\n").unwrap();
        assert_eq!(ok.targets["a"].ram_key, PathBuf::from("/root/k"));
        let e = parse("[target.a]\nhost = \"b\"\nseal_ram = \"yes\"\n").unwrap_err().to_string();
        assert!(e.contains("seal_ram") && e.contains("\"yes\"") && e.contains("always"), "{e}");
        let e = parse("ram_key = \"k\"\n").unwrap_err().to_string();
        assert!(e.contains("ram_key") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn replication_targets_are_checked() {
        let ok = parse(
            "[target.off]\nhost = \"backup.example.org\"\nport = 2222\nrate_limit = 1000\n[target.usb]\ndataset = \"usb/v\"\nram_dir = \"/usb/ram\"\n\
             [template.default]\nreplicate_to = [\"off\"]\n[domain.web]\nqmp = \"/q\"\nreplicate_to = [\"off\", \"usb\"]\n",
        )
        .unwrap();
        assert_eq!(ok.targets["off"].port, Some(2222));
        assert_eq!(ok.domains["web"].policy.replicate_to, ["off", "usb"]);
        assert_eq!(ok.registered_policy.replicate_to, ["off"]);
        for (text, says) in [
            ("[target.x]\nhost = \"-oProxyCommand=sh\"\n", "host"),
            ("[target.x]\nhost = \"a b\"\n", "host"),
            ("[target.x]\nhost = \"h\"\ndataset = \"tank/x\"\n", "vmsnap serve"),
            ("[target.x]\ndataset = \"tank/x\"\n", "dataset and ram_dir"),
            ("[target.x]\nhost = \"h\"\nidentity = \"id\"\n", "identity"),
            ("[domain.web]\nqmp = \"/q\"\nreplicate_to = [\"nowhere\"]\n", "nowhere"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_start_vector_is_checked() {
        let ok = parse("[domain.web]\nqmp = \"/run/web.qmp\"\nstart = [\"/usr/bin/qemu-system-x86_64\", \"-qmp\", \"unix:/run/web.qmp,server=on,wait=off\"]\n").unwrap();
        assert_eq!(ok.domains["web"].start.len(), 3);
        for (start, says) in [
            (r#"["qemu-system-x86_64", "-qmp", "unix:/run/web.qmp"]"#, "absolute path"),
            (r#"["/usr/bin/qemu-system-x86_64", "-qmp", "unix:/run/web.qmp", "-incoming", "defer"]"#, "-incoming"),
            (r#"["/usr/bin/qemu-system-x86_64", "-daemonize", "-qmp", "unix:/run/web.qmp"]"#, "-daemonize"),
            (r#"["/usr/bin/qemu-system-x86_64", "-qmp", "unix:/run/other.qmp"]"#, "QMP socket /run/web.qmp"),
        ] {
            let e = parse(&format!("[domain.web]\nqmp = \"/run/web.qmp\"\nstart = {start}\n")).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("start"), "{start}: {e}");
        }
    }

    #[test]
    fn full_example() {
        let c = parse(
            r#"
            ram_dir = "/srv/ram"
            require_quiesce = true
            [domain.web]
            qmp = "/run/web.qmp"
            qga = "/run/web.qga"
            disks = ["/tank/vms/web/root.qcow2", "/dev/zvol/tank/web-data"]
            [domain.db]
            qmp = "/run/db.qmp"
            require_quiesce = false
            "#,
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/vmsnap"));
        assert_eq!(c.overlay_dir, PathBuf::from("/var/lib/vmsnap/overlays"));
        assert_eq!(c.ram_dir, PathBuf::from("/srv/ram"));
        assert_eq!(c.domain("web").unwrap().quiesce, QuiescePolicy::Require);
        assert_eq!(c.domain("db").unwrap().quiesce, QuiescePolicy::BestEffort);
        assert_eq!(c.domain("web").unwrap().disks.len(), 2);
        let e = c.domain("nope").unwrap_err().to_string();
        assert!(e.contains("db, web"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = parse("[domain.web]\nqmp = \"run/web.qmp\"\n").unwrap_err().to_string();
        assert!(e.contains("/etc/vmsnap/vmsnap.toml") && e.contains("[domain.web] qmp"), "{e}");
        let e = parse("[domain.web]\nqmp = \"/x\"\nfrobnicate = 1\n").unwrap_err().to_string();
        assert!(e.contains("frobnicate") && e.contains("line 3"), "{e}");
        let e = parse("[domain.web]\nqga = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("qmp"), "{e}");
        let e = parse("[domain.\"a b\"]\nqmp = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("domain name"), "{e}");
    }

    #[test]
    fn templates_are_inherited_and_overridden() {
        let c = parse(
            r#"
            [template.default]
            hourly = 10
            [template.base]
            daily = 7
            ram = ["daily"]
            [template.production]
            use_template = "base"
            monthly = 2
            [domain.web]
            use_template = ["production"]
            qmp = "/run/web.qmp"
            daily = 14
            [domain.db]
            qmp = "/run/db.qmp"
            "#,
        )
        .unwrap();
        let web = &c.domain("web").unwrap().policy;
        assert_eq!((web.keep.get(Period::Hourly), web.keep.get(Period::Daily), web.keep.get(Period::Monthly)), (10, 14, 2));
        assert_eq!(web.ram_with, std::collections::BTreeSet::from([Period::Daily]));
        let db = &c.domain("db").unwrap().policy;
        assert_eq!((db.keep.get(Period::Hourly), db.keep.get(Period::Daily)), (10, 90));
    }

    #[test]
    fn policy_errors_name_file_line_and_key() {
        let e = parse("[domain.web]\nqmp = \"/x\"\n\ndaily_hour = 25\n").unwrap_err().to_string();
        assert!(e.contains("/etc/vmsnap/vmsnap.toml") && e.contains("line 4") && e.contains("[domain.web] daily_hour"), "{e}");
        let e = parse("[template.t]\nram = [\"sometimes\"]\n[domain.web]\nqmp = \"/x\"\nuse_template = \"t\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("[template.t] ram"), "{e}");
        let e = parse("[domain.web]\nqmp = \"/x\"\nuse_template = \"nope\"\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("no template named \"nope\""), "{e}");
        let e = parse(
            "[template.a]\nuse_template = \"b\"\n[template.b]\nuse_template = \"a\"\n[domain.web]\nqmp = \"/x\"\nuse_template = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("loop") && e.contains("a → b → a"), "{e}");
        let e = parse("[template.a]\nhourlyy = 3\n").unwrap_err().to_string();
        assert!(e.contains("hourlyy") && e.contains("line 2"), "{e}");
    }
}
