//! How the service writes the audit trail: every state-changing call, every hotplug
//! operation (a caller's, reported by hotplug when it ends, also after its caller left),
//! and the bridge's own changes (the keeper's re-onlining, recovery), one line each.

use std::sync::Arc;

use qga_wire::schema::GuestMemoryOnlineType;
use serde_json::{Value, json};

use crate::{
    call::{Call, Reply},
    error::{BridgeError, Outcome},
    hotplug::report::{Background, Ended, Report, Witness},
    policy::{
        Caller,
        audit::{Audit, Record},
    },
};

/// Audits a state-changing call: with its outcome when it finishes, or as `caller_left`
/// when its caller goes away first (the session then records the late outcome in the
/// VM's `last_write`).
pub(super) struct AuditOnDrop<'a> {
    audit: &'a Audit,
    caller: &'a Caller,
    vm: &'a str,
    method: &'static str,
    arguments: Option<Value>,
    start: std::time::Instant,
    done: bool,
}

impl<'a> AuditOnDrop<'a> {
    pub(super) fn new(audit: &'a Audit, caller: &'a Caller, vm: &'a str, call: &Call) -> Self {
        Self {
            audit,
            caller,
            vm,
            method: call.name(),
            arguments: call.arguments(),
            start: std::time::Instant::now(),
            done: false,
        }
    }

    fn write(&mut self, outcome: &str, error: Option<String>, results: Option<Value>) {
        self.done = true;
        self.audit.record(&Record {
            vm: Some(self.vm),
            method: Some(self.method),
            arguments: self.arguments.take(),
            error,
            results,
            duration_ms: Some(self.start.elapsed().as_secs_f64() * 1000.0),
            ..Audit::base("call", self.caller, outcome)
        });
    }

    pub(super) fn finish(&mut self, outcome: &Result<Reply, BridgeError>) {
        match outcome {
            Ok(reply) => self.write("ok", None, serde_json::to_value(reply).ok()),
            Err(e) => self.write(e.outcome().as_str(), Some(e.to_string()), None),
        }
    }
}

impl Drop for AuditOnDrop<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.write(
                "caller_left",
                Some("the caller stopped waiting; the outcome goes to the VM's last_write".into()),
                None,
            );
        }
    }
}

/// The report hotplug gives a caller's operation when it ends: one audit line from
/// `caller` (a replayed request-id's is marked `replayed`).
pub(super) fn operation(audit: Arc<Audit>, caller: Caller) -> Report {
    Box::new(move |ended: &Ended<'_>| {
        let mut arguments = serde_json::to_value(ended.op).ok();
        if let (Some(Value::Object(a)), Some(id)) = (&mut arguments, ended.request_id) {
            a.insert("request-id".into(), id.into());
            if ended.replayed {
                a.insert("replayed".into(), true.into());
            }
        }
        audit.record(&Record {
            vm: Some(ended.vm),
            method: Some(ended.op.method()),
            arguments,
            error: ended.result.as_ref().err().map(ToString::to_string),
            results: ended
                .result
                .as_ref()
                .ok()
                .and_then(|d| serde_json::to_value(d).ok()),
            duration_ms: Some(ended.elapsed.as_secs_f64() * 1000.0),
            ..Audit::base("call", &caller, Outcome::of(ended.result).as_str())
        });
    })
}

/// The audit trail as hotplug's [`Witness`] of the bridge's own changes: `restore` lines
/// for the keeper (transport `keeper`), `recover` lines for recovery (transport
/// `recovery`), with no peer or identity.
#[derive(Debug)]
pub(super) struct Trail(pub(super) Arc<Audit>);

impl Witness for Trail {
    fn saw(&self, change: &Background<'_>) {
        let record = match change {
            Background::Restored {
                vm,
                desired,
                blocks,
                error,
            } => Record {
                vm: Some(vm),
                method: Some("memory-restore"),
                arguments: Some(json!({
                    "device": desired.device,
                    "kind": desired.kind,
                    "blocks": blocks,
                    "online-type": desired.online_type.map(GuestMemoryOnlineType::as_str),
                })),
                error: error.clone(),
                ..Audit::bridge("restore", "keeper", outcome_of(error.is_none()))
            },
            Background::Ballooned {
                vm,
                held,
                target,
                error,
            } => Record {
                vm: Some(vm),
                method: Some("memory-restore"),
                arguments: Some(json!({
                    "device": "balloon",
                    "kind": "balloon",
                    "held-bytes": held,
                    "target": target,
                })),
                error: error.clone(),
                ..Audit::bridge("restore", "keeper", outcome_of(error.is_none()))
            },
            Background::Recovered {
                vm,
                method,
                arguments,
                result,
            } => Record {
                vm: Some(vm),
                method: Some("memory-recover"),
                arguments: Some(json!({"method": method, "arguments": arguments})),
                error: result.as_ref().err().map(ToString::to_string),
                results: result
                    .as_ref()
                    .ok()
                    .and_then(|d| serde_json::to_value(d).ok()),
                ..Audit::bridge("recover", "recovery", Outcome::of(result).as_str())
            },
        };
        self.0.record(&record);
    }
}

/// `ok`, or `hotplug_failed`.
fn outcome_of(ok: bool) -> &'static str {
    if ok {
        Outcome::Ok.as_str()
    } else {
        Outcome::HotplugFailed.as_str()
    }
}
