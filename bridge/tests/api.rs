//! The API surface beyond single calls: gRPC health and reflection, JSON-RPC batches and
//! WebSocket, `vm-list`/`ListVms` state, the metrics endpoint, and discovery by glob.

mod common;

use std::{net::SocketAddr, ops::ControlFlow, path::Path, time::Duration};

use common::{clients, config, eventually, rpc, start, until_listed};
use jsonrpsee::{
    core::{
        client::ClientT,
        params::{BatchRequestBuilder, ObjectParams},
    },
    rpc_params,
    ws_client::WsClientBuilder,
};
use qga_fake_agent::FakeAgent;
use qga_proto::v1::{AgentState, ListVmsRequest, PingRequest};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("grpc connect")
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let bridge = start(config(&[])).await;
    let ch = channel(bridge.grpc_addr.expect("TCP listener")).await;
    let mut health = HealthClient::new(ch.clone());
    for service in [
        "qga.bridge.v1.GuestMemory",
        "qga.bridge.v1.GuestAgent",
        "qga.bridge.v1.Vms",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(ch);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("reflection reply")
        .expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply: {:?}", reply.message_response);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "qga.bridge.v1.GuestMemory",
        "qga.bridge.v1.GuestAgent",
        "qga.bridge.v1.Vms",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonrpc_batches_and_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _fa = FakeAgent::start(&a, 2).expect("fake a");
    let _fb = FakeAgent::start(&b, 5).expect("fake b");
    let bridge = start(config(&[("a", &a), ("b", &b)])).await;
    let c = clients(&bridge).await;

    // Params go by name; a positional array is invalid params, entry by entry.
    let mut positional = BatchRequestBuilder::new();
    for vm in ["a", "b"] {
        positional
            .insert("guest-ping", rpc_params![json!({"vm": vm})])
            .expect("entry");
    }
    let rejected = c
        .http
        .batch_request::<Value>(positional)
        .await
        .expect("positional batch");
    assert!(
        rejected
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.code() == -32602)),
        "positional params are invalid params"
    );

    // One HTTP batch over two VMs, with one bad entry: each answer in its own slot.
    let mut named = BatchRequestBuilder::new();
    for (method, vm) in [
        ("guest-get-memory-blocks", "a"),
        ("guest-get-memory-blocks", "b"),
        ("guest-ping", "nope"),
        ("guest-get-memory-block-info", "b"),
    ] {
        let mut p = ObjectParams::new();
        p.insert("vm", vm).expect("param");
        named.insert(method, p).expect("entry");
    }
    let replies = c.http.batch_request::<Value>(named).await.expect("batch");
    let got: Vec<Result<Value, i32>> = replies
        .into_iter()
        .map(|r| r.map_err(|e| e.code()))
        .collect();
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[0].as_ref().map(|v| v.as_array().map(Vec::len)),
        Ok(Some(2))
    );
    assert_eq!(
        got[1].as_ref().map(|v| v.as_array().map(Vec::len)),
        Ok(Some(5))
    );
    assert_eq!(got[2], Err(-32001));
    assert_eq!(got[3], Ok(json!({"size": 134217728})));

    // WebSocket on the same port.
    let ws = WsClientBuilder::default()
        .build(format!(
            "ws://{}",
            bridge.jsonrpc_addr.expect("TCP listener")
        ))
        .await
        .expect("ws connect");
    let mut p = ObjectParams::new();
    p.insert("vm", "b").expect("param");
    let blocks: Value = ws
        .request("guest-get-memory-blocks", p)
        .await
        .expect("ws call");
    assert_eq!(blocks.as_array().map(Vec::len), Some(5));
    let mut p = ObjectParams::new();
    p.insert("vm", "a").expect("param");
    let pong: Value = ws.request("guest-ping", p).await.expect("ws ping");
    assert_eq!(pong, json!({}));
    bridge.shutdown().await;
}

/// `GET /metrics` over a raw TCP stream.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn vm_state_and_metrics_follow_the_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let _agent = FakeAgent::start(&path, 3).expect("fake agent");
    let mut cfg = config(&[("vm", &path)]);
    cfg.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let bridge = start(cfg).await;
    let mut c = clients(&bridge).await;

    let before = c
        .vms
        .list_vms(ListVmsRequest {})
        .await
        .expect("list")
        .into_inner()
        .vms;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].state(), AgentState::Disconnected, "lazy connect");
    assert!(before[0].last_contact.is_none());

    c.agent
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("ping");
    let after = c
        .vms
        .list_vms(ListVmsRequest {})
        .await
        .expect("list")
        .into_inner()
        .vms;
    assert_eq!(after[0].state(), AgentState::Connected);
    assert!(after[0].last_contact.is_some());
    assert_eq!(after[0].socket, path.display().to_string());

    let listed = rpc(&c.http, "vm-list", json!({})).await.expect("vm-list");
    assert_eq!(listed[0]["name"], "vm");
    assert_eq!(listed[0]["state"], "connected");
    assert!(listed[0]["last-contact"].is_f64());

    let text = scrape(bridge.metrics_addr.expect("metrics bound")).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for want in [
        "qga_bridge_calls_total{vm=\"vm\",method=\"guest-ping\",outcome=\"ok\"} 1",
        "qga_bridge_agent_connected{vm=\"vm\"} 1",
        "qga_bridge_resyncs_total{vm=\"vm\"} 1",
        "qga_bridge_call_duration_seconds_count{method=\"guest-ping\"} 1",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
    bridge.shutdown().await;
}

fn domain(root: &Path, dir: &str) -> std::path::PathBuf {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).expect("mkdir");
    d.join("org.qemu.guest_agent.0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_vms_appear_and_go() {
    let root = tempfile::tempdir().expect("tempdir");
    let alpha = FakeAgent::start(&domain(root.path(), "domain-1-alpha"), 2).expect("alpha");
    let mut cfg = config(&[]);
    cfg.discover = vec![format!(
        "{}/domain-*/org.qemu.guest_agent.0",
        root.path().display()
    )];
    cfg.discover_interval = Duration::from_millis(20);
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;

    until_listed(&c.http, |n| n == ["alpha"]).await;
    let blocks = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "alpha"}))
        .await
        .expect("discovered VM answers");
    assert_eq!(blocks.as_array().map(Vec::len), Some(2));

    // A second domain starts; the first one goes (its socket is removed).
    let _beta = FakeAgent::start(&domain(root.path(), "domain-7-beta"), 3).expect("beta");
    until_listed(&c.http, |n| n == ["alpha", "beta"]).await;
    drop(alpha);
    until_listed(&c.http, |n| n == ["beta"]).await;
    let gone = rpc(&c.http, "guest-ping", json!({"vm": "alpha"}))
        .await
        .expect_err("alpha is gone");
    assert_eq!(gone.0, -32001);
    let blocks = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "beta"}))
        .await
        .expect("beta answers");
    assert_eq!(blocks.as_array().map(Vec::len), Some(3));
    // The departed VM's metric series go with it (once its session has wound down).
    eventually("alpha's metric series gone", || async {
        let text = bridge.metrics().encode();
        if text.contains("vm=\"alpha\"") {
            ControlFlow::Continue(text)
        } else {
            ControlFlow::Break(())
        }
    })
    .await;
    assert!(bridge.metrics().encode().contains("vm=\"beta\""));
    bridge.shutdown().await;
}
