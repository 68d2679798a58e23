//! A fake QEMU Guest Agent that speaks the real protocol (via `qga-wire`) on a unix socket,
//! with faults a test can script per command: slow replies, no reply, stale replies,
//! garbage, oversize or over-deep replies, disconnects mid-reply, wrong shapes.
//!
//! It keeps an in-memory block table, so the memory-block commands behave like a small
//! guest, and answers `__org.qga-bridge_get-memory-stats` with the snapshot its test set
//! ([`Control::set_memory_stats`]; without one it lacks the extension, like qemu-ga). Handshake commands (`guest-sync`, `guest-sync-delimited`) are always answered
//! unless the script says [`Fault::MuteSync`]. One task per connection; one process can
//! serve thousands of sockets.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use qga_wire::{
    Frame, QgaCodec, Request,
    schema::{GuestMemoryStats, command},
};
use serde_json::{Value, json};
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    task::JoinHandle,
};
use tokio_util::codec::FramedRead;

mod hostile;

pub use hostile::{Hostile, HostileAgent};

/// What the fake does with the next command (not handshakes) it receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer after this long.
    Delay(Duration),
    /// Never answer this command.
    NoReply,
    /// First send a stale reply (carrying the id of this connection's previous request,
    /// or `-1` if there was none), then the right one.
    StaleFirst,
    /// First send these bytes, then the right reply.
    GarbageFirst(Vec<u8>),
    /// Answer with a `return` string of this many bytes.
    Oversize(usize),
    /// Answer with a value nested this deep.
    TooDeep(usize),
    /// Send half of the reply, then close the connection.
    DisconnectMidReply,
    /// Answer `{"return": "surprise"}` (well-formed, wrong shape).
    WrongShape,
    /// Run the command, then answer with this `return` value instead of the real one.
    Reply(Value),
    /// Answer with this QGA error (class, desc).
    Error(String, String),
    /// Ignore handshakes (`guest-sync-delimited`) until the script moves on: the fault is
    /// consumed by the next handshake instead of the next command.
    MuteSync,
    /// Answer the next handshake, then stop reading this connection for this long (a guest
    /// that does not drain its channel), then close it. Consumed by a handshake.
    StallAfterSync(Duration),
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<Fault>,
    blocks: BTreeMap<u64, bool>,
    block_size: u64,
    calls: HashMap<String, u64>,
    /// What `__org.qga-bridge_get-memory-stats` answers; `None`: the command is unknown.
    memory_stats: Option<GuestMemoryStats>,
}

/// Shared control of a fake agent: its script, block table and call counters.
#[derive(Debug, Clone)]
pub struct Control {
    state: Arc<Mutex<State>>,
}

impl Control {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Queues a fault for an upcoming command.
    pub fn push(&self, fault: Fault) {
        self.with(|s| s.script.push_back(fault));
    }

    /// How many times `command` was executed (handshakes included).
    pub fn calls(&self, command: &str) -> u64 {
        self.with(|s| s.calls.get(command).copied().unwrap_or(0))
    }

    /// Offers `__org.qga-bridge_get-memory-stats` (listed in `guest-info`), answering
    /// `stats` from now on; `None` takes it away again (`CommandNotFound`, as qemu-ga).
    pub fn set_memory_stats(&self, stats: Option<GuestMemoryStats>) {
        self.with(|s| s.memory_stats = stats);
    }

    /// Whether block `index` is online.
    pub fn online(&self, index: u64) -> Option<bool> {
        self.with(|s| s.blocks.get(&index).copied())
    }
}

/// A fake agent listening on a unix socket; stops (socket closed, connections dropped)
/// when dropped.
#[derive(Debug)]
pub struct FakeAgent {
    path: PathBuf,
    control: Control,
    task: JoinHandle<()>,
}

impl FakeAgent {
    /// Listens on `path` with blocks `0..blocks` (even ones online), 128 MiB each.
    pub fn start(path: &Path, blocks: u64) -> io::Result<Self> {
        Self::start_blocks(path, 0..blocks)
    }

    /// Listens on `path` with the blocks `indexes` (even ones online), 128 MiB each: a
    /// range of its own tells one agent's answers from another's.
    pub fn start_blocks(path: &Path, indexes: impl IntoIterator<Item = u64>) -> io::Result<Self> {
        let state = State {
            blocks: indexes.into_iter().map(|i| (i, i % 2 == 0)).collect(),
            block_size: 128 << 20,
            ..State::default()
        };
        Self::start_with(
            path,
            Control {
                state: Arc::new(Mutex::new(state)),
            },
        )
    }

    /// Listens on `path` sharing `control` (e.g. the same agent after a restart).
    pub fn start_with(path: &Path, control: Control) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let c = control.clone();
        let task = listen(listener, move |stream| serve(stream, c.clone()));
        Ok(Self {
            path: path.to_path_buf(),
            control,
            task,
        })
    }

    /// The script and counters.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Restarts the agent like a guest restarting `qemu-ga`: closes the listener and every
    /// connection, then listens again on the same socket with the same script and state.
    pub fn restart(self) -> io::Result<Self> {
        let (path, control) = (self.path.clone(), self.control.clone());
        drop(self);
        Self::start_with(&path, control)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        // Aborting the accept task drops the listener and, with its JoinSet, every
        // connection task.
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts connections on `listener`, each served by its own `serve(stream)` task, until
/// the returned task is aborted (which drops the listener and every connection).
fn listen<F, Fut>(listener: UnixListener, serve: F) -> JoinHandle<()>
where
    F: Fn(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        conns.spawn(serve(stream));
                    }
                    // Out of descriptors, say: keep listening once some are freed.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                // Reap finished connections so a long run does not accumulate them.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// A success reply line carrying `ret` (and `id`, if the request had one).
fn reply(ret: Value, id: &Option<Value>) -> Vec<u8> {
    line(json!({ "return": ret }), id)
}

/// An error reply line of QGA error `class` (and `id`, if the request had one).
fn error_reply(class: &str, desc: &str, id: &Option<Value>) -> Vec<u8> {
    line(json!({ "error": { "class": class, "desc": desc } }), id)
}

/// `v` with the request's `id` added, as one line of JSON.
fn line(mut v: Value, id: &Option<Value>) -> Vec<u8> {
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// `guest-info`: the fake's version and the commands it offers.
fn info(state: &State) -> Value {
    let mut commands = vec![
        json!({"name": command::PING, "enabled": true, "success-response": true}),
        json!({"name": command::GET_MEMORY_BLOCKS, "enabled": true, "success-response": true}),
    ];
    if state.memory_stats.is_some() {
        commands.push(
            json!({"name": command::GET_MEMORY_STATS, "enabled": true, "success-response": true}),
        );
    }
    json!({"version": "fake-1.0", "supported_commands": commands})
}

/// Executes `req` against the block table.
fn execute(state: &mut State, req: &Request) -> Result<Value, (String, String)> {
    let args = req.arguments.clone().unwrap_or_default();
    let generic = |d: &str| ("GenericError".to_string(), d.to_string());
    Ok(match req.execute.as_str() {
        command::SYNC | command::SYNC_DELIMITED => args
            .get("id")
            .cloned()
            .ok_or_else(|| generic("Parameter 'id' is missing"))?,
        command::PING => json!({}),
        command::INFO => info(state),
        command::GET_MEMORY_STATS if state.memory_stats.is_some() => {
            serde_json::to_value(&state.memory_stats).unwrap_or_default()
        }
        command::GET_MEMORY_BLOCK_INFO => json!({ "size": state.block_size }),
        command::GET_MEMORY_BLOCKS => Value::Array(
            state
                .blocks
                .iter()
                .map(|(i, on)| json!({"phys-index": i, "online": on, "can-offline": true}))
                .collect(),
        ),
        command::SET_MEMORY_BLOCKS => {
            let list = args
                .get("mem-blks")
                .and_then(Value::as_array)
                .ok_or_else(|| generic("Parameter 'mem-blks' is missing"))?;
            let mut out = Vec::new();
            for b in list {
                let (Some(i), Some(on)) = (b["phys-index"].as_u64(), b["online"].as_bool()) else {
                    return Err(generic("Parameter 'mem-blks[0].phys-index' is missing"));
                };
                match state.blocks.get_mut(&i) {
                    Some(cur) => {
                        *cur = on;
                        out.push(json!({"phys-index": i, "response": "success"}));
                    }
                    None => {
                        out.push(json!({"phys-index": i, "response": "not-found", "error-code": 2}))
                    }
                }
            }
            Value::Array(out)
        }
        other => {
            return Err((
                "CommandNotFound".into(),
                format!("The command {other} has not been found"),
            ));
        }
    })
}

/// Serves one connection: answers each request as the block table and the script say,
/// until the peer closes, a write fails or a fault ends the connection.
async fn serve(stream: UnixStream, control: Control) {
    let (r, mut w) = stream.into_split();
    let mut frames = FramedRead::new(r, QgaCodec::default());
    let mut previous_id = None;
    while let Some(Ok(frame)) = frames.next().await {
        let Some(req) = request(frame, &mut w).await else {
            continue;
        };
        let handshake = req.execute == command::SYNC_DELIMITED || req.execute == command::SYNC;
        let (fault, result) = control.with(|s| {
            *s.calls.entry(req.execute.clone()).or_default() += 1;
            (next_fault(s, handshake), execute(s, &req))
        });
        if fault == Some(Fault::MuteSync) {
            continue;
        }
        let mut out = Vec::new();
        if req.execute == command::SYNC_DELIMITED {
            out.push(0xFF);
        }
        match &result {
            Ok(v) => out.extend(reply(v.clone(), &req.id)),
            Err((class, desc)) => out.extend(error_reply(class, desc, &req.id)),
        }
        if !send(&mut w, fault, &out, &req, &previous_id).await {
            return;
        }
        if !handshake && req.id.is_some() {
            previous_id = req.id;
        }
    }
}

/// The request in `frame`; anything else (a delimiter, bad JSON, a value that is no
/// request) is answered with the error QGA gives and yields `None`.
async fn request(frame: Frame, w: &mut OwnedWriteHalf) -> Option<Request> {
    let answer = match frame {
        Frame::Delimiter => {
            error_reply("GenericError", "JSON parse error, stray '\u{FFFD}'", &None)
        }
        Frame::Invalid(e) => error_reply("GenericError", &e.to_string(), &None),
        Frame::Value(v) => match Request::from_value(v) {
            Ok(r) => return Some(r),
            Err(resp) => {
                let mut out = serde_json::to_vec(&*resp).unwrap_or_default();
                out.push(b'\n');
                out
            }
        },
    };
    let _ = w.write_all(&answer).await;
    None
}

/// Takes the scripted fault for this request off the script, if it is one's turn:
/// handshake faults wait for a handshake (holding back the others meanwhile), the rest
/// for a command.
fn next_fault(s: &mut State, handshake: bool) -> Option<Fault> {
    match s.script.front() {
        Some(Fault::MuteSync | Fault::StallAfterSync(_)) if handshake => s.script.pop_front(),
        Some(Fault::MuteSync | Fault::StallAfterSync(_)) => None,
        Some(_) if !handshake => s.script.pop_front(),
        _ => None,
    }
}

/// Sends the answer `out` to `req` as `fault` bends it; `false` when the connection is
/// done (a write failed, or the fault ends it).
async fn send(
    w: &mut OwnedWriteHalf,
    fault: Option<Fault>,
    out: &[u8],
    req: &Request,
    previous_id: &Option<Value>,
) -> bool {
    let sent = match fault {
        None => w.write_all(out).await,
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            w.write_all(out).await
        }
        Some(Fault::NoReply) => Ok(()),
        Some(Fault::StaleFirst) => {
            let stale = reply(
                json!([{"phys-index": 999_999, "online": true, "can-offline": true}]),
                &Some(previous_id.clone().unwrap_or(json!(-1))),
            );
            let _ = w.write_all(&stale).await;
            w.write_all(out).await
        }
        Some(Fault::GarbageFirst(bytes)) => {
            let _ = w.write_all(&bytes).await;
            w.write_all(out).await
        }
        Some(Fault::Oversize(n)) => {
            w.write_all(&reply(Value::String("x".repeat(n)), &req.id))
                .await
        }
        Some(Fault::TooDeep(depth)) => {
            let mut body = format!("{{\"return\": {}{}", "[".repeat(depth), "]".repeat(depth));
            if let Some(id) = &req.id {
                body.push_str(&format!(", \"id\": {id}"));
            }
            body.push_str("}\n");
            w.write_all(body.as_bytes()).await
        }
        Some(Fault::DisconnectMidReply) => {
            let _ = w.write_all(&out[..out.len() / 2]).await;
            return false;
        }
        Some(Fault::WrongShape) => w.write_all(&reply(json!("surprise"), &req.id)).await,
        Some(Fault::Reply(v)) => w.write_all(&reply(v, &req.id)).await,
        Some(Fault::Error(class, desc)) => w.write_all(&error_reply(&class, &desc, &req.id)).await,
        Some(Fault::MuteSync) => Ok(()),
        Some(Fault::StallAfterSync(d)) => {
            let _ = w.write_all(out).await;
            tokio::time::sleep(d).await;
            return false;
        }
    };
    sent.is_ok()
}
