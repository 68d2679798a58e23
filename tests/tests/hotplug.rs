//! The bridge's memory hotplug end to end with a real QEMU guest (TCG): the bridge plugs
//! and unplugs DIMMs over the guest's second QMP socket (`qmp-bridge.sock`) and onlines
//! and offlines their blocks through the agent; the test checks the guest (MemTotal, over
//! its control port) and QEMU (over its own `qmp.sock`); the first test ends with the same
//! plug and unplug through `qgactl`, as an operator runs it.
//!
//! Needs qemu-system-x86_64, qemu-guest-agent and the guest image (built on demand from
//! Debian's packages by tests/guest/build-image); fails, never skips, without them.
//! Run one at a time (see .config/nextest.toml): each boots a guest.

use std::{fmt::Display, ops::ControlFlow, path::Path, sync::Arc, time::Duration, time::Instant};

use qga_e2e::{
    bridge::{BridgeProcess, Clients, RpcError},
    guest::{Guest, GuestConfig, MemoryDevice},
    image,
    scenario::{self, DIMM_BYTES, GIB, Timings},
    wait::PATIENCE,
};
use qga_proto::v1::{
    BlockState, GetLayoutRequest, MemoryLayout, ResizeRequest, ResizeResponse, UnplugRequest,
};
use serde_json::{Value, json};

/// MemTotal of a DIMM, in KiB.
const DIMM_KIB: u64 = DIMM_BYTES / 1024;

fn boot(agent: &'static str, online_type: &'static str) -> Guest {
    boot_with(GuestConfig::new(agent, online_type))
}

fn boot_with(config: GuestConfig) -> Guest {
    let image = image::ensure().expect("guest image (kernel from Debian's packages, static agent)");
    Guest::boot(&image, config).expect("guest boots")
}

/// Fails the test with `what`, the error and the guest's console.
fn fail(guest: &Guest, what: &str, e: impl Display) -> ! {
    panic!("{what}: {e}\nconsole:\n{}", guest.console_text())
}

/// The `Ok` value, or the test fails with the guest's console.
fn ok<T, E: Display>(guest: &Guest, what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(guest, what, e))
}

/// Asserts `cond`, or fails with the guest's console.
fn check(guest: &Guest, cond: bool, what: impl FnOnce() -> String) {
    if !cond {
        panic!("{}\nconsole:\n{}", what(), guest.console_text());
    }
}

/// The bridge in front of `guest` as VM `vm1`, with the guest's bridge QMP socket, once
/// the agent answers through it.
async fn behind_bridge(guest: &Guest) -> (BridgeProcess, Clients) {
    behind_bridge_at(guest, None).await
}

/// [`behind_bridge`], with the journal in `state` when given (a bridge of its own else).
async fn behind_bridge_at(guest: &Guest, state: Option<&Path>) -> (BridgeProcess, Clients) {
    behind_bridge_env(guest, state, Vec::new()).await
}

/// [`behind_bridge_at`] with more environment variables for the bridge.
async fn behind_bridge_env(
    guest: &Guest,
    state: Option<&Path>,
    env: Vec<(String, String)>,
) -> (BridgeProcess, Clients) {
    let mut args = qmp_args(guest);
    if let Some(state) = state {
        args.extend(["--state-dir".to_string(), state.display().to_string()]);
    }
    let bridge = BridgeProcess::start_with_env(&[("vm1", &guest.qga_socket())], args, env)
        .await
        .expect("bridge");
    answering(guest, bridge).await
}

/// `--qmp vm1=` the guest's bridge QMP socket.
fn qmp_args(guest: &Guest) -> Vec<String> {
    vec![
        "--qmp".to_string(),
        format!("vm1={}", guest.qmp_bridge_socket().display()),
    ]
}

/// `bridge` and its clients, once the guest's agent answers through it.
async fn answering(guest: &Guest, bridge: BridgeProcess) -> (BridgeProcess, Clients) {
    let c = bridge.clients().await.expect("clients");
    scenario::ping_until_ok(&c, "vm1", PATIENCE)
        .await
        .unwrap_or_else(|e| fail(guest, "agent answers through the bridge", format!("{e:#}")));
    (bridge, c)
}

async fn layout(guest: &Guest, c: &Clients) -> Value {
    ok(
        guest,
        "memory-layout",
        scenario::memory_layout(c, "vm1").await,
    )
}

async fn grpc_layout(guest: &Guest, c: &Clients) -> MemoryLayout {
    ok(
        guest,
        "GetLayout",
        c.hotplug
            .clone()
            .get_layout(GetLayoutRequest { vm: "vm1".into() })
            .await,
    )
    .into_inner()
}

async fn mem_total_becomes(guest: &Guest, want_kib: u64, what: &str) {
    let r = scenario::wait_mem_total(&guest.control(), want_kib, PATIENCE).await;
    ok(guest, what, r.map_err(|e| format!("{e:#}")));
}

fn mem_total(guest: &Guest) -> u64 {
    ok(guest, "MemTotal", guest.control().mem_total_kib())
}

/// A plugged DIMM as the JSON-RPC layout must show it with our agent onlining it
/// movable: every block online, in ZONE_MOVABLE, removable.
fn check_movable_dimm(guest: &Guest, dimm: &Value, block_size: u64) {
    let states = scenario::block_states(dimm);
    check(
        guest,
        states.len() as u64 == DIMM_BYTES / block_size,
        || {
            format!(
                "a 512 MiB DIMM spans {} blocks: {dimm}",
                DIMM_BYTES / block_size
            )
        },
    );
    check(guest, states.iter().all(|s| *s == "online"), || {
        format!("every block of the DIMM is online: {dimm}")
    });
    let zones: Vec<&Value> = dimm["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| &b["valid-zones"])
        .collect();
    check(
        guest,
        zones.iter().all(|z| **z == json!(["Movable"])),
        || format!("our agent reports zones, and every block is in Movable: {dimm}"),
    );
    check(guest, dimm["removable"] == true, || {
        format!("a DIMM all in ZONE_MOVABLE is removable: {dimm}")
    });
}

/// A JSON string as an owned `String` (empty when it is not one).
fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Checks that MemTotal is `want_kib` now, `when` naming the moment.
fn mem_total_is(guest: &Guest, want_kib: u64, when: &str) {
    let now = mem_total(guest);
    check(guest, now == want_kib, || {
        format!("MemTotal {when} is {now} KiB, expected {want_kib} KiB")
    });
}

/// QEMU's DIMMs (`query-memory-devices`, through the test's own QMP socket).
fn memory_devices(guest: &Guest) -> Vec<MemoryDevice> {
    ok(
        guest,
        "query-memory-devices",
        guest.control().memory_devices(),
    )
}

/// QEMU's memory backends (`query-memdev`, through the test's own QMP socket).
fn memdev_ids(guest: &Guest) -> Vec<String> {
    ok(guest, "query-memdev", guest.control().memdev_ids())
}

/// The error a call must have answered; else the test fails with `what`, saying that the
/// call went through and what that means (`meaning`).
fn refused(guest: &Guest, what: &str, r: Result<Value, RpcError>, meaning: &str) -> RpcError {
    match r {
        Err(e) => e,
        Ok(v) => fail(guest, what, format!("{meaning}: {v}")),
    }
}

/// `memory-plug` with `params` through JSON-RPC (`what`), until MemTotal is a DIMM over
/// `start_kib`; the answer, its steps printed. `t` gets the call's time and the time to
/// usable memory.
async fn plug_until_usable(
    guest: &Guest,
    c: &Clients,
    what: &str,
    params: Value,
    start_kib: u64,
    t: &mut Timings,
) -> Value {
    let since = Instant::now();
    let plugged = ok(guest, what, scenario::call(c, "memory-plug", params).await);
    t.record(&format!("{what}: call"), since.elapsed());
    scenario::print_steps(what, &plugged);
    mem_total_becomes(
        guest,
        start_kib + DIMM_KIB,
        "MemTotal +512 MiB after memory-plug",
    )
    .await;
    t.record(&format!("{what}: to usable"), since.elapsed());
    plugged
}

/// Checks that the layout has one DIMM (`what` says which), all of it online in
/// ZONE_MOVABLE ([`check_movable_dimm`]); its id.
async fn one_movable_dimm(guest: &Guest, c: &Clients, block_size: u64, what: &str) -> String {
    let l = layout(guest, c).await;
    let dimms = scenario::layout_dimms(&l);
    check(guest, dimms.len() == 1, || format!("{what}: {l}"));
    check_movable_dimm(guest, &dimms[0], block_size);
    text(&dimms[0]["id"])
}

/// A retry of `method` with the same `params` (and request-id) answers what the first
/// outcome after `step` was.
async fn retry_answers_the_same(
    guest: &Guest,
    c: &Clients,
    method: &str,
    params: &Value,
    first: &Result<Value, RpcError>,
    step: &str,
) {
    let again = c.rpc_full(method, params.clone()).await;
    check(guest, format!("{again:?}") == format!("{first:?}"), || {
        format!("the retry after {step} answers the same: {again:?} vs {first:?}")
    });
}

/// Prints the phases' timings (printed, not asserted).
fn print_timings(t: &Timings) {
    eprintln!("e2e: timings (printed, not asserted):");
    for (phase, d) in &t.0 {
        eprintln!("e2e:   {phase}: {:.2} s", d.as_secs_f64());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plug_unplug_and_resize_through_the_bridge() {
    // This guest is rebooted below: QEMU must boot it again rather than exit.
    let guest = boot_with(GuestConfig {
        reboot: true,
        ..GuestConfig::new("ours", "online_movable")
    });
    let state = tempfile::tempdir().expect("state directory");
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    let mut t = Timings::default();
    t.record("boot to running agent", guest.boot_time);
    let start_kib = mem_total(&guest);
    let (block_size, boot_bytes) = layout_at_boot(&guest, &c).await;

    // Plug 512 MiB over JSON-RPC, with a request-id, and the same plug again.
    let plug = json!({"vm": "vm1", "size": DIMM_BYTES, "request-id": "e2e-plug-1"});
    let dimm = plug_movable(&guest, &c, &plug, start_kib, block_size, &mut t).await;
    dimm_in_layout_and_qemu(&guest, &c, &dimm, block_size).await;
    let again = retried_plug_plugs_once(&guest, &c, &plug, &dimm.id, start_kib, &mut t).await;

    // The bridge is killed (SIGKILL: a crash) and started again on its state directory:
    // the retry still answers the first plug, and nothing is plugged twice.
    drop(c);
    drop(bridge);
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    retry_after_a_restart_answers_the_first_plug(&guest, &c, &plug, &again, &dimm.id, start_kib)
        .await;

    // The guest reboots: QEMU keeps the DIMM, the new kernel finds its blocks offline,
    // and the bridge onlines them again, movable, as the journal records them.
    let start_kib = reboot_until_restored(&guest, &c, start_kib, DIMM_KIB, &mut t).await;
    one_movable_dimm(&guest, &c, block_size, "the DIMM after the reboot").await;

    unplug_over_grpc(&guest, &c, &dimm, start_kib, &mut t).await;
    resize_up_over_grpc(&guest, &c, boot_bytes, start_kib, &mut t).await;
    resize_down_over_grpc_while_listing(&guest, &c, boot_bytes, start_kib, &mut t).await;

    // The compose run's hotplug phase, on this guest too.
    let r = scenario::bridge_hotplug_cycle(&c, "vm1", &guest.control(), &mut t).await;
    ok(
        &guest,
        "the compose hotplug phase",
        r.map_err(|e| format!("{e:#}")),
    );

    // And as an operator does it: qgactl plugs 512 MiB, shows it, and unplugs it.
    qgactl_cycle(&guest, &bridge.grpc_url(), start_kib).await;
    print_timings(&t);
}

/// A DIMM the bridge plugged, as its answer names it.
struct Dimm {
    /// The device's id (`qga-dimmN`).
    id: String,
    /// Its memory backend's id (`qga-memN`).
    memdev: String,
}

/// The layout at boot: no DIMM, zones known (our agent), 512 MiB of boot memory. The
/// guest's block size and boot bytes.
async fn layout_at_boot(guest: &Guest, c: &Clients) -> (u64, u64) {
    let before = layout(guest, c).await;
    eprintln!("e2e: layout before: {before}");
    check(guest, scenario::layout_dimms(&before).is_empty(), || {
        format!("no DIMM at boot: {before}")
    });
    check(guest, before["zones-known"] == true, || {
        format!("our agent reports zones: {before}")
    });
    let block_size = before["block-size"].as_u64().unwrap_or_default();
    let boot_bytes = before["boot-bytes"].as_u64().unwrap_or_default();
    check(guest, block_size > 0 && boot_bytes == 512 << 20, || {
        format!("block size and 512 MiB boot memory in the layout: {before}")
    });
    (block_size, boot_bytes)
}

/// `plug` (512 MiB) into a guest booted with auto_online_blocks = offline: MemTotal grows
/// by the DIMM, which the bridge names, onlined movable without warnings: the bridge has
/// the kernel online movable by itself from then on, and the agent confirms in one call.
async fn plug_movable(
    guest: &Guest,
    c: &Clients,
    plug: &Value,
    start_kib: u64,
    block_size: u64,
    t: &mut Timings,
) -> Dimm {
    let what = "memory-plug (JSON-RPC)";
    let plugged = plug_until_usable(guest, c, what, plug.clone(), start_kib, t).await;
    let dimm = Dimm {
        id: text(&plugged["dimm"]["id"]),
        memdev: text(&plugged["dimm"]["memdev"]),
    };
    check(
        guest,
        dimm.id.starts_with("qga-dimm") && dimm.memdev.starts_with("qga-mem"),
        || format!("the bridge names its DIMMs qga-dimmN on qga-memN: {plugged}"),
    );
    check(
        guest,
        plugged["warnings"].as_array().is_some_and(Vec::is_empty),
        || format!("no warnings when our agent onlines movable: {plugged}"),
    );
    check_movable_dimm(guest, &plugged["dimm"], block_size);
    let names = step_names(&plugged["steps"]);
    check(
        guest,
        names == ["auto-online", "object-add", "device_add", "online"]
            && plugged["steps"][0]["detail"] == "offline -> online_movable"
            && plugged["steps"][3]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("as it appeared")),
        || format!("movable auto-onlining, then one online call: {plugged}"),
    );
    dimm
}

/// After the plug: the guest kernel onlines movable, the layout has `dimm` alone, all of it
/// movable, and QEMU lists the DIMM and its backend.
async fn dimm_in_layout_and_qemu(guest: &Guest, c: &Clients, dimm: &Dimm, block_size: u64) {
    let after = layout(guest, c).await;
    eprintln!("e2e: layout after plug: {after}");
    check(
        guest,
        after["auto-online-blocks"] == "online_movable",
        || format!("the guest kernel onlines movable now: {after}"),
    );
    let dimms = scenario::layout_dimms(&after);
    let Dimm { id, memdev } = dimm;
    check(
        guest,
        dimms.len() == 1 && dimms[0]["id"] == id.as_str(),
        || format!("one DIMM, {id}, in the layout: {after}"),
    );
    check_movable_dimm(guest, &dimms[0], block_size);
    check(
        guest,
        after["plugged-bytes"] == DIMM_BYTES && after["movable-bytes"] == DIMM_BYTES,
        || format!("512 MiB plugged, all of it movable: {after}"),
    );
    let devices = memory_devices(guest);
    check(
        guest,
        devices.len() == 1 && devices[0].id == *id && devices[0].memdev == *memdev,
        || format!("QEMU lists the DIMM {id} on {memdev}: {devices:?}"),
    );
    let memdevs = memdev_ids(guest);
    check(guest, memdevs.contains(memdev), || {
        format!("QEMU lists the backend {memdev}: {memdevs:?}")
    });
}

/// The same plug again, same request-id: the first result (the DIMM `dimm_id`), nothing
/// plugged again. The retry's answer.
async fn retried_plug_plugs_once(
    guest: &Guest,
    c: &Clients,
    plug: &Value,
    dimm_id: &str,
    start_kib: u64,
    t: &mut Timings,
) -> Value {
    let since = Instant::now();
    let again = ok(
        guest,
        "memory-plug retried",
        scenario::call(c, "memory-plug", plug.clone()).await,
    );
    t.record(
        "memory-plug retry with the same request-id",
        since.elapsed(),
    );
    check(guest, again["dimm"]["id"] == dimm_id, || {
        format!("the retry answers the first plug's DIMM {dimm_id}: {again}")
    });
    let retried = layout(guest, c).await;
    check(guest, scenario::layout_dimms(&retried).len() == 1, || {
        format!("a retried plug plugs once: {retried}")
    });
    mem_total_is(guest, start_kib + DIMM_KIB, "after the retry");
    let devices = memory_devices(guest);
    check(guest, devices.len() == 1, || {
        format!("QEMU has one DIMM after the retry: {devices:?}")
    });
    again
}

/// On a bridge started again on the journal, the plug's retry answers what the retry
/// before the restart did (`again`); QEMU still has the one DIMM `dimm_id`.
async fn retry_after_a_restart_answers_the_first_plug(
    guest: &Guest,
    c: &Clients,
    plug: &Value,
    again: &Value,
    dimm_id: &str,
    start_kib: u64,
) {
    let after_restart = ok(
        guest,
        "memory-plug retried after a restart",
        scenario::call(c, "memory-plug", plug.clone()).await,
    );
    check(guest, after_restart == *again, || {
        format!("the retry after a restart answers the first plug: {after_restart} vs {again}")
    });
    let devices = memory_devices(guest);
    check(
        guest,
        devices.len() == 1 && devices[0].id == dimm_id,
        || format!("QEMU still has the one DIMM {dimm_id} after the restart's retry: {devices:?}"),
    );
    mem_total_is(guest, start_kib + DIMM_KIB, "after the restart's retry");
}

/// Unplugs `dimm` over gRPC: MemTotal back at `start_kib`, no DIMM in the layout nor in
/// QEMU, and its backend deleted (object-del).
async fn unplug_over_grpc(
    guest: &Guest,
    c: &Clients,
    dimm: &Dimm,
    start_kib: u64,
    t: &mut Timings,
) {
    let since = Instant::now();
    let unplug = UnplugRequest {
        vm: "vm1".into(),
        dimm: dimm.id.clone(),
        request_id: None,
    };
    let unplugged = ok(guest, "Unplug", c.hotplug.clone().unplug(unplug).await).into_inner();
    t.record("Unplug call (gRPC)", since.elapsed());
    scenario::print_grpc_steps("Unplug", &unplugged.steps, &[]);
    check(
        guest,
        unplugged.dimm.as_ref().is_some_and(|d| d.id == dimm.id),
        || format!("Unplug answers the DIMM: {unplugged:?}"),
    );
    mem_total_becomes(guest, start_kib, "MemTotal back after Unplug").await;
    t.record("Unplug to MemTotal back", since.elapsed());
    let l = grpc_layout(guest, c).await;
    check(guest, l.dimms.is_empty() && l.plugged_bytes == 0, || {
        format!("no DIMM in the layout after Unplug: {l:?}")
    });
    let devices = memory_devices(guest);
    check(guest, devices.is_empty(), || {
        format!("QEMU has no DIMM after Unplug: {devices:?}")
    });
    let memdevs = memdev_ids(guest);
    let memdev = &dimm.memdev;
    check(guest, !memdevs.contains(memdev), || {
        format!("the backend {memdev} is gone (object-del): {memdevs:?}")
    });
}

/// `Resize` over gRPC to `size` bytes (`what`); the answer, its steps printed.
async fn grpc_resize(
    guest: &Guest,
    c: &Clients,
    size: u64,
    request_id: Option<&str>,
    what: &str,
) -> ResizeResponse {
    let resize = ResizeRequest {
        vm: "vm1".into(),
        size,
        request_id: request_id.map(str::to_string),
    };
    let r = ok(guest, what, c.hotplug.clone().resize(resize).await).into_inner();
    scenario::print_grpc_steps(what, &r.steps, &r.warnings);
    r
}

/// Resize up by 2 GiB over gRPC: four DIMMs of 512 MiB (hotplug.dimm_size_bytes), all added
/// first, then onlined by one agent call as their blocks appear, all of them movable.
async fn resize_up_over_grpc(
    guest: &Guest,
    c: &Clients,
    boot_bytes: u64,
    start_kib: u64,
    t: &mut Timings,
) {
    let (size, since) = (boot_bytes + 2 * GIB, Instant::now());
    let up = grpc_resize(guest, c, size, Some("e2e-resize-up"), "Resize up").await;
    t.record("Resize +2 GiB call (gRPC)", since.elapsed());
    check(
        guest,
        up.from_bytes == boot_bytes
            && up.to_bytes == boot_bytes + 2 * GIB
            && up.plugged.len() == 4
            && up.unplugged.is_empty(),
        || format!("Resize up plugs four 512 MiB DIMMs: {up:?}"),
    );
    let names: Vec<&str> = up.steps.iter().map(|s| s.name.as_str()).collect();
    check(
        guest,
        names.iter().filter(|n| **n == "device_add").count() == 4
            && names.last() == Some(&"online")
            && names.iter().filter(|n| **n == "online").count() == 1
            && !names.contains(&"wait-blocks"),
        || format!("four DIMMs added, then their blocks onlined in one step: {names:?}"),
    );
    mem_total_becomes(
        guest,
        start_kib + 2 * GIB / 1024,
        "MemTotal +2 GiB after Resize",
    )
    .await;
    t.record("Resize +2 GiB to usable", since.elapsed());
    let l = grpc_layout(guest, c).await;
    check(
        guest,
        l.dimms.len() == 4
            && l.plugged_bytes == 2 * GIB
            && l.dimms.iter().all(|d| {
                d.removable == Some(true)
                    && d.blocks
                        .iter()
                        .all(|b| b.state() == BlockState::Online && b.valid_zones == ["Movable"])
            }),
        || format!("four DIMMs, every block online in Movable: {l:?}"),
    );
    let devices = memory_devices(guest);
    check(guest, devices.len() == 4, || {
        format!("QEMU has four DIMMs after Resize up: {devices:?}")
    });
}

/// And back to the boot size over gRPC, while a control plane lists the guest's blocks
/// back to back: blocks the kernel removes during a listing are left out, never an error.
/// QEMU keeps no DIMM and no backend of the bridge's.
async fn resize_down_over_grpc_while_listing(
    guest: &Guest,
    c: &Clients,
    boot_bytes: u64,
    start_kib: u64,
    t: &mut Timings,
) {
    let lister = Lister::start(c);
    let since = Instant::now();
    let down = grpc_resize(guest, c, boot_bytes, None, "Resize down").await;
    t.record("Resize back to boot size call (gRPC)", since.elapsed());
    check(
        guest,
        down.from_bytes == boot_bytes + 2 * GIB
            && down.to_bytes == boot_bytes
            && down.unplugged.len() == 4
            && down.plugged.is_empty(),
        || format!("Resize down unplugs the four DIMMs: {down:?}"),
    );
    mem_total_becomes(guest, start_kib, "MemTotal back after Resize down").await;
    t.record("Resize back to MemTotal back", since.elapsed());
    lister.check(guest, "four DIMM unplugs").await;
    let l = layout(guest, c).await;
    check(guest, scenario::layout_dimms(&l).is_empty(), || {
        format!("no DIMM after Resize down: {l}")
    });
    let devices = memory_devices(guest);
    let memdevs = memdev_ids(guest);
    check(
        guest,
        devices.is_empty() && !memdevs.iter().any(|m| m.starts_with("qga-mem")),
        || format!("QEMU has no DIMM and no qga-mem backend: {devices:?} {memdevs:?}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_online_dimm_does_not_come_out_and_nothing_changes() {
    let guest = boot("ours", "online");
    let (_bridge, c) = behind_bridge(&guest).await;
    let mut t = Timings::default();
    let start_kib = mem_total(&guest);
    let dimm_id = plug_plain_online(&guest, &c, start_kib, &mut t).await;
    unplug_refused_for_the_kernel_zone(&guest, &c, &dimm_id, &mut t).await;
    nothing_changed_after_the_refusal(&guest, &c, &dimm_id, start_kib).await;
}

/// Plugs 512 MiB onlined plain `online`: the kernel onlines it as asked, then goes back to
/// onlining movable; `removable` and the layout's warnings agree with the blocks' zones.
/// The DIMM's id.
async fn plug_plain_online(guest: &Guest, c: &Clients, start_kib: u64, t: &mut Timings) -> String {
    let plug = json!({"vm": "vm1", "size": DIMM_BYTES, "online-type": "online"});
    let plugged = plug_until_usable(guest, c, "memory-plug online", plug, start_kib, t).await;
    let dimm_id = text(&plugged["dimm"]["id"]);
    eprintln!("e2e: plain-online DIMM: {}", plugged["dimm"]);
    let names = step_names(&plugged["steps"]);
    check(
        guest,
        names.first() == Some(&"auto-online")
            && names.last() == Some(&"auto-online")
            && plugged["steps"][0]["detail"] == "offline -> online",
        || format!("auto_online_blocks online for the plug, then back: {plugged}"),
    );
    let policy = layout(guest, c).await["auto-online-blocks"].clone();
    check(guest, policy == "online_movable", || {
        format!("auto_online_blocks back at online_movable: {policy}")
    });
    // With zones known, `removable` says whether every block is in Movable.
    let dimm = &plugged["dimm"];
    let all_movable = dimm["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|b| b["valid-zones"] == json!(["Movable"]));
    check(guest, dimm["removable"] == all_movable, || {
        format!("removable agrees with the blocks' zones: {dimm}")
    });
    // The layout says so in words when blocks are outside ZONE_MOVABLE.
    let l = layout(guest, c).await;
    let warned = l["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains(&dimm_id)))
    });
    check(guest, warned != all_movable, || {
        format!("a layout warning exactly when the DIMM cannot come out: {l}")
    });
    dimm_id
}

/// The unplug of a plain-online DIMM is refused, FAILED_PRECONDITION naming the blocks in
/// ZONE_NORMAL. The call may take the default two minutes; offlining gets
/// hotplug.offline_budget_ms (10 s) of it, so the refusal comes long before the call's
/// own deadline.
async fn unplug_refused_for_the_kernel_zone(
    guest: &Guest,
    c: &Clients,
    dimm_id: &str,
    t: &mut Timings,
) {
    let since = Instant::now();
    let r = c
        .rpc_full(
            "memory-unplug",
            json!({"vm": "vm1", "dimm": dimm_id, "timeout-ms": 120_000}),
        )
        .await;
    let took = since.elapsed();
    t.record("memory-unplug refused", took);
    eprintln!("e2e: memory-unplug of a plain-online DIMM: {r:?}");
    let e = refused(
        guest,
        "memory-unplug of a plain-online DIMM",
        r,
        "it came out, the kernel let ZONE_NORMAL memory go",
    );
    check(guest, e.code == -32007, || {
        format!("the refusal is FAILED_PRECONDITION (-32007): {e}")
    });
    check(
        guest,
        e.message.contains("block ") && e.message.contains("(zone Normal)"),
        || format!("the refusal names the blocks, their errno and zone: {e}"),
    );
    check(guest, took < Duration::from_secs(60), || {
        format!(
            "the refusal ends with the offline budget, not the call's two minutes: {:.1} s",
            took.as_secs_f64()
        )
    });
    check(
        guest,
        e.data.as_ref().is_some_and(|d| {
            d["step"] == "offline" && d["blocks"].as_array().is_some_and(|b| !b.is_empty())
        }),
        || format!("the refusal's data has the step and the blocks: {e}"),
    );
}

/// Nothing changed by the refused unplug: the memory, the DIMM and its blocks are all
/// still there.
async fn nothing_changed_after_the_refusal(
    guest: &Guest,
    c: &Clients,
    dimm_id: &str,
    start_kib: u64,
) {
    mem_total_is(guest, start_kib + DIMM_KIB, "after the refused unplug");
    let l = layout(guest, c).await;
    let dimms = scenario::layout_dimms(&l);
    check(
        guest,
        dimms.len() == 1
            && dimms[0]["id"] == dimm_id
            && scenario::block_states(&dimms[0]) == ["online"; 4],
        || format!("the DIMM stays with its 4 blocks online: {l}"),
    );
    let devices = memory_devices(guest);
    check(guest, devices.iter().any(|d| d.id == dimm_id), || {
        format!("QEMU still has the DIMM {dimm_id}: {devices:?}")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_agent_plug_works_with_a_warning() {
    // Rebooted at the end: QEMU must boot it again rather than exit. qemu-ga writes plain
    // `online`; the kernel's auto-movable policy puts such memory in ZONE_MOVABLE (up to
    // ten times the kernel's memory here), so these DIMMs can come out again.
    let guest = boot_with(GuestConfig {
        reboot: true,
        extra_append: "memory_hotplug.online_policy=auto-movable \
                       memory_hotplug.auto_movable_ratio=1000",
        ..GuestConfig::new("reference", "online")
    });
    let (_bridge, c) = behind_bridge(&guest).await;
    let mut t = Timings::default();
    let start_kib = mem_total(&guest);
    plug_with_qemu_ga_warns(&guest, &c, start_kib, &mut t).await;
    online_movable_refused_with_qemu_ga(&guest, &c, start_kib).await;

    // After a reboot the keeper onlines the DIMM again, through guest-set-memory-blocks
    // (qemu-ga cannot choose the zone).
    let start_kib = reboot_until_restored(&guest, &c, start_kib, DIMM_KIB, &mut t).await;
    let rebooted = layout(&guest, &c).await;
    check(
        &guest,
        scenario::block_states(&scenario::layout_dimms(&rebooted)[0]) == ["online"; 4],
        || format!("the DIMM's blocks online again after the reboot: {rebooted}"),
    );
    let boot_bytes = rebooted["boot-bytes"].as_u64().unwrap_or_default();
    resize_by_polling_with_qemu_ga(&guest, &c, boot_bytes, start_kib, &mut t).await;
    print_timings(&t);
}

/// Plugs 512 MiB with qemu-ga in the guest: it works, with a warning (qemu-ga cannot
/// choose the zone), and the layout knows no zones.
async fn plug_with_qemu_ga_warns(guest: &Guest, c: &Clients, start_kib: u64, t: &mut Timings) {
    let plug = json!({"vm": "vm1", "size": DIMM_BYTES});
    let plugged = plug_until_usable(guest, c, "memory-plug (qemu-ga)", plug, start_kib, t).await;
    check(
        guest,
        plugged["warnings"]
            .as_array()
            .is_some_and(|w| !w.is_empty()),
        || format!("qemu-ga cannot choose the zone: the plug warns: {plugged}"),
    );
    let l = layout(guest, c).await;
    eprintln!("e2e: layout with qemu-ga: {l}");
    let dimms = scenario::layout_dimms(&l);
    check(
        guest,
        dimms.len() == 1 && scenario::block_states(&dimms[0]) == ["online"; 4],
        || format!("one DIMM with 4 online blocks: {l}"),
    );
    check(guest, l["zones-known"] == false, || {
        format!("qemu-ga reports no zones: {l}")
    });
}

/// A plug asking online_movable of qemu-ga is refused, and plugs nothing.
async fn online_movable_refused_with_qemu_ga(guest: &Guest, c: &Clients, start_kib: u64) {
    let refused = c
        .rpc_full(
            "memory-plug",
            json!({"vm": "vm1", "size": DIMM_BYTES, "online-type": "online_movable"}),
        )
        .await;
    eprintln!("e2e: memory-plug online_movable with qemu-ga: {refused:?}");
    check(
        guest,
        matches!(&refused, Err(e) if e.code == -32007),
        || format!("online_movable asked of qemu-ga is FAILED_PRECONDITION (-32007): {refused:?}"),
    );
    let after = layout(guest, c).await;
    check(guest, scenario::layout_dimms(&after).len() == 1, || {
        format!("the refused plug plugged nothing: {after}")
    });
    let devices = memory_devices(guest);
    check(guest, devices.len() == 1, || {
        format!("QEMU has only the first DIMM: {devices:?}")
    });
    mem_total_is(guest, start_kib + DIMM_KIB, "after the refused plug");
}

/// Resize by polling: three more DIMMs added, their blocks waited for through
/// guest-get-memory-blocks and onlined with guest-set-memory-blocks, then all four out.
async fn resize_by_polling_with_qemu_ga(
    guest: &Guest,
    c: &Clients,
    boot_bytes: u64,
    start_kib: u64,
    t: &mut Timings,
) {
    let since = Instant::now();
    let up = resize_to(
        guest,
        c,
        boot_bytes + 2 * GIB,
        start_kib + 4 * DIMM_KIB,
        "memory-resize +2 GiB with qemu-ga",
    )
    .await;
    t.record("memory-resize +2 GiB (qemu-ga) to usable", since.elapsed());
    let names = step_names(&up["steps"]);
    check(
        guest,
        up["plugged"].as_array().is_some_and(|p| p.len() == 3)
            && names.iter().filter(|n| **n == "device_add").count() == 3
            && names.ends_with(&["wait-blocks", "online"]),
        || format!("three DIMMs added, then waited for and onlined together: {up}"),
    );
    let back = "memory-resize back with qemu-ga";
    let down = resize_to(guest, c, boot_bytes, start_kib, back).await;
    check(
        guest,
        down["unplugged"].as_array().is_some_and(|u| u.len() == 4),
        || format!("all four DIMMs unplugged: {down}"),
    );
    let devices = memory_devices(guest);
    check(guest, devices.is_empty(), || {
        format!("QEMU has no DIMM left: {devices:?}")
    });
}

/// The names of a JSON-RPC hotplug answer's steps, in order.
fn step_names(steps: &Value) -> Vec<&str> {
    steps
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect()
}

/// Runs `qgactl --endpoint endpoint args...`; its exit code, stdout and stderr.
async fn qgactl(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(qga_testkit::bin_path("qgactl"));
    cmd.arg("--endpoint").arg(endpoint).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("joins")
        .expect("qgactl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qgactl memory plug`, `memory layout`, `memory unplug` on the real guest: MemTotal
/// follows, and the DIMM qgactl names is the one it unplugs.
async fn qgactl_cycle(guest: &Guest, endpoint: &str, start_kib: u64) {
    let (code, out, err) =
        qgactl(endpoint, &["memory", "plug", "vm1", "512MiB", "-o", "json"]).await;
    eprintln!("e2e: qgactl memory plug: {code}\n{out}{err}");
    check(guest, code == 0, || {
        format!("qgactl memory plug exits 0: {code} {err}")
    });
    let plugged: Value = ok(guest, "qgactl's JSON", serde_json::from_str(&out));
    let id = text(&plugged["dimm"]["id"]);
    check(guest, err.contains("request-id: qgactl-"), || {
        format!("a generated request id is shown: {err}")
    });
    mem_total_becomes(
        guest,
        start_kib + DIMM_KIB,
        "MemTotal +512 MiB after qgactl memory plug",
    )
    .await;
    let (code, out, err) = qgactl(endpoint, &["memory", "layout", "vm1"]).await;
    eprintln!("e2e: qgactl memory layout: {code}\n{out}{err}");
    check(
        guest,
        code == 0 && out.contains(&id) && out.contains("Movable"),
        || format!("qgactl memory layout shows {id} in ZONE_MOVABLE: {out}"),
    );
    let (code, out, err) = qgactl(endpoint, &["memory", "unplug", "vm1", &id]).await;
    eprintln!("e2e: qgactl memory unplug: {code}\n{out}{err}");
    check(
        guest,
        code == 0 && out.contains("512 MiB given back"),
        || format!("qgactl memory unplug exits 0: {code} {out} {err}"),
    );
    mem_total_becomes(guest, start_kib, "MemTotal back after qgactl memory unplug").await;
    let (code, _, err) = qgactl(endpoint, &["memory", "unplug", "vm1", &id]).await;
    check(guest, code == 25 && err.contains("NOT_FOUND"), || {
        format!("unplugging it again is NOT_FOUND (exit 25): {code} {err}")
    });
}

/// Resets `guest` (a reboot: QEMU keeps its DIMMs and virtio-mem memory, the new kernel
/// finds their blocks offline) and waits until it boots again and the bridge's keeper has
/// onlined all of it: the layout shows the boot memory and every plugged byte
/// (`plugged_kib`) online. Returns the new boot's MemTotal without the plugged memory,
/// which later MemTotal checks count from: the kernel's own reservations at boot may
/// differ by a page from one boot to the next (`base_kib` was the last boot's).
async fn reboot_until_restored(
    guest: &Guest,
    c: &Clients,
    base_kib: u64,
    plugged_kib: u64,
    t: &mut Timings,
) -> u64 {
    let g = guest.control();
    let boots = guest.boots();
    let since = Instant::now();
    ok(guest, "system_reset", g.system_reset());
    while guest.boots() == boots {
        check(guest, since.elapsed() < PATIENCE, || {
            format!("the guest booted again within {PATIENCE:?}")
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.record("guest reboot to agent ready", since.elapsed());
    let ready = Instant::now();
    let restored = qga_e2e::wait::until("the plugged memory online again", PATIENCE, || async {
        // The agent answers through the bridge again once the guest is up.
        let l = match scenario::memory_layout(c, "vm1").await {
            Ok(l) => l,
            Err(e) => return Ok(ControlFlow::Continue(format!("{e:#}"))),
        };
        let (boot, plugged) = (l["boot-bytes"].as_u64(), l["plugged-bytes"].as_u64());
        let all = boot.zip(plugged).map(|(b, p)| b + p);
        Ok(
            if plugged == Some(plugged_kib * 1024) && l["online-bytes"].as_u64() == all {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(l.to_string())
            },
        )
    })
    .await;
    ok(
        guest,
        "the keeper restores the plugged memory",
        restored.map_err(|e| format!("{e:#}")),
    );
    t.record("agent ready to the DIMMs online again", ready.elapsed());
    let base = mem_total(guest).saturating_sub(plugged_kib);
    check(guest, base.abs_diff(base_kib) < 128 << 10, || {
        format!(
            "the boot's own MemTotal (MemTotal less the {plugged_kib} KiB plugged) is \
             {base} KiB, within a block of the {base_kib} KiB before the reboot"
        )
    });
    if base != base_kib {
        eprintln!(
            "e2e: the boot's own MemTotal went from {base_kib} to {base} KiB across the reboot"
        );
    }
    base
}

/// `guest-get-memory-blocks` through the bridge, back to back, until stopped.
struct Lister {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Lister {
    fn start(c: &Clients) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, stopped) = (c.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut listed, mut failed) = (0, Vec::new());
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match c.rpc("guest-get-memory-blocks", json!({"vm": "vm1"})).await {
                    Ok(_) => listed += 1,
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (listed, failed)
        });
        Self { stop, task }
    }

    /// Stops listing and checks that every listing during `what` answered.
    async fn check(self, guest: &Guest, what: &str) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (listed, failed) = self.task.await.expect("the lister joins");
        eprintln!(
            "e2e: {listed} block listings during {what}, {} failed",
            failed.len()
        );
        check(guest, listed > 0 && failed.is_empty(), || {
            format!("every listing during {what} answered ({listed} did): {failed:?}")
        });
    }
}

/// A bridge in front of `guest` that kills itself (SIGKILL) as hotplug step `step`
/// completes, on the journal in `state`.
async fn bridge_dying_after(guest: &Guest, state: &Path, step: &str) -> (BridgeProcess, Clients) {
    // qga_bridge::fault::KILL_AFTER_STEP: the bridge's test-only hook.
    let env = vec![(
        "QGA_BRIDGE_TEST_KILL_AFTER_STEP".to_string(),
        step.to_string(),
    )];
    behind_bridge_env(guest, Some(state), env).await
}

/// Retries `method` with the same params (and request-id) until the new bridge has
/// recovered the interrupted operation (no longer ABORTED); its answer.
async fn outcome_after_recovery(
    guest: &Guest,
    c: &Clients,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    let since = Instant::now();
    loop {
        let r = c.rpc_full(method, params.clone()).await;
        match &r {
            Err(e) if e.code == -32011 => {}
            _ => return r,
        }
        check(guest, since.elapsed() < PATIENCE, || {
            format!("{method} {params} recovered within {PATIENCE:?}: {r:?}")
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Calls `method` on a bridge that dies after `step`, starts a bridge on the same journal
/// and returns it with the recovered outcome of a retry.
async fn killed_then_recovered(
    guest: &Guest,
    state: &Path,
    step: &str,
    method: &str,
    params: &Value,
) -> (BridgeProcess, Clients, Result<Value, RpcError>) {
    let (dying, c) = bridge_dying_after(guest, state, step).await;
    let r = c.rpc_full(method, params.clone()).await;
    // No answer at all (code 0): the bridge died at the step. An answer — ABORTED, say —
    // would mean the operation never ran, and its request-id would then run afresh on
    // the next bridge instead of being recovered.
    check(guest, matches!(&r, Err(e) if e.code == 0), || {
        format!("{method} dies with its bridge at {step}, unanswered: {r:?}")
    });
    drop(dying);
    let (bridge, c) = behind_bridge_at(guest, Some(state)).await;
    let first = outcome_after_recovery(guest, &c, method, params).await;
    eprintln!("e2e: {method} killed after {step}: {first:?}");
    (bridge, c, first)
}

/// Unplugs DIMM `id` through `c` and waits until MemTotal is `kib` again.
async fn unplug_to(guest: &Guest, c: &Clients, id: &str, kib: u64) {
    let params = json!({"vm": "vm1", "dimm": id});
    ok(
        guest,
        "unplug",
        scenario::call(c, "memory-unplug", params).await,
    );
    mem_total_becomes(guest, kib, "MemTotal back after the unplug").await;
}

/// QEMU's bridge-made DIMMs and memory backends.
fn ours_in_qemu(guest: &Guest) -> (Vec<String>, Vec<String>) {
    let dimms = memory_devices(guest).into_iter().map(|d| d.id).collect();
    let memdevs = memdev_ids(guest)
        .into_iter()
        .filter(|m| m.starts_with("qga-mem"))
        .collect();
    (dimms, memdevs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_at_each_step_leaves_one_documented_state() {
    let guest = boot("ours", "online_movable");
    let state = tempfile::tempdir().expect("state directory");
    let start_kib = mem_total(&guest);
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    let block_size = layout(&guest, &c).await["block-size"]
        .as_u64()
        .unwrap_or_default();
    drop(bridge);

    // Plug, killed after each step: before device_add nothing is left; from device_add on
    // the DIMM is kept and onlined movable. A retry answers that, and again the same.
    for (step, kept) in [
        ("object-add", false),
        ("device_add", true),
        ("online", true),
    ] {
        plug_killed_after(&guest, state.path(), step, kept, start_kib, block_size).await;
    }
    plug_without_request_id_killed(&guest, state.path(), start_kib, block_size).await;

    // Unplug, killed after each step: after offline the DIMM stays, online again; after
    // device_del it is gone, its backend deleted.
    for (step, gone) in [("offline", false), ("device_del", true)] {
        unplug_killed_after(&guest, state.path(), step, gone, start_kib, block_size).await;
    }
}

/// A plug (with a request-id) on a bridge killed after `step`, recovered by the next
/// bridge on the journal in `state`: the DIMM `kept` and onlined movable, or nothing left.
/// A retry answers the same and plugs nothing; the guest is left at `start_kib`.
async fn plug_killed_after(
    guest: &Guest,
    state: &Path,
    step: &str,
    kept: bool,
    start_kib: u64,
    block_size: u64,
) {
    let plug = json!({"vm": "vm1", "size": DIMM_BYTES, "request-id": format!("kill-plug-{step}")});
    let (bridge, c, first) = killed_then_recovered(guest, state, step, "memory-plug", &plug).await;
    let (dimms, memdevs) = ours_in_qemu(guest);
    if kept {
        let Ok(done) = &first else {
            fail(
                guest,
                &format!("plug killed after {step} is finished"),
                format!("{first:?}"),
            )
        };
        check(
            guest,
            dimms.len() == 1 && done["dimm"]["id"] == dimms[0].as_str(),
            || format!("after {step}: one DIMM, the answered one: {dimms:?} {done}"),
        );
        mem_total_becomes(guest, start_kib + DIMM_KIB, "the kept DIMM is online").await;
        one_movable_dimm(guest, &c, block_size, "the kept DIMM in the layout").await;
    } else {
        plug_undone(guest, step, &first, &dimms, &memdevs, start_kib);
    }
    retry_answers_the_same(guest, &c, "memory-plug", &plug, &first, step).await;
    check(
        guest,
        ours_in_qemu(guest).0.len() == usize::from(kept),
        || format!("the retry after {step} plugged nothing"),
    );
    if kept {
        unplug_to(guest, &c, &dimms[0], start_kib).await;
    }
    drop(bridge);
}

/// A plug killed after `step`, before device_add, is undone: FAILED_PRECONDITION at step
/// interrupted, no DIMM (`dimms`) nor backend (`memdevs`) of the bridge's left in QEMU,
/// MemTotal unchanged.
fn plug_undone(
    guest: &Guest,
    step: &str,
    first: &Result<Value, RpcError>,
    dimms: &[String],
    memdevs: &[String],
    start_kib: u64,
) {
    let Err(e) = first else {
        fail(
            guest,
            &format!("plug killed after {step} is undone"),
            format!("{first:?}"),
        )
    };
    check(
        guest,
        e.code == -32007 && e.data.as_ref().is_some_and(|d| d["step"] == "interrupted"),
        || format!("after {step}: FAILED_PRECONDITION at step interrupted: {e:?}"),
    );
    check(guest, dimms.is_empty() && memdevs.is_empty(), || {
        format!("after {step}: no DIMM and no backend left: {dimms:?} {memdevs:?}")
    });
    check(guest, mem_total(guest) == start_kib, || {
        format!("MemTotal unchanged after {step}")
    });
}

/// A plug sent without a request-id is journaled too: killed after device_add, its DIMM is
/// kept and onlined by the next bridge, which nobody has to ask.
async fn plug_without_request_id_killed(
    guest: &Guest,
    state: &Path,
    start_kib: u64,
    block_size: u64,
) {
    let (dying, c) = bridge_dying_after(guest, state, "device_add").await;
    let r = c
        .rpc_full("memory-plug", json!({"vm": "vm1", "size": DIMM_BYTES}))
        .await;
    check(guest, r.is_err(), || {
        format!("the plug dies with its bridge: {r:?}")
    });
    drop(dying);
    let (bridge, c) = behind_bridge_at(guest, Some(state)).await;
    mem_total_becomes(
        guest,
        start_kib + DIMM_KIB,
        "a plug without request-id is finished",
    )
    .await;
    let id = one_movable_dimm(guest, &c, block_size, "one DIMM kept").await;
    unplug_to(guest, &c, &id, start_kib).await;
    drop(bridge);
}

/// An unplug (with a request-id) on a bridge killed after `step`, recovered by the next
/// bridge on the journal in `state`: the DIMM `gone` with its backend, or still there and
/// online again. A retry answers the same; the guest is left at `start_kib`.
async fn unplug_killed_after(
    guest: &Guest,
    state: &Path,
    step: &str,
    gone: bool,
    start_kib: u64,
    block_size: u64,
) {
    let (bridge, c) = behind_bridge_at(guest, Some(state)).await;
    let plug = json!({"vm": "vm1", "size": DIMM_BYTES});
    let id = text(&ok(guest, "plug", scenario::call(&c, "memory-plug", plug).await)["dimm"]["id"]);
    drop(bridge);
    let unplug = json!({"vm": "vm1", "dimm": id, "request-id": format!("kill-unplug-{step}")});
    let (bridge, c, first) =
        killed_then_recovered(guest, state, step, "memory-unplug", &unplug).await;
    let (dimms, memdevs) = ours_in_qemu(guest);
    if gone {
        check(
            guest,
            first.as_ref().is_ok_and(|d| d["dimm"]["id"] == id.as_str()),
            || format!("unplug killed after {step} is finished: {first:?}"),
        );
        check(guest, dimms.is_empty() && memdevs.is_empty(), || {
            format!("after {step}: DIMM and backend gone: {dimms:?} {memdevs:?}")
        });
        mem_total_becomes(guest, start_kib, "MemTotal back").await;
    } else {
        check(
            guest,
            first.as_ref().is_err_and(|e| e.code == -32007),
            || format!("unplug killed after {step} is undone: {first:?}"),
        );
        check(guest, dimms == [id.clone()], || {
            format!("after {step}: the DIMM stays: {dimms:?}")
        });
        mem_total_becomes(
            guest,
            start_kib + DIMM_KIB,
            "the DIMM's blocks online again",
        )
        .await;
        one_movable_dimm(guest, &c, block_size, "the DIMM kept in the layout").await;
        unplug_to(guest, &c, &id, start_kib).await;
    }
    retry_answers_the_same(guest, &c, "memory-unplug", &unplug, &first, step).await;
    drop(bridge);
}

/// A bridge in front of `guest` with `config` (TOML) after its `[vms]` table.
async fn behind_bridge_config(guest: &Guest, config: &str) -> (BridgeProcess, Clients) {
    let bridge =
        BridgeProcess::start_with_config(&[("vm1", &guest.qga_socket())], config, qmp_args(guest))
            .await
            .expect("bridge");
    answering(guest, bridge).await
}

/// The layout's virtio-mem device `vmem0`.
async fn vmem0(guest: &Guest, c: &Clients) -> Value {
    let l = layout(guest, c).await;
    let d = l["virtio-mem"]
        .as_array()
        .and_then(|v| v.iter().find(|d| d["id"] == "vmem0"))
        .cloned();
    d.unwrap_or_else(|| fail(guest, "the layout lists virtio-mem device vmem0", &l))
}

/// Resizes through JSON-RPC and waits for MemTotal; the reply.
async fn resize_to(guest: &Guest, c: &Clients, size: u64, want_kib: u64, what: &str) -> Value {
    let r = ok(
        guest,
        what,
        scenario::call(c, "memory-resize", json!({"vm": "vm1", "size": size})).await,
    );
    scenario::print_steps(what, &r);
    mem_total_becomes(guest, want_kib, what).await;
    r
}

/// Checks that vmem0 covers `blocks` guest blocks, all online in ZONE_MOVABLE.
async fn vmem0_online_movable(guest: &Guest, c: &Clients, blocks: usize, when: &str) {
    let d = vmem0(guest, c).await;
    let listed = d["blocks"].as_array().cloned().unwrap_or_default();
    check(
        guest,
        listed.len() == blocks
            && listed
                .iter()
                .all(|b| b["state"] == "online" && b["valid-zones"] == json!(["Movable"])),
        || format!("{when}: vmem0's {blocks} blocks online in Movable: {d}"),
    );
}

/// QEMU's vmem0: its `(requested-size, size)`.
fn vmem0_sizes(guest: &Guest) -> (u64, u64) {
    ok(
        guest,
        "virtio-mem sizes",
        guest.control().virtio_mem_sizes("vmem0"),
    )
}

/// Checks that QEMU's vmem0 requests and has `bytes` (`what` says so).
fn vmem0_sizes_are(guest: &Guest, bytes: u64, what: &str) {
    let sizes = vmem0_sizes(guest);
    check(guest, sizes == (bytes, bytes), || {
        format!("{what}: {sizes:?}")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_mem_resize_through_the_bridge() {
    let guest = boot_with(GuestConfig {
        virtio_mem: true,
        reboot: true,
        ..GuestConfig::new("ours", "online_movable")
    });
    let mut t = Timings::default();
    let state = tempfile::tempdir().expect("state directory");
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    let start_kib = mem_total(&guest);
    let (boot, block_size) = vmem0_empty_at_boot(&guest, &c).await;
    vmem0_grows_by_1_gib(&guest, &c, boot, start_kib).await;

    // A reboot: QEMU keeps requested-size, the guest's driver plugs it again at boot and
    // leaves it offline (the guest's auto_online_blocks is back at `offline`); the keeper
    // onlines it, Movable.
    let start_kib = reboot_until_restored(&guest, &c, start_kib, GIB / 1024, &mut t).await;
    vmem0_online_movable(&guest, &c, 8, "after the reboot").await;

    // Shrink by 512 MiB, and later back to the boot size, while a control plane lists the
    // guest's blocks back to back: the driver removes blocks during listings, which leave
    // them out instead of failing.
    let lister = Lister::start(&c);
    vmem0_shrinks_by_512_mib(&guest, &c, boot, start_kib).await;
    resizes_past_max_size_or_off_blocks_refused(&guest, &c, boot).await;
    resize_to(&guest, &c, boot, start_kib, "resize back to the boot size").await;
    vmem0_sizes_are(&guest, 0, "QEMU: nothing plugged");
    lister.check(&guest, "two virtio-mem shrinks").await;

    drop(c);
    drop(bridge);
    let (bridge, c) =
        killed_grow_recovers_at_one_size(&guest, state.path(), boot, start_kib, block_size).await;
    resize_to(&guest, &c, boot, start_kib, "resize back after recovery").await;

    // The agent's socket is the bridge's while it runs.
    drop(c);
    drop(bridge);
    kernel_zone_shrink_ends_where_the_guest_got(&guest, boot, start_kib).await;
    killed_kernel_zone_shrink_is_withdrawn(&guest, state.path(), boot).await;
}

/// vmem0 in the layout at boot: 2 GiB at most, 2 MiB blocks, nothing plugged. The boot
/// memory and the guest's block size.
async fn vmem0_empty_at_boot(guest: &Guest, c: &Clients) -> (u64, u64) {
    let before = layout(guest, c).await;
    let boot = before["boot-bytes"].as_u64().unwrap_or_default();
    let block_size = before["block-size"].as_u64().unwrap_or(128 << 20);
    let d = vmem0(guest, c).await;
    check(
        guest,
        d["max-size"] == 2 * GIB
            && d["block-size"] == 2 << 20
            && d["plugged-size"] == 0
            && d["blocks"].as_array().is_some_and(Vec::is_empty),
        || format!("vmem0 in the layout: 2 GiB at most, 2 MiB blocks, nothing plugged: {d}"),
    );
    (boot, block_size)
}

/// Grow by 1 GiB: QEMU's size reaches it and the guest has it online, movable.
async fn vmem0_grows_by_1_gib(guest: &Guest, c: &Clients, boot: u64, start_kib: u64) {
    let up = resize_to(
        guest,
        c,
        boot + GIB,
        start_kib + GIB / 1024,
        "resize +1 GiB",
    )
    .await;
    check(
        guest,
        up["to-bytes"] == boot + GIB
            && up["virtio-mem"] == json!([{"id": "vmem0", "from-bytes": 0, "to-bytes": GIB}])
            && up["plugged"].as_array().is_some_and(Vec::is_empty),
        || format!("the resize changed vmem0 alone, 0 -> 1 GiB: {up}"),
    );
    vmem0_sizes_are(guest, GIB, "QEMU: requested-size and size 1 GiB");
    vmem0_online_movable(guest, c, 8, "after +1 GiB").await;
}

/// Shrink by 512 MiB: QEMU's size follows.
async fn vmem0_shrinks_by_512_mib(guest: &Guest, c: &Clients, boot: u64, start_kib: u64) {
    let down = resize_to(
        guest,
        c,
        boot + GIB / 2,
        start_kib + GIB / 2048,
        "resize -512 MiB",
    )
    .await;
    check(guest, down["to-bytes"] == boot + GIB / 2, || {
        format!("the VM has boot + 512 MiB: {down}")
    });
    vmem0_sizes_are(guest, GIB / 2, "QEMU: requested-size and size 512 MiB");
}

/// Past max-size: refused, nothing changed; a size off the device's block size: invalid.
async fn resizes_past_max_size_or_off_blocks_refused(guest: &Guest, c: &Clients, boot: u64) {
    let refused = c
        .rpc_full(
            "memory-resize",
            json!({"vm": "vm1", "size": boot + 3 * GIB}),
        )
        .await;
    check(
        guest,
        matches!(&refused, Err(e) if e.code == -32007 && e.message.contains("past what")),
        || format!("a resize past max-size is FAILED_PRECONDITION: {refused:?}"),
    );
    vmem0_sizes_are(guest, GIB / 2, "nothing changed after the refusal");
    let odd = c
        .rpc_full(
            "memory-resize",
            json!({"vm": "vm1", "size": boot + (1 << 20)}),
        )
        .await;
    check(guest, matches!(&odd, Err(e) if e.code == -32602), || {
        format!("a size off the 2 MiB block size is invalid: {odd:?}")
    });
}

/// A grow on a bridge killed once requested-size is set: the next one (on the journal in
/// `state`) stops QEMU and the guest at one size (requested-size = what the guest holds),
/// onlines it, and answers a retry `interrupted`, naming that size; the retry changes
/// nothing. The next bridge.
async fn killed_grow_recovers_at_one_size(
    guest: &Guest,
    state: &Path,
    boot: u64,
    start_kib: u64,
    block_size: u64,
) -> (BridgeProcess, Clients) {
    let grow = json!({"vm": "vm1", "size": boot + GIB, "request-id": "kill-vmem-grow"});
    let step = "requested-size";
    let (bridge, c, first) =
        killed_then_recovered(guest, state, step, "memory-resize", &grow).await;
    // A plug the guest had under way as the request was withdrawn is given back at once.
    let (requested, size) = vmem0_settled(guest).await;
    check(
        guest,
        matches!(&first, Err(e) if e.code == -32007
            && e.data.as_ref().is_some_and(|d| d["step"] == "interrupted")
            && e.message.contains(&format!("'vmem0' at {size} bytes")))
            && requested == size,
        || {
            format!(
                "the killed resize is FAILED_PRECONDITION at step interrupted naming vmem0's \
                 size, and QEMU's request is what the guest holds ({requested}, {size}): {first:?}"
            )
        },
    );
    mem_total_becomes(
        guest,
        start_kib + size / 1024,
        "the recovered virtio-mem memory online",
    )
    .await;
    let blocks = size.div_ceil(block_size) as usize;
    vmem0_online_movable(guest, &c, blocks, "after recovery").await;
    retry_answers_the_same(guest, &c, "memory-resize", &grow, &first, step).await;
    check(guest, vmem0_sizes(guest) == (requested, size), || {
        "the retry changed nothing".to_string()
    });
    (bridge, c)
}

/// QEMU's vmem0 sizes once its size is what it requests, within [`PATIENCE`].
async fn vmem0_settled(guest: &Guest) -> (u64, u64) {
    let g = guest.control();
    let settled = qga_e2e::wait::until("vmem0's size at its request", PATIENCE, || async {
        let (requested, size) = g.virtio_mem_sizes("vmem0")?;
        anyhow::Ok(if requested == size {
            ControlFlow::Break((requested, size))
        } else {
            ControlFlow::Continue(format!("requested-size {requested}, size {size}"))
        })
    })
    .await;
    ok(
        guest,
        "virtio-mem sizes",
        settled.map_err(|e| format!("{e:#}")),
    )
}

/// Memory the guest onlines into the kernel zone (a bridge that leaves the guest's policy
/// alone, and a guest that onlines online_kernel) cannot all be given back: the shrink
/// ends where the guest got, with requested-size set back to it.
async fn kernel_zone_shrink_ends_where_the_guest_got(guest: &Guest, boot: u64, start_kib: u64) {
    guest_onlines_online_kernel(guest);
    let (_bridge, c) = behind_bridge_config(
        guest,
        "[hotplug]\nauto_online = \"keep\"\noffline_budget_ms = 300\n",
    )
    .await;
    resize_to(
        guest,
        &c,
        boot + GIB,
        start_kib + GIB / 1024,
        "resize +1 GiB into the kernel zone",
    )
    .await;
    let stuck = c
        .rpc_full("memory-resize", json!({"vm": "vm1", "size": boot}))
        .await;
    eprintln!("e2e: shrinking kernel-zone virtio-mem memory: {stuck:?}");
    let e = refused(
        guest,
        "a shrink of kernel-zone memory within 300 ms without progress",
        stuck,
        "the guest gave all of it back",
    );
    let (requested, size) = vmem0_sizes(guest);
    check(
        guest,
        e.code == -32007
            && e.message.contains("set back")
            && e.message.contains(&format!("hold {size} bytes"))
            && requested == size
            && size > 0,
        || {
            format!(
                "FAILED_PRECONDITION naming the size reached ({size}), requested-size set \
                 back to it ({requested}): {e}"
            )
        },
    );
    let l = layout(guest, &c).await;
    check(guest, l["plugged-bytes"] == size, || {
        format!("the layout agrees with QEMU: {l}")
    });
}

/// Has the guest's kernel online hot-added memory `online_kernel`, through the agent's
/// socket (which no bridge may hold meanwhile).
fn guest_onlines_online_kernel(guest: &Guest) {
    let mut agent = ok(
        guest,
        "the agent's socket",
        qga_testkit::QgaClient::connect(&guest.qga_socket()),
    );
    let set = ok(
        guest,
        "set-auto-online",
        agent.execute(
            "__org.qga-bridge_set-auto-online",
            Some(json!({"auto-online-blocks": "online_kernel"})),
        ),
    );
    check(
        guest,
        set["return"]["auto-online-blocks"] == "online_kernel",
        || format!("the guest onlines online_kernel: {set}"),
    );
}

/// The same shrink on a bridge killed once requested-size is set: the guest cannot get
/// there, so the next bridge (on the journal in `state`) finds QEMU's request unmet and
/// withdraws it.
async fn killed_kernel_zone_shrink_is_withdrawn(guest: &Guest, state: &Path, boot: u64) {
    let shrink = json!({"vm": "vm1", "size": boot, "request-id": "kill-vmem-shrink"});
    let (_bridge, _c, first) =
        killed_then_recovered(guest, state, "requested-size", "memory-resize", &shrink).await;
    let (requested, size) = vmem0_sizes(guest);
    check(
        guest,
        matches!(&first, Err(e) if e.code == -32007
            && e.message.contains(&format!("'vmem0' at {size} bytes (its request for 0 withdrawn)")))
            && requested == size
            && size > 0,
        || {
            format!(
                "the killed shrink's request is withdrawn: requested-size is what the guest \
                 holds ({requested}, {size}): {first:?}"
            )
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stats_show_the_guest_as_its_kernel_sees_it() {
    let guest = boot("ours", "online_movable");
    let (_bridge, c) = behind_bridge(&guest).await;
    let available = stats_at_boot(&guest, &c).await;
    allocation_lowers_available(&guest, &c, available).await;
}

/// `memory-stats` of VM `vm1`.
async fn memory_stats(guest: &Guest, c: &Clients) -> Value {
    let stats = c.rpc_full("memory-stats", json!({"vm": "vm1"})).await;
    ok(guest, "memory-stats", stats)
}

/// The guest's `MemAvailable` in a `memory-stats` reply, bytes.
fn available(stats: &Value) -> u64 {
    stats["agent"]["meminfo"]["mem-available"]
        .as_u64()
        .unwrap_or_default()
}

/// At boot: our agent's stats agree with the guest's own MemTotal, MemAvailable is at
/// most MemTotal, PSI is there (the Debian kernel has it on), and the bridge's totals are
/// the 512 MiB the guest booted with. MemAvailable, bytes.
async fn stats_at_boot(guest: &Guest, c: &Clients) -> u64 {
    let stats = memory_stats(guest, c).await;
    eprintln!("e2e: memory-stats at boot: {stats}");
    let meminfo = &stats["agent"]["meminfo"];
    let total = meminfo["mem-total"].as_u64().unwrap_or_default();
    check(guest, total == mem_total(guest) * 1024, || {
        format!("mem-total is the guest's MemTotal: {stats}")
    });
    check(
        guest,
        available(&stats) > 0 && available(&stats) <= total,
        || format!("0 < mem-available <= mem-total: {stats}"),
    );
    check(
        guest,
        stats["agent"]["working-set"].as_u64() == Some(total - available(&stats)),
        || format!("working-set is mem-total - mem-available: {stats}"),
    );
    let some = &stats["agent"]["pressure"]["some"];
    check(
        guest,
        some["avg10"].is_f64() && some["total"].is_u64(),
        || format!("the guest kernel reports PSI: {stats}"),
    );
    check(
        guest,
        stats["agent"]["boot-id"]
            .as_str()
            .is_some_and(|b| b.len() == 36),
        || format!("a boot id: {stats}"),
    );
    let bridge = &stats["bridge"];
    check(
        guest,
        bridge["boot-bytes"] == 512u64 << 20 && bridge["total-bytes"] == 512u64 << 20,
        || format!("the host's totals are the boot memory: {stats}"),
    );
    available(&stats)
}

/// 128 MiB the guest cannot reclaim lower MemAvailable by about that much in the next
/// snapshots, and freeing them raises it again.
async fn allocation_lowers_available(guest: &Guest, c: &Clients, before: u64) {
    const HOG: u64 = 128 << 20;
    let written = ok(guest, "hog", guest.control().port().hog(HOG >> 20));
    check(guest, written << 20 == HOG, || {
        format!("{written} MiB written")
    });
    let low = stats_until(guest, c, "MemAvailable falls by the 128 MiB", |s| {
        available(s) + HOG * 3 / 4 <= before
    })
    .await;
    eprintln!("e2e: MemAvailable {before} -> {} bytes", available(&low));
    ok(guest, "unhog", guest.control().port().unhog());
    stats_until(guest, c, "MemAvailable rises again once freed", |s| {
        available(s) >= available(&low) + HOG * 3 / 4
    })
    .await;
}

/// `memory-stats` until `enough` holds for it (a snapshot lives a second), within
/// [`PATIENCE`]; fails with `what` and the last reply.
async fn stats_until(
    guest: &Guest,
    c: &Clients,
    what: &str,
    enough: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = memory_stats(guest, c).await;
        if enough(&stats) {
            return stats;
        }
        if Instant::now() > deadline {
            fail(guest, what, format!("last memory-stats: {stats}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
