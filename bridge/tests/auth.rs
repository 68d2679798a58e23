//! Authentication and grants, on both front ends: bearer tokens and client certificates
//! prove identities; grants limit them to reads or writes on some VMs; whatever is
//! refused never reaches a guest, and every refusal is audited.

mod common;

use std::{net::SocketAddr, path::Path, process::Command};

use common::{audit_lines, config, start};
use qga_bridge::{
    Config,
    config::{AuthConfig, GrantConfig, Role, TlsConfig, TokenConfig},
};
use qga_fake_agent::FakeAgent;
use qga_proto::v1::{
    GetMemoryBlocksRequest, ListVmsRequest, MemoryBlockChange, SetMemoryBlocksRequest,
    guest_memory_client::GuestMemoryClient, vms_client::VmsClient,
};
use qga_testkit::Certs;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

fn sha256_hex(text: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn grant(identity: &str, role: Role, vms: &[&str]) -> GrantConfig {
    GrantConfig {
        identity: identity.into(),
        role,
        vms: vms.iter().map(|v| v.to_string()).collect(),
    }
}

fn set(vm: &str) -> SetMemoryBlocksRequest {
    SetMemoryBlocksRequest {
        vm: vm.into(),
        blocks: vec![MemoryBlockChange {
            phys_index: 1,
            online: true,
        }],
    }
}

fn bearer<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    r
}

/// Two VMs, `web-1` and `db-1`, each with its own fake agent.
fn two_vms(dir: &Path) -> (FakeAgent, FakeAgent, Config) {
    let (web, db) = (dir.join("web.sock"), dir.join("db.sock"));
    let agents = (
        FakeAgent::start(&web, 4).expect("fake"),
        FakeAgent::start(&db, 4).expect("fake"),
    );
    (
        agents.0,
        agents.1,
        config(&[("web-1", &web), ("db-1", &db)]),
    )
}

/// A raw JSON-RPC POST with an optional bearer token: status line and body.
async fn post(addr: SocketAddr, token: Option<&str>, body: &Value) -> (String, String) {
    let body = body.to_string();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

fn rpc_set(vm: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "guest-set-memory-blocks",
           "params": {"vm": vm, "mem-blks": [{"phys-index": 2, "online": true}]}})
}

#[tokio::test]
async fn tokens_prove_identities_and_grants_limit_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (web, db, mut cfg) = two_vms(dir.path());
    let log = dir.path().join("audit.jsonl");
    cfg.audit_log = Some(log.clone());
    cfg.auth = Some(AuthConfig {
        tokens: vec![
            TokenConfig {
                identity: "robot".into(),
                sha256: sha256_hex("robot-token"),
            },
            TokenConfig {
                identity: "viewer".into(),
                sha256: sha256_hex("viewer-token"),
            },
        ],
        grants: vec![
            grant("robot", Role::Write, &["web-*"]),
            grant("viewer", Role::Read, &["*"]),
        ],
    });
    let bridge = start(cfg).await;
    let channel = Channel::from_shared(format!(
        "http://{}",
        bridge.grpc_addr.expect("TCP listener")
    ))
    .expect("uri")
    .connect()
    .await
    .expect("connect");
    let mut memory = GuestMemoryClient::new(channel.clone());
    let mut vms = VmsClient::new(channel);

    // No token, or a wrong one: UNAUTHENTICATED, with no detail about which.
    for token in [None, Some("robot-tokex")] {
        let err = memory
            .set_memory_blocks(bearer(set("web-1"), token))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        let err = vms
            .list_vms(bearer(ListVmsRequest {}, token))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        let (status, body) = post(
            bridge.jsonrpc_addr.expect("TCP listener"),
            token,
            &rpc_set("web-1"),
        )
        .await;
        assert!(status.contains("401"), "{status}");
        assert_eq!(body, "unauthenticated\n");
    }
    // A WebSocket upgrade without a token is not upgraded.
    let mut s = TcpStream::connect(bridge.jsonrpc_addr.expect("TCP listener"))
        .await
        .expect("connect");
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("status");
    assert_eq!(&head, b"HTTP/1.1 401");

    // robot writes web-* only, and sees only those VMs.
    memory
        .set_memory_blocks(bearer(set("web-1"), Some("robot-token")))
        .await
        .expect("granted");
    let err = memory
        .set_memory_blocks(bearer(set("db-1"), Some("robot-token")))
        .await
        .expect_err("not granted");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let listed: Vec<String> = vms
        .list_vms(bearer(ListVmsRequest {}, Some("robot-token")))
        .await
        .expect("list")
        .into_inner()
        .vms
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(listed, ["web-1"]);
    let (status, body) = post(
        bridge.jsonrpc_addr.expect("TCP listener"),
        Some("robot-token"),
        &rpc_set("db-1"),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    let reply: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(reply["error"]["code"], -32010, "{reply}");

    // viewer reads everything and changes nothing.
    memory
        .get_memory_blocks(bearer(
            GetMemoryBlocksRequest { vm: "db-1".into() },
            Some("viewer-token"),
        ))
        .await
        .expect("read granted");
    let err = memory
        .set_memory_blocks(bearer(set("web-1"), Some("viewer-token")))
        .await
        .expect_err("read only");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let (_, body) = post(
        bridge.jsonrpc_addr.expect("TCP listener"),
        Some("viewer-token"),
        &rpc_set("web-1"),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["error"]["code"],
        -32010
    );
    let (_, body) = post(
        bridge.jsonrpc_addr.expect("TCP listener"),
        Some("viewer-token"),
        &json!({"jsonrpc": "2.0", "id": 1, "method": "vm-list"}),
    )
    .await;
    let listed = serde_json::from_str::<Value>(&body).expect("json")["result"].clone();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

    // The guests were asked only what was granted: one set on web-1, none on db-1.
    assert_eq!(web.control().calls("guest-set-memory-blocks"), 1);
    assert_eq!(db.control().calls("guest-set-memory-blocks"), 0);

    // Audit: the write, and every refusal, with who. The trail is written by a thread of
    // its own: wait until every expected line is there, then count them.
    let writes = |lines: &[Value]| lines.iter().filter(|l| l["kind"] == "call").count();
    let denied = |lines: &[Value], outcome: &str| {
        lines
            .iter()
            .filter(|l| {
                l["kind"] == "denied"
                    && l["outcome"]
                        .as_str()
                        .is_some_and(|o| o.starts_with(outcome))
            })
            .count()
    };
    let lines = audit_lines(&log, |l| {
        writes(l) >= 1 && denied(l, "permission_denied") >= 4 && denied(l, "unauthenticated") >= 7
    })
    .await;
    let calls: Vec<_> = lines.iter().filter(|l| l["kind"] == "call").collect();
    assert_eq!(calls.len(), 1, "{lines:#?}");
    assert_eq!(calls[0]["identity"], "robot");
    assert_eq!(calls[0]["vm"], "web-1");
    assert_eq!(denied(&lines, "permission_denied"), 4, "{lines:#?}");
    assert_eq!(denied(&lines, "unauthenticated"), 7, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_prove_identities() {
    let certs = Certs::generate(&[
        "write.example",
        "read.example",
        "nobody.example",
        "*.example",
    ])
    .expect("certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let (web, _db, mut cfg) = two_vms(dir.path());
    cfg.tls = Some(TlsConfig {
        cert: certs.path("server.pem"),
        key: certs.path("server.key"),
        client_ca: Some(certs.path("ca.pem")),
    });
    cfg.auth = Some(AuthConfig::default());
    cfg.auth.as_mut().expect("set").grants = vec![
        grant("write.example", Role::Write, &["*"]),
        grant("read.example", Role::Read, &["*"]),
    ];
    let bridge = start(cfg).await;
    let channel = |name: &str| {
        let read = |f: String| std::fs::read(certs.path(&f)).expect("pem");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
            .identity(Identity::from_pem(
                read(format!("{name}.pem")),
                read(format!("{name}.key")),
            ))
            .domain_name("localhost");
        Channel::from_shared(format!(
            "https://{}",
            bridge.grpc_addr.expect("TCP listener")
        ))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy()
    };
    GuestMemoryClient::new(channel("write.example"))
        .set_memory_blocks(set("web-1"))
        .await
        .expect("writer writes");
    let err = GuestMemoryClient::new(channel("read.example"))
        .set_memory_blocks(set("web-1"))
        .await
        .expect_err("reader may not write");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // A certificate naming no granted identity, or only a wildcard, proves none.
    for name in ["nobody.example", "*.example"] {
        let err = GuestMemoryClient::new(channel(name))
            .get_memory_blocks(GetMemoryBlocksRequest { vm: "web-1".into() })
            .await
            .expect_err("no identity");
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err}");
    }

    // curl with the reader's certificate gets -32010 for a set.
    let rpc = bridge.jsonrpc_addr.expect("TCP listener");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "-H",
                "content-type: application/json",
            ])
            .arg("-d")
            .arg(rpc_set("web-1").to_string())
            .arg("--cacert")
            .arg(certs.path("ca.pem"))
            .arg("--cert")
            .arg(certs.path("read.example.pem"))
            .arg("--key")
            .arg(certs.path("read.example.key"))
            .arg(format!("https://{rpc}/"))
            .output()
            .expect("curl")
    })
    .await
    .expect("joins");
    let reply: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(reply["error"]["code"], -32010, "{reply}");
    assert_eq!(
        web.control().calls("guest-set-memory-blocks"),
        1,
        "only the writer's set"
    );
}
