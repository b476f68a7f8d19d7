//! A "remote host" inside the OpenZFS VM, for replication: an `sshd` in its own network
//! namespace `remote` (a veth pair; 10.77.0.1 here, 10.77.0.2 there, nothing leaves the VM),
//! with its own host key and an `authorized_keys` file the caller writes. Used by the
//! replication lane and its benchmark; run inside the VM only.

use super::lane::sh;

/// The remote host's address.
pub const ADDRESS: &str = "10.77.0.2";

/// Starts the remote host with its files under `dir` (host key, `authorized_keys`, `sshd.log`)
/// and a client key `dir/id` (no passphrase) for the caller to authorize.
pub fn start(dir: &str) {
    sh("ip netns add remote && ip link add veth-src type veth peer name veth-dst && ip link set veth-dst netns remote \
        && ip addr add 10.77.0.1/24 dev veth-src && ip link set veth-src up \
        && ip netns exec remote ip addr add 10.77.0.2/24 dev veth-dst && ip netns exec remote ip link set veth-dst up \
        && ip netns exec remote ip link set lo up");
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {dir}/host_key && ssh-keygen -q -t ed25519 -N '' -f {dir}/id && mkdir -p /run/sshd \
         && printf 'ListenAddress {ADDRESS}\\nHostKey {dir}/host_key\\nPermitRootLogin prohibit-password\\nAuthorizedKeysFile {dir}/authorized_keys\\nStrictModes no\\nUsePAM no\\nPidFile /run/sshd-remote.pid\\n' > {dir}/sshd_config \
         && touch {dir}/authorized_keys && ip netns exec remote /usr/sbin/sshd -f {dir}/sshd_config -E {dir}/sshd.log"
    ));
}

/// Stops it.
pub fn stop() {
    let _ = std::process::Command::new("/bin/sh").arg("-c").arg("kill $(cat /run/sshd-remote.pid) 2>/dev/null").status();
}

/// ssh's options for reaching it from scripts and configs (host key learnt on first use, into
/// `dir/known_hosts`).
pub fn ssh_options(dir: &str) -> [String; 6] {
    [
        "-o".into(),
        "StrictHostKeyChecking=accept-new".into(),
        "-o".into(),
        format!("UserKnownHostsFile={dir}/known_hosts"),
        "-o".into(),
        "ConnectTimeout=5".into(),
    ]
}
