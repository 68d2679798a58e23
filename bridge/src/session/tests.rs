//! The session's protocol, tested over in-memory pipes with paused time: each test scripts
//! the agent's end of the connection byte by byte and asserts what the caller gets and what
//! the agent sees next.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::BytesMut;
use qga_testkit::{PipeEnds, Pipes};
use qga_wire::{Frame, QgaCodec, schema::GuestMemoryBlockInfo};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    time::Instant,
};
use tokio_util::codec::Decoder;

use super::Session;
use crate::{
    call::{BlockChanges, Call, Reply},
    config::Config,
    error::BridgeError,
    metrics::Metrics,
};

/// A session under test and the means to play its agent.
struct Rig {
    session: Arc<Session>,
    agents: PipeEnds,
    metrics: Arc<Metrics>,
}

impl Rig {
    fn new() -> Self {
        Self::with(64 * 1024, |_| {})
    }

    /// A rig whose pipes hold `capacity` bytes, on a configuration `tweak`ed from one
    /// without coalescing.
    fn with(capacity: usize, tweak: impl FnOnce(&mut Config)) -> Self {
        let (pipes, agents) = Pipes::new(capacity);
        let mut config = Config {
            coalesce_reads: false,
            ..Config::default()
        };
        tweak(&mut config);
        let metrics = Metrics::new();
        let budget = super::ParseBudget::new(config.limits.parse_budget_bytes);
        let session = Session::spawn_with(
            "vm1",
            Path::new("/test/vm1"),
            pipes,
            super::SessionSettings::of(&config),
            metrics.clone(),
            budget,
        );
        Self {
            session,
            agents,
            metrics,
        }
    }

    /// The agent's end of the next connection the session opens.
    async fn accept(&mut self) -> Agent {
        let io = self.agents.accept().await.expect("the session connects");
        Agent {
            io,
            buf: BytesMut::new(),
            codec: QgaCodec::default(),
        }
    }

    /// Starts `call` with a deadline `ms` from now; the result arrives on the handle.
    fn start(&self, call: Call, ms: u64) -> tokio::task::JoinHandle<super::CallResult> {
        let session = self.session.clone();
        let deadline = Instant::now() + Duration::from_millis(ms);
        tokio::spawn(async move { session.call(call, Some(deadline)).await })
    }

    /// Frames skipped so far, from the VM's metric.
    fn stale(&self) -> u64 {
        let text = self.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix("qga_bridge_stale_replies_total{vm=\"vm1\"} "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn last_error(&self) -> String {
        self.session.status().last_error.unwrap_or_default()
    }

    fn connects(&self) -> usize {
        self.agents.connects()
    }

    /// Starts `call` on a fresh session: accepts its connection, answers the handshake and
    /// reads the request. Returns the pending call, the agent and the request's id.
    async fn open(
        &mut self,
        call: Call,
        ms: u64,
    ) -> (tokio::task::JoinHandle<super::CallResult>, Agent, Value) {
        let name = call.name();
        let pending = self.start(call, ms);
        let mut agent = self.accept().await;
        agent.handshake().await;
        let id = agent.expect(name).await;
        (pending, agent, id)
    }

    /// A ping goes through `agent`'s connection, after a handshake if `resync`.
    async fn ping_works(&self, agent: &mut Agent, resync: bool) {
        let call = self.start(Call::Ping, 1000);
        if resync {
            agent.handshake().await;
        }
        let id = agent.expect("guest-ping").await;
        agent.answer(&id, json!({})).await;
        assert!(matches!(call.await.expect("joins"), Ok(Reply::Ping(_))));
    }
}

/// The agent's end of one connection.
struct Agent {
    io: DuplexStream,
    buf: BytesMut,
    codec: QgaCodec,
}

impl Agent {
    /// The next frame the session sent; `None` once it closed the connection.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).expect("decodes") {
                return Some(frame);
            }
            if self.io.read_buf(&mut self.buf).await.expect("reads") == 0 {
                return None;
            }
        }
    }

    /// The next request, skipping delimiters.
    async fn request(&mut self) -> Value {
        loop {
            match self.frame().await.expect("a request") {
                Frame::Value(v) => return v,
                Frame::Delimiter => {}
                Frame::Invalid(e) => panic!("the session sent bad JSON: {e}"),
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("writes");
    }

    /// Expects the resync handshake and answers it, after `before` (bytes the session
    /// must ignore).
    async fn handshake_after(&mut self, before: &[u8]) {
        match self.frame().await {
            Some(Frame::Delimiter) => {}
            other => panic!("expected 0xFF first, got {other:?}"),
        }
        let sync = self.request().await;
        assert_eq!(sync["execute"], "guest-sync-delimited");
        let id = sync["arguments"]["id"].clone();
        let mut out = before.to_vec();
        out.push(0xFF);
        out.extend_from_slice(json!({ "return": id }).to_string().as_bytes());
        self.write(&out).await;
    }

    async fn handshake(&mut self) {
        self.handshake_after(b"").await;
    }

    /// Reads the next request, checks its command, and returns its id.
    async fn expect(&mut self, command: &str) -> Value {
        let req = self.request().await;
        assert_eq!(req["execute"], command, "{req}");
        req["id"].clone()
    }

    async fn answer(&mut self, id: &Value, ret: Value) {
        let reply = json!({ "return": ret, "id": id }).to_string();
        self.write(reply.as_bytes()).await;
    }
}

fn info(size: u64) -> Reply {
    Reply::GetMemoryBlockInfo(GuestMemoryBlockInfo { size })
}

fn set(changes: &[(u64, bool)]) -> Call {
    Call::SetMemoryBlocks(BlockChanges::new(changes.iter().copied(), 4096).expect("valid"))
}

#[tokio::test(start_paused = true)]
async fn a_reply_reaches_its_caller() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlockInfo, 1000).await;
    agent.answer(&id, json!({"size": 4096, "extra": 1})).await;
    assert_eq!(call.await.expect("joins"), Ok(info(4096)));
    // The channel stays in sync: the next call goes straight to the request.
    let call = rig.start(Call::Ping, 1000);
    let id = agent.expect("guest-ping").await;
    agent.answer(&id, json!({})).await;
    assert!(matches!(call.await.expect("joins"), Ok(Reply::Ping(_))));
}

#[tokio::test(start_paused = true)]
async fn stale_replies_are_skipped_then_the_channel_is_resynced() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlockInfo, 1000).await;
    agent.answer(&json!(12345), json!({"size": 1})).await;
    agent.answer(&json!("other"), json!({"size": 2})).await;
    agent.write(b"{\"return\": {\"size\": 3}}").await;
    agent.answer(&id, json!({"size": 4})).await;
    assert_eq!(call.await.expect("joins"), Ok(info(4)));
    assert_eq!(rig.stale(), 3);
    // Something else was on the channel, so the next call resyncs first.
    rig.ping_works(&mut agent, true).await;
}

#[tokio::test(start_paused = true)]
async fn garbage_is_skipped_and_dropped_by_the_next_resync() {
    let mut rig = Rig::new();
    let call = rig.start(Call::GetMemoryBlockInfo, 1000);
    let mut agent = rig.accept().await;
    agent.handshake_after(b"leftover {\"return\": 1}").await;
    let id = agent.expect("guest-get-memory-block-info").await;
    agent.write(b"garbage }}} \x01 [1, 2] tru").await;
    agent.write(b"e\n").await;
    agent.answer(&id, json!({"size": 7})).await;
    assert_eq!(call.await.expect("joins"), Ok(info(7)));
    let call = rig.start(Call::GetMemoryBlockInfo, 1000);
    // Junk before the agent's 0xFF is never even parsed.
    agent
        .handshake_after(b"{\"return\": {\"size\": 666}, \"id\": ")
        .await;
    let id = agent.expect("guest-get-memory-block-info").await;
    agent.answer(&id, json!({"size": 8})).await;
    assert_eq!(call.await.expect("joins"), Ok(info(8)));
}

#[tokio::test(start_paused = true)]
async fn a_reply_split_across_reads_is_reassembled() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlockInfo, 1000).await;
    let reply = json!({"return": {"size": 134217728}, "id": id}).to_string();
    for chunk in reply.as_bytes().chunks(3) {
        agent.write(chunk).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(call.await.expect("joins"), Ok(info(134_217_728)));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_mid_reply_fails_that_call_only() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlockInfo, 500).await;
    let reply = json!({"return": {"size": 99}, "id": id}).to_string();
    let (head, tail) = reply.split_at(reply.len() / 2);
    agent.write(head.as_bytes()).await;
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::DeadlineExceeded { .. })
    ));
    // The worker itself saw the deadline pass (not merely the caller leaving).
    assert!(
        rig.last_error().contains("no reply before the deadline"),
        "{}",
        rig.last_error()
    );
    // The rest of the late reply arrives during the next handshake and is dropped.
    let call = rig.start(Call::GetMemoryBlockInfo, 1000);
    agent.handshake_after(tail.as_bytes()).await;
    let id = agent.expect("guest-get-memory-block-info").await;
    agent.answer(&id, json!({"size": 100})).await;
    assert_eq!(call.await.expect("joins"), Ok(info(100)));
    assert_eq!(rig.connects(), 1, "connection kept");
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_frees_the_channel_and_its_reply_is_dropped() {
    let mut rig = Rig::new();
    let (first, mut agent, late) = rig.open(Call::GetMemoryBlockInfo, 60_000).await;
    first.abort();
    let _ = first.await;
    // The worker stops waiting at once: a call with a far shorter deadline gets through.
    let second = rig.start(Call::GetMemoryBlockInfo, 100);
    agent.answer(&late, json!({"size": 1})).await;
    agent.handshake().await;
    let id = agent.expect("guest-get-memory-block-info").await;
    agent.answer(&id, json!({"size": 2})).await;
    assert_eq!(second.await.expect("joins"), Ok(info(2)));
}

#[tokio::test(start_paused = true)]
async fn a_request_cut_off_half_sent_drops_the_connection() {
    // A pipe smaller than the request: the agent must read for it to go through.
    let mut rig = Rig::with(64, |_| {});
    let call = rig.start(set(&(0..64).map(|i| (i, true)).collect::<Vec<_>>()), 500);
    let mut agent = rig.accept().await;
    agent.handshake().await;
    // The agent stops reading: the request cannot be sent whole before the deadline.
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::DeadlineExceeded { .. })
    ));
    assert!(
        rig.last_error().contains("cut off while sent"),
        "{}",
        rig.last_error()
    );
    // The half-sent request never completes: the session closed that connection...
    let mut seen = Vec::new();
    while let Some(frame) = agent.frame().await {
        seen.push(frame);
    }
    assert!(
        seen.iter().all(|f| !matches!(f, Frame::Value(_))),
        "no whole request reached the agent: {seen:?}"
    );
    // ...and the next call opens a new one.
    let (call, mut agent, id) = rig.open(Call::Ping, 1000).await;
    agent.answer(&id, json!({})).await;
    assert!(call.await.expect("joins").is_ok());
    assert_eq!(rig.connects(), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_connects_back_off() {
    let mut rig = Rig::new();
    rig.agents.refuse(true);
    let err = rig.start(Call::Ping, 1000).await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("cannot connect")),
        "{err:?}"
    );
    // Within the backoff, calls fail at once without trying.
    let err = rig.start(Call::Ping, 1000).await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("reconnecting")),
        "{err:?}"
    );
    assert_eq!(rig.connects(), 1);
    // After it, the next call connects again; the backoff doubles on each failure.
    tokio::time::sleep(Duration::from_millis(110)).await;
    assert!(rig.start(Call::Ping, 1000).await.expect("joins").is_err());
    assert_eq!(rig.connects(), 2);
    tokio::time::sleep(Duration::from_millis(110)).await;
    assert!(rig.start(Call::Ping, 1000).await.expect("joins").is_err());
    assert_eq!(rig.connects(), 2, "backoff is now 200 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.agents.refuse(false);
    let (call, mut agent, id) = rig.open(Call::Ping, 1000).await;
    agent.answer(&id, json!({})).await;
    assert!(call.await.expect("joins").is_ok());
    assert_eq!(rig.connects(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_handshake_is_unavailable_and_backs_off() {
    let mut rig = Rig::new();
    // The caller's deadline is longer than the handshake's own limit (3 s).
    let call = rig.start(Call::Ping, 10_000);
    let mut agent = rig.accept().await;
    assert_eq!(agent.frame().await, Some(Frame::Delimiter));
    let _ = agent.request().await; // never answered
    let err = call.await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("resync failed")),
        "{err:?}"
    );
    // The connection is dropped and the next call waits out the backoff.
    assert_eq!(agent.frame().await, None, "connection closed");
    let err = rig.start(Call::Ping, 10_000).await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("reconnecting")),
        "{err:?}"
    );
    assert_eq!(rig.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_deadline_inside_the_handshake_keeps_the_connection() {
    let mut rig = Rig::new();
    // Shorter than the handshake's own limit: the agent is not to blame.
    let call = rig.start(Call::Ping, 500);
    let mut agent = rig.accept().await;
    assert_eq!(agent.frame().await, Some(Frame::Delimiter));
    let _ = agent.request().await; // not answered in time
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::DeadlineExceeded { .. })
    ));
    // No backoff, same connection, a new handshake.
    rig.ping_works(&mut agent, true).await;
    assert_eq!(rig.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_handshake_believes_only_its_own_reply_after_the_agents_delimiter() {
    let mut rig = Rig::new();
    let call = rig.start(Call::Ping, 10_000);
    let mut agent = rig.accept().await;
    assert_eq!(agent.frame().await, Some(Frame::Delimiter));
    let sync = agent.request().await;
    let id = sync["arguments"]["id"].clone();
    // The right answer, but before the agent's 0xFF: it must not count.
    agent
        .write(json!({ "return": id }).to_string().as_bytes())
        .await;
    let mut after = vec![0xFF];
    for wrong in [
        json!({ "return": 1 }),
        json!({ "return": id, "id": 1 }),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u{00ff}'"}}),
    ] {
        after.extend_from_slice(wrong.to_string().as_bytes());
    }
    agent.write(&after).await;
    agent
        .write(json!({ "return": id }).to_string().as_bytes())
        .await;
    let req = agent.expect("guest-ping").await;
    agent.answer(&req, json!({})).await;
    assert!(call.await.expect("joins").is_ok());
    assert_eq!(rig.stale(), 3, "the three wrong frames after 0xFF");
}

#[tokio::test(start_paused = true)]
async fn an_oversize_reply_is_unusable_and_resyncs() {
    let mut rig = Rig::with(64 * 1024, |c| c.limits.max_reply_bytes = 256);
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlocks, 1000).await;
    let blocks: Vec<Value> = (0..100)
        .map(|i| json!({"phys-index": i, "online": true, "can-offline": true}))
        .collect();
    agent.answer(&id, Value::Array(blocks)).await;
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::BadReply { .. })
    ));
    rig.ping_works(&mut agent, true).await;
}

#[tokio::test(start_paused = true)]
async fn guest_text_in_errors_is_clipped_and_escaped() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlockInfo, 1000).await;
    let flood = format!("\n\u{1b}[31m{}", "x".repeat(100_000));
    agent.answer(&id, json!({ "size": flood })).await;
    let err = call.await.expect("joins");
    let Err(BridgeError::BadReply { reason, .. }) = &err else {
        panic!("{err:?}");
    };
    assert!(reason.len() < 600, "{} bytes", reason.len());
    assert!(
        !reason.contains('\n') && !reason.contains('\u{1b}'),
        "{reason}"
    );
    assert!(rig.last_error().len() < 700);
}

#[tokio::test(start_paused = true)]
async fn concurrent_reads_share_one_agent_call() {
    let mut rig = Rig::with(64 * 1024, |c| c.coalesce_reads = true);
    let (first, mut agent, id) = rig.open(Call::GetMemoryBlockInfo, 1000).await;
    let others: Vec<_> = (0..5)
        .map(|_| rig.start(Call::GetMemoryBlockInfo, 2000))
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    agent.answer(&id, json!({"size": 42})).await;
    assert_eq!(first.await.expect("joins"), Ok(info(42)));
    for other in others {
        assert_eq!(other.await.expect("joins"), Ok(info(42)));
    }
    // Writes are never shared: each reaches the agent.
    let a = rig.start(set(&[(1, true)]), 1000);
    let b = rig.start(set(&[(1, true)]), 1000);
    for _ in 0..2 {
        let id = agent.expect("guest-set-memory-blocks").await;
        agent
            .answer(&id, json!([{"phys-index": 1, "response": "success"}]))
            .await;
    }
    for call in [a, b] {
        assert!(call.await.expect("joins").is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_mismatched_set_result_is_a_bad_reply_and_resyncs() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(set(&[(32, true), (33, true)]), 1000).await;
    let ok = |i: u64| json!({"phys-index": i, "response": "success"});
    agent.answer(&id, json!([ok(33), ok(32)])).await;
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::BadReply { .. })
    ));
    rig.ping_works(&mut agent, true).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_connection_retries_reads_but_never_writes() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::Ping, 1000).await;
    agent.answer(&id, json!({})).await;
    assert!(call.await.expect("joins").is_ok());

    // The agent dies after reading a read: it is run again on a new connection.
    let call = rig.start(Call::GetMemoryBlockInfo, 1000);
    agent.expect("guest-get-memory-block-info").await;
    drop(agent);
    let mut agent = rig.accept().await;
    agent.handshake().await;
    let id = agent.expect("guest-get-memory-block-info").await;
    agent.answer(&id, json!({"size": 5})).await;
    assert_eq!(call.await.expect("joins"), Ok(info(5)));

    // The agent dies after reading a write: it may have run it, so it is not sent again.
    let call = rig.start(set(&[(1, true)]), 1000);
    agent.expect("guest-set-memory-blocks").await;
    drop(agent);
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::Unavailable { .. })
    ));
    assert_eq!(rig.connects(), 2, "no new connection");
}

#[tokio::test(start_paused = true)]
async fn an_agent_error_passes_through_and_keeps_the_channel() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(Call::Info, 1000).await;
    let reply = json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": id});
    agent.write(reply.to_string().as_bytes()).await;
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::Agent(_))
    ));
    rig.ping_works(&mut agent, false).await;
}

fn one_success(i: u64) -> Value {
    json!([{"phys-index": i, "response": "success"}])
}

#[tokio::test(start_paused = true)]
async fn a_set_that_outlives_its_caller_is_awaited_and_recorded() {
    let mut rig = Rig::with(64 * 1024, |c| {
        c.timeouts
            .commands
            .insert("guest-set-memory-blocks".into(), 60_000);
    });
    let (call, mut agent, id) = rig.open(set(&[(32, true)]), 1000).await;
    // The guest takes longer than the caller would wait.
    assert!(matches!(
        call.await.expect("joins"),
        Err(BridgeError::DeadlineExceeded { .. })
    ));
    let status = rig.session.status();
    assert_eq!(status.state, super::AgentState::Busy);
    assert_eq!(
        status.last_write.as_ref().map(|w| w.outcome),
        Some("pending")
    );
    // Meanwhile other calls are refused as busy, not queued behind it nor sent.
    let err = rig.start(Call::Ping, 1000).await.expect("joins");
    assert!(matches!(err, Err(BridgeError::Busy { .. })), "{err:?}");
    // The outcome arrives late: recorded, counted, and the channel is usable at once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    agent.answer(&id, one_success(32)).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let status = rig.session.status();
    assert_eq!(status.state, super::AgentState::Connected);
    let write = status.last_write.expect("recorded");
    assert_eq!((write.outcome, write.late), ("ok", true));
    assert_eq!(write.results.len(), 1);
    assert_eq!(write.results[0].phys_index, 32);
    assert!(
        rig.metrics
            .encode()
            .contains("qga_bridge_late_replies_total{vm=\"vm1\"} 1")
    );
    rig.ping_works(&mut agent, false).await;
    assert_eq!(rig.stale(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_set_whose_caller_leaves_is_awaited_and_queued_calls_are_busy() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(set(&[(33, false)]), 60_000).await;
    let queued = rig.start(Call::GetMemoryBlockInfo, 60_000);
    call.abort();
    let _ = call.await;
    // The call queued behind it is answered busy by the worker, not left to time out.
    assert!(matches!(
        queued.await.expect("joins"),
        Err(BridgeError::Busy { .. })
    ));
    agent.answer(&id, one_success(33)).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let write = rig.session.status().last_write.expect("recorded");
    assert_eq!((write.outcome, write.late), ("ok", true));
    rig.ping_works(&mut agent, false).await;
}

#[tokio::test(start_paused = true)]
async fn a_set_never_answered_is_recorded_unknown_and_the_channel_resynced() {
    let mut rig = Rig::with(64 * 1024, |c| {
        c.timeouts
            .commands
            .insert("guest-set-memory-blocks".into(), 5_000);
    });
    let (call, mut agent, _id) = rig.open(set(&[(34, true)]), 1000).await;
    assert!(call.await.expect("joins").is_err());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = rig.session.status();
    assert_eq!(status.state, super::AgentState::Connected);
    let write = status.last_write.expect("recorded");
    assert_eq!(write.outcome, "deadline_exceeded");
    assert!(write.detail.is_some_and(|d| d.contains("unknown")));
    rig.ping_works(&mut agent, true).await;
}

#[tokio::test(start_paused = true)]
async fn a_set_answered_in_time_is_recorded_too() {
    let mut rig = Rig::new();
    let (call, mut agent, id) = rig.open(set(&[(35, true)]), 1000).await;
    agent.answer(&id, one_success(35)).await;
    assert!(call.await.expect("joins").is_ok());
    let write = rig.session.status().last_write.expect("recorded");
    assert_eq!((write.outcome, write.late), ("ok", false));
    assert_eq!(write.command, "guest-set-memory-blocks");
}

#[tokio::test(start_paused = true)]
async fn a_flooding_guest_has_its_channel_dropped_and_backed_off() {
    let mut rig = Rig::with(64 * 1024, |c| c.limits.max_stale_frames = 8);
    let (call, mut agent, _id) = rig.open(Call::GetMemoryBlockInfo, 10_000).await;
    for i in 0..20 {
        agent.answer(&json!(i), json!({"size": 1})).await;
    }
    let err = call.await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("max_stale_frames")),
        "{err:?}"
    );
    assert_eq!(agent.frame().await, None, "connection dropped");
    let err = rig.start(Call::Ping, 1000).await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("reconnecting")),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_bytes_are_budgeted_too() {
    let mut rig = Rig::with(1 << 20, |c| c.limits.max_stale_bytes = 100_000);
    let (call, mut agent, _id) = rig.open(Call::GetMemoryBlockInfo, 10_000).await;
    let big = "x".repeat(60_000);
    for i in 0..2 {
        agent.answer(&json!(i), json!(big)).await;
    }
    let err = call.await.expect("joins");
    assert!(
        matches!(&err, Err(BridgeError::Unavailable { reason, .. }) if reason.contains("max_stale_bytes")),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_large_reply_is_parsed_off_the_async_workers() {
    let mut rig = Rig::with(1 << 20, |_| {});
    let (call, mut agent, id) = rig.open(Call::GetMemoryBlocks, 10_000).await;
    // Over the offload threshold, with a large stale value before it.
    let blocks: Vec<Value> = (0..4000)
        .map(|i| json!({"phys-index": i, "online": i % 2 == 0, "can-offline": true}))
        .collect();
    agent.answer(&json!(7), json!("y".repeat(100_000))).await;
    agent.answer(&id, Value::Array(blocks)).await;
    match call.await.expect("joins") {
        Ok(Reply::GetMemoryBlocks(b)) => assert_eq!(b.len(), 4000),
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.stale(), 1);
}
