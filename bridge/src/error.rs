//! One error type for every call, protocol-neutral: what went wrong, and the outcome
//! label metrics and the audit trail give it ([`Outcome`]). How each error reaches a
//! caller — its gRPC status and JSON-RPC code — is the front ends' one table,
//! [`crate::api::status`].

use qga_wire::{ErrorClass, QgaError};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BridgeError {
    /// The request is invalid; it never reached the guest.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No VM of that name.
    #[error("unknown VM '{0}'")]
    VmNotFound(String),
    /// The VM's agent cannot be reached now.
    #[error("agent of VM '{vm}' unavailable: {reason}")]
    Unavailable {
        /// The VM whose agent it is.
        vm: String,
        /// What failed: connecting, the handshake, the socket, libvirt.
        reason: String,
    },
    /// No reply before the deadline; the channel is resynchronised.
    #[error("agent of VM '{vm}' did not answer {command} in time")]
    DeadlineExceeded {
        /// The VM whose agent it is.
        vm: String,
        /// The QGA (or QMP, libvirt) command that was not answered.
        command: String,
    },
    /// The caller's deadline passed while its hotplug operation waited for the bridge's
    /// own work on the VM (a keeper pass, recovery); nothing was done.
    #[error("VM '{vm}': {reason}")]
    Waited {
        /// The VM.
        vm: String,
        /// What it waited for.
        reason: String,
    },
    /// The VM's queue is full.
    #[error("too many calls queued for VM '{0}'")]
    QueueFull(String),
    /// The VM's channel is held by a state-changing call whose caller stopped waiting:
    /// the bridge waits for its outcome before it sends anything else.
    #[error("VM '{vm}' is busy: {reason}")]
    Busy {
        /// The VM.
        vm: String,
        /// What it is busy with.
        reason: String,
    },
    /// A transport limit (calls in flight bridge-wide or on one connection) was hit;
    /// the call never reached a VM.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The caller proved no identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's grants do not allow the call; the guest was not asked.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The agent answered with an error.
    #[error("agent error {}: {}", .0.class.as_str(), .0.desc)]
    Agent(QgaError),
    /// The agent's reply could not be accepted.
    #[error("bad reply from agent of VM '{vm}': {reason}")]
    BadReply {
        /// The VM.
        vm: String,
        /// What was wrong.
        reason: String,
    },
    /// A hotplug step failed; what the operation had done was undone unless `reason`
    /// says otherwise.
    #[error("memory hotplug on VM '{vm}' failed at {step}: {reason}")]
    Hotplug {
        /// The VM.
        vm: String,
        /// The step (`device_add`, `offline`, ...).
        step: String,
        /// Why, and what was left.
        reason: String,
        /// Per-block results of the step, where it was an agent call.
        blocks: Vec<qga_wire::schema::GuestMemoryBlockResponse>,
    },
    /// No DIMM of that id in the VM.
    #[error("VM '{vm}' has no DIMM '{dimm}'")]
    DimmNotFound {
        /// The VM.
        vm: String,
        /// The DIMM id asked for.
        dimm: String,
    },
    /// Another caller's hotplug operation runs on the VM (or the retried request-id's
    /// own operation still runs or awaits recovery); nothing was done.
    #[error("{0}")]
    Aborted(String),
}

/// Whether a QGA `GenericError` is about the call's arguments (the QAPI visitor's texts).
pub fn is_argument_error(e: &QgaError) -> bool {
    e.class == ErrorClass::GenericError
        && (e.desc.starts_with("Parameter '") || e.desc.starts_with("Invalid parameter"))
}

impl BridgeError {
    /// The caller's deadline passed while `vm` ran `command`.
    pub fn deadline(vm: &str, command: &str) -> Self {
        Self::DeadlineExceeded {
            vm: vm.to_string(),
            command: command.to_string(),
        }
    }

    /// The outcome label of this failure, for metrics and the audit trail.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::InvalidRequest(_) => Outcome::InvalidRequest,
            Self::VmNotFound(_) => Outcome::VmNotFound,
            Self::Unavailable { .. } => Outcome::Unavailable,
            Self::DeadlineExceeded { .. } | Self::Waited { .. } => Outcome::DeadlineExceeded,
            Self::QueueFull(_) => Outcome::QueueFull,
            Self::Busy { .. } => Outcome::Busy,
            Self::Overloaded(_) => Outcome::Overloaded,
            Self::Agent(_) => Outcome::AgentError,
            Self::BadReply { .. } => Outcome::BadReply,
            Self::Unauthenticated(_) => Outcome::Unauthenticated,
            Self::PermissionDenied(_) => Outcome::PermissionDenied,
            Self::Hotplug { .. } => Outcome::HotplugFailed,
            Self::DimmNotFound { .. } => Outcome::DimmNotFound,
            Self::Aborted(_) => Outcome::Aborted,
        }
    }
}

/// How a call ended, as metrics and the audit trail label it: success, or one label per
/// kind of [`BridgeError`]. The one list of outcome labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Success.
    Ok,
    /// [`BridgeError::InvalidRequest`].
    InvalidRequest,
    /// [`BridgeError::VmNotFound`].
    VmNotFound,
    /// [`BridgeError::Unavailable`].
    Unavailable,
    /// [`BridgeError::DeadlineExceeded`] and [`BridgeError::Waited`].
    DeadlineExceeded,
    /// [`BridgeError::QueueFull`].
    QueueFull,
    /// [`BridgeError::Busy`].
    Busy,
    /// [`BridgeError::Overloaded`].
    Overloaded,
    /// [`BridgeError::Agent`].
    AgentError,
    /// [`BridgeError::BadReply`].
    BadReply,
    /// [`BridgeError::Unauthenticated`].
    Unauthenticated,
    /// [`BridgeError::PermissionDenied`].
    PermissionDenied,
    /// [`BridgeError::Hotplug`].
    HotplugFailed,
    /// [`BridgeError::DimmNotFound`].
    DimmNotFound,
    /// [`BridgeError::Aborted`].
    Aborted,
}

impl Outcome {
    /// Every outcome, so that a VM's series can all be dropped.
    pub const ALL: [Self; 15] = [
        Self::Ok,
        Self::InvalidRequest,
        Self::VmNotFound,
        Self::Unavailable,
        Self::DeadlineExceeded,
        Self::QueueFull,
        Self::Busy,
        Self::Overloaded,
        Self::AgentError,
        Self::BadReply,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::HotplugFailed,
        Self::DimmNotFound,
        Self::Aborted,
    ];

    /// The outcome of `result`.
    pub fn of<T>(result: &Result<T, BridgeError>) -> Self {
        result
            .as_ref()
            .map_or_else(BridgeError::outcome, |_| Self::Ok)
    }

    /// The label as metrics and the audit trail write it (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidRequest => "invalid_request",
            Self::VmNotFound => "vm_not_found",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::QueueFull => "queue_full",
            Self::Busy => "busy",
            Self::Overloaded => "overloaded",
            Self::AgentError => "agent_error",
            Self::BadReply => "bad_reply",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::HotplugFailed => "hotplug_failed",
            Self::DimmNotFound => "dimm_not_found",
            Self::Aborted => "aborted",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
