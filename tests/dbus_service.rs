//! The D-Bus service on a private, real `dbus-daemon` (with vmsnap's shipped policy file
//! included): reading methods for anyone, every mutating method refused to a non-root caller
//! (the caller's uid comes from the bus), malformed arguments refused with a clear error and
//! nothing changed, registration persisted, and the introspection matching the committed XML.
//! Non-root calls are made with `dbus-send` under `setpriv --reuid 65534`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    address: String,
    _bus: Kill,
    _daemon: Kill,
}

fn start() -> Fixture {
    start_with("")
}

/// The bus and the daemon, with `extra` appended to the daemon's config.
fn start_with(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = dir.path().join("bus");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/dbus/io.github.vmsnap.Agent1.conf");
    // Like the system bus: anyone connects, nobody owns names or calls methods unless a policy
    // (here vmsnap's own file) says so.
    let conf = format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
        socket = socket.display(),
        policy = policy.display()
    );
    let conf_path = dir.path().join("bus.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let bus = Kill(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .spawn()
            .expect("dbus-daemon (the rig installs the dbus package)"),
    );
    let t = Instant::now();
    while !socket.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "dbus-daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let address = format!("unix:path={}", socket.display());
    let state = dir.path().join("state");
    let cfg = dir.path().join("vmsnap.toml");
    // No scheduled snapshots here: the daemon would take them and hold the domains' locks.
    let text = format!(
        "state_dir = \"{}\"\n[template.default]\nautosnap = false\n[domain.web]\nqmp = \"/run/no-such-web.qmp\"\n{extra}",
        state.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let daemon = Kill(
        Command::new(env!("CARGO_BIN_EXE_vmsnap"))
            .arg("--config")
            .arg(&cfg)
            .args(["daemon", "--bus-address", &address])
            .env("VMSNAP_LOG", "info")
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let f = Fixture { dir, address, _bus: bus, _daemon: daemon };
    let t = Instant::now();
    while !f.call(false, "Domains", &[]).0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the service did not appear: {}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    f
}

impl Fixture {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Calls `Agent1.<method>` with busctl (signature, then arguments), as root or as nobody;
    /// (success, stdout + stderr).
    fn call(&self, nobody: bool, method: &str, args: &[&str]) -> (bool, String) {
        self.busctl(nobody, &["call", "io.github.vmsnap.Agent1", "/io/github/vmsnap/Agent1", "io.github.vmsnap.Agent1", method], args)
    }

    fn busctl(&self, nobody: bool, head: &[&str], args: &[&str]) -> (bool, String) {
        let out = as_caller(nobody, "busctl").arg(format!("--address={}", self.address)).args(head).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// dbus-send shows the D-Bus error *name* (busctl shows only the message).
    fn dbus_send(&self, nobody: bool, method: &str, args: &[&str]) -> String {
        let out = as_caller(nobody, "dbus-send")
            .arg(format!("--bus={}", self.address))
            .args([
                "--print-reply",
                "--dest=io.github.vmsnap.Agent1",
                "/io/github/vmsnap/Agent1",
                &format!("io.github.vmsnap.Agent1.{method}"),
            ])
            .args(args)
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// A job's property as root (`nobody`: as uid 65534).
    fn job_property(&self, nobody: bool, job: &str, prop: &str) -> (bool, String) {
        self.busctl(nobody, &["get-property", "io.github.vmsnap.Agent1", job, "io.github.vmsnap.Job1", prop], &[])
    }
}

/// `program` run as root, or as nobody (uid 65534) through setpriv.
fn as_caller(nobody: bool, program: &str) -> Command {
    if nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        c
    } else {
        Command::new(program)
    }
}

const REG: [&str; 9] = [
    "ssssasss",
    "lab",
    "c7a5fdbd-cdaf-9455-926a-d65c16db1809",
    "/run/vmsnap/lab.qmp",
    "/run/vmsnap/lab.qga",
    "1",
    "/tank/vms/lab/root.qcow2",
    "",
    "<domain><name>lab</name></domain>",
];

#[test]
fn authorization_arguments_registry_and_introspection() {
    // A running VM (the rig's tiny guest, real QEMU): only what its QEMU uses can be registered.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rig = vmsnap_testkit::rig::Rig::locate().expect("the test rig is required");
    let (vm, qmp, qga, _) =
        rt.block_on(vmsnap_testkit::rig::TinyVm::boot(&rig, &vmsnap_testkit::rig::TinyVmOptions::default())).expect("tiny guest");
    drop((qmp, qga));
    let (qmp, disk) = (vm.machine.qmp_path.display().to_string(), vm.disks[0].display().to_string());
    let mut live: Vec<&str> = REG.to_vec();
    live[3] = &qmp;
    live[6] = &disk;
    let f = start();
    // Before any job object exists (they would appear as child nodes).
    let agent_xml = introspect(&f, "/io/github/vmsnap/Agent1");
    // Reading: anyone.
    let (ok, out) = f.call(true, "Domains", &[]);
    assert!(ok && out.contains("\"web\""), "{out}");

    // Every mutating method, as nobody: NotAuthorized, and nothing changes.
    for (method, args) in [
        ("Snapshot", vec!["sa{sv}", "web", "0"]),
        ("Replicate", vec!["ssa{sv}", "web", "", "0"]),
        ("Restore", vec!["ssa{sv}", "web", "s1", "0"]),
        ("Verify", vec!["s", "web"]),
        ("Mount", vec!["ss", "web", "s1"]),
        ("Umount", vec!["ss", "web", "s1"]),
        ("Prune", vec!["sb", "web", "false"]),
        ("RegisterDomain", REG.to_vec()),
        ("UnregisterDomain", vec!["s", "web"]),
    ] {
        let (ok, out) = f.call(true, method, &args);
        assert!(!ok && out.contains("needs root") && out.contains("uid 65534"), "{method}: {out}");
    }
    assert!(!f.state().join("registry").exists(), "a refused call changed the registry");
    // The errors' D-Bus names.
    let out = f.dbus_send(true, "UnregisterDomain", &["string:web"]);
    assert!(out.contains("io.github.vmsnap.Error.NotAuthorized"), "{out}");
    let out = f.dbus_send(false, "UnregisterDomain", &["string:../x"]);
    assert!(out.contains("io.github.vmsnap.Error.InvalidArgument"), "{out}");
    let out = f.dbus_send(false, "Prune", &["string:nope", "boolean:true"]);
    assert!(out.contains("io.github.vmsnap.Error.NoSuchDomain"), "{out}");

    // Malformed arguments, as root: clear errors, nothing changed.
    let (ok, out) = f.call(false, "Snapshot", &["sa{sv}", "nope", "0"]);
    assert!(!ok && out.contains("no domain named \"nope\"") && out.contains("web"), "{out}");
    let (ok, out) = f.call(false, "Snapshot", &["sa{sv}", "web", "1", "frobnicate", "i", "1"]);
    assert!(!ok && out.contains("unknown option \"frobnicate\""), "{out}");
    let (ok, out) = f.call(false, "Snapshot", &["sa{sv}", "web", "1", "strategy", "s", "sideways"]);
    assert!(!ok && out.contains("sideways"), "{out}");
    let (ok, out) = f.call(false, "Snapshot", &["sa{sv}", "web", "1", "quiesce", "s", "yes"]);
    assert!(!ok && out.contains("\"quiesce\" must be a boolean"), "{out}");
    // Replicate: the domain's own targets only, known options only (the sending itself is on
    // the replication lane, which has a target host).
    let (ok, out) = f.call(false, "Replicate", &["ssa{sv}", "web", "", "0"]);
    assert!(!ok && out.contains("nothing to replicate to (no replicate_to)"), "{out}");
    let (ok, out) = f.call(false, "Replicate", &["ssa{sv}", "web", "", "1", "dry_run", "s", "yes"]);
    assert!(!ok && out.contains("\"dry_run\" must be a boolean"), "{out}");
    let (ok, out) = f.call(false, "Replicate", &["ssa{sv}", "web", "", "1", "force", "b", "true"]);
    assert!(!ok && out.contains("unknown option \"force\""), "{out}");
    // Restore, Mount: names and options checked before any job starts; never a caller's path.
    for (method, args, said) in [
        ("Restore", vec!["ssa{sv}", "web", "a/b", "0"], "is not a snapshot name"),
        ("Restore", vec!["ssa{sv}", "../etc", "s1", "0"], "no domain named"),
        ("Restore", vec!["ssa{sv}", "web", "s1", "1", "as", "s", "../x"], "is not a domain name"),
        ("Restore", vec!["ssa{sv}", "web", "s1", "1", "from", "s", "nowhere"], "no target named \"nowhere\""),
        ("Restore", vec!["ssa{sv}", "web", "s1", "1", "path", "s", "/tmp/x"], "unknown option \"path\""),
        ("Restore", vec!["ssa{sv}", "web", "s1", "2", "as", "s", "copy", "destroy_newer", "b", "true"], "not with destroy_newer"),
        ("Mount", vec!["ss", "web", "../../etc"], "is not a snapshot name"),
        ("VerifyBoot", vec!["ss", "web", "../../etc"], "is not a snapshot name"),
        ("VerifyBoot", vec!["ss", "../etc", ""], "no domain named"),
    ] {
        let (ok, out) = f.call(false, method, &args);
        assert!(!ok && out.contains(said), "{method} {args:?}: {out}");
    }
    let mut bad = REG;
    bad[3] = "relative/lab.qmp";
    let (ok, out) = f.call(false, "RegisterDomain", &bad);
    assert!(!ok && out.contains("qmp") && out.contains("not an absolute path"), "{out}");
    bad = REG;
    bad[1] = "../../etc";
    let (ok, out) = f.call(false, "RegisterDomain", &bad);
    assert!(!ok && out.contains("domain name"), "{out}");
    assert!(!f.state().join("registry/lab.json").exists());
    let (ok, out) = f.call(false, "RegisterDomain", &["s", "lab"]);
    assert!(!ok, "{out}");
    // A socket nothing answers on, or a disk (or nvram) its QEMU does not have open: refused.
    let (ok, out) = f.call(false, "RegisterDomain", &REG);
    assert!(!ok && out.contains("nothing answers on /run/vmsnap/lab.qmp"), "{out}");
    let mut other = live.clone();
    other[6] = "/etc/shadow";
    let (ok, out) = f.call(false, "RegisterDomain", &other);
    assert!(!ok && out.contains("does not have /etc/shadow open"), "{out}");
    other = live.clone();
    other[7] = "/etc/shadow";
    let (ok, out) = f.call(false, "RegisterDomain", &other);
    assert!(!ok && out.contains("nvram") && out.contains("/etc/shadow"), "{out}");
    assert!(!f.state().join("registry/lab.json").exists());

    // Registration, as root: persisted (0600) and listed; unregistering removes it.
    let (ok, out) = f.call(false, "RegisterDomain", &live);
    assert!(ok, "{out}");
    let saved = std::fs::read_to_string(f.state().join("registry/lab.json")).unwrap();
    assert!(saved.contains(&qmp) && saved.contains("c7a5fdbd"), "{saved}");
    assert!(std::fs::read_to_string(f.state().join("registry/lab.xml")).unwrap().contains("<name>lab</name>"));
    let (_, out) = f.call(true, "Domains", &[]);
    assert!(out.contains("\"lab\"") && out.contains("\"web\""), "{out}");
    // A snapshot of the running domain on this host without ZFS: the job fails and says why.
    let (ok, out) = f.call(false, "Snapshot", &["sa{sv}", "lab", "1", "label", "s", "dbus"]);
    assert!(ok && out.contains("/io/github/vmsnap/Agent1/Jobs/"), "{out}");
    let job = out.split('"').find(|s| s.starts_with("/io/github/vmsnap/Agent1/Jobs/")).unwrap().to_owned();
    let t = Instant::now();
    let state = loop {
        let (_, out) = f.job_property(false, &job, "State");
        if !out.contains("\"running\"") {
            break out;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "job still running: {}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(state.contains("\"failed\""), "{state}");
    let (_, result) = f.job_property(false, &job, "Result");
    assert!(result.contains("lab") && result.contains("zfs"), "{result}");
    // Root's job is root's to read: another local user learns nothing of it.
    for prop in ["Result", "State", "Domain", "Progress", "Failure", "Transfer"] {
        let (ok, out) = f.job_property(true, &job, prop);
        // busctl shows org.freedesktop.DBus.Error.AccessDenied as its errno's words.
        assert!(!ok && out.contains("Access denied") && !out.contains("zfs"), "{prop} as nobody: {out}");
    }
    let out = as_caller(true, "busctl")
        .arg(format!("--address={}", f.address))
        .args(["introspect", "--json=short", "io.github.vmsnap.Agent1", &job, "io.github.vmsnap.Job1"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!said.contains("zfs"), "introspection as nobody shows the job's values: {said}");
    let (ok, out) = f.call(false, "UnregisterDomain", &["s", "lab"]);
    assert!(ok && out.contains("b true"), "{out}");
    assert!(!f.state().join("registry/lab.json").exists());

    // The interfaces as committed.
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/dbus/io.github.vmsnap.Agent1.xml");
    let live = format!("{agent_xml}\n{}", introspect(&f, &job));
    if std::env::var_os("VMSNAP_BLESS").is_some() {
        std::fs::write(&committed, &live).unwrap();
    }
    let want = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(live == want, "the D-Bus interface changed; if on purpose, rerun with VMSNAP_BLESS=1 and commit\n{live}");
}

/// The introspection XML of `path`.
fn introspect(f: &Fixture, path: &str) -> String {
    let (ok, out) = f.busctl(true, &["call", "io.github.vmsnap.Agent1", path, "org.freedesktop.DBus.Introspectable", "Introspect"], &[]);
    assert!(ok, "{out}");
    // `s "<xml>"`: busctl quotes it C-style.
    let quoted = out.trim().strip_prefix("s \"").and_then(|q| q.strip_suffix('"')).unwrap_or(&out);
    let mut xml = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            xml.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => xml.push('\n'),
            Some('t') => xml.push('\t'),
            Some(other) => xml.push(other),
            None => {}
        }
    }
    xml.trim().to_owned() + "\n"
}

/// Runs `hooks/qemu` as libvirt would: argv, the domain XML on stdin. (exit code, stdout, stderr, time).
fn run_hook(address: &str, args: &[&str], xml: &str) -> (i32, String, String, Duration) {
    use std::io::Write;
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/qemu");
    let t = Instant::now();
    let mut child = Command::new(hook)
        .args(args)
        .env("VMSNAP", env!("CARGO_BIN_EXE_vmsnap"))
        .env("VMSNAP_BUS_ADDRESS", address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // libvirt writes the whole XML; a hook that stopped reading would fail this write.
    child.stdin.take().unwrap().write_all(xml.as_bytes()).expect("the hook reads all of stdin");
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

const ENROLLED: &str = r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>lab2</name>
  <uuid>2b7c3e55-0d5e-4d0c-8f0e-3e2f4a1b9c77</uuid>
  <devices><disk type='file' device='disk'><source file='/tank/vms/lab2/root.qcow2'/></disk></devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/><qemu:arg value='unix:/run/vmsnap/lab2.qmp,server=on,wait=off'/>
    <qemu:arg value='-chardev'/><qemu:arg value='socket,id=vmsnap-qga,path=/run/vmsnap/lab2.qga,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"#;

#[test]
fn the_libvirt_hook_registers_and_never_blocks_a_start() {
    // The domains the hook registers must be running: a real QEMU stands behind their sockets
    // and holds their disks (the XML is libvirt's, with this QEMU's paths).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rig = vmsnap_testkit::rig::Rig::locate().expect("the test rig is required");
    let (vm, qmp, qga, _) =
        rt.block_on(vmsnap_testkit::rig::TinyVm::boot(&rig, &vmsnap_testkit::rig::TinyVmOptions::default())).expect("tiny guest");
    drop((qmp, qga));
    let (qmp, disk) = (vm.machine.qmp_path.display().to_string(), vm.disks[0].display().to_string());
    let enrolled = ENROLLED.replace("/run/vmsnap/lab2.qmp", &qmp).replace("/tank/vms/lab2/root.qcow2", &disk);
    let f = start();
    let (code, stdout, stderr, _) = run_hook(&f.address, &["lab2", "started", "begin", "-"], &enrolled);
    assert!(code == 0 && stdout.is_empty(), "{code} {stdout} {stderr}");
    let saved = std::fs::read_to_string(f.state().join("registry/lab2.json")).unwrap_or_else(|e| panic!("{e}: {stderr}\n{}", f.log()));
    assert!(saved.contains(&qmp) && saved.contains("/run/vmsnap/lab2.qga") && saved.contains(&disk), "{saved}");
    // The same domain with a disk its QEMU does not have open: refused, exit 0 all the same.
    let foreign_disk = ENROLLED.replace("/run/vmsnap/lab2.qmp", &qmp).replace("lab2</name>", "lab3</name>");
    let (code, _, stderr, _) = run_hook(&f.address, &["lab3", "started", "begin", "-"], &foreign_disk);
    assert!(code == 0 && stderr.contains("does not have /tank/vms/lab2/root.qcow2 open"), "{stderr}");
    assert!(!f.state().join("registry/lab3.json").exists());
    assert!(f.call(true, "Domains", &[]).1.contains("\"lab2\""));
    // Operations other than started/reconnect/stopped/release do nothing and print nothing.
    for op in ["prepare", "start", "migrate", "restore"] {
        let (code, stdout, _, _) = run_hook(&f.address, &["lab2", op, "begin", "-"], &enrolled);
        assert!(code == 0 && stdout.is_empty());
    }
    let (code, stdout, _, _) = run_hook(&f.address, &["lab2", "stopped", "end", "-"], &enrolled);
    assert!(code == 0 && stdout.is_empty());
    assert!(!f.state().join("registry/lab2.json").exists(), "stopped must unregister");
    // A real libvirt XML (recorded), reconnect after a libvirtd restart: registered.
    let recorded =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol-fixtures/libvirt/hook-stdin-started-begin.xml"))
            .unwrap()
            .replace("$RIG/lv/extra-qmp.sock", &qmp)
            .replace("$RIG/lv/data.qcow2", &disk)
            .replace("$RIG", "/var/cache/vmsnap-rig");
    let (code, _, stderr, _) = run_hook(&f.address, &["tiny", "reconnect", "begin", "-"], &recorded);
    assert!(code == 0 && f.state().join("registry/tiny.json").exists(), "{stderr}");
    // Malformed XML: exit 0, says why on stderr, registers nothing.
    let (code, stdout, stderr, _) = run_hook(&f.address, &["bad", "started", "begin", "-"], "<domain><name>bad");
    assert!(code == 0 && stdout.is_empty() && stderr.contains("does not parse"), "{stderr}");
    assert!(!f.state().join("registry/bad.json").exists());
}

#[test]
fn the_hook_exits_0_at_once_when_the_daemon_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}", dir.path().join("no-bus").display());
    // A large XML: the hook must still read all of it.
    let big = ENROLLED.replace("</domain>", &format!("<description>{}</description></domain>", "x".repeat(1 << 20)));
    let (code, stdout, stderr, took) = run_hook(&address, &["lab2", "started", "begin", "-"], &big);
    assert!(code == 0 && stdout.is_empty(), "{code} {stdout}");
    assert!(stderr.contains("lab2") && stderr.contains("daemon"), "{stderr}");
    assert!(took < Duration::from_secs(10), "the hook took {took:?}");
    // Without the binary at all: still 0, stdin drained.
    let (code, _, stderr, _) = {
        use std::io::Write;
        let mut child = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/qemu"))
            .args(["lab2", "started", "begin", "-"])
            .env("VMSNAP", "/nonexistent/vmsnap")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(big.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code().unwrap_or(-1), String::new(), String::from_utf8_lossy(&out.stderr).into_owned(), ())
    };
    assert!(code == 0 && stderr.contains("missing"), "{stderr}");
}

#[test]
fn the_cli_goes_through_the_running_daemon() {
    let f = start();
    let cfg = f.dir.path().join("vmsnap.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("--config")
        .arg(&cfg)
        .args(["snapshot", "web", "--label", "cli"])
        .env("VMSNAP_BUS_ADDRESS", &f.address)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // web's QMP socket does not exist and it lists no disks: the daemon's job fails, and says so.
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("daemon job /io/github/vmsnap/Agent1/Jobs/") && err.contains("web") && err.contains("disks"), "{err}");
    assert!(f.log().contains("vmsnap daemon starting"));
    // --local: the same refusal, from this process.
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("--config")
        .arg(&cfg)
        .args(["snapshot", "web", "--local"])
        .env("VMSNAP_BUS_ADDRESS", &f.address)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("daemon job") && err.contains("disks"), "{err}");
}

/// A running VM (the rig's tiny guest, real QEMU) whose domain requires quiescing but names no
/// reachable agent: `Snapshot` refuses at once with AgentUnavailable, the VM untouched.
#[test]
fn snapshot_refuses_when_a_required_agent_is_unavailable() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rig = vmsnap_testkit::rig::Rig::locate().expect("the test rig is required");
    let (vm, qmp, qga, _) =
        rt.block_on(vmsnap_testkit::rig::TinyVm::boot(&rig, &vmsnap_testkit::rig::TinyVmOptions::default())).expect("tiny guest");
    // QEMU's monitor socket takes one client: let go of it for the daemon.
    drop((qmp, qga));
    let f = start_with(&format!(
        "[domain.strict]\nqmp = \"{}\"\nqga = \"/run/no-such-agent.sock\"\nrequire_quiesce = true\n",
        vm.machine.qmp_path.display()
    ));
    let (ok, msg) = f.call(false, "Snapshot", &["sa{sv}", "strict", "0"]);
    assert!(!ok && msg.contains("require_quiesce") && msg.contains("guest agent is unavailable"), "{msg}");
    rt.block_on(async {
        let qmp = vmsnap::qemu::qmp::Qmp::connect(&vm.machine.observer_path, Duration::from_secs(10)).await.unwrap();
        assert!(qmp.execute(&qapi::qmp::query_status {}).await.unwrap().running, "the VM must be untouched");
    });
    assert!(!f.state().join("journal/strict.json").exists());
}

/// The daemon idles in a few MiB of its own memory (anonymous pages: the binary's mapped pages
/// are shared and the kernel's to drop), after serving calls and running a job.
#[test]
fn the_daemon_idles_in_a_few_mib() {
    let f = start();
    for _ in 0..20 {
        assert!(f.call(false, "Domains", &[]).0);
    }
    let _ = introspect(&f, "/io/github/vmsnap/Agent1");
    // A job (it fails: web has no VM and no disks).
    let (ok, said) = f.call(false, "Snapshot", &["sa{sv}", "web", "0"]);
    assert!(ok, "{said}");
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", f._daemon.0.id())).unwrap();
    let kib = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {status}"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap()
    };
    let (anon, rss) = (kib("RssAnon:"), kib("VmRSS:"));
    eprintln!("METRIC daemon idle: {anon} KiB of its own (RssAnon), {rss} KiB resident with the binary's pages");
    assert!(anon < 8 * 1024, "the idle daemon holds {anon} KiB of its own memory");
}
