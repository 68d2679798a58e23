//! Shared test scaffolding: an in-process bridge on ephemeral ports and its clients.

#![allow(dead_code)]

use std::{
    fmt::Display,
    future::Future,
    net::SocketAddr,
    ops::ControlFlow,
    path::Path,
    time::{Duration, Instant},
};

use jsonrpsee::{
    core::{ClientError, client::ClientT, params::ObjectParams},
    http_client::{HttpClient, HttpClientBuilder},
};
use qga_bridge::{
    Bridge, Config,
    config::{Listen, VmConfig},
};
use qga_proto::v1::{
    guest_agent_client::GuestAgentClient, guest_memory_client::GuestMemoryClient,
    vms_client::VmsClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// The bound for anything that must happen "soon": far above what an idle machine needs,
/// so that only a failure reaches it on a loaded one. Never a measured timing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `probe` every 20 ms until it breaks with a value, within [`PATIENCE`]; fails with
/// `what` and the last state it continued with.
pub async fn eventually<T, S, F, Fut>(what: &str, mut probe: F) -> T
where
    S: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = ControlFlow<T, S>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match probe().await {
            ControlFlow::Break(v) => return v,
            ControlFlow::Continue(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {PATIENCE:?}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The audit file's lines (each must be JSON) once `enough` holds for them: the trail is
/// written by a thread of its own, after the call has been answered. A line still being
/// written (no newline yet) is not looked at.
pub async fn audit_lines(path: &Path, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    eventually("audit lines", || async {
        let mut text = std::fs::read_to_string(path).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |end| end + 1));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
            .collect();
        if enough(&lines) {
            ControlFlow::Break(lines)
        } else {
            ControlFlow::Continue(text)
        }
    })
    .await
}

/// A TCP port on 127.0.0.1 free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A state directory of this test's own, under Cargo's scratch directory for tests (so
/// removed with `target`): two bridges of one test share it only when given the same.
pub fn state_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("state-{}-{n}", std::process::id()));
    // A directory left by an earlier process of the same pid is not ours.
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A bridge on free ports serving `vms`, its background poll of the guests' memory
/// signals off: a poll's agent call would take a fault a test scripted for its own call
/// (tests of the poll turn it on).
pub fn config(vms: &[(&str, &Path)]) -> Config {
    let mut c = Config {
        grpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
        jsonrpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
        state_dir: state_dir(),
        ..Config::default()
    };
    c.signals.poll_interval_ms = 0;
    for (name, path) in vms {
        c.vms
            .insert(name.to_string(), VmConfig::agent(path.to_path_buf()));
    }
    c
}

pub async fn start(config: Config) -> Bridge {
    Bridge::start(config).await.expect("bridge starts")
}

pub struct Clients {
    pub memory: GuestMemoryClient<Channel>,
    pub agent: GuestAgentClient<Channel>,
    pub vms: VmsClient<Channel>,
    pub http: HttpClient,
}

pub async fn clients(b: &Bridge) -> Clients {
    let channel = Channel::from_shared(format!("http://{}", b.grpc_addr.expect("TCP listener")))
        .expect("uri")
        .connect()
        .await
        .expect("grpc connect");
    Clients {
        memory: GuestMemoryClient::new(channel.clone()),
        agent: GuestAgentClient::new(channel.clone()),
        vms: VmsClient::new(channel),
        http: HttpClientBuilder::default()
            .request_timeout(Duration::from_secs(60))
            .build(format!("http://{}", b.jsonrpc_addr.expect("TCP listener")))
            .expect("http client"),
    }
}

/// A gRPC request with a deadline.
pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// A JSON-RPC call with named params; `Err` carries the error code (0: transport) and data.
pub async fn rpc(
    http: &HttpClient,
    method: &str,
    params: Value,
) -> Result<Value, (i32, String, Option<Value>)> {
    let mut p = ObjectParams::new();
    if let Value::Object(map) = params {
        for (k, v) in map {
            p.insert(&k, v).expect("param");
        }
    }
    match http.request::<Value, _>(method, p).await {
        Ok(v) => Ok(v),
        Err(ClientError::Call(e)) => Err((
            e.code(),
            e.message().to_string(),
            e.data().and_then(|d| serde_json::from_str(d.get()).ok()),
        )),
        // Transport failures (e.g. not listening yet) as code 0.
        Err(other) => Err((0, other.to_string(), None)),
    }
}

/// Polls `vm-list` until `pred` holds for the names, within [`PATIENCE`].
pub async fn until_listed(http: &HttpClient, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
    eventually("discovery gets there", || async {
        let names: Vec<String> = rpc(http, "vm-list", json!({}))
            .await
            .expect("vm-list")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if pred(&names) {
            ControlFlow::Break(names)
        } else {
            ControlFlow::Continue(format!("{names:?}"))
        }
    })
    .await
}

/// Another client of an agent socket, as an operator would be: `socat` sending
/// `guest-ping`. Returns how long until the agent answered, or why it did not within
/// `wait` (a socket held by someone else accepts the connection but serves nobody).
#[allow(dead_code)]
pub async fn socat_ping(socket: &Path, wait: Duration) -> Result<Duration, String> {
    use std::io::{BufRead, BufReader, Write};
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        let mut socat = std::process::Command::new("socat")
            .arg("-")
            .arg(format!("UNIX-CONNECT:{}", socket.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("socat (Debian package socat): {e}"))?;
        let (Some(mut stdin), Some(stdout)) = (socat.stdin.take(), socat.stdout.take()) else {
            return Err("socat's pipes".to_string());
        };
        stdin
            .write_all(b"{\"execute\":\"guest-ping\"}\n")
            .map_err(|e| e.to_string())?;
        // The answer line, read on a thread so that the wait can be bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let answer = rx.recv_timeout(wait);
        let _ = socat.kill();
        let _ = socat.wait();
        match answer {
            Ok(Ok(line)) if line.contains("\"return\"") => Ok(start.elapsed()),
            Ok(Ok(line)) => Err(format!("socat got '{}'", line.trim())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer to socat within {wait:?}")),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}
