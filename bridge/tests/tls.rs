//! TLS and mutual TLS on both front ends, against real clients: tonic over rustls and
//! Debian's `curl`. Certificates come from the `openssl` command.

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{config, start};
use qga_bridge::config::TlsConfig;
use qga_fake_agent::FakeAgent;
use qga_proto::v1::{PingRequest, guest_agent_client::GuestAgentClient};
use qga_testkit::{Certs, bin_path};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const PING: &str = r#"{"jsonrpc":"2.0","id":1,"method":"guest-ping","params":{"vm":"vm"}}"#;

/// A gRPC channel over TLS trusting `ca`, presenting `client` (`NAME.pem`/`.key`) if any.
async fn tls_channel(
    addr: SocketAddr,
    certs: &Certs,
    ca: &str,
    client: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |name: &str| std::fs::read(certs.path(name)).expect("pem");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&format!("{ca}.pem"))))
        .domain_name("localhost");
    if let Some(name) = client {
        tls = tls.identity(Identity::from_pem(
            read(&format!("{name}.pem")),
            read(&format!("{name}.key")),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(common::PATIENCE)
        .connect()
        .await
}

async fn grpc_ping(channel: Channel) -> Result<(), tonic::Status> {
    GuestAgentClient::new(channel)
        .ping(PingRequest { vm: "vm".into() })
        .await
        .map(|_| ())
}

/// `curl` posting a ping over HTTPS; `Ok(body)` if curl succeeded.
fn curl(addr: SocketAddr, certs: &Certs, ca: &str, client: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "60",
        "-H",
        "content-type: application/json",
        "-d",
        PING,
    ])
    .arg("--cacert")
    .arg(certs.path(&format!("{ca}.pem")));
    if let Some(name) = client {
        cmd.arg("--cert").arg(certs.path(&format!("{name}.pem")));
        cmd.arg("--key").arg(certs.path(&format!("{name}.key")));
    }
    let out = cmd
        .arg(format!("https://{addr}/"))
        .output()
        .expect("curl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn tls_files(certs: &Certs, mutual: bool) -> TlsConfig {
    TlsConfig {
        cert: certs.path("server.pem"),
        key: certs.path("server.key"),
        client_ca: mutual.then(|| certs.path("ca.pem")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_tls_clients_on_both_front_ends() {
    let certs = Certs::generate(&["write.example"]).expect("certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let _agent = FakeAgent::start(&socket, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &socket)]);
    cfg.tls = Some(tls_files(&certs, false));
    let bridge = start(cfg).await;

    let channel = tls_channel(bridge.grpc_addr.expect("TCP listener"), &certs, "ca", None)
        .await
        .expect("TLS connect");
    grpc_ping(channel).await.expect("served over TLS");
    let (rpc, addr) = (
        bridge.jsonrpc_addr.expect("TCP listener"),
        bridge.jsonrpc_addr.expect("TCP listener"),
    );
    let body = tokio::task::spawn_blocking(move || curl(rpc, &certs, "ca", None))
        .await
        .expect("joins");
    assert!(
        body.as_deref().is_ok_and(|b| b.contains(r#""result":{}"#)),
        "{body:?}"
    );

    // Plaintext on a TLS port gets nothing.
    let plain = Channel::from_shared(format!(
        "http://{}",
        bridge.grpc_addr.expect("TCP listener")
    ))
    .expect("uri");
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => grpc_ping(ch).await.is_err(),
    };
    assert!(refused, "plaintext gRPC served on a TLS port");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-d", PING])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("result"),
        "plaintext JSON-RPC served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_of_the_ca() {
    let certs = Certs::generate(&["write.example"]).expect("certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&socket, 4).expect("fake agent");
    let mut cfg = config(&[("vm", &socket)]);
    cfg.tls = Some(tls_files(&certs, true));
    let bridge = start(cfg).await;
    let grpc = bridge.grpc_addr.expect("TCP listener");

    let good = tls_channel(grpc, &certs, "ca", Some("write.example"))
        .await
        .expect("connect");
    grpc_ping(good).await.expect("a client of the CA is served");
    for client in [None, Some("rogue")] {
        let served = match tls_channel(grpc, &certs, "ca", client).await {
            Err(_) => false,
            Ok(ch) => grpc_ping(ch).await.is_ok(),
        };
        assert!(!served, "gRPC client {client:?} was served");
    }
    let rpc = bridge.jsonrpc_addr.expect("TCP listener");
    let pings_before = agent.control().calls("guest-ping");
    let outcomes = tokio::task::spawn_blocking(move || {
        let good = curl(rpc, &certs, "ca", Some("write.example"));
        let none = curl(rpc, &certs, "ca", None);
        let rogue = curl(rpc, &certs, "ca", Some("rogue"));
        (good, none, rogue)
    })
    .await
    .expect("joins");
    assert!(
        outcomes
            .0
            .as_deref()
            .is_ok_and(|b| b.contains(r#""result":{}"#)),
        "{outcomes:?}"
    );
    assert!(outcomes.1.is_err(), "no certificate: {outcomes:?}");
    assert!(outcomes.2.is_err(), "unknown CA: {outcomes:?}");
    assert_eq!(
        agent.control().calls("guest-ping"),
        pings_before + 1,
        "refused clients reached the guest"
    );
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until it returns true, for at most [`common::PATIENCE`].
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + common::PATIENCE;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The bridge's systemd notifications (`$NOTIFY_SOCKET`): they say when a SIGHUP has been
/// dealt with.
struct Notifications(UnixDatagram);

impl Notifications {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(common::PATIENCE))
            .expect("timeout");
        Self(socket)
    }

    /// Waits for a notification with the line `line` (earlier ones are passed over).
    fn until(&self, line: &str) {
        let mut buf = [0u8; 4096];
        loop {
            let len = self
                .0
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {line} notification: {e}"));
            if String::from_utf8_lossy(&buf[..len])
                .lines()
                .any(|l| l == line)
            {
                return;
            }
        }
    }

    /// Waits until the bridge has dealt with a SIGHUP: `RELOADING=1`, then `READY=1`.
    fn reloaded(&self) {
        self.until("RELOADING=1");
        self.until("READY=1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_renewed_certificate_to_new_connections_and_keeps_old_ones() {
    let certs = Certs::generate(&[]).expect("certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let _agent = FakeAgent::start(&socket, 4).expect("fake agent");
    let (grpc, rpc) = (free_addr(), free_addr());
    let path = |p: &Path| p.display().to_string();
    let notify = dir.path().join("notify");
    let notifications = Notifications::bind(&notify);
    let bridge = Killed(
        Command::new(bin_path("qga-bridge"))
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--jsonrpc-addr",
                &rpc.to_string(),
            ])
            .args(["--vm", &format!("vm={}", path(&socket))])
            .args(["--state-dir", &path(&dir.path().join("state"))])
            .args(["--tls-cert", &path(&certs.path("server.pem"))])
            .args(["--tls-key", &path(&certs.path("server.key"))])
            .env("QGA_BRIDGE_LOG", "warn")
            .env("NOTIFY_SOCKET", &notify)
            .stdout(Stdio::null())
            .spawn()
            .expect("bridge starts"),
    );
    let certs = std::sync::Arc::new(certs);
    let c = certs.clone();
    assert!(
        tokio::task::spawn_blocking(move || eventually(|| curl(rpc, &c, "ca", None).is_ok()))
            .await
            .expect("joins"),
        "the bridge never served TLS"
    );
    let before = tls_channel(grpc, &certs, "ca", None)
        .await
        .expect("connect");
    grpc_ping(before.clone()).await.expect("served");

    // Renew: a new CA issues the server a new certificate; then SIGHUP.
    certs.ca("ca2").expect("new CA");
    certs.server("ca2").expect("renewed certificate");
    let hup = Command::new("kill")
        .args(["-HUP", &bridge.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    notifications.reloaded();
    let c = certs.clone();
    assert!(
        tokio::task::spawn_blocking(move || eventually(|| curl(rpc, &c, "ca2", None).is_ok()))
            .await
            .expect("joins"),
        "new connections never got the renewed certificate"
    );
    let c = certs.clone();
    let old = tokio::task::spawn_blocking(move || curl(rpc, &c, "ca", None))
        .await
        .expect("joins");
    assert!(old.is_err(), "the old certificate is still served: {old:?}");
    assert!(tls_channel(grpc, &certs, "ca2", None).await.is_ok());
    // The connection made before the reload was not dropped.
    grpc_ping(before)
        .await
        .expect("the established connection still serves");

    // A broken file keeps the current certificate.
    std::fs::write(certs.path("server.pem"), "not a certificate").expect("write");
    let hup = Command::new("kill")
        .args(["-HUP", &bridge.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    // The reload has been tried (and has failed) once the bridge says it is ready again.
    notifications.reloaded();
    let c = certs.clone();
    let still = tokio::task::spawn_blocking(move || curl(rpc, &c, "ca2", None))
        .await
        .expect("joins");
    assert!(
        still.is_ok(),
        "a bad reload replaced the certificate: {still:?}"
    );
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start() {
    let certs = Certs::generate(&[]).expect("certs");
    let mut cfg = config(&[]);
    cfg.tls = Some(TlsConfig {
        cert: certs.path("server.pem"),
        key: certs.path("ca.key"),
        client_ca: None,
    });
    let err = qga_bridge::Bridge::start(cfg)
        .await
        .expect_err("key does not match");
    assert!(err.to_string().contains("TLS"), "{err}");
}
