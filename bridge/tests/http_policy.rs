//! The HTTP servers answer only requests that name this bridge in `Host` and carry no
//! foreign `Origin`; a bridge asked to serve non-loopback TCP without TLS refuses to start.

mod common;

use std::{net::SocketAddr, process::Command};

use common::{config, start};
use qga_fake_agent::FakeAgent;
use qga_testkit::bin_path;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends `head` (and `body`) on a fresh connection; returns the status line and body.
async fn exchange(addr: SocketAddr, head: &str, body: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body.as_bytes()).await.expect("body");
    let mut out = vec![0u8; 16 * 1024];
    let mut len = 0;
    // Enough for a status line and a short body; a 101 never ends on its own.
    let read = async {
        while let Ok(n) = s.read(&mut out[len..]).await {
            if n == 0 {
                break;
            }
            len += n;
            let text = String::from_utf8_lossy(&out[..len]);
            if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(common::PATIENCE, read).await;
    let text = String::from_utf8_lossy(&out[..len]).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

fn post(host: &str, origin: Option<&str>, body: &str) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "POST / HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
}

fn upgrade(host: &str, origin: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

const SET: &str = r#"{"jsonrpc":"2.0","id":1,"method":"guest-set-memory-blocks","params":{"vm":"vm","mem-blks":[{"phys-index":1,"online":true}]}}"#;

#[tokio::test]
async fn foreign_hosts_and_origins_are_refused_before_any_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &path)]);
    cfg.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.http.allowed_hosts = vec!["bridge.internal".into()];
    cfg.http.allowed_origins = vec!["https://console.example".into()];
    let bridge = start(cfg).await;
    let rpc = bridge.jsonrpc_addr.expect("TCP listener");

    // DNS rebinding: a page on evil.example re-pointed at 127.0.0.1.
    let (status, body) = exchange(rpc, &post("evil.example:8080", None, SET), SET).await;
    assert!(status.contains("403"), "{status}");
    assert!(body.contains("Host not allowed"), "{body}");
    // A page on another site posting to the real address.
    let (status, body) = exchange(
        rpc,
        &post(&rpc.to_string(), Some("https://evil.example"), SET),
        SET,
    )
    .await;
    assert!(status.contains("403"), "{status}");
    assert!(body.contains("Origin not allowed"), "{body}");
    // And opening a WebSocket to it.
    let (status, _) = exchange(rpc, &upgrade(&rpc.to_string(), "https://evil.example"), "").await;
    assert!(
        status.contains("403"),
        "a foreign Origin was upgraded: {status}"
    );
    assert_eq!(
        agent.control().calls("guest-set-memory-blocks"),
        0,
        "the guest was asked"
    );

    // Allowed names and origins are served, HTTP and WebSocket.
    for (host, origin) in [
        (rpc.to_string(), None),
        (format!("localhost:{}", rpc.port()), None),
        (
            "bridge.internal:8080".to_string(),
            Some("https://console.example"),
        ),
    ] {
        let (status, body) = exchange(rpc, &post(&host, origin, SET), SET).await;
        assert!(status.contains("200"), "{host}: {status}");
        assert!(body.contains("\"result\""), "{body}");
    }
    let (status, _) = exchange(rpc, &upgrade("localhost", "https://console.example"), "").await;
    assert!(status.contains("101"), "{status}");
    assert_eq!(agent.control().calls("guest-set-memory-blocks"), 3);
    // No CORS headers are ever sent.
    let mut s = TcpStream::connect(rpc).await.expect("connect");
    s.write_all(post("localhost", Some("https://console.example"), SET).as_bytes())
        .await
        .expect("write");
    s.write_all(SET.as_bytes()).await.expect("write");
    let mut all = String::new();
    s.read_to_string(&mut all).await.expect("read");
    assert!(
        !all.to_ascii_lowercase().contains("access-control-"),
        "{all}"
    );

    // The metrics endpoint checks Host too.
    let m = bridge.metrics_addr.expect("metrics");
    let get =
        |host: &str| format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (status, _) = exchange(m, &get("evil.example"), "").await;
    assert!(status.contains("403"), "{status}");
    let (status, body) = exchange(m, &get("localhost"), "").await;
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains(r#"qga_bridge_refused_total{server="jsonrpc",reason="host_or_origin"} 3"#),
        "{body}"
    );
}

#[test]
fn non_loopback_tcp_without_tls_is_refused_unless_asked_for() {
    let out = Command::new(bin_path("qga-bridge"))
        .args(["--jsonrpc-addr", "0.0.0.0:0", "--grpc-addr", "127.0.0.1:0"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the JSON-RPC address 0.0.0.0:0 is not loopback")
            && stderr.contains("--allow-insecure-tcp"),
        "{stderr}"
    );
}
