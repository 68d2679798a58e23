//! The memory hotplug scenario, driven only through the bridge (gRPC and JSON-RPC), with
//! QMP for what only the host can do (plugging DIMMs) — and the bridge's own memory
//! hotplug (`memory-plug` / `MemoryHotplug`), which does the QMP part itself over the VM's
//! second QMP socket. Shared by the QEMU tests and the docker compose run.

use std::{
    collections::BTreeSet,
    ops::ControlFlow,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail, ensure};
use qga_proto::v1::{
    BlockState, GetLayoutRequest, GetMemoryBlockInfoRequest, GetMemoryBlocksRequest, MemoryBlock,
    MemoryBlockChange, MemoryBlockResponseType, MemoryBlockResult, MemoryLayout, OnlineType,
    PingRequest, PlugRequest, ResizeRequest, ResizeResponse, SetMemoryBlocksRequest, Step,
    UnplugRequest, VirtioMem,
};
use serde_json::{Value, json};

use crate::{
    bridge::Clients,
    guest::GuestControl,
    wait::{self, PATIENCE},
};

/// The DIMM the scenario plugs: 512 MiB.
pub const DIMM_BYTES: u64 = 512 << 20;

/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// Named phase durations, printed at the end of a run.
#[derive(Debug, Default)]
pub struct Timings(pub Vec<(String, Duration)>);

impl Timings {
    /// Records a phase.
    pub fn record(&mut self, phase: &str, d: Duration) {
        eprintln!("e2e: {phase}: {:.2} s", d.as_secs_f64());
        self.0.push((phase.to_string(), d));
    }
}

/// The VM's blocks through gRPC.
pub async fn blocks(c: &Clients, vm: &str) -> anyhow::Result<Vec<MemoryBlock>> {
    let mut memory = c.memory.clone();
    let mut b = memory
        .get_memory_blocks(GetMemoryBlocksRequest { vm: vm.into() })
        .await
        .context("GetMemoryBlocks")?
        .into_inner()
        .blocks;
    b.sort_by_key(|b| b.phys_index);
    Ok(b)
}

/// Sets blocks through gRPC.
pub async fn set(
    c: &Clients,
    vm: &str,
    indices: &[u64],
    online: bool,
) -> anyhow::Result<Vec<MemoryBlockResult>> {
    let mut memory = c.memory.clone();
    let blocks = indices
        .iter()
        .map(|&phys_index| MemoryBlockChange { phys_index, online })
        .collect();
    Ok(memory
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: vm.into(),
            blocks,
        })
        .await
        .context("SetMemoryBlocks")?
        .into_inner()
        .results)
}

/// Polls `check` on the block list until it holds or `timeout` passes.
pub async fn wait_blocks(
    c: &Clients,
    vm: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[MemoryBlock]) -> bool,
) -> anyhow::Result<Vec<MemoryBlock>> {
    wait::until(what, timeout, || async {
        let b = blocks(c, vm).await?;
        anyhow::Ok(if check(&b) {
            ControlFlow::Break(b)
        } else {
            ControlFlow::Continue(format!("blocks {b:?}"))
        })
    })
    .await
}

/// Polls the guest's MemTotal until it equals `want` KiB.
pub async fn wait_mem_total(g: &GuestControl, want: u64, timeout: Duration) -> anyhow::Result<()> {
    wait::until(&format!("MemTotal {want} KiB"), timeout, || async {
        let now = g.mem_total_kib()?;
        anyhow::Ok(if now == want {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("MemTotal {now} KiB"))
        })
    })
    .await
}

/// How far the guest's MemTotal may be from the memory a balloon leaves it, KiB. Measured
/// on the test image (kernel 6.1 cloud), it moves by exactly the balloon's pages (256 MiB
/// in: 413,980 -> 151,836 kB); the slack is for a kernel that accounts a page otherwise.
pub const MEMTOTAL_SLACK_KIB: u64 = 1024;

/// Polls the guest's MemTotal until it is within [`MEMTOTAL_SLACK_KIB`] of `want` KiB;
/// the MemTotal seen then.
pub async fn wait_mem_total_near(
    g: &GuestControl,
    want: u64,
    timeout: Duration,
) -> anyhow::Result<u64> {
    wait::until(&format!("MemTotal near {want} KiB"), timeout, || async {
        let now = g.mem_total_kib()?;
        anyhow::Ok(if now.abs_diff(want) <= MEMTOTAL_SLACK_KIB {
            ControlFlow::Break(now)
        } else {
            ControlFlow::Continue(format!("MemTotal {now} KiB"))
        })
    })
    .await
}

/// The block size and the blocks (sorted), each read through gRPC and through JSON-RPC,
/// which must agree: the two front ends are one bridge. There must be blocks.
async fn block_info_and_blocks(c: &Clients, vm: &str) -> anyhow::Result<(u64, Vec<MemoryBlock>)> {
    let mut memory = c.memory.clone();
    let size = memory
        .get_memory_block_info(GetMemoryBlockInfoRequest { vm: vm.into() })
        .await
        .context("GetMemoryBlockInfo")?
        .into_inner()
        .size;
    let rpc_size = c
        .rpc("guest-get-memory-block-info", json!({"vm": vm}))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(
        rpc_size == json!({"size": size}),
        "gRPC and JSON-RPC disagree on block size"
    );
    let before = blocks(c, vm).await?;
    ensure!(!before.is_empty(), "no memory blocks listed");
    let mut rpc_blocks = c
        .rpc("guest-get-memory-blocks", json!({"vm": vm}))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if let Some(a) = rpc_blocks.as_array_mut() {
        a.sort_by_key(|b| b["phys-index"].as_u64());
    }
    let grpc_as_json: Vec<Value> = before
        .iter()
        .map(|b| json!({"phys-index": b.phys_index, "online": b.online, "can-offline": b.can_offline}))
        .collect();
    ensure!(
        rpc_blocks == Value::Array(grpc_as_json),
        "gRPC and JSON-RPC disagree on blocks"
    );
    Ok((size, before))
}

/// A DIMM the scenario hot-added by hand over QMP and onlined through the bridge.
#[derive(Debug, Clone)]
pub struct HandPlugged {
    /// Its QEMU id (its backend is `mem-<id>`).
    pub id: String,
    /// Its blocks in the guest.
    pub blocks: Vec<u64>,
    /// The guest's MemTotal before it, KiB.
    pub mem_before_kib: u64,
}

/// The first `dimmN` id (from 1) that QEMU has neither as a memory device nor as a memory
/// backend (`mem-dimmN`): a used stack may hold DIMMs already, the bridge's `qga-dimmN`
/// or one a failed run of the scenario left behind.
pub fn free_dimm_id(g: &GuestControl) -> anyhow::Result<String> {
    let devices: BTreeSet<String> = g
        .memory_devices()?
        .into_iter()
        .map(|d| d.id)
        .chain(g.virtio_mem_devices()?.into_iter().map(|(id, _)| id))
        .collect();
    let memdevs: BTreeSet<String> = g.memdev_ids()?.into_iter().collect();
    (1..1000)
        .map(|n| format!("dimm{n}"))
        .find(|id| !devices.contains(id) && !memdevs.contains(&format!("mem-{id}")))
        .context("no free DIMM id")
}

/// Hot-adds a DIMM (a free id), waits for its offline blocks, onlines them through gRPC
/// and checks MemTotal grew by the DIMM's size.
pub async fn hot_add_and_online(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<HandPlugged> {
    let (size, before) = block_info_and_blocks(c, vm).await?;
    let known: BTreeSet<u64> = before.iter().map(|b| b.phys_index).collect();
    let mem_before = g.mem_total_kib()?;
    let id = free_dimm_id(g)?;
    eprintln!(
        "e2e: {} blocks of {} MiB, MemTotal {mem_before} KiB; hot-adding DIMM {id}",
        before.len(),
        size >> 20
    );

    let start = Instant::now();
    let expected = usize::try_from(DIMM_BYTES / size)?;
    let new = hot_add_offline(c, vm, g, &id, &known, expected).await?;
    eprintln!("e2e: DIMM {id} appeared as offline blocks {new:?}");
    let results = set(c, vm, &new, true).await?;
    ensure!(
        results
            .iter()
            .all(|r| r.response() == MemoryBlockResponseType::Success),
        "onlining failed: {results:?}"
    );
    wait_mem_total(g, mem_before + DIMM_BYTES / 1024, PATIENCE).await?;
    t.record("hot-add to online (MemTotal +512 MiB)", start.elapsed());
    Ok(HandPlugged {
        id,
        blocks: new,
        mem_before_kib: mem_before,
    })
}

/// Hot-adds DIMM `id` over QMP and waits for `expected` new offline blocks (not in
/// `known`); returns them. The guest kernel's `auto_online_blocks` is `offline` meanwhile
/// — a stack the bridge has plugged memory into has it at `online_movable`, and the kernel
/// would online the DIMM itself — and is put back as found afterwards, failure or not.
async fn hot_add_offline(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    id: &str,
    known: &BTreeSet<u64>,
    expected: usize,
) -> anyhow::Result<Vec<u64>> {
    let found = g.auto_online()?;
    eprintln!("e2e: auto_online_blocks {found}: offline for the hot-add by hand");
    g.set_auto_online("offline")?;
    let appeared = async {
        g.hot_add_dimm(id, DIMM_BYTES)?;
        wait_blocks(c, vm, PATIENCE, "new offline blocks", |b| {
            b.iter()
                .filter(|x| !known.contains(&x.phys_index) && !x.online)
                .count()
                == expected
        })
        .await
    }
    .await;
    let put_back = g
        .set_auto_online(&found)
        .with_context(|| format!("putting auto_online_blocks back to {found}"));
    let after = appeared?;
    put_back?;
    Ok(after
        .iter()
        .filter(|b| !known.contains(&b.phys_index))
        .map(|b| b.phys_index)
        .collect())
}

/// The full cycle with an agent onlining as `online_movable`: hot-add, online, offline
/// (JSON-RPC), unplug, MemTotal back; then the kernel's refusal to offline boot memory.
pub async fn unplug_cycle(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let first = blocks(c, vm)
        .await?
        .first()
        .context("no boot block")?
        .phys_index;
    let added = hot_add_and_online(c, vm, g, t).await?;

    let start = Instant::now();
    let mem_blks: Vec<Value> = added
        .blocks
        .iter()
        .map(|i| json!({"phys-index": i, "online": false}))
        .collect();
    let off = c
        .rpc(
            "guest-set-memory-blocks",
            json!({"vm": vm, "mem-blks": mem_blks}),
        )
        .await
        .map_err(|e| anyhow::anyhow!("offline via JSON-RPC: {e:?}"))?;
    let all_ok = off
        .as_array()
        .is_some_and(|r| r.iter().all(|x| x["response"] == "success"));
    ensure!(all_ok, "offlining the DIMM's blocks failed: {off}");
    wait_mem_total(g, added.mem_before_kib, PATIENCE).await?;
    g.unplug_dimm(&added.id, PATIENCE)?;
    wait_blocks(c, vm, PATIENCE, "DIMM blocks gone", |b| {
        !b.iter().any(|x| added.blocks.contains(&x.phys_index))
    })
    .await?;
    wait_mem_total(g, added.mem_before_kib, PATIENCE).await?;
    t.record("offline to unplugged (MemTotal back)", start.elapsed());
    boot_memory_stays(c, vm, first).await
}

/// Boot memory cannot be given back: offlining boot block `first` fails with the
/// kernel's errno, and the block stays online.
async fn boot_memory_stays(c: &Clients, vm: &str, first: u64) -> anyhow::Result<()> {
    let refused = set(c, vm, &[first], false).await?;
    let r = refused.first().context("no result")?;
    eprintln!(
        "e2e: offlining boot block {first}: {:?} error_code {:?}",
        r.response(),
        r.error_code
    );
    ensure!(
        r.response() == MemoryBlockResponseType::OperationFailed
            && r.error_code.is_some_and(|e| e > 0),
        "offlining boot memory should fail with the kernel's errno: {r:?}"
    );
    ensure!(
        blocks(c, vm)
            .await?
            .iter()
            .any(|b| b.phys_index == first && b.online),
        "boot block must stay online"
    );
    Ok(())
}

/// Offlines `blocks` a few times; returns the last results (for kernels that refuse).
pub async fn try_offline(
    c: &Clients,
    vm: &str,
    indices: &[u64],
    tries: usize,
) -> anyhow::Result<Vec<MemoryBlockResult>> {
    let mut last = Vec::new();
    for _ in 0..tries {
        last = set(c, vm, indices, false).await?;
        if last
            .iter()
            .all(|r| r.response() == MemoryBlockResponseType::Success)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(last)
}

/// Polls `Ping` until it succeeds; returns how many calls failed first.
pub async fn ping_until_ok(c: &Clients, vm: &str, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut failed = 0;
    loop {
        let mut agent = c.agent.clone();
        let mut req = tonic::Request::new(PingRequest { vm: vm.into() });
        req.set_timeout(Duration::from_secs(5));
        match agent.ping(req).await {
            Ok(_) => return Ok(failed),
            Err(e) => {
                failed += 1;
                if Instant::now() > deadline {
                    bail!("bridge did not recover within {timeout:?}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a secured bridge refuses, each checked on both front ends where it applies: a
/// client without a certificate (`no_cert`), a read-only identity changing memory
/// (`reader`), and a browser-like request with a foreign `Origin` (`foreign_origin`, a
/// writer's certificate but an `Origin` header the bridge does not allow).
pub async fn security_checks(
    vm: &str,
    no_cert: &Clients,
    reader: &Clients,
    foreign_origin: &Clients,
) -> anyhow::Result<()> {
    let set = || SetMemoryBlocksRequest {
        vm: vm.into(),
        blocks: vec![MemoryBlockChange {
            phys_index: 0,
            online: true,
        }],
    };
    let refused = no_cert
        .agent
        .clone()
        .ping(PingRequest { vm: vm.into() })
        .await;
    ensure!(
        refused.is_err(),
        "gRPC without a client certificate was served"
    );
    let refused = no_cert.rpc("guest-ping", json!({"vm": vm})).await;
    ensure!(
        refused.is_err(),
        "JSON-RPC without a client certificate was served: {refused:?}"
    );

    reader
        .memory
        .clone()
        .get_memory_blocks(GetMemoryBlocksRequest { vm: vm.into() })
        .await
        .context("the read-only identity reads")?;
    let denied = reader.memory.clone().set_memory_blocks(set()).await;
    ensure!(
        denied
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
        "a read-only identity's set was not PERMISSION_DENIED: {denied:?}"
    );
    let denied = reader
        .rpc(
            "guest-set-memory-blocks",
            json!({"vm": vm, "mem-blks": [{"phys-index": 0, "online": true}]}),
        )
        .await;
    ensure!(
        matches!(denied, Err((-32010, _))),
        "a read-only identity's JSON-RPC set was not -32010: {denied:?}"
    );

    let refused = foreign_origin.rpc("guest-ping", json!({"vm": vm})).await;
    ensure!(
        matches!(&refused, Err((0, why)) if why.contains("403")),
        "a foreign Origin was served: {refused:?}"
    );
    Ok(())
}

/// A JSON-RPC call that must succeed.
pub async fn call(c: &Clients, method: &str, params: Value) -> anyhow::Result<Value> {
    c.rpc_full(method, params)
        .await
        .map_err(|e| anyhow!("{method}: {e}"))
}

/// The VM's memory layout through JSON-RPC (`memory-layout`).
pub async fn memory_layout(c: &Clients, vm: &str) -> anyhow::Result<Value> {
    call(c, "memory-layout", json!({ "vm": vm })).await
}

/// The DIMMs of a `memory-layout` answer.
pub fn layout_dimms(layout: &Value) -> &[Value] {
    layout["dimms"].as_array().map_or(&[], Vec::as_slice)
}

/// The states of a (JSON) DIMM's blocks, lowest block first.
pub fn block_states(dimm: &Value) -> Vec<&str> {
    dimm["blocks"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| b["state"].as_str().unwrap_or("?"))
                .collect()
        })
        .unwrap_or_default()
}

/// Prints the steps and warnings of a JSON-RPC hotplug answer.
pub fn print_steps(what: &str, reply: &Value) {
    for s in reply["steps"].as_array().into_iter().flatten() {
        eprintln!(
            "e2e: {what}: step {} {:.1} ms: {}",
            s["name"].as_str().unwrap_or("?"),
            s["duration-ms"].as_f64().unwrap_or_default(),
            s["detail"].as_str().unwrap_or_default()
        );
    }
    for w in reply["warnings"].as_array().into_iter().flatten() {
        eprintln!("e2e: {what}: warning: {w}");
    }
}

/// Prints the steps and warnings of a gRPC hotplug answer.
pub fn print_grpc_steps(what: &str, steps: &[Step], warnings: &[String]) {
    for s in steps {
        eprintln!(
            "e2e: {what}: step {} {:.1} ms: {}",
            s.name, s.duration_ms, s.detail
        );
    }
    for w in warnings {
        eprintln!("e2e: {what}: warning: {w}");
    }
}

/// The hotplug phase of the compose run, all through the bridge: `memory-plug` 512 MiB
/// (JSON-RPC), MemTotal +512 MiB, the layout shows the DIMM's blocks online (in
/// ZONE_MOVABLE when the agent reports zones), `Unplug` (gRPC), MemTotal back, the DIMM
/// and its memory backend gone. QMP (`g`) only to check QEMU's side.
pub async fn bridge_hotplug_cycle(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let mem_before = g.mem_total_kib()?;
    let before = memory_layout(c, vm).await?;
    let dimms_before = layout_dimms(&before).len();

    let start = Instant::now();
    let plugged = call(c, "memory-plug", json!({"vm": vm, "size": DIMM_BYTES})).await?;
    print_steps("memory-plug", &plugged);
    let (id, memdev) = plugged_dimm(&plugged)?;
    wait_mem_total(g, mem_before + DIMM_BYTES / 1024, PATIENCE).await?;
    t.record("memory-plug to usable (MemTotal +512 MiB)", start.elapsed());
    check_plugged_dimm(c, vm, g, &id, &memdev).await?;

    let start = Instant::now();
    let unplugged = c
        .hotplug
        .clone()
        .unplug(UnplugRequest {
            vm: vm.into(),
            dimm: id.clone(),
            request_id: None,
        })
        .await
        .context("Unplug")?
        .into_inner();
    print_grpc_steps("Unplug", &unplugged.steps, &[]);
    wait_mem_total(g, mem_before, PATIENCE).await?;
    t.record("Unplug to MemTotal back", start.elapsed());
    let after = memory_layout(c, vm).await?;
    ensure!(
        layout_dimms(&after).len() == dimms_before
            && !layout_dimms(&after).iter().any(|d| d["id"] == id.as_str()),
        "the DIMM {id} is still in the layout: {after}"
    );
    ensure!(
        !g.memdev_ids()?.contains(&memdev),
        "QEMU still has the DIMM's backend {memdev} (object-del not done)"
    );
    Ok(())
}

/// The id and memory backend of the DIMM a `memory-plug` answer plugged.
fn plugged_dimm(plugged: &Value) -> anyhow::Result<(String, String)> {
    let id = plugged["dimm"]["id"]
        .as_str()
        .with_context(|| format!("memory-plug answered no DIMM id: {plugged}"))?
        .to_string();
    let memdev = plugged["dimm"]["memdev"]
        .as_str()
        .with_context(|| format!("memory-plug answered no memdev: {plugged}"))?
        .to_string();
    Ok((id, memdev))
}

/// A plugged DIMM as the bridge and QEMU show it: in the layout with all its blocks
/// online (and in ZONE_MOVABLE when the agent reports zones), its backend `memdev` in
/// QEMU.
async fn check_plugged_dimm(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    id: &str,
    memdev: &str,
) -> anyhow::Result<()> {
    let layout = grpc_layout(c, vm).await?;
    let dimm = layout
        .dimms
        .iter()
        .find(|d| d.id == id)
        .with_context(|| format!("the layout lacks the plugged DIMM {id}: {layout:?}"))?;
    ensure!(
        dimm.blocks.len() as u64 == DIMM_BYTES / layout.block_size.max(1)
            && dimm.blocks.iter().all(|b| b.state() == BlockState::Online),
        "the DIMM's blocks are not all online: {dimm:?}"
    );
    if layout.zones_known {
        ensure!(
            dimm.blocks.iter().all(|b| b.valid_zones == ["Movable"])
                && dimm.removable == Some(true),
            "the DIMM is not all in ZONE_MOVABLE: {dimm:?}"
        );
    }
    ensure!(
        g.memdev_ids()?.iter().any(|m| m == memdev),
        "QEMU does not list the DIMM's backend {memdev}"
    );
    Ok(())
}

/// The VM's memory layout over gRPC (`GetLayout`).
pub async fn grpc_layout(c: &Clients, vm: &str) -> anyhow::Result<MemoryLayout> {
    Ok(c.hotplug
        .clone()
        .get_layout(GetLayoutRequest { vm: vm.into() })
        .await
        .context("GetLayout")?
        .into_inner())
}

/// The compose guest's virtio-mem device: `Resize` by 1 GiB and back, from whatever it
/// holds (a used stack's device may hold memory already), checked in the reply, the
/// layout, QEMU and the guest's MemTotal.
pub async fn virtio_mem_cycle(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let mem_before = g.mem_total_kib()?;
    let layout = grpc_layout(c, vm).await?;
    let device = virtio_mem_with_room(&layout)?;
    let held = device.plugged_size;
    let base = layout.boot_bytes + layout.plugged_bytes;
    let start = Instant::now();
    let up = resize(c, vm, base + GIB, "Resize +1 GiB with virtio-mem").await?;
    print_grpc_steps("Resize (virtio-mem)", &up.steps, &up.warnings);
    ensure!(
        up.to_bytes == base + GIB
            && up.plugged.is_empty()
            && up.virtio_mem.len() == 1
            && up.virtio_mem[0].id == device.id
            && up.virtio_mem[0].to_bytes == held + GIB,
        "Resize +1 GiB did not go to the virtio-mem device {}: {up:?}",
        device.id
    );
    wait_mem_total(g, mem_before + GIB / 1024, PATIENCE).await?;
    t.record("virtio-mem Resize +1 GiB to usable", start.elapsed());
    check_virtio_mem_grown(c, vm, g, &device.id, held + GIB).await?;
    let start = Instant::now();
    let down = resize(c, vm, base, "Resize back with virtio-mem").await?;
    print_grpc_steps("Resize back (virtio-mem)", &down.steps, &down.warnings);
    wait_mem_total(g, mem_before, PATIENCE).await?;
    t.record("virtio-mem Resize back to MemTotal back", start.elapsed());
    let (requested, size) = g.virtio_mem_sizes(&device.id)?;
    ensure!(
        requested == held && size == held,
        "QEMU's {} after the shrink: requested-size {requested}, size {size}, not {held}",
        device.id
    );
    Ok(())
}

/// The layout's first virtio-mem device (the one a resize fills first), which must have
/// room for 1 GiB more.
fn virtio_mem_with_room(layout: &MemoryLayout) -> anyhow::Result<VirtioMem> {
    let device = layout
        .virtio_mem
        .first()
        .with_context(|| format!("the layout lists no virtio-mem device: {layout:?}"))?
        .clone();
    ensure!(
        device.plugged_size + GIB <= device.max_size,
        "virtio-mem device {} has no room for 1 GiB more: {device:?}",
        device.id
    );
    eprintln!(
        "e2e: virtio-mem device {} holds {} MiB",
        device.id,
        device.plugged_size >> 20
    );
    Ok(device)
}

/// `Resize` over gRPC to `size` bytes in all; `what` names the call in its error.
async fn resize(
    c: &Clients,
    vm: &str,
    size: u64,
    what: &'static str,
) -> anyhow::Result<ResizeResponse> {
    Ok(c.hotplug
        .clone()
        .resize(ResizeRequest {
            vm: vm.into(),
            size,
            request_id: None,
        })
        .await
        .context(what)?
        .into_inner())
}

/// The virtio-mem device `id` after growing to `want` bytes: QEMU's requested and actual
/// size are `want`, and the layout has it plugged with all its blocks online.
async fn check_virtio_mem_grown(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    id: &str,
    want: u64,
) -> anyhow::Result<()> {
    let (requested, size) = g.virtio_mem_sizes(id)?;
    ensure!(
        requested == want && size == want,
        "QEMU's {id}: requested-size {requested}, size {size}, not {want}"
    );
    let layout = grpc_layout(c, vm).await?;
    let grown = layout
        .virtio_mem
        .iter()
        .find(|v| v.id == id)
        .with_context(|| format!("{id} gone from the layout"))?;
    ensure!(
        grown.plugged_size == want
            && !grown.blocks.is_empty()
            && grown.blocks.iter().all(|b| b.state() == BlockState::Online),
        "the guest's blocks of {id} are not all online: {grown:?}"
    );
    Ok(())
}

/// A read-only identity may read the layout but not plug: PERMISSION_DENIED on gRPC,
/// -32010 on JSON-RPC, and nothing plugged.
pub async fn hotplug_denied(reader: &Clients, vm: &str) -> anyhow::Result<()> {
    let before = memory_layout(reader, vm)
        .await
        .context("the read-only identity reads the layout")?;
    let denied = reader
        .rpc("memory-plug", json!({"vm": vm, "size": DIMM_BYTES}))
        .await;
    ensure!(
        matches!(denied, Err((-32010, _))),
        "a read-only identity's memory-plug was not -32010: {denied:?}"
    );
    let denied = reader
        .hotplug
        .clone()
        .plug(PlugRequest {
            vm: vm.into(),
            size: DIMM_BYTES,
            node: None,
            online_type: OnlineType::Unspecified as i32,
            request_id: None,
        })
        .await;
    ensure!(
        denied
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
        "a read-only identity's Plug was not PERMISSION_DENIED: {denied:?}"
    );
    let after = memory_layout(reader, vm).await?;
    ensure!(
        layout_dimms(&after).len() == layout_dimms(&before).len()
            && after["plugged-bytes"] == before["plugged-bytes"],
        "a refused plug changed the layout: before {before}, after {after}"
    );
    Ok(())
}

/// What the balloon step moves: 128 MiB.
const BALLOON_STEP: u64 = 128 << 20;

/// The compose guest's balloon: `memory-stats` has its part, with QEMU's actual; then
/// `memory-balloon` 128 MiB below what the guest may use now (a used stack's balloon may
/// hold memory already) and back, checked in the replies, QEMU's actual and the guest's
/// MemTotal.
pub async fn balloon_cycle(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let found_actual = balloon_in_memory_stats(c, vm, g).await?;
    let layout = memory_layout(c, vm).await?;
    let usable = layout["balloon"]["usable-bytes"]
        .as_u64()
        .with_context(|| format!("the layout shows no balloon: {layout}"))?;
    let mem_before = g.mem_total_kib()?;
    eprintln!(
        "e2e: balloon {}: QEMU's actual {} MiB, the guest may use {} MiB",
        layout["balloon"]["id"],
        found_actual >> 20,
        usable >> 20
    );
    let down = usable
        .checked_sub(BALLOON_STEP)
        .with_context(|| format!("the guest may use less than 128 MiB: {layout}"))?;
    let start = Instant::now();
    balloon_to(c, vm, down).await?;
    ensure!(
        g.balloon_actual()? == found_actual - BALLOON_STEP,
        "QEMU's actual is not 128 MiB below {found_actual} once memory-balloon answered"
    );
    wait_mem_total_near(g, mem_before - BALLOON_STEP / 1024, PATIENCE).await?;
    t.record("memory-balloon -128 MiB to MemTotal down", start.elapsed());
    let start = Instant::now();
    balloon_to(c, vm, usable).await?;
    ensure!(
        g.balloon_actual()? == found_actual,
        "QEMU's actual is not back at {found_actual} once memory-balloon answered"
    );
    wait_mem_total_near(g, mem_before, PATIENCE).await?;
    t.record("memory-balloon back to MemTotal back", start.elapsed());
    Ok(())
}

/// `memory-stats` has the balloon part, with QEMU's actual (returned) and what it holds.
async fn balloon_in_memory_stats(c: &Clients, vm: &str, g: &GuestControl) -> anyhow::Result<u64> {
    let stats = call(c, "memory-stats", json!({ "vm": vm })).await?;
    let actual = g.balloon_actual()?;
    let part = &stats["balloon"];
    ensure!(
        part["actual-bytes"] == actual && part["held-bytes"].is_u64(),
        "memory-stats has no balloon part with QEMU's actual {actual}: {stats}"
    );
    Ok(actual)
}

/// `memory-balloon` to `target` bytes, which the reply must say the guest has now.
async fn balloon_to(c: &Clients, vm: &str, target: u64) -> anyhow::Result<Value> {
    let r = call(c, "memory-balloon", json!({"vm": vm, "target": target})).await?;
    print_steps("memory-balloon", &r);
    ensure!(
        r["balloon"]["to-bytes"] == target && r["balloon"]["target-bytes"] == target,
        "memory-balloon to {target} answered another size: {r}"
    );
    Ok(r)
}

/// What the scenario leaves as it found it, so that it runs again on the same stack: QEMU's
/// DIMMs (id, bytes), virtio-mem devices (id, requested size and size) and balloon
/// (`actual`), the guest kernel's `auto_online_blocks` and MemTotal (KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// QEMU's DIMMs: id and bytes.
    pub dimms: Vec<(String, u64)>,
    /// QEMU's virtio-mem devices: id, requested size and size.
    pub virtio_mem: Vec<(String, (u64, u64))>,
    /// QEMU's balloon `actual`, bytes.
    pub balloon_actual: u64,
    /// The guest kernel's `auto_online_blocks`.
    pub auto_online: String,
    /// The guest's MemTotal, KiB.
    pub mem_total_kib: u64,
}

impl Found {
    /// The stack as it is now, from QEMU and the guest's control port.
    pub fn read(g: &GuestControl) -> anyhow::Result<Self> {
        Ok(Self {
            dimms: g
                .memory_devices()?
                .into_iter()
                .map(|d| (d.id, d.size))
                .collect(),
            virtio_mem: g.virtio_mem_devices()?,
            balloon_actual: g.balloon_actual()?,
            auto_online: g.auto_online()?,
            mem_total_kib: g.mem_total_kib()?,
        })
    }

    /// Puts the guest kernel's `auto_online_blocks` back as found — the bridge's own plugs
    /// and resizes leave it at `online_movable` (its `hotplug.auto_online`) — then checks
    /// that QEMU and the guest are as found, and that the bridge's layout reports the same
    /// `auto_online_blocks` where the agent reports it.
    pub async fn put_back_and_check(
        &self,
        c: &Clients,
        vm: &str,
        g: &GuestControl,
    ) -> anyhow::Result<()> {
        g.set_auto_online(&self.auto_online)?;
        let now = Self::read(g)?;
        ensure!(
            now == *self,
            "the scenario did not leave the stack as it found it: found {self:?}, left {now:?}"
        );
        let layout = grpc_layout(c, vm).await?;
        if let Some(reported) = &layout.auto_online_blocks {
            ensure!(
                *reported == self.auto_online,
                "the bridge's layout reports auto_online_blocks {reported}, the guest {}",
                self.auto_online
            );
        }
        Ok(())
    }
}
