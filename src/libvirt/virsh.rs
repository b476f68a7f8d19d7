//! The few `virsh` calls restore makes (state, define, restore, the agent through libvirt): each
//! an argument vector against `LIBVIRT_DEFAULT_URI` or `qemu:///system`, stderr kept for the error.
//!
//! Each call has a deadline ([`limit`]): libvirt's agent commands wait for the guest for as long
//! as it takes by default, and a guest is free never to answer. A call made from the daemon's
//! async workers hands the worker's other tasks on while it waits (`block_in_place`): one stuck
//! virsh never stops another domain's timers, its freeze-window deadline among them.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What went wrong running virsh.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    #[error("running virsh (is libvirt-clients installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("virsh {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("virsh {args}: no answer within {} s (stopped)", after.as_secs())]
    TimedOut { args: String, after: Duration },
}

/// How long `virsh ARGS` may take: a save image's whole RAM for `restore`, the guest's own time
/// for agent commands, libvirt's for the rest.
fn limit(args: &[&str]) -> Duration {
    Duration::from_secs(match args.first().copied() {
        Some("restore" | "save") => 3600,
        Some("domfsthaw" | "domfsfreeze" | "domtime" | "qemu-agent-command" | "domfsinfo" | "guestinfo") => 60,
        _ => 120,
    })
}

/// The most of virsh's stdout kept (a domain's XML, libvirt's capabilities: far less).
const STDOUT_MAX: u64 = 16 << 20;
/// The most of its stderr read, and kept for an error.
const STDERR_READ_MAX: u64 = 64 << 10;
const STDERR_MAX: usize = 2000;

/// The connection URI: the environment's, or the system instance (where vmsnap's domains run).
fn uri() -> String {
    std::env::var("LIBVIRT_DEFAULT_URI").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "qemu:///system".into())
}

/// Runs `virsh -c URI ARGS` within its [`limit`]; its stdout.
pub fn run(args: &[&str]) -> Result<String, VirshError> {
    let after = limit(args);
    let uri = uri();
    let argv: Vec<&str> = ["-c", uri.as_str()].into_iter().chain(args.iter().copied()).collect();
    run_program(OsStr::new("virsh"), &argv, after).map_err(|e| match e {
        // The error names the call as the caller made it (without the URI).
        VirshError::Failed { stderr, .. } => VirshError::Failed { args: args.join(" "), stderr },
        VirshError::TimedOut { after, .. } => VirshError::TimedOut { args: args.join(" "), after },
        e => e,
    })
}

/// Runs `program ARGS` within `after` (see the module doc): its stdout.
fn run_program(program: &OsStr, args: &[&str], after: Duration) -> Result<String, VirshError> {
    let work = || run_blocking(program, args, after);
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    }
}

fn run_blocking(program: &OsStr, args: &[&str], after: Duration) -> Result<String, VirshError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VirshError::Spawn)?;
    let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    // Both pipes are drained while virsh runs (a full pipe would stall it), each to its bound.
    let stdout = std::thread::spawn(move || drain(out, STDOUT_MAX));
    let stderr = std::thread::spawn(move || drain(err, STDERR_READ_MAX));
    let deadline = Instant::now() + after;
    let status = loop {
        match child.try_wait().map_err(VirshError::Spawn)? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    match status {
        None => Err(VirshError::TimedOut { args: args.join(" "), after }),
        Some(s) if !s.success() => {
            let stderr = String::from_utf8_lossy(&stderr).trim().chars().take(STDERR_MAX).collect();
            Err(VirshError::Failed { args: args.join(" "), stderr })
        }
        Some(_) => Ok(String::from_utf8_lossy(&stdout).into_owned()),
    }
}

/// Reads `from` to its end, keeping at most `max` bytes.
fn drain(from: impl Read, max: u64) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut from = from;
    let _ = from.by_ref().take(max).read_to_end(&mut kept);
    let _ = std::io::copy(&mut from, &mut std::io::sink());
    kept
}

/// The QEMU binaries libvirt lists on this host (`virsh capabilities`, each guest's `<emulator>`).
pub fn host_emulators() -> Result<Vec<std::path::PathBuf>, VirshError> {
    let xml = run(&["capabilities"])?;
    Ok(emulators_in(&xml))
}

fn emulators_in(capabilities: &str) -> Vec<std::path::PathBuf> {
    let Ok(doc) = roxmltree::Document::parse(capabilities) else { return Vec::new() };
    let mut out: Vec<std::path::PathBuf> = doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "emulator")
        .filter_map(|n| n.text().map(|t| std::path::PathBuf::from(t.trim())))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The domain's state as virsh words it (`running`, `paused`, `shut off`, …); `None` when libvirt
/// has no domain of that name (or virsh is not installed: then libvirt runs nothing).
pub fn domstate(domain: &str) -> Result<Option<String>, VirshError> {
    match run(&["domstate", "--", domain]) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(VirshError::Failed { stderr, .. }) if stderr.contains("ailed to get domain") || stderr.contains("no domain with") => Ok(None),
        Err(VirshError::Spawn(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether libvirt has a persistent definition of the domain.
pub fn is_persistent(domain: &str) -> Result<bool, VirshError> {
    match run(&["dominfo", "--", domain]) {
        Ok(info) => Ok(info.lines().any(|l| l.starts_with("Persistent:") && l.trim_end().ends_with("yes"))),
        Err(VirshError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn define(xml: &Path) -> Result<(), VirshError> {
    run(&["define", &xml.to_string_lossy()]).map(drop)
}

/// `virsh restore` of a save image; the domain runs (or stays paused, `paused`) afterwards.
pub fn restore(image: &Path, paused: bool) -> Result<(), VirshError> {
    let image = image.to_string_lossy();
    let mut args = vec!["restore", image.as_ref()];
    if paused {
        args.push("--paused");
    }
    run(&args).map(drop)
}

/// `virsh start`, paused when `paused` (the caller sets it up, then [`resume`]s it).
pub fn start(domain: &str, paused: bool) -> Result<(), VirshError> {
    let mut args = vec!["start"];
    if paused {
        args.push("--paused");
    }
    args.extend(["--", domain]);
    run(&args).map(drop)
}

pub fn resume(domain: &str) -> Result<(), VirshError> {
    run(&["resume", "--", domain]).map(drop)
}

/// `virsh destroy` (QEMU killed); a domain that does not run is not an error.
pub fn destroy(domain: &str) -> Result<(), VirshError> {
    match run(&["destroy", "--", domain]) {
        Err(VirshError::Failed { stderr, .. }) if stderr.contains("not running") || stderr.contains("ailed to get domain") => Ok(()),
        r => r.map(drop),
    }
}

/// `virsh undefine`; the nvram file stays (its owner removes it). No definition is not an error.
pub fn undefine(domain: &str) -> Result<(), VirshError> {
    match run(&["undefine", "--keep-nvram", "--", domain]) {
        Err(VirshError::Failed { stderr, .. }) if stderr.contains("ailed to get domain") || stderr.contains("no domain with") => Ok(()),
        r => r.map(drop),
    }
}

/// The MAC addresses of the running domain's network interfaces.
pub fn macs(domain: &str) -> Result<Vec<String>, VirshError> {
    let xml = run(&["dumpxml", "--", domain])?;
    Ok(interface_macs(&xml))
}

fn interface_macs(xml: &str) -> Vec<String> {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return Vec::new() };
    doc.descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "interface" && n.parent().is_some_and(|p| p.has_tag_name("devices")))
        .filter_map(|i| i.children().find(|c| c.has_tag_name("mac"))?.attribute("address").map(str::to_owned))
        .collect()
}

/// Takes every network link of the domain down (`domif-setlink … down`): the guest sees its
/// cable pulled and QEMU drops what it sends.
pub fn links_down(domain: &str) -> Result<Vec<String>, VirshError> {
    let macs = macs(domain)?;
    for mac in &macs {
        run(&["domif-setlink", "--", domain, mac, "down"])?;
    }
    Ok(macs)
}

#[cfg(test)]
mod tests {
    use super::{run_program, VirshError};
    use std::ffi::OsStr;
    use std::time::{Duration, Instant};

    #[test]
    fn a_call_past_its_deadline_is_stopped_and_says_so() {
        let t = Instant::now();
        let e = run_program(OsStr::new("sleep"), &["30"], Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, VirshError::TimedOut { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "stopped after {:?}", t.elapsed());
        let e =
            run_program(OsStr::new("sh"), &["-c", "echo out; echo 'error: no domain' >&2; exit 3"], Duration::from_secs(30)).unwrap_err();
        assert!(matches!(&e, VirshError::Failed { stderr, .. } if stderr == "error: no domain"), "{e}");
        let out = run_program(OsStr::new("sh"), &["-c", "head -c 100000 /dev/zero; echo done >&2"], Duration::from_secs(30)).unwrap();
        assert_eq!(out.len(), 100000);
    }

    /// A slow call on the runtime's only worker does not stop the other tasks there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_waiting_call_leaves_the_runtime_running() {
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        tokio::task::yield_now().await;
        tokio::spawn(async { run_program(OsStr::new("sleep"), &["1"], Duration::from_secs(30)) }).await.unwrap().unwrap();
        ticker.abort();
        let n = ticks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n >= 5, "the other task ticked {n} times while virsh ran for 1 s");
    }

    #[test]
    fn the_hosts_emulators_from_capabilities() {
        let caps = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
            <emulator>/usr/bin/qemu-system-x86_64</emulator><domain type='qemu'/></arch></guest>\
            <guest><arch name='i686'><emulator>/usr/bin/qemu-system-i386</emulator></arch></guest></capabilities>";
        let found = super::emulators_in(caps);
        assert_eq!(found, [std::path::PathBuf::from("/usr/bin/qemu-system-i386"), "/usr/bin/qemu-system-x86_64".into()]);
        assert!(super::emulators_in("not xml").is_empty());
    }

    #[test]
    fn interface_macs_of_a_live_definition() {
        let xml = "<domain><devices>
            <interface type='network'><mac address='52:54:00:aa:bb:01'/><source network='default'/></interface>
            <interface type='bridge'><mac address='52:54:00:aa:bb:02'/><target dev='vnet3'/></interface>
            <hostdev><interface/></hostdev>
          </devices></domain>";
        assert_eq!(super::interface_macs(xml), ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"]);
        assert!(super::interface_macs("<domain><devices/></domain>").is_empty());
    }
}
