//! The two conversations on an open connection: the resync handshake and one request with
//! its reply. Both bound time by a deadline, size by the codec, and what they may skip by
//! a per-call budget; values arrive as raw bytes and only our reply is ever parsed in
//! full, large ones off the async workers.

use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use qga_wire::{
    CodecError, Command, FrameError, QgaCodec, RawCodec, RawFrame, schema::GuestSyncArgs,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{Semaphore, oneshot},
    time::{Instant, timeout_at},
};
use tokio_util::codec::Framed;

use super::CallResult;

/// An open connection to an agent.
pub type Conn<S> = Framed<S, RawCodec>;

/// A new connection over `stream`, accepting values of at most `max_reply` bytes.
pub fn open<S: AsyncRead + AsyncWrite>(stream: S, max_reply: usize) -> Conn<S> {
    Framed::new(stream, RawCodec(QgaCodec::new(max_reply)))
}

/// How much of a request reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Not all of it: the agent cannot have run it, but a remainder may still sit in our
    /// write buffer, so the connection cannot carry another request.
    Part,
    /// All of it: the agent may have run it.
    All,
}

/// Why an exchange or a handshake ended without the reply it waited for.
#[derive(Debug)]
pub enum Cut {
    /// The deadline passed.
    TimedOut(Sent),
    /// The caller stopped waiting.
    CallerLeft(Sent),
    /// The connection failed (closed, I/O error).
    Broken(Sent, String),
    /// The agent sent a frame over the size or depth limit: the reply cannot be read.
    Unusable(String),
    /// The agent sent more unrelated frames or bytes than a call may skip.
    Flooded(String),
}

/// Frames skipped while waiting for a reply, a bounded excerpt of the first, and the
/// budget they must stay within.
#[derive(Debug)]
pub struct Skipped {
    /// How many frames were skipped.
    pub count: u32,
    /// Their bytes (values only: malformed input is skipped without being kept).
    pub bytes: usize,
    /// The first one, escaped and cut short.
    pub first: Option<String>,
    max_frames: u32,
    max_bytes: usize,
}

impl Skipped {
    /// An empty count that allows `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: u32, max_bytes: usize) -> Self {
        Self {
            count: 0,
            bytes: 0,
            first: None,
            max_frames,
            max_bytes,
        }
    }

    fn add(&mut self, frame: &RawFrame) -> Result<(), Cut> {
        self.count = self.count.saturating_add(1);
        if let RawFrame::Value(b) = frame {
            self.bytes = self.bytes.saturating_add(b.len());
        }
        if self.first.is_none() {
            self.first = Some(excerpt(frame));
        }
        if self.count > self.max_frames || self.bytes > self.max_bytes {
            return Err(Cut::Flooded(format!(
                "the agent sent {} unrelated frames ({} bytes) during one call \
                 (limits.max_stale_frames {}, limits.max_stale_bytes {})",
                self.count, self.bytes, self.max_frames, self.max_bytes
            )));
        }
        Ok(())
    }
}

/// At most this many characters of guest text go into a log line, a status or an error.
const EXCERPT_CHARS: usize = 120;

/// Guest-controlled text made safe to log or pass on: at most [`EXCERPT_CHARS`]
/// characters (`…` marks a cut), control and non-ASCII characters escaped, so a guest can
/// neither forge log lines nor flood them.
pub fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out.escape_default().to_string()
}

/// A frame as log text, [`clip`]ped; a value's bytes are never parsed for it.
pub fn excerpt(frame: &RawFrame) -> String {
    match frame {
        RawFrame::Delimiter => "0xFF".into(),
        RawFrame::Invalid(e) => clip(&e.to_string()),
        RawFrame::Value(b) => {
            // One character more than the excerpt holds, so a cut shows as `…`.
            let head = &b[..b.len().min(EXCERPT_CHARS * 4 + 1)];
            clip(&String::from_utf8_lossy(head))
        }
    }
}

fn over_limit(e: &FrameError) -> bool {
    matches!(e, FrameError::TooLarge { .. } | FrameError::DepthExceeded)
}

/// The next frame; `Err` when the connection failed or the deadline passed.
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    deadline: Instant,
) -> Result<RawFrame, Cut> {
    match timeout_at(deadline, conn.next()).await {
        Err(_) => Err(Cut::TimedOut(Sent::All)),
        Ok(None) => Err(Cut::Broken(Sent::All, "agent socket closed".into())),
        Ok(Some(Err(e))) => Err(Cut::Broken(Sent::All, e.to_string())),
        Ok(Some(Ok(frame))) => Ok(frame),
    }
}

/// How much of a request reached the agent, judged by what is left in the write buffer
/// after sending stopped: the request ends `}\n`, so once no more than the newline is left
/// the agent has the whole request and may run it. (`send` encodes on its first poll, so
/// a send that stopped before finishing always leaves its unsent bytes in the buffer.)
fn sent<S>(conn: &Conn<S>) -> Sent {
    if conn.write_buffer().len() <= 1 {
        Sent::All
    } else {
        Sent::Part
    }
}

/// Sends `request` and waits for the reply carrying `id`, until `deadline` or until the
/// caller behind `reply` goes away (cancelled, disconnected). Every other frame is skipped.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin, R: Serialize>(
    conn: &mut Conn<S>,
    request: R,
    id: i64,
    deadline: Instant,
    reply: &mut oneshot::Sender<CallResult>,
    skipped: &mut Skipped,
    budget: &ParseBudget,
) -> Result<Bytes, Cut> {
    // Biased: when the deadline and the caller's departure come together (the caller's own
    // timer fires at the same instant), the timeout is what happened.
    let result = tokio::select! {
        biased;
        r = timeout_at(deadline, conn.send(request)) => r,
        () = reply.closed() => return Err(Cut::CallerLeft(sent(conn))),
    };
    match result {
        Err(_) => return Err(Cut::TimedOut(sent(conn))),
        // Nothing was written: the request could not even be encoded.
        Ok(Err(e @ CodecError::Encode(_))) => return Err(Cut::Broken(Sent::Part, e.to_string())),
        Ok(Err(e)) => return Err(Cut::Broken(sent(conn), e.to_string())),
        Ok(Ok(())) => {}
    }
    tokio::select! {
        biased;
        r = await_reply(conn, id, deadline, skipped, budget) => r,
        () = reply.closed() => Err(Cut::CallerLeft(Sent::All)),
    }
}

/// Waits for the reply carrying `id` until `deadline`, skipping every other frame within
/// the `skipped` budget, and returns its bytes. Only the `id` of each value is looked at;
/// large values are looked at off the async workers. Cancel-safe: dropped and called
/// again, it loses no frame.
pub async fn await_reply<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    id: i64,
    deadline: Instant,
    skipped: &mut Skipped,
    budget: &ParseBudget,
) -> Result<Bytes, Cut> {
    loop {
        // Framed's `next` is cancel-safe: a partly read reply stays buffered.
        let frame = next_frame(conn, deadline).await?;
        match frame {
            RawFrame::Invalid(e) if over_limit(&e) => return Err(Cut::Unusable(e.to_string())),
            RawFrame::Value(bytes) => {
                let probe = offload(budget, bytes.clone(), move |b| probe_id(b) == Some(id));
                match timeout_at(deadline, probe).await {
                    Err(_) => return Err(Cut::TimedOut(Sent::All)),
                    Ok(true) => return Ok(bytes),
                    Ok(false) => skipped.add(&RawFrame::Value(bytes))?,
                }
            }
            other => skipped.add(&other)?,
        }
    }
}

/// Values at least this large are parsed on the blocking pool, not the async workers.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// The bridge-wide budget of bytes being parsed off the async workers at once: one
/// guest's large frames wait for room instead of taking every blocking thread and core.
#[derive(Debug)]
pub struct ParseBudget {
    /// One permit per KiB.
    permits: Semaphore,
    kib: u32,
}

impl ParseBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: usize) -> Arc<Self> {
        let kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        Arc::new(Self {
            permits: Semaphore::new(kib as usize),
            kib,
        })
    }
}

/// Runs `f` over `bytes`: inline when small; else on the blocking pool, holding the
/// frame's size from `budget` meanwhile (a frame larger than the whole budget waits for
/// all of it). `f` panicking counts as its default value.
pub async fn offload<T: Default + Send + 'static>(
    budget: &ParseBudget,
    bytes: Bytes,
    f: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> T {
    if bytes.len() < OFFLOAD_BYTES {
        return f(&bytes);
    }
    let kib = u32::try_from(bytes.len().div_ceil(1024)).unwrap_or(u32::MAX);
    // The semaphore is never closed, so acquiring only waits.
    let Ok(_permit) = budget.permits.acquire_many(kib.min(budget.kib)).await else {
        return T::default();
    };
    tokio::task::spawn_blocking(move || f(&bytes))
        .await
        .unwrap_or_default()
}

/// The `id` of a reply, if it is an integer; the rest of the value is skipped unparsed.
fn probe_id(bytes: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct Probe {
        id: Option<i64>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.id
}

/// QGA's resync handshake with sync id `id`: `0xFF`, then
/// `guest-sync-delimited`; everything up to the agent's `0xFF` is dropped unread, and
/// every frame after it but `{"return": id}` is skipped.
pub async fn resync<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    id: i64,
    deadline: Instant,
    skipped: &mut Skipped,
) -> Result<(), Cut> {
    let sync = Command {
        execute: qga_wire::schema::command::SYNC_DELIMITED,
        arguments: Some(GuestSyncArgs { id }),
        id: None,
    };
    let sent = timeout_at(deadline, async {
        conn.get_mut()
            .write_all(&[qga_wire::codec::DELIMITER])
            .await?;
        conn.send(&sync).await.map_err(std::io::Error::other)
    })
    .await;
    match sent {
        Err(_) => return Err(Cut::TimedOut(Sent::Part)),
        Ok(Err(e)) => return Err(Cut::Broken(Sent::Part, e.to_string())),
        Ok(Ok(())) => {}
    }
    conn.codec_mut().0.skip_to_delimiter();
    loop {
        match next_frame(conn, deadline).await? {
            RawFrame::Delimiter => {}
            RawFrame::Value(b) if is_sync_reply(&b, id) => return Ok(()),
            RawFrame::Invalid(e) if over_limit(&e) => {
                // Skip the rest of the oversize value and look for our delimiter again.
                skipped.add(&RawFrame::Invalid(e))?;
                conn.codec_mut().0.skip_to_delimiter();
            }
            other => skipped.add(&other)?,
        }
    }
}

/// `{"return": id}` and nothing else. Anything longer than such a reply can be is not
/// parsed at all.
fn is_sync_reply(bytes: &[u8], id: i64) -> bool {
    bytes.len() <= 64
        && qga_wire::strict::from_slice(bytes).is_ok_and(|v| {
            v.as_object().is_some_and(|m| {
                m.len() == 1 && m.get("return").and_then(Value::as_i64) == Some(id)
            })
        })
}
