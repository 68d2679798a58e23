//! A fault-injecting fake agent behind the bridge: each fault gives the caller the right
//! error, and the next call gets the right answer.

mod common;

use std::time::Duration;

use common::{clients, config, rpc, start, with_timeout};
use qga_fake_agent::{FakeAgent, Fault};
use qga_proto::v1::{
    GetMemoryBlockInfoRequest, GetMemoryBlocksRequest, MemoryBlockChange, PingRequest,
    SetMemoryBlocksRequest,
};
use serde_json::json;
use tonic::Code;

fn sock(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(name)
}

/// The next GetMemoryBlocks must return exactly the fake's 4 blocks.
async fn next_call_is_right(c: &mut common::Clients) {
    let blocks = c
        .memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
        .await
        .expect("next call succeeds")
        .into_inner()
        .blocks;
    let idx: Vec<u64> = blocks.iter().map(|b| b.phys_index).collect();
    assert_eq!(idx, [0, 1, 2, 3]);
}

async fn setup(
    faults: &[Fault],
    tweak: impl FnOnce(&mut qga_bridge::Config),
) -> (
    tempfile::TempDir,
    FakeAgent,
    qga_bridge::Bridge,
    common::Clients,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = sock(&dir, "vm.sock");
    let agent = FakeAgent::start(&path, 4).expect("fake agent");
    for f in faults {
        agent.control().push(f.clone());
    }
    let mut cfg = config(&[("vm", &path)]);
    tweak(&mut cfg);
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;
    (dir, agent, bridge, c)
}

#[tokio::test]
async fn slow_reply_times_out_and_the_late_reply_is_discarded() {
    // The caller's deadline must pass while the agent works on the call: the call has a
    // second to get there, over a channel already connected and synchronised, and the
    // agent answers well after that.
    let (deadline, late) = (Duration::from_secs(1), Duration::from_millis(2500));
    let (_d, agent, _b, mut c) = setup(&[], |_| {}).await;
    next_call_is_right(&mut c).await;
    let synced = agent.control().calls("guest-sync-delimited");
    agent.control().push(Fault::Delay(late));
    let err = c
        .memory
        .get_memory_block_info(with_timeout(
            GetMemoryBlockInfoRequest { vm: "vm".into() },
            deadline,
        ))
        .await
        .expect_err("deadline");
    // The bridge answers DEADLINE_EXCEEDED 10 ms before the caller's own timer; on a loaded
    // machine that timer (CANCELLED) can still win. Either way the call failed in time.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err}"
    );
    // Let the late reply arrive on the channel; it must not reach the next caller. (On a
    // machine too slow for it to be there yet, the next call's handshake meets it instead,
    // which must go as well.)
    tokio::time::sleep(late - deadline).await;
    next_call_is_right(&mut c).await;
    assert!(
        agent.control().calls("guest-sync-delimited") > synced,
        "resynced after the timeout"
    );
}

#[tokio::test]
async fn never_replying_times_out_via_jsonrpc_default_deadline() {
    // The ping must reach the agent (and meet its fault) before its deadline: a connected,
    // synchronised channel and two seconds.
    let (_d, agent, _b, mut c) = setup(&[], |cfg| {
        cfg.timeouts.commands.insert("guest-ping".into(), 2000);
    })
    .await;
    next_call_is_right(&mut c).await;
    agent.control().push(Fault::NoReply);
    let err = rpc(&c.http, "guest-ping", json!({"vm": "vm"}))
        .await
        .expect_err("timeout");
    assert_eq!(err.0, -32003, "{err:?}");
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn stale_replies_and_garbage_are_discarded() {
    let (_d, _agent, b, mut c) = setup(
        &[
            Fault::StaleFirst,
            Fault::GarbageFirst(b"}}]]nonsense\x00{\"x\":1}\n".to_vec()),
            Fault::StaleFirst,
        ],
        |_| {},
    )
    .await;
    next_call_is_right(&mut c).await; // a reply with a foreign id first, then ours
    next_call_is_right(&mut c).await; // garbage first, then ours
    next_call_is_right(&mut c).await; // the previous call's reply again, then ours
    next_call_is_right(&mut c).await;
    let text = b.metrics().encode();
    assert!(
        text.contains("qga_bridge_stale_replies_total{vm=\"vm\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn oversize_and_too_deep_replies_are_refused() {
    let (_d, agent, _b, mut c) = setup(&[], |cfg| {
        cfg.limits.max_reply_bytes = 64 * 1024;
    })
    .await;
    for fault in [Fault::Oversize(200_000), Fault::TooDeep(2000)] {
        agent.control().push(fault);
        let err = c
            .memory
            .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Internal, "{err}");
        next_call_is_right(&mut c).await;
    }
}

#[tokio::test]
async fn wrong_shape_is_internal() {
    let (_d, _agent, _b, mut c) = setup(&[Fault::WrongShape, Fault::WrongShape], |_| {}).await;
    let err = c
        .memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
        .await
        .expect_err("bad");
    assert_eq!(err.code(), Code::Internal);
    let err = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "vm"}))
        .await
        .expect_err("bad");
    assert_eq!(err.0, -32008);
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn disconnect_mid_reply_then_reconnect() {
    // A write is not retried when the agent may have seen it.
    let (_d, agent, _b, mut c) = setup(&[Fault::DisconnectMidReply], |_| {}).await;
    let err = rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "mem-blks": [{"phys-index": 1, "online": true}]}),
    )
    .await
    .expect_err("cut off");
    assert_eq!(err.0, -32002, "{err:?}");
    next_call_is_right(&mut c).await;
    // A read cut off mid-reply is retried once on a new connection.
    agent.control().push(Fault::DisconnectMidReply);
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn agent_restart_is_transparent() {
    let (_d, agent, _b, mut c) = setup(&[], |_| {}).await;
    next_call_is_right(&mut c).await;
    let path = agent.path().to_path_buf();
    let control = agent.control().clone();
    drop(agent);
    let err = c
        .agent
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect_err("agent gone");
    assert_eq!(err.code(), Code::Unavailable);
    let _agent = FakeAgent::start_with(&path, control).expect("restart");
    // Wait out the reconnect backoff, bounded.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        match c.agent.ping(PingRequest { vm: "vm".into() }).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bridge did not recover: {e}"),
        }
    }
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn idle_connection_to_a_restarted_agent_is_replaced_without_an_error() {
    let (_d, agent, _b, mut c) = setup(&[], |_| {}).await;
    next_call_is_right(&mut c).await;
    let _agent = agent.restart().expect("restart");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The bridge still holds the dead connection; a read is retried on a new one.
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn agent_ignoring_the_handshake_is_unavailable() {
    let (_d, _agent, _b, mut c) =
        setup(&[Fault::MuteSync], |cfg| cfg.timeouts.resync_ms = 300).await;
    let err = c
        .agent
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect_err("no handshake");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    tokio::time::sleep(Duration::from_millis(250)).await; // reconnect backoff
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn agent_errors_are_mapped() {
    let (_d, _agent, _b, mut c) = setup(
        &[
            Fault::Error(
                "CommandNotFound".into(),
                "Command guest-get-memory-blocks has been disabled".into(),
            ),
            Fault::Error(
                "GenericError".into(),
                "Parameter 'mem-blks' is missing".into(),
            ),
            Fault::Error(
                "GenericError".into(),
                "open(\"/sys/devices/system/memory\"): Permission denied".into(),
            ),
            Fault::Error(
                "GenericError".into(),
                "open(\"/sys/devices/system/memory\"): Permission denied".into(),
            ),
        ],
        |_| {},
    )
    .await;
    let codes: Vec<Code> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                c.memory
                    .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
                    .await
                    .expect_err("error")
                    .code(),
            );
        }
        v
    };
    assert_eq!(
        codes,
        [
            Code::Unimplemented,
            Code::InvalidArgument,
            Code::FailedPrecondition
        ]
    );
    let err = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "vm"}))
        .await
        .expect_err("error");
    assert_eq!(err.0, -32007);
    assert_eq!(
        err.2,
        Some(
            json!({"class": "GenericError", "desc": "open(\"/sys/devices/system/memory\"): Permission denied"})
        )
    );
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn bad_requests_never_reach_the_guest() {
    let (_d, agent, _b, mut c) = setup(&[], |_| {}).await;
    let missing = c
        .memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: "nope".into() })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    let empty = c
        .memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: String::new() })
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    for params in [
        json!({}),
        json!({"vm": "vm", "extra": 1}),
        json!({"vm": "vm", "mem-blks": [{"phys-index": -1, "online": true}]}),
        json!({"vm": "vm", "mem-blks": [{"phys-index": 1}]}),
        json!({"vm": "vm", "mem-blks": "all"}),
    ] {
        let err = rpc(&c.http, "guest-set-memory-blocks", params.clone())
            .await
            .expect_err("invalid");
        assert_eq!(err.0, -32602, "{params}");
    }
    assert_eq!(
        rpc(&c.http, "guest-ping", json!({"vm": "nope"}))
            .await
            .expect_err("unknown")
            .0,
        -32001
    );
    assert_eq!(agent.control().calls("guest-set-memory-blocks"), 0);
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn missing_socket_is_unavailable_and_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = sock(&dir, "absent.sock");
    let bridge = start(config(&[("ghost", &path)])).await;
    let mut c = clients(&bridge).await;
    let err = c
        .agent
        .ping(PingRequest { vm: "ghost".into() })
        .await
        .expect_err("no socket");
    assert_eq!(err.code(), Code::Unavailable);
    let vms = c
        .vms
        .list_vms(qga_proto::v1::ListVmsRequest {})
        .await
        .expect("list")
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].name, "ghost");
    assert_eq!(vms[0].state(), qga_proto::v1::AgentState::Disconnected);
    assert!(
        vms[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("absent.sock"))
    );
}

#[tokio::test]
async fn a_guest_that_stops_reading_costs_one_call_not_the_channel() {
    // The deadline must pass while the write is blocked, not in the handshake before it:
    // two seconds for a handshake the agent answers at once.
    let (_d, agent, _b, mut c) = setup(&[], |cfg| {
        cfg.timeouts
            .commands
            .insert("guest-set-memory-blocks".into(), 2000);
        cfg.limits.max_set_entries = 60_000;
    })
    .await;
    // Garbage makes the bridge resync before its next call; at that handshake the agent
    // answers, then stops draining its socket: a large write (about 2 MB) cannot be sent
    // before the deadline.
    agent.control().push(Fault::GarbageFirst(b"!!".to_vec()));
    next_call_is_right(&mut c).await;
    agent
        .control()
        .push(Fault::StallAfterSync(Duration::from_secs(30)));
    let blocks: Vec<_> = (0..60_000u64)
        .map(|i| json!({"phys-index": 1_000_000 + i, "online": true}))
        .collect();
    let err = rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "mem-blks": blocks}),
    )
    .await
    .expect_err("not sent in time");
    assert_eq!(err.0, -32003, "{err:?}");
    // Half a request may still sit in the bridge's buffer for that connection: the next
    // call must not wait behind it but go over a new one.
    next_call_is_right(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_guest_fails_only_its_own_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bad_path, good_path) = (sock(&dir, "bad.sock"), sock(&dir, "good.sock"));
    let bad = FakeAgent::start(&bad_path, 4).expect("bad agent");
    for _ in 0..3 {
        bad.control().push(Fault::NoReply);
        bad.control().push(Fault::Oversize(1 << 20));
    }
    let _good = FakeAgent::start(&good_path, 4).expect("good agent");
    let mut cfg = config(&[("bad", &bad_path), ("good", &good_path)]);
    cfg.limits.queue_depth = 4;
    cfg.limits.max_reply_bytes = 64 * 1024;
    cfg.timeouts
        .commands
        .insert("guest-set-memory-blocks".into(), 300);
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;

    // Flood the bad VM with writes (never merged) it will not answer properly...
    let mut bad_calls = Vec::new();
    for i in 0..20u64 {
        let http = c.http.clone();
        bad_calls.push(tokio::spawn(async move {
            rpc(
                &http,
                "guest-set-memory-blocks",
                json!({"vm": "bad", "mem-blks": [{"phys-index": i % 4, "online": true}]}),
            )
            .await
            .map_err(|e| e.0)
        }));
    }
    // ...while the good VM serves every caller, each within its own deadline.
    let mut good_calls = Vec::new();
    for _ in 0..50 {
        let mut memory = c.memory.clone();
        good_calls.push(tokio::spawn(async move {
            memory
                .get_memory_blocks(with_timeout(
                    GetMemoryBlocksRequest { vm: "good".into() },
                    Duration::from_secs(5),
                ))
                .await
                .map(|r| r.into_inner().blocks.len())
                .map_err(|e| e.code())
        }));
    }
    for t in good_calls {
        assert_eq!(t.await.expect("task"), Ok(4));
    }
    let mut codes = Vec::new();
    for t in bad_calls {
        if let Err(code) = t.await.expect("task") {
            codes.push(code);
        }
    }
    assert!(
        codes.contains(&-32004),
        "the bad VM's queue filled: {codes:?}"
    );
    assert!(
        codes.iter().all(|c| [-32003, -32004, -32008].contains(c)),
        "{codes:?}"
    );
}

#[tokio::test]
async fn members_no_schema_names_never_reach_callers() {
    let extra = json!([
        {"phys-index": 0, "online": true, "can-offline": true, "secret": "guest text"},
        {"phys-index": 1, "online": false, "can-offline": true, "x": [1, 2]},
    ]);
    let (_d, _agent, _b, mut c) = setup(
        &[
            Fault::Reply(extra),
            Fault::Reply(json!({"pong": "with a payload"})),
        ],
        |cfg| cfg.coalesce_reads = false,
    )
    .await;
    let blocks = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "vm"}))
        .await
        .expect("served");
    assert_eq!(
        blocks,
        json!([
            {"phys-index": 0, "online": true, "can-offline": true},
            {"phys-index": 1, "online": false, "can-offline": true},
        ])
    );
    let pong = rpc(&c.http, "guest-ping", json!({"vm": "vm"}))
        .await
        .expect("served");
    assert_eq!(pong, json!({}));
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn set_results_that_do_not_answer_the_request_are_internal() {
    let ok = |i: u64| json!({"phys-index": i, "response": "success"});
    let (_d, _agent, _b, mut c) = setup(
        &[
            // Reordered, then naming another block, then one result short.
            Fault::Reply(json!([ok(2), ok(1)])),
            Fault::Reply(json!([ok(1), ok(3)])),
            Fault::Reply(json!([ok(1)])),
        ],
        |_| {},
    )
    .await;
    let request = SetMemoryBlocksRequest {
        vm: "vm".into(),
        blocks: vec![
            MemoryBlockChange {
                phys_index: 1,
                online: true,
            },
            MemoryBlockChange {
                phys_index: 2,
                online: true,
            },
        ],
    };
    let err = c
        .memory
        .set_memory_blocks(request.clone())
        .await
        .expect_err("reordered results are not believed");
    assert_eq!(err.code(), Code::Internal, "{err}");
    let params = json!({"vm": "vm", "mem-blks": [
        {"phys-index": 1, "online": true}, {"phys-index": 2, "online": true}]});
    for _ in 0..2 {
        let err = rpc(&c.http, "guest-set-memory-blocks", params.clone())
            .await
            .expect_err("mismatched results are not believed");
        assert_eq!(err.0, -32008, "{err:?}");
    }
    // The channel was resynchronised: the next set gets its own, matching results.
    let results = c
        .memory
        .set_memory_blocks(request)
        .await
        .expect("served")
        .into_inner()
        .results;
    let idx: Vec<u64> = results.iter().map(|r| r.phys_index).collect();
    assert_eq!(idx, [1, 2]);
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn duplicate_blocks_are_refused_before_the_guest_is_asked() {
    let (_d, agent, _b, mut c) = setup(&[], |_| {}).await;
    let twice = MemoryBlockChange {
        phys_index: 1,
        online: true,
    };
    let err = c
        .memory
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: "vm".into(),
            blocks: vec![
                twice,
                MemoryBlockChange {
                    online: false,
                    ..twice
                },
            ],
        })
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "mem-blks": [
            {"phys-index": 3, "online": true}, {"phys-index": 3, "online": true}]}),
    )
    .await
    .expect_err("duplicate");
    assert_eq!(err.0, -32602, "{err:?}");
    assert_eq!(agent.control().calls("guest-set-memory-blocks"), 0);
    assert_eq!(agent.control().online(1), Some(false));
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn jsonrpc_callers_bound_a_call_with_timeout_ms() {
    let delay = Duration::from_millis(1500);
    let (_d, _agent, _b, mut c) = setup(&[Fault::Delay(delay)], |_| {}).await;
    let t0 = std::time::Instant::now();
    let err = rpc(
        &c.http,
        "guest-get-memory-block-info",
        json!({"vm": "vm", "timeout-ms": 300}),
    )
    .await
    .expect_err("times out");
    assert_eq!(err.0, -32003, "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the caller's bound, not the default"
    );
    for bad in [
        json!(0),
        json!(-1),
        json!("1000"),
        json!(1.5),
        json!(86_400_001),
    ] {
        let err = rpc(
            &c.http,
            "guest-ping",
            json!({"vm": "vm", "timeout-ms": bad}),
        )
        .await
        .expect_err("refused");
        assert_eq!(err.0, -32602, "timeout-ms {bad}: {err:?}");
    }
    next_call_is_right(&mut c).await;
}

#[tokio::test]
async fn a_set_that_outlives_its_caller_is_recorded_and_applied_once() {
    // The caller gives up after a second, over a channel already connected and
    // synchronised, while the guest works for five: time to see the VM busy meanwhile.
    let (_d, agent, b, mut c) = setup(&[], |_| {}).await;
    next_call_is_right(&mut c).await;
    agent.control().push(Fault::Delay(Duration::from_secs(5)));
    let err = rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "timeout-ms": 1000, "mem-blks": [{"phys-index": 1, "online": true}]}),
    )
    .await
    .expect_err("the caller gives up first");
    assert_eq!(err.0, -32003, "{err:?}");
    // While the guest works, the VM is busy, not unavailable.
    let busy = rpc(&c.http, "guest-ping", json!({"vm": "vm"}))
        .await
        .expect_err("busy");
    assert_eq!(busy.0, -32004, "{busy:?}");
    let listed = rpc(&c.http, "vm-list", json!({})).await.expect("listed");
    assert_eq!(listed[0]["state"], "busy");
    assert_eq!(listed[0]["last-write"]["outcome"], "pending");
    // Within the command's timeout the late outcome is recorded with its results.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let write = loop {
        let listed = rpc(&c.http, "vm-list", json!({})).await.expect("listed");
        if listed[0]["last-write"]["late"] == true {
            break listed[0]["last-write"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no late outcome: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(write["outcome"], "ok");
    assert_eq!(
        write["results"],
        json!([{"phys-index": 1, "response": "success"}])
    );
    assert!(
        b.metrics()
            .encode()
            .contains("qga_bridge_late_replies_total{vm=\"vm\"} 1")
    );
    let listed = c
        .vms
        .list_vms(qga_proto::v1::ListVmsRequest {})
        .await
        .expect("listed")
        .into_inner();
    let last = listed.vms[0].last_write.as_ref().expect("last write");
    assert!(last.late && last.outcome == "ok" && last.results.len() == 1);
    // Applied exactly once, and the next call goes through.
    assert_eq!(agent.control().calls("guest-set-memory-blocks"), 1);
    assert_eq!(agent.control().online(1), Some(true));
    next_call_is_right(&mut c).await;
}
