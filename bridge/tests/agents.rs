//! The bridge in front of the real agents — our `qga-agent` and the reference `qemu-ga` —
//! on fake sysfs trees: results through gRPC and JSON-RPC equal the agent's own replies.

mod common;

use common::{clients, config, rpc, start};
use qga_proto::v1::{
    GetInfoRequest, GetMemoryBlockInfoRequest, GetMemoryBlocksRequest, MemoryBlockChange,
    MemoryBlockResponseType, SetMemoryBlocksRequest,
};
use qga_testkit::{AgentKind, AgentProcess, FakeSysfs};
use serde_json::{Value, json};
use tonic::Code;

fn tree() -> FakeSysfs {
    let t = FakeSysfs::new();
    t.blocks(0..6, "online")
        .blocks(32..36, "offline")
        .block(6, Some("online"), Some("0"));
    t
}

fn sorted(mut v: Value) -> Value {
    if let Some(a) = v.as_array_mut() {
        a.sort_by_key(|b| b["phys-index"].as_u64());
    }
    v
}

async fn check(kind: AgentKind) {
    let t = tree();
    let agent = AgentProcess::start(kind, &t, &["-b", "guest-get-memory-block-info"])
        .expect("agent starts");
    let direct = sorted(
        agent
            .client()
            .expect("connect")
            .execute("guest-get-memory-blocks", None)
            .expect("reply")["return"]
            .clone(),
    );

    let bridge = start(config(&[("vm", agent.socket())])).await;
    let mut c = clients(&bridge).await;

    // JSON-RPC returns exactly the agent's value.
    let via_rpc = rpc(&c.http, "guest-get-memory-blocks", json!({"vm": "vm"}))
        .await
        .expect("rpc");
    assert_eq!(sorted(via_rpc), direct, "{}", kind.name());
    // gRPC carries the same blocks.
    let via_grpc = c
        .memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm".into() })
        .await
        .expect("grpc")
        .into_inner();
    let as_json = sorted(Value::Array(
        via_grpc
            .blocks
            .iter()
            .map(|b| json!({"phys-index": b.phys_index, "online": b.online, "can-offline": b.can_offline}))
            .collect(),
    ));
    assert_eq!(as_json, direct);

    // Writes land in the tree, in order, with per-block results.
    let r = c
        .memory
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: "vm".into(),
            blocks: vec![
                MemoryBlockChange {
                    phys_index: 32,
                    online: true,
                },
                MemoryBlockChange {
                    phys_index: 33,
                    online: true,
                },
                MemoryBlockChange {
                    phys_index: 99,
                    online: true,
                },
                MemoryBlockChange {
                    phys_index: 0,
                    online: false,
                },
            ],
        })
        .await
        .expect("set")
        .into_inner();
    let kinds: Vec<_> = r
        .results
        .iter()
        .map(|x| (x.phys_index, x.response(), x.error_code))
        .collect();
    assert_eq!(
        kinds,
        [
            (32, MemoryBlockResponseType::Success, None),
            (33, MemoryBlockResponseType::Success, None),
            (99, MemoryBlockResponseType::NotFound, Some(2)),
            (0, MemoryBlockResponseType::Success, None),
        ]
    );
    assert!(t.state(32).starts_with("online") && t.state(33).starts_with("online"));
    assert!(t.state(0).starts_with("offline"));
    let set_rpc = rpc(
        &c.http,
        "guest-set-memory-blocks",
        json!({"vm": "vm", "mem-blks": [{"phys-index": 32, "online": false}]}),
    )
    .await
    .expect("rpc set");
    assert_eq!(set_rpc, json!([{"phys-index": 32, "response": "success"}]));

    // A command the agent has disabled is UNIMPLEMENTED / -32005.
    let err = c
        .memory
        .get_memory_block_info(GetMemoryBlockInfoRequest { vm: "vm".into() })
        .await
        .expect_err("disabled");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    assert_eq!(
        rpc(&c.http, "guest-get-memory-block-info", json!({"vm": "vm"}))
            .await
            .expect_err("disabled")
            .0,
        -32005
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
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_in_front_of_qga_agent() {
    check(AgentKind::Ours).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_in_front_of_reference_qemu_ga() {
    check(AgentKind::Reference).await;
}
