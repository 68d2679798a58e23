//! Plug: add a DIMM (QMP: `object-add`, `device_add`; libvirt: one live attach), wait
//! for its blocks in the guest, online them, verify; on any failure, take out what was
//! added.

use std::time::Duration;

use qga_wire::{backoff::Backoff, schema::GuestMemoryOnlineType};
use serde::Serialize;
use tokio::time::Instant;

use super::{
    ctx::{Capabilities, Ctx, describe, undo_budget, with_undo},
    layout::{self, BlockState, Dimm, GuestView},
    unplug::{eject, offline_all, still_plugged},
};
use crate::{
    backend::{Added, BackendError, Deleted, DimmDevice, NewDimm, NotAdded},
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
    let block_size = ctx.block_size().await?;
    if args.size == 0 || !args.size.is_multiple_of(block_size) {
        return Err(BridgeError::InvalidRequest(format!(
            "size {} is not a positive multiple of the guest's block size ({block_size} bytes)",
            args.size
        )));
    }
    let caps = ctx.capabilities().await?;
    let online_type = match (args.online_type, caps.online_type) {
        (t, true) => Some(t.unwrap_or(GuestMemoryOnlineType::OnlineMovable)),
        (None, false) => {
            ctx.warnings.push(
                "the agent cannot choose the zone (it does not offer \
                 __org.qga-bridge_set-memory-blocks): it onlines the DIMM as it is configured \
                 to; qemu-ga writes plain 'online', which usually leaves the DIMM impossible \
                 to unplug"
                    .into(),
            );
            None
        }
        (Some(t), false) => {
            return Err(ctx.hotplug_error(
                "check",
                format!(
                    "online type '{}' was asked for, but the agent cannot choose the zone \
                     (it does not offer __org.qga-bridge_set-memory-blocks); nothing was done",
                    t.as_str()
                ),
            ));
        }
    };
    let devices = ctx.dimms().await?;
    check_room(ctx, &devices, args.size).await?;
    // Best effort here: the plug does not need them gone.
    for (orphan, e) in remove_orphans(ctx, &devices).await? {
        tracing::warn!(vm = %ctx.vm, backend = %orphan, error = %e, "cannot delete an unused backend");
    }
    let new = NewDimm {
        dimms: &devices,
        size: args.size,
        node: args.node,
        until: ctx.deadline,
    };
    let added = ctx.backend.add_dimm(new, &mut ctx.steps).await;
    let (dimm_id, mem_id) = match added {
        Ok(Added { dimm, memdev }) => (dimm, memdev),
        Err(NotAdded::Refused(e)) => return Err(ctx.backend_error(e)),
        Err(NotAdded::Unknown {
            error,
            dimm,
            memdev,
        }) => {
            let e = ctx.backend_error(error);
            let undo = undo_plug(ctx, &dimm, &memdev, block_size).await;
            return Err(with_undo(e, undo));
        }
    };
    match online_new(ctx, &dimm_id, block_size, online_type, caps).await {
        Ok(dimm) => Ok(dimm),
        Err(e) => {
            let undo = undo_plug(ctx, &dimm_id, &mem_id, block_size).await;
            Err(with_undo(e, undo))
        }
    }
}

/// Refuses a DIMM of `size` bytes that the VM has no slot or no room (maximum memory)
/// for, where the hypervisor tells its limits.
async fn check_room(ctx: &Ctx, dimms: &[DimmDevice], size: u64) -> Result<(), BridgeError> {
    let limits = ctx.backend.limits(ctx.deadline).await;
    let Some(limits) = limits.map_err(|e| ctx.backend_error(e))? else {
        return Ok(());
    };
    let slots = limits.slots;
    if dimms.len() as u64 >= slots {
        return Err(ctx.hotplug_error(
            "check",
            format!(
                "all {slots} DIMM slots are taken (QEMU -m ...,slots=N; libvirt \
                 <maxMemory slots='N'>); nothing was done"
            ),
        ));
    }
    if let (Some(max), Some(boot)) = (limits.max, limits.boot) {
        let plugged: u64 = dimms.iter().map(|d| d.size).sum();
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

/// Waits for the new DIMM's blocks and onlines them.
async fn online_new(
    ctx: &mut Ctx,
    dimm_id: &str,
    block_size: u64,
    online_type: Option<GuestMemoryOnlineType>,
    caps: Capabilities,
) -> Result<Dimm, BridgeError> {
    let device = ctx
        .dimms()
        .await?
        .into_iter()
        .find(|d| d.id == dimm_id)
        .ok_or_else(|| ctx.hotplug_error("device_add", "QEMU does not list the new DIMM".into()))?;
    let range = device.block_range(block_size);
    wait_blocks(ctx, range.clone()).await?;
    let view = ctx.guest(caps).await?;
    let offline = to_online(ctx, &view, range, online_type);
    let start = Instant::now();
    let failures = ctx.set(&offline, true, online_type).await?;
    if !failures.is_empty() {
        let reason = failures.iter().map(describe).collect::<Vec<_>>().join("; ");
        return Err(BridgeError::Hotplug {
            vm: ctx.vm.clone(),
            step: "online".into(),
            reason: format!("the guest could not online the DIMM: {reason}"),
            blocks: failures,
        });
    }
    let how = online_type.map_or("as the agent is configured", |t| t.as_str());
    ctx.step("online", start, format!("{} blocks, {how}", offline.len()));
    let view = ctx.guest(caps).await?;
    let dimm = layout::dimm(&device, block_size, &view);
    if let Some(b) = dimm.blocks.iter().find(|b| b.state != BlockState::Online) {
        return Err(ctx.hotplug_error(
            "verify",
            format!("block {} is {:?} after onlining", b.phys_index, b.state),
        ));
    }
    Ok(dimm)
}

/// Waits until the guest lists every block of `range`, within `hotplug.appear_timeout_ms`.
/// The guest sees a DIMM a few hundred milliseconds after it is added: the block list (one
/// cheap agent call) is polled often.
async fn wait_blocks(ctx: &mut Ctx, range: std::ops::Range<u64>) -> Result<(), BridgeError> {
    let start = Instant::now();
    let until = ctx.phase(ctx.settings.appear_timeout_ms);
    let (first, last) = (range.start, range.end.saturating_sub(1));
    let mut pause = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
    loop {
        let view = ctx.blocks().await?;
        let all = range.clone().count();
        let seen = range
            .clone()
            .filter(|&i| view.block(i).state != BlockState::Absent)
            .count();
        if seen == all {
            ctx.step("wait-blocks", start, format!("blocks {first}-{last}"));
            return Ok(());
        }
        if Instant::now() + pause.peek() > until {
            let ms = start.elapsed().as_millis();
            return Err(ctx.hotplug_error(
                "wait-blocks",
                format!("{seen} of the DIMM's {all} blocks ({first}-{last}) appeared in the guest within {ms} ms"),
            ));
        }
        tokio::time::sleep(pause.next_wait()).await;
    }
}

/// The blocks of `range` still offline in `view`, to be onlined as `online_type`; a block
/// the guest kernel already onlined outside ZONE_MOVABLE when movable was asked for is
/// a warning (that DIMM will not come out).
fn to_online(
    ctx: &mut Ctx,
    view: &GuestView,
    range: std::ops::Range<u64>,
    online_type: Option<GuestMemoryOnlineType>,
) -> Vec<u64> {
    let mut offline = Vec::new();
    for i in range {
        let b = view.block(i);
        if b.state == BlockState::Offline {
            offline.push(i);
        } else if b.movable() == Some(false)
            && online_type == Some(GuestMemoryOnlineType::OnlineMovable)
        {
            ctx.warnings.push(format!(
                "block {i} was onlined by the guest kernel itself into zone {} \
                 (auto_online_blocks): this DIMM will not come out",
                b.valid_zones.join(" ")
            ));
        }
    }
    offline
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
                failed.describe()
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
