//! `memory-balloon` against a fake agent and a QEMU monitor that models a balloon: its
//! driver moves QEMU's `actual` towards the target a step per read, or is stuck. What is
//! refused changes nothing; an answer comes once `actual` is at the target; a stuck
//! balloon is answered with where it stopped and its request withdrawn; the keeper sets
//! an emptied balloon again; the balloon shows in the layout and the memory stats.
//! The real balloon runs in a real guest (tests/tests/balloon.rs).

mod common;

use std::{
    ops::ControlFlow,
    sync::{Arc, Mutex},
};

use common::{clients, config, eventually, rpc, start};
use qga_fake_agent::FakeAgent;
use qga_proto::v1::{BalloonRequest, memory_hotplug_client::MemoryHotplugClient};
use qga_testkit::qmp::{self, FakeQmp};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// The VM's boot memory, and QEMU's balloon size (no DIMMs).
const RAM: u64 = 512 * MIB;

/// QEMU's balloon as the monitor models it.
#[derive(Debug)]
struct Model {
    target: u64,
    actual: u64,
    /// How far the driver moves `actual` per read; 0: no driver.
    step: u64,
    /// The driver gives no more than this (a guest that cannot give memory up).
    lowest: u64,
    interval: u64,
    /// QEMU refuses `balloon`.
    refuse: bool,
    deflate_on_oom: bool,
}

impl Model {
    fn read(&mut self) -> u64 {
        let goal = self.target.max(self.lowest);
        self.actual = if self.actual > goal {
            self.actual.saturating_sub(self.step).max(goal)
        } else {
            (self.actual + self.step).min(goal)
        };
        self.actual
    }

    fn answer(&mut self, command: &str, args: &Value) -> Value {
        let prop = args["property"].as_str().unwrap_or_default();
        match command {
            "qmp_capabilities" => qmp::ok(json!({})),
            "qom-set" if prop == "guest-stats-polling-interval" => {
                self.interval = args["value"].as_u64().unwrap_or(0);
                qmp::ok(json!({}))
            }
            "query-memory-size-summary" => qmp::ok(json!({"base-memory": RAM})),
            "query-memory-devices" | "query-memdev" => qmp::ok(json!([])),
            "query-balloon" => qmp::ok(json!({"actual": self.read()})),
            "balloon" if self.refuse => qmp::error("GenericError", "this QEMU refuses balloon"),
            "balloon" => {
                self.target = args["value"].as_u64().unwrap_or(0).min(RAM);
                qmp::ok(json!({}))
            }
            "qom-list" if args["path"] == "/machine/peripheral" => {
                qmp::ok(json!([{"name": "balloon0", "type": "child<virtio-balloon-pci>"}]))
            }
            "qom-list" => qmp::ok(json!([])),
            "qom-get" => qmp::ok(match prop {
                "deflate-on-oom" => json!(self.deflate_on_oom),
                "free-page-reporting" => json!(true),
                "guest-stats-polling-interval" => json!(self.interval),
                "guest-stats" => json!({"last-update": 1_764_021_600u64, "stats": {
                    "stat-available-memory": 200 * MIB, "stat-free-memory": 100 * MIB,
                    "stat-total-memory": self.actual, "stat-major-faults": 3,
                    "stat-swap-in": u64::MAX}}),
                _ => return qmp::error("GenericError", "no such property"),
            }),
            other => qmp::not_found(other),
        }
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    _agent: FakeAgent,
    qmp: FakeQmp,
    model: Arc<Mutex<Model>>,
    bridge: qga_bridge::Bridge,
}

/// VM `vm` with a balloon whose driver moves `step` bytes a read (0: no driver).
async fn rig(step: u64, tweak: impl FnOnce(&mut qga_bridge::Config)) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, q) = (dir.path().join("a.sock"), dir.path().join("qmp.sock"));
    let agent = FakeAgent::start(&a, 8).expect("agent");
    let model = Arc::new(Mutex::new(Model {
        target: RAM,
        actual: RAM,
        step,
        lowest: 0,
        interval: 0,
        refuse: false,
        deflate_on_oom: false,
    }));
    let m = model.clone();
    let qmp = FakeQmp::start(&q, move |command, args| {
        let reply = m.lock().expect("model").answer(&command, &args);
        async move { reply }
    })
    .expect("bind QMP socket");
    let mut c = config(&[("vm", &a)]);
    c.vms.get_mut("vm").expect("vm").qmp = Some(q);
    c.balloon.stall_ms = 300;
    tweak(&mut c);
    let bridge = start(c).await;
    Rig {
        _dir: dir,
        _agent: agent,
        qmp,
        model,
        bridge,
    }
}

fn code(r: &Result<Value, (i32, String, Option<Value>)>) -> i32 {
    r.as_ref().map_or_else(|e| e.0, |_| 0)
}

#[tokio::test]
async fn the_balloon_takes_memory_and_gives_it_back_and_shows_where_it_is() {
    let r = rig(64 * MIB, |_| {}).await;
    let c = clients(&r.bridge).await;
    let layout = rpc(&c.http, "memory-layout", json!({"vm": "vm"}))
        .await
        .expect("layout");
    assert_eq!(
        layout["balloon"],
        json!({"id": "balloon0", "deflate-on-oom": false, "free-page-reporting": true,
               "actual-bytes": RAM, "held-bytes": 0, "usable-bytes": RAM}),
        "{layout}"
    );

    let done = rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": 256 * MIB}),
    )
    .await
    .expect("ballooned");
    assert_eq!(
        done["balloon"],
        json!({"id": "balloon0", "from-bytes": RAM, "to-bytes": 256 * MIB,
               "target-bytes": 256 * MIB, "held-bytes": 256 * MIB,
               "actual-bytes": 256 * MIB}),
        "{done}"
    );
    assert_eq!(r.qmp.asked("balloon"), vec![json!({"value": 256 * MIB})]);
    let layout = rpc(&c.http, "memory-layout", json!({"vm": "vm"}))
        .await
        .expect("layout");
    assert_eq!(layout["balloon"]["kept-bytes"], 256 * MIB, "{layout}");
    assert_eq!(layout["balloon"]["usable-bytes"], 256 * MIB, "{layout}");

    // memory-stats: the balloon part, QEMU's polling turned on, the usable total.
    let stats = rpc(&c.http, "memory-stats", json!({"vm": "vm"}))
        .await
        .expect("stats");
    assert_eq!(stats["balloon"]["held-bytes"], 256 * MIB, "{stats}");
    assert_eq!(
        stats["balloon"]["stats"]["available-bytes"],
        200 * MIB,
        "{stats}"
    );
    assert!(
        stats["balloon"]["stats"].get("swap-in-bytes").is_none(),
        "not reported is absent: {stats}"
    );
    assert_eq!(stats["bridge"]["usable-bytes"], 256 * MIB, "{stats}");
    assert_eq!(r.model.lock().expect("model").interval, 2);

    // And back: all of it, for a caller whose deadline is shorter than a hypervisor
    // command's timeout (5 s): it still gets the wait.
    let back = rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": RAM, "timeout-ms": 3000}),
    )
    .await
    .expect("deflated");
    assert_eq!(back["balloon"]["held-bytes"], 0, "{back}");
    assert_eq!(r.model.lock().expect("model").actual, RAM);
}

#[tokio::test]
async fn targets_off_the_grain_below_the_floor_or_above_the_memory_change_nothing() {
    let r = rig(64 * MIB, |_| {}).await;
    let c = clients(&r.bridge).await;
    for (target, says) in [
        (128 * MIB, "floor"),
        (RAM + MIB, "above the VM's memory"),
        (300 * MIB + 4096, "multiple of 1 MiB"),
    ] {
        let refused = rpc(
            &c.http,
            "memory-balloon",
            json!({"vm": "vm", "target": target}),
        )
        .await;
        assert_eq!(code(&refused), -32602, "{target}: {refused:?}");
        assert!(format!("{refused:?}").contains(says), "{refused:?}");
    }
    let wrong = rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": RAM, "size": RAM}),
    )
    .await;
    assert_eq!(code(&wrong), -32602, "{wrong:?}");
    assert_eq!(r.qmp.count("balloon"), 0, "QEMU was not asked");

    // gRPC: INVALID_ARGUMENT, and still nothing asked.
    let channel = tonic::transport::Channel::from_shared(format!(
        "http://{}",
        r.bridge.grpc_addr.expect("TCP listener")
    ))
    .expect("uri")
    .connect()
    .await
    .expect("grpc connect");
    let below = BalloonRequest {
        vm: "vm".into(),
        target: 64 * MIB,
        request_id: None,
    };
    let status = MemoryHotplugClient::new(channel)
        .balloon(below)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert_eq!(r.qmp.count("balloon"), 0);
    let layout = rpc(&c.http, "memory-layout", json!({"vm": "vm"}))
        .await
        .expect("layout");
    assert!(
        layout["balloon"].get("kept-bytes").is_none(),
        "nothing kept: {layout}"
    );
}

#[tokio::test]
async fn a_stuck_balloon_is_answered_where_it_stopped_and_its_request_withdrawn() {
    let r = rig(64 * MIB, |_| {}).await;
    r.model.lock().expect("model").lowest = 384 * MIB;
    let c = clients(&r.bridge).await;
    let stuck = rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": 256 * MIB, "request-id": "b1"}),
    )
    .await;
    let Err((-32007, message, Some(data))) = &stuck else {
        panic!("stopped short: {stuck:?}");
    };
    assert_eq!(data["step"], "balloon", "{data}");
    assert!(
        message.contains(&format!("stopped at {}", 384 * MIB)),
        "{message}"
    );
    // The rest of the request withdrawn: QEMU's target where actual stood.
    assert_eq!(
        r.qmp.asked("balloon"),
        vec![json!({"value": 256 * MIB}), json!({"value": 384 * MIB})]
    );
    let layout = rpc(&c.http, "memory-layout", json!({"vm": "vm"}))
        .await
        .expect("layout");
    assert_eq!(layout["balloon"]["kept-bytes"], 128 * MIB, "{layout}");

    // The retry is the first outcome, without asking QEMU again.
    let retry = rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": 256 * MIB, "request-id": "b1"}),
    )
    .await;
    assert_eq!(retry, stuck);
    assert_eq!(r.qmp.count("balloon"), 2);
}

#[tokio::test]
async fn the_keeper_sets_an_emptied_balloon_again() {
    let r = rig(64 * MIB, |c| c.hotplug.restore_interval_ms = 100).await;
    let c = clients(&r.bridge).await;
    rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": 384 * MIB}),
    )
    .await
    .expect("ballooned");
    // A reset with a new QEMU: the balloon is empty and its target gone.
    {
        let mut m = r.model.lock().expect("model");
        (m.target, m.actual) = (RAM, RAM);
    }
    eventually("the keeper sets the balloon again", || async {
        let asked = r.qmp.asked("balloon");
        match asked.as_slice() {
            [_, again, ..] => ControlFlow::Break(again.clone()),
            _ => ControlFlow::Continue(format!("{asked:?}")),
        }
    })
    .await;
    assert_eq!(r.qmp.asked("balloon")[1], json!({"value": 384 * MIB}));
    eventually("the balloon holds its size again", || async {
        match r.model.lock().expect("model").read() {
            a if a == 384 * MIB => ControlFlow::Break(()),
            a => ControlFlow::Continue(format!("actual {a}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_refused_balloon_keeps_the_size_kept_before() {
    let r = rig(64 * MIB, |_| {}).await;
    let c = clients(&r.bridge).await;
    let target = json!({"vm": "vm", "target": 384 * MIB});
    rpc(&c.http, "memory-balloon", target)
        .await
        .expect("ballooned");
    r.model.lock().expect("model").refuse = true;
    let refused = rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": 256 * MIB}),
    )
    .await;
    let Err((-32007, message, _)) = &refused else {
        panic!("QEMU's refusal: {refused:?}");
    };
    assert!(message.contains("this QEMU refuses balloon"), "{message}");
    let layout = rpc(&c.http, "memory-layout", json!({"vm": "vm"}))
        .await
        .expect("layout");
    assert_eq!(
        layout["balloon"]["kept-bytes"],
        128 * MIB,
        "the size kept before: {layout}"
    );
}

#[tokio::test]
async fn with_deflate_on_oom_the_keeper_sets_only_an_empty_balloon_again() {
    let r = rig(64 * MIB, |c| c.hotplug.restore_interval_ms = 50).await;
    r.model.lock().expect("model").deflate_on_oom = true;
    let c = clients(&r.bridge).await;
    rpc(
        &c.http,
        "memory-balloon",
        json!({"vm": "vm", "target": 256 * MIB}),
    )
    .await
    .expect("ballooned");
    // The guest takes 128 MiB back under memory pressure: its own business.
    {
        let mut m = r.model.lock().expect("model");
        (m.lowest, m.actual) = (384 * MIB, 384 * MIB);
    }
    let passes = r.qmp.count("query-memory-size-summary");
    eventually("a few keeper passes", || async {
        match r.qmp.count("query-memory-size-summary") {
            n if n >= passes + 3 => ControlFlow::Break(()),
            n => ControlFlow::Continue(format!("{n} summaries")),
        }
    })
    .await;
    assert_eq!(
        r.qmp.count("balloon"),
        1,
        "not set again while it holds some"
    );
    // A new QEMU: the balloon is empty, and is set again.
    {
        let mut m = r.model.lock().expect("model");
        (m.lowest, m.target, m.actual) = (0, RAM, RAM);
    }
    eventually("the empty balloon set again", || async {
        match r.qmp.asked("balloon").as_slice() {
            [_, again] => ControlFlow::Break(again.clone()),
            other => ControlFlow::Continue(format!("{other:?}")),
        }
    })
    .await;
}
