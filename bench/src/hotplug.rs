//! Memory hotplug on a real QEMU guest (TCG, the end-to-end image of `qga-e2e`): what the
//! bridge's `memory-plug`, `memory-unplug` and `memory-resize` take, against a baseline
//! with no bridge in the loop — `device_add` / `device_del` over QMP with the guest kernel
//! onlining new memory by itself (`memhp_default_state=online_movable`).
//!
//! Each round boots a fresh guest per configuration, one after the other (never two
//! guests at once): first the baseline guest, then the guest behind the bridge. "Usable"
//! is the first `MemTotal` poll (over the guest's control port, every 25 ms) that shows the
//! new memory; the same poller runs during the bridge's calls, so both sides carry the
//! same polling load on the guest's single vCPU.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail, ensure};
use qga_e2e::{
    bridge::{BridgeProcess, Clients},
    guest::{Guest, GuestConfig, GuestControl},
    image::{self, GuestImage},
    qmp::Qmp,
    scenario,
};
use serde_json::{Value, json};

use crate::{
    report::Report,
    stats::{Samples, fmt_duration, ratio},
};

/// One DIMM: 512 MiB.
const DIMM: u64 = 512 << 20;
/// A grow: 2 GiB, four DIMMs of 512 MiB (the bridge's default `hotplug.dimm_size_bytes`).
const GROW: u64 = 4 * DIMM;
/// How often `MemTotal` is polled.
const POLL: Duration = Duration::from_millis(25);
/// How long any one operation may take before the bench calls it broken.
const WAIT: Duration = Duration::from_secs(120);
/// The VM's name in the bridge.
const VM: &str = "vm1";
/// The bridge's `hotplug.offline_budget_ms` (its default).
const OFFLINE_BUDGET: Duration = Duration::from_secs(10);

/// Every figure of the section, one sample per round.
#[derive(Default)]
struct Figures {
    /// Baseline: `object-add` + `device_add` to `MemTotal` +512 MiB.
    base_plug: Samples,
    /// Baseline: `device_del` to `DEVICE_DELETED` and `object-del` done.
    base_unplug: Samples,
    /// Baseline: four DIMMs added to `MemTotal` +2 GiB.
    base_grow: Samples,
    /// Baseline: four `device_del` to all ejected and their backends deleted.
    base_shrink: Samples,
    /// Baseline: a reboot with the DIMM plugged, agent ready to `MemTotal` with it.
    base_reboot: Samples,
    /// Bridge: the same, the bridge's keeper onlining the DIMM again.
    reboot_usable: Samples,
    /// Bridge: `memory-plug` sent to `MemTotal` +512 MiB.
    plug_usable: Samples,
    /// Bridge: the `memory-plug` call.
    plug_call: Samples,
    /// Bridge: the `memory-unplug` call.
    unplug_call: Samples,
    /// Bridge: `memory-unplug` sent to `MemTotal` back.
    unplug_mem: Samples,
    /// Bridge: `memory-resize` +2 GiB sent to `MemTotal` +2 GiB.
    grow_usable: Samples,
    /// Bridge: the `memory-resize` +2 GiB call.
    grow_call: Samples,
    /// Bridge: the `memory-resize` back to the boot size call.
    shrink_call: Samples,
    /// Bridge: `memory-resize` back sent to `MemTotal` back.
    shrink_mem: Samples,
    /// Bridge: `memory-unplug` of a DIMM onlined `online_kernel`, sent to its refusal.
    refused_unplug: Samples,
    /// Baseline: the first virtio-mem growth after boot, +2 GiB to usable.
    base_vgrow_first: Samples,
    /// Baseline: virtio-mem `requested-size` +2 GiB (`qom-set`) to `MemTotal` +2 GiB, the
    /// guest's second growth.
    base_vgrow: Samples,
    /// Baseline: virtio-mem `requested-size` back to 0 until QEMU's `size` is 0.
    base_vshrink: Samples,
    /// Bridge: the first `memory-resize` +2 GiB after boot, sent to usable.
    vgrow_first_usable: Samples,
    /// Bridge: `memory-resize` +2 GiB on a virtio-mem guest, sent to `MemTotal` +2 GiB,
    /// the guest's second growth.
    vgrow_usable: Samples,
    /// Bridge: `memory-resize` back on the virtio-mem guest: the call (it returns once
    /// QEMU's size is 0).
    vshrink_call: Samples,
    /// `qom-set` alone (+2 GiB to usable, back to size 0) on the bridge's own guest,
    /// the bridge connected and idle: what that guest itself takes.
    same_vgrow: Samples,
    same_vshrink: Samples,
    /// The bridge's own step timings (from its replies), per operation and step.
    steps: BTreeMap<(&'static str, String), Samples>,
    /// Bridge operations that did not work: operation, then each error and its rounds.
    failed: BTreeMap<&'static str, BTreeMap<String, Vec<usize>>>,
}

/// Polls the guest's `MemTotal` until it is `want` KiB; returns the time from `since` to
/// the answer that showed it.
fn mem_total_reaches(g: &GuestControl, want: u64, since: Instant) -> anyhow::Result<Duration> {
    mem_total_reaches_unless(g, want, since, &AtomicBool::new(false))
}

/// [`mem_total_reaches`], giving up early once `stop` is set.
fn mem_total_reaches_unless(
    g: &GuestControl,
    want: u64,
    since: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = g.mem_total_kib()?;
        if now == want {
            return Ok(since.elapsed());
        }
        if stop.load(Ordering::Relaxed) {
            bail!("MemTotal is {now} KiB, expected {want} KiB");
        }
        if Instant::now() > deadline {
            bail!("MemTotal is {now} KiB after {WAIT:?}, expected {want} KiB");
        }
        std::thread::sleep(POLL);
    }
}

/// Resets the guest with `reset` (`system_reset`: a reboot; QEMU keeps its DIMMs) and
/// returns the time from its init's READY (the agent starting) to the first `MemTotal`
/// poll that shows `want` KiB.
fn reboot_to_usable(
    guest: &Guest,
    want: u64,
    reset: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let g = guest.control();
    let boots = guest.boots();
    reset()?;
    let deadline = Instant::now() + WAIT;
    while guest.boots() == boots {
        ensure!(
            Instant::now() < deadline,
            "the guest did not boot again within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = Instant::now();
    // The control port answers again shortly after READY.
    while g.mem_total_kib().ok() != Some(want) {
        ensure!(
            ready.elapsed() < WAIT,
            "MemTotal not {want} KiB within {WAIT:?} of the reboot"
        );
        std::thread::sleep(POLL);
    }
    Ok(ready.elapsed())
}

/// A bridge call timed twice: until it returns, and until `MemTotal` (polled on a
/// blocking thread meanwhile) is `want_kib`. Returns the reply and both durations.
async fn timed_call(
    c: &Clients,
    g: &GuestControl,
    method: &str,
    params: Value,
    want_kib: u64,
) -> anyhow::Result<(Value, Duration, Duration)> {
    let since = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (g, stop) = (g.clone(), stop.clone());
        tokio::task::spawn_blocking(move || mem_total_reaches_unless(&g, want_kib, since, &stop))
    };
    let reply = scenario::call(c, method, params).await;
    let call = since.elapsed();
    if reply.is_err() {
        // The memory may never come or go: stop polling at once.
        stop.store(true, Ordering::Relaxed);
    }
    let mem = watcher.await?;
    let reply = reply?;
    let mem = mem.with_context(|| format!("{method} returned, but MemTotal never changed"))?;
    Ok((reply, call, mem))
}

/// The error with the end of the guest's console, for a failed operation.
pub(crate) fn with_console(guest: &Guest, e: anyhow::Error) -> anyhow::Error {
    let console = guest.console_text();
    let lines: Vec<&str> = console.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    anyhow!("{e:#}\nguest console (last lines):\n{tail}")
}

/// `device_del` of every DIMM in `ids`, then waits for each one's `DEVICE_DELETED` (the
/// guest ejected it) and deletes the backends.
fn qmp_unplug(q: &mut Qmp, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        q.execute("device_del", Some(json!({ "id": id })))?;
    }
    let mut pending: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let deadline = Instant::now() + WAIT;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = q
            .wait_event("DEVICE_DELETED", left)
            .with_context(|| format!("the guest did not eject {pending:?}"))?;
        if let Some(device) = event["data"]["device"].as_str() {
            pending.remove(device);
        }
    }
    for id in ids {
        q.execute("object-del", Some(json!({ "id": format!("mem-{id}") })))?;
    }
    // What the guest reported on the way (`_OST`), for the log.
    while let Ok(ost) = q.wait_event("ACPI_DEVICE_OST", Duration::ZERO) {
        eprintln!(
            "bench: hotplug: baseline saw ACPI_DEVICE_OST {}",
            ost["data"]
        );
    }
    Ok(())
}

/// QEMU's DIMM ids (`query-memory-devices`).
fn qmp_dimms(q: &mut Qmp) -> anyhow::Result<Vec<String>> {
    let devices = q.execute("query-memory-devices", None)?;
    Ok(devices
        .as_array()
        .context("query-memory-devices returned no list")?
        .iter()
        .filter_map(|d| d["data"]["id"].as_str().map(str::to_string))
        .collect())
}

/// One baseline round on a fresh guest whose kernel onlines new memory movable by itself.
fn baseline_round(image: &GuestImage, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let mut config = GuestConfig::new("ours", "online_movable");
    config.extra_append = "memhp_default_state=online_movable";
    config.reboot = true;
    let guest = Guest::boot(image, config).context("booting the baseline guest")?;
    baseline_ops(&guest, round, f).map_err(|e| with_console(&guest, e))
}

fn baseline_ops(guest: &Guest, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let g = guest.control();
    let mut q = Qmp::connect(&g.qmp, Duration::from_secs(10))?;
    let boot_kib = g.mem_total_kib()?;

    // Plug 512 MiB, then unplug it.
    let id = "bench-dimm0".to_string();
    let since = Instant::now();
    q.plug_dimm(&id, DIMM)?;
    let usable = mem_total_reaches(&g, boot_kib + DIMM / 1024, since)
        .context("baseline: MemTotal +512 MiB after device_add")?;
    f.base_plug.push(usable);
    // Over the bench's own QMP connection: QEMU serves one client per socket.
    let reset = || q.execute("system_reset", None).map(drop);
    let rebooted = reboot_to_usable(guest, boot_kib + DIMM / 1024, reset)
        .context("baseline: MemTotal +512 MiB after a reboot")?;
    f.base_reboot.push(rebooted);
    eprintln!(
        "bench: hotplug round {round} baseline: reboot, agent ready to usable {}",
        fmt_duration(rebooted)
    );
    let since = Instant::now();
    qmp_unplug(&mut q, std::slice::from_ref(&id)).context("baseline: unplugging 512 MiB")?;
    let gone = since.elapsed();
    f.base_unplug.push(gone);
    mem_total_reaches(&g, boot_kib, Instant::now())
        .context("baseline: MemTotal back after the unplug")?;
    let left = qmp_dimms(&mut q)?;
    ensure!(
        left.is_empty(),
        "baseline: DIMMs left after the unplug: {left:?}"
    );
    eprintln!(
        "bench: hotplug round {round} baseline: plug to usable {}, unplug to gone {}",
        fmt_duration(usable),
        fmt_duration(gone)
    );

    // Grow by 2 GiB (four DIMMs), then shrink back.
    let ids: Vec<String> = (1..=GROW / DIMM)
        .map(|i| format!("bench-dimm{i}"))
        .collect();
    let since = Instant::now();
    for id in &ids {
        q.plug_dimm(id, DIMM)?;
    }
    let usable = mem_total_reaches(&g, boot_kib + GROW / 1024, since)
        .context("baseline: MemTotal +2 GiB after four device_add")?;
    f.base_grow.push(usable);
    let since = Instant::now();
    qmp_unplug(&mut q, &ids).context("baseline: unplugging 2 GiB")?;
    let gone = since.elapsed();
    f.base_shrink.push(gone);
    mem_total_reaches(&g, boot_kib, Instant::now())
        .context("baseline: MemTotal back after the 2 GiB unplug")?;
    let left = qmp_dimms(&mut q)?;
    ensure!(
        left.is_empty(),
        "baseline: DIMMs left after the 2 GiB unplug: {left:?}"
    );
    eprintln!(
        "bench: hotplug round {round} baseline: grow 2 GiB to usable {}, shrink to gone {}",
        fmt_duration(usable),
        fmt_duration(gone)
    );
    Ok(())
}

/// The size QEMU reports for virtio-mem device `vmem0`.
fn vmem_size(q: &mut Qmp) -> anyhow::Result<u64> {
    let devices = q.execute("query-memory-devices", None)?;
    devices
        .as_array()
        .and_then(|d| d.iter().find(|d| d["type"] == "virtio-mem"))
        .and_then(|d| d["data"]["size"].as_u64())
        .with_context(|| format!("no virtio-mem device in {devices}"))
}

/// The virtio-mem baseline: a guest whose kernel onlines new memory movable by itself,
/// `qom-set vmem0 requested-size` 2 GiB to `MemTotal` +2 GiB, then 0 until QEMU's size is 0.
fn vmem_baseline_round(image: &GuestImage, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let mut config = GuestConfig::new("ours", "online_movable");
    config.extra_append = "memhp_default_state=online_movable";
    config.virtio_mem = true;
    let guest = Guest::boot(image, config).context("booting the virtio-mem baseline guest")?;
    let (first, _) = qom_set_cycle(&guest).map_err(|e| with_console(&guest, e))?;
    f.base_vgrow_first.push(first);
    let (grow, shrink) = qom_set_cycle(&guest).map_err(|e| with_console(&guest, e))?;
    f.base_vgrow.push(grow);
    f.base_vshrink.push(shrink);
    eprintln!(
        "bench: hotplug round {round} virtio-mem baseline: first +2 GiB to usable {}; \
         second +2 GiB to usable {}, back to size 0 {}",
        fmt_duration(first),
        fmt_duration(grow),
        fmt_duration(shrink)
    );
    Ok(())
}

/// `qom-set vmem0 requested-size` 2 GiB to `MemTotal` +2 GiB, then 0 until QEMU's size is
/// 0 (with a `MemTotal` poller running, as during the bridge's calls).
fn qom_set_cycle(guest: &Guest) -> anyhow::Result<(Duration, Duration)> {
    let g = guest.control();
    let mut q = Qmp::connect(&g.qmp, Duration::from_secs(10))?;
    let boot_kib = g.mem_total_kib()?;
    let set = |q: &mut Qmp, bytes: u64| {
        q.execute(
            "qom-set",
            Some(json!({"path": "vmem0", "property": "requested-size", "value": bytes})),
        )
        .map(drop)
    };
    let since = Instant::now();
    set(&mut q, GROW)?;
    let usable =
        mem_total_reaches(&g, boot_kib + GROW / 1024, since).context("qom-set: MemTotal +2 GiB")?;
    let since = Instant::now();
    set(&mut q, 0)?;
    // The same MemTotal poller as during the bridge's call, so both sides carry the
    // same load on the guest's vCPU.
    let watcher = {
        let g = g.clone();
        std::thread::spawn(move || mem_total_reaches(&g, boot_kib, since))
    };
    let deadline = since + WAIT;
    while vmem_size(&mut q)? != 0 {
        ensure!(
            Instant::now() < deadline,
            "virtio-mem baseline: size not 0 after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let gone = since.elapsed();
    let _ = watcher.join();
    Ok((usable, gone))
}

/// One virtio-mem cycle through the bridge: `memory-resize` +2 GiB, then back. The grow's
/// time to usable and the shrink's call; `None` where one failed (recorded under `up` /
/// `down`).
async fn vmem_bridge_cycle(
    b: &Behind,
    round: usize,
    f: &mut Figures,
    (up, down): (&'static str, &'static str),
) -> (Option<Duration>, Option<Duration>) {
    let (c, g) = (&b.c, b.guest.control());
    let grow = json!({"vm": VM, "size": b.boot_bytes + GROW});
    let grown = match timed_call(c, &g, "memory-resize", grow, b.boot_kib + GROW / 1024).await {
        Err(e) => {
            record_failure(f, up, round, &e);
            None
        }
        Ok((reply, call, usable)) => {
            record_steps(f, up, &reply);
            eprintln!(
                "bench: hotplug round {round} bridge: {up} +2 GiB call {}, to usable {}",
                fmt_duration(call),
                fmt_duration(usable)
            );
            Some(usable)
        }
    };
    let back = json!({"vm": VM, "size": b.boot_bytes});
    let shrunk = match timed_call(c, &g, "memory-resize", back, b.boot_kib).await {
        Err(e) => {
            record_failure(f, down, round, &e);
            None
        }
        Ok((reply, call, _)) => {
            record_steps(f, down, &reply);
            eprintln!(
                "bench: hotplug round {round} bridge: {down} call {}",
                fmt_duration(call)
            );
            Some(call)
        }
    };
    (grown, shrunk)
}

/// The bridge's `memory-resize` +2 GiB and back, twice, on a guest with a virtio-mem
/// device booted without `memhp_default_state` (the first growth after boot measured
/// apart), then `qom-set` alone on that guest.
async fn vmem_bridge_round(
    image: &GuestImage,
    round: usize,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let b = behind_bridge_with(image, true).await?;
    let names = ("virtio-mem first resize up", "virtio-mem first resize down");
    if let (Some(usable), _) = vmem_bridge_cycle(&b, round, f, names).await {
        f.vgrow_first_usable.push(usable);
    }
    let names = ("virtio-mem resize up", "virtio-mem resize down");
    let (grown, shrunk) = vmem_bridge_cycle(&b, round, f, names).await;
    if let Some(usable) = grown {
        f.vgrow_usable.push(usable);
    }
    if let Some(call) = shrunk {
        f.vshrink_call.push(call);
    }
    // The same guest with qom-set alone (the bridge idle): what this guest itself takes.
    let guest = &b.guest;
    let same = tokio::task::block_in_place(|| qom_set_cycle(guest));
    match same {
        Ok((grow, shrink)) => {
            f.same_vgrow.push(grow);
            f.same_vshrink.push(shrink);
            eprintln!(
                "bench: hotplug round {round} qom-set on the bridge's guest: +2 GiB to usable {}, \
                 back to size 0 {}",
                fmt_duration(grow),
                fmt_duration(shrink)
            );
        }
        Err(e) => record_failure(f, "qom-set on the bridge's guest", round, &e),
    }
    Ok(())
}

/// Records the `steps` of a bridge reply under `op`.
fn record_steps(f: &mut Figures, op: &'static str, reply: &Value) {
    sum_steps(&mut f.steps, "hotplug", op, reply);
}

/// Adds the steps of a bridge reply to `steps` under `op` (each step name's total per
/// call), and prints its warnings as the bench `section`'s.
pub(crate) fn sum_steps(
    steps: &mut BTreeMap<(&'static str, String), Samples>,
    section: &str,
    op: &'static str,
    reply: &Value,
) {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for s in reply["steps"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or("?").to_string();
        *sums.entry(name).or_default() += s["duration-ms"].as_f64().unwrap_or_default();
    }
    for (name, ms) in sums {
        steps
            .entry((op, name))
            .or_default()
            .push(Duration::from_secs_f64(ms / 1e3));
    }
    for w in reply["warnings"].as_array().into_iter().flatten() {
        eprintln!("bench: {section}: {op}: warning: {w}");
    }
}

/// Notes that bridge operation `op` did not work in `round`.
fn record_failure(f: &mut Figures, op: &'static str, round: usize, e: &anyhow::Error) {
    let e = format!("{e:#}");
    eprintln!("bench: hotplug round {round} bridge: {op} FAILED: {e}");
    f.failed
        .entry(op)
        .or_default()
        .entry(e)
        .or_default()
        .push(round);
}

/// Fails unless the bridge's layout shows no DIMM.
async fn no_dimms(c: &Clients, after: &str) -> anyhow::Result<()> {
    let layout = scenario::memory_layout(c, VM).await?;
    ensure!(
        scenario::layout_dimms(&layout).is_empty(),
        "DIMMs left after {after}: {layout}"
    );
    Ok(())
}

/// A fresh guest behind its own bridge (our agent; new blocks stay offline until the
/// bridge onlines them). Fields drop in order: clients, bridge, then QEMU.
struct Behind {
    c: Clients,
    _bridge: BridgeProcess,
    guest: Guest,
    boot_bytes: u64,
    boot_kib: u64,
}

async fn behind_bridge(image: &GuestImage) -> anyhow::Result<Behind> {
    behind_bridge_with(image, false).await
}

/// [`behind_bridge`], the guest with a virtio-mem device when `virtio_mem`.
async fn behind_bridge_with(image: &GuestImage, virtio_mem: bool) -> anyhow::Result<Behind> {
    let guest = Guest::boot(
        image,
        GuestConfig {
            reboot: true,
            virtio_mem,
            ..GuestConfig::new("ours", "online_movable")
        },
    )
    .context("booting the guest for the bridge")?;
    let bridge = BridgeProcess::start_with_qmp(
        &[(VM, &guest.qga_socket())],
        &[(VM, &guest.qmp_bridge_socket())],
    )
    .await?;
    let c = bridge.clients().await?;
    let ready = async {
        scenario::ping_until_ok(&c, VM, Duration::from_secs(60)).await?;
        let layout = scenario::memory_layout(&c, VM).await?;
        let boot_bytes = layout["boot-bytes"]
            .as_u64()
            .with_context(|| format!("no boot-bytes in the layout: {layout}"))?;
        ensure!(
            scenario::layout_dimms(&layout).is_empty(),
            "DIMMs at boot: {layout}"
        );
        anyhow::Ok((boot_bytes, guest.control().mem_total_kib()?))
    }
    .await;
    let (boot_bytes, boot_kib) = ready.map_err(|e| with_console(&guest, e))?;
    Ok(Behind {
        c,
        _bridge: bridge,
        guest,
        boot_bytes,
        boot_kib,
    })
}

/// How many bridge operations have failed so far.
fn failures(f: &Figures) -> usize {
    f.failed
        .values()
        .map(|errors| errors.values().map(Vec::len).sum::<usize>())
        .sum()
}

/// One round behind the bridge: plug and unplug, then grow and shrink. An operation that
/// does not work is recorded in `f.failed` and the round goes on; after a failure the
/// grow and shrink get a fresh guest, so they do not start from a half-unplugged VM.
/// Only a guest or bridge that cannot be reached at all is an error here.
async fn bridge_round(image: &GuestImage, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let before = failures(f);
    let mut b = behind_bridge(image).await?;
    plug_unplug(&b, round, f)
        .await
        .map_err(|e| with_console(&b.guest, e))?;
    if failures(f) > before {
        eprintln!("bench: hotplug round {round}: a fresh guest for the resize");
        drop(b);
        b = behind_bridge(image).await?;
    }
    grow_shrink(&b, round, f)
        .await
        .map_err(|e| with_console(&b.guest, e))?;
    refused_unplug(&b, round, f)
        .await
        .map_err(|e| with_console(&b.guest, e))
}

/// `memory-plug` 512 MiB onlined `online_kernel` (ZONE_NORMAL, which the kernel does not
/// give back), then `memory-unplug` of it, which must be refused: how long until it is.
async fn refused_unplug(b: &Behind, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let plugged = scenario::call(
        &b.c,
        "memory-plug",
        json!({"vm": VM, "size": DIMM, "online-type": "online_kernel"}),
    )
    .await;
    let dimm = match plugged {
        Ok(reply) => reply["dimm"]["id"].as_str().unwrap_or_default().to_string(),
        Err(e) => {
            record_failure(f, "memory-plug online_kernel", round, &e);
            return Ok(());
        }
    };
    let since = Instant::now();
    let refused =
        b.c.rpc_full("memory-unplug", json!({"vm": VM, "dimm": dimm}))
            .await;
    let took = since.elapsed();
    match refused {
        Err(e) if e.code == -32007 => {
            f.refused_unplug.push(took);
            eprintln!(
                "bench: hotplug round {round} bridge: memory-unplug of kernel-zone memory \
                 refused after {}",
                fmt_duration(took)
            );
        }
        Err(e) => record_failure(f, "memory-unplug refused", round, &anyhow!("{e}")),
        Ok(v) => record_failure(
            f,
            "memory-unplug refused",
            round,
            &anyhow!("kernel-zone memory came out: {v}"),
        ),
    }
    Ok(())
}

/// `memory-plug` 512 MiB, then `memory-unplug` of that DIMM.
async fn plug_unplug(b: &Behind, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let (c, g, boot_kib) = (&b.c, b.guest.control(), b.boot_kib);
    // memory-plug 512 MiB.
    let plug = timed_call(
        c,
        &g,
        "memory-plug",
        json!({"vm": VM, "size": DIMM}),
        boot_kib + DIMM / 1024,
    )
    .await
    .and_then(|(reply, call, usable)| {
        let dimm = reply["dimm"]["id"]
            .as_str()
            .with_context(|| format!("memory-plug named no DIMM: {reply}"))?
            .to_string();
        record_steps(f, "memory-plug", &reply);
        f.plug_call.push(call);
        f.plug_usable.push(usable);
        eprintln!(
            "bench: hotplug round {round} bridge: memory-plug call {}, to usable {}",
            fmt_duration(call),
            fmt_duration(usable)
        );
        Ok(dimm)
    });

    // A reboot with it plugged: the keeper onlines it again. Then memory-unplug it.
    match plug {
        Err(e) => record_failure(f, "memory-plug", round, &e),
        Ok(dimm) => {
            match reboot_to_usable(&b.guest, boot_kib + DIMM / 1024, || g.system_reset()) {
                Ok(d) => {
                    f.reboot_usable.push(d);
                    eprintln!(
                        "bench: hotplug round {round} bridge: reboot, agent ready to usable {}",
                        fmt_duration(d)
                    );
                }
                Err(e) => record_failure(f, "reboot", round, &e),
            }
            let request = ("memory-unplug", json!({"vm": VM, "dimm": dimm}));
            match give_back(b, f, "memory-unplug", request, "memory-unplug").await {
                Ok((call, back)) => {
                    f.unplug_call.push(call);
                    f.unplug_mem.push(back);
                    eprintln!(
                        "bench: hotplug round {round} bridge: memory-unplug call {}, MemTotal back {}",
                        fmt_duration(call),
                        fmt_duration(back)
                    );
                }
                Err(e) => record_failure(f, "memory-unplug", round, &e),
            }
        }
    }

    Ok(())
}

/// `memory-resize` to boot + 2 GiB, then back to the boot size.
async fn grow_shrink(b: &Behind, round: usize, f: &mut Figures) -> anyhow::Result<()> {
    let (c, g, boot_kib, boot_bytes) = (&b.c, b.guest.control(), b.boot_kib, b.boot_bytes);
    // memory-resize to boot + 2 GiB.
    let grow = timed_call(
        c,
        &g,
        "memory-resize",
        json!({"vm": VM, "size": boot_bytes + GROW}),
        boot_kib + GROW / 1024,
    )
    .await;
    match grow {
        Err(e) => record_failure(f, "memory-resize up", round, &e),
        Ok((reply, call, usable)) => {
            record_steps(f, "memory-resize up", &reply);
            f.grow_call.push(call);
            f.grow_usable.push(usable);
            eprintln!(
                "bench: hotplug round {round} bridge: memory-resize +2 GiB call {}, to usable {}",
                fmt_duration(call),
                fmt_duration(usable)
            );
        }
    }

    // And back to the boot size.
    let request = ("memory-resize", json!({"vm": VM, "size": boot_bytes}));
    let what = "memory-resize back to the boot size";
    match give_back(b, f, "memory-resize down", request, what).await {
        Ok((call, back)) => {
            f.shrink_call.push(call);
            f.shrink_mem.push(back);
            eprintln!(
                "bench: hotplug round {round} bridge: memory-resize back call {}, MemTotal back {}",
                fmt_duration(call),
                fmt_duration(back)
            );
        }
        Err(e) => record_failure(f, "memory-resize down", round, &e),
    }
    Ok(())
}

/// A bridge call `method` that gives the plugged memory back, recorded as operation
/// `op`: timed until it returns and until `MemTotal` is back at the boot size, after
/// which the layout must show no DIMM (else an error naming `what`). Returns both
/// times; its steps are recorded.
async fn give_back(
    b: &Behind,
    f: &mut Figures,
    op: &'static str,
    (method, params): (&str, Value),
    what: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let (c, g) = (&b.c, b.guest.control());
    let (reply, call, back) = timed_call(c, &g, method, params, b.boot_kib).await?;
    no_dimms(c, what).await?;
    record_steps(f, op, &reply);
    Ok((call, back))
}

/// `median (min–max)`, or just the value for one sample; `-` for none.
pub(crate) fn spread(s: &Samples) -> String {
    match s.len() {
        0 => "-".into(),
        1 => fmt_duration(s.p50()),
        _ => format!(
            "{} ({}–{})",
            fmt_duration(s.p50()),
            fmt_duration(s.quantile(0.0)),
            fmt_duration(s.quantile(1.0))
        ),
    }
}

/// [`spread`] of a bridge figure, saying in how many rounds its operation `op` failed.
fn bridge_cell(f: &Figures, op: &str, s: &Samples, rounds: usize) -> String {
    let failed: usize = f
        .failed
        .get(op)
        .map_or(0, |errors| errors.values().map(Vec::len).sum());
    match (failed, s.len()) {
        (0, _) => spread(s),
        (n, 0) => format!("**failed** ({n} of {rounds} rounds)"),
        (n, _) => format!("{} — **failed** in {n} of {rounds} rounds", spread(s)),
    }
}

/// `a / b` of the medians, `-` when either is missing.
pub(crate) fn median_ratio(a: &Samples, b: &Samples) -> String {
    if a.is_empty() || b.is_empty() {
        return "-".into();
    }
    ratio(a.p50(), b.p50())
}

/// The kernel release in a bzImage's setup header (`kernel_version` field), with the
/// Debian package version when the string names one.
pub(crate) fn kernel_version(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = u16::from_le_bytes(bytes.get(0x20e..0x210)?.try_into().ok()?) as usize + 0x200;
    let rest = bytes.get(offset..)?;
    let text = String::from_utf8_lossy(&rest[..rest.iter().position(|&b| b == 0)?]).to_string();
    let release = text.split_whitespace().next()?.to_string();
    Some(match text.split("Debian ").nth(1) {
        Some(v) => format!(
            "{release} (Debian {})",
            v.split_whitespace().next().unwrap_or_default()
        ),
        None => release,
    })
}

/// `qemu-system-x86_64 --version`'s version number.
pub(crate) fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let first = text.lines().next()?;
    Some(
        first
            .split("version ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string(),
    )
}

/// The section. Returns what did not work through the bridge (after putting it in the
/// report), for the caller to fail on once the report is written.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<Vec<String>> {
    let rounds = if quick { 1 } else { 3 };
    let image = image::ensure().context("the guest image (tests/guest/build-image)")?;
    let kernel = kernel_version(&image.kernel).unwrap_or_else(|| "unknown".into());
    let qemu = qemu_version().unwrap_or_else(|| "unknown".into());
    let mut f = Figures::default();
    for round in 1..=rounds {
        baseline_round(&image, round, &mut f)?;
        bridge_round(&image, round, &mut f).await?;
        vmem_baseline_round(&image, round, &mut f)?;
        vmem_bridge_round(&image, round, &mut f).await?;
    }

    intro(report, &qemu, &kernel, rounds);
    against_baseline(report, &f, rounds);
    bridge_calls(report, &f, rounds);
    goals(report, &f);
    Ok(failures_listed(report, &f))
}

/// The section's heading and how it measures, on guests of QEMU `qemu` and kernel `kernel`.
fn intro(report: &mut Report, qemu: &str, kernel: &str, rounds: usize) {
    report.heading("Memory hotplug on a real guest");
    report.para(&format!(
        "A real QEMU {qemu} guest under TCG (no KVM; `-cpu max`, 1 vCPU, 512 MiB boot memory, \
         `slots=4,maxmem=4G`), Debian's cloud kernel {kernel}, busybox init and our `qga-agent` \
         (the `qga-e2e` image). Two configurations, each on a freshly booted guest, run one after \
         the other (never two guests at once), {rounds} round(s), alternating. **Baseline**, no \
         bridge in the loop: the guest boots with `memhp_default_state=online_movable`, so its \
         kernel onlines new memory by itself; the bench sends `object-add memory-backend-ram` + \
         `device_add pc-dimm` over QMP, and to unplug `device_del`, waits for `DEVICE_DELETED` \
         (the kernel offlines movable memory itself on the ACPI eject), then `object-del`. \
         **Through the bridge**: the guest boots without that parameter (new blocks stay \
         offline); the release `qga-bridge` holds the guest's second QMP socket and serves \
         JSON-RPC `memory-plug` (512 MiB; the agent onlines each block as `online_movable` the \
         moment its kernel uevent announces it, in one `__org.qga-bridge_online-when-present` \
         call, and the bridge answers once they are online), `memory-unplug` (offline through \
         the agent, `device_del`, `DEVICE_DELETED`, `object-del`), and `memory-resize` to boot + \
         2 GiB and back (four 512 MiB DIMMs, all added, then onlined together); last, a 512 MiB \
         DIMM plugged `online_kernel` and a `memory-unplug` of it, which the guest cannot \
         satisfy. **virtio-mem**, on two more guests per round with a `virtio-mem-pci` device \
         `vmem0` (2 GiB at most, 2 MiB blocks, nothing plugged at boot): the baseline guest \
         boots with `memhp_default_state=online_movable` and the bench sends `qom-set vmem0 \
         requested-size` 2 GiB, then 0, waiting for QEMU's `size` to reach 0 (with the same \
         `MemTotal` poller running as during the bridge's call); the bridge's guest boots \
         without that parameter and gets `memory-resize` to boot + 2 GiB and back (the bridge \
         has the guest kernel online new memory movable through the agent, sets \
         `requested-size`, and answers when QEMU's `size` and the guest's online blocks \
         agree), and then, on that same guest with the bridge connected and idle, `qom-set` \
         alone the same way. Each virtio-mem guest grows and shrinks twice: the first \
         growth after boot has a row of its own, the other virtio-mem rows are the second \
         cycle. Compare the rows with the DIMM rows of the same sizes above. \"To usable\" ends at the first `MemTotal` poll \
         (the guest's `/proc/meminfo` over its control port, every {} ms) that shows the new \
         memory; the same poller runs during the bridge's calls, so both sides carry the same \
         polling load on the single vCPU. \"To gone\" ends when the backend is deleted: \
         `object-del` returned (baseline) or the bridge's call returned (it returns after its \
         own `object-del`). The baseline grows by sending four `object-add` + `device_add` back \
         to back and shrinks with four `device_del` at once. The reboot row: with the 512 MiB \
         DIMM plugged, `system_reset`; from the guest init's READY line (it starts the agent) \
         to the first `MemTotal` poll that counts the DIMM — the baseline kernel onlines it at \
         boot, the bridge's keeper (a pass every 2 s, `hotplug.restore_interval_ms`) onlines it \
         through the agent; a pass that began during the reboot waits for the agent's first \
         answer, so it acts as soon as the agent is up. Cells: median (min–max) over the rounds.",
        POLL.as_millis()
    ));
}

/// One row comparing a baseline figure with the bridge's: what, the baseline, the bridge
/// operation whose failures the bridge's cell counts, the bridge's figure.
type Compared<'a> = (&'a str, &'a Samples, &'a str, &'a Samples);

/// The main table: each operation on the baseline and through the bridge.
fn against_baseline(report: &mut Report, f: &Figures, rounds: usize) {
    report.table(&[
        "operation",
        "baseline (device_add + kernel onlining)",
        "through the bridge",
        "bridge / baseline (median)",
    ]);
    compared_rows(
        report,
        f,
        rounds,
        [
            (
                "plug 512 MiB to usable",
                &f.base_plug,
                "memory-plug",
                &f.plug_usable,
            ),
            (
                "unplug 512 MiB to gone",
                &f.base_unplug,
                "memory-unplug",
                &f.unplug_call,
            ),
            (
                "grow by 2 GiB to usable",
                &f.base_grow,
                "memory-resize up",
                &f.grow_usable,
            ),
            (
                "shrink by 2 GiB to gone",
                &f.base_shrink,
                "memory-resize down",
                &f.shrink_call,
            ),
            (
                "reboot with 512 MiB plugged: agent ready to usable",
                &f.base_reboot,
                "reboot",
                &f.reboot_usable,
            ),
        ],
    );
    report.row(&[
        "virtio-mem: first growth after boot, +2 GiB to usable".to_string(),
        spread(&f.base_vgrow_first),
        spread(&f.vgrow_first_usable),
        median_ratio(&f.vgrow_first_usable, &f.base_vgrow_first),
    ]);
    virtio_mem_rows(report, f, rounds);
    report.row(&[
        "unplug of 512 MiB onlined `online_kernel`: answered (refused)".to_string(),
        "- (the kernel keeps it; QEMU's `device_del` never completes)".to_string(),
        bridge_cell(f, "memory-unplug refused", &f.refused_unplug, rounds),
        format!("offline budget {} s", OFFLINE_BUDGET.as_secs()),
    ]);
    report.end_table();
}

/// The virtio-mem rows of the main table after the first growth: the second cycle
/// against the baseline guest's `qom-set`, then against `qom-set` on the bridge's guest.
fn virtio_mem_rows(report: &mut Report, f: &Figures, rounds: usize) {
    compared_rows(
        report,
        f,
        rounds,
        [
            (
                "virtio-mem: grow by 2 GiB to usable",
                &f.base_vgrow,
                "virtio-mem resize up",
                &f.vgrow_usable,
            ),
            (
                "virtio-mem: shrink by 2 GiB to size 0",
                &f.base_vshrink,
                "virtio-mem resize down",
                &f.vshrink_call,
            ),
            (
                "virtio-mem: grow by 2 GiB, `qom-set` alone on the bridge's guest",
                &f.same_vgrow,
                "virtio-mem resize up",
                &f.vgrow_usable,
            ),
            (
                "virtio-mem: shrink by 2 GiB, `qom-set` alone on the bridge's guest",
                &f.same_vshrink,
                "virtio-mem resize down",
                &f.vshrink_call,
            ),
        ],
    );
}

/// Writes each [`Compared`] row: the baseline's spread, the bridge's cell, their ratio.
fn compared_rows<const N: usize>(
    report: &mut Report,
    f: &Figures,
    rounds: usize,
    rows: [Compared<'_>; N],
) {
    for (name, base, op, bridge) in rows {
        report.row(&[
            name.to_string(),
            spread(base),
            bridge_cell(f, op, bridge, rounds),
            median_ratio(bridge, base),
        ]);
    }
}

/// The second table: each bridge call's return, when `MemTotal` showed it, and the
/// steps its replies report.
fn bridge_calls(report: &mut Report, f: &Figures, rounds: usize) {
    report.para(
        "The bridge's calls in detail: when each call returned, when `MemTotal` showed the \
         change, and the steps its replies report (median of each step's total per call, ms; \
         `online` runs from the last `device_add` until the agent has onlined every new block \
         as it appeared, `offline` is the agent's set calls).",
    );
    report.table(&[
        "bridge call",
        "call returned",
        "MemTotal showed it",
        "steps (median ms)",
    ]);
    for (name, op, call, mem) in [
        (
            "memory-plug 512 MiB",
            "memory-plug",
            &f.plug_call,
            &f.plug_usable,
        ),
        (
            "memory-unplug 512 MiB",
            "memory-unplug",
            &f.unplug_call,
            &f.unplug_mem,
        ),
        (
            "memory-resize +2 GiB",
            "memory-resize up",
            &f.grow_call,
            &f.grow_usable,
        ),
        (
            "memory-resize back to boot size",
            "memory-resize down",
            &f.shrink_call,
            &f.shrink_mem,
        ),
    ] {
        let steps: Vec<String> = f
            .steps
            .iter()
            .filter(|((o, _), _)| *o == op)
            .map(|((_, step), s)| format!("{step} {:.0}", s.p50().as_secs_f64() * 1e3))
            .collect();
        report.row(&[
            name.to_string(),
            bridge_cell(f, op, call, rounds),
            spread(mem),
            if steps.is_empty() {
                "-".into()
            } else {
                steps.join(", ")
            },
        ]);
    }
    report.end_table();
}

/// The goals, judged on medians, each met or not.
fn goals(report: &mut Report, f: &Figures) {
    let (plug, grow, unplug) = (plug_goal(f), grow_goal(f), unplug_goal(f));
    let (refused, vgrow) = (refused_goal(f), virtio_mem_goal(f));
    report.para(&format!(
        "Goals (from the issues): plug within 1.2x of the baseline, grow by 2 GiB within 1.3x, \
         unplug of an idle 512 MiB movable DIMM under 1 s, and an unplug that cannot succeed \
         answered within the offline budget plus 2 s; virtio-mem resizes within 1.2x of \
         `qom-set` alone. {plug} {grow} {unplug} {refused} {vgrow} These \
         are TCG figures: every guest instruction is emulated on a shared 2-core host, so \
         absolute times are longer than under KVM; compare the two sides of a row."
    ));
}

/// Plug within 1.2x of the baseline: the verdict on `memory-plug`.
fn plug_goal(f: &Figures) -> String {
    if f.plug_usable.is_empty() {
        "**Plug: not measured** — `memory-plug` did not work (below).".to_string()
    } else {
        let base = f.base_plug.p50().as_secs_f64();
        let usable = f.plug_usable.p50().as_secs_f64() / base;
        let call = f.plug_call.p50().as_secs_f64() / base;
        format!(
            "**Plug: {}** — through the bridge the memory was usable after {usable:.2}x the \
             baseline's time (median; the call itself returned after {call:.2}x).",
            if usable <= 1.2 { "met" } else { "not met" }
        )
    }
}

/// An idle 512 MiB movable DIMM unplugged in under 1 s: the verdict on `memory-unplug`.
fn unplug_goal(f: &Figures) -> String {
    if f.unplug_call.is_empty() {
        format!(
            "**Unplug: not met** — `memory-unplug` did not work in any round (below); the \
             baseline's `device_del` to `object-del` took {}.",
            fmt_duration(f.base_unplug.p50())
        )
    } else {
        let (median, slowest) = (f.unplug_call.p50(), f.unplug_call.quantile(1.0));
        let one = Duration::from_secs(1);
        let failed = f.failed.contains_key("memory-unplug");
        let verdict = if failed {
            "not met (it failed in some rounds)"
        } else if slowest < one {
            "met"
        } else if median < one {
            "met by the median, not in every round"
        } else {
            "not met"
        };
        format!(
            "**Unplug: {verdict}** — `memory-unplug` returned after {} (median; slowest {}), \
             against {} for the baseline's `device_del` to `object-del`.",
            fmt_duration(median),
            fmt_duration(slowest),
            fmt_duration(f.base_unplug.p50())
        )
    }
}

/// Growth by 2 GiB within 1.3x of the baseline: the verdict on `memory-resize` up.
fn grow_goal(f: &Figures) -> String {
    if f.grow_usable.is_empty() {
        "**Grow: not measured** — `memory-resize` up did not work (below).".to_string()
    } else {
        let r = f.grow_usable.p50().as_secs_f64() / f.base_grow.p50().as_secs_f64();
        format!(
            "**Grow: {}** — 2 GiB were usable after {r:.2}x the baseline's time (median).",
            if r <= 1.3 { "met" } else { "not met" }
        )
    }
}

/// virtio-mem resizes within 1.2x of `qom-set` alone: the verdict on the second cycle.
fn virtio_mem_goal(f: &Figures) -> String {
    if f.vgrow_usable.is_empty() {
        "**virtio-mem grow: not measured** (below).".to_string()
    } else {
        let r = f.vgrow_usable.p50().as_secs_f64() / f.base_vgrow.p50().as_secs_f64();
        let s = f.vshrink_call.p50().as_secs_f64() / f.base_vshrink.p50().as_secs_f64();
        let first = median_ratio(&f.vgrow_first_usable, &f.base_vgrow_first);
        format!(
            "**virtio-mem: {}** — 2 GiB were usable after {r:.2}x the baseline's `qom-set` \
             and back to size 0 after {s:.2}x (medians; the second cycle after boot), the \
             first growth after boot after {first} the baseline's.",
            if r <= 1.2 && s <= 1.2 {
                "met"
            } else {
                "not met"
            }
        )
    }
}

/// An unplug that cannot succeed answered within the offline budget plus 2 s.
fn refused_goal(f: &Figures) -> String {
    if f.refused_unplug.is_empty() {
        "**Refused unplug: not measured** (below).".to_string()
    } else {
        let slowest = f.refused_unplug.quantile(1.0);
        format!(
            "**Refused unplug: {}** — kernel-zone memory was refused after {} (slowest {}), \
             against a goal of the offline budget plus 2 s ({} s).",
            if slowest <= OFFLINE_BUDGET + Duration::from_secs(2) {
                "met"
            } else {
                "not met"
            },
            fmt_duration(f.refused_unplug.p50()),
            fmt_duration(slowest),
            OFFLINE_BUDGET.as_secs() + 2
        )
    }
}

/// Lists what did not work through the bridge (the bridge's error, and the rounds) in
/// the report, and returns the same lines.
fn failures_listed(report: &mut Report, f: &Figures) -> Vec<String> {
    let mut failures = Vec::new();
    if !f.failed.is_empty() {
        report.para("What did not work through the bridge (the bridge's error, and the rounds):");
        let mut list = String::new();
        for (op, errors) in &f.failed {
            for (e, in_rounds) in errors {
                let rounds: Vec<String> = in_rounds.iter().map(usize::to_string).collect();
                let line = format!("`{op}` (round {}): {e}", rounds.join(", "));
                list.push_str(&format!("- {}\n", line.replace('\n', " ")));
                failures.push(line);
            }
        }
        report.para(list.trim_end());
    }
    failures
}
