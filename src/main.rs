//! The `vmsnap` command line.

use clap::Parser;

/// Consistent, live snapshots of QEMU/libvirt virtual machines on ZFS.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    Cli::parse();
}
