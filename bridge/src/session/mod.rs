//! One VM's QGA channel: a handle callers share and a task that runs calls one at a time.
//!
//! Callers hand a [`Session`] a typed [`Call`]; it is queued on a bounded channel (full: an
//! error at once, never unbounded growth) and run by the VM's worker (`worker.rs`) on its
//! channel (`channel.rs`): a unix socket of ours (`socket.rs`: connect, resync, ids, bounded reads —
//! the handshake is QEMU's, see "QGA wire protocol" in `docs/ARCHITECTURE.md`) or libvirt
//! (`libvirt.rs`: libvirt holds the channel). Either way the reply is bounded and decoded
//! into the call's typed [`Reply`], checked against the request, and a state-changing
//! call's outcome is awaited and recorded even after its caller left (`record.rs`).
//!
//! Concurrent identical reads (no arguments) share one agent call; writes are never merged.
//! The socket channel's connection is anything a [`Connector`] opens, so the whole
//! protocol is unit-tested over in-memory pipes (`tests.rs`).

mod channel;
mod exchange;
mod libvirt;
mod record;
mod socket;
mod vitals;
mod worker;

pub use exchange::ParseBudget;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared, WeakShared},
};
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, timeout_at},
};
use tracing::Instrument;

use qga_wire::schema::GuestMemoryBlockResponse;

use crate::{
    call::{Call, Reply},
    config::{Config, LimitsConfig, TimeoutsConfig},
    error::{BridgeError, Outcome},
    metrics::Metrics,
};

/// Time a call that makes the agent wait ([`Call::agent_wait`]) gets beyond that wait, for
/// the work after it and the reply's trip.
const AGENT_WAIT_GRACE: Duration = Duration::from_secs(5);

/// What a session needs of the configuration.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Queue depth, reply sizes, what a call may skip.
    pub limits: LimitsConfig,
    /// Per-command, connect, resync and shared-idle timeouts.
    pub timeouts: TimeoutsConfig,
    /// Whether concurrent identical reads share one agent call.
    pub coalesce_reads: bool,
}

impl SessionSettings {
    /// The session settings of `config`.
    pub fn of(config: &Config) -> Arc<Self> {
        Arc::new(Self {
            limits: config.limits.clone(),
            timeouts: config.timeouts.clone(),
            coalesce_reads: config.coalesce_reads,
        })
    }
}

/// What a call yields: the typed reply, or why not.
pub type CallResult = Result<Reply, BridgeError>;

pub use qga_wire::connect::{Connector, UnixConnector};

/// The channel's state, as `ListVms` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// No connection.
    Disconnected,
    /// Connected, not resynchronised yet.
    Connecting,
    /// Resynchronised; the last exchange worked.
    Connected,
    /// Waiting for the outcome of a state-changing call whose caller stopped waiting;
    /// other calls are refused as busy until it comes (or the command's timeout passes).
    Busy,
    /// Shared mode: the socket was released for other clients; the next call reconnects.
    Idle,
}

impl AgentState {
    /// The state in lower case, as JSON-RPC reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Busy => "busy",
            Self::Idle => "idle",
        }
    }
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
    /// The last state-changing call and what came of it.
    pub last_write: Option<WriteRecord>,
    /// How many times the channel came up (connected, or back from a failure or an idle
    /// release): a change tells that the agent may be another one now.
    pub connections: u64,
}

/// A state-changing call and its outcome, as far as the bridge knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// When the call was sent to the agent.
    pub at: SystemTime,
    /// The QGA command.
    pub command: &'static str,
    /// `ok`, an error label (`agent_error`, `deadline_exceeded`, ...), or `pending` while
    /// the bridge still waits for a reply its caller stopped waiting for.
    pub outcome: &'static str,
    /// What went wrong, if anything.
    pub detail: Option<String>,
    /// The agent's per-block results, once it answered.
    pub results: Vec<GuestMemoryBlockResponse>,
    /// The reply came after its caller had stopped waiting.
    pub late: bool,
}

/// A call on its way to the worker.
struct Job {
    call: Call,
    /// The caller's deadline.
    deadline: Instant,
    /// The command's configured timeout: how long the worker waits for the outcome of a
    /// state-changing call even after its caller stopped waiting.
    limit: Instant,
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

/// One call counted in a session's `pending` while it lives.
struct Pending(Arc<AtomicU64>);

impl Pending {
    fn count(pending: &Arc<AtomicU64>) -> Self {
        pending.fetch_add(1, Ordering::Relaxed);
        Self(pending.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The handle callers use; cheap to share. Dropping the last handle stops the worker.
pub struct Session {
    name: String,
    source: AgentSource,
    /// This session's claim on the VM's metric series.
    claim: u64,
    /// Calls of this session's callers not answered yet (queued, running or joined).
    pending: Arc<AtomicU64>,
    tx: mpsc::Sender<Job>,
    status: Arc<Mutex<VmStatus>>,
    inflight: Mutex<HashMap<&'static str, Inflight>>,
    generation: AtomicU64,
    settings: Arc<SessionSettings>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Where a VM's agent is reached.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// A unix socket: QEMU's virtio-serial chardev.
    Socket {
        /// The socket.
        path: PathBuf,
        /// Shared with other tools: released when idle.
        shared: bool,
    },
    /// A libvirt domain run, whose agent libvirt holds.
    Libvirt {
        /// The connection to libvirtd.
        libvirt: Arc<qga_libvirt::Libvirt>,
        /// The domain run.
        dom: qga_libvirt::Dom,
    },
}

impl AgentSource {
    /// What `ListVms` and `vm-list` report as the VM's socket: the path, or
    /// `libvirt:URI#NAME@ID` for a libvirt domain run.
    pub fn describe(&self) -> PathBuf {
        match self {
            Self::Socket { path, .. } => path.clone(),
            Self::Libvirt { libvirt, dom } => {
                PathBuf::from(format!("libvirt:{}#{}@{}", libvirt.uri(), dom.name, dom.id))
            }
        }
    }

    /// Whether the VM is served through `libvirt` (any run of any domain).
    pub fn is_libvirt(&self, libvirt: &qga_libvirt::Libvirt) -> bool {
        matches!(self, Self::Libvirt { libvirt: l, .. } if l.uri() == libvirt.uri())
    }
}

impl PartialEq for AgentSource {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Socket { path, shared }, Self::Socket { path: p, shared: s }) => {
                path == p && shared == s
            }
            (Self::Libvirt { libvirt, dom }, Self::Libvirt { libvirt: l, dom: d }) => {
                libvirt.uri() == l.uri() && dom == d
            }
            _ => false,
        }
    }
}

/// A fresh status: disconnected, nothing heard yet.
fn new_status(name: &str, socket: &Path) -> Arc<Mutex<VmStatus>> {
    Arc::new(Mutex::new(VmStatus {
        name: name.to_string(),
        socket: socket.to_path_buf(),
        state: AgentState::Disconnected,
        last_contact: None,
        last_error: None,
        last_write: None,
        connections: 0,
    }))
}

/// The span a worker runs in. Error level is enabled whenever any event is, so every line
/// a worker logs names its VM, whatever the filter.
fn vm_span(name: &str) -> tracing::Span {
    tracing::error_span!("vm", vm = %name)
}

use qga_wire::sync::lock;

impl Session {
    /// Creates the session of the agent at `source` and spawns its worker on the current
    /// runtime. Large replies are parsed within the bridge-wide `budget`.
    pub fn spawn(
        name: &str,
        source: AgentSource,
        settings: Arc<SessionSettings>,
        metrics: Arc<Metrics>,
        budget: Arc<ParseBudget>,
    ) -> Arc<Self> {
        match source.clone() {
            AgentSource::Socket { path, shared } => {
                let connector = UnixConnector(path);
                Self::start(name, source, settings.clone(), metrics, |vitals| {
                    socket::SocketChannel::new(connector, shared, vitals, settings, budget)
                })
            }
            AgentSource::Libvirt { libvirt, dom } => {
                Self::start(name, source, settings.clone(), metrics, |vitals| {
                    libvirt::LibvirtChannel::new(dom, libvirt, vitals, settings, budget)
                })
            }
        }
    }

    /// Like [`Session::spawn`], reaching the agent through `connector`; `socket` is only
    /// reported.
    pub fn spawn_with<C: Connector>(
        name: &str,
        socket: &Path,
        connector: C,
        settings: Arc<SessionSettings>,
        metrics: Arc<Metrics>,
        budget: Arc<ParseBudget>,
    ) -> Arc<Self> {
        let source = AgentSource::Socket {
            path: socket.to_path_buf(),
            shared: false,
        };
        Self::start(name, source, settings.clone(), metrics, |vitals| {
            socket::SocketChannel::new(connector, false, vitals, settings, budget)
        })
    }

    /// Spawns the worker of the channel `channel` makes, and returns the handle.
    fn start<Ch: channel::Channel>(
        name: &str,
        source: AgentSource,
        settings: Arc<SessionSettings>,
        metrics: Arc<Metrics>,
        channel: impl FnOnce(vitals::Vitals) -> Ch,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(settings.limits.queue_depth);
        let status = new_status(name, &source.describe());
        let vitals = vitals::Vitals::new(name, status.clone(), metrics.clone());
        let claim = vitals.claim;
        let worker = worker::Worker::new(channel(vitals.clone()), rx, vitals);
        tokio::spawn(worker.run().instrument(vm_span(name)));
        Arc::new(Self {
            name: name.to_string(),
            source,
            claim,
            pending: Arc::default(),
            tx,
            status,
            inflight: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            settings,
            metrics,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the VM's agent is reached.
    pub fn source(&self) -> &AgentSource {
        &self.source
    }

    /// A snapshot of the channel's state.
    pub fn status(&self) -> VmStatus {
        lock(&self.status).clone()
    }

    /// This session's claim on the VM's metric series (see [`Metrics::claim_vm`]).
    pub fn claim(&self) -> u64 {
        self.claim
    }

    /// Whether the channel is up and nobody uses it: connected, no call queued, running or
    /// awaited. Background work (a poll of the guest's signals) runs only then, so that a
    /// caller's call hardly ever queues behind it.
    pub fn idle(&self) -> bool {
        self.pending.load(Ordering::Relaxed) == 0
            && lock(&self.status).state == AgentState::Connected
    }

    /// Runs `call` on the VM's agent by the caller's `deadline`, and never later than the
    /// command's configured timeout: one caller cannot hold a VM's channel longer than
    /// the operator allows. Reads without arguments are coalesced.
    pub async fn call(self: &Arc<Self>, call: Call, deadline: Option<Instant>) -> CallResult {
        let _pending = Pending::count(&self.pending);
        let start = Instant::now();
        let name = call.name();
        let mut timeout = self.settings.timeouts.for_command(name);
        if let Some(wait) = call.agent_wait() {
            // A call that asks the agent to wait gets that wait on top of its own time.
            timeout = timeout.max(wait + AGENT_WAIT_GRACE);
        }
        let limit = start + timeout;
        let deadline = deadline.map_or(limit, |d| d.min(limit));
        let result = if self.settings.coalesce_reads && call.coalescable() {
            self.coalesced(call, deadline).await
        } else {
            self.submit(call, deadline, limit).await
        };
        self.metrics
            .call(&self.name, name, Outcome::of(&result), start.elapsed());
        result
    }

    /// Serves a read from an identical in-flight agent call, or starts one that later
    /// callers join. A joined call runs under its starter's deadline: if that one passes
    /// first, this caller, whose own deadline has not, tries again instead of failing.
    async fn coalesced(self: &Arc<Self>, call: Call, deadline: Instant) -> CallResult {
        loop {
            let (shared, its_deadline) = self.join_or_start(&call, deadline);
            match timeout_at(deadline, shared).await {
                Err(_) => return Err(BridgeError::deadline(&self.name, call.name())),
                Ok(Err(BridgeError::DeadlineExceeded { .. }))
                    if its_deadline < deadline && Instant::now() < deadline => {}
                Ok(result) => return result,
            }
        }
    }

    /// The in-flight agent call like `call` and its deadline, or a new one. The map holds
    /// the call weakly: its callers drive it, and when all of them have gone it is dropped
    /// (the worker then stops waiting) and the next caller starts afresh instead of joining
    /// a call nobody drives or reading a result that has grown old. A call that completes
    /// removes its own entry.
    fn join_or_start(self: &Arc<Self>, call: &Call, deadline: Instant) -> (SharedCall, Instant) {
        let key = call.name();
        let mut inflight = lock(&self.inflight);
        if let Some(existing) = inflight.get(key)
            && let Some(result) = existing.result.upgrade()
        {
            self.metrics.coalesced(&self.name);
            return (result, existing.deadline);
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let call = call.clone();
        let result = async move {
            let result = this.submit(call, deadline, deadline).await;
            let mut inflight = lock(&this.inflight);
            if inflight
                .get(key)
                .is_some_and(|e| e.generation == generation)
            {
                inflight.remove(key);
            }
            result
        }
        .boxed()
        .shared();
        if let Some(weak) = result.downgrade() {
            inflight.insert(
                key,
                Inflight {
                    generation,
                    deadline,
                    result: weak,
                },
            );
        }
        (result, deadline)
    }

    /// Queues `call` for the worker and waits for its result until `deadline`; `limit`
    /// bounds the worker's wait for a state-changing call's outcome.
    async fn submit(&self, call: Call, deadline: Instant, limit: Instant) -> CallResult {
        let name = call.name();
        let stopped = || BridgeError::Unavailable {
            vm: self.name.clone(),
            reason: "session stopped".into(),
        };
        {
            let status = lock(&self.status);
            if status.state == AgentState::Busy {
                let pending = status.last_write.as_ref().map_or(name, |w| w.command);
                return Err(record::busy(&self.name, pending));
            }
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            call,
            deadline,
            limit,
            reply,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BridgeError::QueueFull(self.name.clone()),
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })?;
        match timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(BridgeError::deadline(&self.name, name)),
        }
    }
}
