//! The client's protocol, tested over in-memory pipes with paused time: each test plays
//! QEMU's end of the connection and asserts what callers get and what QEMU sees.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use qga_testkit::{PipeEnds, Pipes};
use qga_wire::{Frame, QgaCodec};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf},
    sync::broadcast,
    task::JoinHandle,
    time::Instant,
};
use tokio_util::codec::FramedRead;

use crate::{
    Event, Qmp, QmpError, QmpLimits, QmpState, conn::Incoming, conn::classify,
    memory::MemoryDevice, wait_for_event,
};

/// A client under test and the means to play its QEMU.
struct Rig {
    qmp: Qmp,
    qemus: PipeEnds,
}

impl Rig {
    fn new() -> Self {
        Self::with(QmpLimits::default())
    }

    fn with(limits: QmpLimits) -> Self {
        let (pipes, qemus) = Pipes::new(64 * 1024);
        let qmp = Qmp::with_connector("/test/qmp.sock".into(), pipes, limits);
        Self { qmp, qemus }
    }

    /// The QEMU end of the next connection the client opens.
    async fn accept(&mut self) -> FakeQemu {
        let stream = self.qemus.accept().await.expect("the client connects");
        let (read, write) = tokio::io::split(stream);
        FakeQemu {
            frames: FramedRead::new(read, QgaCodec::default()),
            write,
        }
    }

    /// The next connection, greeted and negotiated.
    async fn accept_ready(&mut self) -> FakeQemu {
        let mut qemu = self.accept().await;
        qemu.handshake().await;
        qemu
    }

    /// Runs `command` on a task, with a deadline `secs` from now.
    fn spawn(
        &self,
        command: &str,
        arguments: Value,
        secs: u64,
    ) -> JoinHandle<Result<Value, QmpError>> {
        let qmp = self.qmp.clone();
        let command = command.to_string();
        let arguments = match arguments {
            Value::Object(m) => Some(m),
            _ => None,
        };
        tokio::spawn(async move { qmp.execute(&command, arguments, deadline(secs)).await })
    }

    fn connects(&self) -> usize {
        self.qemus.connects()
    }
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

/// QEMU's end of one connection.
struct FakeQemu {
    frames: FramedRead<ReadHalf<DuplexStream>, QgaCodec>,
    write: WriteHalf<DuplexStream>,
}

impl FakeQemu {
    /// The next request; `None` once the client closed the connection.
    async fn recv(&mut self) -> Option<Value> {
        match self.frames.next().await? {
            Ok(Frame::Value(v)) => Some(v),
            other => panic!("the client sent {other:?}"),
        }
    }

    /// The next request, which must be `command`; returns its id and arguments.
    async fn expect(&mut self, command: &str) -> (Value, Value) {
        let request = self.recv().await.expect("a request");
        assert_eq!(request["execute"], command, "request {request}");
        let id = request.get("id").cloned().expect("every request has an id");
        (id, request.get("arguments").cloned().unwrap_or(Value::Null))
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }

    async fn send(&mut self, message: Value) {
        let mut line = message.to_string();
        line.push_str("\r\n");
        self.raw(line.as_bytes()).await;
    }

    async fn reply(&mut self, id: &Value, value: Value) {
        self.send(json!({"return": value, "id": id})).await;
    }

    async fn handshake(&mut self) {
        self.raw(GREETING.as_bytes()).await;
        let (id, arguments) = self.expect("qmp_capabilities").await;
        assert_eq!(arguments, Value::Null, "no capabilities asked for");
        self.reply(&id, json!({})).await;
    }

    /// Waits for the client to close the connection.
    async fn closed(mut self) {
        while let Some(frame) = self.frames.next().await {
            assert!(frame.is_ok(), "no garbage from the client");
        }
    }
}

async fn join(call: JoinHandle<Result<Value, QmpError>>) -> Result<Value, QmpError> {
    call.await.expect("the call does not panic")
}

/// One command answered on the current connection, which must be `qemu`.
/// A command that connects (greeting, capabilities) and is answered `value`; the
/// connection's QEMU side, for what the test does next.
async fn first_round_trip(rig: &mut Rig, value: Value) -> FakeQemu {
    let call = rig.spawn("query-status", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("query-status").await;
    qemu.reply(&id, value.clone()).await;
    assert_eq!(join(call).await, Ok(value));
    qemu
}

async fn round_trip(rig: &Rig, qemu: &mut FakeQemu, value: Value) {
    let call = rig.spawn("query-status", Value::Null, 5);
    let (id, _) = qemu.expect("query-status").await;
    qemu.reply(&id, value.clone()).await;
    assert_eq!(join(call).await, Ok(value));
}

#[tokio::test(start_paused = true)]
async fn handshake_then_execute_returns_the_return_member() {
    let mut rig = Rig::new();
    assert_eq!(rig.qmp.state(), QmpState::Idle);
    assert_eq!(rig.connects(), 0, "no connection before the first command");
    let call = rig.spawn(
        "object-add",
        json!({"qom-type": "memory-backend-ram", "id": "m1"}),
        5,
    );
    let mut qemu = rig.accept().await;
    qemu.raw(GREETING.as_bytes()).await;
    let (id, arguments) = qemu.expect("qmp_capabilities").await;
    assert_eq!(arguments, Value::Null);
    assert_eq!(rig.qmp.state(), QmpState::Connecting);
    qemu.reply(&id, json!({})).await;
    let (id, arguments) = qemu.expect("object-add").await;
    assert_eq!(
        arguments,
        json!({"qom-type": "memory-backend-ram", "id": "m1"})
    );
    qemu.reply(&id, json!({"any": ["value"]})).await;
    assert_eq!(join(call).await, Ok(json!({"any": ["value"]})));
    assert_eq!(rig.qmp.state(), QmpState::Connected);
    assert_eq!(rig.qmp.connections(), 1);
    let version = rig.qmp.qemu_version().expect("from the greeting");
    assert_eq!(
        version.to_string(),
        "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    );
    // The connection is kept for the next command.
    round_trip(&rig, &mut qemu, json!(7)).await;
    assert_eq!(rig.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_command_without_arguments_sends_none() {
    let mut rig = Rig::new();
    let call = rig.spawn("query-version", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let request = qemu.recv().await.expect("request");
    assert!(request.get("arguments").is_none(), "{request}");
    qemu.reply(&request["id"], json!({})).await;
    assert!(join(call).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn qemu_errors_become_command_errors() {
    let mut rig = Rig::new();
    let call = rig.spawn("nonexistent", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("nonexistent").await;
    qemu.send(json!({"id": id, "error": {"class": "CommandNotFound",
        "desc": "The command nonexistent has not been found"}}))
        .await;
    let err = join(call).await.expect_err("an error");
    assert_eq!(
        err,
        QmpError::Command {
            class: "CommandNotFound".into(),
            desc: "The command nonexistent has not been found".into()
        }
    );
    assert!(err.is_command_not_found());
    // A malformed error object or a reply with neither member is the caller's protocol error.
    let call = rig.spawn("a", Value::Null, 5);
    let (id, _) = qemu.expect("a").await;
    qemu.send(json!({"id": id, "error": "boom"})).await;
    assert!(matches!(join(call).await, Err(QmpError::Protocol(m)) if m.contains("boom")));
    let call = rig.spawn("b", Value::Null, 5);
    let (id, _) = qemu.expect("b").await;
    qemu.send(json!({"id": id, "something": 1})).await;
    assert!(matches!(join(call).await, Err(QmpError::Protocol(m)) if m.contains("neither")));
    assert_eq!(rig.connects(), 1, "the connection survives bad replies");
}

#[tokio::test(start_paused = true)]
async fn events_between_replies_are_broadcast_and_do_not_disturb_replies() {
    let mut rig = Rig::new();
    let mut events = rig.qmp.events();
    let call = rig.spawn("stop", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("stop").await;
    qemu.send(
        json!({"timestamp": {"seconds": 1796006809, "microseconds": 982995},
        "event": "STOP"}),
    )
    .await;
    qemu.send(
        json!({"event": "DEVICE_DELETED", "data": {"device": "dimm1",
        "path": "/machine/peripheral/dimm1"}, "timestamp": {"seconds": 1, "microseconds": 2}}),
    )
    .await;
    qemu.reply(&id, json!({})).await;
    assert_eq!(join(call).await, Ok(json!({})));
    let mut late = rig.qmp.events();
    let stop = events.recv().await.expect("STOP");
    assert_eq!(
        stop,
        Event {
            name: "STOP".into(),
            data: Value::Null,
            timestamp: Some((1796006809, 982995)),
        }
    );
    let deleted = events.recv().await.expect("DEVICE_DELETED");
    let info = deleted.device_deleted().expect("typed");
    assert_eq!(info.device.as_deref(), Some("dimm1"));
    assert_eq!(info.path, "/machine/peripheral/dimm1");
    assert!(stop.device_deleted().is_none());
    // Only events from subscription on.
    assert!(matches!(
        late.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));
}

#[tokio::test(start_paused = true)]
async fn replies_out_of_order_reach_their_callers() {
    let mut rig = Rig::new();
    let first = rig.spawn("first", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id1, _) = qemu.expect("first").await;
    let second = rig.spawn("second", Value::Null, 5);
    let (id2, _) = qemu.expect("second").await;
    assert_ne!(id1, id2);
    qemu.reply(&id2, json!("two")).await;
    qemu.reply(&id1, json!("one")).await;
    assert_eq!(join(second).await, Ok(json!("two")));
    assert_eq!(join(first).await, Ok(json!("one")));
}

#[tokio::test(start_paused = true)]
async fn garbage_and_foreign_frames_are_skipped() {
    let mut rig = Rig::new();
    let call = rig.spawn("query-status", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("query-status").await;
    qemu.raw(b"garbage [1, 2] \"text\" @@@ {\"a\" 1} \xff")
        .await;
    qemu.send(json!({"return": 5, "id": 999_999})).await;
    qemu.send(json!({"return": 5, "id": "not-ours"})).await;
    // QEMU's answer to a request it could not parse carries no id.
    qemu.send(json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}))
        .await;
    qemu.reply(&id, json!({"status": "running"})).await;
    assert_eq!(join(call).await, Ok(json!({"status": "running"})));
    round_trip(&rig, &mut qemu, json!(1)).await;
    assert_eq!(rig.connects(), 1);
    assert_eq!(rig.qmp.state(), QmpState::Connected);
}

#[tokio::test(start_paused = true)]
async fn too_many_stale_frames_drop_the_connection() {
    let mut rig = Rig::with(QmpLimits {
        max_stale_frames: 3,
        ..QmpLimits::default()
    });
    let call = rig.spawn("query-status", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let _ = qemu.expect("query-status").await;
    // Three are tolerated, a valid reply in between resets the count...
    qemu.raw(b"1 2 3 ").await;
    let other = rig.spawn("other", Value::Null, 5);
    let (id, _) = qemu.expect("other").await;
    qemu.reply(&id, json!(0)).await;
    assert_eq!(join(other).await, Ok(json!(0)));
    // ...a fourth in a row is too many.
    qemu.raw(b"1 2 3 4 ").await;
    let err = join(call).await.expect_err("connection dropped");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("max_stale_frames")),
        "{err}"
    );
    qemu.closed().await;
    assert!(
        matches!(rig.qmp.state(), QmpState::Disconnected { last_error, retry_in: None }
        if last_error.contains("max_stale_frames"))
    );
    // The next command reconnects at once.
    let _qemu = first_round_trip(&mut rig, json!(1)).await;
    assert_eq!(rig.qmp.connections(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_gives_timeout_and_the_late_reply_is_dropped() {
    let mut rig = Rig::new();
    let call = rig.spawn("slow", Value::Null, 1);
    let mut qemu = rig.accept_ready().await;
    let (late_id, _) = qemu.expect("slow").await;
    let start = Instant::now();
    assert_eq!(
        join(call).await,
        Err(QmpError::Timeout {
            command: "slow".into()
        })
    );
    assert!(start.elapsed() <= Duration::from_secs(1));
    let call = rig.spawn("next", Value::Null, 5);
    let (id, _) = qemu.expect("next").await;
    qemu.reply(&late_id, json!("late")).await;
    qemu.reply(&id, json!("mine")).await;
    assert_eq!(join(call).await, Ok(json!("mine")));
    assert_eq!(rig.connects(), 1, "a timeout keeps the connection");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_caller_leaves_nothing_behind() {
    let mut rig = Rig::new();
    let call = rig.spawn("cancelled", Value::Null, 60);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("cancelled").await;
    call.abort();
    assert!(call.await.expect_err("aborted").is_cancelled());
    qemu.reply(&id, json!("nobody")).await;
    round_trip(&rig, &mut qemu, json!("next")).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_connection_fails_pending_callers_and_the_next_call_reconnects() {
    let mut rig = Rig::new();
    let call = rig.spawn("device_del", json!({"id": "dimm1"}), 5);
    let mut qemu = rig.accept_ready().await;
    let _ = qemu.expect("device_del").await;
    let other = rig.spawn("query-status", Value::Null, 5);
    let _ = qemu.expect("query-status").await;
    drop(qemu);
    for call in [call, other] {
        let err = join(call).await.expect_err("lost");
        assert!(
            matches!(&err, QmpError::Unavailable(m) if m.contains("connection lost")),
            "{err}"
        );
    }
    assert!(matches!(
        rig.qmp.state(),
        QmpState::Disconnected { retry_in: None, .. }
    ));
    let _qemu = first_round_trip(&mut rig, json!("back")).await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_lost_while_idle_is_replaced_transparently() {
    let mut rig = Rig::new();
    let qemu = first_round_trip(&mut rig, json!(1)).await;
    drop(qemu); // QEMU restarted
    tokio::time::sleep(Duration::from_millis(10)).await;
    let _qemu = first_round_trip(&mut rig, json!(2)).await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_greeting_is_unavailable_and_backs_off() {
    let mut rig = Rig::new();
    let call = rig.spawn("query-status", Value::Null, 5);
    let mut qemu = rig.accept().await;
    qemu.send(json!({"hello": "I am no QEMU"})).await;
    let err = join(call).await.expect_err("bad greeting");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("bad greeting")),
        "{err}"
    );
    qemu.closed().await;
    // Within the backoff: fails at once, without connecting.
    let err = join(rig.spawn("query-status", Value::Null, 5))
        .await
        .expect_err("backoff");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("next attempt in")),
        "{err}"
    );
    assert_eq!(rig.connects(), 1);
    assert!(matches!(
        rig.qmp.state(),
        QmpState::Disconnected {
            retry_in: Some(_),
            ..
        }
    ));
    // After it, a good QEMU is reached.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _qemu = first_round_trip(&mut rig, json!("ok")).await;
    assert_eq!(rig.qmp.state(), QmpState::Connected);
}

#[tokio::test(start_paused = true)]
async fn garbage_for_a_greeting_and_a_refused_negotiation_are_unavailable() {
    let mut rig = Rig::with(QmpLimits {
        max_backoff: Duration::ZERO,
        ..QmpLimits::default()
    });
    let call = rig.spawn("x", Value::Null, 5);
    rig.accept().await.raw(b"@@@").await;
    let err = join(call).await.expect_err("bad greeting");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("bad greeting")),
        "{err}"
    );
    let call = rig.spawn("x", Value::Null, 5);
    let mut qemu = rig.accept().await;
    qemu.raw(GREETING.as_bytes()).await;
    let (id, _) = qemu.expect("qmp_capabilities").await;
    qemu.send(json!({"id": id, "error": {"class": "GenericError", "desc": "nope"}}))
        .await;
    let err = join(call).await.expect_err("refused");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("qmp_capabilities failed")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_up_to_its_cap_and_resets_on_success() {
    let mut rig = Rig::with(QmpLimits {
        max_backoff: Duration::from_millis(300),
        ..QmpLimits::default()
    });
    rig.qemus.refuse(true);
    let mut waits = Vec::new();
    for _ in 0..4 {
        let err = join(rig.spawn("x", Value::Null, 5))
            .await
            .expect_err("refused");
        assert!(matches!(&err, QmpError::Unavailable(m) if m.contains("cannot connect")));
        let QmpState::Disconnected {
            retry_in: Some(wait),
            ..
        } = rig.qmp.state()
        else {
            panic!("backing off");
        };
        waits.push(wait.as_millis());
        tokio::time::sleep(wait).await;
    }
    assert_eq!(waits, [100, 200, 300, 300]);
    rig.qemus.refuse(false);
    let call = rig.spawn("x", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("x").await;
    qemu.reply(&id, json!(1)).await;
    assert_eq!(join(call).await, Ok(json!(1)));
    drop(qemu);
    tokio::time::sleep(Duration::from_millis(10)).await;
    rig.qemus.refuse(true);
    let _ = join(rig.spawn("x", Value::Null, 5)).await;
    assert!(matches!(rig.qmp.state(),
        QmpState::Disconnected { retry_in: Some(w), .. } if w == Duration::from_millis(100)));
}

#[tokio::test(start_paused = true)]
async fn a_silent_qemu_times_out_connecting() {
    let mut rig = Rig::with(QmpLimits {
        connect_timeout: Duration::from_secs(2),
        ..QmpLimits::default()
    });
    // The caller's own deadline is shorter: a timeout, no verdict on QEMU, no backoff.
    let call = rig.spawn("x", Value::Null, 1);
    let _silent = rig.accept().await;
    assert_eq!(
        join(call).await,
        Err(QmpError::Timeout {
            command: "x".into()
        })
    );
    assert_eq!(rig.qmp.state(), QmpState::Idle);
    // The connect limit is shorter: unavailable, with the likely reason.
    let call = rig.spawn("x", Value::Null, 10);
    let _silent2 = rig.accept().await;
    let err = join(call).await.expect_err("no greeting");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("another client")),
        "{err}"
    );
    assert_eq!(rig.connects(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_oversized_message_is_skipped_bounded_and_reported_to_the_waiting_caller() {
    let mut rig = Rig::with(QmpLimits {
        max_message: 1024,
        ..QmpLimits::default()
    });
    let call = rig.spawn("query-memory-devices", Value::Null, 2);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("query-memory-devices").await;
    // 1 MiB of reply through a 64 KiB pipe into a client that keeps at most 1 KiB of it.
    qemu.raw(format!("{{\"id\": {id}, \"return\": [\"").as_bytes())
        .await;
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..16 {
        qemu.raw(&chunk).await;
    }
    qemu.raw(b"\"]}\n").await;
    let err = join(call).await.expect_err("too large");
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("max_message 1024")),
        "{err}"
    );
    // The connection goes on.
    round_trip(&rig, &mut qemu, json!("small")).await;
    assert_eq!(rig.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_closes_the_connection_and_ends_the_task() {
    let mut rig = Rig::new();
    let mut events = rig.qmp.events();
    let qemu = first_round_trip(&mut rig, json!(1)).await;
    let clone = rig.qmp.clone();
    drop(rig.qmp);
    drop(clone);
    qemu.closed().await;
    assert!(matches!(
        events.recv().await,
        Err(broadcast::error::RecvError::Closed)
    ));
}

#[tokio::test(start_paused = true)]
async fn execute_as_decodes_or_reports_a_protocol_error() {
    let mut rig = Rig::new();
    let qmp = rig.qmp.clone();
    let call = tokio::spawn(async move { qmp.query_memory_size_summary(deadline(5)).await });
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("query-memory-size-summary").await;
    qemu.reply(&id, json!({"base-memory": 1024, "plugged-memory": 512}))
        .await;
    let summary = call.await.expect("joined").expect("decodes");
    assert_eq!(
        (summary.base_memory, summary.plugged_memory),
        (1024, Some(512))
    );
    let qmp = rig.qmp.clone();
    let call = tokio::spawn(async move { qmp.query_memory_devices(deadline(5)).await });
    let (id, _) = qemu.expect("query-memory-devices").await;
    qemu.reply(&id, json!({"not": "a list"})).await;
    let err = call.await.expect("joined").expect_err("undecodable");
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("query-memory-devices")),
        "{err}"
    );
}

/// The commands `memory_helpers_send_what_qemu_expects` must send, with their arguments,
/// and the fake QEMU's replies.
fn memory_helper_exchanges() -> Vec<(&'static str, Value, Value)> {
    vec![
        (
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": "mem1", "size": 536870912}),
            json!({}),
        ),
        (
            "device_add",
            json!({"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1", "node": 0}),
            json!({}),
        ),
        (
            "device_add",
            json!({"driver": "pc-dimm", "id": "dimm2", "memdev": "mem2"}),
            json!({}),
        ),
        (
            "query-memory-devices",
            Value::Null,
            json!([{"type": "dimm", "data": {
            "memdev": "/objects/mem1", "hotplugged": true, "addr": 4294967296u64,
            "hotpluggable": true, "size": 536870912, "slot": 0, "node": 0, "id": "dimm1"}},
            {"type": "virtio-mem", "data": {"id": "vmem0", "memaddr": 4294967296u64,
                "requested-size": 0, "size": 0, "max-size": 2147483648u64,
                "block-size": 2097152, "node": 0, "memdev": "/objects/vm0"}},
            {"type": "virtio-mem", "data": {"id": "vmem1", "size": 0}}]),
        ),
        (
            "qom-get",
            json!({"path": "/machine", "property": "memory"}),
            json!({"size": 268435456, "slots": 4, "max-size": 2147483648u64}),
        ),
        ("device_del", json!({"id": "dimm1"}), json!({})),
        ("object-del", json!({"id": "mem1"}), json!({})),
        (
            "query-memdev",
            Value::Null,
            json!([{"id": "mem2", "size": 1, "merge": true,
            "dump": true, "prealloc": false, "share": false, "host-nodes": [],
            "policy": "default"}]),
        ),
        (
            "query-version",
            Value::Null,
            json!({"qemu": {"major": 10, "minor": 0, "micro": 2},
            "package": ""}),
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn memory_helpers_send_what_qemu_expects() {
    let mut rig = Rig::new();
    let qmp = rig.qmp.clone();
    let script = tokio::spawn(async move {
        let d = deadline(5);
        qmp.add_memory_backend_ram("mem1", 512 << 20, d).await?;
        qmp.add_pc_dimm("dimm1", "mem1", Some(0), d).await?;
        qmp.add_pc_dimm("dimm2", "mem2", None, d).await?;
        let devices = qmp.query_memory_devices(d).await?;
        let config = qmp.query_memory_config(d).await?;
        qmp.device_del("dimm1", d).await?;
        qmp.object_del("mem1", d).await?;
        let memdevs = qmp.query_memdev(d).await?;
        let version = qmp.query_version(d).await?;
        Ok::<_, QmpError>((devices, config, memdevs, version))
    });
    let mut qemu = rig.accept_ready().await;
    for (command, arguments, reply) in memory_helper_exchanges() {
        let (id, got) = qemu.expect(command).await;
        assert_eq!(got, arguments, "{command}");
        qemu.reply(&id, reply).await;
    }
    let (devices, config, memdevs, version) = script.await.expect("joined").expect("ran");
    assert_eq!(devices[0].as_dimm().map(|d| d.addr), Some(1 << 32));
    let vmem = devices[1].as_virtio_mem();
    assert_eq!(
        vmem.map(|v| (v.memaddr, v.max_size, v.block_size)),
        Some((1 << 32, 2 << 30, 2 << 20))
    );
    assert!(
        matches!(&devices[2], MemoryDevice::Other { kind, .. } if kind == "virtio-mem"),
        "a shape this code does not know is kept as it came"
    );
    assert_eq!((config.slots, config.max_size), (Some(4), Some(2 << 30)));
    assert_eq!(memdevs[0].id.as_deref(), Some("mem2"));
    assert_eq!(version.to_string(), "10.0.2");
}

/// What a QEMU 7.2 with `-device virtio-balloon-pci,id=balloon0` answers `qom-list` on
/// `/machine/peripheral`.
fn peripheral_with_a_balloon() -> Value {
    json!([{"name": "type", "type": "string"},
        {"name": "balloon0", "type": "child<virtio-balloon-pci>"}])
}

#[tokio::test(start_paused = true)]
async fn balloon_helpers_send_what_qemu_expects() {
    let mut rig = Rig::new();
    let qmp = rig.qmp.clone();
    let script = tokio::spawn(async move {
        let d = deadline(5);
        let info = qmp.query_balloon(d).await?;
        qmp.balloon(256 << 20, d).await?;
        let found = qmp.find_balloon(d).await?;
        let path = "/machine/peripheral/balloon0";
        let interval: u64 = qmp
            .balloon_property(path, "guest-stats-polling-interval", d)
            .await?;
        qmp.set_balloon_property(path, "guest-stats-polling-interval", json!(5), d)
            .await?;
        let stats: crate::GuestStats = qmp.balloon_property(path, "guest-stats", d).await?;
        Ok::<_, QmpError>((info, found, interval, stats))
    });
    let mut qemu = rig.accept_ready().await;
    let path = "/machine/peripheral/balloon0";
    let max = u64::MAX;
    let exchanges = [
        ("query-balloon", Value::Null, json!({"actual": 536870912})),
        ("balloon", json!({"value": 268435456}), json!({})),
        (
            "qom-list",
            json!({"path": "/machine/peripheral"}),
            peripheral_with_a_balloon(),
        ),
        (
            "qom-get",
            json!({"path": path, "property": "guest-stats-polling-interval"}),
            json!(0),
        ),
        (
            "qom-set",
            json!({"path": path, "property": "guest-stats-polling-interval", "value": 5}),
            json!({}),
        ),
        (
            "qom-get",
            json!({"path": path, "property": "guest-stats"}),
            json!({"stats": {"stat-swap-in": max, "stat-free-memory": 4096}, "last-update": 0}),
        ),
    ];
    for (command, arguments, reply) in exchanges {
        let (id, got) = qemu.expect(command).await;
        assert_eq!(got, arguments, "{command}");
        qemu.reply(&id, reply).await;
    }
    let (info, found, interval, stats) = script.await.expect("joined").expect("ran");
    assert_eq!(info.actual, 512 << 20);
    let found = found.expect("a balloon");
    assert_eq!(
        (found.path.as_str(), found.id.as_str(), found.kind.as_str()),
        (path, "balloon0", "virtio-balloon-pci")
    );
    assert_eq!(interval, 0);
    assert_eq!((stats.last_update, stats.stats.stat_free_memory), (0, 4096));
    assert_eq!(stats.stats.stat_swap_in, max);
}

#[tokio::test(start_paused = true)]
async fn an_anonymous_balloon_is_found_and_its_properties_read_from_the_virtio_child() {
    let mut rig = Rig::new();
    let qmp = rig.qmp.clone();
    let script = tokio::spawn(async move {
        let d = deadline(5);
        let found = qmp.find_balloon(d).await?.expect("found");
        let on: bool = qmp
            .balloon_property(&found.path, "deflate-on-oom", d)
            .await?;
        Ok::<_, QmpError>((found, on))
    });
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("qom-list").await;
    qemu.reply(&id, json!([{"name": "type", "type": "string"}]))
        .await;
    let (id, got) = qemu.expect("qom-list").await;
    assert_eq!(got, json!({"path": "/machine/peripheral-anon"}));
    let anon = json!([{"name": "device[0]", "type": "child<virtio-balloon-pci>"}]);
    qemu.reply(&id, anon).await;
    let (id, got) = qemu.expect("qom-get").await;
    let path = "/machine/peripheral-anon/device[0]";
    assert_eq!(got, json!({"path": path, "property": "deflate-on-oom"}));
    let desc = "Property 'virtio-balloon-pci.deflate-on-oom' not found";
    qemu.send(json!({"error": {"class": "GenericError", "desc": desc}, "id": id}))
        .await;
    let (id, got) = qemu.expect("qom-get").await;
    let child = format!("{path}/virtio-backend");
    assert_eq!(got, json!({"path": child, "property": "deflate-on-oom"}));
    qemu.reply(&id, json!(true)).await;
    let (found, on) = script.await.expect("joined").expect("ran");
    assert_eq!(
        (found.id.as_str(), found.path.as_str(), on),
        ("", path, true)
    );
}

#[tokio::test(start_paused = true)]
async fn no_balloon_is_device_not_active_or_none() {
    let mut rig = Rig::new();
    let qmp = rig.qmp.clone();
    let script = tokio::spawn(async move {
        let d = deadline(5);
        let query = qmp.query_balloon(d).await;
        let found = qmp.find_balloon(d).await;
        (query, found)
    });
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("query-balloon").await;
    let desc = "No balloon device has been activated";
    qemu.send(json!({"error": {"class": "DeviceNotActive", "desc": desc}, "id": id}))
        .await;
    for _ in 0..2 {
        let (id, _) = qemu.expect("qom-list").await;
        qemu.reply(&id, json!([{"name": "type", "type": "string"}]))
            .await;
    }
    let (query, found) = script.await.expect("joined");
    let err = query.expect_err("no balloon");
    assert!(
        err.is_device_not_active() && !err.is_device_not_found(),
        "{err}"
    );
    assert_eq!(found, Ok(None));
}

#[tokio::test(start_paused = true)]
async fn waiting_for_an_event() {
    let mut rig = Rig::new();
    let mut events = rig.qmp.events();
    let call = rig.spawn("device_del", json!({"id": "dimm1"}), 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("device_del").await;
    qemu.reply(&id, json!({})).await;
    assert!(join(call).await.is_ok());
    qemu.send(
        json!({"event": "ACPI_DEVICE_OST", "data": {"info": {"device": "dimm1",
        "slot": "0", "slot-type": "DIMM", "source": 3, "status": 0}}}),
    )
    .await;
    qemu.send(json!({"event": "DEVICE_DELETED", "data": {"device": "other", "path": "/p"}}))
        .await;
    qemu.send(json!({"event": "DEVICE_DELETED", "data": {"device": "dimm1", "path": "/q"}}))
        .await;
    let ost = wait_for_event(&mut events, "ACPI_DEVICE_OST", deadline(5), |e| {
        e.acpi_device_ost().is_some()
    })
    .await
    .expect("ost");
    let info = ost.acpi_device_ost().expect("typed");
    assert_eq!(
        (info.slot_type.as_str(), info.source, info.status),
        ("DIMM", 3, 0)
    );
    let deleted = wait_for_event(&mut events, "DEVICE_DELETED dimm1", deadline(5), |e| {
        e.device_deleted()
            .is_some_and(|d| d.device.as_deref() == Some("dimm1"))
    })
    .await
    .expect("deleted");
    assert_eq!(deleted.device_deleted().map(|d| d.path), Some("/q".into()));
    let err = wait_for_event(&mut events, "nothing", deadline(1), |_| true)
        .await
        .expect_err("times out");
    assert_eq!(
        err,
        QmpError::Timeout {
            command: "nothing".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_receiver_that_falls_behind_is_told() {
    let mut rig = Rig::with(QmpLimits {
        event_capacity: 2,
        ..QmpLimits::default()
    });
    let mut events = rig.qmp.events();
    let call = rig.spawn("x", Value::Null, 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("x").await;
    for n in 0..5 {
        qemu.send(json!({"event": "E", "data": n})).await;
    }
    qemu.reply(&id, json!({})).await;
    assert!(join(call).await.is_ok());
    let err = wait_for_event(&mut events, "E", deadline(1), |_| true)
        .await
        .expect_err("lagged");
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("event_capacity")),
        "{err}"
    );
}

fn idle_after(ms: u64) -> QmpLimits {
    QmpLimits {
        idle_close: Some(Duration::from_millis(ms)),
        ..QmpLimits::default()
    }
}

#[tokio::test(start_paused = true)]
async fn idle_close_releases_the_connection_and_the_next_command_reconnects() {
    let mut rig = Rig::with(idle_after(1000));
    let qemu = first_round_trip(&mut rig, json!(1)).await;
    let idle_from = Instant::now();
    qemu.closed().await;
    let waited = idle_from.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_millis(1100),
        "released after the idle time: {waited:?}"
    );
    assert_eq!(rig.qmp.state(), QmpState::Idle, "released, not failed");
    // The next command connects and negotiates again.
    let _qemu = first_round_trip(&mut rig, json!(2)).await;
    assert_eq!(rig.connects(), 2);
    assert_eq!(rig.qmp.connections(), 2);
    assert_eq!(rig.qmp.state(), QmpState::Connected);
}

#[tokio::test(start_paused = true)]
async fn idle_close_waits_for_a_command_in_flight() {
    let mut rig = Rig::with(idle_after(1000));
    let call = rig.spawn("query-status", Value::Null, 10);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("query-status").await;
    // QEMU takes three idle times to answer: the connection stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    qemu.reply(&id, json!("late")).await;
    assert_eq!(join(call).await, Ok(json!("late")));
    // Commands in a row keep it too.
    for n in 0..3 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        round_trip(&rig, &mut qemu, json!(n)).await;
    }
    assert_eq!(rig.connects(), 1);
    // Idle time counts from the end of the last command.
    let idle_from = Instant::now();
    qemu.closed().await;
    assert!(idle_from.elapsed() >= Duration::from_millis(1000));
}

#[tokio::test(start_paused = true)]
async fn idle_close_waits_while_an_events_receiver_exists() {
    let mut rig = Rig::with(idle_after(1000));
    // Subscribe, then the command whose event is awaited (as hotplug's device_del).
    let mut events = rig.qmp.events();
    let call = rig.spawn("device_del", json!({"id": "dimm1"}), 5);
    let mut qemu = rig.accept_ready().await;
    let (id, _) = qemu.expect("device_del").await;
    qemu.reply(&id, json!({})).await;
    assert!(join(call).await.is_ok());
    // The guest takes its time to eject: the connection is held meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rig.qmp.state(), QmpState::Connected);
    qemu.send(json!({"event": "DEVICE_DELETED", "data": {"device": "dimm1", "path": "/q"}}))
        .await;
    let deleted = wait_for_event(&mut events, "DEVICE_DELETED", deadline(1), |e| {
        e.device_deleted().is_some()
    })
    .await
    .expect("the event arrives on the held connection");
    assert_eq!(deleted.name, "DEVICE_DELETED");
    assert_eq!(rig.connects(), 1);
    // Done waiting: released within about the idle time.
    drop(events);
    let idle_from = Instant::now();
    qemu.closed().await;
    let waited = idle_from.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited <= Duration::from_millis(1300),
        "{waited:?}"
    );
    assert_eq!(rig.qmp.state(), QmpState::Idle);
}

#[tokio::test(start_paused = true)]
async fn without_idle_close_the_connection_is_held() {
    let mut rig = Rig::new();
    let mut qemu = first_round_trip(&mut rig, json!(1)).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    round_trip(&rig, &mut qemu, json!(2)).await;
    assert_eq!(rig.connects(), 1);
}

/// A QEMU monitor on a unix socket that, like QEMU, serves one client at a time: the next
/// one is accepted only once the current one closed. Answers every command with `{}`.
fn one_client_monitor(path: &std::path::Path) -> (JoinHandle<()>, Arc<AtomicUsize>) {
    let listener = tokio::net::UnixListener::bind(path).expect("bind");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (read, mut write) = tokio::io::split(stream);
            let mut frames = FramedRead::new(read, QgaCodec::default());
            let greeting = format!("{GREETING}\r\n");
            if write.write_all(greeting.as_bytes()).await.is_err() {
                continue;
            }
            while let Some(Ok(Frame::Value(request))) = frames.next().await {
                let reply = json!({"return": {}, "id": request["id"]});
                let line = format!("{reply}\r\n");
                if write.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    (task, served)
}

#[tokio::test]
async fn idle_close_lets_another_client_use_a_one_client_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let (server, served) = one_client_monitor(&path);
    let qmp = Qmp::new(path.clone(), idle_after(200));
    let soon = || Instant::now() + Duration::from_secs(5);
    qmp.execute("query-status", None, soon())
        .await
        .expect("first command");
    // Another client (Proxmox's qm, socat) gets QEMU's greeting once the bridge let go.
    let mut other = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let mut greeting = FramedRead::new(&mut other, QgaCodec::default());
    let first = tokio::time::timeout(Duration::from_secs(5), greeting.next())
        .await
        .expect("greeted once the client released the socket");
    assert!(matches!(first, Some(Ok(Frame::Value(v))) if v.get("QMP").is_some()));
    assert_eq!(qmp.state(), QmpState::Idle);
    drop(greeting);
    drop(other);
    // The next command connects again, and is served.
    qmp.execute("query-status", None, soon())
        .await
        .expect("reconnected");
    assert_eq!(qmp.connections(), 2);
    assert_eq!(served.load(Ordering::SeqCst), 3);
    server.abort();
}

#[test]
fn frames_are_sorted_into_replies_events_and_stale() {
    let value = |v: Value| classify(Frame::Value(v));
    assert_eq!(
        value(json!({"return": 1, "id": 3})),
        Incoming::Reply(3, Ok(json!(1)))
    );
    assert!(matches!(value(json!({"event": "X"})), Incoming::Event(e) if e.data.is_null()));
    assert!(matches!(
        value(json!({"event": 5, "id": 1})),
        Incoming::Reply(1, Err(_))
    ));
    assert!(matches!(value(json!({"return": 1})), Incoming::Stale(_)));
    assert!(matches!(
        value(json!({"return": 1, "id": -1})),
        Incoming::Stale(_)
    ));
    assert!(matches!(value(json!([1])), Incoming::Stale(_)));
    assert!(matches!(classify(Frame::Delimiter), Incoming::Stale(_)));
    assert!(matches!(
        classify(Frame::Invalid(qga_wire::FrameError::TooLarge { limit: 1 })),
        Incoming::Oversized(_)
    ));
    assert!(matches!(
        classify(Frame::Invalid(qga_wire::FrameError::Stray(b'@'))),
        Incoming::Stale(_)
    ));
}

#[test]
fn handles_can_be_shared_across_tasks() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Qmp>();
}
