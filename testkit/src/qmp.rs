//! A scripted QEMU monitor for the bridge's and qgactl's tests: it greets like QEMU,
//! answers each command with what the test's script says, and records every command it
//! was asked. One per unix socket; each connection is served in a task of its own.

use std::{
    future::Future,
    path::Path,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    task::JoinHandle,
};

/// A successful reply carrying `value`.
pub fn ok(value: Value) -> Value {
    json!({ "return": value })
}

/// An error reply of QMP class `class`.
pub fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

/// QEMU's reply to a command it does not have.
pub fn not_found(command: &str) -> Value {
    error(
        "CommandNotFound",
        &format!("The command {command} has not been found"),
    )
}

/// A monitor on a unix socket, answering from a script. Dropping it stops it.
#[derive(Debug)]
pub struct FakeQmp {
    commands: Arc<Mutex<Vec<(String, Value)>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeQmp {
    /// A monitor on `path` (bound now) whose reply to each command is `script(command,
    /// arguments)`: a whole reply object (see [`ok`], [`error`]) without its `id`, which
    /// the monitor copies from the request. `qmp_capabilities` is answered by the script
    /// too. Must be called within a tokio runtime.
    pub fn start<S, F>(path: &Path, script: S) -> std::io::Result<Self>
    where
        S: Fn(String, Value) -> F + Send + Sync + 'static,
        F: Future<Output = Value> + Send + 'static,
    {
        let listener = UnixListener::bind(path)?;
        let commands = Arc::new(Mutex::new(Vec::new()));
        let seen = commands.clone();
        let script = Arc::new(script);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, seen.clone(), script.clone()));
            }
        });
        Ok(Self { commands, task })
    }

    /// How many times `command` was asked.
    pub fn count(&self, command: &str) -> usize {
        self.asked(command).len()
    }

    /// The arguments of every `command` asked, in order.
    pub fn asked(&self, command: &str) -> Vec<Value> {
        self.commands
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(name, _)| name == command)
                    .map(|(_, args)| args.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Serves one connection: the greeting, then one reply per command line.
async fn serve<S, F>(
    stream: tokio::net::UnixStream,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    script: Arc<S>,
) where
    S: Fn(String, Value) -> F + Send + Sync + 'static,
    F: Future<Output = Value> + Send + 'static,
{
    let (read, mut write) = stream.into_split();
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0},
        "package": ""}, "capabilities": []}});
    if write
        .write_all(format!("{greeting}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let command = request["execute"].as_str().unwrap_or_default().to_string();
        let args = request.get("arguments").cloned().unwrap_or(Value::Null);
        if let Ok(mut c) = seen.lock() {
            c.push((command.clone(), args.clone()));
        }
        let mut reply = script(command, args).await;
        reply["id"] = request["id"].clone();
        if write
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}
