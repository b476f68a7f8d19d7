//! Asking polkit whether a non-root caller may change things: the action
//! [`ACTION`] (shipped in `dist/polkit/`, installed by `vmsnap setup`), checked for the caller's
//! bus name without interaction. Without polkit on the bus, only root may.

use std::collections::HashMap;
use std::time::Duration;
use zbus::zvariant::Value;

/// The action a non-root caller needs for every method that changes snapshots or domains.
pub const ACTION: &str = "io.github.vmsnap.manage";
/// How long polkit gets to answer (it may be started by bus activation).
const TIMEOUT: Duration = Duration::from_secs(10);

/// What polkit said about a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Authorized,
    NotAuthorized,
    /// No polkit to ask (not on the bus, or it did not answer): why.
    Unavailable(String),
}

/// `CheckAuthorization` of [`ACTION`] for the bus name `sender`, never interactive.
pub async fn check(conn: &zbus::Connection, sender: &str) -> Verdict {
    let subject: (&str, HashMap<&str, Value<'_>>) = ("system-bus-name", HashMap::from([("name", Value::from(sender))]));
    let details: HashMap<&str, &str> = HashMap::new();
    let args = (subject, ACTION, details, 0u32, "");
    let call = conn.call_method(
        Some("org.freedesktop.PolicyKit1"),
        "/org/freedesktop/PolicyKit1/Authority",
        Some("org.freedesktop.PolicyKit1.Authority"),
        "CheckAuthorization",
        &args,
    );
    let reply = match tokio::time::timeout(TIMEOUT, call).await {
        Err(_) => return Verdict::Unavailable(format!("polkit did not answer within {TIMEOUT:?}")),
        Ok(Err(e)) => return Verdict::Unavailable(format!("polkit: {e}")),
        Ok(Ok(m)) => m,
    };
    // (bba{ss}): is_authorized, is_challenge, details.
    match reply.body().deserialize::<(bool, bool, HashMap<String, String>)>() {
        Ok((true, _, _)) => Verdict::Authorized,
        Ok(_) => Verdict::NotAuthorized,
        Err(e) => Verdict::Unavailable(format!("polkit's answer does not parse: {e}")),
    }
}
