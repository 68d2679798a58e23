//! The bridge in front of the real agents — our `qga-agent` and the reference `qemu-ga` —
//! on fake sysfs trees. Two identical trees, two agents of the same kind: one is asked
//! directly, the other through the bridge (gRPC and JSON-RPC), with the same requests in
//! the same order; every answer through the bridge must equal the agent's own.

mod common;

use common::{Clients, clients, config, rpc, start};
use qga_proto::v1::{
    GetInfoRequest, GetMemoryBlockInfoRequest, GetMemoryBlocksRequest, MemoryBlockChange,
    MemoryBlockResponseType, PingRequest, SetMemoryBlocksRequest,
};
use qga_testkit::{AgentKind, AgentProcess, FakeSysfs, QgaClient};
use serde_json::{Value, json};
use tonic::Code;

fn tree() -> FakeSysfs {
    let t = FakeSysfs::new();
    t.block_size(256 << 20)
        .blocks(0..6, "online")
        .blocks(32..36, "offline")
        .block(6, Some("online"), Some("0"))
        .block(7, None, Some("1"));
    t
}

fn sorted(mut v: Value) -> Value {
    if let Some(a) = v.as_array_mut() {
        a.sort_by_key(|b| b["phys-index"].as_u64());
    }
    v
}

/// The agent's own `return` value for a command.
fn direct(client: &mut QgaClient, command: &str, args: Option<Value>) -> Value {
    let reply = client.execute(command, args).expect("direct reply");
    reply
        .get("return")
        .cloned()
        .unwrap_or_else(|| panic!("{command}: agent error {reply}"))
}

/// gRPC blocks in QGA's JSON shape, sorted.
async fn grpc_blocks(c: &mut Clients) -> Value {
    let blocks = c
        .memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
        .await
        .expect("grpc blocks")
        .into_inner()
        .blocks;
    sorted(Value::Array(
        blocks
            .iter()
            .map(|b| {
                let mut v = json!({"phys-index": b.phys_index, "online": b.online});
                if let Some(c) = b.can_offline {
                    v["can-offline"] = json!(c);
                }
                v
            })
            .collect(),
    ))
}

fn response_name(t: MemoryBlockResponseType) -> &'static str {
    match t {
        MemoryBlockResponseType::Success => "success",
        MemoryBlockResponseType::NotFound => "not-found",
        MemoryBlockResponseType::OperationNotSupported => "operation-not-supported",
        MemoryBlockResponseType::OperationFailed => "operation-failed",
        MemoryBlockResponseType::Unspecified => "unspecified",
    }
}

async fn same_answers(kind: AgentKind) {
    let (mine, theirs) = (tree(), tree());
    let reference = AgentProcess::start(kind, &mine, &[]).expect("direct agent starts");
    let behind = AgentProcess::start(kind, &theirs, &[]).expect("bridged agent starts");
    let mut agent = reference.client().expect("connect");
    let bridge = start(config(&[("vm", behind.socket())])).await;
    let mut c = clients(&bridge).await;
    let who = kind.name();

    // Block list: JSON-RPC is the agent's value; gRPC carries the same blocks.
    let want = sorted(direct(&mut agent, "guest-get-memory-blocks", None));
    let via_rpc = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "vm"}))
        .await
        .expect("rpc blocks");
    assert_eq!(sorted(via_rpc), want, "{who}: JSON-RPC blocks");
    assert_eq!(grpc_blocks(&mut c).await, want, "{who}: gRPC blocks");

    // Block size.
    let want = direct(&mut agent, "guest-get-memory-block-info", None);
    assert_eq!(want, json!({"size": 256u64 << 20}));
    let via_rpc = rpc(&c.http, "guest-get-memory-block-info", json!({"vm": "vm"}))
        .await
        .expect("rpc info");
    assert_eq!(via_rpc, want, "{who}: JSON-RPC block info");
    let size = c
        .memory
        .get_memory_block_info(GetMemoryBlockInfoRequest { vm: "vm".into() })
        .await
        .expect("grpc info")
        .into_inner()
        .size;
    assert_eq!(Some(size), want["size"].as_u64(), "{who}: gRPC block info");

    // Writes, in order, failures included: one result per entry, equal to the agent's own,
    // and the trees end up alike. (Duplicate entries are refused by the bridge itself.)
    let first = json!([
        {"phys-index": 32, "online": true},
        {"phys-index": 33, "online": true},
        {"phys-index": 99, "online": true},
        {"phys-index": 0, "online": false},
        {"phys-index": 7, "online": false},
    ]);
    let want = direct(
        &mut agent,
        "guest-set-memory-blocks",
        Some(json!({"mem-blks": first})),
    );
    let via_rpc = rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "mem-blks": first}),
    )
    .await
    .expect("rpc set");
    assert_eq!(via_rpc, want, "{who}: JSON-RPC set results");

    let second = [(33u64, false), (34, true), (1000, false)];
    let want = direct(
        &mut agent,
        "guest-set-memory-blocks",
        Some(json!({"mem-blks": second
            .iter()
            .map(|(i, on)| json!({"phys-index": i, "online": on}))
            .collect::<Vec<_>>()})),
    );
    let results = c
        .memory
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: "vm".into(),
            blocks: second
                .iter()
                .map(|&(phys_index, online)| MemoryBlockChange { phys_index, online })
                .collect(),
        })
        .await
        .expect("grpc set")
        .into_inner()
        .results;
    let as_json: Vec<Value> = results
        .iter()
        .map(|r| {
            let mut v =
                json!({"phys-index": r.phys_index, "response": response_name(r.response())});
            if let Some(e) = r.error_code {
                v["error-code"] = json!(e);
            }
            v
        })
        .collect();
    assert_eq!(Value::Array(as_json), want, "{who}: gRPC set results");

    let want = sorted(direct(&mut agent, "guest-get-memory-blocks", None));
    assert_eq!(
        grpc_blocks(&mut c).await,
        want,
        "{who}: blocks after writes"
    );
    for i in [0, 32, 33, 34] {
        assert_eq!(mine.state(i), theirs.state(i), "{who}: block {i} state");
    }

    // Housekeeping.
    let want = direct(&mut agent, "guest-info", None);
    let via_rpc = rpc(&c.http, "guest-info", json!({"vm": "vm"}))
        .await
        .expect("rpc guest-info");
    assert_eq!(via_rpc, want, "{who}: JSON-RPC guest-info");
    let info = c
        .agent
        .get_info(GetInfoRequest { vm: "vm".into() })
        .await
        .expect("grpc info")
        .into_inner();
    assert_eq!(Some(info.version.as_str()), want["version"].as_str());
    assert_eq!(
        Some(info.supported_commands.len()),
        want["supported_commands"].as_array().map(Vec::len)
    );
    assert_eq!(
        rpc(&c.http, "guest-ping", json!({"vm": "vm"}))
            .await
            .expect("rpc ping"),
        direct(&mut agent, "guest-ping", None)
    );
    c.agent
        .ping(PingRequest { vm: "vm".into() })
        .await
        .expect("grpc ping");
    bridge.shutdown().await;
}

/// A command the agent has disabled (`-b`) is UNIMPLEMENTED / -32005 with QGA's class, and
/// guest-info lists it as disabled.
async fn disabled_command(kind: AgentKind) {
    let t = tree();
    let agent = AgentProcess::start(kind, &t, &["-b", "guest-get-memory-block-info"])
        .expect("agent starts");
    let bridge = start(config(&[("vm", agent.socket())])).await;
    let mut c = clients(&bridge).await;
    let err = c
        .memory
        .get_memory_block_info(GetMemoryBlockInfoRequest { vm: "vm".into() })
        .await
        .expect_err("disabled");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    let (code, _, data) = rpc(&c.http, "guest-get-memory-block-info", json!({"vm": "vm"}))
        .await
        .expect_err("disabled");
    assert_eq!(code, -32005);
    assert_eq!(
        data.as_ref().and_then(|d| d["class"].as_str()),
        Some("CommandNotFound")
    );
    let info = c
        .agent
        .get_info(GetInfoRequest { vm: "vm".into() })
        .await
        .expect("info")
        .into_inner();
    let listed = info
        .supported_commands
        .iter()
        .find(|c| c.name == "guest-get-memory-block-info")
        .expect("listed");
    assert!(!listed.enabled);
    // The other commands still work on the same channel.
    assert_eq!(grpc_blocks(&mut c).await.as_array().map(Vec::len), Some(12));
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qga_agent_answers_through_the_bridge_as_it_does_directly() {
    same_answers(AgentKind::Ours).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_qemu_ga_answers_through_the_bridge_as_it_does_directly() {
    same_answers(AgentKind::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qga_agent_disabled_command_is_unimplemented() {
    disabled_command(AgentKind::Ours).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_qemu_ga_disabled_command_is_unimplemented() {
    disabled_command(AgentKind::Reference).await;
}
