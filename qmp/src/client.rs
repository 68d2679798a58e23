//! [`Qmp`]: the handle callers use, connecting lazily and reconnecting with backoff.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use qga_wire::{QgaCodec, backoff::Backoff};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::broadcast,
    time::{Instant, timeout_at},
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{
    Event, QmpError, VersionInfo,
    conn::{self, CallError, Conn, TaskContext},
    lock,
};

/// The first wait after a failed connection attempt; it doubles with every further failure
/// up to [`QmpLimits::max_backoff`].
const BACKOFF_START: Duration = Duration::from_millis(100);

/// Bounds on what a [`Qmp`] client accepts and how it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpLimits {
    /// The largest message accepted from QEMU, in bytes; larger ones are skipped unread
    /// (and a caller waiting meanwhile is told its reply may have been one). Default 1 MiB,
    /// ample for memory-hotplug replies.
    pub max_message: usize,
    /// How long connecting, QEMU's greeting and `qmp_capabilities` may take together.
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// The longest wait between connection attempts after repeated failures. Default 10 s.
    pub max_backoff: Duration,
    /// Events buffered per receiver of [`Qmp::events`]; a receiver further behind loses
    /// the oldest. Default 256.
    pub event_capacity: usize,
    /// Frames in a row that are no reply to a waiting caller (malformed, not objects, ids
    /// nobody waits for) after which the connection is dropped. Default 64.
    pub max_stale_frames: u32,
    /// Close the connection after this long without a command in flight, and connect
    /// again (greeting, `qmp_capabilities`) on the next command: for a QMP socket shared
    /// with other tools, which QEMU serves one client at a time. The connection is held
    /// while a command is in flight and while anyone holds a receiver from
    /// [`Qmp::events`]; events QEMU emits while it is released are never seen. Default
    /// `None`: the connection is held until lost or every handle is dropped.
    pub idle_close: Option<Duration>,
}

impl Default for QmpLimits {
    fn default() -> Self {
        Self {
            max_message: 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(10),
            event_capacity: 256,
            max_stale_frames: 64,
            idle_close: None,
        }
    }
}

/// The connection's state, for status reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpState {
    /// Not connected, and nothing failed: no command yet, or the connection was released
    /// after [`QmpLimits::idle_close`]. The next command connects.
    Idle,
    /// A command is connecting (greeting, `qmp_capabilities`).
    Connecting,
    /// Connected and negotiated.
    Connected,
    /// The last connection attempt failed or the connection was lost.
    Disconnected {
        /// Why.
        last_error: String,
        /// How long connection attempts are still refused (backoff), if at all.
        retry_in: Option<Duration>,
    },
}

/// The internal phase behind [`QmpState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Connecting,
    Connected,
    Disconnected,
}

/// State shared by the handles and the connection's task.
#[derive(Debug)]
struct Status {
    phase: Phase,
    last_error: Option<String>,
    /// No connection attempt before this (backoff after a failure).
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    backoff: Backoff,
    version: Option<VersionInfo>,
    /// Connections established so far; also tells a connection's task whether it is still
    /// the current one.
    connections: u64,
}

pub use qga_wire::connect::{Connector, UnixConnector};

/// A connection's stream with its type erased, so [`Qmp`] is one type whatever the
/// connector.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// [`Connector`] made object-safe.
trait DynConnector: Send + Sync {
    fn connect_boxed(&self) -> BoxFuture<'_, io::Result<Box<dyn Stream>>>;
}

impl<C: Connector> DynConnector for C {
    fn connect_boxed(&self) -> BoxFuture<'_, io::Result<Box<dyn Stream>>> {
        Box::pin(async move {
            let stream = Connector::connect(self).await?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    }
}

/// An async QMP client for one QEMU; cheap to clone, all clones share one connection.
///
/// - Does not connect until the first command; connects again on the next command after
///   the connection was lost, and after failed attempts waits (100 ms, doubling, at most
///   [`QmpLimits::max_backoff`]) before trying again; meanwhile commands fail at once with
///   [`QmpError::Unavailable`] saying when.
/// - Commands from all clones share the connection: each gets its own `id` and the reply
///   carrying it, whatever the order QEMU answers in; events between replies go to
///   [`Qmp::events`].
/// - A background task owns the connection while there is one; it ends, closing the
///   socket, when the last clone is dropped.
///
/// QEMU serves **one client per QMP socket**: while one is attached, a second one's
/// connect succeeds but gets no greeting (it fails after
/// [`QmpLimits::connect_timeout`]), and the attached one locks everyone else out (libvirt,
/// Proxmox's tools, an operator's `socat`). Give the bridge a `-qmp` socket of its own
/// (QEMU accepts several `-qmp` options), or set [`QmpLimits::idle_close`] so the
/// connection is released between commands (each burst of commands then pays a connect
/// and the `qmp_capabilities` negotiation, and events are seen only while connected).
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    limits: QmpLimits,
    connector: Box<dyn DynConnector>,
    events: broadcast::Sender<Event>,
    status: Arc<Mutex<Status>>,
    /// The current connection; held across a connection attempt so concurrent commands
    /// wait for it instead of opening their own.
    link: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.inner.socket)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// A client of the QMP monitor on unix socket `socket`. Does not connect yet: the
    /// first command does.
    pub fn new(socket: PathBuf, limits: QmpLimits) -> Self {
        let connector = UnixConnector(socket.clone());
        Self::with_connector(socket, connector, limits)
    }

    /// Like [`Qmp::new`], reaching QEMU through `connector`; `socket` is only reported.
    pub fn with_connector<C: Connector>(socket: PathBuf, connector: C, limits: QmpLimits) -> Self {
        let (events, _) = broadcast::channel(limits.event_capacity.max(1));
        let status = Status {
            phase: Phase::Idle,
            last_error: None,
            retry_at: None,
            backoff: Backoff::new(BACKOFF_START, limits.max_backoff),
            version: None,
            connections: 0,
        };
        Self {
            inner: Arc::new(Inner {
                socket,
                limits,
                connector: Box::new(connector),
                events,
                status: Arc::new(Mutex::new(status)),
                link: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The QMP socket.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// The limits this client runs with.
    pub fn limits(&self) -> &QmpLimits {
        &self.inner.limits
    }

    /// The connection's state now.
    pub fn state(&self) -> QmpState {
        let st = lock(&self.inner.status);
        match st.phase {
            Phase::Idle => QmpState::Idle,
            Phase::Connecting => QmpState::Connecting,
            Phase::Connected => QmpState::Connected,
            Phase::Disconnected => QmpState::Disconnected {
                last_error: st.last_error.clone().unwrap_or_default(),
                retry_in: st
                    .retry_at
                    .and_then(|at| at.checked_duration_since(Instant::now()))
                    .filter(|d| !d.is_zero()),
            },
        }
    }

    /// QEMU's version as the last greeting told it.
    pub fn qemu_version(&self) -> Option<VersionInfo> {
        lock(&self.inner.status).version.clone()
    }

    /// How many connections have been established so far. Events emitted while no
    /// connection was up are lost: if this changed while waiting for an event, query
    /// QEMU's state instead of relying on it.
    pub fn connections(&self) -> u64 {
        lock(&self.inner.status).connections
    }

    /// A receiver of every event QEMU sends from now on. Subscribe *before* sending the
    /// command whose event you wait for (see [`wait_for_event`](crate::wait_for_event)).
    ///
    /// Events arrive only while connected: subscribing does not connect (a command
    /// does), and events QEMU emits while no connection is up are lost. With
    /// [`QmpLimits::idle_close`], an open connection is not released while any receiver
    /// exists: drop it when done waiting.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Sends `{"execute": command, "arguments": arguments, "id": N}` and returns the
    /// reply's `return` member, connecting first if needed (greeting, then
    /// `qmp_capabilities`), all by `deadline`.
    ///
    /// A request is never sent twice: only when the connection had already ended before
    /// the request was queued is it sent on a new one. A command that fails with
    /// [`QmpError::Timeout`] or (after being sent) [`QmpError::Unavailable`] may or may not
    /// have run.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Map<String, Value>>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let mut arguments = arguments;
        let mut tries = 0;
        loop {
            tries += 1;
            let conn = self.connection(command, deadline).await?;
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let max_message = self.inner.limits.max_message;
            match conn
                .call(command, arguments, id, deadline, max_message)
                .await
            {
                Ok(value) => return Ok(value),
                Err(CallError::Failed(e)) => return Err(e),
                Err(CallError::NotSent {
                    reason,
                    arguments: back,
                }) if tries < 2 => {
                    tracing::debug!(command, %reason, "connection ended before sending; reconnecting");
                    arguments = back;
                }
                Err(CallError::NotSent { reason, .. }) => {
                    return Err(QmpError::Unavailable(reason));
                }
            }
        }
    }

    /// [`Qmp::execute`], then the return value decoded as `T`
    /// ([`QmpError::Protocol`] when it does not decode).
    pub async fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Map<String, Value>>,
        deadline: Instant,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, arguments, deadline).await?;
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("{command} returned an unexpected value: {e}")))
    }

    /// The open connection, or a new one made within `deadline` (and
    /// [`QmpLimits::connect_timeout`]).
    async fn connection(&self, command: &str, deadline: Instant) -> Result<Arc<Conn>, QmpError> {
        let inner = &self.inner;
        let timeout = || QmpError::Timeout {
            command: command.to_string(),
        };
        let mut link = timeout_at(deadline, inner.link.lock())
            .await
            .map_err(|_| timeout())?;
        if let Some(conn) = link.as_ref().filter(|c| c.is_alive()) {
            return Ok(conn.clone());
        }
        *link = None;
        let now = Instant::now();
        let previous = {
            let mut st = lock(&inner.status);
            if let Some(at) = st.retry_at.filter(|at| now < *at) {
                let last = st.last_error.as_deref().unwrap_or("connection failed");
                return Err(QmpError::Unavailable(format!(
                    "{}: {last}; next attempt in {} ms",
                    inner.socket.display(),
                    (at - now).as_millis()
                )));
            }
            std::mem::replace(&mut st.phase, Phase::Connecting)
        };
        let own_limit = now + inner.limits.connect_timeout;
        match timeout_at(deadline.min(own_limit), self.open()).await {
            Ok(Ok((conn, version))) => {
                let conn = Arc::new(conn);
                *link = Some(conn.clone());
                let mut st = lock(&inner.status);
                st.phase = Phase::Connected;
                st.connections += 1;
                st.retry_at = None;
                st.backoff.reset();
                tracing::info!(
                    socket = %inner.socket.display(),
                    qemu = %version.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "QMP connected"
                );
                st.version = version;
                Ok(conn)
            }
            Ok(Err(reason)) => Err(self.failed(reason)),
            // The caller's deadline, not the connect limit, ran out: no verdict on QEMU,
            // so no backoff for the callers after it.
            Err(_) if deadline < own_limit => {
                lock(&inner.status).phase = previous;
                Err(timeout())
            }
            Err(_) => Err(self.failed(format!(
                "no QMP greeting and capabilities within {} ms (QEMU serves one client \
                 per QMP socket: is another client attached?)",
                inner.limits.connect_timeout.as_millis()
            ))),
        }
    }

    /// Records a failed connection attempt and backs off.
    fn failed(&self, reason: String) -> QmpError {
        let inner = &self.inner;
        let mut st = lock(&inner.status);
        let wait = st.backoff.next_wait();
        st.retry_at = Some(Instant::now() + wait);
        st.phase = Phase::Disconnected;
        st.last_error = Some(reason.clone());
        tracing::warn!(socket = %inner.socket.display(), %reason, "QMP connection failed");
        QmpError::Unavailable(format!(
            "{}: {reason}; next attempt in {} ms",
            inner.socket.display(),
            wait.as_millis()
        ))
    }

    /// Connects, negotiates and starts the connection's task. The caller bounds the time.
    async fn open(&self) -> Result<(Conn, Option<VersionInfo>), String> {
        let inner = &self.inner;
        let stream = inner.connector.connect_boxed().await.map_err(|e| {
            // A unix connector names the socket, which the error's caller names too.
            let e = e.to_string();
            let prefix = format!("{}: ", inner.socket.display());
            format!("cannot connect: {}", e.strip_prefix(&prefix).unwrap_or(&e))
        })?;
        let (read, write) = tokio::io::split(stream);
        let max = inner.limits.max_message;
        let mut frames = FramedRead::new(read, QgaCodec::new(max));
        let mut sink = FramedWrite::new(write, QgaCodec::new(max));
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let max_stale_frames = inner.limits.max_stale_frames;
        let version = conn::handshake(&mut frames, &mut sink, id, max_stale_frames).await?;
        let status = inner.status.clone();
        // Connection attempts are serialised by the link lock: this is the next number.
        let generation = lock(&status).connections + 1;
        let on_end = Box::new(move |reason: Option<String>| {
            let mut st = lock(&status);
            if st.connections == generation && st.phase == Phase::Connected {
                match reason {
                    Some(reason) => {
                        st.phase = Phase::Disconnected;
                        st.last_error = Some(reason);
                    }
                    // Released while idle: nothing failed.
                    None => st.phase = Phase::Idle,
                }
            }
        });
        let ctx = TaskContext {
            events: inner.events.clone(),
            max_stale_frames,
            idle_close: inner.limits.idle_close,
            on_end,
        };
        Ok((conn::spawn(frames, sink, ctx), version))
    }
}
