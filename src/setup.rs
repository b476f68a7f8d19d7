//! `vmsnap setup`: puts vmsnap's system files in place, idempotently — the libvirt hook, the
//! systemd unit, the D-Bus policy and activation file, the polkit action, a default config (never overwritten),
//! shell completions and the man page — and says what the user must do next. `--dry-run`
//! reports the same actions and writes nothing. `--root` installs under another root (tests,
//! packaging).

use serde::Serialize;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One file setup manages.
#[derive(Debug, Clone)]
pub struct Item {
    /// Path relative to the root (`etc/libvirt/hooks/qemu.d/vmsnap`).
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    /// Written only when absent (the user's config).
    pub keep_existing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Installed,
    Updated,
    Unchanged,
    /// The file exists and is the user's: left alone.
    Kept,
}

#[derive(Debug, Clone, Serialize)]
pub struct Done {
    pub path: PathBuf,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}")]
pub struct SetupError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

const HOOK: &str = include_str!("../hooks/qemu");
const DBUS_POLICY: &str = include_str!("../dist/dbus/io.github.vmsnap.Agent1.conf");
const POLKIT_ACTION: &str = include_str!("../dist/polkit/io.github.vmsnap.policy");
pub const BUS_POLICY_PATH: &str = "usr/share/dbus-1/system.d/io.github.vmsnap.Agent1.conf";
pub const HOOK_PATH: &str = "etc/libvirt/hooks/qemu.d/vmsnap";

fn unit(exe: &Path, config: &Path) -> String {
    format!(
        "[Unit]
Description=vmsnap: consistent live snapshots of QEMU/libvirt VMs on ZFS
Documentation=man:vmsnap(8)
After=zfs.target zfs-mount.service dbus.service libvirtd.service
Wants=zfs.target

[Service]
Type=dbus
BusName=io.github.vmsnap.Agent1
ExecStart={exe} --config {config} daemon
ExecReload=/bin/kill -HUP $MAINPID
# A running snapshot finishes (or is undone) before the daemon exits: longer than the longest
# step's deadline (a RAM dump or a commit may take up to an hour), so systemd never kills the
# daemon with a guest frozen or paused.
TimeoutStopSec=65min
Restart=on-failure
RestartSec=5s

[Install]
WantedBy=multi-user.target
",
        exe = exe.display(),
        config = config.display()
    )
}

const ACTIVATION: &str = "[D-BUS Service]
Name=io.github.vmsnap.Agent1
Exec=/bin/false
User=root
SystemdService=vmsnap.service
";

const DEFAULT_CONFIG: &str = r#"# vmsnap configuration: see `man vmsnap` and the manual (/usr/share/doc/vmsnap/manual).
# Domains started by libvirt register themselves through the hook once enrolled
# (`vmsnap enroll DOMAIN`); they use [template.default]. Sanoid's keys and defaults apply.
state_dir = "/var/lib/vmsnap"
# ram_dir = "/srv/cheap/vmsnap-ram"   # RAM dumps on cheaper storage (root only, files 0600)
# metrics_file = "/var/lib/prometheus/node-exporter/vmsnap.prom"
# ram_key = "/etc/vmsnap/ram.key"     # seals RAM dumps for targets (setup draws it; keep a copy)

[template.default]
hourly = 24
daily = 14
monthly = 3
ram = ["daily"]
ram_keep = 3
"#;

/// Everything setup installs for the binary at `exe`, plus `extra` (completions, man page).
pub fn items(exe: &Path, config: &Path, extra: Vec<Item>) -> Vec<Item> {
    let hook = HOOK.replace("VMSNAP=${VMSNAP:-/usr/local/bin/vmsnap}", &format!("VMSNAP=${{VMSNAP:-{}}}", exe.display()));
    let item = |path: &str, content: String, mode| Item { path: path.into(), content: content.into_bytes(), mode, keep_existing: false };
    let mut v = vec![
        item(HOOK_PATH, hook, 0o755),
        item("etc/systemd/system/vmsnap.service", unit(exe, config), 0o644),
        item(BUS_POLICY_PATH, DBUS_POLICY.to_owned(), 0o644),
        item("usr/share/dbus-1/system-services/io.github.vmsnap.Agent1.service", ACTIVATION.to_owned(), 0o644),
        item("usr/share/polkit-1/actions/io.github.vmsnap.policy", POLKIT_ACTION.to_owned(), 0o644),
        Item {
            path: config.strip_prefix("/").unwrap_or(config).to_owned(),
            content: DEFAULT_CONFIG.as_bytes().to_vec(),
            mode: 0o644,
            keep_existing: true,
        },
    ];
    v.extend(extra);
    v
}

/// The RAM key at `path` (absolute; [`crate::ramcrypt`]): 32 random bytes as hex, root's only,
/// written once and never replaced.
pub fn ram_key_item(path: &Path) -> std::io::Result<Item> {
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = path.strip_prefix("/").unwrap_or(path).to_owned();
    Ok(Item { path, content: format!("{hex}\n").into_bytes(), mode: 0o600, keep_existing: true })
}

/// Installs `items` under `root` (or, `dry_run`, says what it would do).
pub fn apply(root: &Path, items: &[Item], dry_run: bool) -> Result<Vec<Done>, SetupError> {
    let mut done = Vec::new();
    for it in items {
        let path = root.join(&it.path);
        let outcome = match std::fs::read(&path) {
            Ok(_) if it.keep_existing => Outcome::Kept,
            Ok(old) => {
                let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0);
                if old == it.content && mode == it.mode {
                    Outcome::Unchanged
                } else {
                    Outcome::Updated
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Installed,
            Err(source) => return Err(SetupError { what: "reading", path, source }),
        };
        if !dry_run && matches!(outcome, Outcome::Installed | Outcome::Updated) {
            write(&path, &it.content, it.mode)?;
        }
        done.push(Done { path, outcome });
    }
    Ok(done)
}

fn write(path: &Path, content: &[u8], mode: u32) -> Result<(), SetupError> {
    let err = |what, source| SetupError { what, path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("creating the directory of", e))?;
    }
    let tmp = path.with_extension("vmsnap-new");
    let _ = std::fs::remove_file(&tmp);
    // Made with its mode (a key is never readable by others, not even for a moment).
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| err("writing", e))?;
    std::io::Write::write_all(&mut f, content).map_err(|e| err("writing", e))?;
    drop(f);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| err("chmod", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("installing", e))
}

/// What the user must do after setup changed something.
pub fn next_steps(done: &[Done], ram_key: &Path) -> Vec<String> {
    let changed =
        |suffix: &str| done.iter().any(|d| d.path.ends_with(suffix) && matches!(d.outcome, Outcome::Installed | Outcome::Updated));
    let mut steps = Vec::new();
    if changed(HOOK_PATH) {
        steps.push("restart libvirtd once so it sees the new hook: systemctl restart libvirtd (running domains keep running)".into());
    }
    if changed(BUS_POLICY_PATH) {
        steps.push("reload D-Bus for the new policy: systemctl reload dbus".into());
    }
    if changed("etc/systemd/system/vmsnap.service") {
        steps.push("start the daemon: systemctl daemon-reload && systemctl enable --now vmsnap".into());
    }
    let rel = ram_key.strip_prefix("/").unwrap_or(ram_key);
    if let Some(d) = done.iter().find(|d| d.path.ends_with(rel) && d.outcome == Outcome::Installed) {
        steps.push(format!(
            "keep a copy of the RAM key {} off this host, with your other secrets: RAM dumps sealed for a replication target open only with it",
            d.path.display()
        ));
    }
    steps.push("give each domain vmsnap's own QMP socket and agent channel: vmsnap enroll DOMAIN (effective at its next start)".into());
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(root: &Path, dry: bool) -> Vec<Done> {
        apply(root, &items(Path::new("/usr/local/bin/vmsnap"), Path::new("/etc/vmsnap/vmsnap.toml"), vec![]), dry).unwrap()
    }

    #[test]
    fn idempotent_dry_run_and_the_users_config_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let dry = run(root.path(), true);
        assert!(dry.iter().all(|d| d.outcome == Outcome::Installed));
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "a dry run writes nothing");
        let first = run(root.path(), false);
        assert!(first.iter().all(|d| d.outcome == Outcome::Installed));
        let hook = root.path().join(HOOK_PATH);
        assert_eq!(std::fs::metadata(&hook).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(std::fs::read_to_string(&hook).unwrap().contains("VMSNAP=${VMSNAP:-/usr/local/bin/vmsnap}"));
        assert!(next_steps(&first, Path::new(crate::config::DEFAULT_RAM_KEY)).iter().any(|s| s.contains("restart libvirtd")));
        let again = run(root.path(), false);
        assert!(again.iter().all(|d| matches!(d.outcome, Outcome::Unchanged | Outcome::Kept)), "{again:?}");
        // A changed unit is put back; the user's edited config is not touched.
        let unit = root.path().join("etc/systemd/system/vmsnap.service");
        std::fs::write(&unit, "edited").unwrap();
        let cfg = root.path().join("etc/vmsnap/vmsnap.toml");
        std::fs::write(&cfg, "# mine\n").unwrap();
        let third = run(root.path(), false);
        assert_eq!(third.iter().find(|d| d.path == unit).unwrap().outcome, Outcome::Updated);
        assert_eq!(third.iter().find(|d| d.path == cfg).unwrap().outcome, Outcome::Kept);
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# mine\n");
    }

    /// The RAM key is drawn once, written 0600 from the start, never replaced, and the user is
    /// told to keep a copy.
    #[test]
    fn the_ram_key_is_written_once_root_only() {
        let root = tempfile::tempdir().unwrap();
        let key = Path::new("/etc/vmsnap/ram.key");
        let install = || apply(root.path(), &[ram_key_item(key).unwrap()], false).unwrap();
        let first = install();
        let path = root.path().join("etc/vmsnap/ram.key");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(crate::ramcrypt::RamKey::from_hex(text.trim()).is_some(), "{text:?}");
        assert!(next_steps(&first, key).iter().any(|s| s.contains("keep a copy of the RAM key")));
        let again = install();
        assert_eq!(again[0].outcome, Outcome::Kept);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "a key is never replaced");
        assert!(!next_steps(&again, key).iter().any(|s| s.contains("RAM key")));
        assert_ne!(ram_key_item(key).unwrap().content, ram_key_item(key).unwrap().content, "each drawn at random");
    }

    #[test]
    fn the_default_config_loads() {
        crate::config::Config::parse(DEFAULT_CONFIG, Path::new("/etc/vmsnap/vmsnap.toml")).unwrap();
    }
}
