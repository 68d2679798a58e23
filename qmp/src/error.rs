//! What can go wrong with a QMP command.

/// Why a QMP command did not return a value.
///
/// The variants tell the caller what it may conclude about the command:
///
/// - [`Unavailable`](Self::Unavailable): QEMU could not be reached, or the connection was
///   lost before the reply. A command whose connection was lost may or may not have run.
/// - [`Timeout`](Self::Timeout): the deadline passed. If the request had been written, QEMU
///   may still run it (or have run it); its late reply is dropped.
/// - [`Command`](Self::Command): QEMU ran the command and refused it.
/// - [`Protocol`](Self::Protocol): QEMU answered something this client cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// Cannot connect, the greeting or capabilities negotiation failed, the connection was
    /// lost before the reply came, or connecting is backing off after failures (the text
    /// says when the next attempt will be made).
    #[error("QMP unavailable: {0}")]
    Unavailable(String),
    /// The caller's deadline passed before the reply (or before connecting finished).
    #[error("QMP command {command} not answered before the deadline")]
    Timeout {
        /// The command.
        command: String,
    },
    /// QEMU's `{"error": {"class": ..., "desc": ...}}` reply.
    #[error("QEMU refused {class}: {desc}")]
    Command {
        /// QEMU's error class: `GenericError`, `CommandNotFound`, `DeviceNotFound`, ...
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A reply that cannot be used: it does not decode into the expected type, is neither
    /// a `return` nor an `error`, or was over the size or nesting limit.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

impl QmpError {
    /// QEMU's error class, for [`QmpError::Command`].
    pub fn class(&self) -> Option<&str> {
        match self {
            Self::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU does not know the command (older QEMU, or one built without it).
    pub fn is_command_not_found(&self) -> bool {
        self.class() == Some("CommandNotFound")
    }

    /// The device the command needs is not there: `query-balloon` and `balloon` on a VM
    /// without a virtio balloon (`No balloon device has been activated`).
    pub fn is_device_not_active(&self) -> bool {
        self.class() == Some("DeviceNotActive")
    }

    /// No object at the path or id the command named (`qom-get` on a device that went).
    pub fn is_device_not_found(&self) -> bool {
        self.class() == Some("DeviceNotFound")
    }
}
