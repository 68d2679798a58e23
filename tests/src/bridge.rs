//! The `qga-bridge` binary as a test process, and clients for its two APIs.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use jsonrpsee::{
    core::{ClientError, client::ClientT, params::ObjectParams},
    http_client::{HttpClient, HttpClientBuilder},
};
use qga_proto::v1::{guest_agent_client::GuestAgentClient, guest_memory_client::GuestMemoryClient};
use serde_json::Value;
use tonic::transport::Channel;

/// A running bridge binary; killed on drop.
pub struct BridgeProcess {
    child: Child,
    /// `http://127.0.0.1:PORT` of the gRPC server.
    pub grpc: String,
    /// `http://127.0.0.1:PORT` of the JSON-RPC server.
    pub jsonrpc: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl BridgeProcess {
    /// Starts `qga-bridge --vm NAME=SOCKET ...` on free ports and waits until it serves.
    pub async fn start(vms: &[(&str, &Path)]) -> anyhow::Result<Self> {
        let (g, j) = (free_port()?, free_port()?);
        let mut cmd = Command::new(qga_testkit::bin_path("qga-bridge"));
        cmd.arg("--grpc-addr").arg(format!("127.0.0.1:{g}"));
        cmd.arg("--jsonrpc-addr").arg(format!("127.0.0.1:{j}"));
        for (name, sock) in vms {
            cmd.arg("--vm").arg(format!("{name}={}", sock.display()));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qga-bridge")?;
        let bridge = Self {
            child,
            grpc: format!("http://127.0.0.1:{g}"),
            jsonrpc: format!("http://127.0.0.1:{j}"),
        };
        let http = bridge.clients().await?.http;
        let deadline = Instant::now() + Duration::from_secs(20);
        while http
            .request::<Value, _>("vm-list", ObjectParams::new())
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("bridge did not start serving");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(bridge)
    }

    /// Clients of this bridge.
    pub async fn clients(&self) -> anyhow::Result<Clients> {
        Clients::connect(&self.grpc, &self.jsonrpc).await
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// gRPC and JSON-RPC clients of one bridge.
#[derive(Clone)]
pub struct Clients {
    /// GuestMemory service.
    pub memory: GuestMemoryClient<Channel>,
    /// GuestAgent service.
    pub agent: GuestAgentClient<Channel>,
    /// JSON-RPC over HTTP.
    pub http: HttpClient,
}

impl Clients {
    /// Connects to a bridge (gRPC lazily, so a bridge still starting is fine).
    pub async fn connect(grpc: &str, jsonrpc: &str) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(grpc.to_string())?.connect_lazy();
        Ok(Self {
            memory: GuestMemoryClient::new(channel.clone()),
            agent: GuestAgentClient::new(channel),
            http: HttpClientBuilder::default()
                .request_timeout(Duration::from_secs(180))
                .build(jsonrpc)?,
        })
    }

    /// A JSON-RPC call with named params; errors carry the JSON-RPC code.
    pub async fn rpc(&self, method: &str, params: Value) -> Result<Value, (i32, String)> {
        let mut p = ObjectParams::new();
        if let Value::Object(map) = params {
            for (k, v) in map {
                p.insert(&k, v).map_err(|e| (0, e.to_string()))?;
            }
        }
        match self.http.request::<Value, _>(method, p).await {
            Ok(v) => Ok(v),
            Err(ClientError::Call(e)) => Err((e.code(), e.message().to_string())),
            Err(e) => Err((0, e.to_string())),
        }
    }
}
