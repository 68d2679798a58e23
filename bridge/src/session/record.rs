//! Outcomes of state-changing calls, recorded for `ListVms` / `vm-list`: when the call was
//! sent, what came of it, and whether that came after its caller had stopped waiting.

use std::time::SystemTime;

use qga_wire::schema::{GuestMemoryBlockResponse, GuestMemoryBlockResponseType};

use super::{CallResult, VmStatus, WriteRecord, lock};
use crate::{call::Reply, error::BridgeError};

/// The error for calls that arrive while the VM waits for the outcome of `pending`.
pub(super) fn busy(vm: &str, pending: &str) -> BridgeError {
    BridgeError::Busy {
        vm: vm.to_string(),
        reason: format!("waiting for the outcome of a {pending} whose caller stopped waiting"),
    }
}

/// The outcome of a state-changing call: an outcome label, what went wrong, and the
/// agent's per-block results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Late {
    /// `ok` or an error label (`deadline_exceeded`, ...).
    pub(super) outcome: &'static str,
    /// What went wrong, if anything.
    pub(super) detail: Option<String>,
    /// The agent's per-block results.
    pub(super) results: Vec<GuestMemoryBlockResponse>,
}

impl Late {
    /// The outcome `result` says.
    pub(super) fn of(result: &CallResult) -> Self {
        match result {
            Ok(Reply::SetMemoryBlocks(results)) => Self::ok(results.clone()),
            Ok(_) => Self::ok(Vec::new()),
            Err(e) => Self::failed(e.outcome().as_str(), e.to_string()),
        }
    }

    fn ok(results: Vec<GuestMemoryBlockResponse>) -> Self {
        Self {
            outcome: "ok",
            detail: None,
            results,
        }
    }

    /// A failure labelled `outcome`, for `detail`.
    pub(super) fn failed(outcome: &'static str, detail: String) -> Self {
        Self {
            outcome,
            detail: Some(detail),
            results: Vec::new(),
        }
    }

    fn record(self, command: &'static str, at: SystemTime, late: bool) -> WriteRecord {
        WriteRecord {
            at,
            command,
            outcome: self.outcome,
            detail: self.detail,
            results: self.results,
            late,
        }
    }
}

/// Records state-changing `command`'s `result` as its caller got it; `pending` while
/// its outcome is still awaited.
pub(super) fn record_write(
    status: &std::sync::Mutex<VmStatus>,
    command: &'static str,
    result: &CallResult,
    pending: bool,
) {
    let outcome = if pending {
        Late {
            outcome: "pending",
            detail: result.as_ref().err().map(ToString::to_string),
            results: Vec::new(),
        }
    } else {
        Late::of(result)
    };
    lock(status).last_write = Some(outcome.record(command, SystemTime::now(), false));
}

/// Logs the late outcome of `command` and records it, keeping the time it was sent.
pub(super) fn record_late(status: &std::sync::Mutex<VmStatus>, command: &'static str, late: Late) {
    tracing::warn!(
        command,
        outcome = late.outcome,
        detail = late.detail.as_deref().unwrap_or(""),
        results = %summary(&late.results),
        "late outcome of a call whose caller stopped waiting"
    );
    let mut status = lock(status);
    let at = status
        .last_write
        .as_ref()
        .map_or_else(SystemTime::now, |w| w.at);
    status.last_write = Some(late.record(command, at, true));
}

/// Per-block results as a short log text: how many of each response, and the first
/// failures with their errno.
fn summary(results: &[GuestMemoryBlockResponse]) -> String {
    use GuestMemoryBlockResponseType as R;
    let count = |t: R| results.iter().filter(|r| r.response == t).count();
    let mut out = format!(
        "{} success, {} not-found, {} not-supported, {} failed",
        count(R::Success),
        count(R::NotFound),
        count(R::OperationNotSupported),
        count(R::OperationFailed)
    );
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.response != R::Success)
        .take(16)
        .map(|r| format!("{}:{}", r.phys_index, r.error_code.unwrap_or(0)))
        .collect();
    if !failed.is_empty() {
        out.push_str(&format!(" (block:errno {})", failed.join(" ")));
    }
    out
}
