//! Unplug: offline the DIMM's blocks (retrying EBUSY), ask for the eject (QMP:
//! `device_del`; libvirt: a live detach), wait until it is gone, delete its memory backend
//! (libvirt deletes it itself). If the guest cannot give the memory back, the blocks it did
//! offline are onlined again and the DIMM stays.

use std::time::Duration;

use qga_wire::{
    backoff::Backoff,
    schema::{GuestMemoryBlockResponse, GuestMemoryOnlineType},
};
use tokio::time::Instant;

use super::{
    ctx::{Capabilities, Ctx, describe, transient, undo_budget, with_note},
    layout::{self, BlockState, Dimm, GuestView},
};
use crate::{
    backend::{Deleted, DimmDevice, Ejection},
    error::BridgeError,
};

/// Whether QEMU still lists DIMM `dimm_id`, asked on a budget of its own (the
/// operation's deadline may have passed). If QEMU cannot be asked, it counts as plugged.
pub(super) async fn still_plugged(ctx: &mut Ctx, dimm_id: &str) -> bool {
    ctx.deadline = ctx
        .deadline
        .max(Instant::now() + Duration::from_millis(ctx.settings.hypervisor_timeout_ms));
    ctx.dimms()
        .await
        .map_or(true, |d| d.iter().any(|d| d.id == dimm_id))
}

/// Why offlining stopped.
#[derive(Debug)]
pub(super) struct OfflineFailed {
    /// The blocks the guest refused, with its errno.
    refused: Vec<GuestMemoryBlockResponse>,
    /// The agent could not be asked or did not answer.
    error: Option<BridgeError>,
}

impl OfflineFailed {
    /// Each refused block with its errno and its zone in `view` (the blocks before
    /// offlining), and the agent's error.
    pub(super) fn describe(&self, view: &GuestView) -> String {
        let mut parts: Vec<String> = self
            .refused
            .iter()
            .map(|r| {
                let zones = view.block(r.phys_index).valid_zones;
                if zones.is_empty() {
                    describe(r)
                } else {
                    format!("{} (zone {})", describe(r), zones.join(" "))
                }
            })
            .collect();
        if let Some(e) = &self.error {
            parts.push(e.to_string());
        }
        parts.join("; ")
    }
}

/// Offlines `indices`, trying again after EBUSY/EAGAIN with backoff within
/// `hotplug.offline_budget_ms` and while time is left (keeping enough to eject the DIMM or
/// give the blocks back).
pub(super) async fn offline_all(ctx: &mut Ctx, indices: &[u64]) -> Result<(), OfflineFailed> {
    let start = Instant::now();
    let reserve = Duration::from_millis(
        ctx.settings.eject_timeout_ms + 2 * ctx.settings.hypervisor_timeout_ms,
    );
    let budget = start + Duration::from_millis(ctx.settings.offline_budget_ms);
    let until = ctx
        .deadline
        .checked_sub(reserve)
        .unwrap_or(start)
        .max(start + Duration::from_secs(1))
        .min(budget);
    let mut pending = indices.to_vec();
    let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut tries = 0u32;
    loop {
        tries += 1;
        let refused = ctx
            .set(&pending, false, None)
            .await
            .map_err(|e| OfflineFailed {
                refused: Vec::new(),
                error: Some(e),
            })?;
        if refused.is_empty() {
            ctx.step(
                "offline",
                start,
                format!("{} blocks in {tries} tries", indices.len()),
            );
            return Ok(());
        }
        if !refused.iter().all(transient) || Instant::now() + pause.peek() > until {
            return Err(OfflineFailed {
                refused,
                error: None,
            });
        }
        pending = refused.iter().map(|f| f.phys_index).collect();
        tokio::time::sleep(pause.next_wait()).await;
    }
}

/// Gives back, after a failed removal, those of `candidates` (blocks online in `before`)
/// that are offline now — a write that timed out may still have offlined some — into the
/// zone each was in, on a budget of its own.
pub(super) async fn reonline(
    ctx: &mut Ctx,
    before: &GuestView,
    candidates: &[u64],
    caps: Capabilities,
) -> Result<(), String> {
    if candidates.is_empty() {
        return Ok(());
    }
    ctx.deadline = ctx
        .deadline
        .max(Instant::now() + undo_budget(&ctx.settings));
    let start = Instant::now();
    let now = ctx.guest(caps).await.map_err(|e| e.to_string())?;
    let (mut movable, mut kernel) = (Vec::new(), Vec::new());
    for &i in candidates {
        if now.block(i).state != BlockState::Offline {
            continue;
        }
        match before.block(i).movable() {
            Some(false) => kernel.push(i),
            _ => movable.push(i),
        }
    }
    let given = movable.len() + kernel.len();
    let mut failures = Vec::new();
    for (set, t) in [
        (movable, GuestMemoryOnlineType::OnlineMovable),
        (kernel, GuestMemoryOnlineType::OnlineKernel),
    ] {
        if set.is_empty() {
            continue;
        }
        let t = caps.online_type.then_some(t);
        failures.extend(ctx.set(&set, true, t).await.map_err(|e| e.to_string())?);
    }
    ctx.step("re-online", start, format!("{given} blocks given back"));
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.iter().map(describe).collect::<Vec<_>>().join("; "))
    }
}

/// `device_del`, then waits for the guest to eject the DIMM: `DEVICE_DELETED` (libvirt:
/// device-removed), or its absence from the DIMM list (events can be missed over a
/// reconnect).
pub(super) async fn eject(ctx: &mut Ctx, dimm_id: &str) -> Result<(), BridgeError> {
    let mut watch = ctx.backend.watch(dimm_id);
    let start = Instant::now();
    let asked = ctx.backend.remove_dimm(dimm_id, ctx.deadline).await;
    asked.map_err(|e| ctx.backend_error(e))?;
    let until = ctx.phase(ctx.settings.eject_timeout_ms);
    let mut listening = true;
    loop {
        let poll = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            word = watch.next(), if listening => match word {
                Some(Ejection::Deleted) => break,
                Some(Ejection::Refused(why)) => {
                    return Err(ctx.hotplug_error("wait-deleted", why));
                }
                Some(Ejection::Other) => {}
                None => listening = false,
            },
            () = poll => {
                // A failed query (QMP reconnecting) is tried again at the next poll.
                if ctx.dimms().await.is_ok_and(|d| !d.iter().any(|d| d.id == dimm_id)) {
                    break;
                }
            }
            () = tokio::time::sleep_until(until) => {
                return Err(ctx.hotplug_error(
                    "wait-deleted",
                    format!(
                        "the guest did not eject the DIMM within {} ms",
                        start.elapsed().as_millis()
                    ),
                ));
            }
        }
    }
    ctx.step("device_del", start, format!("{dimm_id} ejected"));
    Ok(())
}

/// Offlines DIMM `dimm_id`'s blocks, unplugs it and deletes its backend. If the guest
/// cannot give the memory back, the blocks it did offline are onlined again and the DIMM
/// stays.
pub async fn unplug(ctx: &mut Ctx, dimm_id: &str) -> Result<Dimm, BridgeError> {
    let device = ctx
        .dimms()
        .await?
        .into_iter()
        .find(|d| d.id == dimm_id)
        .ok_or_else(|| BridgeError::DimmNotFound {
            vm: ctx.vm.clone(),
            dimm: dimm_id.to_string(),
        })?;
    let block_size = ctx.block_size().await?;
    let caps = ctx.capabilities().await?;
    let view = ctx.guest(caps).await?;
    let before = layout::dimm(&device, block_size, &view);
    let online: Vec<u64> = device
        .block_range(block_size)
        .rev()
        .filter(|&i| view.block(i).state == BlockState::Online)
        .collect();
    if let Err(failed) = offline_all(ctx, &online).await {
        let reason = failed.describe(&view);
        let given_back = reonline(ctx, &view, &online, caps).await;
        let note = match given_back {
            Ok(()) => "the DIMM stays and every block is online again".to_string(),
            Err(why) => format!("the DIMM stays; giving blocks back failed: {why}"),
        };
        return Err(BridgeError::Hotplug {
            vm: ctx.vm.clone(),
            step: "offline".into(),
            reason: format!("the guest could not give the memory back: {reason}; {note}"),
            blocks: failed.refused,
        });
    }
    if let Err(e) = eject(ctx, dimm_id).await {
        // A refusal or a timeout may race with the eject itself: what QEMU lists decides.
        if !still_plugged(ctx, dimm_id).await {
            tracing::warn!(vm = %ctx.vm, dimm = dimm_id, error = %e, "the DIMM was ejected after all");
            return finish_unplug(ctx, &device, before).await;
        }
        let given_back = reonline(ctx, &view, &online, caps).await;
        let note = match given_back {
            Ok(()) => "; the DIMM stays and its blocks are online again".to_string(),
            Err(why) => format!("; the DIMM stays, giving blocks back failed: {why}"),
        };
        return Err(with_note(e, &note));
    }
    finish_unplug(ctx, &device, before).await
}

/// Deletes an ejected DIMM's backend.
async fn finish_unplug(
    ctx: &mut Ctx,
    device: &DimmDevice,
    before: Dimm,
) -> Result<Dimm, BridgeError> {
    let start = Instant::now();
    let deleted = ctx
        .backend
        .delete_backend(&device.memdev, ctx.deadline)
        .await;
    let deleted = deleted.map_err(|e| {
        with_note(
            ctx.backend_error(e),
            "; the DIMM is gone but its memory backend remains (retry object-del)",
        )
    })?;
    if deleted == Deleted::Yes {
        ctx.step("object-del", start, device.memdev.clone());
    }
    Ok(before)
}
