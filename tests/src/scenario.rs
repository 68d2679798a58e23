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

/// Hot-adds the DIMM, waits for its offline blocks, onlines them through gRPC and checks
/// MemTotal grew by the DIMM's size. Returns the new blocks and MemTotal before.
pub async fn hot_add_and_online(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<(Vec<u64>, u64)> {
    let (size, before) = block_info_and_blocks(c, vm).await?;
    let known: BTreeSet<u64> = before.iter().map(|b| b.phys_index).collect();
    let mem_before = g.mem_total_kib()?;
    eprintln!(
        "e2e: {} blocks of {} MiB, MemTotal {mem_before} KiB",
        before.len(),
        size >> 20
    );

    let start = Instant::now();
    g.hot_add_dimm("dimm1", DIMM_BYTES)?;
    let expected = usize::try_from(DIMM_BYTES / size)?;
    let after = wait_blocks(c, vm, PATIENCE, "new offline blocks", |b| {
        b.iter()
            .filter(|x| !known.contains(&x.phys_index) && !x.online)
            .count()
            == expected
    })
    .await?;
    let new: Vec<u64> = after
        .iter()
        .filter(|b| !known.contains(&b.phys_index))
        .map(|b| b.phys_index)
        .collect();
    eprintln!("e2e: DIMM appeared as offline blocks {new:?}");
    let results = set(c, vm, &new, true).await?;
    ensure!(
        results
            .iter()
            .all(|r| r.response() == MemoryBlockResponseType::Success),
        "onlining failed: {results:?}"
    );
    wait_mem_total(g, mem_before + DIMM_BYTES / 1024, PATIENCE).await?;
    t.record("hot-add to online (MemTotal +512 MiB)", start.elapsed());
    Ok((new, mem_before))
}

/// The full cycle with an agent onlining as `online_movable`: hot-add, online, offline
/// (JSON-RPC), unplug, MemTotal back; then the kernel's refusal to offline boot memory.
pub async fn unplug_cycle(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let boot: Vec<u64> = blocks(c, vm).await?.iter().map(|b| b.phys_index).collect();
    let (new, mem_before) = hot_add_and_online(c, vm, g, t).await?;

    let start = Instant::now();
    let mem_blks: Vec<Value> = new
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
    wait_mem_total(g, mem_before, PATIENCE).await?;
    g.unplug_dimm("dimm1", PATIENCE)?;
    wait_blocks(c, vm, PATIENCE, "DIMM blocks gone", |b| {
        !b.iter().any(|x| new.contains(&x.phys_index))
    })
    .await?;
    wait_mem_total(g, mem_before, PATIENCE).await?;
    t.record("offline to unplugged (MemTotal back)", start.elapsed());

    // Boot memory cannot be given back: the kernel's errno comes back per block.
    let first = *boot.first().context("no boot block")?;
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

/// The compose guest's virtio-mem device: `Resize` by 1 GiB and back, checked in the
/// reply, the layout, QEMU and the guest's MemTotal.
pub async fn virtio_mem_cycle(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let mem_before = g.mem_total_kib()?;
    let layout = grpc_layout(c, vm).await?;
    let device = empty_virtio_mem(&layout)?;
    let base = layout.boot_bytes + layout.plugged_bytes;
    let start = Instant::now();
    let up = resize(c, vm, base + GIB, "Resize +1 GiB with virtio-mem").await?;
    print_grpc_steps("Resize (virtio-mem)", &up.steps, &up.warnings);
    ensure!(
        up.to_bytes == base + GIB
            && up.plugged.is_empty()
            && up.virtio_mem.len() == 1
            && up.virtio_mem[0].to_bytes == GIB,
        "Resize +1 GiB did not go to the virtio-mem device: {up:?}"
    );
    wait_mem_total(g, mem_before + GIB / 1024, PATIENCE).await?;
    t.record("virtio-mem Resize +1 GiB to usable", start.elapsed());
    check_virtio_mem_grown(c, vm, g, &device.id).await?;
    let start = Instant::now();
    let down = resize(c, vm, base, "Resize back with virtio-mem").await?;
    print_grpc_steps("Resize back (virtio-mem)", &down.steps, &down.warnings);
    wait_mem_total(g, mem_before, PATIENCE).await?;
    t.record("virtio-mem Resize back to MemTotal back", start.elapsed());
    let (requested, size) = g.virtio_mem_sizes(&device.id)?;
    ensure!(
        requested == 0 && size == 0,
        "QEMU's {} after the shrink: requested-size {requested}, size {size}",
        device.id
    );
    Ok(())
}

/// The layout's first virtio-mem device, which must have nothing plugged yet.
fn empty_virtio_mem(layout: &MemoryLayout) -> anyhow::Result<VirtioMem> {
    let device = layout
        .virtio_mem
        .first()
        .with_context(|| format!("the layout lists no virtio-mem device: {layout:?}"))?
        .clone();
    ensure!(
        device.plugged_size == 0,
        "virtio-mem device {} has memory plugged already: {device:?}",
        device.id
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

/// The virtio-mem device `id` after growing by 1 GiB: QEMU's requested and actual size
/// are 1 GiB, and the layout has it plugged with all its blocks online.
async fn check_virtio_mem_grown(
    c: &Clients,
    vm: &str,
    g: &GuestControl,
    id: &str,
) -> anyhow::Result<()> {
    let (requested, size) = g.virtio_mem_sizes(id)?;
    ensure!(
        requested == GIB && size == GIB,
        "QEMU's {id}: requested-size {requested}, size {size}"
    );
    let layout = grpc_layout(c, vm).await?;
    let grown = layout
        .virtio_mem
        .iter()
        .find(|v| v.id == id)
        .with_context(|| format!("{id} gone from the layout"))?;
    ensure!(
        grown.plugged_size == GIB
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
