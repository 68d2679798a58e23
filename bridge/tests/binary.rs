//! The `qga-bridge` binary with a TOML config: serves, answers, stops cleanly on SIGTERM.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::rpc;
use jsonrpsee::http_client::HttpClientBuilder;
use qga_testkit::{AgentKind, AgentProcess, FakeSysfs, bin_path};
use serde_json::json;

#[tokio::test]
async fn binary_with_toml_config_serves_and_stops_on_sigterm() {
    let tree = FakeSysfs::with_blocks(3, "offline");
    let agent = AgentProcess::start(AgentKind::Ours, &tree, &[]).expect("agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let (grpc, rpc_port, metrics) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let conf = dir.path().join("bridge.toml");
    std::fs::write(
        &conf,
        format!(
            "grpc_addr = \"127.0.0.1:{grpc}\"\nmetrics_addr = \"127.0.0.1:{metrics}\"\nlog_format = \"json\"\n\
             state_dir = \"{}\"\n[vms]\nvm1 = \"{}\"\n[timeouts]\ndefault_ms = 5000\n[limits]\nqueue_depth = 8\n",
            dir.path().join("state").display(),
            agent.socket().display()
        ),
    )
    .expect("write config");
    let mut child = Command::new(bin_path("qga-bridge"))
        .arg("--config")
        .arg(&conf)
        .arg("--jsonrpc-addr")
        .arg(format!("127.0.0.1:{rpc_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bridge");
    let http = HttpClientBuilder::default()
        .build(format!("http://127.0.0.1:{rpc_port}"))
        .expect("client");
    let deadline = Instant::now() + common::PATIENCE;
    let blocks = loop {
        match rpc(&http, "guest-get-memory-blocks", json!({"vm": "vm1"})).await {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("bridge never answered: {e:?}"),
        }
    };
    assert_eq!(blocks.as_array().map(Vec::len), Some(3));
    let metrics_text = reqwest_like_get(metrics).await;
    assert!(
        metrics_text.contains("qga_bridge_calls_total"),
        "{metrics_text}"
    );

    // SIGTERM: graceful exit with status 0.
    let pid = child.id();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let deadline = Instant::now() + common::PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "bridge did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let mut logs = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut logs);
    }
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("qga-bridge serving")),
        "JSON logs: {logs}"
    );
}

/// A minimal HTTP GET of /metrics over a raw TCP stream.
async fn reqwest_like_get(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
