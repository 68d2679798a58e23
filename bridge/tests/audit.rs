//! The audit trail: one JSON line per state-changing call, with who, what and the
//! outcome, and one per refused request; reads are not audited.

mod common;

use std::{ops::ControlFlow, path::Path, time::Duration};

use common::{audit_lines, clients, config, eventually, rpc, start};
use qga_fake_agent::{FakeAgent, Fault};
use qga_proto::v1::{MemoryBlockChange, PingRequest, SetMemoryBlocksRequest};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The audit file's lines once there are `n` of them.
async fn lines(path: &Path, n: usize) -> Vec<Value> {
    audit_lines(path, |l| l.len() >= n).await
}

fn set(vm: &str, blocks: &[(u64, bool)]) -> SetMemoryBlocksRequest {
    SetMemoryBlocksRequest {
        vm: vm.into(),
        blocks: blocks
            .iter()
            .map(|&(phys_index, online)| MemoryBlockChange { phys_index, online })
            .collect(),
    }
}

#[tokio::test]
async fn every_write_and_denial_is_one_line_and_reads_are_not_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let log = dir.path().join("audit.jsonl");
    let agent = FakeAgent::start(&socket, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &socket)]);
    cfg.audit_log = Some(log.clone());
    let bridge = start(cfg).await;
    let mut c = clients(&bridge).await;

    c.agent
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("ping");
    c.memory
        .set_memory_blocks(set("vm", &[(1, true), (2, false)]))
        .await
        .expect("set");
    rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "mem-blks": [{"phys-index": 3, "online": true}]}),
    )
    .await
    .expect("set");
    let err = c
        .memory
        .set_memory_blocks(set("nope", &[(1, true)]))
        .await
        .expect_err("no VM");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A caller that leaves while the guest works: it goes once the guest has its set (the
    // guest's answer is far off, and nothing here waits for it).
    agent.control().push(Fault::Delay(Duration::from_secs(60)));
    let mut leaving = c.memory.clone();
    let gone =
        tokio::spawn(async move { leaving.set_memory_blocks(set("vm", &[(0, false)])).await });
    eventually("the guest has the leaving caller's set", || async {
        // Answered already (it cannot be, the guest is slow): the audit checks below say how.
        match agent.control().calls("guest-set-memory-blocks") {
            n if n >= 3 || gone.is_finished() => ControlFlow::Break(()),
            n => ControlFlow::Continue(format!("{n} sets at the guest")),
        }
    })
    .await;
    gone.abort();
    // A forged Host.
    let mut s = TcpStream::connect(bridge.jsonrpc_addr.expect("TCP listener"))
        .await
        .expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");

    let lines = lines(&log, 5).await;
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let grpc = &lines[0];
    assert_eq!(grpc["kind"], "call");
    assert_eq!(grpc["transport"], "grpc");
    assert!(
        grpc["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{grpc}"
    );
    assert_eq!(grpc["vm"], "vm");
    assert_eq!(grpc["method"], "guest-set-memory-blocks");
    assert_eq!(
        grpc["arguments"],
        json!({"mem-blks": [{"phys-index": 1, "online": true}, {"phys-index": 2, "online": false}]})
    );
    assert_eq!(grpc["outcome"], "ok");
    assert_eq!(
        grpc["results"],
        json!([{"phys-index": 1, "response": "success"}, {"phys-index": 2, "response": "success"}])
    );
    assert!(grpc["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
    assert!(grpc["time"].as_f64().is_some_and(|t| t > 1.7e9));

    let jsonrpc = &lines[1];
    assert_eq!(jsonrpc["transport"], "jsonrpc");
    assert!(
        jsonrpc["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{jsonrpc}"
    );
    assert_eq!(
        jsonrpc["results"],
        json!([{"phys-index": 3, "response": "success"}])
    );

    assert_eq!(lines[2]["vm"], "nope");
    assert_eq!(lines[2]["outcome"], "vm_not_found");
    assert!(
        lines[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown VM"))
    );

    // The last two in either order: the aborted call is audited when the server notices.
    let left = lines[3..]
        .iter()
        .find(|l| l["outcome"] == "caller_left")
        .expect("the departed caller's set is audited");
    assert_eq!(
        left["arguments"],
        json!({"mem-blks": [{"phys-index": 0, "online": false}]})
    );
    let denied = lines[3..]
        .iter()
        .find(|l| l["kind"] == "denied")
        .expect("the forged Host is audited");
    assert_eq!(denied["transport"], "jsonrpc");
    assert!(
        denied["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("Host not allowed"))
    );
    assert!(lines.iter().all(|l| l["method"] != "guest-ping"));
}

#[tokio::test]
async fn an_audit_log_that_cannot_be_opened_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&[]);
    cfg.audit_log = Some(dir.path().join("missing-dir").join("audit.jsonl"));
    let err = qga_bridge::Bridge::start(cfg).await.expect_err("refused");
    assert!(
        err.to_string().contains("cannot open the audit log"),
        "{err}"
    );
}

#[tokio::test]
async fn the_audit_file_is_reopened_after_logrotate_moved_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let log = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let _agent = FakeAgent::start(&socket, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &socket)]);
    cfg.audit_log = Some(log.clone());
    let bridge = start(cfg).await;
    let mut c = clients(&bridge).await;

    c.memory
        .set_memory_blocks(set("vm", &[(1, true)]))
        .await
        .expect("set");
    lines(&log, 1).await;
    // logrotate's default: rename, then SIGHUP.
    std::fs::rename(&log, &rotated).expect("rotate");
    bridge.reopen_audit();
    c.memory
        .set_memory_blocks(set("vm", &[(2, true)]))
        .await
        .expect("set");
    let new = lines(&log, 1).await;
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        new[0]["arguments"]["mem-blks"][0]["phys-index"], 2,
        "{new:?}"
    );
    let old = lines(&rotated, 1).await;
    assert_eq!(
        old.len(),
        1,
        "the rotated file keeps only what came before: {old:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log)
        .expect("new file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the new file is private too");
}
