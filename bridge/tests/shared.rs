//! Shared sockets (`mode = "shared"`): the bridge lets go of an idle agent socket so that
//! other clients — Proxmox's tools, `socat` — are served between its calls, against an
//! agent that, like QEMU's chardev, serves one client at a time.

mod common;

use std::time::Duration;

use common::{clients, config, start};
use qga_bridge::config::SocketMode;
use qga_proto::v1::{AgentState, ListVmsRequest, PingRequest};
use qga_testkit::{AgentKind, AgentProcess, FakeSysfs};

/// `guest-ping` from another client — a real `socat` — waiting at most `wait`.
async fn other_client_ping(agent: &AgentProcess, wait: Duration) -> Result<Duration, String> {
    common::socat_ping(agent.socket(), wait).await
}

async fn bridge_for(agent: &AgentProcess, shared: bool) -> (qga_bridge::Bridge, common::Clients) {
    let mut c = config(&[("vm", agent.socket())]);
    if shared {
        c.vms.get_mut("vm").expect("vm").mode = SocketMode::Shared;
        c.timeouts.shared_idle_ms = 200;
    }
    let bridge = start(c).await;
    let cl = clients(&bridge).await;
    (bridge, cl)
}

async fn ping(c: &common::Clients) {
    c.agent
        .clone()
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("ping through the bridge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_socket_serves_other_clients_between_the_bridges_calls() {
    let tree = FakeSysfs::with_blocks(8, "online");
    let agent = AgentProcess::start(AgentKind::Ours, &tree, &[]).expect("agent");
    let (_bridge, c) = bridge_for(&agent, true).await;
    ping(&c).await;
    let waited = other_client_ping(&agent, common::PATIENCE)
        .await
        .expect("served once the bridge let go");
    eprintln!("shared: another client was served after {waited:?} (idle time 200 ms)");
    let vms = c
        .vms
        .clone()
        .list_vms(ListVmsRequest {})
        .await
        .expect("ListVms")
        .into_inner()
        .vms;
    assert_eq!(
        vms[0].state(),
        AgentState::Idle,
        "released, not failed: {:?}",
        vms[0]
    );
    assert_eq!(vms[0].last_error, None);
    // The bridge's next call connects again.
    ping(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_socket_is_held() {
    let tree = FakeSysfs::with_blocks(8, "online");
    let agent = AgentProcess::start(AgentKind::Ours, &tree, &[]).expect("agent");
    let (bridge, c) = bridge_for(&agent, false).await;
    ping(&c).await;
    let refused = other_client_ping(&agent, Duration::from_millis(1500)).await;
    assert!(refused.is_err(), "the bridge holds the socket: {refused:?}");
    drop(c);
    bridge.shutdown().await;
}
