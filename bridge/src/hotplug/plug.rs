//! Plug: add DIMMs (QMP: `object-add`, `device_add`; libvirt: one live attach each), then
//! have the guest online their blocks as they appear — one agent call with our agent's
//! `__org.qga-bridge_online-when-present`, polling the block list otherwise — and verify;
//! on any failure, take out what was added.

use std::{ops::Range, time::Duration};

use qga_wire::{
    backoff::Backoff,
    schema::{
        GuestMemoryBlockResponse, GuestMemoryBlockResponseType, GuestMemoryOnlineType,
        GuestOnlineWhenPresentArgs,
    },
};
use serde::Serialize;
use tokio::time::Instant;

use super::{
    ctx::{Capabilities, Ctx, describe, undo_budget, with_undo},
    layout::{self, BlockState, Dimm},
    policy,
    unplug::{eject, offline_all, still_plugged},
};
use crate::{
    backend::{Added, BackendError, Deleted, DimmDevice, NewDimm, NotAdded},
    call::{Call, Reply},
    error::BridgeError,
};

/// What `plug` was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlugArgs {
    /// Bytes.
    pub size: u64,
    /// NUMA node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    /// How to online (`None`: `online_movable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online_type: Option<GuestMemoryOnlineType>,
}

/// Plugs a DIMM of `args.size` and onlines its blocks; undoes everything on failure.
pub async fn plug(ctx: &mut Ctx, args: &PlugArgs) -> Result<Dimm, BridgeError> {
    let mut dimms = plug_dimms(ctx, &[args.size], args.node, args.online_type).await?;
    dimms
        .pop()
        .ok_or_else(|| ctx.hotplug_error("verify", "no DIMM was plugged".into()))
}

/// How new DIMMs' blocks are onlined.
#[derive(Debug, Clone, Copy)]
struct Onlining {
    block_size: u64,
    /// `None`: as the agent is configured.
    online_type: Option<GuestMemoryOnlineType>,
    caps: Capabilities,
}

/// Plugs one DIMM per entry of `sizes`: every DIMM is added first, then all their blocks
/// are waited for and onlined at once, so the guest brings them up in parallel. On any
/// failure every DIMM added here is taken out again.
pub(super) async fn plug_dimms(
    ctx: &mut Ctx,
    sizes: &[u64],
    node: Option<u32>,
    asked: Option<GuestMemoryOnlineType>,
) -> Result<Vec<Dimm>, BridgeError> {
    let block_size = ctx.block_size().await?;
    if let Some(size) = sizes
        .iter()
        .find(|&&s| s == 0 || !s.is_multiple_of(block_size))
    {
        return Err(BridgeError::InvalidRequest(format!(
            "size {size} is not a positive multiple of the guest's block size ({block_size} bytes)"
        )));
    }
    let caps = ctx.capabilities().await?;
    let how = Onlining {
        block_size,
        online_type: online_type(ctx, asked, caps)?,
        caps,
    };
    let devices = ctx.dimms().await?;
    check_room(ctx, &devices, sizes).await?;
    // Best effort here: the plug does not need them gone.
    for (orphan, e) in remove_orphans(ctx, &devices).await? {
        tracing::warn!(vm = %ctx.vm, backend = %orphan, error = %e, "cannot delete an unused backend");
    }
    let restore = policy::prepare(ctx, caps, how.online_type).await?;
    let mut added = Vec::new();
    let result = match add_all(ctx, devices, sizes, node, &mut added).await {
        Ok(()) => online_new(ctx, &added, how).await,
        Err(e) => Err(e),
    };
    policy::restore(ctx, restore).await;
    match result {
        Ok(dimms) => Ok(dimms),
        Err(e) if added.is_empty() => Err(e),
        Err(e) => {
            let undo = undo_all(ctx, &added, block_size).await;
            Err(with_undo(e, undo))
        }
    }
}

/// The online type to ask the agent for: `asked` (default movable) where the agent can
/// choose the zone; otherwise none, with a warning, or a refusal when one was asked for.
fn online_type(
    ctx: &mut Ctx,
    asked: Option<GuestMemoryOnlineType>,
    caps: Capabilities,
) -> Result<Option<GuestMemoryOnlineType>, BridgeError> {
    match (asked, caps.online_type) {
        (t, true) => Ok(Some(t.unwrap_or(GuestMemoryOnlineType::OnlineMovable))),
        (None, false) => {
            ctx.warnings.push(
                "the agent cannot choose the zone (it does not offer \
                 __org.qga-bridge_set-memory-blocks): it onlines the DIMM as it is configured \
                 to; qemu-ga writes plain 'online', which usually leaves the DIMM impossible \
                 to unplug"
                    .into(),
            );
            Ok(None)
        }
        (Some(t), false) => Err(ctx.hotplug_error(
            "check",
            format!(
                "online type '{}' was asked for, but the agent cannot choose the zone \
                 (it does not offer __org.qga-bridge_set-memory-blocks); nothing was done",
                t.as_str()
            ),
        )),
    }
}

/// Adds a DIMM per size, one after another (the hypervisor takes one at a time), into
/// `added` as `(dimm, memdev)` ids — including one whose outcome is unknown, so that
/// undoing covers it.
async fn add_all(
    ctx: &mut Ctx,
    mut devices: Vec<DimmDevice>,
    sizes: &[u64],
    node: Option<u32>,
    added: &mut Vec<(String, String)>,
) -> Result<(), BridgeError> {
    for &size in sizes {
        let new = NewDimm {
            dimms: &devices,
            size,
            node,
            until: ctx.deadline,
        };
        match ctx.backend.add_dimm(new, &mut ctx.steps).await {
            Ok(Added { dimm, memdev }) => {
                // The next DIMM's ids must not be these: reserved here rather than asked
                // of the hypervisor again, so the DIMMs go in back to back and the guest
                // takes them in as few ACPI scans as it can.
                devices.push(DimmDevice {
                    id: dimm.clone(),
                    memdev: memdev.clone(),
                    size,
                    addr: 0,
                    node: node.unwrap_or_default(),
                    slot: u32::MAX,
                    hotplugged: true,
                    hotpluggable: true,
                });
                added.push((dimm, memdev));
            }
            Err(NotAdded::Refused(e)) => return Err(ctx.backend_error(e)),
            Err(NotAdded::Unknown {
                error,
                dimm,
                memdev,
            }) => {
                added.push((dimm, memdev));
                return Err(ctx.backend_error(error));
            }
        }
    }
    Ok(())
}

/// Takes out, newest first, every DIMM of `added`.
async fn undo_all(
    ctx: &mut Ctx,
    added: &[(String, String)],
    block_size: u64,
) -> Result<(), String> {
    let mut failed = Vec::new();
    for (dimm, memdev) in added.iter().rev() {
        if let Err(why) = undo_plug(ctx, dimm, memdev, block_size).await {
            failed.push(format!("{dimm}: {why}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Refuses DIMMs of `sizes` that the VM has no slots or no room (maximum memory) for,
/// where the hypervisor tells its limits.
async fn check_room(ctx: &Ctx, dimms: &[DimmDevice], sizes: &[u64]) -> Result<(), BridgeError> {
    let limits = ctx.backend.room(ctx.deadline).await;
    let Some(limits) = limits.map_err(|e| ctx.backend_error(e))? else {
        return Ok(());
    };
    let slots = limits.slots;
    let free = slots.saturating_sub(dimms.len() as u64);
    if (sizes.len() as u64) > free {
        let why = if free == 0 {
            format!("all {slots} DIMM slots are taken")
        } else {
            format!(
                "{} DIMMs are needed but only {free} of the {slots} DIMM slots are free",
                sizes.len()
            )
        };
        return Err(ctx.hotplug_error(
            "check",
            format!("{why} (QEMU -m ...,slots=N; libvirt <maxMemory slots='N'>); nothing was done"),
        ));
    }
    if let (Some(max), Some(boot)) = (limits.max, limits.boot) {
        let plugged: u64 = dimms.iter().map(|d| d.size).sum();
        let size: u64 = sizes.iter().sum();
        if boot + plugged + size > max {
            return Err(ctx.hotplug_error(
                "check",
                format!(
                    "{size} more bytes would take the VM past its maximum memory ({max} \
                     bytes; it has {} now); nothing was done",
                    boot + plugged
                ),
            ));
        }
    }
    Ok(())
}

/// Deletes memory backends this bridge made that no DIMM uses (left by a DIMM the guest
/// ejected after its unplug had given up, or by an operation a killed bridge left); the
/// ones that could not be deleted, and why.
pub(super) async fn remove_orphans(
    ctx: &mut Ctx,
    devices: &[DimmDevice],
) -> Result<Vec<(String, BackendError)>, BridgeError> {
    let orphans = ctx.backend.unused_backends(devices, ctx.deadline).await;
    let mut failed = Vec::new();
    for orphan in orphans.map_err(|e| ctx.backend_error(e))? {
        let start = Instant::now();
        match ctx.backend.delete_backend(&orphan, ctx.deadline).await {
            Ok(Deleted::Yes) => ctx.step(
                "object-del",
                start,
                format!("{orphan}, left by an earlier unplug"),
            ),
            Ok(Deleted::Absent | Deleted::NotOurs) => {}
            Err(e) => failed.push((orphan, e)),
        }
    }
    Ok(failed)
}

/// Waits for the new DIMMs' blocks and onlines them: in one agent call per run of
/// adjacent blocks where the agent onlines them as they appear, otherwise by polling the
/// block list until all are there and then onlining them; then checks every block is
/// online, and in ZONE_MOVABLE when that was asked.
async fn online_new(
    ctx: &mut Ctx,
    added: &[(String, String)],
    how: Onlining,
) -> Result<Vec<Dimm>, BridgeError> {
    let listed = ctx.dimms().await?;
    let mut devices = Vec::with_capacity(added.len());
    for (id, _) in added {
        let device = listed.iter().find(|d| &d.id == id).cloned();
        devices.push(device.ok_or_else(|| {
            ctx.hotplug_error(
                "device_add",
                format!("QEMU does not list the new DIMM {id}"),
            )
        })?);
    }
    let runs = runs(&devices, how.block_size);
    if how.caps.online_when_present {
        online_on_arrival(ctx, &runs, how.online_type).await?;
    } else {
        wait_blocks(ctx, &runs).await?;
        online_listed(ctx, &runs, how).await?;
    }
    verify(ctx, &devices, how).await
}

/// The DIMMs' block ranges, adjacent ones joined, in address order.
fn runs(devices: &[DimmDevice], block_size: u64) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = devices.iter().map(|d| d.block_range(block_size)).collect();
    ranges.sort_by_key(|r| r.start);
    let mut runs: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        }
    }
    runs
}

/// Has the agent wait for each run's blocks and online each as it appears
/// (`__org.qga-bridge_online-when-present`), within `hotplug.appear_timeout_ms`.
async fn online_on_arrival(
    ctx: &mut Ctx,
    runs: &[Range<u64>],
    online_type: Option<GuestMemoryOnlineType>,
) -> Result<(), BridgeError> {
    let start = Instant::now();
    let until = ctx.phase(ctx.settings.appear_timeout_ms);
    let step = ctx.max_set_entries.max(1) as u64;
    let (mut missing, mut refused, mut total) = (Vec::new(), Vec::new(), 0);
    for run in runs {
        let mut first = run.start;
        while first < run.end {
            let count = step.min(run.end - first);
            let left = until.saturating_duration_since(Instant::now()).as_millis();
            let call = Call::OnlineWhenPresent(GuestOnlineWhenPresentArgs {
                first,
                count,
                online_type,
                timeout_ms: u64::try_from(left)
                    .unwrap_or(u64::MAX)
                    .min(MAX_AGENT_WAIT_MS),
            });
            if let Reply::SetMemoryBlocks(results) = ctx.agent(call).await? {
                for r in results {
                    match r.response {
                        GuestMemoryBlockResponseType::Success => {}
                        GuestMemoryBlockResponseType::NotFound => missing.push(r.phys_index),
                        _ => refused.push(r),
                    }
                }
            }
            total += count;
            first += count;
        }
    }
    let ms = start.elapsed().as_millis();
    if !missing.is_empty() {
        return Err(ctx.hotplug_error(
            "wait-blocks",
            format!(
                "{} of the {total} new blocks ({}) did not appear in the guest within {ms} ms",
                missing.len(),
                list(&missing)
            ),
        ));
    }
    if !refused.is_empty() {
        return Err(online_refused(ctx, refused));
    }
    let how = online_type.map_or("as the agent is configured", |t| t.as_str());
    ctx.step(
        "online",
        start,
        format!("{total} blocks, each as it appeared, {how}"),
    );
    Ok(())
}

/// Longest wait one `__org.qga-bridge_online-when-present` call may ask of our agent.
const MAX_AGENT_WAIT_MS: u64 = 300_000;

/// Block numbers for a person: `32-47, 64`.
fn list(indices: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            indices[i].to_string()
        } else {
            format!("{}-{}", indices[i], indices[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// The error for blocks the guest would not online.
fn online_refused(ctx: &Ctx, failures: Vec<GuestMemoryBlockResponse>) -> BridgeError {
    let reason = failures.iter().map(describe).collect::<Vec<_>>().join("; ");
    BridgeError::Hotplug {
        vm: ctx.vm.clone(),
        step: "online".into(),
        reason: format!("the guest could not online the DIMM: {reason}"),
        blocks: failures,
    }
}

/// Waits until the guest lists every block of `runs`, within `hotplug.appear_timeout_ms`.
/// The guest sees a DIMM a few hundred milliseconds after it is added: the block list (one
/// cheap agent call) is polled often.
async fn wait_blocks(ctx: &mut Ctx, runs: &[Range<u64>]) -> Result<(), BridgeError> {
    let start = Instant::now();
    let until = ctx.phase(ctx.settings.appear_timeout_ms);
    let all: usize = runs.iter().map(|r| r.clone().count()).sum();
    let mut pause = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
    loop {
        let view = ctx.blocks().await?;
        let absent: Vec<u64> = runs
            .iter()
            .flat_map(|r| r.clone())
            .filter(|&i| view.block(i).state == BlockState::Absent)
            .collect();
        if absent.is_empty() {
            let blocks: Vec<String> = runs
                .iter()
                .map(|r| format!("{}-{}", r.start, r.end.saturating_sub(1)))
                .collect();
            ctx.step(
                "wait-blocks",
                start,
                format!("blocks {}", blocks.join(", ")),
            );
            return Ok(());
        }
        if Instant::now() + pause.peek() > until {
            let ms = start.elapsed().as_millis();
            return Err(ctx.hotplug_error(
                "wait-blocks",
                format!(
                    "{} of the {all} new blocks appeared in the guest within {ms} ms ({} did not)",
                    all - absent.len(),
                    list(&absent)
                ),
            ));
        }
        tokio::time::sleep(pause.next_wait()).await;
    }
}

/// Onlines the blocks of `runs` that the guest lists offline.
async fn online_listed(
    ctx: &mut Ctx,
    runs: &[Range<u64>],
    how: Onlining,
) -> Result<(), BridgeError> {
    let view = ctx.guest(how.caps).await?;
    let offline: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.clone())
        .filter(|&i| view.block(i).state == BlockState::Offline)
        .collect();
    let start = Instant::now();
    let failures = ctx.set(&offline, true, how.online_type).await?;
    if !failures.is_empty() {
        return Err(online_refused(ctx, failures));
    }
    let word = how
        .online_type
        .map_or("as the agent is configured", |t| t.as_str());
    ctx.step("online", start, format!("{} blocks, {word}", offline.len()));
    Ok(())
}

/// The new DIMMs as the guest shows them now, each block online; a block online outside
/// ZONE_MOVABLE when movable was asked for (the guest kernel onlined it itself) is a
/// warning: that DIMM will not come out.
async fn verify(
    ctx: &mut Ctx,
    devices: &[DimmDevice],
    how: Onlining,
) -> Result<Vec<Dimm>, BridgeError> {
    let view = ctx.guest(how.caps).await?;
    let mut dimms = Vec::with_capacity(devices.len());
    for device in devices {
        let dimm = layout::dimm(device, how.block_size, &view);
        if let Some(b) = dimm.blocks.iter().find(|b| b.state != BlockState::Online) {
            return Err(ctx.hotplug_error(
                "verify",
                format!("block {} is {:?} after onlining", b.phys_index, b.state),
            ));
        }
        if how.online_type == Some(GuestMemoryOnlineType::OnlineMovable) {
            for b in dimm.blocks.iter().filter(|b| b.movable() == Some(false)) {
                ctx.warnings.push(format!(
                    "block {} is online in zone {}, not Movable (the guest kernel onlined \
                     it itself: auto_online_blocks): DIMM {} will not come out",
                    b.phys_index,
                    b.valid_zones.join(" "),
                    device.id
                ));
            }
        }
        dimms.push(dimm);
    }
    Ok(dimms)
}

/// Takes a half-plugged DIMM out again, on a budget of its own: the operation's deadline
/// may be what failed it.
async fn undo_plug(
    ctx: &mut Ctx,
    dimm_id: &str,
    mem_id: &str,
    block_size: u64,
) -> Result<(), String> {
    ctx.deadline = Instant::now() + undo_budget(&ctx.settings);
    let device = ctx
        .dimms()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|d| d.id == dimm_id);
    if let Some(device) = device {
        let caps = ctx.capabilities().await.unwrap_or_default();
        let view = ctx.guest(caps).await.map_err(|e| e.to_string())?;
        let online: Vec<u64> = device
            .block_range(block_size)
            .filter(|&i| view.block(i).state == BlockState::Online)
            .collect();
        if let Err(failed) = offline_all(ctx, &online).await {
            return Err(format!(
                "cannot offline the new blocks ({}); the DIMM stays",
                failed.describe(&view)
            ));
        }
        if let Err(e) = eject(ctx, dimm_id).await
            && still_plugged(ctx, dimm_id).await
        {
            return Err(e.to_string());
        }
    }
    if !mem_id.is_empty() {
        ctx.backend
            .delete_backend(mem_id, ctx.deadline)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dimm(addr: u64, size: u64) -> DimmDevice {
        DimmDevice {
            id: format!("qga-dimm{addr}"),
            addr,
            size,
            node: 0,
            slot: 0,
            memdev: String::new(),
            hotplugged: true,
            hotpluggable: true,
        }
    }

    #[test]
    fn adjacent_dimms_make_one_run() {
        let mb = 1 << 20;
        let devices = [
            dimm(4096 * mb + 512 * mb, 512 * mb),
            dimm(4096 * mb, 512 * mb),
            dimm(8192 * mb, 256 * mb),
        ];
        assert_eq!(runs(&devices, 128 * mb), vec![32..40, 64..66]);
        assert_eq!(runs(&[], 128 * mb), Vec::<Range<u64>>::new());
    }

    #[test]
    fn block_lists_read_as_ranges() {
        assert_eq!(list(&[32, 33, 34, 40, 42, 43]), "32-34, 40, 42-43");
        assert_eq!(list(&[7]), "7");
        assert_eq!(list(&[]), "");
    }
}
