//! Memory hotplug's checks and rules, against a fake agent and a scripted QEMU monitor: what
//! is refused before QEMU is asked, one operation per VM, request-ids, and errors that name
//! their step. The real plug and unplug cycle runs on a real guest (tests/tests/hotplug.rs).

mod common;

use std::{ops::ControlFlow, path::Path, sync::Arc, time::Duration};

use common::{clients, config, rpc, start};
use qga_fake_agent::FakeAgent;
use qga_proto::v1::memory_hotplug_client::MemoryHotplugClient;
use qga_testkit::qmp;
use serde_json::{Value, json};

/// A QEMU monitor that answers what the bridge asks from a script: it refuses `object-add`
/// (so no operation gets past it), answers `query-memory-devices` (with no DIMM) only
/// while its gate is open, and records every command.
struct FakeQmp {
    monitor: qmp::FakeQmp,
    gate: tokio::sync::watch::Sender<bool>,
}

impl FakeQmp {
    /// A monitor on `path`, its gate `open` or not.
    fn start(path: &Path, open: bool) -> Self {
        let (gate, _) = tokio::sync::watch::channel(open);
        let opened = gate.clone();
        let monitor = qmp::FakeQmp::start(path, move |command, _| {
            let mut gate = opened.subscribe();
            async move {
                match command.as_str() {
                    "qmp_capabilities" => qmp::ok(json!({})),
                    "query-memdev" => qmp::ok(json!([])),
                    "query-memory-devices" => {
                        let _ = gate.wait_for(|open| *open).await;
                        qmp::ok(json!([]))
                    }
                    "query-memory-size-summary" => qmp::ok(json!({"base-memory": 536_870_912u64})),
                    "object-add" => qmp::error("GenericError", "this QEMU refuses object-add"),
                    _ => qmp::not_found(&command),
                }
            }
        })
        .expect("bind QMP socket");
        Self { monitor, gate }
    }

    fn count(&self, command: &str) -> usize {
        self.monitor.count(command)
    }

    /// Waits until `command` has been asked `n` times in all.
    async fn asked(&self, command: &str, n: usize) {
        common::eventually(&format!("{command} asked {n} times"), || async {
            match self.count(command) {
                seen if seen >= n => ControlFlow::Break(()),
                seen => ControlFlow::Continue(format!("{seen} so far")),
            }
        })
        .await;
    }

    /// Opens the gate: `query-memory-devices` is answered from now on, and the ones
    /// waiting are answered at once.
    fn open(&self) {
        self.gate.send_replace(true);
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    _agents: Vec<FakeAgent>,
    qmp: FakeQmp,
    bridge: qga_bridge::Bridge,
}

/// VM `plain` has no QMP socket; VM `vm` has the scripted one, its gate `open` or not.
async fn setup(open: bool) -> Setup {
    setup_with(open, |_| {}).await
}

/// [`setup`] with the configuration changed by `tweak`.
async fn setup_with(open: bool, tweak: impl FnOnce(&mut qga_bridge::Config)) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let agents = vec![
        FakeAgent::start(&a, 8).expect("agent"),
        FakeAgent::start(&b, 8).expect("agent"),
    ];
    let qmp_path = dir.path().join("qmp.sock");
    let qmp = FakeQmp::start(&qmp_path, open);
    let mut c = config(&[("plain", &a), ("vm", &b)]);
    c.vms.get_mut("vm").expect("vm").qmp = Some(qmp_path);
    tweak(&mut c);
    let bridge = start(c).await;
    Setup {
        _dir: dir,
        _agents: agents,
        qmp,
        bridge,
    }
}

fn code(r: &Result<Value, (i32, String, Option<Value>)>) -> i32 {
    r.as_ref().map_or_else(|e| e.0, |_| 0)
}

#[tokio::test]
async fn checks_come_before_qemu_and_failures_name_their_step() {
    let s = setup(true).await;
    let c = clients(&s.bridge).await;

    let no_qmp = rpc(&c.http, "memory-layout", json!({"vm": "plain"})).await;
    assert_eq!(code(&no_qmp), -32007, "{no_qmp:?}");
    assert!(
        format!("{no_qmp:?}").contains("no QMP socket"),
        "{no_qmp:?}"
    );

    let odd = rpc(&c.http, "memory-plug", json!({"vm": "vm", "size": 1000})).await;
    assert_eq!(
        code(&odd),
        -32602,
        "not a multiple of the block size: {odd:?}"
    );
    assert_eq!(s.qmp.count("object-add"), 0, "QEMU was not asked");

    let missing = rpc(
        &c.http,
        "memory-unplug",
        json!({"vm": "vm", "dimm": "dimm9"}),
    )
    .await;
    assert_eq!(code(&missing), -32012, "{missing:?}");

    // QEMU refuses: the error names the step and QEMU's reason, and nothing else was tried.
    let plug = json!({"vm": "vm", "size": 536_870_912u64, "request-id": "r1"});
    let first = rpc(&c.http, "memory-plug", plug.clone()).await;
    let Err((-32007, message, Some(data))) = &first else {
        panic!("QEMU's refusal: {first:?}");
    };
    assert_eq!(data["step"], "object-add", "{data}");
    assert!(
        message.contains("this QEMU refuses object-add"),
        "{message}"
    );
    assert_eq!(s.qmp.count("device_add"), 0);

    // The same request-id: the first outcome again, without asking QEMU again.
    let retry = rpc(&c.http, "memory-plug", plug).await;
    assert_eq!(retry, first);
    assert_eq!(s.qmp.count("object-add"), 1, "acted once");
    let other = rpc(
        &c.http,
        "memory-plug",
        json!({"vm": "vm", "size": 268_435_456u64, "request-id": "r1"}),
    )
    .await;
    assert_eq!(
        code(&other),
        -32602,
        "request-id reused for another plug: {other:?}"
    );

    let below = rpc(
        &c.http,
        "memory-resize",
        json!({"vm": "vm", "size": 1u64 << 20}),
    )
    .await;
    assert_eq!(code(&below), -32602, "below the boot memory: {below:?}");

    // A malformed request-id is the service's to refuse, the same over both front ends,
    // before any grant or QEMU is looked at.
    let spaced = json!({"vm": "vm", "size": 536_870_912u64, "request-id": "a b"});
    let bad_id = rpc(&c.http, "memory-plug", spaced).await;
    assert_eq!(code(&bad_id), -32602, "{bad_id:?}");
    assert!(format!("{bad_id:?}").contains("request-id"), "{bad_id:?}");
    let long = qga_proto::v1::ResizeRequest {
        vm: "vm".into(),
        size: 1 << 30,
        request_id: Some("x".repeat(129)),
    };
    let channel = tonic::transport::Channel::from_shared(format!(
        "http://{}",
        s.bridge.grpc_addr.expect("TCP listener")
    ))
    .expect("uri")
    .connect()
    .await
    .expect("grpc connect");
    let mut hotplug = MemoryHotplugClient::new(channel);
    let status = hotplug.resize(long).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert_eq!(s.qmp.count("object-add"), 1, "QEMU was not asked again");
}

#[tokio::test]
async fn one_operation_per_vm_the_second_is_aborted() {
    let s = setup(false).await;
    let c = clients(&s.bridge).await;
    let http = c.http.clone();
    let first = tokio::spawn(async move {
        rpc(
            &http,
            "memory-plug",
            json!({"vm": "vm", "size": 536_870_912u64}),
        )
        .await
    });
    // The first is now waiting on QEMU's query-memory-devices.
    s.qmp.asked("query-memory-devices", 1).await;
    let second = rpc(
        &c.http,
        "memory-resize",
        json!({"vm": "vm", "size": 1u64 << 30}),
    )
    .await;
    assert_eq!(code(&second), -32011, "{second:?}");
    assert!(
        format!("{second:?}").contains("another caller's"),
        "{second:?}"
    );
    // The QGA methods are not held up meanwhile.
    assert!(
        rpc(&c.http, "guest-ping", json!({"vm": "vm"}))
            .await
            .is_ok()
    );
    s.qmp.open();
    let first = first.await.expect("first call");
    assert_eq!(
        code(&first),
        -32007,
        "the first runs to its own end: {first:?}"
    );
    // Once it is done, the VM takes the next operation.
    let third = rpc(
        &c.http,
        "memory-plug",
        json!({"vm": "vm", "size": 536_870_912u64}),
    )
    .await;
    assert_eq!(code(&third), -32007, "{third:?}");
}

/// The journal in state directory `state`, as a bridge that stopped left it.
fn journal_at(state: &Path) -> qga_bridge::journal::Journal {
    let limits = qga_bridge::journal::Retention {
        per_vm: 8,
        ttl: Duration::from_secs(3600),
        max_entries: 64,
    };
    qga_bridge::journal::Journal::open(state, limits).expect("journal")
}

/// A journal in `state` in which VM `vm` has a bridge-plugged DIMM `qga-dimm0` on blocks
/// 100-103, which the fake agent does not list: the keeper's pass asks QEMU whether it
/// still has the DIMM.
async fn journal_with_a_plugged_dimm(state: &Path) {
    use qga_bridge::hotplug::desired::{Desired, Kind};
    let journal = journal_at(state);
    let dimm = Desired {
        device: "qga-dimm0".into(),
        kind: Kind::Dimm,
        first_block: 100,
        blocks: 4,
        online_type: Some(qga_wire::schema::GuestMemoryOnlineType::OnlineMovable),
        held_bytes: None,
    };
    journal
        .want("vm", &dimm.device, &dimm)
        .await
        .expect("desired memory written");
}

#[tokio::test]
async fn a_caller_waits_for_the_keepers_pass_instead_of_being_refused() {
    let state = common::state_dir();
    journal_with_a_plugged_dimm(&state).await;
    let s = setup_with(false, |c| c.state_dir = state.clone()).await;
    let c = clients(&s.bridge).await;
    // The keeper's first pass, at start, finds the DIMM's blocks missing and asks QEMU
    // whether it still has the DIMM: it holds the VM until QEMU answers.
    s.qmp.asked("query-memory-devices", 1).await;
    let http = c.http.clone();
    let mut resize = tokio::spawn(async move {
        rpc(
            &http,
            "memory-resize",
            json!({"vm": "vm", "size": 1u64 << 30}),
        )
        .await
    });
    // Before callers came first, the resize was refused at once (ABORTED) here. The pass
    // is held for as long as the resize takes to answer, or 2 s.
    let early = tokio::select! {
        r = &mut resize => Some(r.expect("joins")),
        () = tokio::time::sleep(Duration::from_secs(2)) => None,
    };
    s.qmp.open();
    let resized = match early {
        Some(r) => r,
        None => resize.await.expect("joins"),
    };
    // It ran once the pass was over: QEMU refused its object-add.
    let Err((-32007, message, Some(data))) = &resized else {
        panic!("the resize waited for the keeper's pass and ran: {resized:?}");
    };
    assert_eq!(data["step"], "object-add", "{data}");
    assert!(
        message.contains("this QEMU refuses object-add"),
        "{message}"
    );
    assert_eq!(s.qmp.count("object-add"), 1);
}

#[tokio::test]
async fn hotplug_calls_count_against_the_bridge_wide_in_flight_limit() {
    let s = setup_with(false, |c| c.limits.max_in_flight = 1).await;
    let c = clients(&s.bridge).await;
    let http = c.http.clone();
    // memory-layout waits on QEMU's query-memory-devices, holding the only slot.
    let layout =
        tokio::spawn(async move { rpc(&http, "memory-layout", json!({"vm": "vm"})).await });
    s.qmp.asked("query-memory-devices", 1).await;
    let ping = rpc(&c.http, "guest-ping", json!({"vm": "plain"})).await;
    assert_eq!(code(&ping), -32004, "a QGA call over the limit: {ping:?}");
    let plug = rpc(
        &c.http,
        "memory-plug",
        json!({"vm": "vm", "size": 536_870_912u64}),
    )
    .await;
    assert_eq!(
        code(&plug),
        -32004,
        "a hotplug call over the limit: {plug:?}"
    );
    assert!(format!("{plug:?}").contains("bridge-wide"), "{plug:?}");
    s.qmp.open();
    assert!(layout.await.expect("joins").is_ok());
    assert_eq!(
        s.qmp.count("object-add"),
        0,
        "the refused plug never reached QEMU"
    );
    assert!(
        rpc(&c.http, "guest-ping", json!({"vm": "plain"}))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn hotplug_calls_count_against_the_per_connection_limit() {
    use jsonrpsee::{
        core::client::ClientT, core::params::ObjectParams, ws_client::WsClientBuilder,
    };
    let s = setup_with(false, |c| {
        c.limits.jsonrpc_max_connection_calls = 1;
    })
    .await;
    let url = format!("ws://{}", s.bridge.jsonrpc_addr.expect("TCP listener"));
    let ws = Arc::new(WsClientBuilder::default().build(&url).await.expect("ws"));
    let params = |vm: &str| {
        let mut p = ObjectParams::new();
        p.insert("vm", vm).expect("param");
        p
    };
    let first = ws.clone();
    let layout = tokio::spawn(async move {
        first
            .request::<Value, _>("memory-layout", params("vm"))
            .await
    });
    s.qmp.asked("query-memory-devices", 1).await;
    for method in ["memory-layout", "guest-ping"] {
        let vm = if method == "guest-ping" {
            "plain"
        } else {
            "vm"
        };
        match ws.request::<Value, _>(method, params(vm)).await {
            Err(jsonrpsee::core::ClientError::Call(e)) => {
                assert_eq!(e.code(), -32004, "{method}: {e:?}");
                assert!(e.message().contains("this connection"), "{e:?}");
            }
            other => panic!("{method} over the connection's limit: {other:?}"),
        }
    }
    // Another connection is not held up.
    let c = clients(&s.bridge).await;
    assert!(
        rpc(&c.http, "guest-ping", json!({"vm": "plain"}))
            .await
            .is_ok()
    );
    s.qmp.open();
    assert!(layout.await.expect("joins").is_ok());
}

#[tokio::test]
async fn request_ids_survive_a_restart_and_the_state_directory_has_one_bridge() {
    let state = common::state_dir();
    let s = setup_with(true, |c| c.state_dir = state.clone()).await;
    let c = clients(&s.bridge).await;
    let plug = json!({"vm": "vm", "size": 536_870_912u64, "request-id": "r1"});
    let first = rpc(&c.http, "memory-plug", plug.clone()).await;
    assert_eq!(code(&first), -32007, "QEMU refuses: {first:?}");
    assert_eq!(s.qmp.count("object-add"), 1);

    // A second bridge on the same state directory is refused, naming the lock.
    let mut twin = config(&[]);
    twin.state_dir = state.clone();
    let err = qga_bridge::Bridge::start(twin)
        .await
        .expect_err("one bridge per state directory");
    let lock = state.join("lock");
    assert!(
        err.to_string().contains(&lock.display().to_string())
            && err
                .to_string()
                .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );

    // The bridge restarts on the same state directory: the retry gets the first outcome
    // and QEMU is not asked again; another identity's or another operation's use of the
    // id is not confused with it.
    let Setup {
        _dir,
        _agents,
        qmp,
        bridge,
    } = s;
    bridge.shutdown().await;
    let mut again = config(&[
        ("plain", &_dir.path().join("a.sock")),
        ("vm", &_dir.path().join("b.sock")),
    ]);
    again.vms.get_mut("vm").expect("vm").qmp = Some(_dir.path().join("qmp.sock"));
    again.state_dir = state.clone();
    let bridge = start(again).await;
    let c = clients(&bridge).await;
    let retry = rpc(&c.http, "memory-plug", plug).await;
    assert_eq!(retry, first, "the recorded outcome");
    assert_eq!(qmp.count("object-add"), 1, "acted once across the restart");
    let other = rpc(
        &c.http,
        "memory-plug",
        json!({"vm": "vm", "size": 268_435_456u64, "request-id": "r1"}),
    )
    .await;
    assert_eq!(code(&other), -32602, "{other:?}");
    assert_eq!(qmp.count("object-add"), 1);
    bridge.shutdown().await;
}

/// A journal in `state` holding the intent of a plug under request-id r7 that a bridge
/// stopped during (it never ended).
async fn journal_with_an_interrupted_plug(state: &Path) {
    use qga_bridge::{
        hotplug::{Operation, outcome, plug::PlugArgs},
        journal::Key,
    };
    let journal = journal_at(state);
    let op = Operation::Plug(PlugArgs {
        size: 536_870_912,
        node: None,
        online_type: None,
    });
    // Callers without [auth] are the trusted identity.
    let key = Key {
        identity: Some("trusted".into()),
        id: "r7".into(),
    };
    let (method, args) = outcome::intent(&op);
    journal
        .begin("vm", &key, method, args)
        .await
        .expect("intent written");
}

#[tokio::test]
async fn an_operation_a_bridge_stopped_during_is_never_run_again() {
    let state = common::state_dir();
    journal_with_an_interrupted_plug(&state).await;
    let s = setup_with(true, |c| c.state_dir = state.clone()).await;
    let c = clients(&s.bridge).await;
    let plug = json!({"vm": "vm", "size": 536_870_912u64, "request-id": "r7"});
    // The first retry is answered with the recovered outcome: whether the keeper's first
    // pass recovered the VM already, is recovering it (the retry waits for it) or has not
    // come yet (the retry recovers the VM itself), never told to come back.
    let retry = rpc(&c.http, "memory-plug", plug.clone()).await;
    // QEMU has no DIMM of it: the plug stopped before adding one, nothing is left.
    let Err((-32007, message, Some(data))) = &retry else {
        panic!("recovered as interrupted: {retry:?}");
    };
    assert_eq!(data["step"], "interrupted", "{data}");
    assert!(message.contains("nothing was left plugged"), "{message}");
    assert_eq!(s.qmp.count("object-add"), 0, "not run again");
    let again = rpc(&c.http, "memory-plug", plug).await;
    assert_eq!(again, retry, "the recovered outcome is final");
}

#[tokio::test]
async fn a_retry_is_answered_by_its_deadline_while_recovery_waits_for_qemu() {
    let state = common::state_dir();
    journal_with_an_interrupted_plug(&state).await;
    let s = setup_with(false, |c| c.state_dir = state.clone()).await;
    let c = clients(&s.bridge).await;
    let plug = json!({"vm": "vm", "size": 536_870_912u64, "request-id": "r7"});
    // Recovery (the keeper's first pass, or this retry's own) waits on QEMU's answer: the
    // retry is answered when its deadline passes, told to come back, and nothing ran.
    let mut early = plug.clone();
    early["timeout-ms"] = json!(300);
    let waited = rpc(&c.http, "memory-plug", early).await;
    assert!(
        matches!(code(&waited), -32011 | -32003),
        "come back (recovery under way) or the deadline passed waiting: {waited:?}"
    );
    s.qmp.open();
    let retry = rpc(&c.http, "memory-plug", plug.clone()).await;
    let Err((-32007, message, Some(data))) = &retry else {
        panic!("recovered as interrupted: {retry:?}");
    };
    assert_eq!(data["step"], "interrupted", "{data}");
    assert!(message.contains("nothing was left plugged"), "{message}");
    assert_eq!(s.qmp.count("object-add"), 0, "not run again");
    assert_eq!(rpc(&c.http, "memory-plug", plug).await, retry);
}

#[tokio::test]
async fn an_unreadable_journal_stops_the_bridge_and_is_left_alone() {
    let state = common::state_dir();
    std::fs::create_dir_all(&state).expect("state dir");
    let store = state.join(qga_bridge::journal::STORE_FILE);
    std::fs::write(&store, b"this is not a journal, but it may be evidence").expect("write");
    let mut c = config(&[]);
    c.state_dir = state.clone();
    let err = qga_bridge::Bridge::start(c)
        .await
        .expect_err("no start with amnesia");
    assert!(
        err.to_string().contains(&store.display().to_string())
            && err.to_string().contains("cannot be read"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&store).expect("kept"),
        b"this is not a journal, but it may be evidence"
    );
}
