//! Many callers at once: each gets exactly its own answer, the queue bound holds, and
//! identical reads are coalesced.

mod common;

use std::{ops::ControlFlow, time::Duration};

use common::{clients, config, eventually, start, with_timeout};
use qga_fake_agent::{FakeAgent, Fault};
use qga_proto::v1::{
    GetMemoryBlockInfoRequest, GetMemoryBlocksRequest, MemoryBlockChange, SetMemoryBlocksRequest,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_writers_on_one_vm_get_their_own_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 400).expect("fake agent");
    let mut cfg = config(&[("vm", &path)]);
    cfg.limits.queue_depth = 512;
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let mut memory = c.memory.clone();
        tasks.push(tokio::spawn(async move {
            let online = i % 3 == 0;
            let r = memory
                .set_memory_blocks(SetMemoryBlocksRequest {
                    vm: "vm".into(),
                    blocks: vec![MemoryBlockChange {
                        phys_index: i,
                        online,
                    }],
                })
                .await
                .expect("set succeeds")
                .into_inner();
            assert_eq!(r.results.len(), 1);
            assert_eq!(
                r.results[0].phys_index, i,
                "caller {i} got someone else's result"
            );
            (i, online)
        }));
    }
    for t in tasks {
        let (i, online) = t.await.expect("task");
        assert_eq!(agent.control().online(i), Some(online));
    }
    assert_eq!(
        agent.control().calls("guest-set-memory-blocks"),
        300,
        "writes are never merged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_vms_many_callers_never_mix_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agents = Vec::new();
    let mut vms = Vec::new();
    for v in 0..20u64 {
        let path = dir.path().join(format!("vm{v}.sock"));
        agents.push(FakeAgent::start(&path, v + 1).expect("fake agent"));
        vms.push((format!("vm{v}"), path));
    }
    let refs: Vec<(&str, &std::path::Path)> =
        vms.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
    let bridge = start(config(&refs)).await;
    let c = clients(&bridge).await;
    let mut tasks = Vec::new();
    for v in 0..20u64 {
        for _ in 0..20 {
            let mut memory = c.memory.clone();
            tasks.push(tokio::spawn(async move {
                let blocks = memory
                    .get_memory_blocks(GetMemoryBlocksRequest {
                        vm: format!("vm{v}"),
                    })
                    .await
                    .expect("get succeeds")
                    .into_inner()
                    .blocks;
                // VM v has exactly v+1 blocks: the answer came from the right VM.
                assert_eq!(blocks.len() as u64, v + 1);
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// How long the guest takes over the first of the ten sets below. The other nine are sent
/// once it has the set; they all reach the bridge's queue long before this on any machine.
const HELD: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 8).expect("fake agent");
    agent.control().push(Fault::Delay(HELD));
    let mut cfg = config(&[("vm", &path)]);
    cfg.limits.queue_depth = 2;
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;
    let set = |i: u64| {
        let mut memory = c.memory.clone();
        tokio::spawn(async move {
            memory
                .set_memory_blocks(SetMemoryBlocksRequest {
                    vm: "vm".into(),
                    blocks: vec![MemoryBlockChange {
                        phys_index: i % 8,
                        online: true,
                    }],
                })
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        })
    };
    // The first set is at the guest (the queue is empty again) before the others come.
    let mut tasks = vec![set(0)];
    eventually("the first set at the guest", || async {
        match agent.control().calls("guest-set-memory-blocks") {
            0 if !tasks[0].is_finished() => ControlFlow::Continue("no set at the guest yet"),
            _ => ControlFlow::Break(()),
        }
    })
    .await;
    tasks.extend((1..10u64).map(set));
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(Code::ResourceExhausted) => exhausted += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(exhausted > 0, "the bound must reject some calls");
    // At most one call executing plus `queue_depth` waiting were ever accepted.
    assert!((1..=3).contains(&ok), "accepted {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_reads_are_coalesced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 8).expect("fake agent");
    agent
        .control()
        .push(Fault::Delay(Duration::from_millis(500)));
    let bridge = start(config(&[("vm", &path)])).await;
    let c = clients(&bridge).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut memory = c.memory.clone();
        tasks.push(tokio::spawn(async move {
            memory
                .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
                .await
                .expect("get")
                .into_inner()
                .blocks
                .len()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 8);
    }
    let agent_calls = agent.control().calls("guest-get-memory-blocks");
    assert!(
        agent_calls < 50,
        "50 callers took {agent_calls} agent calls"
    );
    assert!(bridge.metrics().coalesced_count("vm") >= 50 - agent_calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_read_is_not_cut_short_by_the_starters_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 8).expect("fake agent");
    agent
        .control()
        .push(Fault::Delay(Duration::from_millis(600)));
    let bridge = start(config(&[("vm", &path)])).await;
    let c = clients(&bridge).await;
    // A short-deadline caller starts the agent call; a patient one joins it once the agent
    // has it (or the short one is over: then the patient one starts afresh).
    let mut impatient = c.memory.clone();
    let short = tokio::spawn(async move {
        impatient
            .get_memory_blocks(with_timeout(
                GetMemoryBlocksRequest { vm: "vm".into() },
                Duration::from_millis(200),
            ))
            .await
            .map(|r| r.into_inner().blocks.len())
            .map_err(|e| e.code())
    });
    eventually("the short call at the agent", || async {
        if agent.control().calls("guest-get-memory-blocks") > 0 || short.is_finished() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue("not yet")
        }
    })
    .await;
    let mut patient = c.memory.clone();
    let long = patient
        .get_memory_blocks(with_timeout(
            GetMemoryBlocksRequest { vm: "vm".into() },
            Duration::from_secs(20),
        ))
        .await
        .map(|r| r.into_inner().blocks.len())
        .map_err(|e| e.code());
    // The bridge answers DEADLINE_EXCEEDED 10 ms before the caller's own timer; on a loaded
    // machine the client's timer (CANCELLED) can still win that race.
    let short = short.await.expect("task");
    assert!(
        matches!(short, Err(Code::DeadlineExceeded | Code::Cancelled)),
        "the impatient caller times out: {short:?}"
    );
    assert_eq!(long, Ok(8), "the patient caller gets its answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_frees_the_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 8).expect("fake agent");
    agent.control().push(Fault::NoReply);
    let bridge = start(config(&[("vm", &path)])).await;
    let c = clients(&bridge).await;
    // A read that would wait for its (never coming) reply; its caller gives up once the
    // agent has it, which cancels the gRPC call. (A write is different: its outcome is
    // awaited even without a caller, see faults.rs.)
    let mut memory = c.memory.clone();
    let mut waiting = c.memory.clone();
    let call = tokio::spawn(async move {
        waiting
            .get_memory_block_info(GetMemoryBlockInfoRequest { vm: "vm".into() })
            .await
    });
    at_the_agent(&agent, "guest-get-memory-block-info", &call).await;
    call.abort();
    let gave_up = call.await;
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_cancelled()),
        "the agent never replies: {gave_up:?}"
    );
    // The next call is served well before the abandoned call's own deadline.
    let blocks = memory
        .get_memory_blocks(with_timeout(
            GetMemoryBlocksRequest { vm: "vm".into() },
            Duration::from_secs(20),
        ))
        .await
        .expect("served after the abandoned call")
        .into_inner()
        .blocks;
    assert_eq!(blocks.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_nobody_waits_for_is_never_served_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&path, 4).expect("fake agent");
    // The reply comes late enough for the caller to be gone; the bridge's next handshake
    // waits for the agent to be done with it (a budget, not a timing).
    agent.control().push(Fault::Delay(Duration::from_secs(2)));
    let mut cfg = config(&[("vm", &path)]);
    cfg.timeouts.resync_ms = 60_000;
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;
    // A read whose only caller gives up (the gRPC call is cancelled) once the agent has it,
    // before the reply.
    let mut memory = c.memory.clone();
    let mut leaving = c.memory.clone();
    let call = tokio::spawn(async move {
        leaving
            .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
            .await
    });
    at_the_agent(&agent, "guest-get-memory-blocks", &call).await;
    call.abort();
    let gave_up = call.await;
    assert!(gave_up.is_err_and(|e| e.is_cancelled()));
    // The table changes...
    memory
        .set_memory_blocks(with_timeout(
            SetMemoryBlocksRequest {
                vm: "vm".into(),
                blocks: vec![MemoryBlockChange {
                    phys_index: 1,
                    online: true,
                }],
            },
            Duration::from_secs(20),
        ))
        .await
        .expect("set");
    // ...and the next read sees the change: it is a new agent call, not the abandoned one.
    let blocks = memory
        .get_memory_blocks(with_timeout(
            GetMemoryBlocksRequest { vm: "vm".into() },
            Duration::from_secs(20),
        ))
        .await
        .expect("get")
        .into_inner()
        .blocks;
    let block1 = blocks.iter().find(|b| b.phys_index == 1).expect("block 1");
    assert!(block1.online, "the read reflects the write before it");
    assert_eq!(agent.control().calls("guest-get-memory-blocks"), 2);
}

/// Waits until the agent has received `command` (or `call` is over, for its caller to say
/// how).
async fn at_the_agent<T>(agent: &FakeAgent, command: &str, call: &tokio::task::JoinHandle<T>) {
    eventually(&format!("{command} at the agent"), || async {
        if agent.control().calls(command) > 0 || call.is_finished() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue("not yet")
        }
    })
    .await;
}
