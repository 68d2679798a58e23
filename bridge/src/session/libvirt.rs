//! The [`Channel`] of a VM whose agent libvirt holds: calls go through
//! `virDomainQemuAgentCommand` instead of a socket of ours.
//!
//! libvirt owns the channel: it resynchronises, tags and matches replies, and runs one
//! agent command per domain at a time. This channel runs one call at a time on libvirt's
//! blocking API with the call's deadline as libvirt's timeout, and bounds and decodes the
//! reply like a socket's. A state-changing call whose caller leaves keeps running: its
//! libvirt call is the orphan the worker awaits.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Future;
use qga_libvirt::{Dom, LIBVIRT_OWN_WAIT, Libvirt, LibvirtError};
use qga_wire::{ErrorClass, QgaError};
use tokio::time::Instant;

use super::{
    CallResult, Job, SessionSettings,
    channel::{Channel, Executed},
    exchange::{ParseBudget, clip, offload},
    record::Late,
    vitals::Vitals,
    worker::{Decoded, decode_reply},
};
use crate::{call::Call, error::BridgeError};

/// A libvirt agent command on its way: its reply text, or libvirt's error.
type Running = Pin<Box<dyn Future<Output = Result<String, LibvirtError>> + Send>>;

/// A libvirt command still running after its caller left, with the time it may take.
pub(super) struct Orphan {
    running: Running,
    until: Instant,
}

/// One libvirt domain run's channel. See the module docs.
pub(super) struct LibvirtChannel {
    /// The domain run this session serves.
    dom: Dom,
    libvirt: Arc<Libvirt>,
    vitals: Vitals,
    settings: Arc<SessionSettings>,
    budget: Arc<ParseBudget>,
}

/// libvirt's text for an agent error that QEMU's agents give for an unknown command.
fn error_class(desc: &str) -> ErrorClass {
    if desc.starts_with("The command ") && desc.ends_with(" has not been found") {
        ErrorClass::CommandNotFound
    } else {
        ErrorClass::GenericError
    }
}

impl LibvirtChannel {
    /// The channel of domain run `dom` through `libvirt`.
    pub(super) fn new(
        dom: Dom,
        libvirt: Arc<Libvirt>,
        vitals: Vitals,
        settings: Arc<SessionSettings>,
        budget: Arc<ParseBudget>,
    ) -> Self {
        Self {
            dom,
            libvirt,
            vitals,
            settings,
            budget,
        }
    }

    /// Starts `call` on libvirt, with `until` as its timeout; a write's outcome is awaited
    /// for as long as libvirt may take to give it (its job lock and resync come on top of
    /// the timeout): recorded, never guessed.
    fn start(&self, call: &Call, request: String, until: Instant) -> Running {
        let libvirt = self.libvirt.clone();
        let dom = self.dom.clone();
        let timeout = until.saturating_duration_since(Instant::now());
        let wait = if call.is_read() {
            until
        } else {
            until + LIBVIRT_OWN_WAIT
        };
        Box::pin(async move { libvirt.agent_command(&dom, request, timeout, wait).await })
    }

    /// Turns libvirt's answer into the call's result, and the VM's state with it.
    async fn finish(
        &self,
        call: &Call,
        r: Result<String, LibvirtError>,
        until: Instant,
    ) -> CallResult {
        let reply = r.map_err(|e| self.failed(call.name(), e, until))?;
        self.vitals.contact();
        let max = self.settings.limits.max_reply_bytes;
        if reply.len() > max {
            return Err(self.vitals.bad_reply(format!(
                "a {}-byte reply is over limits.max_reply_bytes ({max})",
                reply.len()
            )));
        }
        let decode = call.clone();
        match offload(&self.budget, reply.into(), move |b| {
            decode_reply(&decode, b)
        })
        .await
        {
            Decoded::Reply(reply) => Ok(reply),
            Decoded::Agent(e) => Err(BridgeError::Agent(e)),
            Decoded::Bad(reason) => Err(self.vitals.bad_reply(clip(&reason))),
            Decoded::Lost => Err(self
                .vitals
                .bad_reply("the reply could not be parsed".into())),
        }
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
            self.vitals.error(format!("{command}: {e}"));
            return BridgeError::deadline(&self.vitals.name, command);
        }
        match e {
            LibvirtError::Busy(reason) => BridgeError::Busy {
                vm: self.vitals.name.clone(),
                reason,
            },
            LibvirtError::AgentFailed(desc) => BridgeError::Agent(QgaError {
                class: error_class(&desc),
                desc,
            }),
            // Not reached, or not answering: the VM counts as disconnected.
            e => {
                let reason = clip(&e.to_string());
                self.vitals.disconnected(&reason);
                self.vitals.unavailable(reason)
            }
        }
    }
}

impl Channel for LibvirtChannel {
    type Orphan = Orphan;

    /// Runs `job`; a state-changing call whose caller leaves (or whose deadline passes)
    /// first is still awaited, up to its command's timeout.
    async fn execute(&mut self, job: &mut Job) -> Executed<Orphan> {
        let command = job.call.name();
        let write = !job.call.is_read();
        // libvirt tags the request itself: ours goes without an id.
        let mut request = job.call.request(0);
        request.id = None;
        let request = match serde_json::to_string(&request) {
            Ok(r) => r,
            Err(e) => {
                let e = BridgeError::InvalidRequest(format!("cannot encode {command}: {e}"));
                return Executed::Done(Err(e));
            }
        };
        let until = if write { job.limit } else { job.deadline };
        let mut running = self.start(&job.call, request, until);
        let early = tokio::select! {
            r = &mut running => Some(r),
            () = tokio::time::sleep_until(job.deadline) => None,
            () = job.reply.closed() => None,
        };
        if let Some(r) = early {
            return Executed::Done(self.finish(&job.call, r, until).await);
        }
        let left = if job.reply.is_closed() {
            self.vitals.unavailable("the caller went away")
        } else {
            BridgeError::deadline(&self.vitals.name, command)
        };
        if write {
            Executed::Orphaned(Err(left), Orphan { running, until })
        } else {
            // A read's result is of no use to anyone: libvirt's own timeout ends it.
            Executed::Done(Err(left))
        }
    }

    async fn outcome(&mut self, call: &Call, orphan: Orphan, _limit: Instant) -> Late {
        let r = orphan.running.await;
        Late::of(&self.finish(call, r, orphan.until).await)
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
