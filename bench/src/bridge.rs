//! Bridge overhead: the same agent call through gRPC, through JSON-RPC, and straight to
//! the agent's socket.

use std::time::{Duration, Instant};

use anyhow::Context;
use jsonrpsee::{
    core::{client::ClientT, params::ObjectParams},
    http_client::{HttpClient, HttpClientBuilder},
};
use qga_proto::v1::{
    GetMemoryBlockInfoRequest, ListVmsRequest, PingRequest, guest_agent_client::GuestAgentClient,
    guest_memory_client::GuestMemoryClient, vms_client::VmsClient,
};
use qga_testkit::{AgentKind, AgentProcess, BridgeProcess, FakeSysfs, QgaClient};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{
    report::Report,
    stats::{Samples, ratio},
};

/// The release bridge with clients for both APIs.
pub struct Bridge {
    /// The process.
    pub process: BridgeProcess,
}

impl Bridge {
    /// Starts the bridge with a config body (VMs, limits); ports are chosen here.
    pub fn start(config: &str) -> anyhow::Result<Self> {
        Ok(Self {
            process: BridgeProcess::start(config, &[]).context("starting qga-bridge")?,
        })
    }

    /// The bridge's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The JSON-RPC endpoint.
    pub fn jsonrpc(&self) -> String {
        self.process.jsonrpc_url()
    }

    /// A JSON-RPC client.
    pub fn http(&self) -> anyhow::Result<HttpClient> {
        Ok(HttpClientBuilder::default()
            .request_timeout(Duration::from_secs(60))
            .build(self.jsonrpc())?)
    }

    /// A gRPC channel (one HTTP/2 connection).
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.process.grpc_url())?
            .connect()
            .await?)
    }

    /// `n` gRPC channels, each its own HTTP/2 connection.
    pub async fn channels(&self, n: usize) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::new();
        for _ in 0..n {
            channels.push(self.channel().await?);
        }
        Ok(channels)
    }
}

pub fn vm_params(vm: &str) -> ObjectParams {
    let mut p = ObjectParams::new();
    let _ = p.insert("vm", vm);
    p
}

/// The section.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let runs = if quick { 300 } else { 3000 };
    intro(report, runs);
    let tree = FakeSysfs::with_blocks(64, "online");
    // An agent serves one client at a time (like qemu-ga), so the direct client gets its own
    // agent process on the same tree.
    let agent = AgentProcess::start(AgentKind::Ours, &tree, &[])?;
    let direct_agent = AgentProcess::start(AgentKind::Ours, &tree, &[])?;
    let bridge = Bridge::start(&BridgeProcess::vms_table([("vm", agent.socket())]))?;
    let channel = bridge.channel().await?;
    let mut clients = Clients {
        grpc_agent: GuestAgentClient::new(channel.clone()),
        grpc_memory: GuestMemoryClient::new(channel),
        http: bridge.http()?,
        direct: direct_agent.client()?,
    };

    report.table(&[
        "call",
        "direct socket p50 / p99",
        "gRPC p50 / p99",
        "JSON-RPC p50 / p99",
        "gRPC / direct (p50)",
        "JSON-RPC / direct (p50)",
    ]);
    for (name, qga) in [
        ("Ping / guest-ping", "guest-ping"),
        (
            "GetMemoryBlockInfo / guest-get-memory-block-info",
            "guest-get-memory-block-info",
        ),
    ] {
        let s = clients.agent_call(qga, runs).await?;
        report.row(&[
            name.to_string(),
            s[0].p50_p99(),
            s[1].p50_p99(),
            s[2].p50_p99(),
            ratio(s[1].p50(), s[0].p50()),
            ratio(s[2].p50(), s[0].p50()),
        ]);
    }
    let floor = floor(&bridge, &clients.http, runs).await?;
    report.row(&[
        "ListVms / vm-list (answered by the bridge, no agent call)".into(),
        "-".into(),
        floor[0].p50_p99(),
        floor[1].p50_p99(),
        "-".into(),
        "-".into(),
    ]);
    report.end_table();
    Ok(())
}

/// The section's heading and how it measures.
fn intro(report: &mut Report, runs: usize) {
    report.heading("Bridge overhead");
    report.para(&format!(
        "`qga-agent` (release) on a 64-block fake tree behind the release `qga-bridge`. Three clients \
         in one process take turns, one call each per round, {runs} rounds, sequential (no concurrency, \
         so no coalescing): a tonic gRPC client, a jsonrpsee HTTP client (keep-alive), and a blocking \
         client on an agent's own unix socket (a second `qga-agent` on the same tree, since an agent \
         serves one client at a time). Latency is the client's round trip."
    ));
}

/// The three clients that take turns: gRPC and JSON-RPC through the bridge, and one on
/// an agent's own socket.
struct Clients {
    grpc_agent: GuestAgentClient<Channel>,
    grpc_memory: GuestMemoryClient<Channel>,
    http: HttpClient,
    direct: QgaClient,
}

impl Clients {
    /// Round trips of QGA command `qga` (`guest-ping` or `guest-get-memory-block-info`)
    /// on each client in turn, `runs` rounds after 50 unrecorded warm-up rounds: direct,
    /// gRPC, JSON-RPC.
    async fn agent_call(&mut self, qga: &str, runs: usize) -> anyhow::Result<[Samples; 3]> {
        let mut s = [
            Samples::with_capacity(runs),
            Samples::with_capacity(runs),
            Samples::with_capacity(runs),
        ];
        let req = json!({"execute": qga});
        for i in 0..runs + 50 {
            let warm = i < 50;
            let t = Instant::now();
            let r = self.direct.request(&req)?;
            let d0 = t.elapsed();
            anyhow::ensure!(r.get("return").is_some(), "direct call failed: {r}");
            let t = Instant::now();
            if qga == "guest-ping" {
                self.grpc_agent
                    .ping(PingRequest { vm: "vm".into() })
                    .await?;
            } else {
                self.grpc_memory
                    .get_memory_block_info(GetMemoryBlockInfoRequest { vm: "vm".into() })
                    .await?;
            }
            let d1 = t.elapsed();
            let t = Instant::now();
            self.http.request::<Value, _>(qga, vm_params("vm")).await?;
            let d2 = t.elapsed();
            if !warm {
                s[0].push(d0);
                s[1].push(d1);
                s[2].push(d2);
            }
        }
        Ok(s)
    }
}

/// The floor: round trips of a call the bridge answers itself, without the agent, on a
/// new gRPC connection and on `http`, `runs` rounds after 50 unrecorded ones.
async fn floor(bridge: &Bridge, http: &HttpClient, runs: usize) -> anyhow::Result<[Samples; 2]> {
    let mut vms = VmsClient::new(bridge.channel().await?);
    let mut floor = [Samples::with_capacity(runs), Samples::with_capacity(runs)];
    for i in 0..runs + 50 {
        let t = Instant::now();
        vms.list_vms(ListVmsRequest {}).await?;
        let d1 = t.elapsed();
        let t = Instant::now();
        http.request::<Value, _>("vm-list", ObjectParams::new())
            .await?;
        let d2 = t.elapsed();
        if i >= 50 {
            floor[0].push(d1);
            floor[1].push(d2);
        }
    }
    Ok(floor)
}
