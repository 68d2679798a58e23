//! Both front ends on unix sockets: the socket file's mode decides who may connect, a
//! stale socket is replaced and a live one or another file is not, and the peer's uid is
//! its identity. Needs root (to try a connection as another uid), as on CI machines.

mod common;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use common::{audit_lines, config};
use hyper_util::rt::TokioIo;
use qga_bridge::{
    Bridge, Config,
    config::{AuthConfig, GrantConfig, Listen, Role},
};
use qga_fake_agent::FakeAgent;
use qga_proto::v1::{
    MemoryBlockChange, PingRequest, SetMemoryBlocksRequest, guest_agent_client::GuestAgentClient,
    guest_memory_client::GuestMemoryClient,
};
use serde_json::Value;
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

const PING: &str = r#"{"jsonrpc":"2.0","id":1,"method":"guest-ping","params":{"vm":"vm"}}"#;

fn unix_config(dir: &Path) -> (FakeAgent, Config, PathBuf, PathBuf) {
    let agent_socket = dir.join("vm.sock");
    let agent = FakeAgent::start(&agent_socket, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &agent_socket)]);
    let (grpc, rpc) = (dir.join("grpc.sock"), dir.join("jsonrpc.sock"));
    cfg.grpc_addr = Listen::Unix(grpc.clone());
    cfg.jsonrpc_addr = Listen::Unix(rpc.clone());
    (agent, cfg, grpc, rpc)
}

async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("gRPC over the unix socket")
}

/// `curl` over the unix socket, as `uid` if given; `Ok(body)` when curl succeeded.
fn curl(socket: &Path, uid: Option<u32>) -> Result<String, String> {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
                "curl",
            ]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args([
            "-sS",
            "--max-time",
            "60",
            "-H",
            "content-type: application/json",
            "-d",
            PING,
        ])
        .arg("--unix-socket")
        .arg(socket)
        .arg("http://localhost/")
        .output()
        .expect("curl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_front_ends_serve_on_unix_sockets_to_permitted_peers_only() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test tries a connection as another uid and needs root"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // Let other uids reach the sockets' directory, so only the sockets' mode decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (_agent, mut cfg, grpc, rpc) = unix_config(dir.path());
    let log = dir.path().join("audit.jsonl");
    cfg.audit_log = Some(log.clone());
    let bridge = Bridge::start(cfg).await.expect("bridge starts");
    assert_eq!((bridge.grpc_addr, bridge.jsonrpc_addr), (None, None));
    for socket in [&grpc, &rpc] {
        let meta = std::fs::metadata(socket).expect("socket exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o660,
            "{}",
            socket.display()
        );
    }

    GuestAgentClient::new(unix_channel(grpc.clone()).await)
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("gRPC served");
    let rpc2 = rpc.clone();
    let (mine, other) =
        tokio::task::spawn_blocking(move || (curl(&rpc2, None), curl(&rpc2, Some(65534))))
            .await
            .expect("joins");
    assert!(
        mine.as_deref().is_ok_and(|b| b.contains(r#""result":{}"#)),
        "{mine:?}"
    );
    let err = other.expect_err("another uid connected through a 0660 socket");
    assert!(
        err.contains("Permission denied") || err.contains("Couldn't connect"),
        "{err}"
    );

    // The peer's credentials are in the audit trail.
    GuestMemoryClient::new(unix_channel(grpc.clone()).await)
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: "vm".into(),
            blocks: vec![MemoryBlockChange {
                phys_index: 1,
                online: true,
            }],
        })
        .await
        .expect("set");
    let is_call = |l: &Value| l["kind"] == "call";
    let line: Value = audit_lines(&log, |l| l.iter().any(is_call))
        .await
        .into_iter()
        .find(is_call)
        .expect("the set is audited");
    assert!(
        line["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("uid=0,gid=0,pid=")),
        "{line}"
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_peer_is_its_uid_under_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, mut cfg, grpc, _rpc) = unix_config(dir.path());
    let me = rustix::process::geteuid().as_raw();
    cfg.auth = Some(AuthConfig::default());
    cfg.auth.as_mut().expect("set").grants = vec![GrantConfig {
        identity: format!("uid:{me}"),
        role: Role::Read,
        vms: vec!["*".into()],
    }];
    let _bridge = Bridge::start(cfg).await.expect("bridge starts");
    let channel = unix_channel(grpc).await;
    GuestAgentClient::new(channel.clone())
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("uid granted read");
    let err = GuestMemoryClient::new(channel)
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: "vm".into(),
            blocks: vec![MemoryBlockChange {
                phys_index: 1,
                online: true,
            }],
        })
        .await
        .expect_err("read only");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(agent.control().calls("guest-set-memory-blocks"), 0);
}

#[tokio::test]
async fn stale_sockets_are_replaced_and_live_ones_or_files_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, cfg, grpc, rpc) = unix_config(dir.path());
    // A socket nobody listens on any more: replaced.
    drop(std::os::unix::net::UnixListener::bind(&grpc).expect("bind"));
    assert!(grpc.exists());
    let bridge = Bridge::start(cfg.clone())
        .await
        .expect("a stale socket is replaced");
    // A socket someone listens on: refused, and left alone. (Each bridge has its own
    // state directory: a shared one would be refused first.)
    let other = || qga_bridge::Config {
        state_dir: common::state_dir(),
        ..cfg.clone()
    };
    let err = Bridge::start(other()).await.expect_err("live socket");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    bridge.shutdown().await;
    // A regular file: refused, and left alone.
    let _ = std::fs::remove_file(&grpc);
    let _ = std::fs::remove_file(&rpc);
    std::fs::write(&grpc, "precious").expect("write");
    let err = Bridge::start(other()).await.expect_err("a file");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&grpc).expect("kept"), "precious");
}
