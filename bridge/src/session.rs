//! One VM's QGA channel: a task that owns the socket and runs calls one at a time.
//!
//! Callers hand a [`Session`] a command; it is queued on a bounded channel (full: an error
//! at once, never unbounded growth) and executed by the VM's worker task, which
//!
//! - connects lazily, backing off after failures;
//! - resynchronises (`qga-protocol.md` §4: `0xFF`, `guest-sync-delimited` with a fresh
//!   random id, skip to `0xFF`, discard everything but `{"return": id}`) on every new
//!   connection and after any timeout or garbled reply;
//! - tags every command with a fresh `id` and accepts only the reply carrying it, so a late
//!   reply to an earlier, timed-out call is discarded, never handed to a later caller;
//! - bounds every read: reply size and nesting by the codec, time by the call's deadline.
//!
//! Concurrent identical reads (no arguments: block list, block size, ping) share one
//! agent call; writes are never merged.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{
    FutureExt, SinkExt, StreamExt,
    future::{BoxFuture, Shared, WeakShared},
};
use qga_wire::{Frame, FrameError, QgaCodec, Response, message::Outcome, schema::command};
use serde_json::{Map, Value, json};
use tokio::{
    io::AsyncWriteExt,
    net::UnixStream,
    sync::{mpsc, oneshot},
    time::{Instant, timeout_at},
};
use tokio_util::codec::Framed;

use crate::{config::Config, error::BridgeError, metrics::Metrics};

/// What a call yields: QGA's `return` value, or why not.
pub type CallResult = Result<Value, BridgeError>;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The channel's state, as `ListVms` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// No connection.
    Disconnected,
    /// Connected, not resynchronised yet.
    Connecting,
    /// Resynchronised; the last exchange worked.
    Connected,
}

/// A VM's status snapshot.
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// QGA socket.
    pub socket: PathBuf,
    /// Channel state.
    pub state: AgentState,
    /// When the agent last answered.
    pub last_contact: Option<SystemTime>,
    /// The last failure.
    pub last_error: Option<String>,
}

struct Call {
    command: &'static str,
    arguments: Option<Map<String, Value>>,
    deadline: Instant,
    reply: oneshot::Sender<CallResult>,
}

type SharedCall = Shared<BoxFuture<'static, CallResult>>;

/// An agent call that concurrent identical reads join.
struct Inflight {
    /// Tells this entry from a later one for the same command.
    generation: u64,
    /// The deadline the call runs under (its starter's).
    deadline: Instant,
    /// Weak: the callers keep the call alive, not the map.
    result: WeakShared<BoxFuture<'static, CallResult>>,
}

/// The handle callers use; cheap to share. Dropping the last handle stops the worker.
pub struct Session {
    name: String,
    socket: PathBuf,
    tx: mpsc::Sender<Call>,
    status: Arc<Mutex<VmStatus>>,
    inflight: Mutex<HashMap<&'static str, Inflight>>,
    generation: AtomicU64,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl Session {
    /// Creates the session and spawns its worker on the current runtime.
    pub fn spawn(
        name: &str,
        socket: &Path,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(config.limits.queue_depth);
        let status = Arc::new(Mutex::new(VmStatus {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            state: AgentState::Disconnected,
            last_contact: None,
            last_error: None,
        }));
        let claim = metrics.claim_vm(name);
        metrics.set_connected(name, claim, false);
        let worker = Worker {
            claim,
            name: name.to_string(),
            socket: socket.to_path_buf(),
            rx,
            conn: None,
            needs_resync: true,
            next_attempt: Instant::now(),
            backoff: BACKOFF_START,
            status: status.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            ids: RandomState::new(),
            counter: 0,
        };
        tokio::spawn(worker.run());
        Arc::new(Self {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            tx,
            status,
            inflight: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            config,
            metrics,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VM's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A snapshot of the channel's state.
    pub fn status(&self) -> VmStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs `command` with `arguments` on the VM's agent, by `deadline` (default: the
    /// configured timeout of the command). Reads without arguments are coalesced.
    pub async fn call(
        self: &Arc<Self>,
        command: &'static str,
        arguments: Option<Map<String, Value>>,
        deadline: Option<Instant>,
    ) -> CallResult {
        let start = Instant::now();
        let deadline =
            deadline.unwrap_or_else(|| start + self.config.timeouts.for_command(command));
        let coalescable = self.config.coalesce_reads
            && arguments.is_none()
            && matches!(
                command,
                command::GET_MEMORY_BLOCKS | command::GET_MEMORY_BLOCK_INFO | command::PING
            );
        let result = if coalescable {
            self.coalesced(command, deadline).await
        } else {
            self.submit(command, arguments, deadline).await
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics
            .call(&self.name, command, outcome, start.elapsed());
        result
    }

    fn deadline_error(&self, command: &str) -> BridgeError {
        BridgeError::DeadlineExceeded {
            vm: self.name.clone(),
            command: command.to_string(),
        }
    }

    /// Serves a read from an identical in-flight agent call, or starts one that later
    /// callers join. A joined call runs under its starter's deadline: if that one passes
    /// first, this caller, whose own deadline has not, tries again instead of failing.
    async fn coalesced(self: &Arc<Self>, command: &'static str, deadline: Instant) -> CallResult {
        loop {
            let (shared, its_deadline) = self.join_or_start(command, deadline);
            match timeout_at(deadline, shared).await {
                Err(_) => return Err(self.deadline_error(command)),
                Ok(Err(BridgeError::DeadlineExceeded { .. }))
                    if its_deadline < deadline && Instant::now() < deadline => {}
                Ok(result) => return result,
            }
        }
    }

    /// The in-flight call of `command` and its deadline, or a new one. The map holds the
    /// call weakly: its callers drive it, and when all of them have gone it is dropped (the
    /// worker then stops waiting) and the next caller starts afresh instead of joining a
    /// call nobody drives or reading a result that has grown old. A call that completes
    /// removes its own entry.
    fn join_or_start(
        self: &Arc<Self>,
        command: &'static str,
        deadline: Instant,
    ) -> (SharedCall, Instant) {
        let mut inflight = match self.inflight.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = inflight.get(command)
            && let Some(result) = existing.result.upgrade()
        {
            self.metrics.coalesced(&self.name);
            return (result, existing.deadline);
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let result = async move {
            let result = this.submit(command, None, deadline).await;
            let mut inflight = match this.inflight.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            if inflight
                .get(command)
                .is_some_and(|e| e.generation == generation)
            {
                inflight.remove(command);
            }
            result
        }
        .boxed()
        .shared();
        if let Some(weak) = result.downgrade() {
            inflight.insert(
                command,
                Inflight {
                    generation,
                    deadline,
                    result: weak,
                },
            );
        }
        (result, deadline)
    }

    async fn submit(
        &self,
        command: &'static str,
        arguments: Option<Map<String, Value>>,
        deadline: Instant,
    ) -> CallResult {
        let (reply, rx) = oneshot::channel();
        let call = Call {
            command,
            arguments,
            deadline,
            reply,
        };
        self.tx.try_send(call).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BridgeError::QueueFull(self.name.clone()),
            mpsc::error::TrySendError::Closed(_) => BridgeError::Unavailable {
                vm: self.name.clone(),
                reason: "session stopped".into(),
            },
        })?;
        match timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BridgeError::Unavailable {
                vm: self.name.clone(),
                reason: "session stopped".into(),
            }),
            Err(_) => Err(self.deadline_error(command)),
        }
    }
}

/// Why an exchange on an open connection failed.
enum Failure {
    /// The connection is gone.
    Closed(String),
    /// The agent sent something unacceptable (too large, too deep).
    Bad(String),
}

type Conn = Framed<UnixStream, QgaCodec>;

struct Worker {
    name: String,
    /// This session's claim on the VM's metric series.
    claim: u64,
    socket: PathBuf,
    rx: mpsc::Receiver<Call>,
    conn: Option<Conn>,
    needs_resync: bool,
    next_attempt: Instant,
    backoff: Duration,
    status: Arc<Mutex<VmStatus>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    ids: RandomState,
    counter: u64,
}

impl Worker {
    async fn run(mut self) {
        while let Some(mut call) = self.rx.recv().await {
            if call.reply.is_closed() {
                continue; // the caller gave up while queued
            }
            let result = if Instant::now() >= call.deadline {
                Err(BridgeError::DeadlineExceeded {
                    vm: self.name.clone(),
                    command: call.command.to_string(),
                })
            } else {
                self.execute(&mut call).await
            };
            let _ = call.reply.send(result);
        }
        // Every handle is gone: the VM was removed or replaced.
        self.metrics.release_vm(&self.name, self.claim);
        tracing::debug!(vm = %self.name, "session stopped");
    }

    /// A fresh positive id: random, so replies to an earlier connection never match.
    fn fresh_id(&mut self) -> i64 {
        self.counter = self.counter.wrapping_add(1);
        (self.ids.hash_one(self.counter) & (i64::MAX as u64)) as i64
    }

    fn update(&self, f: impl FnOnce(&mut VmStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn unavailable(&self, reason: impl Into<String>) -> BridgeError {
        BridgeError::Unavailable {
            vm: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn disconnect(&mut self, reason: &str) {
        tracing::info!(vm = %self.name, reason, "agent channel closed");
        self.conn = None;
        self.needs_resync = true;
        self.metrics.set_connected(&self.name, self.claim, false);
        self.update(|s| {
            s.state = AgentState::Disconnected;
            s.last_error = Some(reason.to_string());
        });
    }

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

    /// Connects and resynchronises as needed.
    async fn ready(&mut self, command: &str, deadline: Instant) -> Result<(), BridgeError> {
        if self.conn.is_none() {
            let now = Instant::now();
            if now < self.next_attempt {
                let last = self.status().last_error.unwrap_or_default();
                return Err(self.unavailable(format!("{last} (reconnecting)")));
            }
            let limit = deadline.min(now + Duration::from_millis(self.config.timeouts.connect_ms));
            match timeout_at(limit, UnixStream::connect(&self.socket)).await {
                Ok(Ok(stream)) => {
                    self.conn = Some(Framed::new(
                        stream,
                        QgaCodec::new(self.config.limits.max_reply_bytes),
                    ));
                    self.needs_resync = true;
                    self.update(|s| s.state = AgentState::Connecting);
                }
                Ok(Err(e)) => {
                    return Err(self.connect_failed(format!(
                        "cannot connect to {}: {e}",
                        self.socket.display()
                    )));
                }
                Err(_) => return Err(self.connect_failed("connecting timed out".into())),
            }
        }
        if self.needs_resync {
            let id = self.fresh_id();
            let own_limit = Instant::now() + Duration::from_millis(self.config.timeouts.resync_ms);
            let limit = deadline.min(own_limit);
            let Some(conn) = self.conn.as_mut() else {
                return Err(self.unavailable("not connected"));
            };
            let (result, stale) = resync(conn, id, limit).await;
            self.metrics.stale(&self.name, self.claim, stale);
            match result {
                Ok(()) => {
                    self.needs_resync = false;
                    self.metrics.resync(&self.name, self.claim);
                    self.contact();
                }
                // The caller's deadline, not the handshake's own limit, ran out: that says
                // nothing about the agent. Keep the connection (the next handshake starts
                // over with a new id) and report the caller's timeout.
                Err(ResyncFailure::Unanswered) if deadline < own_limit => {
                    self.update(|s| {
                        s.last_error = Some(format!("{command} timed out during the handshake"))
                    });
                    return Err(BridgeError::DeadlineExceeded {
                        vm: self.name.clone(),
                        command: command.to_string(),
                    });
                }
                Err(ResyncFailure::Unanswered) => {
                    return Err(self.connect_failed(
                        "resync failed: agent did not answer guest-sync-delimited".into(),
                    ));
                }
                Err(ResyncFailure::Broken(reason)) => {
                    return Err(self.connect_failed(format!("resync failed: {reason}")));
                }
            }
        }
        Ok(())
    }

    fn status(&self) -> VmStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    async fn execute(&mut self, call: &mut Call) -> CallResult {
        // A connection that died while idle (agent restarted, QEMU restarted) is only
        // noticed on use. Retry once on a fresh connection when that is safe: the request
        // was never delivered (the write failed), or it is a read.
        let read_only = matches!(
            call.command,
            command::GET_MEMORY_BLOCKS
                | command::GET_MEMORY_BLOCK_INFO
                | command::PING
                | command::INFO
        );
        let reused = self.conn.is_some() && !self.needs_resync;
        let first = self.attempt(call).await;
        match first {
            Err(Retry::Safe(reason)) if reused => {
                tracing::debug!(vm = %self.name, reason, "connection was dead; retrying on a new one");
                let second = self.attempt(call).await;
                self.finish(second)
            }
            Err(Retry::IfIdempotent(reason)) if reused && read_only => {
                tracing::debug!(vm = %self.name, reason, "connection lost; retrying read");
                let second = self.attempt(call).await;
                self.finish(second)
            }
            other => self.finish(other),
        }
    }

    fn finish(&self, r: Result<CallResult, Retry>) -> CallResult {
        match r {
            Ok(result) => result,
            Err(Retry::Safe(reason) | Retry::IfIdempotent(reason)) => Err(self.unavailable(reason)),
        }
    }

    /// One try: `Err` when the connection failed in a way that may allow a retry.
    async fn attempt(&mut self, call: &mut Call) -> Result<CallResult, Retry> {
        if let Err(e) = self.ready(call.command, call.deadline).await {
            return Ok(Err(e));
        }
        let id = self.fresh_id();
        let mut request = json!({ "execute": call.command, "id": id });
        if let Some(args) = &call.arguments {
            request["arguments"] = Value::Object(args.clone());
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Err(self.unavailable("not connected")));
        };
        let (result, stale) = exchange(conn, &request, id, call.deadline, &mut call.reply).await;
        self.metrics.stale(&self.name, self.claim, stale);
        if stale > 0 {
            // Something other than our reply was on the channel: clean it before the next call.
            self.needs_resync = true;
        }
        Ok(match result {
            Exchange::Reply(response) => {
                self.contact();
                match response.outcome {
                    Outcome::Return(v) => Ok(v),
                    Outcome::Error(e) => Err(BridgeError::Agent(e)),
                }
            }
            Exchange::Abandoned => {
                self.needs_resync = true;
                Err(self.unavailable("the caller went away"))
            }
            Exchange::SendCut { timed_out } => {
                self.disconnect(&format!("{} was cut off while being sent", call.command));
                Err(if timed_out {
                    BridgeError::DeadlineExceeded {
                        vm: self.name.clone(),
                        command: call.command.to_string(),
                    }
                } else {
                    self.unavailable("the caller went away")
                })
            }
            Exchange::TimedOut => {
                self.needs_resync = true;
                self.update(|s| s.last_error = Some(format!("{} timed out", call.command)));
                Err(BridgeError::DeadlineExceeded {
                    vm: self.name.clone(),
                    command: call.command.to_string(),
                })
            }
            Exchange::NotSent(reason) => {
                self.disconnect(&reason);
                return Err(Retry::Safe(reason));
            }
            Exchange::Failed(Failure::Closed(reason)) => {
                self.disconnect(&reason);
                return Err(Retry::IfIdempotent(reason));
            }
            Exchange::Failed(Failure::Bad(reason)) => {
                self.needs_resync = true;
                self.update(|s| s.last_error = Some(reason.clone()));
                Err(BridgeError::BadReply {
                    vm: self.name.clone(),
                    reason,
                })
            }
        })
    }
}

/// A connection failure, and whether the call may be retried on a new connection.
enum Retry {
    /// The request never left: retrying is safe for any command.
    Safe(String),
    /// The request may have reached the agent: retry reads only.
    IfIdempotent(String),
}

enum Exchange {
    Reply(Response),
    TimedOut,
    /// Sending stopped half-way (the agent did not take the request in time, or the caller
    /// went away): part of it may still sit in our write buffer, so the connection cannot
    /// be reused.
    SendCut {
        /// Whether the deadline (rather than the caller leaving) stopped it.
        timed_out: bool,
    },
    /// The caller stopped waiting for the reply; it will be discarded by the next resync.
    Abandoned,
    /// Writing the request failed: the agent never saw it.
    NotSent(String),
    Failed(Failure),
}

/// The next frame, or why there is none; `None` when the deadline passed.
async fn next_frame(conn: &mut Conn, deadline: Instant) -> Option<Result<Frame, Failure>> {
    match timeout_at(deadline, conn.next()).await {
        Err(_) => None,
        Ok(None) => Some(Err(Failure::Closed("agent socket closed".into()))),
        Ok(Some(Err(e))) => Some(Err(Failure::Closed(e.to_string()))),
        Ok(Some(Ok(frame))) => Some(Ok(frame)),
    }
}

fn over_limit(e: &FrameError) -> bool {
    matches!(e, FrameError::TooLarge { .. } | FrameError::DepthExceeded)
}

/// Sends `request` and waits for the reply carrying `id`, until `deadline` or until the
/// caller behind `reply` goes away (cancelled, disconnected). Returns the outcome and how
/// many unrelated frames were discarded.
async fn exchange(
    conn: &mut Conn,
    request: &Value,
    id: i64,
    deadline: Instant,
    reply: &mut oneshot::Sender<CallResult>,
) -> (Exchange, u32) {
    let mut stale = 0;
    let sent = tokio::select! {
        r = timeout_at(deadline, conn.send(request)) => r,
        () = reply.closed() => return (Exchange::SendCut { timed_out: false }, stale),
    };
    match sent {
        Err(_) => return (Exchange::SendCut { timed_out: true }, stale),
        Ok(Err(e)) => return (Exchange::NotSent(e.to_string()), stale),
        Ok(Ok(())) => {}
    }
    let want = Some(Value::from(id));
    loop {
        // Framed's `next` is cancel-safe: a partly read reply stays buffered.
        let next = tokio::select! {
            f = next_frame(conn, deadline) => f,
            () = reply.closed() => return (Exchange::Abandoned, stale),
        };
        let frame = match next {
            None => return (Exchange::TimedOut, stale),
            Some(Err(f)) => return (Exchange::Failed(f), stale),
            Some(Ok(frame)) => frame,
        };
        match frame {
            Frame::Delimiter => stale += 1,
            Frame::Invalid(e) if over_limit(&e) => {
                return (Exchange::Failed(Failure::Bad(e.to_string())), stale);
            }
            Frame::Invalid(_) => stale += 1,
            Frame::Value(v) => match Response::from_value(v) {
                Ok(r) if r.id == want => return (Exchange::Reply(r), stale),
                _ => stale += 1,
            },
        }
    }
}

/// Why a handshake failed.
enum ResyncFailure {
    /// No matching reply before the limit (the request itself went out).
    Unanswered,
    /// The connection is unusable.
    Broken(String),
}

/// The handshake of `qga-protocol.md` §4. Returns the outcome and the frames discarded.
async fn resync(conn: &mut Conn, id: i64, deadline: Instant) -> (Result<(), ResyncFailure>, u32) {
    let mut stale = 0;
    let sync = json!({ "execute": command::SYNC_DELIMITED, "arguments": { "id": id } });
    let sent = timeout_at(deadline, async {
        conn.get_mut()
            .write_all(&[qga_wire::codec::DELIMITER])
            .await?;
        conn.send(&sync).await.map_err(std::io::Error::other)
    })
    .await;
    match sent {
        Err(_) => {
            return (
                Err(ResyncFailure::Broken(
                    "agent did not accept the sync request in time".into(),
                )),
                stale,
            );
        }
        Ok(Err(e)) => return (Err(ResyncFailure::Broken(e.to_string())), stale),
        Ok(Ok(())) => {}
    }
    conn.codec_mut().skip_to_delimiter();
    let want = json!({ "return": id });
    loop {
        match next_frame(conn, deadline).await {
            None => return (Err(ResyncFailure::Unanswered), stale),
            Some(Err(Failure::Closed(r) | Failure::Bad(r))) => {
                return (Err(ResyncFailure::Broken(r)), stale);
            }
            Some(Ok(Frame::Delimiter)) => {}
            Some(Ok(Frame::Value(v))) if v == want => return (Ok(()), stale),
            Some(Ok(Frame::Invalid(e))) if over_limit(&e) => {
                // Skip the oversize value and keep looking for our delimiter.
                stale += 1;
                conn.codec_mut().skip_to_delimiter();
            }
            Some(Ok(_)) => stale += 1,
        }
    }
}
