//! Domains registered at run time by the libvirt hook or over D-Bus, persisted one file per
//! domain under `<state_dir>/registry/` (0600, fsync + rename) so the daemon rebuilds its list at
//! start-up. A registered domain gets the policy of `[template.default]`; a domain of the same
//! name in the config file wins.

use crate::config::{valid_domain_name, Config, DomainConfig, QuiescePolicy};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What registering a domain tells vmsnap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    pub uuid: Option<String>,
    pub qmp: PathBuf,
    pub qga: Option<PathBuf>,
    pub disks: Vec<PathBuf>,
    pub nvram: Option<PathBuf>,
    /// Where the domain's XML was saved.
    pub xml: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid registration: {0}")]
    Invalid(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Registration {
    /// Checks names and paths; the error names the field.
    pub fn validate(&self) -> Result<(), RegistryError> {
        if !valid_domain_name(&self.name) {
            return Err(RegistryError::Invalid(format!("domain name {:?}: use letters, digits, '-', '_' and '.'", self.name)));
        }
        if let Some(u) = &self.uuid {
            if u.len() != 36 || !u.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                return Err(RegistryError::Invalid(format!("uuid {u:?} is not a UUID")));
            }
        }
        let paths = [("qmp", Some(&self.qmp)), ("qga", self.qga.as_ref()), ("nvram", self.nvram.as_ref()), ("xml", self.xml.as_ref())];
        for (field, p) in paths.into_iter().chain(self.disks.iter().map(|d| ("disks", Some(d)))) {
            if let Some(p) = p {
                if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    return Err(RegistryError::Invalid(format!("{field}: {} is not an absolute path", p.display())));
                }
            }
        }
        Ok(())
    }

    /// The domain as the engine sees it.
    pub fn to_domain(&self, cfg: &Config) -> DomainConfig {
        DomainConfig {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            qmp: self.qmp.clone(),
            qga: self.qga.clone(),
            disks: self.disks.clone(),
            nvram: self.nvram.clone(),
            xml: self.xml.clone(),
            start: Vec::new(),
            quiesce: if cfg.require_quiesce { QuiescePolicy::Require } else { QuiescePolicy::BestEffort },
            policy: cfg.registered_policy.clone(),
        }
    }
}

/// The registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("registry") }
    }

    fn io(what: String) -> impl FnOnce(std::io::Error) -> RegistryError {
        move |source| RegistryError::Io { what, source }
    }

    fn write_private(&self, path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
        crate::engine::journal::create_private_dir(&self.dir).map_err(Self::io(format!("creating {}", self.dir.display())))?;
        crate::fsutil::write_atomic(path, bytes, 0o600)
            .map_err(|e| RegistryError::Io { what: format!("saving {}", path.display()), source: std::io::Error::other(e) })
    }

    /// Saves the domain's XML next to its registration; returns where.
    pub fn save_xml(&self, name: &str, xml: &str) -> Result<PathBuf, RegistryError> {
        if !valid_domain_name(name) {
            return Err(RegistryError::Invalid(format!("domain name {name:?}")));
        }
        let path = self.dir.join(format!("{name}.xml"));
        self.write_private(&path, xml.as_bytes())?;
        Ok(path)
    }

    /// Registers (or re-registers) a domain.
    pub fn save(&self, r: &Registration) -> Result<(), RegistryError> {
        r.validate()?;
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.write_private(&self.dir.join(format!("{}.json", r.name)), &bytes)
    }

    /// Forgets a domain; false when it was not registered.
    pub fn remove(&self, name: &str) -> Result<bool, RegistryError> {
        if !valid_domain_name(name) {
            return Err(RegistryError::Invalid(format!("domain name {name:?}")));
        }
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.xml")));
        match std::fs::remove_file(self.dir.join(format!("{name}.json"))) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RegistryError::Io { what: format!("unregistering {name}"), source: e }),
        }
    }

    /// Every registration; unreadable files are reported in the second list, not fatal.
    pub fn load_all(&self) -> (Vec<Registration>, Vec<String>) {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return (ok, bad) };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        paths.sort();
        for p in paths {
            // A registration is a few hundred bytes: anything far bigger, or not a regular file, is refused.
            match crate::fsutil::read_limited(&p, 1 << 20)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Registration>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) if r.validate().is_ok() => ok.push(r),
                Ok(r) => bad.push(format!("{}: {}", p.display(), r.validate().unwrap_err())),
                Err(e) => bad.push(format!("{}: {e}", p.display())),
            }
        }
        (ok, bad)
    }
}

/// Whether something listens on the unix socket at `path` (connect only; nothing is sent: a
/// QMP monitor serves one client, and a connection that says nothing costs it nothing).
fn socket_answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

impl Registry {
    /// Forgets registrations whose QMP socket no longer answers: the domain stopped while no
    /// daemon heard its hook (the hook never waits for one). Run at daemon start-up; returns
    /// (name, why) of each one dropped.
    pub fn drop_stale(&self) -> Vec<(String, String)> {
        let mut dropped = Vec::new();
        for r in self.load_all().0 {
            if socket_answers(&r.qmp) {
                continue;
            }
            let why = format!("its QMP socket {} does not answer (stopped while the daemon was down?)", r.qmp.display());
            match self.remove(&r.name) {
                Ok(_) => dropped.push((r.name, why)),
                Err(e) => tracing::warn!(domain = %r.name, "dropping a stale registration: {e}"),
            }
        }
        dropped
    }
}

/// The config's domains plus the registered ones (the config wins on a name clash).
pub fn all_domains(cfg: &Config, registry: &Registry) -> Vec<DomainConfig> {
    let mut out: Vec<DomainConfig> = cfg.domains.values().cloned().collect();
    let (regs, bad) = registry.load_all();
    for b in bad {
        tracing::warn!("ignoring registry entry {b}");
    }
    for r in regs {
        if !cfg.domains.contains_key(&r.name) {
            out.push(r.to_domain(cfg));
        }
    }
    out
}

/// The domains a command acts on: `only` (configured or registered) or every one of them.
///
/// # Errors
/// [`ConfigError::NoSuchDomain`] listing the known domains.
pub fn select(cfg: &Config, only: Option<&str>) -> Result<Vec<DomainConfig>, crate::config::ConfigError> {
    let all = all_domains(cfg, &Registry::new(&cfg.state_dir));
    let Some(name) = only else {
        return if all.is_empty() { Err(crate::config::ConfigError::NothingConfigured { path: cfg.path.clone() }) } else { Ok(all) };
    };
    match all.iter().find(|d| d.name == name) {
        Some(d) => Ok(vec![d.clone()]),
        None => Err(crate::config::ConfigError::NoSuchDomain {
            name: name.to_owned(),
            path: cfg.path.clone(),
            known: if all.is_empty() { "none".into() } else { all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ") },
        }),
    }
}

/// A configured or registered domain, else one known only by its name
/// ([`DomainConfig::by_name`]): a libvirt domain that is not running, or one whose host lost its
/// state directory. What restores, mounts and a target's listings act on.
///
/// # Errors
/// [`crate::config::ConfigError::NoSuchDomain`] when `name` cannot be a domain's name.
pub fn known_or_named(cfg: &Config, name: &str) -> Result<DomainConfig, crate::config::ConfigError> {
    match select(cfg, Some(name)) {
        Ok(mut d) => Ok(d.remove(0)),
        Err(_) if crate::config::valid_domain_name(name) => Ok(DomainConfig::by_name(name)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn reg(name: &str) -> Registration {
        Registration {
            name: name.into(),
            uuid: Some("c7a5fdbd-cdaf-9455-926a-d65c16db1809".into()),
            qmp: "/run/vmsnap/web.qmp".into(),
            qga: Some("/run/vmsnap/web.qga".into()),
            disks: vec!["/tank/vms/web/root.qcow2".into()],
            nvram: None,
            xml: None,
        }
    }

    #[test]
    fn stale_registrations_are_dropped_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        let live = dir.path().join("live.qmp");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        // A socket file nobody listens on any more, as QEMU leaves behind when killed.
        let dead = dir.path().join("dead.qmp");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        r.save(&Registration { qmp: live, ..reg("web") }).unwrap();
        r.save(&Registration { qmp: dead, ..reg("db") }).unwrap();
        r.save(&Registration { qmp: dir.path().join("absent.qmp"), ..reg("gone") }).unwrap();
        let dropped: Vec<String> = r
            .drop_stale()
            .into_iter()
            .map(|(n, why)| {
                assert!(why.contains("does not answer"), "{why}");
                n
            })
            .collect();
        assert_eq!(dropped, ["db", "gone"]);
        assert_eq!(r.load_all().0.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["web"]);
    }

    #[test]
    fn save_load_remove_and_merge_with_config() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        r.save(&reg("web")).unwrap();
        r.save(&reg("db")).unwrap();
        let mode = std::fs::metadata(dir.path().join("registry/web.json")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(dir.path().join("registry/junk.json"), "{").unwrap();
        let (ok, bad) = r.load_all();
        assert_eq!(ok.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["db", "web"]);
        assert!(bad[0].contains("junk.json"));
        let cfg = Config::parse("[template.default]\nhourly = 5\n[domain.db]\nqmp = \"/run/db-from-config.qmp\"\n", Path::new("/x.toml"))
            .unwrap();
        let all = all_domains(&cfg, &r);
        assert_eq!(all.len(), 2);
        assert_eq!(all.iter().find(|d| d.name == "db").unwrap().qmp, PathBuf::from("/run/db-from-config.qmp"));
        assert_eq!(all.iter().find(|d| d.name == "web").unwrap().policy.keep.get(crate::config::policy::Period::Hourly), 5);
        assert!(r.remove("web").unwrap());
        assert!(!r.remove("web").unwrap());
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let mut r = reg("web");
        r.qmp = "run/web.qmp".into();
        assert!(r.validate().unwrap_err().to_string().contains("qmp"));
        let mut r = reg("../etc");
        assert!(r.validate().unwrap_err().to_string().contains("domain name"));
        r = reg("web");
        r.disks.push("/tank/../etc/passwd".into());
        assert!(r.validate().unwrap_err().to_string().contains("disks"));
        r = reg("web");
        r.uuid = Some("nope".into());
        assert!(r.validate().unwrap_err().to_string().contains("uuid"));
    }

    #[test]
    fn a_domain_this_host_lost_is_known_by_its_name_alone() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("state_dir = \"{}\"\n[domain.db]\nqmp = \"/run/db.qmp\"\n", dir.path().display());
        let cfg = Config::parse(&text, Path::new("/x.toml")).unwrap();
        assert_eq!(known_or_named(&cfg, "db").unwrap().qmp, PathBuf::from("/run/db.qmp"));
        let lost = known_or_named(&cfg, "web").unwrap();
        assert_eq!((lost.name.as_str(), lost.disks.len()), ("web", 0));
        let bad = known_or_named(&cfg, "../etc").unwrap_err().to_string();
        assert!(bad.contains("../etc") && bad.contains("db"), "{bad}");
    }
}
