//! One error type for every call, mapped to a gRPC status and a JSON-RPC error.
//!
//! | error | gRPC | JSON-RPC |
//! |---|---|---|
//! | bad request (checked before the guest) | INVALID_ARGUMENT | -32602 |
//! | unknown VM | NOT_FOUND | -32001 |
//! | agent not connected, socket gone, handshake unanswered, backoff | UNAVAILABLE | -32002 |
//! | the caller's deadline passed (reply, handshake or send; or, for memory hotplug, before the bridge's own work on the VM finished) | DEADLINE_EXCEEDED | -32003 |
//! | too many calls queued for the VM, the VM busy with a write whose caller left, or a bridge-wide or per-connection in-flight limit hit | RESOURCE_EXHAUSTED | -32004 |
//! | QGA `CommandNotFound` (unknown or disabled) | UNIMPLEMENTED | -32005 |
//! | QGA `GenericError` about the arguments | INVALID_ARGUMENT | -32006 |
//! | any other QGA error | FAILED_PRECONDITION | -32007 |
//! | no or bad credentials while `[auth]` is configured, or a remote caller without it | UNAUTHENTICATED | HTTP 401 |
//! | the caller's grants do not allow the call on that VM | PERMISSION_DENIED | -32010 |
//! | reply the bridge cannot accept (malformed, too large, set results not answering the request) | INTERNAL | -32008 |
//! | memory hotplug: a step QEMU or the guest refused, the guest could not give memory back, no QMP socket, no slot left | FAILED_PRECONDITION | -32007 |
//! | memory hotplug: no DIMM of that id | NOT_FOUND | -32012 |
//! | memory hotplug: another caller's operation runs on the VM, or a retried request-id's operation still runs or awaits recovery | ABORTED | -32011 |
//!
//! JSON-RPC errors from the agent carry `data: {"class": ..., "desc": ...}`; hotplug
//! failures carry `data: {"step": ..., "blocks": [per-block results]}`.

use jsonrpsee::types::ErrorObjectOwned;
use qga_wire::{ErrorClass, QgaError};
use serde_json::json;
use tonic::{Code, Status};

/// JSON-RPC application error codes (see the module table).
pub mod code {
    /// Invalid params (JSON-RPC standard).
    pub const INVALID_PARAMS: i32 = -32602;
    /// Unknown VM.
    pub const VM_NOT_FOUND: i32 = -32001;
    /// Agent not connected.
    pub const UNAVAILABLE: i32 = -32002;
    /// The caller's deadline passed.
    pub const DEADLINE_EXCEEDED: i32 = -32003;
    /// A queue or in-flight limit was hit.
    pub const RESOURCE_EXHAUSTED: i32 = -32004;
    /// The agent does not offer the command.
    pub const UNIMPLEMENTED: i32 = -32005;
    /// The agent rejected the arguments.
    pub const AGENT_INVALID_ARGUMENT: i32 = -32006;
    /// The agent failed the command.
    pub const AGENT_ERROR: i32 = -32007;
    /// The agent's reply was unusable.
    pub const BAD_REPLY: i32 = -32008;
    /// No identity (HTTP answers 401 before JSON-RPC; kept for completeness).
    pub const UNAUTHENTICATED: i32 = -32009;
    /// The caller's grants do not allow the call.
    pub const PERMISSION_DENIED: i32 = -32010;
    /// Another hotplug operation runs on the VM.
    pub const ABORTED: i32 = -32011;
    /// No DIMM of that id.
    pub const DIMM_NOT_FOUND: i32 = -32012;
}

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
fn is_argument_error(e: &QgaError) -> bool {
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

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidRequest(_) => Code::InvalidArgument,
            Self::VmNotFound(_) => Code::NotFound,
            Self::Unavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded { .. } | Self::Waited { .. } => Code::DeadlineExceeded,
            Self::QueueFull(_) | Self::Busy { .. } | Self::Overloaded(_) => Code::ResourceExhausted,
            Self::Agent(e) if e.class == ErrorClass::CommandNotFound => Code::Unimplemented,
            Self::Agent(e) if is_argument_error(e) => Code::InvalidArgument,
            Self::Agent(_) => Code::FailedPrecondition,
            Self::BadReply { .. } => Code::Internal,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Hotplug { .. } => Code::FailedPrecondition,
            Self::DimmNotFound { .. } => Code::NotFound,
            Self::Aborted(_) => Code::Aborted,
        }
    }

    /// The JSON-RPC error code.
    pub fn rpc_code(&self) -> i32 {
        match self {
            Self::InvalidRequest(_) => code::INVALID_PARAMS,
            Self::VmNotFound(_) => code::VM_NOT_FOUND,
            Self::Unavailable { .. } => code::UNAVAILABLE,
            Self::DeadlineExceeded { .. } | Self::Waited { .. } => code::DEADLINE_EXCEEDED,
            Self::QueueFull(_) | Self::Busy { .. } | Self::Overloaded(_) => {
                code::RESOURCE_EXHAUSTED
            }
            Self::Agent(e) if e.class == ErrorClass::CommandNotFound => code::UNIMPLEMENTED,
            Self::Agent(e) if is_argument_error(e) => code::AGENT_INVALID_ARGUMENT,
            Self::Agent(_) => code::AGENT_ERROR,
            Self::BadReply { .. } => code::BAD_REPLY,
            Self::Unauthenticated(_) => code::UNAUTHENTICATED,
            Self::PermissionDenied(_) => code::PERMISSION_DENIED,
            Self::Hotplug { .. } => code::AGENT_ERROR,
            Self::DimmNotFound { .. } => code::DIMM_NOT_FOUND,
            Self::Aborted(_) => code::ABORTED,
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

impl From<BridgeError> for Status {
    fn from(e: BridgeError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<BridgeError> for ErrorObjectOwned {
    fn from(e: BridgeError) -> Self {
        let data = match &e {
            BridgeError::Agent(q) => Some(json!({"class": q.class.as_str(), "desc": q.desc})),
            BridgeError::Hotplug { step, blocks, .. } => {
                Some(json!({"step": step, "blocks": blocks}))
            }
            _ => None,
        };
        ErrorObjectOwned::owned(e.rpc_code(), e.to_string(), data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_map_by_class() {
        let nf = BridgeError::Agent(QgaError::command_not_found(
            "The command x has not been found",
        ));
        assert_eq!(
            (nf.code(), nf.rpc_code()),
            (Code::Unimplemented, code::UNIMPLEMENTED)
        );
        let arg = BridgeError::Agent(QgaError::generic("Parameter 'mem-blks' is missing"));
        assert_eq!(arg.code(), Code::InvalidArgument);
        let other = BridgeError::Agent(QgaError::generic("open(\"/sys/...\"): Permission denied"));
        assert_eq!(
            (other.code(), other.rpc_code()),
            (Code::FailedPrecondition, code::AGENT_ERROR)
        );
        let obj = ErrorObjectOwned::from(other);
        assert_eq!(
            obj.data().map(|d| d.get()),
            Some(r#"{"class":"GenericError","desc":"open(\"/sys/...\"): Permission denied"}"#)
        );
    }
}
