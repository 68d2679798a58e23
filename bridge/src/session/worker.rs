//! The task behind a [`Session`](super::Session): takes queued calls one at a time, runs
//! each on the VM's [`Channel`], records state-changing calls, and while the outcome of
//! one whose caller stopped waiting is still to come, refuses the next calls as busy
//! rather than let them overtake it. The same loop serves every kind of channel.

use qga_wire::{QgaError, Response, message::Outcome};
use tokio::{sync::mpsc, time::Instant};

use super::{
    AgentState, Job,
    channel::{Channel, Executed},
    record::{busy, record_late, record_write},
    vitals::Vitals,
};
use crate::{
    call::{Call, Reply},
    error::BridgeError,
};

/// What our reply's bytes say, parsed in one go (off the async workers when large).
#[derive(Debug, Default)]
pub(super) enum Decoded {
    /// The call's typed reply.
    Reply(Reply),
    /// The agent's error.
    Agent(QgaError),
    /// Not a reply to this call (malformed, wrong shape, not answering the request).
    Bad(String),
    /// Parsing did not finish (the blocking task failed).
    #[default]
    Lost,
}

/// Parses our reply (strictly, like QEMU) and decodes its `return` into `call`'s reply.
pub(super) fn decode_reply(call: &Call, bytes: &[u8]) -> Decoded {
    let value = match qga_wire::strict::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Decoded::Bad(format!("malformed reply: {e}")),
    };
    match Response::from_value(value) {
        Err(e) => Decoded::Bad(e.to_string()),
        Ok(Response {
            outcome: Outcome::Error(e),
            ..
        }) => Decoded::Agent(e),
        Ok(Response {
            outcome: Outcome::Return(v),
            ..
        }) => match call.decode(v) {
            Ok(reply) => Decoded::Reply(reply),
            Err(reason) => Decoded::Bad(reason),
        },
    }
}

/// One VM's worker. See the module docs.
pub(super) struct Worker<C: Channel> {
    channel: C,
    rx: mpsc::Receiver<Job>,
    vitals: Vitals,
}

impl<C: Channel> Worker<C> {
    /// A worker taking jobs from `rx` to `channel`, reporting through `vitals`.
    pub(super) fn new(channel: C, rx: mpsc::Receiver<Job>, vitals: Vitals) -> Self {
        Self {
            channel,
            rx,
            vitals,
        }
    }

    /// Runs queued calls until every [`Session`](super::Session) handle is gone.
    pub(super) async fn run(mut self) {
        while let Some(mut job) = self.next().await {
            if job.reply.is_closed() {
                continue; // the caller gave up while queued
            }
            let command = job.call.name();
            let executed = if Instant::now() >= job.deadline {
                tracing::warn!(command, "deadline passed while queued");
                Executed::Done(Err(BridgeError::deadline(&self.vitals.name, command)))
            } else {
                self.channel.execute(&mut job).await
            };
            let (result, orphan) = match executed {
                Executed::Done(result) => (result, None),
                Executed::Orphaned(result, orphan) => (result, Some(orphan)),
            };
            if !job.call.is_read() {
                record_write(&self.vitals.status, command, &result, orphan.is_some());
            }
            let _ = job.reply.send(result);
            if let Some(orphan) = orphan
                && !self.await_orphan(&job.call, orphan, job.limit).await
            {
                break;
            }
        }
        // Every handle is gone: the VM was removed or replaced.
        self.vitals.release();
        tracing::debug!("session stopped");
    }

    /// The next job; in shared mode, the channel is released when none comes for its
    /// idle time. `None` once every session handle is gone.
    async fn next(&mut self) -> Option<Job> {
        loop {
            let Some(idle) = self.channel.idle() else {
                return self.rx.recv().await;
            };
            tokio::select! {
                job = self.rx.recv() => return job,
                () = tokio::time::sleep(idle) => self.channel.release(),
            }
        }
    }

    /// Waits, up to `limit`, for the outcome of state-changing `call` whose caller stopped
    /// waiting, so that it is known and recorded rather than lost. Meanwhile no other
    /// request is sent: queued calls are refused as busy. Returns false when every
    /// session handle went away meanwhile.
    async fn await_orphan(&mut self, call: &Call, orphan: C::Orphan, limit: Instant) -> bool {
        let command = call.name();
        tracing::warn!(
            command,
            "caller stopped waiting; still awaiting the guest's outcome"
        );
        self.vitals.update(|s| s.state = AgentState::Busy);
        let busy = busy(&self.vitals.name, command);
        let mut open = true;
        let outcome = self.channel.outcome(call, orphan, limit);
        tokio::pin!(outcome);
        let late = loop {
            tokio::select! {
                biased;
                late = &mut outcome => break late,
                job = self.rx.recv(), if open => match job {
                    Some(job) => {
                        let _ = job.reply.send(Err(busy.clone()));
                    }
                    None => open = false,
                },
            }
        };
        self.vitals.update(|s| {
            if s.state == AgentState::Busy {
                s.state = AgentState::Connected;
            }
        });
        self.vitals
            .metrics
            .late_reply(&self.vitals.name, self.vitals.claim);
        record_late(&self.vitals.status, command, late);
        open
    }
}
