//! Outcomes of state-changing calls: recorded for `ListVms` / `vm-list`, and awaited
//! after their caller stopped waiting, so that none is lost.

use std::time::SystemTime;

use qga_wire::schema::{GuestMemoryBlockResponse, GuestMemoryBlockResponseType};
use tokio::time::Instant;

use super::{
    super::{
        AgentState, CallResult, Connector, WriteRecord,
        exchange::{Cut, Sent, await_reply, clip},
    },
    Worker,
};
use crate::{
    call::{Call, Reply},
    error::BridgeError,
};

/// The error for calls that arrive while the VM waits for the outcome of `pending`.
pub(in crate::session) fn busy(vm: &str, pending: &str) -> BridgeError {
    BridgeError::Busy {
        vm: vm.to_string(),
        reason: format!("waiting for the outcome of a {pending} whose caller stopped waiting"),
    }
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

/// The record of state-changing `command`'s `result` for `ListVms`/`vm-list`;
/// `pending` while its outcome is still awaited.
pub(in crate::session) fn write_record(
    command: &'static str,
    result: &CallResult,
    pending: bool,
) -> WriteRecord {
    let (outcome, detail, results) = match result {
        _ if pending => (
            "pending",
            result.as_ref().err().map(ToString::to_string),
            Vec::new(),
        ),
        Ok(Reply::SetMemoryBlocks(results)) => ("ok", None, results.clone()),
        Ok(_) => ("ok", None, Vec::new()),
        Err(e) => (e.outcome().as_str(), Some(e.to_string()), Vec::new()),
    };
    WriteRecord {
        at: SystemTime::now(),
        command,
        outcome,
        detail,
        results,
        late: false,
    }
}

/// Logs the late outcome of `command` and records it, keeping the time it was sent.
pub(in crate::session) fn record_late(
    status: &std::sync::Mutex<super::super::VmStatus>,
    command: &'static str,
    result: &CallResult,
) {
    let mut record = write_record(command, result, false);
    tracing::warn!(
        command,
        outcome = record.outcome,
        detail = record.detail.as_deref().unwrap_or(""),
        results = %summary(&record.results),
        "late outcome of a call whose caller stopped waiting"
    );
    let mut status = super::super::lock(status);
    record.late = true;
    if let Some(previous) = &status.last_write {
        record.at = previous.at;
    }
    status.last_write = Some(record);
}

impl<C: Connector> Worker<C> {
    /// Records the outcome of a state-changing call for `ListVms`/`vm-list`.
    pub(super) fn record_write(&self, command: &'static str, result: &CallResult, pending: bool) {
        self.update(|s| s.last_write = Some(write_record(command, result, pending)));
    }

    /// Waits, up to `limit`, for the reply to state-changing `call` (request `id`) whose
    /// caller stopped waiting, so that its outcome is known and recorded rather than lost
    /// at the next resync. Meanwhile no other request is sent: queued calls are refused as
    /// busy. Returns false when every session handle went away meanwhile.
    pub(super) async fn await_orphan(&mut self, call: &Call, id: i64, limit: Instant) -> bool {
        let command = call.name();
        tracing::warn!(
            command,
            id,
            "caller stopped waiting; still awaiting the guest's outcome"
        );
        self.update(|s| s.state = AgentState::Busy);
        let busy = busy(&self.name, command);
        let mut skipped = self.skip_budget();
        let mut open = true;
        let result = match self.conn.as_mut() {
            None => Err(Cut::Broken(Sent::All, "not connected".into())),
            Some(conn) => loop {
                tokio::select! {
                    biased;
                    r = await_reply(conn, id, limit, &mut skipped, &self.budget) => break r,
                    job = self.rx.recv(), if open => match job {
                        Some(job) => {
                            let _ = job.reply.send(Err(busy.clone()));
                        }
                        None => open = false,
                    },
                }
            },
        };
        self.count_skipped(command, &skipped);
        if skipped.count > 0 {
            self.needs_resync = true;
        }
        self.update(|s| s.state = AgentState::Connected);
        let (outcome, detail, results) = match result {
            Ok(bytes) => {
                self.contact();
                match self.decode(call, bytes).await {
                    Ok(Reply::SetMemoryBlocks(results)) => ("ok", None, results),
                    Ok(_) => ("ok", None, Vec::new()),
                    Err(e) => (e.outcome().as_str(), Some(e.to_string()), Vec::new()),
                }
            }
            Err(Cut::Flooded(reason)) => {
                let e = self.connect_failed(reason);
                (
                    e.outcome().as_str(),
                    Some(format!("{e}: whether the guest applied it is unknown")),
                    Vec::new(),
                )
            }
            Err(Cut::TimedOut(_)) => {
                self.distrust(command, "no outcome within the command's timeout");
                let detail = "no reply within the command's configured timeout: \
                              whether the guest applied it is unknown";
                ("deadline_exceeded", Some(detail.to_string()), Vec::new())
            }
            Err(Cut::Broken(_, reason)) => {
                self.disconnect(&reason);
                let detail = format!("{reason}: whether the guest applied it is unknown");
                ("unavailable", Some(detail), Vec::new())
            }
            Err(Cut::Unusable(reason)) => {
                let reason = clip(&reason);
                self.distrust(command, &reason);
                ("bad_reply", Some(reason), Vec::new())
            }
            // `await_reply` has no caller to lose; said for completeness.
            Err(Cut::CallerLeft(_)) => ("unavailable", None, Vec::new()),
        };
        self.metrics.late_reply(&self.name, self.claim);
        tracing::warn!(
            command,
            id,
            outcome,
            detail = detail.as_deref().unwrap_or(""),
            results = %summary(&results),
            "late outcome of a call whose caller stopped waiting"
        );
        self.update(|s| {
            s.last_write = Some(WriteRecord {
                at: s.last_write.as_ref().map_or_else(SystemTime::now, |w| w.at),
                command,
                outcome,
                detail,
                results,
                late: true,
            });
        });
        open
    }
}
