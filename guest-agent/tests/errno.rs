//! Write failures a plain file tree cannot produce (the kernel's EBUSY and EINVAL), injected
//! behind the `StateWriter` trait, served through the real request loop.

use std::os::fd::BorrowedFd;

use qga_agent::{Agent, CommandFilter, MemoryTree, OnlineType, StateWriter, server::serve};
use qga_testkit::FakeSysfs;
use rustix::io::Errno;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Fails writes to chosen blocks with a chosen errno, like the kernel refusing to
/// offline unmovable pages (EBUSY) or boot memory (EINVAL); records what was attempted.
#[derive(Debug)]
struct Refusing {
    refuse: Vec<(u64, Errno)>,
    attempts: std::sync::Mutex<Vec<(u64, String)>>,
}

impl StateWriter for Refusing {
    fn write_state(&self, _block: BorrowedFd<'_>, index: u64, value: &str) -> Result<(), Errno> {
        self.attempts
            .lock()
            .expect("lock")
            .push((index, value.to_string()));
        match self.refuse.iter().find(|(i, _)| *i == index) {
            Some((_, e)) => Err(*e),
            None => Ok(()),
        }
    }
}

async fn exchange(agent: &Agent, request: Value) -> Value {
    let (mut host, guest) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(guest);
    let mut bytes = serde_json::to_vec(&request).expect("encode");
    bytes.push(b'\n');
    host.write_all(&bytes).await.expect("write");
    host.shutdown().await.expect("shutdown");
    let (served, reply) = tokio::join!(serve(r, w, agent, 1 << 20), async {
        let mut out = Vec::new();
        host.read_to_end(&mut out).await.expect("read");
        out
    });
    served.expect("serve");
    serde_json::from_slice(&reply).expect("one JSON reply")
}

#[tokio::test(flavor = "current_thread")]
async fn kernel_refusals_become_operation_failed_with_errno() {
    let tree = FakeSysfs::with_blocks(4, "online");
    tree.set_state(3, "offline");
    let writer = Refusing {
        refuse: vec![(0, Errno::INVAL), (1, Errno::BUSY)],
        attempts: Default::default(),
    };
    let agent = Agent::new(
        MemoryTree::new(tree.root()),
        OnlineType::OnlineMovable,
        CommandFilter::default(),
    )
    .with_writer(Box::new(writer));
    let reply = exchange(
        &agent,
        json!({"execute": "guest-set-memory-blocks", "id": "w1", "arguments": {"mem-blks": [
            {"phys-index": 0, "online": false},
            {"phys-index": 1, "online": false},
            {"phys-index": 2, "online": false},
            {"phys-index": 3, "online": true},
        ]}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"return": [
            {"phys-index": 0, "response": "operation-failed", "error-code": 22},
            {"phys-index": 1, "response": "operation-failed", "error-code": 16},
            {"phys-index": 2, "response": "success"},
            {"phys-index": 3, "response": "success"},
        ], "id": "w1"})
    );
}
