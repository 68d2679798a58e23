//! The [`Channel`] of an agent on a unix socket of ours (QEMU's virtio-serial chardev):
//! the bridge runs the QGA protocol itself.
//!
//! - connects lazily, backing off after failures;
//! - resynchronises (`0xFF`, `guest-sync-delimited` with a fresh random id, skip to
//!   `0xFF`, discard everything but `{"return": id}`) on every new connection and after
//!   any timeout, garbled or unusable reply;
//! - tags every command with a fresh `id` and accepts only the reply carrying it, so a late
//!   reply to an earlier, timed-out call is discarded, never handed to a later caller;
//! - retries once on a fresh connection when a connection that died while idle is found
//!   dead, if the request never reached the agent whole or is a read;
//! - in shared mode, closes the socket when idle so that other clients get it.

use std::{
    hash::{BuildHasher, RandomState},
    sync::Arc,
    time::Duration,
};

use qga_wire::backoff::Backoff;
use tokio::time::{Instant, timeout_at};

use super::{
    AgentState, CallResult, Connector, Job, SessionSettings,
    channel::{Channel, Executed},
    exchange::{
        Conn, Cut, OFFLOAD_BYTES, ParseBudget, Sent, Skipped, await_reply, clip, exchange, offload,
        open, resync,
    },
    lock,
    record::Late,
    vitals::Vitals,
    worker::{Decoded, decode_reply},
};
use crate::{
    call::{Call, Reply},
    error::BridgeError,
};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A failed try on a connection that may be retried once on a fresh one.
enum Retry {
    /// The request never reached the agent whole: safe to resend for any call.
    Always(String),
    /// The request may have reached the agent: resend reads only.
    IfRead(String),
}

/// One VM's socket channel. See the module docs.
pub(super) struct SocketChannel<C: Connector> {
    connector: C,
    conn: Option<Conn<C::Stream>>,
    needs_resync: bool,
    next_attempt: Instant,
    backoff: Backoff,
    vitals: Vitals,
    settings: Arc<SessionSettings>,
    budget: Arc<ParseBudget>,
    ids: RandomState,
    counter: u64,
    /// Shared mode: release the socket this long after the last call.
    shared_idle: Option<Duration>,
}

impl<C: Connector> SocketChannel<C> {
    /// A channel through `connector`, not connected yet; `shared`: released when idle.
    pub(super) fn new(
        connector: C,
        shared: bool,
        vitals: Vitals,
        settings: Arc<SessionSettings>,
        budget: Arc<ParseBudget>,
    ) -> Self {
        Self {
            connector,
            conn: None,
            needs_resync: true,
            next_attempt: Instant::now(),
            backoff: Backoff::new(BACKOFF_START, BACKOFF_MAX),
            shared_idle: shared.then(|| Duration::from_millis(settings.timeouts.shared_idle_ms)),
            vitals,
            settings,
            budget,
            ids: RandomState::new(),
            counter: 0,
        }
    }

    /// A fresh positive id: random, so replies to an earlier connection never match.
    fn fresh_id(&mut self) -> i64 {
        self.counter = self.counter.wrapping_add(1);
        (self.ids.hash_one(self.counter) & (i64::MAX as u64)) as i64
    }

    fn deadline_error(&self, command: &str) -> BridgeError {
        BridgeError::deadline(&self.vitals.name, command)
    }

    fn disconnect(&mut self, reason: &str) {
        tracing::info!(reason, "agent channel closed");
        self.conn = None;
        self.needs_resync = true;
        self.vitals.disconnected(reason);
    }

    /// Drops the connection and backs off before the next one.
    fn connect_failed(&mut self, reason: String) -> BridgeError {
        self.disconnect(&reason);
        self.next_attempt = Instant::now() + self.backoff.next_wait();
        self.vitals.unavailable(reason)
    }

    fn contact(&mut self) {
        self.backoff.reset();
        self.vitals.contact();
    }

    /// Marks the channel for a resync before the next call, and logs why (once). `why`
    /// must be [`clip`]ped if the guest wrote any of it.
    fn distrust(&mut self, command: &str, why: &str) {
        tracing::warn!(command, %why, "resynchronising the channel");
        self.needs_resync = true;
        self.vitals.error(format!("{command}: {why}"));
    }

    /// What one call may skip before the channel counts as flooded.
    fn skip_budget(&self) -> Skipped {
        let l = &self.settings.limits;
        Skipped::new(l.max_stale_frames, l.max_stale_bytes)
    }

    /// Counts what a call skipped; anything skipped gets the channel cleaned before the
    /// next call.
    fn count_skipped(&mut self, command: &str, skipped: &Skipped) {
        let v = &self.vitals;
        v.metrics.stale(&v.name, v.claim, skipped.count);
        if skipped.count > 0 {
            self.needs_resync = true;
            tracing::warn!(
                command,
                frames = skipped.count,
                first = %skipped.first.as_deref().unwrap_or(""),
                "skipped frames that were not the awaited reply"
            );
        }
    }

    /// Parses our reply's bytes into `call`'s outcome (off the async workers when large),
    /// and says why the channel is distrusted if it is not a usable reply.
    async fn decode(&mut self, call: &Call, bytes: bytes::Bytes) -> Result<Reply, BridgeError> {
        let decoded = if bytes.len() < OFFLOAD_BYTES {
            decode_reply(call, &bytes)
        } else {
            let call = call.clone();
            offload(&self.budget, bytes, move |b| decode_reply(&call, b)).await
        };
        let reason = match decoded {
            Decoded::Reply(reply) => return Ok(reply),
            Decoded::Agent(e) => return Err(BridgeError::Agent(e)),
            // A reply that does not answer the request says the channel is confused.
            Decoded::Bad(reason) => clip(&reason),
            Decoded::Lost => "the reply could not be parsed".to_string(),
        };
        self.distrust(call.name(), &reason);
        Err(self.vitals.bad_reply(reason))
    }

    /// Connects as needed, within the caller's `deadline` and the connect timeout.
    async fn connect(&mut self, command: &str, deadline: Instant) -> Result<(), BridgeError> {
        let now = Instant::now();
        if now < self.next_attempt {
            let last = lock(&self.vitals.status)
                .last_error
                .clone()
                .unwrap_or_default();
            return Err(self.vitals.unavailable(format!("{last} (reconnecting)")));
        }
        let own_limit = now + Duration::from_millis(self.settings.timeouts.connect_ms);
        match timeout_at(deadline.min(own_limit), self.connector.connect()).await {
            Ok(Ok(stream)) => {
                self.conn = Some(open(stream, self.settings.limits.max_reply_bytes));
                self.needs_resync = true;
                self.vitals.update(|s| s.state = AgentState::Connecting);
                Ok(())
            }
            Ok(Err(e)) => Err(self.connect_failed(format!("cannot connect: {e}"))),
            // The caller's deadline, not the connect limit, ran out: no verdict on the
            // agent, so no backoff for the callers after it.
            Err(_) if deadline < own_limit => {
                tracing::warn!(command, "deadline passed while connecting");
                Err(self.deadline_error(command))
            }
            Err(_) => Err(self.connect_failed("connecting timed out".into())),
        }
    }

    /// Connects and resynchronises as needed.
    async fn ready(&mut self, command: &str, deadline: Instant) -> Result<(), BridgeError> {
        if self.conn.is_none() {
            self.connect(command, deadline).await?;
        }
        if !self.needs_resync {
            return Ok(());
        }
        let id = self.fresh_id();
        let own_limit = Instant::now() + Duration::from_millis(self.settings.timeouts.resync_ms);
        let mut skipped = self.skip_budget();
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.vitals.unavailable("not connected"));
        };
        let result = resync(conn, id, deadline.min(own_limit), &mut skipped).await;
        self.count_skipped(command, &skipped);
        match result {
            Ok(()) => {
                tracing::debug!(command, "resynchronised");
                self.needs_resync = false;
                self.vitals
                    .metrics
                    .resync(&self.vitals.name, self.vitals.claim);
                self.contact();
                Ok(())
            }
            // The caller's deadline, not the handshake's own limit, ran out: that says
            // nothing about the agent, so no backoff.
            Err(Cut::TimedOut(sent)) if deadline < own_limit => {
                Err(self.handshake_cut_short(command, sent))
            }
            Err(cut) => Err(self.resync_failed(command, cut)),
        }
    }

    /// The caller's deadline passed during the handshake: keep the connection unless the
    /// sync request was cut off half-sent (the next handshake starts over with a new id),
    /// and report the caller's timeout.
    fn handshake_cut_short(&mut self, command: &str, sent: Sent) -> BridgeError {
        tracing::warn!(command, "deadline passed during the handshake");
        let why = format!("{command} timed out during the handshake");
        if sent == Sent::Part {
            self.disconnect(&why);
        } else {
            self.vitals.error(why);
        }
        self.deadline_error(command)
    }

    /// The handshake failed on the agent's side: drop the connection and back off.
    fn resync_failed(&mut self, command: &str, cut: Cut) -> BridgeError {
        let reason = match cut {
            Cut::TimedOut(Sent::All) => "agent did not answer guest-sync-delimited".to_string(),
            Cut::TimedOut(Sent::Part) => "agent did not accept the sync request in time".into(),
            Cut::Broken(_, r) | Cut::Unusable(r) | Cut::Flooded(r) => clip(&r),
            Cut::CallerLeft(_) => "the caller went away".to_string(),
        };
        tracing::warn!(command, reason, "resync failed");
        self.connect_failed(format!("resync failed: {reason}"))
    }

    /// One try: `Err` when the connection failed in a way that may allow a retry.
    async fn attempt(&mut self, job: &mut Job) -> Result<Executed<i64>, Retry> {
        let command = job.call.name();
        if let Err(e) = self.ready(command, job.deadline).await {
            return Ok(Executed::Done(Err(e)));
        }
        let id = self.fresh_id();
        let mut skipped = self.skip_budget();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Executed::Done(Err(self
                .vitals
                .unavailable("not connected"))));
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
        match result {
            Ok(bytes) => {
                self.contact();
                Ok(Executed::Done(self.decode(&job.call, bytes).await))
            }
            Err(cut) => self.cut(&job.call, id, cut),
        }
    }

    /// What an exchange cut short means for call `call` (request `id`) and the channel.
    fn cut(&mut self, call: &Call, id: i64, cut: Cut) -> Result<Executed<i64>, Retry> {
        let command = call.name();
        let done = |e| Ok(Executed::Done(Err(e)));
        match cut {
            // The guest has a state-changing request it may still be running: its outcome
            // is awaited, not dropped at the next resync.
            Cut::TimedOut(Sent::All) if !call.is_read() => {
                Ok(Executed::Orphaned(Err(self.deadline_error(command)), id))
            }
            Cut::CallerLeft(Sent::All) if !call.is_read() => Ok(Executed::Orphaned(
                Err(self.vitals.unavailable("the caller went away")),
                id,
            )),
            Cut::TimedOut(Sent::Part) => {
                tracing::warn!(command, "deadline passed while sending the request");
                self.disconnect(&format!("{command} was cut off while sent"));
                done(self.deadline_error(command))
            }
            Cut::TimedOut(Sent::All) => {
                self.distrust(command, "no reply before the deadline");
                done(self.deadline_error(command))
            }
            Cut::CallerLeft(Sent::Part) => {
                self.disconnect(&format!("{command} was cut off while sent"));
                done(self.vitals.unavailable("the caller went away"))
            }
            // The reply, should it come, is dropped unread by the next resync.
            Cut::CallerLeft(Sent::All) => {
                self.needs_resync = true;
                done(self.vitals.unavailable("the caller went away"))
            }
            Cut::Broken(sent, reason) => {
                self.disconnect(&reason);
                Err(match sent {
                    Sent::Part => Retry::Always(reason),
                    Sent::All => Retry::IfRead(reason),
                })
            }
            Cut::Unusable(reason) => {
                let reason = clip(&reason);
                self.distrust(command, &reason);
                done(self.vitals.bad_reply(reason))
            }
            // A guest flooding its channel gets it dropped and backed off.
            Cut::Flooded(reason) => {
                tracing::warn!(command, reason, "dropping a flooded channel");
                done(self.connect_failed(reason))
            }
        }
    }

    /// The outcome an orphaned call's awaited reply (or its absence) says.
    async fn late(&mut self, call: &Call, result: Result<bytes::Bytes, Cut>) -> Late {
        let command = call.name();
        let unknown = "whether the guest applied it is unknown";
        match result {
            Ok(bytes) => {
                self.contact();
                let result: CallResult = self.decode(call, bytes).await;
                Late::of(&result)
            }
            Err(Cut::Flooded(reason)) => {
                let e = self.connect_failed(reason);
                Late::failed(e.outcome().as_str(), format!("{e}: {unknown}"))
            }
            Err(Cut::TimedOut(_)) => {
                self.distrust(command, "no outcome within the command's timeout");
                let detail = format!("no reply within the command's configured timeout: {unknown}");
                Late::failed("deadline_exceeded", detail)
            }
            Err(Cut::Broken(_, reason)) => {
                self.disconnect(&reason);
                Late::failed("unavailable", format!("{reason}: {unknown}"))
            }
            Err(Cut::Unusable(reason)) => {
                let reason = clip(&reason);
                self.distrust(command, &reason);
                Late::failed("bad_reply", reason)
            }
            // `await_reply` has no caller to lose; said for completeness.
            Err(Cut::CallerLeft(_)) => Late::failed("unavailable", "the caller went away".into()),
        }
    }
}

impl<C: Connector> Channel for SocketChannel<C> {
    type Orphan = i64;

    async fn execute(&mut self, job: &mut Job) -> Executed<i64> {
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
            Executed::Done(Err(self.vitals.unavailable(reason)))
        })
    }

    /// Waits for the reply carrying request `id`, skipping (and counting) anything else.
    async fn outcome(&mut self, call: &Call, id: i64, limit: Instant) -> Late {
        let mut skipped = self.skip_budget();
        let result = match self.conn.as_mut() {
            None => Err(Cut::Broken(Sent::All, "not connected".into())),
            Some(conn) => await_reply(conn, id, limit, &mut skipped, &self.budget).await,
        };
        self.count_skipped(call.name(), &skipped);
        self.late(call, result).await
    }

    fn idle(&self) -> Option<Duration> {
        self.shared_idle.filter(|_| self.conn.is_some())
    }

    /// Closes the idle connection so other clients get the socket. Not a failure: no
    /// backoff, and the next call connects and resynchronises.
    fn release(&mut self) {
        tracing::debug!("shared socket released while idle");
        // The state first: once the socket closes, another client may be served at once.
        self.vitals.update(|s| s.state = AgentState::Idle);
        let v = &self.vitals;
        v.metrics.set_connected(&v.name, v.claim, false);
        self.needs_resync = true;
        self.conn = None;
    }
}
