//! The one table from a [`BridgeError`] to what a caller sees: its gRPC status code and
//! its JSON-RPC error code (documented for users in `docs/errors.md`). JSON-RPC errors
//! from the agent carry `data: {"class": ..., "desc": ...}`; hotplug failures carry
//! `data: {"step": ..., "blocks": [per-block results]}`. Refusals before a call exists
//! (no credentials) are answered by the gatekeeper: gRPC UNAUTHENTICATED, HTTP 401.

use jsonrpsee::types::ErrorObjectOwned;
use qga_wire::ErrorClass;
use serde_json::json;
use tonic::{Code, Status};

use crate::error::{BridgeError, is_argument_error};

/// JSON-RPC application error codes.
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
    /// The agent failed the command, or a hotplug step failed.
    pub const AGENT_ERROR: i32 = -32007;
    /// The agent's reply was unusable.
    pub const BAD_REPLY: i32 = -32008;
    /// No identity (HTTP answers 401 before JSON-RPC; kept for completeness).
    pub const UNAUTHENTICATED: i32 = -32009;
    /// The caller's grants do not allow the call.
    pub const PERMISSION_DENIED: i32 = -32010;
    /// Another caller's hotplug operation runs on the VM.
    pub const ABORTED: i32 = -32011;
    /// No DIMM of that id.
    pub const DIMM_NOT_FOUND: i32 = -32012;
}

/// The table: `e`'s gRPC status code and JSON-RPC error code.
pub fn codes(e: &BridgeError) -> (Code, i32) {
    use BridgeError as E;
    match e {
        E::InvalidRequest(_) => (Code::InvalidArgument, code::INVALID_PARAMS),
        E::VmNotFound(_) => (Code::NotFound, code::VM_NOT_FOUND),
        E::Unavailable { .. } => (Code::Unavailable, code::UNAVAILABLE),
        E::DeadlineExceeded { .. } | E::Waited { .. } => {
            (Code::DeadlineExceeded, code::DEADLINE_EXCEEDED)
        }
        E::QueueFull(_) | E::Busy { .. } | E::Overloaded(_) => {
            (Code::ResourceExhausted, code::RESOURCE_EXHAUSTED)
        }
        E::Agent(q) if q.class == ErrorClass::CommandNotFound => {
            (Code::Unimplemented, code::UNIMPLEMENTED)
        }
        E::Agent(q) if is_argument_error(q) => {
            (Code::InvalidArgument, code::AGENT_INVALID_ARGUMENT)
        }
        E::Agent(_) | E::Hotplug { .. } => (Code::FailedPrecondition, code::AGENT_ERROR),
        E::BadReply { .. } => (Code::Internal, code::BAD_REPLY),
        E::Unauthenticated(_) => (Code::Unauthenticated, code::UNAUTHENTICATED),
        E::PermissionDenied(_) => (Code::PermissionDenied, code::PERMISSION_DENIED),
        E::DimmNotFound { .. } => (Code::NotFound, code::DIMM_NOT_FOUND),
        E::Aborted(_) => (Code::Aborted, code::ABORTED),
    }
}

impl From<BridgeError> for Status {
    fn from(e: BridgeError) -> Self {
        Status::new(codes(&e).0, e.to_string())
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
        ErrorObjectOwned::owned(codes(&e).1, e.to_string(), data)
    }
}

#[cfg(test)]
mod tests {
    use qga_wire::QgaError;

    use super::*;

    #[test]
    fn agent_errors_map_by_class() {
        let nf = BridgeError::Agent(QgaError::command_not_found(
            "The command x has not been found",
        ));
        assert_eq!(codes(&nf), (Code::Unimplemented, code::UNIMPLEMENTED));
        let arg = BridgeError::Agent(QgaError::generic("Parameter 'mem-blks' is missing"));
        assert_eq!(codes(&arg).0, Code::InvalidArgument);
        let other = BridgeError::Agent(QgaError::generic("open(\"/sys/...\"): Permission denied"));
        assert_eq!(codes(&other), (Code::FailedPrecondition, code::AGENT_ERROR));
        let obj = ErrorObjectOwned::from(other);
        assert_eq!(
            obj.data().map(|d| d.get()),
            Some(r#"{"class":"GenericError","desc":"open(\"/sys/...\"): Permission denied"}"#)
        );
    }

    #[test]
    fn a_caller_refused_for_another_callers_operation_sees_aborted_and_a_waited_one_a_deadline() {
        let aborted = BridgeError::Aborted("another caller's operation runs".into());
        assert_eq!(codes(&aborted), (Code::Aborted, code::ABORTED));
        let waited = BridgeError::Waited {
            vm: "vm1".into(),
            reason: "the keeper's pass outlasted the deadline".into(),
        };
        assert_eq!(
            codes(&waited),
            (Code::DeadlineExceeded, code::DEADLINE_EXCEEDED)
        );
    }

    /// `InvalidArgument` as the gRPC spec and `docs/errors.md` write it.
    fn screaming(code: Code) -> String {
        let mut out = String::new();
        for (i, c) in format!("{code:?}").chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }

    /// One error of every kind the table tells apart.
    fn every_kind() -> Vec<BridgeError> {
        let vm = || "vm1".to_string();
        let why = || "why".to_string();
        vec![
            BridgeError::InvalidRequest(why()),
            BridgeError::VmNotFound(vm()),
            BridgeError::Unavailable {
                vm: vm(),
                reason: why(),
            },
            BridgeError::deadline("vm1", "guest-ping"),
            BridgeError::Waited {
                vm: vm(),
                reason: why(),
            },
            BridgeError::QueueFull(vm()),
            BridgeError::Busy {
                vm: vm(),
                reason: why(),
            },
            BridgeError::Overloaded(why()),
            BridgeError::Agent(QgaError::command_not_found(
                "The command x has not been found",
            )),
            BridgeError::Agent(QgaError::generic("Parameter 'mem-blks' is missing")),
            BridgeError::Agent(QgaError::generic("failed")),
            BridgeError::BadReply {
                vm: vm(),
                reason: why(),
            },
            BridgeError::PermissionDenied(why()),
            BridgeError::Hotplug {
                vm: vm(),
                step: "online".into(),
                reason: why(),
                blocks: vec![],
            },
            BridgeError::DimmNotFound {
                vm: vm(),
                dimm: "d".into(),
            },
            BridgeError::Aborted(why()),
        ]
    }

    #[test]
    fn the_users_error_table_says_what_the_code_does() {
        let doc = include_str!("../../../docs/errors.md");
        let rows: Vec<Vec<String>> = doc
            .lines()
            .filter(|l| l.starts_with('|'))
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().trim_matches('`').to_string())
                    .collect()
            })
            .collect();
        for e in every_kind() {
            let (grpc, rpc) = codes(&e);
            let want = [
                screaming(grpc),
                rpc.to_string(),
                e.outcome().as_str().to_string(),
            ];
            let found = rows.iter().any(|r| r.len() > 4 && r[2..5] == want);
            assert!(found, "docs/errors.md has no row {want:?} for {e:?}");
        }
        let unauthenticated = BridgeError::Unauthenticated("no identity".into());
        let grpc = screaming(codes(&unauthenticated).0);
        assert!(
            rows.iter()
                .any(|r| r.len() > 4 && r[2] == grpc && r[4] == "unauthenticated"),
            "docs/errors.md has no row for {grpc}"
        );
    }
}
