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
    bridge::{BridgeProcess, Clients},
    guest::{Guest, GuestConfig},
    image,
    scenario::{self, DIMM_BYTES, GIB, Timings},
    wait::PATIENCE,
};
use qga_proto::v1::{BlockState, GetLayoutRequest, MemoryLayout, ResizeRequest, UnplugRequest};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plug_unplug_and_resize_through_the_bridge() {
    // This guest is rebooted below: QEMU must boot it again rather than exit.
    let guest = boot_with(GuestConfig {
        reboot: true,
        ..GuestConfig::new("ours", "online_movable")
    });
    let state = tempfile::tempdir().expect("state directory");
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    let g = guest.control();
    let mut t = Timings::default();
    t.record("boot to running agent", guest.boot_time);
    let start_kib = mem_total(&guest);

    let before = layout(&guest, &c).await;
    eprintln!("e2e: layout before: {before}");
    check(&guest, scenario::layout_dimms(&before).is_empty(), || {
        format!("no DIMM at boot: {before}")
    });
    check(&guest, before["zones-known"] == true, || {
        format!("our agent reports zones: {before}")
    });
    let block_size = before["block-size"].as_u64().unwrap_or_default();
    let boot_bytes = before["boot-bytes"].as_u64().unwrap_or_default();
    check(&guest, block_size > 0 && boot_bytes == 512 << 20, || {
        format!("block size and 512 MiB boot memory in the layout: {before}")
    });

    // Plug 512 MiB over JSON-RPC, with a request-id.
    let plug = json!({"vm": "vm1", "size": DIMM_BYTES, "request-id": "e2e-plug-1"});
    let since = Instant::now();
    let plugged = ok(
        &guest,
        "memory-plug",
        scenario::call(&c, "memory-plug", plug.clone()).await,
    );
    t.record("memory-plug call (JSON-RPC)", since.elapsed());
    scenario::print_steps("memory-plug", &plugged);
    mem_total_becomes(
        &guest,
        start_kib + DIMM_KIB,
        "MemTotal +512 MiB after memory-plug",
    )
    .await;
    t.record("memory-plug to usable (MemTotal +512 MiB)", since.elapsed());
    let dimm_id = plugged["dimm"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let memdev = plugged["dimm"]["memdev"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    check(
        &guest,
        dimm_id.starts_with("qga-dimm") && memdev.starts_with("qga-mem"),
        || format!("the bridge names its DIMMs qga-dimmN on qga-memN: {plugged}"),
    );
    check(
        &guest,
        plugged["warnings"].as_array().is_some_and(Vec::is_empty),
        || format!("no warnings when our agent onlines movable: {plugged}"),
    );
    check_movable_dimm(&guest, &plugged["dimm"], block_size);
    // The guest booted with auto_online_blocks = offline: the bridge has its kernel
    // online movable by itself from now on, then the agent confirms in one call.
    let names = step_names(&plugged["steps"]);
    check(
        &guest,
        names == ["auto-online", "object-add", "device_add", "online"]
            && plugged["steps"][0]["detail"] == "offline -> online_movable"
            && plugged["steps"][3]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("as it appeared")),
        || format!("movable auto-onlining, then one online call: {plugged}"),
    );

    let after = layout(&guest, &c).await;
    eprintln!("e2e: layout after plug: {after}");
    check(
        &guest,
        after["auto-online-blocks"] == "online_movable",
        || format!("the guest kernel onlines movable now: {after}"),
    );
    let dimms = scenario::layout_dimms(&after);
    check(
        &guest,
        dimms.len() == 1 && dimms[0]["id"] == dimm_id.as_str(),
        || format!("one DIMM, {dimm_id}, in the layout: {after}"),
    );
    check_movable_dimm(&guest, &dimms[0], block_size);
    check(
        &guest,
        after["plugged-bytes"] == DIMM_BYTES && after["movable-bytes"] == DIMM_BYTES,
        || format!("512 MiB plugged, all of it movable: {after}"),
    );
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(
        &guest,
        devices.len() == 1 && devices[0].id == dimm_id && devices[0].memdev == memdev,
        || format!("QEMU lists the DIMM {dimm_id} on {memdev}: {devices:?}"),
    );
    let memdevs = ok(&guest, "query-memdev", g.memdev_ids());
    check(&guest, memdevs.contains(&memdev), || {
        format!("QEMU lists the backend {memdev}: {memdevs:?}")
    });

    // The same plug again, same request-id: the first result, nothing plugged again.
    let since = Instant::now();
    let again = ok(
        &guest,
        "memory-plug retried",
        scenario::call(&c, "memory-plug", plug.clone()).await,
    );
    t.record(
        "memory-plug retry with the same request-id",
        since.elapsed(),
    );
    check(&guest, again["dimm"]["id"] == dimm_id.as_str(), || {
        format!("the retry answers the first plug's DIMM {dimm_id}: {again}")
    });
    let retried = layout(&guest, &c).await;
    check(&guest, scenario::layout_dimms(&retried).len() == 1, || {
        format!("a retried plug plugs once: {retried}")
    });
    let now = mem_total(&guest);
    check(&guest, now == start_kib + DIMM_KIB, || {
        format!(
            "MemTotal after the retry is {now} KiB, expected {} KiB",
            start_kib + DIMM_KIB
        )
    });
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(&guest, devices.len() == 1, || {
        format!("QEMU has one DIMM after the retry: {devices:?}")
    });

    // The bridge is killed (SIGKILL: a crash) and started again on its state directory:
    // the retry still answers the first plug, and nothing is plugged twice.
    drop(c);
    drop(bridge);
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    let after_restart = ok(
        &guest,
        "memory-plug retried after a restart",
        scenario::call(&c, "memory-plug", plug.clone()).await,
    );
    check(&guest, after_restart == again, || {
        format!("the retry after a restart answers the first plug: {after_restart} vs {again}")
    });
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(
        &guest,
        devices.len() == 1 && devices[0].id == dimm_id,
        || format!("QEMU still has the one DIMM {dimm_id} after the restart's retry: {devices:?}"),
    );
    let now = mem_total(&guest);
    check(&guest, now == start_kib + DIMM_KIB, || {
        format!("MemTotal after the restart's retry is {now} KiB")
    });

    // The guest reboots: QEMU keeps the DIMM, the new kernel finds its blocks offline,
    // and the bridge onlines them again, movable, as the journal records them.
    let start_kib = reboot_until_restored(&guest, &c, start_kib, DIMM_KIB, &mut t).await;
    let rebooted = layout(&guest, &c).await;
    let dimms = scenario::layout_dimms(&rebooted);
    check(&guest, dimms.len() == 1, || {
        format!("the DIMM after the reboot: {rebooted}")
    });
    check_movable_dimm(&guest, &dimms[0], block_size);

    // Unplug over gRPC.
    let since = Instant::now();
    let unplugged = ok(
        &guest,
        "Unplug",
        c.hotplug
            .clone()
            .unplug(UnplugRequest {
                vm: "vm1".into(),
                dimm: dimm_id.clone(),
                request_id: None,
            })
            .await,
    )
    .into_inner();
    t.record("Unplug call (gRPC)", since.elapsed());
    scenario::print_grpc_steps("Unplug", &unplugged.steps, &[]);
    check(
        &guest,
        unplugged.dimm.as_ref().is_some_and(|d| d.id == dimm_id),
        || format!("Unplug answers the DIMM: {unplugged:?}"),
    );
    mem_total_becomes(&guest, start_kib, "MemTotal back after Unplug").await;
    t.record("Unplug to MemTotal back", since.elapsed());
    let l = grpc_layout(&guest, &c).await;
    check(&guest, l.dimms.is_empty() && l.plugged_bytes == 0, || {
        format!("no DIMM in the layout after Unplug: {l:?}")
    });
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(&guest, devices.is_empty(), || {
        format!("QEMU has no DIMM after Unplug: {devices:?}")
    });
    let memdevs = ok(&guest, "query-memdev", g.memdev_ids());
    check(&guest, !memdevs.contains(&memdev), || {
        format!("the backend {memdev} is gone (object-del): {memdevs:?}")
    });

    // Resize up by 2 GiB over gRPC: four DIMMs of 512 MiB (hotplug.dimm_size_bytes), all added
    // first, then onlined by one agent call as their blocks appear.
    let since = Instant::now();
    let up = ok(
        &guest,
        "Resize up",
        c.hotplug
            .clone()
            .resize(ResizeRequest {
                vm: "vm1".into(),
                size: boot_bytes + 2 * GIB,
                request_id: Some("e2e-resize-up".into()),
            })
            .await,
    )
    .into_inner();
    t.record("Resize +2 GiB call (gRPC)", since.elapsed());
    scenario::print_grpc_steps("Resize up", &up.steps, &up.warnings);
    check(
        &guest,
        up.from_bytes == boot_bytes
            && up.to_bytes == boot_bytes + 2 * GIB
            && up.plugged.len() == 4
            && up.unplugged.is_empty(),
        || format!("Resize up plugs four 512 MiB DIMMs: {up:?}"),
    );
    let names: Vec<&str> = up.steps.iter().map(|s| s.name.as_str()).collect();
    check(
        &guest,
        names.iter().filter(|n| **n == "device_add").count() == 4
            && names.last() == Some(&"online")
            && names.iter().filter(|n| **n == "online").count() == 1
            && !names.contains(&"wait-blocks"),
        || format!("four DIMMs added, then their blocks onlined in one step: {names:?}"),
    );
    mem_total_becomes(
        &guest,
        start_kib + 2 * GIB / 1024,
        "MemTotal +2 GiB after Resize",
    )
    .await;
    t.record("Resize +2 GiB to usable", since.elapsed());
    let l = grpc_layout(&guest, &c).await;
    check(
        &guest,
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
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(&guest, devices.len() == 4, || {
        format!("QEMU has four DIMMs after Resize up: {devices:?}")
    });

    // And back to the boot size, while a control plane lists the guest's blocks back to
    // back: blocks the kernel removes during a listing are left out, never an error.
    let lister = Lister::start(&c);
    let since = Instant::now();
    let down = ok(
        &guest,
        "Resize down",
        c.hotplug
            .clone()
            .resize(ResizeRequest {
                vm: "vm1".into(),
                size: boot_bytes,
                request_id: None,
            })
            .await,
    )
    .into_inner();
    t.record("Resize back to boot size call (gRPC)", since.elapsed());
    scenario::print_grpc_steps("Resize down", &down.steps, &down.warnings);
    check(
        &guest,
        down.from_bytes == boot_bytes + 2 * GIB
            && down.to_bytes == boot_bytes
            && down.unplugged.len() == 4
            && down.plugged.is_empty(),
        || format!("Resize down unplugs the four DIMMs: {down:?}"),
    );
    mem_total_becomes(&guest, start_kib, "MemTotal back after Resize down").await;
    t.record("Resize back to MemTotal back", since.elapsed());
    lister.check(&guest, "four DIMM unplugs").await;
    let l = layout(&guest, &c).await;
    check(&guest, scenario::layout_dimms(&l).is_empty(), || {
        format!("no DIMM after Resize down: {l}")
    });
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    let memdevs = ok(&guest, "query-memdev", g.memdev_ids());
    check(
        &guest,
        devices.is_empty() && !memdevs.iter().any(|m| m.starts_with("qga-mem")),
        || format!("QEMU has no DIMM and no qga-mem backend: {devices:?} {memdevs:?}"),
    );

    // The compose run's hotplug phase, on this guest too.
    let r = scenario::bridge_hotplug_cycle(&c, "vm1", &g, &mut t).await;
    ok(
        &guest,
        "the compose hotplug phase",
        r.map_err(|e| format!("{e:#}")),
    );

    // And as an operator does it: qgactl plugs 512 MiB, shows it, and unplugs it.
    qgactl_cycle(&guest, &bridge.grpc_url(), start_kib).await;

    eprintln!("e2e: timings (printed, not asserted):");
    for (phase, d) in &t.0 {
        eprintln!("e2e:   {phase}: {:.2} s", d.as_secs_f64());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_online_dimm_does_not_come_out_and_nothing_changes() {
    let guest = boot("ours", "online");
    let (_bridge, c) = behind_bridge(&guest).await;
    let g = guest.control();
    let mut t = Timings::default();
    let start_kib = mem_total(&guest);

    let since = Instant::now();
    let plugged = ok(
        &guest,
        "memory-plug online",
        scenario::call(
            &c,
            "memory-plug",
            json!({"vm": "vm1", "size": DIMM_BYTES, "online-type": "online"}),
        )
        .await,
    );
    scenario::print_steps("memory-plug online", &plugged);
    mem_total_becomes(
        &guest,
        start_kib + DIMM_KIB,
        "MemTotal +512 MiB after memory-plug",
    )
    .await;
    t.record("memory-plug (online) to usable", since.elapsed());
    let dimm_id = plugged["dimm"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("e2e: plain-online DIMM: {}", plugged["dimm"]);
    // The kernel onlined it as asked, then went back to onlining movable.
    let names = step_names(&plugged["steps"]);
    check(
        &guest,
        names.first() == Some(&"auto-online")
            && names.last() == Some(&"auto-online")
            && plugged["steps"][0]["detail"] == "offline -> online",
        || format!("auto_online_blocks online for the plug, then back: {plugged}"),
    );
    let policy = layout(&guest, &c).await["auto-online-blocks"].clone();
    check(&guest, policy == "online_movable", || {
        format!("auto_online_blocks back at online_movable: {policy}")
    });
    // With zones known, `removable` says whether every block is in Movable.
    let dimm = &plugged["dimm"];
    let all_movable = dimm["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|b| b["valid-zones"] == json!(["Movable"]));
    check(&guest, dimm["removable"] == all_movable, || {
        format!("removable agrees with the blocks' zones: {dimm}")
    });
    // The layout says so in words when blocks are outside ZONE_MOVABLE.
    let l = layout(&guest, &c).await;
    let warned = l["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains(&dimm_id)))
    });
    check(&guest, warned != all_movable, || {
        format!("a layout warning exactly when the DIMM cannot come out: {l}")
    });

    // The call may take the default two minutes; offlining gets hotplug.offline_budget_ms
    // (10 s) of it, so the refusal comes long before the call's own deadline.
    let since = Instant::now();
    let refused = c
        .rpc_full(
            "memory-unplug",
            json!({"vm": "vm1", "dimm": dimm_id, "timeout-ms": 120_000}),
        )
        .await;
    let took = since.elapsed();
    t.record("memory-unplug refused", took);
    eprintln!("e2e: memory-unplug of a plain-online DIMM: {refused:?}");
    let e = match refused {
        Err(e) => e,
        Ok(v) => fail(
            &guest,
            "memory-unplug of a plain-online DIMM",
            format!("it came out, the kernel let ZONE_NORMAL memory go: {v}"),
        ),
    };
    check(&guest, e.code == -32007, || {
        format!("the refusal is FAILED_PRECONDITION (-32007): {e}")
    });
    check(
        &guest,
        e.message.contains("block ") && e.message.contains("(zone Normal)"),
        || format!("the refusal names the blocks, their errno and zone: {e}"),
    );
    check(&guest, took < Duration::from_secs(60), || {
        format!(
            "the refusal ends with the offline budget, not the call's two minutes: {:.1} s",
            took.as_secs_f64()
        )
    });
    check(
        &guest,
        e.data.as_ref().is_some_and(|d| {
            d["step"] == "offline" && d["blocks"].as_array().is_some_and(|b| !b.is_empty())
        }),
        || format!("the refusal's data has the step and the blocks: {e}"),
    );

    // Nothing changed: the memory, the DIMM and its blocks are all still there.
    let now = mem_total(&guest);
    check(&guest, now == start_kib + DIMM_KIB, || {
        format!(
            "MemTotal after the refused unplug is {now} KiB, expected {} KiB",
            start_kib + DIMM_KIB
        )
    });
    let l = layout(&guest, &c).await;
    let dimms = scenario::layout_dimms(&l);
    check(
        &guest,
        dimms.len() == 1
            && dimms[0]["id"] == dimm_id.as_str()
            && scenario::block_states(&dimms[0]) == ["online"; 4],
        || format!("the DIMM stays with its 4 blocks online: {l}"),
    );
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(&guest, devices.iter().any(|d| d.id == dimm_id), || {
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
    let g = guest.control();
    let mut t = Timings::default();
    let start_kib = mem_total(&guest);

    let since = Instant::now();
    let plugged = ok(
        &guest,
        "memory-plug with qemu-ga",
        scenario::call(&c, "memory-plug", json!({"vm": "vm1", "size": DIMM_BYTES})).await,
    );
    scenario::print_steps("memory-plug (qemu-ga)", &plugged);
    mem_total_becomes(
        &guest,
        start_kib + DIMM_KIB,
        "MemTotal +512 MiB after memory-plug",
    )
    .await;
    t.record("memory-plug (qemu-ga) to usable", since.elapsed());
    check(
        &guest,
        plugged["warnings"]
            .as_array()
            .is_some_and(|w| !w.is_empty()),
        || format!("qemu-ga cannot choose the zone: the plug warns: {plugged}"),
    );
    let l = layout(&guest, &c).await;
    eprintln!("e2e: layout with qemu-ga: {l}");
    let dimms = scenario::layout_dimms(&l);
    check(
        &guest,
        dimms.len() == 1 && scenario::block_states(&dimms[0]) == ["online"; 4],
        || format!("one DIMM with 4 online blocks: {l}"),
    );
    check(&guest, l["zones-known"] == false, || {
        format!("qemu-ga reports no zones: {l}")
    });

    let refused = c
        .rpc_full(
            "memory-plug",
            json!({"vm": "vm1", "size": DIMM_BYTES, "online-type": "online_movable"}),
        )
        .await;
    eprintln!("e2e: memory-plug online_movable with qemu-ga: {refused:?}");
    check(
        &guest,
        matches!(&refused, Err(e) if e.code == -32007),
        || format!("online_movable asked of qemu-ga is FAILED_PRECONDITION (-32007): {refused:?}"),
    );
    let after = layout(&guest, &c).await;
    check(&guest, scenario::layout_dimms(&after).len() == 1, || {
        format!("the refused plug plugged nothing: {after}")
    });
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(&guest, devices.len() == 1, || {
        format!("QEMU has only the first DIMM: {devices:?}")
    });
    let now = mem_total(&guest);
    check(&guest, now == start_kib + DIMM_KIB, || {
        format!(
            "MemTotal after the refused plug is {now} KiB, expected {} KiB",
            start_kib + DIMM_KIB
        )
    });

    // After a reboot the keeper onlines the DIMM again, through guest-set-memory-blocks
    // (qemu-ga cannot choose the zone).
    let start_kib = reboot_until_restored(&guest, &c, start_kib, DIMM_KIB, &mut t).await;
    let rebooted = layout(&guest, &c).await;
    check(
        &guest,
        scenario::block_states(&scenario::layout_dimms(&rebooted)[0]) == ["online"; 4],
        || format!("the DIMM's blocks online again after the reboot: {rebooted}"),
    );

    // Resize by polling: three more DIMMs added, their blocks waited for through
    // guest-get-memory-blocks and onlined with guest-set-memory-blocks, then all four out.
    let boot_bytes = rebooted["boot-bytes"].as_u64().unwrap_or_default();
    let since = Instant::now();
    let up = ok(
        &guest,
        "memory-resize +2 GiB with qemu-ga",
        scenario::call(
            &c,
            "memory-resize",
            json!({"vm": "vm1", "size": boot_bytes + 2 * GIB}),
        )
        .await,
    );
    scenario::print_steps("memory-resize (qemu-ga)", &up);
    let names = step_names(&up["steps"]);
    check(
        &guest,
        up["plugged"].as_array().is_some_and(|p| p.len() == 3)
            && names.iter().filter(|n| **n == "device_add").count() == 3
            && names.ends_with(&["wait-blocks", "online"]),
        || format!("three DIMMs added, then waited for and onlined together: {up}"),
    );
    mem_total_becomes(&guest, start_kib + 4 * DIMM_KIB, "MemTotal +2 GiB").await;
    t.record("memory-resize +2 GiB (qemu-ga) to usable", since.elapsed());
    let down = ok(
        &guest,
        "memory-resize back with qemu-ga",
        scenario::call(
            &c,
            "memory-resize",
            json!({"vm": "vm1", "size": boot_bytes}),
        )
        .await,
    );
    check(
        &guest,
        down["unplugged"].as_array().is_some_and(|u| u.len() == 4),
        || format!("all four DIMMs unplugged: {down}"),
    );
    mem_total_becomes(&guest, start_kib, "MemTotal back at the boot size").await;
    let devices = ok(&guest, "query-memory-devices", g.memory_devices());
    check(&guest, devices.is_empty(), || {
        format!("QEMU has no DIMM left: {devices:?}")
    });
    for (phase, d) in &t.0 {
        eprintln!("e2e:   {phase}: {:.2} s", d.as_secs_f64());
    }
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
    let id = plugged["dimm"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
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
) -> Result<Value, qga_e2e::bridge::RpcError> {
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
) -> (
    BridgeProcess,
    Clients,
    Result<Value, qga_e2e::bridge::RpcError>,
) {
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
    let g = guest.control();
    let dimms = ok(guest, "query-memory-devices", g.memory_devices())
        .into_iter()
        .map(|d| d.id)
        .collect();
    let memdevs = ok(guest, "query-memdev", g.memdev_ids())
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
        let plug =
            json!({"vm": "vm1", "size": DIMM_BYTES, "request-id": format!("kill-plug-{step}")});
        let (bridge, c, first) =
            killed_then_recovered(&guest, state.path(), step, "memory-plug", &plug).await;
        let (dimms, memdevs) = ours_in_qemu(&guest);
        if kept {
            let Ok(done) = &first else {
                fail(
                    &guest,
                    &format!("plug killed after {step} is finished"),
                    format!("{first:?}"),
                )
            };
            check(
                &guest,
                dimms.len() == 1 && done["dimm"]["id"] == dimms[0].as_str(),
                || format!("after {step}: one DIMM, the answered one: {dimms:?} {done}"),
            );
            mem_total_becomes(&guest, start_kib + DIMM_KIB, "the kept DIMM is online").await;
            let l = layout(&guest, &c).await;
            check_movable_dimm(&guest, &scenario::layout_dimms(&l)[0], block_size);
        } else {
            let Err(e) = &first else {
                fail(
                    &guest,
                    &format!("plug killed after {step} is undone"),
                    format!("{first:?}"),
                )
            };
            check(
                &guest,
                e.code == -32007 && e.data.as_ref().is_some_and(|d| d["step"] == "interrupted"),
                || format!("after {step}: FAILED_PRECONDITION at step interrupted: {e:?}"),
            );
            check(&guest, dimms.is_empty() && memdevs.is_empty(), || {
                format!("after {step}: no DIMM and no backend left: {dimms:?} {memdevs:?}")
            });
            check(&guest, mem_total(&guest) == start_kib, || {
                format!("MemTotal unchanged after {step}")
            });
        }
        let again = c.rpc_full("memory-plug", plug.clone()).await;
        check(&guest, format!("{again:?}") == format!("{first:?}"), || {
            format!("the retry after {step} answers the same: {again:?} vs {first:?}")
        });
        check(
            &guest,
            ours_in_qemu(&guest).0.len() == usize::from(kept),
            || format!("the retry after {step} plugged nothing"),
        );
        if kept {
            let id = dimms[0].clone();
            unplug_to(&guest, &c, &id, start_kib).await;
        }
        drop(bridge);
    }

    // A plug sent without a request-id is journaled too: killed after device_add, its
    // DIMM is kept and onlined by the next bridge, which nobody has to ask.
    let (dying, c) = bridge_dying_after(&guest, state.path(), "device_add").await;
    let r = c
        .rpc_full("memory-plug", json!({"vm": "vm1", "size": DIMM_BYTES}))
        .await;
    check(&guest, r.is_err(), || {
        format!("the plug dies with its bridge: {r:?}")
    });
    drop(dying);
    let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
    mem_total_becomes(
        &guest,
        start_kib + DIMM_KIB,
        "a plug without request-id is finished",
    )
    .await;
    let l = layout(&guest, &c).await;
    let dimms = scenario::layout_dimms(&l);
    check(&guest, dimms.len() == 1, || format!("one DIMM kept: {l}"));
    check_movable_dimm(&guest, &dimms[0], block_size);
    let id = dimms[0]["id"].as_str().unwrap_or_default().to_string();
    unplug_to(&guest, &c, &id, start_kib).await;
    drop(bridge);

    // Unplug, killed after each step: after offline the DIMM stays, online again; after
    // device_del it is gone, its backend deleted.
    for (step, gone) in [("offline", false), ("device_del", true)] {
        let (bridge, c) = behind_bridge_at(&guest, Some(state.path())).await;
        let plugged = ok(
            &guest,
            "plug",
            scenario::call(&c, "memory-plug", json!({"vm": "vm1", "size": DIMM_BYTES})).await,
        );
        let id = plugged["dimm"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        drop(bridge);
        let unplug = json!({"vm": "vm1", "dimm": id, "request-id": format!("kill-unplug-{step}")});
        let (bridge, c, first) =
            killed_then_recovered(&guest, state.path(), step, "memory-unplug", &unplug).await;
        let (dimms, memdevs) = ours_in_qemu(&guest);
        if gone {
            check(
                &guest,
                first.as_ref().is_ok_and(|d| d["dimm"]["id"] == id.as_str()),
                || format!("unplug killed after {step} is finished: {first:?}"),
            );
            check(&guest, dimms.is_empty() && memdevs.is_empty(), || {
                format!("after {step}: DIMM and backend gone: {dimms:?} {memdevs:?}")
            });
            mem_total_becomes(&guest, start_kib, "MemTotal back").await;
        } else {
            check(
                &guest,
                first.as_ref().is_err_and(|e| e.code == -32007),
                || format!("unplug killed after {step} is undone: {first:?}"),
            );
            check(&guest, dimms == [id.clone()], || {
                format!("after {step}: the DIMM stays: {dimms:?}")
            });
            mem_total_becomes(
                &guest,
                start_kib + DIMM_KIB,
                "the DIMM's blocks online again",
            )
            .await;
            let l = layout(&guest, &c).await;
            check_movable_dimm(&guest, &scenario::layout_dimms(&l)[0], block_size);
            unplug_to(&guest, &c, &id, start_kib).await;
        }
        let again = c.rpc_full("memory-unplug", unplug.clone()).await;
        check(&guest, format!("{again:?}") == format!("{first:?}"), || {
            format!("the retry after {step} answers the same: {again:?} vs {first:?}")
        });
        drop(bridge);
    }
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
    let g = guest.control();
    let start_kib = mem_total(&guest);
    let before = layout(&guest, &c).await;
    let boot = before["boot-bytes"].as_u64().unwrap_or_default();
    let block_size = before["block-size"].as_u64().unwrap_or(128 << 20);
    let d = vmem0(&guest, &c).await;
    check(
        &guest,
        d["max-size"] == 2 * GIB
            && d["block-size"] == 2 << 20
            && d["plugged-size"] == 0
            && d["blocks"].as_array().is_some_and(Vec::is_empty),
        || format!("vmem0 in the layout: 2 GiB at most, 2 MiB blocks, nothing plugged: {d}"),
    );

    // Grow by 1 GiB: QEMU's size reaches it and the guest has it online, movable.
    let up = resize_to(
        &guest,
        &c,
        boot + GIB,
        start_kib + GIB / 1024,
        "resize +1 GiB",
    )
    .await;
    check(
        &guest,
        up["to-bytes"] == boot + GIB
            && up["virtio-mem"] == json!([{"id": "vmem0", "from-bytes": 0, "to-bytes": GIB}])
            && up["plugged"].as_array().is_some_and(Vec::is_empty),
        || format!("the resize changed vmem0 alone, 0 -> 1 GiB: {up}"),
    );
    let sizes = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
    check(&guest, sizes == (GIB, GIB), || {
        format!("QEMU: requested-size and size 1 GiB: {sizes:?}")
    });
    vmem0_online_movable(&guest, &c, 8, "after +1 GiB").await;

    // A reboot: QEMU keeps requested-size, the guest's driver plugs it again at boot and
    // leaves it offline (the guest's auto_online_blocks is back at `offline`); the keeper
    // onlines it, Movable.
    let start_kib = reboot_until_restored(&guest, &c, start_kib, GIB / 1024, &mut t).await;
    vmem0_online_movable(&guest, &c, 8, "after the reboot").await;

    // Shrink by 512 MiB, and later back to the boot size, while a control plane lists the
    // guest's blocks back to back: the driver removes blocks during listings, which leave
    // them out instead of failing.
    let lister = Lister::start(&c);
    let down = resize_to(
        &guest,
        &c,
        boot + GIB / 2,
        start_kib + GIB / 2048,
        "resize -512 MiB",
    )
    .await;
    check(&guest, down["to-bytes"] == boot + GIB / 2, || {
        format!("the VM has boot + 512 MiB: {down}")
    });
    let sizes = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
    check(&guest, sizes == (GIB / 2, GIB / 2), || {
        format!("QEMU: requested-size and size 512 MiB: {sizes:?}")
    });

    // Past max-size: refused, nothing changed.
    let refused = c
        .rpc_full(
            "memory-resize",
            json!({"vm": "vm1", "size": boot + 3 * GIB}),
        )
        .await;
    check(
        &guest,
        matches!(&refused, Err(e) if e.code == -32007 && e.message.contains("past what")),
        || format!("a resize past max-size is FAILED_PRECONDITION: {refused:?}"),
    );
    let sizes = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
    check(&guest, sizes == (GIB / 2, GIB / 2), || {
        format!("nothing changed after the refusal: {sizes:?}")
    });
    let odd = c
        .rpc_full(
            "memory-resize",
            json!({"vm": "vm1", "size": boot + (1 << 20)}),
        )
        .await;
    check(&guest, matches!(&odd, Err(e) if e.code == -32602), || {
        format!("a size off the 2 MiB block size is invalid: {odd:?}")
    });

    // Back to the boot size.
    resize_to(&guest, &c, boot, start_kib, "resize back to the boot size").await;
    let sizes = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
    check(&guest, sizes == (0, 0), || {
        format!("QEMU: nothing plugged: {sizes:?}")
    });
    lister.check(&guest, "two virtio-mem shrinks").await;

    // A bridge killed once requested-size is set: the next one stops QEMU and the guest
    // at one size (requested-size = what the guest holds), onlines it, and answers a
    // retry `interrupted`, naming that size; the retry changes nothing.
    drop(c);
    drop(bridge);
    let grow = json!({"vm": "vm1", "size": boot + GIB, "request-id": "kill-vmem-grow"});
    let (bridge, c, first) = killed_then_recovered(
        &guest,
        state.path(),
        "requested-size",
        "memory-resize",
        &grow,
    )
    .await;
    // A plug the guest had under way as the request was withdrawn is given back at once.
    let since = Instant::now();
    let (requested, size) = loop {
        let (requested, size) = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
        if requested == size || since.elapsed() > PATIENCE {
            break (requested, size);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    check(
        &guest,
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
        &guest,
        start_kib + size / 1024,
        "the recovered virtio-mem memory online",
    )
    .await;
    let blocks = size.div_ceil(block_size) as usize;
    vmem0_online_movable(&guest, &c, blocks, "after recovery").await;
    let again = c.rpc_full("memory-resize", grow.clone()).await;
    check(&guest, format!("{again:?}") == format!("{first:?}"), || {
        format!("the retry answers the same: {again:?} vs {first:?}")
    });
    check(
        &guest,
        g.virtio_mem_sizes("vmem0").ok() == Some((requested, size)),
        || "the retry changed nothing".to_string(),
    );
    resize_to(&guest, &c, boot, start_kib, "resize back after recovery").await;

    // Memory the guest onlines into the kernel zone (a bridge that leaves the guest's
    // policy alone, and a guest that onlines online_kernel) cannot all be given back: the
    // shrink ends where the guest got, with requested-size set back to it.
    drop(c);
    drop(bridge);
    let mut agent = ok(
        &guest,
        "the agent's socket",
        qga_testkit::QgaClient::connect(&guest.qga_socket()),
    );
    let set = ok(
        &guest,
        "set-auto-online",
        agent.execute(
            "__org.qga-bridge_set-auto-online",
            Some(json!({"auto-online-blocks": "online_kernel"})),
        ),
    );
    check(
        &guest,
        set["return"]["auto-online-blocks"] == "online_kernel",
        || format!("the guest onlines online_kernel: {set}"),
    );
    drop(agent);
    let (_bridge, c) = behind_bridge_config(
        &guest,
        "[hotplug]\nauto_online = \"keep\"\noffline_budget_ms = 300\n",
    )
    .await;
    resize_to(
        &guest,
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
    let e = match stuck {
        Err(e) => e,
        Ok(v) => fail(
            &guest,
            "a shrink of kernel-zone memory within 300 ms without progress",
            format!("the guest gave all of it back: {v}"),
        ),
    };
    let (requested, size) = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
    check(
        &guest,
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
    let l = layout(&guest, &c).await;
    check(&guest, l["plugged-bytes"] == size, || {
        format!("the layout agrees with QEMU: {l}")
    });

    // The same shrink on a bridge killed once requested-size is set: the guest cannot get
    // there, so the next bridge finds QEMU's request unmet and withdraws it.
    drop(c);
    drop(_bridge);
    let shrink = json!({"vm": "vm1", "size": boot, "request-id": "kill-vmem-shrink"});
    let (_bridge, _c, first) = killed_then_recovered(
        &guest,
        state.path(),
        "requested-size",
        "memory-resize",
        &shrink,
    )
    .await;
    let (requested, size) = ok(&guest, "virtio-mem sizes", g.virtio_mem_sizes("vmem0"));
    check(
        &guest,
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
