//! Reaching a running daemon from the CLI: the system bus (or `VMSNAP_BUS_ADDRESS`), and only
//! when `io.github.vmsnap.Agent1` has an owner; otherwise the CLI works in-process.

use std::time::Duration;
use vmsnap::daemon::dbus::BUS_NAME;

/// A connection to the bus where the daemon answers, if it does (within a second).
pub async fn daemon() -> Option<zbus::Connection> {
    let connect = async {
        let conn = match std::env::var("VMSNAP_BUS_ADDRESS") {
            Ok(a) => zbus::connection::Builder::address(a.as_str()).ok()?.build().await.ok()?,
            Err(_) => zbus::Connection::system().await.ok()?,
        };
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
        let name = zbus::names::BusName::try_from(BUS_NAME).ok()?;
        dbus.name_has_owner(name).await.ok()?.then_some(conn)
    };
    tokio::time::timeout(Duration::from_secs(1), connect).await.ok().flatten()
}
