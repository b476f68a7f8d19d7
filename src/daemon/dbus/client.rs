//! Typed client proxies of the service, for the CLI and the libvirt hook (the interface is the
//! one [`super::service`] serves and `dist/dbus/io.github.vmsnap.Agent1.xml` commits).

use std::collections::HashMap;
use zbus::zvariant::{OwnedObjectPath, Value};

#[zbus::proxy(
    interface = "io.github.vmsnap.Agent1",
    default_service = "io.github.vmsnap.Agent1",
    default_path = "/io/github/vmsnap/Agent1",
    gen_blocking = false
)]
pub trait Agent1 {
    fn domains(&self) -> zbus::Result<Vec<String>>;
    fn list(&self, domain: &str) -> zbus::Result<Vec<(String, i64, String, String)>>;
    fn prune(&self, domain: &str, dry_run: bool) -> zbus::Result<String>;
    fn snapshot(&self, domain: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<OwnedObjectPath>;
    fn replicate(&self, domain: &str, target: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<OwnedObjectPath>;
    fn restore(&self, domain: &str, snapshot: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<OwnedObjectPath>;
    fn verify(&self, domain: &str) -> zbus::Result<OwnedObjectPath>;
    fn verify_boot(&self, domain: &str, snapshot: &str) -> zbus::Result<OwnedObjectPath>;
    fn mount(&self, domain: &str, snapshot: &str) -> zbus::Result<OwnedObjectPath>;
    fn umount(&self, domain: &str, snapshot: &str) -> zbus::Result<OwnedObjectPath>;
    #[allow(clippy::too_many_arguments)]
    fn register_domain(&self, name: &str, uuid: &str, qmp: &str, qga: &str, disks: &[&str], nvram: &str, xml: &str) -> zbus::Result<()>;
    fn unregister_domain(&self, name: &str) -> zbus::Result<bool>;
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn snapshot_taken(&self, domain: &str, snapshot: &str, consistency: &str) -> zbus::Result<()>;
}

#[zbus::proxy(interface = "io.github.vmsnap.Job1", default_service = "io.github.vmsnap.Agent1", gen_blocking = false)]
pub trait Job1 {
    #[zbus(property)]
    fn domain(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn transfer(&self) -> zbus::Result<HashMap<String, zbus::zvariant::OwnedValue>>;
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn failure(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn hint(&self) -> zbus::Result<String>;
    fn cancel(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn finished(&self, success: bool, result: &str) -> zbus::Result<()>;
}
