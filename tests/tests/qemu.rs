//! End to end with a real QEMU guest (TCG), driven only through the bridge.
//!
//! Needs qemu-system-x86_64, qemu-guest-agent and the guest image (built on demand from
//! Debian's packages by tests/guest/build-image); fails, never skips, without them.
//! Run one at a time (see .config/nextest.toml): each boots a guest.

use std::time::{Duration, Instant};

use qga_e2e::{
    bridge::{BridgeProcess, Clients},
    guest::{Guest, GuestConfig},
    image,
    scenario::{self, Timings},
    wait::PATIENCE,
};
use qga_proto::v1::MemoryBlockResponseType;

fn boot(agent: &'static str, online_type: &'static str) -> Guest {
    let image = image::ensure().expect("guest image (kernel from Debian's packages, static agent)");
    let config = GuestConfig::new(agent, online_type);
    Guest::boot(&image, config).expect("guest boots")
}

/// The bridge in front of `guest` as VM `vm1`, once the agent answers through it.
async fn behind_bridge(guest: &Guest) -> (BridgeProcess, Clients) {
    let bridge = BridgeProcess::start(&[("vm1", &guest.qga_socket())])
        .await
        .expect("bridge");
    let c = bridge.clients().await.expect("clients");
    scenario::ping_until_ok(&c, "vm1", PATIENCE)
        .await
        .expect("agent answers through the bridge");
    (bridge, c)
}

/// After a disruption started at `since`, the bridge answers again by itself.
async fn recovers(c: &Clients, t: &mut Timings, what: &str, since: Instant, timeout: Duration) {
    let failed = scenario::ping_until_ok(c, "vm1", timeout)
        .await
        .unwrap_or_else(|e| panic!("no recovery after {what}: {e:#}"));
    t.record(
        &format!("{what} to next successful call ({failed} failed)"),
        since.elapsed(),
    );
    let blocks = scenario::blocks(c, "vm1").await.expect("blocks");
    assert!(!blocks.is_empty(), "blocks after {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_online_movable_full_unplug_cycle() {
    let guest = boot("ours", "online_movable");
    let (_bridge, c) = behind_bridge(&guest).await;
    let mut t = Timings::default();
    t.record("boot to running agent", guest.boot_time);
    if let Err(e) = scenario::unplug_cycle(&c, "vm1", &guest.control(), &mut t).await {
        panic!("{e:#}\nconsole:\n{}", guest.console_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_online_memory_cannot_be_given_back() {
    let guest = boot("ours", "online");
    let (_bridge, c) = behind_bridge(&guest).await;
    let mut t = Timings::default();
    let added = scenario::hot_add_and_online(&c, "vm1", &guest.control(), &mut t)
        .await
        .expect("hot-add and online");
    let results = scenario::try_offline(&c, "vm1", &added.blocks, 5)
        .await
        .expect("offline attempt");
    eprintln!("e2e: offlining plain-online blocks: {results:?}");
    let refused: Vec<_> = results
        .iter()
        .filter(|r| r.response() == MemoryBlockResponseType::OperationFailed)
        .collect();
    assert!(
        !refused.is_empty(),
        "with plain `online` the kernel put the DIMM in ZONE_NORMAL and should refuse to offline some of it: {results:?}"
    );
    for r in &refused {
        assert!(
            r.error_code.is_some_and(|e| e > 0),
            "refusal carries the kernel's errno: {r:?}"
        );
    }
    // The guest keeps the memory, so the DIMM cannot be unplugged.
    let unplug = guest
        .control()
        .unplug_dimm(&added.id, Duration::from_secs(10));
    assert!(
        unplug.is_err(),
        "the DIMM must not leave while its memory is in use"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_agent_in_the_guest_works_through_the_bridge() {
    let guest = boot("reference", "online");
    let (_bridge, c) = behind_bridge(&guest).await;
    let mut agent = c.agent.clone();
    let info = agent
        .get_info(qga_proto::v1::GetInfoRequest { vm: "vm1".into() })
        .await
        .expect("guest-info")
        .into_inner();
    assert!(
        info.version.starts_with('7'),
        "the reference qemu-ga answers: {}",
        info.version
    );
    let mut t = Timings::default();
    scenario::hot_add_and_online(&c, "vm1", &guest.control(), &mut t)
        .await
        .expect("hot-add and online with qemu-ga");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_recovers_from_agent_and_qemu_restarts() {
    let mut guest = boot("ours", "online_movable");
    // No host is connected yet: the virtio port reads EOF, and the agent must sleep, not
    // spin.
    agent_idles(&guest, "while no host is connected").await;
    hosts_replace_one_another(&guest);
    let (_bridge, c) = behind_bridge(&guest).await;
    agent_idles(&guest, "with the bridge connected and idle").await;

    let mut t = Timings::default();
    let since = Instant::now();
    guest
        .control()
        .restart_agent()
        .expect("restart agent in the guest");
    recovers(&c, &mut t, "agent restart", since, PATIENCE).await;
    agent_idles(&guest, "after an agent restart, the bridge connected").await;

    let since = Instant::now();
    guest.restart_qemu().expect("QEMU restarts");
    recovers(&c, &mut t, "QEMU restart", since, PATIENCE).await;
    agent_idles(&guest, "after a QEMU restart, the bridge connected again").await;
}

/// Hosts that replace one another while the agent works: host A asks for the memory
/// blocks and goes without reading the answer; host B connects a few ms later and
/// synchronises (`guest-sync-delimited`). The guest may read B's request before its
/// driver learns that B connected (the connection message is handled later than data),
/// and a port with no host takes no bytes: the replies must wait for the host, not be
/// lost. B skips A's stale answer, as a QGA host does.
fn hosts_replace_one_another(guest: &Guest) {
    let connect = || {
        let mut host = qga_testkit::QgaClient::connect(&guest.qga_socket()).expect("connect");
        // A bound on each reply, not a timing: a TCG guest on a loaded machine is slow.
        host.set_timeout(Duration::from_secs(60)).expect("timeout");
        host
    };
    for i in 0..20u64 {
        let mut a = connect();
        a.send_raw(br#"{"execute":"guest-get-memory-blocks"}"#)
            .expect("host A sends");
        drop(a);
        std::thread::sleep(Duration::from_millis(2 * i));
        let mut b = connect();
        let id = 1000 + i;
        let sync = serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        b.send_raw(sync.to_string().as_bytes())
            .expect("host B sends");
        loop {
            match b.read_reply() {
                Ok(v) if v["return"] == id => break,
                Ok(_stale) => {}
                Err(e) => panic!("host B (round {i}) got no answer to its sync: {e}"),
            }
        }
        let reply = b.execute("guest-ping", None).expect("host B pings");
        assert_eq!(reply["return"], serde_json::json!({}), "round {i}: {reply}");
    }
}

/// Fails if the guest's agent uses CPU while nobody asks it anything for 3 s: a spinning
/// agent uses ~300 ticks (all of the vCPU), an idle one none.
async fn agent_idles(guest: &Guest, when: &str) {
    let before = guest.control().agent_cpu_ticks().expect("agent cpu");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = guest.control().agent_cpu_ticks().expect("agent cpu") - before;
    eprintln!("e2e: agent CPU {when}: {idle} ticks in 3 s");
    assert!(idle < 30, "the agent spins {when}: {idle} ticks in 3 s");
}
