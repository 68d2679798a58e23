//! The guest's memory signals through a running bridge: `memory-stats` and
//! `MemorySignals/GetMemoryStats` give the same snapshot, made of the fake agent's stats
//! (exact numbers from its script) and the scripted QEMU monitor's totals; a snapshot is
//! reused while fresh and taken again once stale; an agent without the extension, a VM
//! without a monitor, an unknown VM, a missing agent and callers without a grant each get
//! their answer; the background poll sets the gauges, leaves an agent without the
//! extension alone, and the gauges go with the VM.

mod common;

use std::{ops::ControlFlow, path::Path, time::Duration};

use common::{clients, config, eventually, rpc, start};
use qga_bridge::config::{AuthConfig, GrantConfig, Role, TokenConfig, VmConfig};
use qga_fake_agent::FakeAgent;
use qga_proto::v1::{GetMemoryStatsRequest, memory_signals_client::MemorySignalsClient};
use qga_testkit::qmp;
use qga_wire::schema::{
    GuestMeminfo, GuestMemoryPressure, GuestMemoryStats, GuestPressureLine, GuestVmstat,
};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};

const MIB: u64 = 1 << 20;

/// The fake agent's snapshot: MemTotal 1 GiB, 768 MiB available, PSI some avg10
/// `avg10`, one OOM kill, boot id `boot`.
fn stats(avg10: f64, boot: &str) -> GuestMemoryStats {
    GuestMemoryStats {
        meminfo: GuestMeminfo {
            mem_total: Some(1024 * MIB),
            mem_available: Some(768 * MIB),
            mem_free: Some(512 * MIB),
            ..GuestMeminfo::default()
        },
        pressure: Some(GuestMemoryPressure {
            some: Some(GuestPressureLine {
                avg10,
                avg60: 1.0,
                avg300: 0.5,
                total: 4242,
            }),
            full: None,
        }),
        vmstat: GuestVmstat {
            oom_kill: Some(1),
            ..GuestVmstat::default()
        },
        uptime_ms: Some(60_000),
        boot_id: Some(boot.into()),
    }
}

/// A QEMU monitor that knows the VM's memory: 512 MiB at boot, 256 MiB plugged.
fn fake_qmp(path: &Path) -> qmp::FakeQmp {
    qmp::FakeQmp::start(path, |command, _| async move {
        match command.as_str() {
            "qmp_capabilities" => qmp::ok(json!({})),
            "query-memory-size-summary" => qmp::ok(json!({
                "base-memory": 512 * MIB, "plugged-memory": 256 * MIB})),
            other => qmp::not_found(other),
        }
    })
    .expect("bind QMP socket")
}

/// VM `vm`: our agent's stats and a monitor; VM `plain`: an agent without the extension
/// (as qemu-ga) and no monitor.
struct Rig {
    _dir: tempfile::TempDir,
    vm: FakeAgent,
    plain: FakeAgent,
    _qmp: qmp::FakeQmp,
    config: qga_bridge::Config,
}

fn rig(max_age_ms: u64, poll_interval_ms: u64) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, q) = (
        dir.path().join("vm.sock"),
        dir.path().join("plain.sock"),
        dir.path().join("qmp.sock"),
    );
    let vm = FakeAgent::start(&a, 4).expect("agent");
    vm.control().set_memory_stats(Some(stats(2.5, "boot-1")));
    let plain = FakeAgent::start(&b, 4).expect("agent");
    let qmp = fake_qmp(&q);
    let mut config = config(&[("plain", &b)]);
    let with_qmp = VmConfig {
        qmp: Some(q),
        ..VmConfig::agent(a)
    };
    config.vms.insert("vm".into(), with_qmp);
    config.signals.max_age_ms = max_age_ms;
    config.signals.poll_interval_ms = poll_interval_ms;
    Rig {
        _dir: dir,
        vm,
        plain,
        _qmp: qmp,
        config,
    }
}

async fn grpc(b: &qga_bridge::Bridge) -> MemorySignalsClient<Channel> {
    let url = format!("http://{}", b.grpc_addr.expect("TCP listener"));
    let channel = Channel::from_shared(url).expect("uri").connect().await;
    MemorySignalsClient::new(channel.expect("grpc connect"))
}

fn request(vm: &str) -> GetMemoryStatsRequest {
    GetMemoryStatsRequest { vm: vm.into() }
}

const STATS: &str = "__org.qga-bridge_get-memory-stats";

/// The JSON-RPC reply of VM `vm`: the fake agent's numbers and the monitor's totals.
fn check_json_snapshot(j: &Value) {
    let agent = &j["agent"];
    assert_eq!(agent["meminfo"]["mem-total"], 1024 * MIB, "{j}");
    assert_eq!(agent["meminfo"]["mem-available"], 768 * MIB, "{j}");
    assert_eq!(agent["working-set"], 256 * MIB, "{j}");
    assert_eq!(agent["pressure"]["some"]["avg10"], 2.5, "{j}");
    assert_eq!(agent["vmstat"]["oom-kill"], 1, "{j}");
    assert_eq!(agent["boot-id"], "boot-1", "{j}");
    assert!(agent["age-ms"].is_u64(), "{j}");
    let totals = json!({"boot-bytes": 512 * MIB, "plugged-bytes": 256 * MIB,
                        "total-bytes": 768 * MIB});
    for (k, v) in totals.as_object().expect("object") {
        assert_eq!(&j["bridge"][k], v, "{k} in {j}");
    }
    assert!(j.get("agent-stats-unavailable").is_none(), "{j}");
    assert!(j["taken-at"].as_f64().is_some_and(|t| t > 1.7e9), "{j}");
}

/// The gRPC reply `g` says what the JSON-RPC reply `j` says.
fn check_grpc_equals_json(g: &qga_proto::v1::MemoryStats, j: &Value) {
    let agent = &j["agent"];
    let ga = g.agent.as_ref().expect("agent part");
    let meminfo = ga.meminfo.as_ref().expect("meminfo");
    assert_eq!(meminfo.mem_total, agent["meminfo"]["mem-total"].as_u64());
    assert_eq!(
        meminfo.mem_available,
        agent["meminfo"]["mem-available"].as_u64()
    );
    assert_eq!(meminfo.swap_total, None, "absent, not zero");
    assert_eq!(ga.working_set, agent["working-set"].as_u64());
    let some = ga.pressure.and_then(|p| p.some).expect("PSI some");
    assert_eq!(
        Some(some.avg10),
        agent["pressure"]["some"]["avg10"].as_f64()
    );
    assert_eq!(some.total, 4242);
    assert_eq!(ga.vmstat.and_then(|v| v.oom_kill), Some(1));
    assert_eq!(
        (ga.uptime_ms, ga.boot_id.as_deref()),
        (Some(60_000), Some("boot-1"))
    );
    let b = g.bridge.expect("bridge part");
    let bytes = |k: &str| j["bridge"][k].as_u64().unwrap_or_default();
    assert_eq!(
        (b.boot_bytes, b.plugged_bytes, b.total_bytes),
        (
            bytes("boot-bytes"),
            bytes("plugged-bytes"),
            bytes("total-bytes")
        )
    );
    let taken = g.taken_at.expect("taken_at");
    let seconds = taken.seconds as f64 + f64::from(taken.nanos) / 1e9;
    let json_taken = j["taken-at"].as_f64().unwrap_or_default();
    assert!(
        (seconds - json_taken).abs() < 1e-3,
        "one snapshot: {seconds} {json_taken}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_rpc_and_grpc_answer_the_same_snapshot() {
    let r = rig(3_600_000, 0);
    let bridge = start(r.config.clone()).await;
    let c = clients(&bridge).await;
    let j = rpc(&c.http, "memory-stats", json!({"vm": "vm"}))
        .await
        .expect("memory-stats");
    check_json_snapshot(&j);
    let g = grpc(&bridge).await.get_memory_stats(request("vm")).await;
    check_grpc_equals_json(&g.expect("GetMemoryStats").into_inner(), &j);
    assert_eq!(
        r.vm.control().calls(STATS),
        1,
        "both answered from one snapshot"
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_snapshot_is_reused_and_a_stale_one_taken_again() {
    // Fresh for an hour: the agent's new numbers are not asked for.
    let r = rig(3_600_000, 0);
    let bridge = start(r.config.clone()).await;
    let c = clients(&bridge).await;
    let avg10 = |v: &Value| v["agent"]["pressure"]["some"]["avg10"].as_f64();
    let first = rpc(&c.http, "memory-stats", json!({"vm": "vm"})).await;
    r.vm.control().set_memory_stats(Some(stats(40.0, "boot-1")));
    let second = rpc(&c.http, "memory-stats", json!({"vm": "vm"})).await;
    assert_eq!(avg10(&first.expect("first")), Some(2.5));
    assert_eq!(avg10(&second.expect("second")), Some(2.5), "reused");
    assert_eq!(r.vm.control().calls(STATS), 1);
    bridge.shutdown().await;

    // Fresh for 50 ms: once that has passed, the agent is asked again.
    let r = rig(50, 0);
    let bridge = start(r.config.clone()).await;
    let c = clients(&bridge).await;
    let first = rpc(&c.http, "memory-stats", json!({"vm": "vm"})).await;
    assert_eq!(avg10(&first.expect("first")), Some(2.5));
    r.vm.control().set_memory_stats(Some(stats(40.0, "boot-2")));
    let rebooted = eventually("a new snapshot once the old one is stale", || async {
        let v = rpc(&c.http, "memory-stats", json!({"vm": "vm"})).await;
        match v {
            Ok(v) if avg10(&v) == Some(40.0) => ControlFlow::Break(v),
            other => ControlFlow::Continue(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(rebooted["agent"]["boot-id"], "boot-2", "{rebooted}");
    assert!(r.vm.control().calls(STATS) >= 2);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_extension_and_a_vm_without_a_monitor_are_parts_absent() {
    let r = rig(1000, 0);
    let bridge = start(r.config.clone()).await;
    let c = clients(&bridge).await;
    let v = rpc(&c.http, "memory-stats", json!({"vm": "plain"}))
        .await
        .expect("not an error for the whole call");
    assert!(v.get("agent").is_none() && v.get("bridge").is_none(), "{v}");
    let why = v["agent-stats-unavailable"].as_str().unwrap_or_default();
    assert_eq!(
        why,
        "the guest's agent does not offer __org.qga-bridge_get-memory-stats (qemu-ga fake-1.0)"
    );
    let no_backend = v["bridge-totals-unavailable"].as_str().unwrap_or_default();
    assert!(no_backend.contains("no hypervisor backend"), "{v}");
    let g = grpc(&bridge).await.get_memory_stats(request("plain")).await;
    let g = g.expect("GetMemoryStats").into_inner();
    assert!(g.agent.is_none() && g.bridge.is_none(), "{g:?}");
    assert_eq!(g.agent_stats_unavailable.as_deref(), Some(why));
    assert_eq!(r.plain.control().calls(STATS), 1);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vms_and_missing_agents_are_errors() {
    let r = rig(1000, 0);
    let mut config = r.config.clone();
    let gone = r._dir.path().join("nobody.sock");
    config.vms.insert("gone".into(), VmConfig::agent(gone));
    let bridge = start(config).await;
    let c = clients(&bridge).await;
    let unknown = rpc(&c.http, "memory-stats", json!({"vm": "vm9"})).await;
    assert_eq!(unknown.expect_err("unknown VM").0, -32001);
    let status = grpc(&bridge).await.get_memory_stats(request("vm9")).await;
    assert_eq!(status.expect_err("unknown VM").code(), Code::NotFound);
    let down = rpc(&c.http, "memory-stats", json!({"vm": "gone"})).await;
    assert_eq!(down.expect_err("no agent").0, -32002);
    let status = grpc(&bridge).await.get_memory_stats(request("gone")).await;
    assert_eq!(status.expect_err("no agent").code(), Code::Unavailable);
    let bad = rpc(&c.http, "memory-stats", json!({"vm": "vm", "size": 1})).await;
    assert_eq!(bad.expect_err("unknown param").0, -32602);
    bridge.shutdown().await;
}

fn sha256_hex(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// A gRPC request with `token`, if any.
fn bearer(vm: &str, token: Option<&str>) -> tonic::Request<GetMemoryStatsRequest> {
    let mut r = tonic::Request::new(request(vm));
    if let Some(t) = token {
        let value = format!("Bearer {t}").parse().expect("ascii");
        r.metadata_mut().insert("authorization", value);
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_grant_suffices_and_callers_without_one_are_refused() {
    let r = rig(1000, 0);
    let mut config = r.config.clone();
    let token = |identity: &str| TokenConfig {
        identity: identity.into(),
        sha256: sha256_hex(&format!("{identity}-token")),
    };
    config.auth = Some(AuthConfig {
        tokens: vec![token("viewer"), token("stranger")],
        grants: vec![GrantConfig {
            identity: "viewer".into(),
            role: Role::Read,
            vms: vec!["vm".into()],
        }],
    });
    let bridge = start(config).await;
    let mut g = grpc(&bridge).await;
    let read = g.get_memory_stats(bearer("vm", Some("viewer-token"))).await;
    let read = read.expect("a read grant reads").into_inner();
    assert_eq!(
        read.agent.and_then(|a| a.boot_id).as_deref(),
        Some("boot-1")
    );
    let denied = g
        .get_memory_stats(bearer("plain", Some("viewer-token")))
        .await;
    assert_eq!(
        denied.expect_err("no grant on plain").code(),
        Code::PermissionDenied
    );
    let denied = g
        .get_memory_stats(bearer("vm", Some("stranger-token")))
        .await;
    assert_eq!(denied.expect_err("no grant").code(), Code::PermissionDenied);
    let anonymous = g.get_memory_stats(bearer("vm", None)).await;
    assert_eq!(
        anonymous.expect_err("no identity").code(),
        Code::Unauthenticated
    );
    assert_eq!(
        r.vm.control().calls(STATS),
        1,
        "refused calls never reach the guest"
    );
    bridge.shutdown().await;
}

/// The value of `series{vm="NAME"}` in `text`, if it is there.
fn sample(text: &str, series: &str, vm: &str) -> Option<f64> {
    let prefix = format!("{series}{{vm=\"{vm}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// A discovered domain `dir`'s fake agent under `root`.
fn domain_agent(root: &Path, dir: &str) -> FakeAgent {
    let dir = root.join(dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    FakeAgent::start(&dir.join("org.qemu.guest_agent.0"), 2).expect("agent")
}

/// A bridge discovering the domains under `root`, polling every 100 ms, once `vms`
/// answer (the poll only visits connected VMs: one call each connects them).
async fn polling_bridge(root: &Path, vms: &[&str]) -> qga_bridge::Bridge {
    let mut cfg = config(&[]);
    let glob = format!("{}/domain-*/org.qemu.guest_agent.0", root.display());
    cfg.discover = vec![glob];
    cfg.discover_interval = Duration::from_millis(20);
    cfg.signals.poll_interval_ms = 100;
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;
    for vm in vms {
        eventually("the VM is discovered and answers", || async {
            match rpc(&c.http, "guest-ping", json!({ "vm": vm })).await {
                Ok(_) => ControlFlow::Break(()),
                Err(e) => ControlFlow::Continue(format!("{e:?}")),
            }
        })
        .await;
    }
    bridge
}

/// The metrics once `done` holds, within the tests' patience.
async fn metrics_once(
    bridge: &qga_bridge::Bridge,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    eventually(what, || async {
        let text = bridge.metrics().encode();
        if done(&text) {
            ControlFlow::Break(text)
        } else {
            ControlFlow::Continue(text)
        }
    })
    .await
}

/// `text` has VM `polled`'s gauges of [`stats`] with avg10 2.5.
fn check_gauges(text: &str) {
    let ws = sample(text, "qga_bridge_guest_working_set_bytes", "polled");
    assert_eq!(ws, Some((256 * MIB) as f64), "{text}");
    let available = sample(text, "qga_bridge_guest_available_bytes", "polled");
    assert_eq!(available, Some((768 * MIB) as f64), "{text}");
    let psi = sample(
        text,
        "qga_bridge_guest_memory_pressure_some_avg10",
        "polled",
    );
    assert_eq!(psi, Some(0.025), "a ratio: {text}");
    let at = sample(text, "qga_bridge_guest_stats_timestamp_seconds", "polled");
    assert!(at.is_some_and(|t| t > 1.7e9), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_sets_the_gauges_which_go_with_the_stats_and_the_vm() {
    let root = tempfile::tempdir().expect("tempdir");
    let polled = domain_agent(root.path(), "domain-1-polled");
    polled
        .control()
        .set_memory_stats(Some(stats(2.5, "boot-1")));
    let without = domain_agent(root.path(), "domain-2-without");
    let bridge = polling_bridge(root.path(), &["polled", "without"]).await;
    let calls = |agent: &FakeAgent| agent.control().calls(STATS);
    metrics_once(&bridge, "the poll asks the agent without it", |_| {
        calls(&without) > 0
    })
    .await;
    let since = calls(&polled);
    let text = metrics_once(&bridge, "two more polls", |_| calls(&polled) >= since + 2).await;
    check_gauges(&text);
    // Polled twice more; the agent without the extension was asked once, then left alone.
    assert_eq!(calls(&without), 1);
    assert!(!text.contains("qga_bridge_guest_working_set_bytes{vm=\"without\"}"));

    // Its agent loses the extension (replaced by qemu-ga, say): no gauges of old numbers.
    polled.control().set_memory_stats(None);
    let series = "qga_bridge_guest_working_set_bytes";
    metrics_once(&bridge, "the gauges go with the stats", |t| {
        sample(t, series, "polled").is_none()
    })
    .await;
    drop(polled);
    metrics_once(&bridge, "the VM's series go with it", |t| {
        !t.contains("vm=\"polled\"")
    })
    .await;
    bridge.shutdown().await;
}
