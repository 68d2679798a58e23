//! Guests that never behave, for soak and flood benchmarks: each mode holds for the
//! agent's whole life, unlike a [`crate::Fault`], which hits one command.

use std::{io, path::Path, path::PathBuf};

use futures::StreamExt;
use qga_wire::{Frame, QgaCodec, Request, schema::command};
use serde_json::json;
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};
use tokio_util::codec::FramedRead;

/// How a hostile agent misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Answers the handshake, then floods every command with 1 MiB stale replies (16 MiB
    /// per command) and never the real one.
    Flood,
    /// Answers the handshake, then every command with bytes that are not JSON.
    Garbage,
    /// Reads everything, answers nothing, never closes.
    Silent,
    /// Closes each connection as soon as the first frame arrives.
    CutOff,
}

impl Hostile {
    /// Every mode, for spreading modes over agents.
    pub const ALL: [Hostile; 4] = [Self::Flood, Self::Garbage, Self::Silent, Self::CutOff];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flood => "flood",
            Self::Garbage => "garbage",
            Self::Silent => "silent",
            Self::CutOff => "cut off",
        }
    }
}

/// Size of one flood frame.
const FLOOD_FRAME: usize = 1 << 20;
/// Flood frames written per command.
const FLOOD_FRAMES: usize = 16;

/// A hostile agent on a unix socket; stops when dropped.
#[derive(Debug)]
pub struct HostileAgent {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl HostileAgent {
    /// Listens on `path`, misbehaving as `mode` on every connection.
    pub fn start(path: &Path, mode: Hostile) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let task = crate::listen(listener, move |stream| serve(stream, mode));
        Ok(Self {
            path: path.to_path_buf(),
            task,
        })
    }
}

impl Drop for HostileAgent {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(stream: UnixStream, mode: Hostile) {
    let (r, mut w) = stream.into_split();
    let mut frames = FramedRead::new(r, QgaCodec::default());
    let stale = {
        let mut f = json!({"return": "x".repeat(FLOOD_FRAME - 32), "id": -1})
            .to_string()
            .into_bytes();
        f.push(b'\n');
        f
    };
    while let Some(frame) = frames.next().await {
        if mode == Hostile::CutOff {
            return;
        }
        if mode == Hostile::Silent {
            continue;
        }
        let Ok(Frame::Value(v)) = frame else { continue };
        let Ok(req) = Request::from_value(v) else {
            continue;
        };
        let sent = if req.execute == command::SYNC_DELIMITED || req.execute == command::SYNC {
            let mut out = Vec::new();
            if req.execute == command::SYNC_DELIMITED {
                out.push(0xFF);
            }
            let id = req
                .arguments
                .as_ref()
                .and_then(|a| a.get("id"))
                .cloned()
                .unwrap_or_default();
            out.extend(json!({"return": id}).to_string().into_bytes());
            out.push(b'\n');
            w.write_all(&out).await
        } else if mode == Hostile::Garbage {
            w.write_all(b"\x01\x02 not json {[\"\n}}}]]\n").await
        } else {
            let mut sent = Ok(());
            for _ in 0..FLOOD_FRAMES {
                sent = w.write_all(&stale).await;
                if sent.is_err() {
                    break;
                }
            }
            sent
        };
        if sent.is_err() {
            return;
        }
    }
}
