//! The task behind a [`Session`](super::Session): owns the connection, runs one call at a
//! time, and decides after every failure what the connection is still good for.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use qga_wire::{QgaError, Response, message::Outcome};
use tokio::{
    sync::mpsc,
    time::{Instant, timeout_at},
};

use super::{
    AgentState, CallResult, Connector, Job, VmStatus,
    exchange::{Conn, Cut, ParseBudget, Sent, Skipped, clip, exchange, offload, open, resync},
    lock,
};
use crate::{
    call::{Call, Reply},
    config::Config,
    error::BridgeError,
    metrics::Metrics,
};

mod outcome;

pub(in crate::session) use outcome::{busy, record_late, write_record};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

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

/// A failed try on a connection that may be retried once on a fresh one.
enum Retry {
    /// The request never reached the agent whole: safe to resend for any call.
    Always(String),
    /// The request may have reached the agent: resend reads only.
    IfRead(String),
}

/// One VM's worker. See the [module docs](super).
pub(super) struct Worker<C: Connector> {
    name: String,
    /// This session's claim on the VM's metric series.
    claim: u64,
    connector: C,
    rx: mpsc::Receiver<Job>,
    conn: Option<Conn<C::Stream>>,
    needs_resync: bool,
    next_attempt: Instant,
    backoff: Duration,
    status: Arc<Mutex<VmStatus>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    budget: Arc<ParseBudget>,
    ids: RandomState,
    counter: u64,
    /// Shared mode: release the socket this long after the last call.
    idle: Option<Duration>,
}

impl<C: Connector> Worker<C> {
    pub(super) fn new(
        name: &str,
        connector: C,
        rx: mpsc::Receiver<Job>,
        status: Arc<Mutex<VmStatus>>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        budget: Arc<ParseBudget>,
    ) -> Self {
        let claim = metrics.claim_vm(name);
        metrics.set_connected(name, claim, false);
        let idle = config
            .shared
            .contains(name)
            .then(|| Duration::from_millis(config.timeouts.shared_idle_ms));
        Self {
            name: name.to_string(),
            claim,
            connector,
            rx,
            conn: None,
            needs_resync: true,
            next_attempt: Instant::now(),
            backoff: BACKOFF_START,
            status,
            config,
            metrics,
            budget,
            ids: RandomState::new(),
            counter: 0,
            idle,
        }
    }

    /// Shared mode also when the configuration does not name the VM shared (`shared`:
    /// a VM discovered in Proxmox's directory).
    pub(super) fn shared(mut self, shared: bool) -> Self {
        if shared {
            self.idle = Some(Duration::from_millis(self.config.timeouts.shared_idle_ms));
        }
        self
    }

    /// Runs queued calls until every [`Session`](super::Session) handle is gone.
    pub(super) async fn run(mut self) {
        let mut open = true;
        while open {
            let job = match self.idle {
                Some(idle) if self.conn.is_some() => tokio::select! {
                    job = self.rx.recv() => job,
                    () = tokio::time::sleep(idle) => {
                        self.release();
                        continue;
                    }
                },
                _ => self.rx.recv().await,
            };
            let Some(mut job) = job else {
                break;
            };
            if job.reply.is_closed() {
                continue; // the caller gave up while queued
            }
            let command = job.call.name();
            let (result, orphan) = if Instant::now() >= job.deadline {
                tracing::warn!(command, "deadline passed while queued");
                (Err(BridgeError::deadline(&self.name, command)), None)
            } else {
                self.execute(&mut job).await
            };
            if !job.call.is_read() {
                self.record_write(command, &result, orphan.is_some());
            }
            let _ = job.reply.send(result);
            if let Some(id) = orphan {
                open = self.await_orphan(&job.call, id, job.limit).await;
            }
        }
        // Every handle is gone: the VM was removed or replaced.
        self.metrics.release_vm(&self.name, self.claim);
        tracing::debug!("session stopped");
    }

    /// A fresh positive id: random, so replies to an earlier connection never match.
    fn fresh_id(&mut self) -> i64 {
        self.counter = self.counter.wrapping_add(1);
        (self.ids.hash_one(self.counter) & (i64::MAX as u64)) as i64
    }

    fn update(&self, f: impl FnOnce(&mut VmStatus)) {
        f(&mut lock(&self.status));
    }

    fn unavailable(&self, reason: impl Into<String>) -> BridgeError {
        BridgeError::Unavailable {
            vm: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn disconnect(&mut self, reason: &str) {
        tracing::info!(reason, "agent channel closed");
        self.conn = None;
        self.needs_resync = true;
        self.metrics.set_connected(&self.name, self.claim, false);
        self.update(|s| {
            s.state = AgentState::Disconnected;
            s.last_error = Some(reason.to_string());
        });
    }

    /// Shared mode: closes the idle connection so other clients get the socket. Not a
    /// failure: no backoff, and the next call connects and resynchronises.
    fn release(&mut self) {
        tracing::debug!("shared socket released while idle");
        // The state first: once the socket closes, another client may be served at once.
        self.update(|s| s.state = AgentState::Idle);
        self.metrics.set_connected(&self.name, self.claim, false);
        self.needs_resync = true;
        self.conn = None;
    }

    /// Drops the connection and backs off before the next one.
    fn connect_failed(&mut self, reason: String) -> BridgeError {
        self.disconnect(&reason);
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.unavailable(reason)
    }

    fn contact(&mut self) {
        self.backoff = BACKOFF_START;
        self.metrics.set_connected(&self.name, self.claim, true);
        self.update(|s| {
            s.state = AgentState::Connected;
            s.last_contact = Some(SystemTime::now());
        });
    }

    /// Marks the channel for a resync before the next call, and logs why (once). `why`
    /// must be [`clip`]ped if the guest wrote any of it.
    fn distrust(&mut self, command: &str, why: &str) {
        tracing::warn!(command, %why, "resynchronising the channel");
        self.needs_resync = true;
        self.update(|s| s.last_error = Some(format!("{command}: {why}")));
    }

    /// What one call may skip before the channel counts as flooded.
    fn skip_budget(&self) -> Skipped {
        let l = &self.config.limits;
        Skipped::new(l.max_stale_frames, l.max_stale_bytes)
    }

    /// Parses our reply's bytes into `call`'s outcome (off the async workers when large),
    /// and says why the channel is distrusted if it is not a usable reply.
    async fn decode(&mut self, call: &Call, bytes: bytes::Bytes) -> Result<Reply, BridgeError> {
        let command = call.name();
        let decoded = if bytes.len() < super::exchange::OFFLOAD_BYTES {
            decode_reply(call, &bytes)
        } else {
            let call = call.clone();
            offload(&self.budget, bytes, move |b| decode_reply(&call, b)).await
        };
        match decoded {
            Decoded::Reply(reply) => Ok(reply),
            Decoded::Agent(e) => Err(BridgeError::Agent(e)),
            Decoded::Bad(reason) => {
                // A reply that does not answer the request says the channel is confused.
                let reason = clip(&reason);
                self.distrust(command, &reason);
                Err(self.bad_reply(reason))
            }
            Decoded::Lost => {
                let reason = "the reply could not be parsed".to_string();
                self.distrust(command, &reason);
                Err(self.bad_reply(reason))
            }
        }
    }

    fn count_skipped(&self, command: &str, skipped: &Skipped) {
        self.metrics.stale(&self.name, self.claim, skipped.count);
        if skipped.count > 0 {
            tracing::warn!(
                command,
                frames = skipped.count,
                first = %skipped.first.as_deref().unwrap_or(""),
                "skipped frames that were not the awaited reply"
            );
        }
    }

    /// Connects and resynchronises as needed.
    async fn ready(&mut self, command: &str, deadline: Instant) -> Result<(), BridgeError> {
        if self.conn.is_none() {
            let now = Instant::now();
            if now < self.next_attempt {
                let last = lock(&self.status).last_error.clone().unwrap_or_default();
                return Err(self.unavailable(format!("{last} (reconnecting)")));
            }
            let own_limit = now + Duration::from_millis(self.config.timeouts.connect_ms);
            match timeout_at(deadline.min(own_limit), self.connector.connect()).await {
                Ok(Ok(stream)) => {
                    self.conn = Some(open(stream, self.config.limits.max_reply_bytes));
                    self.needs_resync = true;
                    self.update(|s| s.state = AgentState::Connecting);
                }
                Ok(Err(e)) => return Err(self.connect_failed(format!("cannot connect: {e}"))),
                // The caller's deadline, not the connect limit, ran out: no verdict on the
                // agent, so no backoff for the callers after it.
                Err(_) if deadline < own_limit => {
                    tracing::warn!(command, "deadline passed while connecting");
                    return Err(BridgeError::deadline(&self.name, command));
                }
                Err(_) => return Err(self.connect_failed("connecting timed out".into())),
            }
        }
        if !self.needs_resync {
            return Ok(());
        }
        let id = self.fresh_id();
        let own_limit = Instant::now() + Duration::from_millis(self.config.timeouts.resync_ms);
        let mut skipped = self.skip_budget();
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.unavailable("not connected"));
        };
        let result = resync(conn, id, deadline.min(own_limit), &mut skipped).await;
        self.count_skipped(command, &skipped);
        match result {
            Ok(()) => {
                tracing::debug!(command, "resynchronised");
                self.needs_resync = false;
                self.metrics.resync(&self.name, self.claim);
                self.contact();
                Ok(())
            }
            // The caller's deadline, not the handshake's own limit, ran out: that says
            // nothing about the agent, so no backoff. Keep the connection unless the sync
            // request was cut off half-sent (the next handshake starts over with a new id),
            // and report the caller's timeout.
            Err(Cut::TimedOut(sent)) if deadline < own_limit => {
                tracing::warn!(command, "deadline passed during the handshake");
                let why = format!("{command} timed out during the handshake");
                if sent == Sent::Part {
                    self.disconnect(&why);
                } else {
                    self.update(|s| s.last_error = Some(why));
                }
                Err(BridgeError::deadline(&self.name, command))
            }
            Err(cut) => {
                let reason = match cut {
                    Cut::TimedOut(Sent::All) => {
                        "agent did not answer guest-sync-delimited".to_string()
                    }
                    Cut::TimedOut(Sent::Part) => {
                        "agent did not accept the sync request in time".to_string()
                    }
                    Cut::Broken(_, r) | Cut::Unusable(r) | Cut::Flooded(r) => clip(&r),
                    Cut::CallerLeft(_) => "the caller went away".to_string(),
                };
                tracing::warn!(command, reason, "resync failed");
                Err(self.connect_failed(format!("resync failed: {reason}")))
            }
        }
    }

    /// Runs `job`, retrying once on a fresh connection when that is safe. Besides the
    /// result, returns the request id of a state-changing call whose caller stopped
    /// waiting after the agent had it all: its outcome is still to come.
    async fn execute(&mut self, job: &mut Job) -> (CallResult, Option<i64>) {
        // A connection that died while idle (agent restarted, QEMU restarted) is only
        // noticed on use. Retry once on a fresh connection when that is safe: the request
        // never reached the agent whole, or it is a read.
        let reused = self.conn.is_some() && !self.needs_resync;
        match self.attempt(job).await {
            Err(Retry::Always(reason)) if reused => {
                tracing::debug!(reason, "connection was dead; retrying on a new one");
                self.attempt(job).await
            }
            Err(Retry::IfRead(reason)) if reused && job.call.is_read() => {
                tracing::debug!(reason, "connection lost; retrying the read");
                self.attempt(job).await
            }
            other => other,
        }
        .unwrap_or_else(|(Retry::Always(reason) | Retry::IfRead(reason))| {
            (Err(self.unavailable(reason)), None)
        })
    }

    /// One try: `Err` when the connection failed in a way that may allow a retry.
    async fn attempt(&mut self, job: &mut Job) -> Result<(CallResult, Option<i64>), Retry> {
        let command = job.call.name();
        let write = !job.call.is_read();
        if let Err(e) = self.ready(command, job.deadline).await {
            return Ok((Err(e), None));
        }
        let id = self.fresh_id();
        let mut skipped = self.skip_budget();
        let Some(conn) = self.conn.as_mut() else {
            return Ok((Err(self.unavailable("not connected")), None));
        };
        let request = job.call.request(id);
        let result = exchange(
            conn,
            request,
            id,
            job.deadline,
            &mut job.reply,
            &mut skipped,
            &self.budget,
        )
        .await;
        self.count_skipped(command, &skipped);
        if skipped.count > 0 {
            // Something other than our reply was on the channel: clean it before the next call.
            self.needs_resync = true;
        }
        let bytes = match result {
            Ok(bytes) => bytes,
            // The guest has a state-changing request it may still be running: its outcome
            // is awaited, not dropped at the next resync.
            Err(Cut::TimedOut(Sent::All)) if write => {
                return Ok((Err(BridgeError::deadline(&self.name, command)), Some(id)));
            }
            Err(Cut::CallerLeft(Sent::All)) if write => {
                return Ok((Err(self.unavailable("the caller went away")), Some(id)));
            }
            Err(Cut::TimedOut(sent)) => {
                match sent {
                    Sent::Part => {
                        tracing::warn!(command, "deadline passed while sending the request");
                        self.disconnect(&format!("{command} was cut off while sent"));
                    }
                    Sent::All => self.distrust(command, "no reply before the deadline"),
                }
                return Ok((Err(BridgeError::deadline(&self.name, command)), None));
            }
            Err(Cut::CallerLeft(sent)) => {
                match sent {
                    Sent::Part => self.disconnect(&format!("{command} was cut off while sent")),
                    // The reply, should it come, is dropped unread by the next resync.
                    Sent::All => self.needs_resync = true,
                }
                return Ok((Err(self.unavailable("the caller went away")), None));
            }
            Err(Cut::Broken(sent, reason)) => {
                self.disconnect(&reason);
                return Err(match sent {
                    Sent::Part => Retry::Always(reason),
                    Sent::All => Retry::IfRead(reason),
                });
            }
            Err(Cut::Unusable(reason)) => {
                let reason = clip(&reason);
                self.distrust(command, &reason);
                return Ok((Err(self.bad_reply(reason)), None));
            }
            // A guest flooding its channel gets it dropped and backed off.
            Err(Cut::Flooded(reason)) => {
                tracing::warn!(command, reason, "dropping a flooded channel");
                return Ok((Err(self.connect_failed(reason)), None));
            }
        };
        self.contact();
        let result = self.decode(&job.call, bytes).await;
        Ok((result, None))
    }

    fn bad_reply(&self, reason: String) -> BridgeError {
        BridgeError::BadReply {
            vm: self.name.clone(),
            reason,
        }
    }
}
