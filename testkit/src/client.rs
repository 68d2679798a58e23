//! A blocking QGA client for tests and benchmarks.

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use bytes::BytesMut;
use qga_wire::{Frame, QgaCodec};
use serde_json::{Value, json};
use tokio_util::codec::Decoder;

/// How long a read waits by default before failing with `TimedOut`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to an agent socket (ours, the reference, or a QEMU chardev).
#[derive(Debug)]
pub struct QgaClient {
    stream: UnixStream,
    codec: QgaCodec,
    buf: BytesMut,
}

impl QgaClient {
    /// Connects to `path` with [`DEFAULT_TIMEOUT`] on reads and writes.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Self {
            stream,
            codec: QgaCodec::default(),
            buf: BytesMut::with_capacity(8192),
        })
    }

    /// Changes the read timeout.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))
    }

    /// Sends `request` (serialised as JSON) and returns the next reply value.
    pub fn request(&mut self, request: &Value) -> io::Result<Value> {
        let bytes = serde_json::to_vec(request).map_err(io::Error::other)?;
        self.send_raw(&bytes)?;
        self.read_reply()
    }

    /// Sends `{"execute": name, "arguments": args}` and returns the whole reply object.
    pub fn execute(&mut self, name: &str, args: Option<Value>) -> io::Result<Value> {
        let mut req = json!({ "execute": name });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.request(&req)
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next frame the agent sends (a `0xFF` byte is a [`Frame::Delimiter`]).
    pub fn read_frame(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).map_err(io::Error::other)? {
                return Ok(frame);
            }
            self.fill()?;
        }
    }

    /// The next JSON value, skipping `0xFF` delimiters.
    pub fn read_reply(&mut self) -> io::Result<Value> {
        loop {
            match self.read_frame()? {
                Frame::Value(v) => return Ok(v),
                Frame::Delimiter => continue,
                Frame::Invalid(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }

    /// Raw bytes up to and including the next `\n` (to check exact framing, such as the
    /// `0xFF` before a `guest-sync-delimited` reply).
    /// Whitespace left over from earlier replies is skipped.
    pub fn read_line_raw(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let blank = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            let _ = self.buf.split_to(blank);
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.split_to(pos + 1).to_vec());
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "agent closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}
