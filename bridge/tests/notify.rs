//! The `qga-bridge` binary under systemd's readiness protocol (`Type=notify`): a harness
//! plays systemd's part — a unix datagram socket named by `$NOTIFY_SOCKET` — and checks
//! that `READY=1` comes only once the listeners accept connections, that SIGHUP is framed
//! by `RELOADING=1` and `READY=1`, and that SIGTERM sends `STOPPING=1`.

mod common;

use std::{
    net::TcpStream,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use qga_testkit::{AgentKind, AgentProcess, FakeSysfs, bin_path};

/// The bridge, killed if a test fails before it stopped.
struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Bridge {
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.0.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig}");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + common::PATIENCE;
        loop {
            if let Some(s) = self.0.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "bridge did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Next notification datagram, as text; panics after [`common::PATIENCE`].
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let len = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8(buf[..len].to_vec()).expect("UTF-8 notification")
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// Starts the bridge with `NOTIFY_SOCKET=notify_socket`, serving one fake-agent VM.
fn start(notify_socket: &str, conf_dir: &Path, agent: &AgentProcess) -> (Bridge, u16, u16) {
    let (grpc, rpc) = (common::free_port(), common::free_port());
    let child = Command::new(bin_path("qga-bridge"))
        .arg("--grpc-addr")
        .arg(format!("127.0.0.1:{grpc}"))
        .arg("--jsonrpc-addr")
        .arg(format!("127.0.0.1:{rpc}"))
        .arg("--vm")
        .arg(format!("vm1={}", agent.socket().display()))
        .arg("--state-dir")
        .arg(conf_dir.join("state"))
        .env("NOTIFY_SOCKET", notify_socket)
        .current_dir(conf_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bridge");
    (Bridge(child), grpc, rpc)
}

/// The whole life cycle on `socket`, which `notify_socket` names.
fn lifecycle(socket: &UnixDatagram, notify_socket: &str) {
    socket
        .set_read_timeout(Some(common::PATIENCE))
        .expect("timeout");
    let tree = FakeSysfs::with_blocks(2, "offline");
    let agent = AgentProcess::start(AgentKind::Ours, &tree, &[]).expect("agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bridge, grpc, rpc) = start(notify_socket, dir.path(), &agent);

    let ready = next(socket);
    assert!(has_line(&ready, "READY=1"), "first notification: {ready:?}");
    assert!(
        has_line(&ready, "STATUS=serving 1 VMs"),
        "status line: {ready:?}"
    );
    // At READY=1 both listeners accept connections: no retry loop here.
    for port in [grpc, rpc] {
        TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("port {port} not accepting at READY=1: {e}"));
    }

    bridge.signal("HUP");
    let reloading = next(socket);
    assert!(
        has_line(&reloading, "RELOADING=1"),
        "after SIGHUP: {reloading:?}"
    );
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "MONOTONIC_USEC: {reloading:?}");
    let ready = next(socket);
    assert!(has_line(&ready, "READY=1"), "after reload: {ready:?}");

    bridge.signal("TERM");
    let stopping = next(socket);
    assert!(
        has_line(&stopping, "STOPPING=1"),
        "after SIGTERM: {stopping:?}"
    );
    let status = bridge.wait_exit();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn abstract_notify_socket_gets_ready_reloading_stopping() {
    let name = format!("qga-bridge-notify-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
    lifecycle(&socket, &format!("@{name}"));
}

#[test]
fn path_notify_socket_gets_ready_reloading_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind socket");
    let name = path.to_str().expect("UTF-8 temp path");
    lifecycle(&socket, name);
}
