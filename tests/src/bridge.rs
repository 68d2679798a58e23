//! The `qga-bridge` binary as a test process, and clients for its two APIs.

use std::{path::Path, time::Duration};

use anyhow::Context;
use jsonrpsee::{
    core::{ClientError, client::ClientT, params::ObjectParams},
    http_client::{HttpClient, HttpClientBuilder},
};
use qga_proto::v1::{guest_agent_client::GuestAgentClient, guest_memory_client::GuestMemoryClient};
use serde_json::Value;
use tonic::transport::Channel;

/// The bridge binary for a guest's QGA socket(s).
#[derive(Debug)]
pub struct BridgeProcess {
    inner: qga_testkit::BridgeProcess,
}

impl BridgeProcess {
    /// Starts `qga-bridge` for `(name, socket)` VMs on free ports; waits until it serves.
    pub async fn start(vms: &[(&str, &Path)]) -> anyhow::Result<Self> {
        let table = qga_testkit::BridgeProcess::vms_table(vms.iter().copied());
        let inner =
            tokio::task::spawn_blocking(move || qga_testkit::BridgeProcess::start(&table, &[]))
                .await?
                .context("starting qga-bridge")?;
        Ok(Self { inner })
    }

    /// Clients of this bridge.
    pub async fn clients(&self) -> anyhow::Result<Clients> {
        Clients::connect(&self.inner.grpc_url(), &self.inner.jsonrpc_url()).await
    }
}

/// gRPC and JSON-RPC clients of one bridge.
#[derive(Debug, Clone)]
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
