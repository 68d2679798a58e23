//! One open QMP connection: the handshake, the table of callers waiting for replies, and
//! the task that owns the socket.
//!
//! The task runs a reader and a writer side by side (so a reply is never stuck behind a
//! write) and ends at the first of: the connection failing, QEMU flooding it with frames
//! that are no reply, the [`Conn`] being dropped (every [`Qmp`](crate::Qmp) handle gone),
//! or, with [`QmpLimits::idle_close`](crate::QmpLimits::idle_close), the connection
//! standing idle that long: no caller waiting for a reply, nobody holding an events
//! receiver.
//! When it ends, every caller still waiting is told [`QmpError::Unavailable`].

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use qga_wire::{Frame, FrameError, QgaCodec};
use serde::{Deserialize as _, Serialize};
use serde_json::{Map, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf},
    sync::{broadcast, mpsc, oneshot},
    time::{Instant, timeout_at},
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{Event, QmpError, VersionInfo, lock};

/// Requests queued for the writer; callers beyond it wait (within their deadline).
const QUEUE_DEPTH: usize = 64;

/// At most this many characters of QEMU's text go into a log line or an error.
const EXCERPT_CHARS: usize = 120;

/// A peer's text made safe for a log line or an error message: cut short (`…`) and with
/// control characters escaped.
pub(crate) fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out.escape_debug().to_string()
}

/// A request as QMP spells it.
#[derive(Debug, Serialize)]
pub(crate) struct Request {
    execute: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<Map<String, Value>>,
    id: u64,
}

/// What a waiting caller is handed.
type Reply = Result<Value, QmpError>;

/// A caller waiting for the reply with its id.
#[derive(Debug)]
struct Waiter {
    reply: oneshot::Sender<Reply>,
}

/// The callers waiting for replies on one connection, by request id.
#[derive(Debug, Default)]
struct Table {
    /// Why the connection ended; no caller can be added then.
    closed: Option<String>,
    waiting: HashMap<u64, Waiter>,
    /// Since when no caller has been waiting (`None`: since the connection opened).
    idle_since: Option<Instant>,
}

/// What [`Book::close_if_idle`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// The connection is closed: idle long enough, or ended otherwise.
    Closed,
    /// In use, or not idle long enough yet: look again then.
    CheckAt(Instant),
}

/// Shared between the callers and the connection's task.
#[derive(Debug, Default)]
pub(crate) struct Book {
    table: Mutex<Table>,
    /// Frames over the size or depth limit so far: a caller that times out after one came
    /// was most likely waiting for it, and is told so instead of a plain timeout.
    oversized: AtomicU64,
}

/// A caller's place in the [`Book`]; leaving it (done, timed out or cancelled) frees it,
/// so a late reply finds nobody and is dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    book: Arc<Book>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut table = lock(&self.book.table);
        table.waiting.remove(&self.id);
        if table.waiting.is_empty() {
            table.idle_since = Some(Instant::now());
        }
    }
}

impl Book {
    /// Registers a caller for reply `id`; `Err` with the reason if the connection ended.
    fn register(self: &Arc<Self>, id: u64) -> Result<(Ticket, oneshot::Receiver<Reply>), String> {
        let mut table = lock(&self.table);
        if let Some(reason) = &table.closed {
            return Err(reason.clone());
        }
        let (reply, rx) = oneshot::channel();
        table.waiting.insert(id, Waiter { reply });
        let ticket = Ticket {
            book: self.clone(),
            id,
        };
        Ok((ticket, rx))
    }

    fn is_waiting(&self, id: u64) -> bool {
        lock(&self.table).waiting.contains_key(&id)
    }

    /// Hands `reply` to the caller waiting for `id`; `false` if there is none.
    fn deliver(&self, id: u64, reply: Reply) -> bool {
        let waiter = lock(&self.table).waiting.remove(&id);
        match waiter {
            Some(w) => {
                // The caller may have gone in the meantime; the reply was still ours.
                let _ = w.reply.send(reply);
                true
            }
            None => false,
        }
    }

    /// Ends the connection: every waiting caller gets [`QmpError::Unavailable`].
    fn close(&self, reason: &str) {
        let waiting = {
            let mut table = lock(&self.table);
            table.closed.get_or_insert_with(|| reason.to_string());
            std::mem::take(&mut table.waiting)
        };
        for (_, w) in waiting {
            let _ = w.reply.send(Err(QmpError::Unavailable(format!(
                "connection lost before the reply: {reason}"
            ))));
        }
    }

    fn is_closed(&self) -> bool {
        lock(&self.table).closed.is_some()
    }

    /// Closes the connection if it has been idle for `idle`: no caller waiting, none for
    /// that long, and not `held` (someone holds an events receiver). Decided under the
    /// table's lock, so a caller registering at the same time either keeps it open or
    /// finds it closed before its request is queued (and is sent on a new connection).
    fn close_if_idle(&self, idle: Duration, held: bool) -> Idle {
        let now = Instant::now();
        let mut table = lock(&self.table);
        if table.closed.is_some() {
            return Idle::Closed;
        }
        if !table.waiting.is_empty() {
            // The last ticket to leave restarts the idle time.
            return Idle::CheckAt(now + idle);
        }
        if held {
            // A receiver's end is not announced: look again soon, counting idle time
            // from the last time it was seen.
            table.idle_since = Some(now);
            return Idle::CheckAt(now + (idle / 4).max(Duration::from_millis(1)));
        }
        let since = *table.idle_since.get_or_insert(now);
        if now < since + idle {
            return Idle::CheckAt(since + idle);
        }
        table.closed = Some(format!(
            "released after {} ms without commands (idle_close)",
            idle.as_millis()
        ));
        Idle::Closed
    }
}

/// The callers' side of an open connection. Dropping it stops the connection's task.
#[derive(Debug)]
pub(crate) struct Conn {
    tx: mpsc::Sender<Request>,
    book: Arc<Book>,
    /// Dropped with the `Conn`: tells the task to stop even while a write is stuck.
    _stop: oneshot::Sender<()>,
}

/// Why [`Conn::call`] failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The connection had ended before the request was queued: it never reached QEMU, so a
    /// new connection may carry it.
    NotSent {
        /// Why the connection ended.
        reason: String,
        /// The request's arguments, handed back for the next try.
        arguments: Option<Map<String, Value>>,
    },
    /// Anything else.
    Failed(QmpError),
}

impl Conn {
    /// The connection can still carry requests.
    pub(crate) fn is_alive(&self) -> bool {
        !self.book.is_closed() && !self.tx.is_closed()
    }

    /// Sends `command` as request `id` and waits for its reply until `deadline`.
    pub(crate) async fn call(
        &self,
        command: &str,
        arguments: Option<Map<String, Value>>,
        id: u64,
        deadline: Instant,
        max_message: usize,
    ) -> Result<Value, CallError> {
        let timeout = || {
            CallError::Failed(QmpError::Timeout {
                command: command.to_string(),
            })
        };
        let oversized = self.book.oversized.load(Ordering::Relaxed);
        let (_ticket, rx) = match self.book.register(id) {
            Ok(registered) => registered,
            Err(reason) => return Err(CallError::NotSent { reason, arguments }),
        };
        let request = Request {
            execute: command.to_string(),
            arguments,
            id,
        };
        match timeout_at(deadline, self.tx.send(request)).await {
            Err(_) => return Err(timeout()),
            Ok(Err(mpsc::error::SendError(request))) => {
                return Err(CallError::NotSent {
                    reason: "the connection has ended".into(),
                    arguments: request.arguments,
                });
            }
            Ok(Ok(())) => {}
        }
        match timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply.map_err(CallError::Failed),
            // The task ended without closing the book: only if it panicked.
            Ok(Err(_)) => Err(CallError::Failed(QmpError::Unavailable(
                "the connection's task stopped".into(),
            ))),
            Err(_) if self.book.oversized.load(Ordering::Relaxed) != oversized => {
                Err(CallError::Failed(QmpError::Protocol(format!(
                    "no usable reply to {command}: QEMU sent a message over the size or \
                     nesting limit meanwhile (max_message {max_message} bytes), most likely \
                     the reply"
                ))))
            }
            Err(_) => Err(timeout()),
        }
    }
}

/// The reading side of a connection.
pub(crate) type Frames<S> = FramedRead<ReadHalf<S>, QgaCodec>;
/// The writing side of a connection.
pub(crate) type Sink<S> = FramedWrite<WriteHalf<S>, QgaCodec>;

/// What one frame from QEMU is.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    /// A reply to request `id`.
    Reply(u64, Reply),
    /// An event.
    Event(Event),
    /// Anything else: not an object, malformed, an id that is not ours, no id.
    Stale(String),
    /// A message over the size or depth limit.
    Oversized(FrameError),
}

/// Sorts one frame from QEMU.
pub(crate) fn classify(frame: Frame) -> Incoming {
    let mut message = match frame {
        Frame::Value(Value::Object(m)) => m,
        Frame::Value(other) => return Incoming::Stale(format!("not an object: {other}")),
        Frame::Invalid(e @ (FrameError::TooLarge { .. } | FrameError::DepthExceeded)) => {
            return Incoming::Oversized(e);
        }
        Frame::Invalid(e) => return Incoming::Stale(e.to_string()),
        Frame::Delimiter => return Incoming::Stale("a 0xFF byte".into()),
    };
    if let Some(event) = Event::from_message(&mut message) {
        return Incoming::Event(event);
    }
    let Some(id) = message.get("id").and_then(Value::as_u64) else {
        return Incoming::Stale(format!("no id of ours: {}", Value::Object(message)));
    };
    if let Some(value) = message.remove("return") {
        return Incoming::Reply(id, Ok(value));
    }
    let reply = match message.remove("error") {
        Some(error) => {
            let text = |key| error.get(key).and_then(Value::as_str).map(str::to_string);
            match (text("class"), text("desc")) {
                (Some(class), Some(desc)) => Err(QmpError::Command { class, desc }),
                _ => Err(QmpError::Protocol(format!(
                    "malformed error reply: {}",
                    clip(&error.to_string())
                ))),
            }
        }
        None => Err(QmpError::Protocol(format!(
            "reply with neither return nor error: {}",
            clip(&Value::Object(message).to_string())
        ))),
    };
    Incoming::Reply(id, reply)
}

/// Everything a connection's task needs besides the socket.
pub(crate) struct TaskContext {
    /// Where events go.
    pub events: broadcast::Sender<Event>,
    /// Stale frames in a row after which the connection is dropped.
    pub max_stale_frames: u32,
    /// Close the connection after this long idle ([`QmpLimits::idle_close`](crate::QmpLimits::idle_close)).
    pub idle_close: Option<Duration>,
    /// Called when the connection ends by itself: with the reason when it was lost,
    /// `None` when it was released while idle (not when it was dropped).
    pub on_end: Box<dyn FnOnce(Option<String>) + Send>,
}

/// The greeting `{"QMP": {"version": ..., "capabilities": [...]}}`, then
/// `qmp_capabilities` as request `id`; everything within the caller's timeout. Returns
/// QEMU's version as the greeting tells it.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Send>(
    frames: &mut Frames<S>,
    sink: &mut Sink<S>,
    id: u64,
    max_stale_frames: u32,
) -> Result<Option<VersionInfo>, String> {
    let greeting = match frames.next().await {
        None => return Err("QEMU closed the connection before the greeting".into()),
        Some(Err(e)) => return Err(format!("reading the greeting: {e}")),
        Some(Ok(Frame::Value(v))) => v,
        Some(Ok(Frame::Invalid(e))) => return Err(format!("bad greeting: {e}")),
        Some(Ok(Frame::Delimiter)) => return Err("bad greeting: a 0xFF byte".into()),
    };
    let Some(qmp) = greeting.get("QMP").filter(|q| q.is_object()) else {
        return Err(format!(
            "bad greeting (not a QMP monitor?): {}",
            clip(&greeting.to_string())
        ));
    };
    let version = qmp
        .get("version")
        .and_then(|v| VersionInfo::deserialize(v).ok());
    let request = Request {
        execute: "qmp_capabilities".into(),
        arguments: None,
        id,
    };
    sink.send(&request)
        .await
        .map_err(|e| format!("sending qmp_capabilities: {e}"))?;
    let mut stale = 0u32;
    loop {
        let frame = match frames.next().await {
            None => return Err("QEMU closed the connection during the handshake".into()),
            Some(Err(e)) => return Err(format!("reading the qmp_capabilities reply: {e}")),
            Some(Ok(frame)) => frame,
        };
        match classify(frame) {
            Incoming::Reply(got, Ok(_)) if got == id => return Ok(version),
            Incoming::Reply(got, Err(e)) if got == id => {
                return Err(format!("qmp_capabilities failed: {e}"));
            }
            // QEMU sends none before the negotiation; harmless all the same.
            Incoming::Event(_) => {}
            other => {
                stale += 1;
                tracing::debug!(frame = ?other, "skipped during the QMP handshake");
                if stale > max_stale_frames {
                    return Err(format!("no reply to qmp_capabilities among {stale} frames"));
                }
            }
        }
    }
}

/// Starts the task owning an open, negotiated connection and returns the callers' side.
pub(crate) fn spawn<S: AsyncRead + AsyncWrite + Send + 'static>(
    frames: Frames<S>,
    sink: Sink<S>,
    ctx: TaskContext,
) -> Conn {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let (stop_tx, stop) = oneshot::channel();
    let book = Arc::new(Book::default());
    let task = run(frames, sink, rx, stop, book.clone(), ctx);
    tokio::spawn(tracing::Instrument::in_current_span(task));
    Conn {
        tx,
        book,
        _stop: stop_tx,
    }
}

/// The connection's task: see the [module docs](self).
async fn run<S: AsyncRead + AsyncWrite + Send>(
    frames: Frames<S>,
    sink: Sink<S>,
    rx: mpsc::Receiver<Request>,
    stop: oneshot::Receiver<()>,
    book: Arc<Book>,
    ctx: TaskContext,
) {
    let TaskContext {
        events,
        max_stale_frames,
        idle_close,
        on_end,
    } = ctx;
    /// Why the task ends.
    enum End {
        Lost(String),
        Dropped,
        Idle,
    }
    let end = tokio::select! {
        reason = read(frames, &book, &events, max_stale_frames) => End::Lost(reason),
        reason = write(sink, rx, &book) => reason.map_or(End::Dropped, End::Lost),
        () = watch_idle(&book, &events, idle_close) => End::Idle,
        _ = stop => End::Dropped,
    };
    match end {
        End::Lost(reason) => {
            tracing::warn!(%reason, "QMP connection lost");
            book.close(&reason);
            on_end(Some(reason));
        }
        End::Idle => {
            tracing::debug!("QMP connection released while idle");
            on_end(None);
        }
        End::Dropped => {
            tracing::debug!("QMP client dropped; closing the connection");
            book.close("the QMP client was dropped");
        }
    }
}

/// Returns once the connection has been idle for `idle` and is closed (see
/// [`Book::close_if_idle`]); never without `idle`.
async fn watch_idle(book: &Book, events: &broadcast::Sender<Event>, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut at = Instant::now() + idle;
    loop {
        tokio::time::sleep_until(at).await;
        match book.close_if_idle(idle, events.receiver_count() > 0) {
            Idle::Closed => return,
            Idle::CheckAt(next) => at = next,
        }
    }
}

/// Reads frames until the connection fails or QEMU floods it; returns why it stopped.
async fn read<S: AsyncRead>(
    mut frames: Frames<S>,
    book: &Book,
    events: &broadcast::Sender<Event>,
    max_stale_frames: u32,
) -> String {
    let mut stale = 0u32;
    loop {
        let frame = match frames.next().await {
            None => return "QEMU closed the connection".into(),
            Some(Err(e)) => return format!("reading from QEMU: {e}"),
            Some(Ok(frame)) => frame,
        };
        let why = match classify(frame) {
            Incoming::Event(event) => {
                tracing::debug!(event = %event.name, "QMP event");
                // Nobody listening is fine.
                let _ = events.send(event);
                continue;
            }
            Incoming::Reply(id, reply) => {
                if book.deliver(id, reply) {
                    stale = 0;
                    continue;
                }
                format!("reply to request {id}, which nobody waits for (late or foreign)")
            }
            Incoming::Oversized(e) => {
                book.oversized.fetch_add(1, Ordering::Relaxed);
                e.to_string()
            }
            Incoming::Stale(why) => why,
        };
        stale = stale.saturating_add(1);
        tracing::warn!(frame = %clip(&why), stale, "skipped a QMP frame");
        if stale > max_stale_frames {
            return format!(
                "QEMU sent {stale} frames in a row that were no reply \
                 (max_stale_frames {max_stale_frames})"
            );
        }
    }
}

/// Writes queued requests until the connection fails (`Some(why)`) or every caller's
/// side is gone (`None`). A request whose caller stopped waiting before its turn is not
/// sent at all.
async fn write<S: AsyncWrite>(
    mut sink: Sink<S>,
    mut rx: mpsc::Receiver<Request>,
    book: &Book,
) -> Option<String> {
    while let Some(request) = rx.recv().await {
        if !book.is_waiting(request.id) {
            tracing::debug!(command = %request.execute, "not sending a request nobody waits for");
            continue;
        }
        if let Err(e) = sink.send(&request).await {
            return Some(format!("writing to QEMU: {e}"));
        }
    }
    None
}
