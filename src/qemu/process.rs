//! Which QEMU process a journal belongs to, and who holds a disk image open.
//!
//! A pid alone is not an identity (pids are reused), so a process is its pid plus its start time
//! in clock ticks since boot (`/proc/PID/stat`, field 22). Recovery compares the QEMU it finds with
//! the one recorded when the operation began: the same process, a restarted one, or none.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One process, as it was when recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time in clock ticks after boot.
    pub start_ticks: u64,
}

impl ProcessId {
    /// The running process `pid`, or `None` when it does not exist.
    /// A zombie (dead, not yet reaped) counts as gone.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        if matches!(state(&stat), Some('Z' | 'X' | 'x')) {
            return None;
        }
        start_ticks(&stat).map(|start_ticks| Self { pid, start_ticks })
    }

    /// True while this very process (not a later one with the same pid) runs.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now == *self)
    }
}

/// Pure: field 3 of `/proc/PID/stat`, the process state.
pub fn state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

/// Pure: field 22 of `/proc/PID/stat`. The command name (field 2) is in parentheses and may hold
/// spaces or parentheses itself, so fields are counted after the last `)`.
pub fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come field 3 (state) onwards: field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The processes that have `image` open (any descriptor resolving to the same file or device),
/// other than this one. Processes whose descriptors cannot be read are skipped.
pub fn holders_of(image: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter(|&pid| pid != me && has_open(pid, image)).collect()
}

/// Whether process `pid` has `path` open (a descriptor resolving to the same file or device).
pub fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(target) = std::fs::canonicalize(path) else { return false };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(Result::ok).any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| same_file(&l, &target)))
}

/// The process listening on the unix socket at `path` (a bare connection and `SO_PEERCRED`;
/// nothing is sent), or `None` when nothing answers.
pub fn socket_peer(path: &Path) -> Option<u32> {
    let stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    u32::try_from(cred.pid()).ok()
}

fn same_file(link: &Path, target: &PathBuf) -> bool {
    link == target.as_path() || std::fs::canonicalize(link).is_ok_and(|l| l == *target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(start_ticks(stat), Some(987654));
        assert_eq!(state(stat), Some('S'));
        assert_eq!(start_ticks("garbage"), None);
        assert_eq!(start_ticks("1 (a) S 1"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_is_not() {
        let me = ProcessId::of(std::process::id()).expect("own stat");
        assert!(me.is_alive());
        assert!(!ProcessId { start_ticks: me.start_ticks + 1, ..me }.is_alive());
    }

    #[test]
    fn an_open_file_has_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"x").unwrap();
        let mut child = std::process::Command::new("sh").arg("-c").arg("exec 3<\"$0\"; sleep 5").arg(&img).spawn().unwrap();
        let mut found = Vec::new();
        for _ in 0..50 {
            found = holders_of(&img);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        // The shell, and the `sleep` that inherited descriptor 3.
        assert!(found.contains(&child.id()), "{found:?} vs {}", child.id());
    }
}
