//! The worker of a VM whose agent libvirt holds: calls go through
//! `virDomainQemuAgentCommand` instead of a socket of ours.
//!
//! libvirt owns the channel: it resynchronises, tags and matches replies, and runs one
//! agent command per domain at a time. This worker runs one call at a time on libvirt's
//! blocking API with the call's deadline as libvirt's timeout, bounds and decodes the reply
//! like a socket's, and keeps the socket worker's promise for state-changing calls: their
//! outcome is awaited up to the command's timeout and recorded, also after the caller left,
//! and other calls are refused as busy meanwhile.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use qga_libvirt::{Dom, LIBVIRT_OWN_WAIT, Libvirt, LibvirtError};
use qga_wire::{ErrorClass, QgaError};
use tokio::{sync::mpsc, time::Instant};

use super::{
    AgentState, CallResult, Job, VmStatus,
    exchange::{ParseBudget, clip, offload},
    lock,
    worker::{Decoded, busy, decode_reply, record_late, write_record},
};
use crate::{config::Config, error::BridgeError, metrics::Metrics};

/// One libvirt domain's worker.
pub(super) struct LibvirtWorker {
    pub(super) name: String,
    /// The domain run this session serves.
    pub(super) dom: Dom,
    pub(super) claim: u64,
    pub(super) libvirt: Arc<Libvirt>,
    pub(super) rx: mpsc::Receiver<Job>,
    pub(super) status: Arc<Mutex<VmStatus>>,
    pub(super) config: Arc<Config>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) budget: Arc<ParseBudget>,
}

/// libvirt's text for an agent error that QEMU's agents give for an unknown command.
fn error_class(desc: &str) -> ErrorClass {
    if desc.starts_with("The command ") && desc.ends_with(" has not been found") {
        ErrorClass::CommandNotFound
    } else {
        ErrorClass::GenericError
    }
}

impl LibvirtWorker {
    /// Runs queued calls until every session handle is gone.
    pub(super) async fn run(mut self) {
        while let Some(job) = self.rx.recv().await {
            if job.reply.is_closed() {
                continue; // the caller gave up while queued
            }
            let command = job.call.name();
            if Instant::now() >= job.deadline {
                tracing::warn!(command, "deadline passed while queued");
                let result = Err(BridgeError::deadline(&self.name, command));
                if !job.call.is_read() {
                    self.record(write_record(command, &result, false));
                }
                let _ = job.reply.send(result);
                continue;
            }
            self.execute(job).await;
        }
        self.metrics.release_vm(&self.name, self.claim);
        tracing::debug!("session stopped");
    }

    fn record(&self, record: super::WriteRecord) {
        lock(&self.status).last_write = Some(record);
    }

    /// Runs `job` and answers its caller; a state-changing call whose caller leaves (or
    /// whose deadline passes) first is still awaited, up to its command's timeout.
    async fn execute(&mut self, mut job: Job) {
        let command = job.call.name();
        let write = !job.call.is_read();
        // libvirt tags the request itself: ours goes without an id.
        let mut request = job.call.request(0);
        request.id = None;
        let request = match serde_json::to_string(&request) {
            Ok(r) => r,
            Err(e) => {
                let _ = job.reply.send(Err(BridgeError::InvalidRequest(format!(
                    "cannot encode {command}: {e}"
                ))));
                return;
            }
        };
        let until = if write { job.limit } else { job.deadline };
        let libvirt = self.libvirt.clone();
        let dom = self.dom.clone();
        let timeout = until.saturating_duration_since(Instant::now());
        // A write's outcome is awaited for as long as libvirt may take to give it (its
        // job lock and resync come on top of the timeout): recorded, never guessed.
        let wait = if write {
            until + LIBVIRT_OWN_WAIT
        } else {
            until
        };
        let mut running =
            Box::pin(async move { libvirt.agent_command(&dom, request, timeout, wait).await });
        let early = tokio::select! {
            r = &mut running => Some(r),
            () = tokio::time::sleep_until(job.deadline) => None,
            () = job.reply.closed() => None,
        };
        if let Some(r) = early {
            let result = self.finish(&job.call, r, until).await;
            if write {
                self.record(write_record(command, &result, false));
            }
            let _ = job.reply.send(result);
            return;
        }
        let left = if job.reply.is_closed() {
            BridgeError::Unavailable {
                vm: self.name.clone(),
                reason: "the caller went away".into(),
            }
        } else {
            BridgeError::deadline(&self.name, command)
        };
        if !write {
            // A read's result is of no use to anyone: libvirt's own timeout ends it.
            let _ = job.reply.send(Err(left));
            return;
        }
        tracing::warn!(
            command,
            "caller stopped waiting; still awaiting the guest's outcome"
        );
        let pending = Err(left);
        self.record(write_record(command, &pending, true));
        let _ = job.reply.send(pending);
        lock(&self.status).state = AgentState::Busy;
        let busy = busy(&self.name, command);
        let mut open = true;
        let r = loop {
            tokio::select! {
                biased;
                r = &mut running => break r,
                queued = self.rx.recv(), if open => match queued {
                    Some(queued) => {
                        let _ = queued.reply.send(Err(busy.clone()));
                    }
                    None => open = false,
                },
            }
        };
        let result = self.finish(&job.call, r, until).await;
        {
            let mut s = lock(&self.status);
            if s.state == AgentState::Busy {
                s.state = AgentState::Connected;
            }
        }
        self.metrics.late_reply(&self.name, self.claim);
        record_late(&self.status, command, &result);
    }

    /// Turns libvirt's answer into the call's result, and the VM's state with it.
    async fn finish(
        &mut self,
        call: &crate::call::Call,
        r: Result<String, LibvirtError>,
        until: Instant,
    ) -> CallResult {
        let command = call.name();
        let reply = match r {
            Ok(reply) => reply,
            Err(e) => return Err(self.failed(command, e, until)),
        };
        self.contact();
        if reply.len() > self.config.limits.max_reply_bytes {
            return Err(BridgeError::BadReply {
                vm: self.name.clone(),
                reason: format!(
                    "a {}-byte reply is over limits.max_reply_bytes ({})",
                    reply.len(),
                    self.config.limits.max_reply_bytes
                ),
            });
        }
        let decode = call.clone();
        match offload(&self.budget, reply.into(), move |b| {
            decode_reply(&decode, b)
        })
        .await
        {
            Decoded::Reply(reply) => Ok(reply),
            Decoded::Agent(e) => Err(BridgeError::Agent(e)),
            Decoded::Bad(reason) => Err(BridgeError::BadReply {
                vm: self.name.clone(),
                reason: clip(&reason),
            }),
            Decoded::Lost => Err(BridgeError::BadReply {
                vm: self.name.clone(),
                reason: "the reply could not be parsed".into(),
            }),
        }
    }

    fn contact(&self) {
        self.metrics.set_connected(&self.name, self.claim, true);
        let mut s = lock(&self.status);
        s.state = AgentState::Connected;
        s.last_contact = Some(SystemTime::now());
    }

    /// The bridge's error for libvirt's; the VM counts as disconnected when its agent or
    /// libvirt could not be reached.
    fn failed(&self, command: &str, e: LibvirtError, until: Instant) -> BridgeError {
        // libvirt 9.0 reports an agent that did not answer within the timeout as
        // unresponsive, like one that is not connected: the time taken tells them apart.
        let timed_out = Instant::now() + Duration::from_millis(100) >= until;
        let deadline = matches!(e, LibvirtError::Timeout | LibvirtError::TimedOut(_))
            || (timed_out && matches!(e, LibvirtError::AgentUnresponsive(_)));
        if deadline {
            lock(&self.status).last_error = Some(format!("{command}: {e}"));
            return BridgeError::deadline(&self.name, command);
        }
        match e {
            LibvirtError::Busy(reason) => BridgeError::Busy {
                vm: self.name.clone(),
                reason,
            },
            LibvirtError::AgentFailed(desc) => BridgeError::Agent(QgaError {
                class: error_class(&desc),
                desc,
            }),
            // Not reached, or not answering: the VM counts as disconnected.
            e => {
                let reason = clip(&e.to_string());
                self.metrics.set_connected(&self.name, self.claim, false);
                let mut s = lock(&self.status);
                s.state = AgentState::Disconnected;
                s.last_error = Some(reason.clone());
                BridgeError::Unavailable {
                    vm: self.name.clone(),
                    reason,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_commands_keep_their_class() {
        assert_eq!(
            error_class("The command guest-foo has not been found"),
            ErrorClass::CommandNotFound
        );
        assert_eq!(
            error_class("Parameter 'mem-blks' is missing"),
            ErrorClass::GenericError
        );
    }
}
