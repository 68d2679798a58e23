//! A minimal QMP client: one command at a time, events collected on the side.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts) and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to QMP {}", path.display()));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command`; returns its `return` value or fails with QEMU's error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        writeln!(self.writer, "{msg}")?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command} failed: {e}");
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// `object-add` of a RAM backend `mem-<id>` of `bytes`, then `device_add` of pc-dimm
    /// `id` on it.
    pub fn plug_dimm(&mut self, id: &str, bytes: u64) -> anyhow::Result<()> {
        let backend = format!("mem-{id}");
        self.execute(
            "object-add",
            Some(json!({"qom-type": "memory-backend-ram", "id": backend, "size": bytes})),
        )?;
        self.execute(
            "device_add",
            Some(json!({"driver": "pc-dimm", "id": id, "memdev": backend})),
        )?;
        Ok(())
    }

    /// Waits for event `name` (already received ones count), up to `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(pos));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {name} event within {timeout:?}");
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let v = self.read();
            self.reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(30)))?;
            match v {
                Ok(v) if v.get("event").is_some() => self.events.push(v),
                Ok(_) => {}
                Err(e) => {
                    if Instant::now() >= deadline {
                        bail!("no {name} event within {timeout:?}: {e}");
                    }
                }
            }
        }
    }
}
