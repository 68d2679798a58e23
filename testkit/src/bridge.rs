//! The `qga-bridge` binary as a child process on free loopback ports.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::bin_path;

/// A running `qga-bridge`; killed on drop.
#[derive(Debug)]
pub struct BridgeProcess {
    child: Child,
    grpc: SocketAddr,
    jsonrpc: SocketAddr,
    _dir: TempDir,
}

fn free_addr() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// How long a bridge may take to serve after it was started: a bound for a loaded machine,
/// not a timing.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// POSTs `vm-list` and reports whether the bridge answered with HTTP 200.
fn answers(addr: SocketAddr) -> bool {
    let body = r#"{"jsonrpc":"2.0","id":0,"method":"vm-list"}"#;
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.1 200")
}

impl BridgeProcess {
    /// Starts the bridge with `config` (TOML without listen addresses, e.g. `[vms]` and
    /// limits) and extra flags, then waits until its JSON-RPC port answers.
    pub fn start(config: &str, args: &[&str]) -> io::Result<Self> {
        Self::spawn(config, args, &[], answers)
    }

    /// Like [`BridgeProcess::start`], with more environment variables (a test hook, say).
    pub fn start_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> io::Result<Self> {
        Self::spawn(config, args, env, answers)
    }

    /// Like [`BridgeProcess::start`], for a bridge serving TLS: waits only until its
    /// JSON-RPC port accepts connections.
    pub fn start_tls(config: &str, args: &[&str]) -> io::Result<Self> {
        Self::spawn(config, args, &[], |addr| TcpStream::connect(addr).is_ok())
    }

    /// Starts the bridge on two free ports. A port is free when it is picked, and the
    /// bridge binds it a moment later: another process can take it first, so a bridge
    /// that exits before it answers is started again on other ports (twice at most; a
    /// bridge that exits for another reason exits again and the last exit is returned).
    fn spawn(
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready: fn(SocketAddr) -> bool,
    ) -> io::Result<Self> {
        let mut attempt = 0;
        loop {
            match Self::spawn_once(config, args, env, ready)? {
                Ok(bridge) => return Ok(bridge),
                Err(status) if attempt < 2 => {
                    attempt += 1;
                    eprintln!("qga-bridge exited before serving ({status}); again on other ports");
                }
                Err(status) => {
                    return Err(io::Error::other(format!("qga-bridge exited: {status}")));
                }
            }
        }
    }

    /// One start: the running bridge, or how it exited before it answered.
    fn spawn_once(
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready: fn(SocketAddr) -> bool,
    ) -> io::Result<Result<Self, std::process::ExitStatus>> {
        let dir = tempfile::Builder::new().prefix("qga-bridge-").tempdir()?;
        let (grpc, jsonrpc) = (free_addr()?, free_addr()?);
        let path = dir.path().join("bridge.toml");
        let state = dir.path().join("state");
        std::fs::write(
            &path,
            format!(
                "grpc_addr = \"{grpc}\"\njsonrpc_addr = \"{jsonrpc}\"\nstate_dir = {:?}\n{config}",
                state.display().to_string()
            ),
        )?;
        let child = Command::new(bin_path("qga-bridge"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env(
                "QGA_BRIDGE_LOG",
                std::env::var("QGA_BRIDGE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut bridge = Self {
            child,
            grpc,
            jsonrpc,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready(jsonrpc) {
            if let Some(status) = bridge.child.try_wait()? {
                return Ok(Err(status));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "qga-bridge did not start serving",
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Ok(bridge))
    }

    /// A `[vms]` TOML table for `(name, socket)` pairs.
    pub fn vms_table<'a>(vms: impl IntoIterator<Item = (&'a str, &'a std::path::Path)>) -> String {
        let mut t = String::from("[vms]\n");
        for (name, socket) in vms {
            t.push_str(&format!("{name:?} = {:?}\n", socket.display().to_string()));
        }
        t
    }

    /// `http://ADDR` of the gRPC server.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// `http://ADDR` of the JSON-RPC server.
    pub fn jsonrpc_url(&self) -> String {
        format!("http://{}", self.jsonrpc)
    }

    /// The bridge's pid (for `/proc` measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
