//! `__org.qga-bridge_online-when-present` against the real kernel's uevent socket.
//!
//! The kernel announces a block again when `add` is written to its `uevent` file (a
//! synthetic event, the way `udevadm trigger` replays them; it changes nothing). These
//! tests run as root, as CI does; they do not skip.

use std::{
    fs,
    sync::mpsc,
    time::{Duration, Instant},
};

use qga_agent::{
    Agent, CommandFilter, MemoryTree, OnlineType,
    uevent::{BlockEvents, News, UeventSocket},
};
use qga_testkit::FakeSysfs;
use qga_wire::Request;
use serde_json::{Value, json};

/// The host's first memory block, which every Linux machine has.
const REAL_BLOCK: &str = "/sys/devices/system/memory/memory0/uevent";

/// A bound for what the kernel and the agent do at once, on a loaded machine; never a
/// measured timing.
const PATIENCE: Duration = Duration::from_secs(60);

/// Makes the kernel announce memory block 0 again.
fn replay_block0_add() {
    fs::write(REAL_BLOCK, "add").expect("writing 'add' to memory0/uevent (needs root)");
}

#[test]
fn the_kernel_announces_a_memory_block_on_the_socket() {
    let mut socket = UeventSocket::open().expect("open the uevent socket (needs root)");
    replay_block0_add();
    let until = Instant::now() + PATIENCE;
    loop {
        match socket.wait(until) {
            News::Added(blocks) if blocks.contains(&0) => break,
            News::Added(_) | News::Rescan => {}
            News::TimedOut => panic!("no add event for memory0 within {PATIENCE:?}"),
        }
    }
}

/// The kernel's socket, telling the test when the agent first waits on it (by then the
/// agent has looked at the tree once).
struct Announced {
    socket: UeventSocket,
    waiting: Option<mpsc::Sender<()>>,
}

impl BlockEvents for Announced {
    fn wait(&mut self, until: Instant) -> News {
        if let Some(tx) = self.waiting.take() {
            let _ = tx.send(());
        }
        self.socket.wait(until)
    }
}

#[test]
fn a_block_appearing_after_the_first_look_is_onlined_on_the_kernels_event() {
    // A fake tree without block 0; the real kernel's event for memory0 announces it.
    let tree = FakeSysfs::new();
    tree.block(1, Some("online"), Some("1"));
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let agent = Agent::new(
        MemoryTree::new(tree.root()),
        OnlineType::Online,
        CommandFilter::default(),
    )
    .with_events(Box::new(move || {
        let socket = UeventSocket::open().expect("open the uevent socket (needs root)");
        let waiting = tx.lock().ok().and_then(|mut t| t.take());
        Box::new(Announced { socket, waiting })
    }));
    let request = Request::from_value(json!({
        "execute": "__org.qga-bridge_online-when-present",
        "arguments": {"first": 0, "count": 1, "online-type": "online_movable",
                      "timeout-ms": 120_000},
    }))
    .expect("valid request");
    let reply = std::thread::scope(|s| {
        let call = s.spawn(|| {
            let mut out = Vec::new();
            agent.handle(request, &mut out);
            out
        });
        rx.recv_timeout(PATIENCE)
            .expect("the agent waits for events");
        tree.block(0, Some("offline"), Some("1"));
        replay_block0_add();
        call.join().expect("agent thread")
    });
    // Success, not not-found: the agent does not look at the tree again when its time is
    // up, so only the event can have brought block 0 to it.
    let reply: Value = serde_json::from_slice(&reply).expect("one JSON reply");
    assert_eq!(
        reply,
        json!({"return": [{"phys-index": 0, "response": "success"}]})
    );
    assert_eq!(tree.state(0), "online_movable");
    assert_eq!(tree.state(1), "online", "outside the range: untouched");
}
