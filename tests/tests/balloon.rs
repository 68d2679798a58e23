//! The virtio balloon through the bridge (`memory-balloon`, and the balloon in
//! `memory-layout` and `memory-stats`) with a real QEMU guest (TCG) that has a balloon
//! `balloon0` (free page reporting, no deflate-on-oom: the balloon's pages leave the
//! guest's MemTotal). The test checks the bridge's answers against QEMU (`query-balloon`
//! over the test's own `qmp.sock`) and the guest (MemTotal over its control port).
//!
//! Needs qemu-system-x86_64 and the guest image (built on demand by
//! tests/guest/build-image); fails, never skips, without them. Run one at a time (see
//! .config/nextest.toml): each boots a guest.

use std::{fmt::Display, ops::ControlFlow, path::Path, time::Instant};

use qga_e2e::{
    bridge::{BridgeProcess, Clients, RpcError},
    guest::{Guest, GuestConfig},
    image,
    scenario::{self, DIMM_BYTES, Timings},
    wait::{self, PATIENCE},
};
use serde_json::{Value, json};

/// What the test has the balloon hold: 256 MiB.
const HELD: u64 = 256 << 20;

/// 1 MiB.
const MIB: u64 = 1 << 20;

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

/// `bridge` and its clients, once the guest's agent answers through it.
async fn answering(guest: &Guest, bridge: BridgeProcess) -> (BridgeProcess, Clients) {
    let c = bridge.clients().await.expect("clients");
    let answered = scenario::ping_until_ok(&c, "vm1", PATIENCE).await;
    ok(
        guest,
        "agent answers through the bridge",
        answered.map_err(|e| format!("{e:#}")),
    );
    (bridge, c)
}

/// The bridge in front of `guest` as VM `vm1`, with the guest's bridge QMP socket, once
/// the agent answers through it.
async fn behind_bridge(guest: &Guest) -> (BridgeProcess, Clients) {
    let qmp = guest.qmp_bridge_socket();
    let bridge = BridgeProcess::start_with_qmp(&[("vm1", &guest.qga_socket())], &[("vm1", &qmp)])
        .await
        .expect("bridge");
    answering(guest, bridge).await
}

/// `method` of VM `vm1` with `params` (besides `vm`) through JSON-RPC, which must answer.
async fn call(guest: &Guest, c: &Clients, method: &str, params: Value) -> Value {
    let mut p = json!({"vm": "vm1"});
    if let (Some(p), Value::Object(more)) = (p.as_object_mut(), params) {
        p.extend(more);
    }
    ok(guest, method, scenario::call(c, method, p).await)
}

async fn layout(guest: &Guest, c: &Clients) -> Value {
    call(guest, c, "memory-layout", json!({})).await
}

/// The balloon in the layout; the test fails when there is none.
async fn layout_balloon(guest: &Guest, c: &Clients) -> Value {
    let l = layout(guest, c).await;
    match l.get("balloon") {
        Some(b) if b.is_object() => b.clone(),
        _ => fail(guest, "the layout shows the balloon", &l),
    }
}

fn mem_total(guest: &Guest) -> u64 {
    ok(guest, "MemTotal", guest.control().mem_total_kib())
}

/// QEMU's balloon `actual` (`query-balloon`, through the test's own QMP socket).
fn actual(guest: &Guest) -> u64 {
    ok(guest, "query-balloon", guest.control().balloon_actual())
}

/// Waits until QEMU's balloon `actual` is `want` bytes (`what` says why).
async fn actual_becomes(guest: &Guest, want: u64, what: &str) {
    let g = guest.control();
    let r = wait::until(what, PATIENCE, || async {
        let now = g.balloon_actual()?;
        anyhow::Ok(if now == want {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("actual {now}, want {want}"))
        })
    })
    .await;
    ok(guest, what, r.map_err(|e| format!("{e:#}")));
}

/// Waits until the guest's MemTotal is within [`scenario::MEMTOTAL_SLACK_KIB`] of
/// `want_kib` (the balloon's pages leave it); the MemTotal seen then.
async fn mem_total_near(guest: &Guest, want_kib: u64, what: &str) -> u64 {
    let r = scenario::wait_mem_total_near(&guest.control(), want_kib, PATIENCE).await;
    ok(guest, what, r.map_err(|e| format!("{e:#}")))
}

/// `memory-balloon` to `target` bytes; the reply's `balloon`, its steps printed.
async fn balloon_to(guest: &Guest, c: &Clients, target: u64, what: &str) -> Value {
    let r = call(guest, c, "memory-balloon", json!({"target": target})).await;
    scenario::print_steps(what, &r);
    let b = r["balloon"].clone();
    check(
        guest,
        b["id"] == "balloon0" && b["to-bytes"] == target,
        || format!("{what}: the reply names balloon0 and the target reached: {r}"),
    );
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balloon_through_the_bridge() {
    // Rebooted below: QEMU must boot it again rather than exit.
    let guest = boot_with(GuestConfig {
        balloon: true,
        reboot: true,
        ..GuestConfig::new("ours", "online_movable")
    });
    let (_bridge, c) = behind_bridge(&guest).await;
    let mut t = Timings::default();
    let start_kib = mem_total(&guest);
    let boot = balloon_empty_at_boot(&guest, &c).await;
    let low_kib = inflate_by_256_mib(&guest, &c, boot, start_kib, &mut t).await;
    balloon_in_memory_stats(&guest, &c, boot - HELD, low_kib).await;
    refusals_change_nothing(&guest, &c, boot).await;
    let ram = boot + DIMM_BYTES;
    dimm_plug_keeps_the_balloon(&guest, &c, ram, low_kib).await;
    let held_kib = reboot_holds_the_balloon(&guest, &c, ram - HELD, &mut t).await;
    deflate_to_all(&guest, &c, ram, held_kib + HELD / 1024, &mut t).await;
    eprintln!("e2e: timings (printed, not asserted):");
    for (phase, d) in &t.0 {
        eprintln!("e2e:   {phase}: {:.2} s", d.as_secs_f64());
    }
}

/// At boot the layout shows balloon0 as QEMU has it (free page reporting, no
/// deflate-on-oom), empty: its actual is the boot memory, all of it usable, no size kept.
/// The boot memory.
async fn balloon_empty_at_boot(guest: &Guest, c: &Clients) -> u64 {
    let l = layout(guest, c).await;
    eprintln!("e2e: layout at boot: {l}");
    let boot = l["boot-bytes"].as_u64().unwrap_or_default();
    check(guest, boot == 512 << 20, || {
        format!("512 MiB of boot memory: {l}")
    });
    let b = &l["balloon"];
    check(
        guest,
        b["id"] == "balloon0"
            && b["free-page-reporting"] == true
            && b["deflate-on-oom"] == false
            && b["actual-bytes"] == boot
            && b["held-bytes"] == 0
            && b["usable-bytes"] == boot
            && b.get("kept-bytes").is_none(),
        || format!("balloon0 empty at boot, as QEMU has it: {l}"),
    );
    check(guest, actual(guest) == boot, || {
        "QEMU's actual is the boot memory".to_string()
    });
    boot
}

/// `memory-balloon` to the boot memory less 256 MiB: the reply, QEMU's actual and the
/// layout agree, and the guest's MemTotal falls by the balloon's 256 MiB. MemTotal then.
async fn inflate_by_256_mib(
    guest: &Guest,
    c: &Clients,
    boot: u64,
    start_kib: u64,
    t: &mut Timings,
) -> u64 {
    let target = boot - HELD;
    let since = Instant::now();
    let b = balloon_to(guest, c, target, "memory-balloon -256 MiB").await;
    t.record("memory-balloon -256 MiB call", since.elapsed());
    check(
        guest,
        b["from-bytes"] == boot
            && b["target-bytes"] == target
            && b["held-bytes"] == HELD
            && b["actual-bytes"] == target,
        || format!("the reply: from the boot memory, 256 MiB held, actual at target: {b}"),
    );
    check(guest, actual(guest) == target, || {
        "QEMU's actual is the target when the bridge answers".to_string()
    });
    let low_kib = mem_total_near(guest, start_kib - HELD / 1024, "MemTotal -256 MiB").await;
    t.record("memory-balloon -256 MiB to MemTotal down", since.elapsed());
    eprintln!("e2e: MemTotal {start_kib} -> {low_kib} KiB with 256 MiB in the balloon");
    let lb = layout_balloon(guest, c).await;
    check(
        guest,
        lb["actual-bytes"] == target
            && lb["held-bytes"] == HELD
            && lb["usable-bytes"] == target
            && lb["kept-bytes"] == HELD,
        || format!("the layout's balloon holds 256 MiB and keeps that: {lb}"),
    );
    low_kib
}

/// `memory-stats` has the balloon part: QEMU's actual (`actual`) and what it holds, and,
/// once the driver has reported (the bridge turns QEMU's polling on at the first call),
/// its statistics: the guest's MemTotal (`mem_kib`) as its total, and what is available.
async fn balloon_in_memory_stats(guest: &Guest, c: &Clients, actual: u64, mem_kib: u64) {
    let r = wait::until("the balloon driver's statistics", PATIENCE, || async {
        let s = scenario::call(c, "memory-stats", json!({"vm": "vm1"})).await?;
        let b = &s["balloon"];
        let stats = &b["stats"];
        Ok(
            if b["actual-bytes"] == actual
                && b["held-bytes"] == HELD
                && b["age-ms"].is_u64()
                && stats["total-bytes"] == mem_kib * 1024
                && stats["available-bytes"].is_u64()
            {
                ControlFlow::Break(s)
            } else {
                ControlFlow::Continue(s.to_string())
            },
        )
    })
    .await;
    let s = ok(guest, "memory-stats", r.map_err(|e| format!("{e:#}")));
    eprintln!("e2e: memory-stats with the balloon: {}", s["balloon"]);
}

/// The error a `memory-balloon` to `target` must answer (`what` says why).
async fn balloon_refused(guest: &Guest, c: &Clients, target: u64, what: &str) -> RpcError {
    let r = c
        .rpc_full("memory-balloon", json!({"vm": "vm1", "target": target}))
        .await;
    eprintln!("e2e: {what}: {r:?}");
    match r {
        Err(e) => e,
        Ok(v) => fail(guest, what, format!("the balloon went to {target}: {v}")),
    }
}

/// Targets below the floor (128 MiB: the default floor is 256 MiB), above the VM's
/// memory, or off the 1 MiB grain are invalid params, and change nothing.
async fn refusals_change_nothing(guest: &Guest, c: &Clients, boot: u64) {
    let before = (actual(guest), layout_balloon(guest, c).await);
    for (target, what) in [
        (128 * MIB, "a target below the floor"),
        (boot + DIMM_BYTES, "a target above the VM's memory"),
        (boot - HELD + 4096, "a target off the 1 MiB grain"),
    ] {
        let e = balloon_refused(guest, c, target, what).await;
        check(guest, e.code == -32602, || {
            format!("{what} is invalid params (-32602): {e}")
        });
        let after = (actual(guest), layout_balloon(guest, c).await);
        check(guest, after == before, || {
            format!("{what} changed nothing: before {before:?}, after {after:?}")
        });
    }
}

/// A DIMM plugged through the bridge with the balloon standing: the balloon keeps its
/// 256 MiB, so QEMU's actual is the boot memory and the DIMM (`ram`) less 256 MiB, and the
/// guest has the whole DIMM more (`low_kib` before).
async fn dimm_plug_keeps_the_balloon(guest: &Guest, c: &Clients, ram: u64, low_kib: u64) {
    let plugged = call(guest, c, "memory-plug", json!({"size": DIMM_BYTES})).await;
    scenario::print_steps("memory-plug with the balloon inflated", &plugged);
    mem_total_near(
        guest,
        low_kib + DIMM_BYTES / 1024,
        "MemTotal +512 MiB after memory-plug",
    )
    .await;
    actual_becomes(guest, ram - HELD, "the balloon keeps 256 MiB past the plug").await;
    let b = layout_balloon(guest, c).await;
    check(
        guest,
        b["actual-bytes"] == ram - HELD
            && b["held-bytes"] == HELD
            && b["usable-bytes"] == ram - HELD
            && b["kept-bytes"] == HELD,
        || format!("the layout's balloon still holds 256 MiB: {b}"),
    );
}

/// A guest reboot with the balloon inflated: the new kernel starts with the balloon empty;
/// within the wait QEMU's actual is back at `target`, the DIMM online again and the layout's
/// balloon holds 256 MiB. The guest's MemTotal then.
async fn reboot_holds_the_balloon(guest: &Guest, c: &Clients, target: u64, t: &mut Timings) -> u64 {
    let boots = guest.boots();
    let since = Instant::now();
    ok(guest, "system_reset", guest.control().system_reset());
    let r = wait::until("the guest boots again", PATIENCE, || async {
        let now = guest.boots();
        anyhow::Ok(if now > boots {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("{now} boots"))
        })
    })
    .await;
    ok(guest, "reboot", r.map_err(|e| format!("{e:#}")));
    actual_becomes(guest, target, "the balloon held again after the reboot").await;
    t.record("reboot to the balloon held again", since.elapsed());
    let r = wait::until("the DIMM online again", PATIENCE, || async {
        let l = scenario::memory_layout(c, "vm1").await?;
        let all = l["boot-bytes"].as_u64().unwrap_or_default() + DIMM_BYTES;
        anyhow::Ok(if l["online-bytes"] == all {
            ControlFlow::Break(l)
        } else {
            ControlFlow::Continue(l.to_string())
        })
    })
    .await;
    let l = ok(guest, "the keeper", r.map_err(|e| format!("{e:#}")));
    check(
        guest,
        l["balloon"]["held-bytes"] == HELD && l["balloon"]["actual-bytes"] == target,
        || format!("the layout's balloon holds 256 MiB after the reboot: {l}"),
    );
    mem_total(guest)
}

/// `memory-balloon` to all of the VM's memory (`ram`, boot and DIMM): the balloon empty,
/// QEMU's actual all of it, and the guest's MemTotal up by the 256 MiB (to `want_kib`).
async fn deflate_to_all(guest: &Guest, c: &Clients, ram: u64, want_kib: u64, t: &mut Timings) {
    let since = Instant::now();
    let b = balloon_to(guest, c, ram, "memory-balloon to all").await;
    t.record("memory-balloon to all, call", since.elapsed());
    check(
        guest,
        b["from-bytes"] == ram - HELD && b["held-bytes"] == 0 && b["actual-bytes"] == ram,
        || format!("the reply: from 256 MiB less, the balloon empty: {b}"),
    );
    check(guest, actual(guest) == ram, || {
        "QEMU's actual is all of the VM's memory".to_string()
    });
    let kib = mem_total_near(guest, want_kib, "MemTotal back up by 256 MiB").await;
    eprintln!("e2e: MemTotal {kib} KiB with the balloon empty");
    let lb = layout_balloon(guest, c).await;
    check(
        guest,
        lb["held-bytes"] == 0 && lb["usable-bytes"] == ram,
        || format!("the layout's balloon is empty: {lb}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_a_balloon_has_none_and_memory_balloon_is_refused() {
    let guest = boot_with(GuestConfig::new("ours", "online_movable"));
    let (_bridge, c) = behind_bridge(&guest).await;
    let l = layout(&guest, &c).await;
    check(&guest, l.get("balloon").is_none(), || {
        format!("no balloon in the layout of a VM without one: {l}")
    });
    let s = call(&guest, &c, "memory-stats", json!({})).await;
    check(&guest, s.get("balloon").is_none(), || {
        format!("no balloon part in memory-stats of a VM without one: {s}")
    });
    let boot = l["boot-bytes"].as_u64().unwrap_or_default();
    let e = balloon_refused(&guest, &c, boot - HELD, "memory-balloon without a balloon").await;
    check(&guest, e.code == -32007, || {
        format!("a VM without a balloon is a hotplug FAILED_PRECONDITION (-32007): {e}")
    });
}

/// A bridge in front of `guest` on the journal in `state`, killing itself (SIGKILL, the
/// bridge's test-only hook `qga_bridge::fault::KILL_AFTER_STEP`) as step `dying_after`
/// completes, if given.
async fn bridge_on(
    guest: &Guest,
    state: &Path,
    dying_after: Option<&str>,
) -> (BridgeProcess, Clients) {
    let args = vec![
        "--qmp".to_string(),
        format!("vm1={}", guest.qmp_bridge_socket().display()),
        "--state-dir".to_string(),
        state.display().to_string(),
    ];
    let env = dying_after
        .map(|step| {
            (
                "QGA_BRIDGE_TEST_KILL_AFTER_STEP".to_string(),
                step.to_string(),
            )
        })
        .into_iter()
        .collect();
    let bridge = BridgeProcess::start_with_env(&[("vm1", &guest.qga_socket())], args, env)
        .await
        .expect("bridge");
    answering(guest, bridge).await
}

/// `memory-balloon` to `target` on a bridge that dies once it has asked QEMU; a new bridge
/// on the same journal answers the retry as interrupted, and QEMU's balloon gets there.
async fn killed_during_balloon(
    guest: &Guest,
    state: &Path,
    target: u64,
) -> (BridgeProcess, Clients) {
    let (dying, c) = bridge_on(guest, state, Some("balloon")).await;
    let params = json!({"vm": "vm1", "target": target, "request-id": "balloon-1"});
    let r = c.rpc_full("memory-balloon", params.clone()).await;
    check(guest, matches!(&r, Err(e) if e.code == 0), || {
        format!("memory-balloon dies with its bridge once QEMU was asked: {r:?}")
    });
    drop(dying);
    let (bridge, c) = bridge_on(guest, state, None).await;
    let since = Instant::now();
    let retry = loop {
        let r = c.rpc_full("memory-balloon", params.clone()).await;
        match &r {
            // Not recovered yet (the keeper's first pass or this retry recovers it).
            Err(e) if e.code == -32011 && since.elapsed() < PATIENCE => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            _ => break r,
        }
    };
    eprintln!("e2e: memory-balloon killed after its balloon step: {retry:?}");
    check(
        guest,
        matches!(&retry, Err(e) if e.code == -32007
            && e.data.as_ref().is_some_and(|d| d["step"] == "interrupted")),
        || format!("the retry is answered as interrupted, not run again: {retry:?}"),
    );
    actual_becomes(guest, target, "the recovered balloon at its target").await;
    (bridge, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balloon_survives_a_killed_bridge_and_a_new_qemu() {
    // A bridge killed during memory-balloon: the next one recovers the size it recorded.
    // Then a new QEMU, which starts with the balloon empty (a guest reboot keeps QEMU's
    // target, and QEMU and the guest's driver inflate the balloon again by themselves):
    // only the bridge, which keeps the balloon's size, can set it again.
    let mut guest = boot_with(GuestConfig {
        balloon: true,
        ..GuestConfig::new("ours", "online_movable")
    });
    let state = tempfile::tempdir().expect("state dir");
    let mut t = Timings::default();
    let start_kib = mem_total(&guest);
    let boot = 512 << 20;
    let (_bridge, c) = killed_during_balloon(&guest, state.path(), boot - HELD).await;
    let b = layout_balloon(&guest, &c).await;
    check(&guest, b["kept-bytes"] == HELD, || {
        format!("the recovered balloon's size is kept: {b}")
    });
    let restarted = guest.restart_qemu();
    ok(&guest, "a new QEMU", restarted);
    let since = Instant::now();
    actual_becomes(
        &guest,
        boot - HELD,
        "the kept balloon set again in the new QEMU",
    )
    .await;
    t.record("new QEMU booted to the balloon held again", since.elapsed());
    // A new boot's own MemTotal may differ by a page from the last one's: within the slack.
    let kib = mem_total_near(&guest, start_kib - HELD / 1024, "MemTotal down again").await;
    eprintln!("e2e: MemTotal {kib} KiB in the new QEMU with the kept 256 MiB");
    let b = layout_balloon(&guest, &c).await;
    check(
        &guest,
        b["held-bytes"] == HELD && b["kept-bytes"] == HELD,
        || format!("the layout's balloon holds the kept 256 MiB: {b}"),
    );
}
