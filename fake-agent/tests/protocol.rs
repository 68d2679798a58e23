//! The fake agent speaks QGA as the bridge expects: the handshake, the memory-block
//! commands over its table, and its scripted faults, seen from a raw client.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use qga_fake_agent::{FakeAgent, Fault};
use qga_wire::{Frame, QgaCodec};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, net::UnixStream, time::timeout};
use tokio_util::codec::Framed;

type Conn = Framed<UnixStream, QgaCodec>;

async fn connect(agent: &FakeAgent) -> Conn {
    let s = UnixStream::connect(agent.path()).await.expect("connect");
    Framed::new(s, QgaCodec::default())
}

async fn next(conn: &mut Conn) -> Frame {
    timeout(Duration::from_secs(10), conn.next())
        .await
        .expect("a frame before the deadline")
        .expect("stream open")
        .expect("decodes")
}

async fn call(conn: &mut Conn, request: Value) -> Value {
    conn.send(&request).await.expect("send");
    match next(conn).await {
        Frame::Value(v) => v,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn handshake_and_memory_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start(&dir.path().join("a.sock"), 3).expect("start");
    let mut c = connect(&agent).await;

    // 0xFF is answered with qemu-ga's parse error; guest-sync-delimited with 0xFF + reply.
    c.get_mut().write_all(&[0xFF]).await.expect("reset");
    assert_eq!(
        call(
            &mut c,
            json!({"execute": "guest-sync-delimited", "arguments": {"id": 77}})
        )
        .await["error"]["class"],
        "GenericError"
    );
    assert_eq!(next(&mut c).await, Frame::Delimiter);
    assert_eq!(next(&mut c).await, Frame::Value(json!({"return": 77})));

    let blocks = call(
        &mut c,
        json!({"execute": "guest-get-memory-blocks", "id": 1}),
    )
    .await;
    assert_eq!(blocks["id"], 1);
    assert_eq!(blocks["return"].as_array().map(Vec::len), Some(3));
    let set = call(
        &mut c,
        json!({"execute": "guest-set-memory-blocks", "id": 2, "arguments": {"mem-blks": [
            {"phys-index": 1, "online": true}, {"phys-index": 9, "online": true}]}}),
    )
    .await;
    assert_eq!(
        set["return"],
        json!([{"phys-index": 1, "response": "success"},
               {"phys-index": 9, "response": "not-found", "error-code": 2}])
    );
    assert_eq!(agent.control().online(1), Some(true));
    assert_eq!(
        call(&mut c, json!({"execute": "guest-nope"})).await["error"]["class"],
        "CommandNotFound"
    );
    assert_eq!(agent.control().calls("guest-get-memory-blocks"), 1);
}

#[tokio::test]
async fn stale_reply_repeats_the_previous_id_and_restart_keeps_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start(&dir.path().join("a.sock"), 2).expect("start");
    let mut c = connect(&agent).await;
    assert_eq!(
        call(&mut c, json!({"execute": "guest-ping", "id": 10})).await,
        json!({"return": {}, "id": 10})
    );
    agent.control().push(Fault::StaleFirst);
    // First a reply to request 10 again, then ours.
    let stale = call(&mut c, json!({"execute": "guest-ping", "id": 11})).await;
    assert_eq!(stale["id"], 10);
    assert_eq!(
        next(&mut c).await,
        Frame::Value(json!({"return": {}, "id": 11}))
    );

    call(
        &mut c,
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [
            {"phys-index": 1, "online": true}]}}),
    )
    .await;
    let agent = agent.restart().expect("restart");
    // The old connection is closed by the restart...
    let gone = timeout(Duration::from_secs(10), c.next())
        .await
        .expect("closed before the deadline");
    assert!(gone.is_none(), "{gone:?}");
    // ...and a new one sees the same table.
    let mut c = connect(&agent).await;
    let blocks = call(&mut c, json!({"execute": "guest-get-memory-blocks"})).await;
    assert_eq!(
        blocks["return"],
        json!([{"phys-index": 0, "online": true, "can-offline": true},
               {"phys-index": 1, "online": true, "can-offline": true}])
    );
}

#[tokio::test]
async fn memory_stats_are_offered_only_once_a_test_sets_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start(&dir.path().join("a.sock"), 1).expect("start");
    let mut c = connect(&agent).await;
    let stats = json!({"execute": "__org.qga-bridge_get-memory-stats", "id": 1});
    assert_eq!(
        call(&mut c, stats.clone()).await["error"]["class"],
        "CommandNotFound"
    );
    let listed = |info: &Value| {
        info["return"]["supported_commands"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "__org.qga-bridge_get-memory-stats")
    };
    assert!(!listed(
        &call(&mut c, json!({"execute": "guest-info"})).await
    ));
    let snapshot = qga_wire::schema::GuestMemoryStats {
        meminfo: qga_wire::schema::GuestMeminfo {
            mem_total: Some(1 << 30),
            mem_available: Some(1 << 29),
            ..Default::default()
        },
        boot_id: Some("boot-1".into()),
        ..Default::default()
    };
    agent.control().set_memory_stats(Some(snapshot));
    assert!(listed(
        &call(&mut c, json!({"execute": "guest-info"})).await
    ));
    assert_eq!(
        call(&mut c, stats).await["return"],
        json!({"meminfo": {"mem-total": 1073741824u64, "mem-available": 536870912u64},
               "vmstat": {}, "boot-id": "boot-1"})
    );
    assert_eq!(
        agent.control().calls("__org.qga-bridge_get-memory-stats"),
        2
    );
}
