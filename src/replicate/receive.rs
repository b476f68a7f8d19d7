//! The one way vmsnap runs `zfs receive` on bytes a peer sent: whatever the stream carries, the
//! properties that would let it reach outside the dataset tree it lands in are not taken.
//!
//! A `zfs send -p`/`-R` stream is a package whose property list OpenZFS applies as *received*
//! properties: a stream from a compromised peer could set `mountpoint=/etc/cron.d`, turn
//! `setuid`/`devices`/`exec` back on or share the dataset, and `-u` only skips the mount *now* —
//! the next `zfs mount -a` or boot would mount it there. `-x` makes each listed property's
//! effective value what it would be had the stream not carried it (inherited from the dataset
//! tree the receiving host chose), for every file system of a package.

/// Properties a received stream never sets.
pub const NOT_RECEIVED: &[&str] = &["mountpoint", "canmount", "sharenfs", "sharesmb", "exec", "setuid", "devices", "zoned"];

/// What a replica never takes from its source either: space set aside in the backup pool (one
/// source's stream claiming `reservation=<the pool>` would starve every other source's replicas).
/// A restore keeps them: they are the user's own settings coming home.
pub const NOT_RECEIVED_BY_REPLICAS: &[&str] = &["reservation", "refreservation"];

/// What the received dataset is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiving {
    /// A replica a source sent to `vmsnap serve`: read-only, resumable.
    Replica,
    /// A snapshot brought back from a target to restore from (`restore --from`): writable, not
    /// resumable (a failed pull is started again).
    Restore,
}

/// The arguments after the `zfs` program name, receiving into `dataset` without mounting it.
pub fn argv(dataset: &str, into: Receiving) -> Vec<String> {
    let mut args: Vec<String> = vec!["receive".into()];
    if into == Receiving::Replica {
        args.push("-s".into());
    }
    args.push("-u".into());
    for p in NOT_RECEIVED {
        args.extend(["-x".into(), (*p).into()]);
    }
    if into == Receiving::Replica {
        for p in NOT_RECEIVED_BY_REPLICAS {
            args.extend(["-x".into(), (*p).into()]);
        }
        args.extend(["-o".into(), "readonly=on".into()]);
    }
    args.push(dataset.into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dangerous_property_is_excluded_and_replicas_are_read_only() {
        let a = argv("backup/replica/tank/vms/web", Receiving::Replica);
        for p in ["mountpoint", "canmount", "sharenfs", "sharesmb", "exec", "setuid", "devices", "zoned", "reservation", "refreservation"] {
            assert!(a.windows(2).any(|w| w[0] == "-x" && w[1] == p), "{p} not excluded: {a:?}");
        }
        assert!(a.windows(2).any(|w| w[0] == "-o" && w[1] == "readonly=on"));
        assert_eq!(&a[..3], ["receive", "-s", "-u"]);
        assert_eq!(a.last().unwrap(), "backup/replica/tank/vms/web");
        let r = argv("tank/vms/web", Receiving::Restore);
        assert!(!r.contains(&"-s".to_owned()) && !r.contains(&"readonly=on".to_owned()));
        assert!(r.windows(2).any(|w| w[0] == "-x" && w[1] == "mountpoint"));
        assert!(!r.contains(&"refreservation".to_owned()), "a restored zvol keeps its own refreservation: {r:?}");
    }
}
