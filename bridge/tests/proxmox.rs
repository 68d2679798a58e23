//! Running beside Proxmox VE (`discover_proxmox`): VMs are found as `<vmid>.qga` and
//! `<vmid>.qmp` in Proxmox's run directory, named by their vmid, and both sockets are
//! shared — released when idle, so Proxmox's own tools (`qm guest cmd`, `qm monitor`) get
//! them between the bridge's calls. The agent is ours, on a socket serving one client at a
//! time like QEMU's chardev; the monitor is scripted and, like QEMU's, serves one client
//! at a time too.

mod common;

use std::{
    ops::ControlFlow,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{clients, config, rpc, start, until_listed};
use futures::{SinkExt, StreamExt};
use qga_proto::v1::{AgentState, ListVmsRequest, PingRequest};
use qga_testkit::{FakeSysfs, bin_path, qmp};
use qga_wire::codec::{Frame, QgaCodec};
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

/// Our agent listening on `socket` (one client at a time); killed when dropped.
struct Agent(Child);

impl Agent {
    fn start(socket: &Path, tree: &FakeSysfs, state: &Path) -> Self {
        let child = Command::new(bin_path("qga-agent"))
            .arg("-m")
            .arg("unix-listen")
            .arg("-p")
            .arg(socket)
            .arg("-t")
            .arg(state)
            .arg("-f")
            .arg(state.join("agent.pid"))
            .arg("-c")
            .arg("/dev/null")
            .arg("--sysfs-root")
            .arg(tree.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qga-agent");
        let deadline = Instant::now() + common::PATIENCE;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the agent never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QEMU monitor serving one client at a time, as QEMU does: the next client is
/// accepted (and greeted) only once the current one has closed. Answers what a layout
/// asks; counts the clients served.
struct Monitor {
    served: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    fn start(path: &Path) -> Self {
        let listener = UnixListener::bind(path).expect("bind QMP socket");
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut framed = Framed::new(stream, QgaCodec::default());
                let greeting = json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 0,
                    "micro": 2}, "package": "pve-qemu-kvm_9.0.2-4"}, "capabilities": []}});
                if framed.send(&greeting).await.is_err() {
                    continue;
                }
                while let Some(Ok(Frame::Value(request))) = framed.next().await {
                    let mut reply = match request["execute"].as_str().unwrap_or_default() {
                        "query-memory-size-summary" => qmp::ok(json!({"base-memory": 1u64 << 30})),
                        "query-memory-devices" | "query-memdev" => qmp::ok(json!([])),
                        "qmp_capabilities" => qmp::ok(json!({})),
                        other => qmp::not_found(other),
                    };
                    reply["id"] = request["id"].clone();
                    if framed.send(&reply).await.is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            served,
            _task: task,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// Another client of the QMP socket, as `qm monitor` would be: QEMU's greeting within
/// `wait`.
async fn other_monitor_client(path: &Path, wait: Duration) -> Result<Value, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| e.to_string())?;
    let mut framed = Framed::new(stream, QgaCodec::default());
    match tokio::time::timeout(wait, framed.next()).await {
        Ok(Some(Ok(Frame::Value(v)))) => Ok(v),
        Ok(other) => Err(format!("{other:?}")),
        Err(_) => Err(format!("no greeting within {wait:?}")),
    }
}

/// `guest-ping` from another client, as `qm guest cmd` would send it, waiting at most
/// `wait`.
struct Pve {
    dir: tempfile::TempDir,
    _state: tempfile::TempDir,
    _tree: FakeSysfs,
    _agent: Agent,
    monitor: Monitor,
    _junk: Vec<std::os::unix::net::UnixListener>,
}

impl Pve {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// A Proxmox run directory: VM 101 with its agent and monitor sockets, and what else
/// may lie there.
fn proxmox_dir() -> Pve {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let tree = FakeSysfs::with_blocks(8, "online");
    let agent = Agent::start(&dir.path().join("101.qga"), &tree, state.path());
    let monitor = Monitor::start(&dir.path().join("101.qmp"));
    // Not VMs: a socket whose name is no vmid, another VM's file, a regular file named
    // like an agent socket, and a monitor socket without an agent.
    let junk = vec![
        std::os::unix::net::UnixListener::bind(dir.path().join("abc.qga")).expect("bind"),
        std::os::unix::net::UnixListener::bind(dir.path().join("104.qmp")).expect("bind"),
    ];
    std::fs::write(dir.path().join("101.conf"), b"memory: 1024\n").expect("write");
    std::fs::write(dir.path().join("102.qga"), b"").expect("write");
    Pve {
        dir,
        _state: state,
        _tree: tree,
        _agent: agent,
        monitor,
        _junk: junk,
    }
}

const IDLE_MS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxmox_vms_are_discovered_shared_and_released_when_idle() {
    let pve = proxmox_dir();
    let mut c = config(&[]);
    c.discover_proxmox = Some(pve.dir.path().to_path_buf());
    c.discover_interval = Duration::from_millis(100);
    c.timeouts.shared_idle_ms = IDLE_MS;
    let bridge = start(c).await;
    let cl = clients(&bridge).await;

    let names = until_listed(&cl.http, |n| !n.is_empty()).await;
    assert_eq!(names, ["101"], "only the vmid with an agent socket");
    // Several scans later still just 101.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let names = until_listed(&cl.http, |_| true).await;
    assert_eq!(names, ["101"]);

    // A call works.
    cl.agent
        .clone()
        .ping(PingRequest { vm: "101".into() })
        .await
        .expect("ping through the bridge");
    // Shared by default: another client (qm guest cmd) is served once the bridge let go.
    common::socat_ping(&pve.path("101.qga"), common::PATIENCE)
        .await
        .expect("served after the idle time");
    let vms = cl
        .vms
        .clone()
        .list_vms(ListVmsRequest {})
        .await
        .expect("ListVms")
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state(), AgentState::Idle, "{:?}", vms[0]);
    assert_eq!(vms[0].last_error, None);

    // The QMP socket was found beside it: memory hotplug works, over a connection the
    // bridge releases when idle too.
    let layout = rpc(&cl.http, "memory-layout", json!({"vm": "101"}))
        .await
        .expect("layout over the discovered QMP socket");
    assert!(layout.is_object(), "{layout}");
    assert_eq!(pve.monitor.served(), 1);
    let greeting = other_monitor_client(&pve.path("101.qmp"), common::PATIENCE)
        .await
        .expect("qm monitor is greeted once the bridge released QMP");
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    assert_eq!(pve.monitor.served(), 2);
    // The bridge's next hotplug call connects again.
    rpc(&cl.http, "memory-layout", json!({"vm": "101"}))
        .await
        .expect("layout after the release");
    assert_eq!(pve.monitor.served(), 3);

    // A refused plug is counted too (its size is no multiple of the block size).
    let plug = rpc(&cl.http, "memory-plug", json!({"vm": "101", "size": 1})).await;
    assert!(matches!(plug, Err((-32602, ..))), "{plug:?}");
    let series = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains("vm=\"101\""))
            .map(String::from)
            .collect()
    };
    let before = series(&bridge.metrics().encode());
    for method in [
        "guest-ping",
        "memory-plug",
        "__org.qga-bridge_get-memory-zones",
    ] {
        assert!(
            before
                .iter()
                .any(|l| l.contains(&format!("method=\"{method}\""))),
            "a series of {method}: {before:#?}"
        );
    }

    // The VM stops: Proxmox removes its sockets, and the bridge forgets it, with every
    // metrics series of it.
    std::fs::remove_file(pve.path("101.qga")).expect("rm");
    std::fs::remove_file(pve.path("101.qmp")).expect("rm");
    until_listed(&cl.http, |n| n.is_empty()).await;
    common::eventually("the removed VM's series gone", || async {
        let left = series(&bridge.metrics().encode());
        if left.is_empty() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("{left:#?}"))
        }
    })
    .await;

    drop(cl);
    bridge.shutdown().await;
}
