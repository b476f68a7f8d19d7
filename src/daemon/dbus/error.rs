//! The errors a D-Bus caller sees, as `io.github.vmsnap.Error.*` names.

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.github.vmsnap.Error")]
pub enum VmsnapError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No domain of that name is configured or registered.
    NoSuchDomain(String),
    /// Another operation holds the domain.
    Busy(String),
    /// The caller may not do this (mutating methods need root).
    NotAuthorized(String),
    /// The guest agent is needed (require_quiesce) and does not answer.
    AgentUnavailable(String),
    /// An argument was malformed; nothing was changed.
    InvalidArgument(String),
    /// The operation failed; the message names the step and the cause.
    Failed(String),
}
