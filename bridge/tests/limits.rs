//! Transport limits: each is hit on purpose, the caller sees the documented answer, the
//! guest is never asked, and the bridge serves normally afterwards.

mod common;

use std::{ops::ControlFlow, path::PathBuf, time::Duration};

use common::{clients, config, eventually, rpc, start};
use jsonrpsee::{core::client::ClientT, ws_client::WsClientBuilder};
use qga_bridge::{Config, config::VmConfig};
use qga_fake_agent::{FakeAgent, Fault};
use qga_proto::v1::{
    MemoryBlockChange, PingRequest, SetMemoryBlocksRequest, guest_agent_client::GuestAgentClient,
    guest_memory_client::GuestMemoryClient,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, transport::Channel};

/// Generous bound for anything that must happen "soon"; never a measured timing.
const SOON: Duration = common::PATIENCE;

async fn setup(
    tweak: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, FakeAgent, qga_bridge::Bridge) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &path)]);
    tweak(&mut cfg);
    let bridge = start(cfg).await;
    (dir, agent, bridge)
}

/// POSTs `body` on a fresh connection and returns the status line and the body.
async fn post(addr: std::net::SocketAddr, body: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(body.as_bytes()).await.expect("write body");
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out))
        .await
        .expect("answered")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// Reads until the peer closes; `true` if it did within [`SOON`].
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(SOON, read).await.is_ok()
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_whole_and_the_guest_is_never_asked() {
    let (_d, agent, bridge) = setup(|_| {}).await;
    let batch = |n: usize| {
        let calls: Vec<Value> = (0..n)
            .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "guest-get-memory-blocks", "params": {"vm": "vm"}}))
            .collect();
        Value::Array(calls).to_string()
    };

    let (status, body) = post(bridge.jsonrpc_addr.expect("TCP listener"), &batch(1000)).await;
    assert!(status.contains("200"), "{status}");
    let reply: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(reply["error"]["code"], -32010, "{reply}");
    assert_eq!(
        reply["error"]["data"], "Exceeded max limit of 32",
        "{reply}"
    );
    assert_eq!(agent.control().calls("guest-get-memory-blocks"), 0);

    // At the limit, every member is answered.
    let (_, body) = post(bridge.jsonrpc_addr.expect("TCP listener"), &batch(32)).await;
    let replies: Vec<Value> = serde_json::from_str(&body).expect("json array");
    assert_eq!(replies.len(), 32);
    assert!(replies.iter().all(|r| r["result"].is_array()), "{body}");
}

#[tokio::test]
async fn jsonrpc_sockets_over_the_cap_get_503_until_one_closes() {
    let (_d, _agent, bridge) = setup(|c| c.limits.jsonrpc_max_connections = 2).await;
    // Two idle sockets hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            TcpStream::connect(bridge.jsonrpc_addr.expect("TCP listener"))
                .await
                .expect("connect"),
        );
    }
    // Let the bridge accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "guest-ping", "params": {"vm": "vm"}});
    let (status, body) = post(
        bridge.jsonrpc_addr.expect("TCP listener"),
        &ping.to_string(),
    )
    .await;
    assert!(status.contains("503"), "{status}");
    assert!(
        body.contains("too many connections") && body.contains("limit 2"),
        "{body}"
    );
    let metrics = bridge.metrics().encode();
    assert!(
        metrics.contains(r#"qga_bridge_refused_total{server="jsonrpc",reason="connections"}"#),
        "{metrics}"
    );

    drop(held.pop());
    let answered = async {
        loop {
            let (status, body) = post(
                bridge.jsonrpc_addr.expect("TCP listener"),
                &ping.to_string(),
            )
            .await;
            if status.contains("200") {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let body = tokio::time::timeout(SOON, answered)
        .await
        .expect("a slot frees");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["result"],
        json!({})
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_header_is_cut_off_on_every_http_server() {
    let (_d, _agent, bridge) = setup(|c| {
        c.limits.header_read_timeout_ms = 300;
        c.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let metrics_addr = bridge.metrics_addr.expect("metrics listening");
    for addr in [bridge.jsonrpc_addr.expect("TCP listener"), metrics_addr] {
        // Silent from the start.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        // A header begun and never finished (slowloris).
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"POST / HTTP/1.1\r\nHost: b\r\n")
            .await
            .expect("write");
        assert!(
            closed_by_peer(&mut silent).await,
            "{addr}: silent socket kept open"
        );
        assert!(
            closed_by_peer(&mut slow).await,
            "{addr}: half header kept open"
        );
    }
    // Whole requests are served as before.
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "guest-ping", "params": {"vm": "vm"}});
    let (status, _) = post(
        bridge.jsonrpc_addr.expect("TCP listener"),
        &ping.to_string(),
    )
    .await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test]
async fn a_websocket_gets_only_its_share_of_calls_in_flight() {
    let (_d, agent, bridge) = setup(|c| c.limits.jsonrpc_max_connection_calls = 2).await;
    // Sets are never coalesced: each holds its slot until the guest answers.
    agent
        .control()
        .push(Fault::Delay(Duration::from_millis(1500)));
    let ws = WsClientBuilder::default()
        .request_timeout(SOON)
        .build(format!(
            "ws://{}",
            bridge.jsonrpc_addr.expect("TCP listener")
        ))
        .await
        .expect("ws connect");
    let set = |i: u64| {
        let mut p = jsonrpsee::core::params::ObjectParams::new();
        p.insert("vm", "vm").expect("param");
        p.insert("mem-blks", json!([{"phys-index": i, "online": true}]))
            .expect("param");
        p
    };
    let calls = (0..4).map(|i| ws.request::<Value, _>("guest-set-memory-blocks", set(i)));
    let outcomes = futures::future::join_all(calls).await;
    let refused: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Err(jsonrpsee::core::ClientError::Call(e)) => Some((e.code(), e.message().to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 2, "{outcomes:?}");
    for (code, message) in &refused {
        assert_eq!(*code, -32004);
        assert!(message.contains("on this connection"), "{message}");
    }
    assert_eq!(agent.control().calls("guest-set-memory-blocks"), 2);
    // Another connection is not affected by this one's limit.
    let other = clients(&bridge).await;
    assert_eq!(
        rpc(&other.http, "guest-ping", json!({"vm": "vm"})).await,
        Ok(json!({}))
    );
    // Nor is this one once its calls are done.
    let mut vm = jsonrpsee::core::params::ObjectParams::new();
    vm.insert("vm", "vm").expect("param");
    let again: Value = ws.request("guest-ping", vm).await.expect("ping after");
    assert_eq!(again, json!({}));
}

#[tokio::test]
async fn calls_over_the_bridge_wide_limit_are_refused_at_once() {
    // Two VMs, so that both calls in flight can be seen at their guests.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_path = other_dir.path().join("vm2.sock");
    let other = FakeAgent::start(&other_path, 4).expect("fake agent");
    let (_d, agent, bridge) = setup(|c| {
        c.limits.max_in_flight = 2;
        c.vms
            .insert("vm2".into(), VmConfig::agent(other_path.clone()));
    })
    .await;
    // Long enough for the two refusals below to come while both calls are at their guests.
    for guest in [&agent, &other] {
        guest.control().push(Fault::Delay(Duration::from_secs(5)));
    }
    let c = clients(&bridge).await;
    let set = |vm: &str| SetMemoryBlocksRequest {
        vm: vm.into(),
        blocks: vec![MemoryBlockChange {
            phys_index: 0,
            online: true,
        }],
    };
    let mut first = c.memory.clone();
    let mut second = c.memory.clone();
    let a = tokio::spawn(async move { first.set_memory_blocks(set("vm")).await });
    let b = tokio::spawn(async move { second.set_memory_blocks(set("vm2")).await });
    // Both are in flight (each at its guest) before the third.
    eventually("both sets at their guests", || async {
        let at = [&agent, &other].map(|g| g.control().calls("guest-set-memory-blocks"));
        if at == [1, 1] || a.is_finished() || b.is_finished() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("sets at the guests: {at:?}"))
        }
    })
    .await;
    let err = c
        .agent
        .clone()
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("bridge-wide"), "{err}");
    let err = rpc(&c.http, "guest-ping", json!({"vm": "vm"}))
        .await
        .expect_err("over the limit");
    assert_eq!(err.0, -32004, "{err:?}");
    assert!(a.await.expect("joins").is_ok() && b.await.expect("joins").is_ok());
    assert_eq!(agent.control().calls("guest-ping"), 0);
    c.agent
        .clone()
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("served once the others are done");
}

#[tokio::test]
async fn grpc_connections_over_the_cap_are_closed_and_the_first_keeps_working() {
    let (_d, _agent, bridge) = setup(|c| c.limits.grpc_max_connections = 1).await;
    let url = format!("http://{}", bridge.grpc_addr.expect("TCP listener"));
    let first = Channel::from_shared(url.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut first = GuestAgentClient::new(first);
    first
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("first connection served");

    let second = Channel::from_shared(url)
        .expect("uri")
        .connect_timeout(SOON);
    match second.connect().await {
        Err(_) => {}
        Ok(channel) => {
            let answer = GuestMemoryClient::new(channel)
                .get_memory_blocks(qga_proto::v1::GetMemoryBlocksRequest { vm: "vm".into() })
                .await;
            assert!(
                answer.is_err(),
                "a second connection was served: {answer:?}"
            );
        }
    }
    first
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("first still served");
    assert!(
        bridge
            .metrics()
            .encode()
            .contains(r#"qga_bridge_refused_total{server="grpc",reason="connections"}"#)
    );
}
