//! Who may call what: the caller's uid as the bus daemon reports it for the message's sender
//! (never anything the caller says), and polkit's grant of [`polkit::ACTION`].

use super::{polkit, VmsnapError};

/// The caller's uid, from the bus daemon, for the message's sender.
pub async fn caller_uid(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>) -> Result<u32, VmsnapError> {
    let sender = hdr.sender().ok_or_else(|| VmsnapError::NotAuthorized("the message has no sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    dbus.get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| VmsnapError::NotAuthorized(format!("cannot learn the caller's uid: {e}")))
}

/// Mutating methods: root, or a caller polkit authorizes for [`polkit::ACTION`].
pub async fn require_root(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>, method: &str) -> Result<(), VmsnapError> {
    let uid = caller_uid(conn, hdr).await?;
    if uid == 0 {
        return Ok(());
    }
    let sender = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
    let why = match polkit::check(conn, &sender).await {
        polkit::Verdict::Authorized => return Ok(()),
        polkit::Verdict::NotAuthorized => format!("polkit does not grant {}", polkit::ACTION),
        polkit::Verdict::Unavailable(e) => format!("no polkit to grant {} ({e})", polkit::ACTION),
    };
    Err(VmsnapError::NotAuthorized(format!("{method} changes snapshots or domains and needs root; the caller is uid {uid}, and {why}")))
}

/// Methods that make root connect to sockets and read files the caller names: root only, never
/// polkit's grant (the libvirt hook, their one legitimate caller, runs as root).
pub async fn require_uid0(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>, method: &str) -> Result<(), VmsnapError> {
    let uid = caller_uid(conn, hdr).await?;
    if uid == 0 {
        return Ok(());
    }
    Err(VmsnapError::NotAuthorized(format!(
        "{method} needs root: it makes vmsnap connect to the sockets and copy the files it names, so only root may \
         call it (polkit's {} does not cover it); the caller is uid {uid}",
        polkit::ACTION
    )))
}
