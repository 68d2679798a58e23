//! The bridge beside a real libvirtd (`--libvirt qemu:///system`), with transient TCG
//! domains on the end-to-end guest image: libvirtd holds each domain's agent socket, and
//! the bridge reaches the agent through libvirt's API and plugs DIMMs through libvirt.
//!
//! - every QGA method works through gRPC and JSON-RPC, and `virsh qemu-agent-command`
//!   still works between the bridge's calls;
//! - plug 512 MiB: `virsh dumpxml` shows the DIMM and MemTotal grows; unplug: gone again;
//! - a domain started after the bridge appears without a restart, one restarted under its
//!   name is served as its new run, one destroyed goes;
//! - libvirtd restarted: calls fail UNAVAILABLE while it is down and work after;
//! - a `<memballoon model='virtio'>` domain: the layout shows the balloon, memory-balloon
//!   moves libvirt's actual and the guest's MemTotal 256 MiB down and back, memory-stats
//!   has the driver's statistics.
//!
//! Needs libvirt-daemon-system, libvirt-clients, root and the guest image; fails, never
//! skips, without them. Run one at a time (see .config/nextest.toml).

use std::ops::ControlFlow;

use qga_e2e::{
    bridge::{BridgeProcess, Clients},
    libvirt::{Domain, Libvirtd},
    scenario::{self, DIMM_BYTES},
    wait::{self, PATIENCE},
};
use qga_proto::v1::{GetInfoRequest, GetMemoryBlockInfoRequest, PingRequest};
use serde_json::{Value, json};
use tonic::Code;

const URI: &str = "qemu:///system";

fn domain(prefix: &str) -> Domain {
    answering(Domain::start(prefix, "ours"))
}

/// The domain just started, once its agent answers through virsh.
fn answering(started: anyhow::Result<Domain>) -> Domain {
    let d = started.expect("libvirt domain boots");
    d.wait_for_agent(PATIENCE)
        .unwrap_or_else(|e| panic!("agent through virsh: {e:#}\nconsole:\n{}", d.console_text()));
    d
}

async fn bridge() -> (BridgeProcess, Clients) {
    let bridge = BridgeProcess::start_libvirt(URI).await.expect("bridge");
    let c = bridge.clients().await.expect("clients");
    (bridge, c)
}

/// The VMs `vm-list` shows, by name, with their state.
async fn listed(c: &Clients) -> Vec<(String, String)> {
    let list = c.rpc("vm-list", json!({})).await.expect("vm-list");
    list.as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_string(),
                v["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until `vm-list` does (`present`) or does not show `name`.
async fn wait_listed(c: &Clients, name: &str, present: bool) {
    let what = format!(
        "{name} {} vm-list",
        if present { "appears in" } else { "leaves" }
    );
    wait::until(&what, PATIENCE, || async {
        let vms = listed(c).await;
        anyhow::Ok(if vms.iter().any(|(n, _)| n == name) == present {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("{vms:?}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

fn virsh_ping(d: &Domain) {
    // A bound on the answer, not a timing: a TCG guest on a loaded machine is slow.
    let reply = d
        .agent_command(&json!({"execute": "guest-ping"}), 60)
        .unwrap_or_else(|e| panic!("virsh qemu-agent-command between the bridge's calls: {e:#}"));
    assert_eq!(reply["return"], json!({}), "{reply}");
}

/// Waits until the guest's MemTotal is `want` KiB.
async fn mem_total_becomes(d: &Domain, want: u64) {
    wait::until(&format!("MemTotal {want} KiB"), PATIENCE, || async {
        let now = d.control().mem_total_kib().expect("MemTotal");
        anyhow::Ok(if now == want {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("MemTotal {now} KiB"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{}", d.console_text()));
}

fn dimm_aliases(xml: &str) -> Vec<String> {
    xml.split("<memory model='dimm'")
        .skip(1)
        .filter_map(|m| {
            let at = m.find("<alias name='")? + "<alias name='".len();
            Some(m[at..].split('\'').next()?.to_string())
        })
        .collect()
}

/// Waits until the bridge lists `d` and its agent answers through the bridge; its name.
async fn served(c: &Clients, d: &Domain) -> String {
    let vm = d.name().to_string();
    wait_listed(c, &vm, true).await;
    scenario::ping_until_ok(c, &vm, PATIENCE)
        .await
        .expect("agent through the bridge");
    vm
}

/// `method` through JSON-RPC, which must answer; else the test fails with `what` and the
/// guest's console.
async fn call(c: &Clients, d: &Domain, what: &str, method: &str, params: Value) -> Value {
    c.rpc(method, params)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}\nconsole:\n{}", d.console_text()))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_agent_method_works_through_libvirt_and_virsh_still_does() {
    let d = domain("qga-lv-api");
    let (_bridge, c) = bridge().await;
    let vm = d.name().to_string();
    wait_listed(&c, &vm, true).await;
    let online = grpc_methods_between_virsh_calls(&c, &d).await;
    jsonrpc_methods_between_virsh_calls(&c, &d, online).await;

    let vms = listed(&c).await;
    assert!(
        vms.iter().any(|(n, s)| n == &vm && s == "connected"),
        "{vms:?}"
    );
    let unknown = c.rpc("guest-ping", json!({"vm": "no-such-domain"})).await;
    assert!(
        matches!(unknown, Err((code, _)) if code != 0),
        "{unknown:?}"
    );
}

/// Every agent method through gRPC, with virsh's own agent calls in between: libvirtd
/// keeps the socket. The index of an online block.
async fn grpc_methods_between_virsh_calls(c: &Clients, d: &Domain) -> u64 {
    let vm = d.name().to_string();
    let mut agent = c.agent.clone();
    agent
        .ping(PingRequest { vm: vm.clone() })
        .await
        .expect("Ping");
    virsh_ping(d);
    let info = agent
        .get_info(GetInfoRequest { vm: vm.clone() })
        .await
        .expect("GetInfo")
        .into_inner();
    assert!(!info.version.is_empty(), "{info:?}");
    virsh_ping(d);
    let blocks = scenario::blocks(c, &vm).await.expect("GetMemoryBlocks");
    assert!(!blocks.is_empty());
    let size = c
        .memory
        .clone()
        .get_memory_block_info(GetMemoryBlockInfoRequest { vm: vm.clone() })
        .await
        .expect("GetMemoryBlockInfo")
        .into_inner()
        .size;
    assert!(size.is_power_of_two(), "{size}");
    virsh_ping(d);
    // Onlining an online block: a state change that changes nothing, answered per block.
    let online = blocks.iter().find(|b| b.online).expect("an online block");
    let results = scenario::set(c, &vm, &[online.phys_index], true)
        .await
        .expect("SetMemoryBlocks");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].phys_index, online.phys_index);
    virsh_ping(d);
    online.phys_index
}

/// The same methods through JSON-RPC, by their QGA names, with virsh's calls in between;
/// `online` is the index of an online block.
async fn jsonrpc_methods_between_virsh_calls(c: &Clients, d: &Domain, online: u64) {
    let vm = d.name();
    for method in [
        "guest-ping",
        "guest-info",
        "guest-get-memory-blocks",
        "guest-get-memory-block-info",
    ] {
        c.rpc(method, json!({"vm": vm}))
            .await
            .unwrap_or_else(|e| panic!("{method}: {e:?}"));
        virsh_ping(d);
    }
    let set = c
        .rpc(
            "guest-set-memory-blocks",
            json!({"vm": vm, "mem-blks": [{"phys-index": online, "online": true}]}),
        )
        .await
        .expect("guest-set-memory-blocks");
    assert_eq!(set.as_array().map(Vec::len), Some(1), "{set}");
    // A block the guest does not have: the agent's per-block answer, not an error.
    let missing = c
        .rpc(
            "guest-set-memory-blocks",
            json!({"vm": vm, "mem-blks": [{"phys-index": 999_999, "online": true}]}),
        )
        .await
        .expect("guest-set-memory-blocks on a missing block");
    assert_eq!(missing[0]["response"], "not-found", "{missing}");
    virsh_ping(d);
}

#[tokio::test(flavor = "multi_thread")]
async fn plug_and_unplug_through_libvirt_keep_its_xml_true() {
    let d = domain("qga-lv-hotplug");
    let (_bridge, c) = bridge().await;
    let vm = served(&c, &d).await;
    let before = d.control().mem_total_kib().expect("MemTotal");
    plug_and_unplug_keep_the_xml_true(&c, &d, before).await;
    resize_keeps_the_xml_true(&c, &d, before).await;

    // A DIMM the domain has no room for is refused before libvirt is asked.
    let too_big = c
        .rpc("memory-plug", json!({"vm": vm, "size": 8u64 << 30}))
        .await;
    match too_big {
        Err((code, message)) => {
            assert_eq!(code, -32007, "{message}");
            assert!(message.contains("maximum memory"), "{message}");
        }
        Ok(v) => panic!("8 GiB plugged into a 4 GiB domain: {v}"),
    }
}

/// Plug 512 MiB: `virsh dumpxml` shows the DIMM, MemTotal grows from `before` and the
/// layout has its blocks online; unplug: the DIMM leaves the XML, MemTotal is back.
async fn plug_and_unplug_keep_the_xml_true(c: &Clients, d: &Domain, before: u64) {
    let vm = d.name();
    let plug = json!({"vm": vm, "size": DIMM_BYTES});
    let plugged = call(c, d, "memory-plug", "memory-plug", plug).await;
    scenario::print_steps("libvirt plug", &plugged);
    let dimm = plugged["dimm"]["id"]
        .as_str()
        .expect("the DIMM's id")
        .to_string();
    let xml = d.dumpxml().expect("dumpxml");
    assert_eq!(dimm_aliases(&xml), vec![dimm.clone()], "{xml}");
    mem_total_becomes(d, before + DIMM_BYTES / 1024).await;
    let layout = scenario::memory_layout(c, vm).await.expect("memory-layout");
    let dimms = scenario::layout_dimms(&layout);
    assert_eq!(dimms.len(), 1, "{layout}");
    assert!(
        scenario::block_states(&dimms[0])
            .iter()
            .all(|s| *s == "online"),
        "{layout}"
    );
    virsh_ping(d);

    let unplug = json!({"vm": vm, "dimm": dimm});
    let unplugged = call(c, d, "memory-unplug", "memory-unplug", unplug).await;
    scenario::print_steps("libvirt unplug", &unplugged);
    let xml = d.dumpxml().expect("dumpxml");
    assert!(dimm_aliases(&xml).is_empty(), "{xml}");
    mem_total_becomes(d, before).await;
}

/// Resize: the boot memory and the plugged DIMMs come from libvirt's XML; up by 1 GiB
/// (two DIMMs in the XML) and back (none).
async fn resize_keeps_the_xml_true(c: &Clients, d: &Domain, before: u64) {
    let vm = d.name();
    let boot = 512u64 << 20;
    let up = json!({"vm": vm, "size": boot + (1 << 30)});
    let grown = call(c, d, "memory-resize up", "memory-resize", up).await;
    assert_eq!(grown["to-bytes"], boot + (1 << 30), "{grown}");
    let xml = d.dumpxml().expect("dumpxml");
    assert_eq!(dimm_aliases(&xml).len(), 2, "two 512 MiB DIMMs: {xml}");
    mem_total_becomes(d, before + (1 << 30) / 1024).await;
    let down = json!({"vm": vm, "size": boot});
    let shrunk = call(c, d, "memory-resize down", "memory-resize", down).await;
    assert_eq!(shrunk["to-bytes"], boot, "{shrunk}");
    assert!(dimm_aliases(&d.dumpxml().expect("dumpxml")).is_empty());
    mem_total_becomes(d, before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn domains_come_and_go_and_libvirtd_restarts_are_survived() {
    Libvirtd::ensure().expect("libvirtd");
    let (_bridge, c) = bridge().await;
    // Started after the bridge: appears without a restart.
    let d = domain("qga-lv-life");
    let vm = served(&c, &d).await;

    // libvirtd down: the domain stays listed, its calls fail UNAVAILABLE.
    Libvirtd::stop().expect("stopping libvirtd");
    let mut agent = c.agent.clone();
    let down = agent.ping(PingRequest { vm: vm.clone() }).await;
    let status = down.expect_err("Ping while libvirtd is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let rpc = c.rpc("guest-ping", json!({"vm": vm})).await;
    assert!(matches!(rpc, Err((-32002, _))), "{rpc:?}");
    Libvirtd::start().expect("starting libvirtd");
    let failed = scenario::ping_until_ok(&c, &vm, PATIENCE)
        .await
        .expect("calls work again after libvirtd restarted");
    eprintln!("e2e: {failed} pings failed while the bridge reconnected");

    // Restarted under the same name: a new run, served as a new VM (its socket names the
    // new id), and calls reach it.
    let old_id = d.id().expect("domid");
    let mut d = d;
    d.restart().expect("the domain restarts");
    let new_id = d.id().expect("domid");
    assert_ne!(old_id, new_id, "a new run has a new id");
    let want = format!("@{new_id}");
    wait::until("the new run served", PATIENCE, || async {
        let list = c.rpc("vm-list", json!({})).await.expect("vm-list");
        let socket = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == vm.as_str())
            .and_then(|v| v["socket"].as_str().map(str::to_string));
        anyhow::Ok(if socket.as_deref().is_some_and(|s| s.ends_with(&want)) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(list)
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    scenario::ping_until_ok(&c, &vm, PATIENCE)
        .await
        .expect("the new run's agent through the bridge");

    // Destroyed: disappears.
    d.virsh("destroy", &[]).expect("virsh destroy");
    wait_listed(&c, &vm, false).await;
    let gone = c.rpc("guest-ping", json!({"vm": vm})).await;
    assert!(matches!(gone, Err((code, _)) if code != 0), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_mem_resize_through_libvirt() {
    let d = answering(Domain::start_virtio_mem("qga-lv-vmem"));
    let (_bridge, c) = bridge().await;
    let vm = served(&c, &d).await;
    let before = d.control().mem_total_kib().expect("MemTotal");
    let boot = virtio_mem_device_in_the_layout(&c, &vm).await;

    // Grow by 1 GiB: libvirt's <current> and the guest's MemTotal follow.
    let up = json!({"vm": vm, "size": boot + (1 << 30)});
    let grown = call(&c, &d, "memory-resize up", "memory-resize", up).await;
    scenario::print_steps("libvirt virtio-mem resize up", &grown);
    assert_eq!(
        grown["virtio-mem"],
        json!([{"id": "virtiomem0", "from-bytes": 0, "to-bytes": 1u64 << 30}]),
        "{grown}"
    );
    mem_total_becomes(&d, before + (1 << 30) / 1024).await;
    current_becomes(&d, 1 << 20);
    let layout = scenario::memory_layout(&c, &vm).await.expect("layout");
    let blocks = layout["virtio-mem"][0]["blocks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        blocks.len() == 8
            && blocks
                .iter()
                .all(|b| b["state"] == "online" && b["valid-zones"] == json!(["Movable"])),
        "8 blocks online in Movable: {layout}"
    );

    // And back.
    let down = json!({"vm": vm, "size": boot});
    let shrunk = call(&c, &d, "memory-resize down", "memory-resize", down).await;
    scenario::print_steps("libvirt virtio-mem resize down", &shrunk);
    assert_eq!(shrunk["to-bytes"], boot, "{shrunk}");
    mem_total_becomes(&d, before).await;
    current_becomes(&d, 0);
    virsh_ping(&d);
}

/// The layout of `vm` with its virtio-mem device: the boot memory is libvirt's <memory>
/// less the device, which is `virtiomem0`, 2 GiB at most, at the address QEMU gave it.
/// The boot memory.
async fn virtio_mem_device_in_the_layout(c: &Clients, vm: &str) -> u64 {
    let layout = scenario::memory_layout(c, vm).await.expect("layout");
    let boot = layout["boot-bytes"].as_u64().unwrap_or_default();
    let vmem = &layout["virtio-mem"][0];
    assert_eq!(
        boot,
        512 << 20,
        "libvirt's <memory> less the device: {layout}"
    );
    assert_eq!(vmem["id"], "virtiomem0", "{layout}");
    assert_eq!(vmem["max-size"], 2u64 << 30, "{layout}");
    assert!(
        vmem["addr"].as_u64().is_some(),
        "the address, from QEMU: {layout}"
    );
    boot
}

/// The `<current>` KiB of the domain's virtio-mem device in its XML.
fn virtio_mem_current(xml: &str) -> Option<u64> {
    let at = xml.find("model='virtio-mem'").unwrap_or_default();
    let rest = &xml[at..];
    rest.find("<current unit='KiB'>")
        .and_then(|i| rest[i + 20..].split('<').next())
        .and_then(|n| n.parse::<u64>().ok())
}

/// Waits until libvirt's `<current>` for the virtio-mem device is `kib`: it follows QEMU's
/// size-change event, which QEMU sends at most once a second (the bridge answered from
/// QEMU's own size).
fn current_becomes(d: &Domain, kib: u64) {
    wait::until_blocking(&format!("<current> is {kib} KiB"), PATIENCE, || {
        let xml = d.dumpxml().expect("dumpxml");
        anyhow::Ok(if virtio_mem_current(&xml) == Some(kib) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(xml)
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// What the balloon test has the balloon hold: 256 MiB.
const BALLOON_HELD: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balloon_through_libvirt() {
    let d = answering(Domain::start_balloon("qga-lv-balloon"));
    let (_bridge, c) = bridge().await;
    let vm = served(&c, &d).await;
    let before = d.control().mem_total_kib().expect("MemTotal");
    let boot = balloon_in_the_libvirt_layout(&c, &vm).await;

    // Inflate by 256 MiB: libvirt's actual and the guest's MemTotal follow.
    let target = boot - BALLOON_HELD;
    let inflated = call(
        &c,
        &d,
        "memory-balloon -256 MiB",
        "memory-balloon",
        balloon(&vm, target),
    )
    .await;
    scenario::print_steps("libvirt memory-balloon -256 MiB", &inflated);
    let b = &inflated["balloon"];
    assert!(
        b["id"] == "balloon0"
            && b["from-bytes"] == boot
            && b["to-bytes"] == target
            && b["held-bytes"] == BALLOON_HELD,
        "from the boot memory to 256 MiB less, 256 MiB held: {inflated}"
    );
    dommemstat_actual_becomes(&d, target / 1024);
    mem_total_near(&d, before - BALLOON_HELD / 1024).await;
    balloon_stats_through_libvirt(&c, &vm, target).await;

    // And back.
    let deflated = call(
        &c,
        &d,
        "memory-balloon back",
        "memory-balloon",
        balloon(&vm, boot),
    )
    .await;
    assert!(
        deflated["balloon"]["to-bytes"] == boot && deflated["balloon"]["held-bytes"] == 0,
        "all of the boot memory again, the balloon empty: {deflated}"
    );
    dommemstat_actual_becomes(&d, boot / 1024);
    mem_total_near(&d, before).await;
    virsh_ping(&d);
}

/// `memory-balloon` params for `vm` and `target` bytes.
fn balloon(vm: &str, target: u64) -> Value {
    json!({"vm": vm, "target": target})
}

/// The layout of `vm` shows libvirt's balloon, `balloon0`, empty: free page reporting
/// as the XML asks, no deflate-on-oom (no autodeflate). The boot memory.
async fn balloon_in_the_libvirt_layout(c: &Clients, vm: &str) -> u64 {
    let layout = scenario::memory_layout(c, vm).await.expect("layout");
    let boot = layout["boot-bytes"].as_u64().unwrap_or_default();
    let b = &layout["balloon"];
    assert_eq!(boot, 512 << 20, "{layout}");
    assert!(
        b["id"] == "balloon0"
            && b["free-page-reporting"] == true
            && b["deflate-on-oom"] == false
            && b["actual-bytes"] == boot
            && b["held-bytes"] == 0,
        "libvirt's balloon0, empty: {layout}"
    );
    boot
}

/// libvirt's balloon `actual` (`virsh dommemstat`), KiB.
fn dommemstat_actual(d: &Domain) -> Option<u64> {
    let stats = d.virsh("dommemstat", &[]).ok()?;
    stats
        .lines()
        .find_map(|l| l.strip_prefix("actual "))
        .and_then(|n| n.trim().parse().ok())
}

/// Waits until `virsh dommemstat` says the balloon's actual is `kib`: libvirt follows
/// QEMU's BALLOON_CHANGE events, which QEMU sends at most once a second.
fn dommemstat_actual_becomes(d: &Domain, kib: u64) {
    wait::until_blocking(&format!("dommemstat actual {kib} KiB"), PATIENCE, || {
        let now = dommemstat_actual(d);
        anyhow::Ok(if now == Some(kib) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("actual {now:?} KiB"))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{}", d.console_text()));
}

/// Waits until the guest's MemTotal is within [`scenario::MEMTOTAL_SLACK_KIB`] of `want`
/// KiB: the balloon's pages leave it.
async fn mem_total_near(d: &Domain, want: u64) {
    wait::until(&format!("MemTotal near {want} KiB"), PATIENCE, || async {
        let now = d.control().mem_total_kib()?;
        anyhow::Ok(if now.abs_diff(want) <= scenario::MEMTOTAL_SLACK_KIB {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("MemTotal {now} KiB"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{}", d.console_text()));
}

/// `memory-stats` of `vm` has the balloon part with libvirt's actual (`actual` bytes) and,
/// once the driver has reported (every second, as the domain's XML asks), its statistics.
async fn balloon_stats_through_libvirt(c: &Clients, vm: &str, actual: u64) {
    let stats = wait::until(
        "the balloon's statistics through libvirt",
        PATIENCE,
        || async {
            let s = scenario::call(c, "memory-stats", json!({"vm": vm})).await?;
            let b = &s["balloon"];
            let reported = ["available-bytes", "free-bytes", "total-bytes"]
                .iter()
                .all(|k| b["stats"][k].is_u64());
            anyhow::Ok(if b["actual-bytes"] == actual && reported {
                ControlFlow::Break(s)
            } else {
                ControlFlow::Continue(s.to_string())
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("e2e: memory-stats through libvirt: {}", stats["balloon"]);
}
