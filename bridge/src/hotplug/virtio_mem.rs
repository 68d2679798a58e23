//! Resize on virtio-mem: the host sets each device's `requested-size`, the guest's driver
//! plugs or unplugs pieces of `block-size` until the device's plugged size matches, and
//! the bridge answers once QEMU's plugged size is there **and** the guest shows the memory
//! online (in ZONE_MOVABLE, where it asked for that).
//!
//! Spreading over several devices: devices in (node, id) order are filled up to their
//! maximum one after the other, and emptied from the last: a resize changes as few
//! devices as it can.
//!
//! Before anything changes, each device is recorded as desired memory (the journal's
//! [`Desired`], kind virtio-mem, its whole range): the keeper then onlines what a guest
//! reboot leaves offline, and recovery after a crash knows the device.
//!
//! A growth the guest does not complete within `hotplug.appear_timeout_ms`, and a shrink
//! that stops making progress for `hotplug.offline_budget_ms`, end with the request
//! withdrawn ([`withdraw`]: `requested-size` set back to what the guest holds, so QEMU and
//! the guest stop pulling against each other, and QEMU's size waited for until it stands
//! there) and a FAILED_PRECONDITION naming the size reached.

use std::time::Duration;

use qga_wire::schema::GuestMemoryOnlineType;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    ctx::{Capabilities, Ctx, describe},
    layout::{BlockState, GuestView},
    policy,
};
use crate::{
    backend::VirtioMemDevice,
    error::BridgeError,
    hotplug::desired::{Desired, Kind},
};

/// How often QEMU's plugged size is looked at while waiting.
const POLL: Duration = Duration::from_millis(20);

/// How long QEMU's plugged size may stand still before the guest is looked at (and how
/// often it is, while it stands still).
const STALL: Duration = Duration::from_millis(200);

/// How often the guest is looked at once QEMU's size is there but the guest is still
/// onlining what was plugged.
const GUEST_LOOK: Duration = Duration::from_millis(100);

/// How long a withdrawn request may take to stand: the guest's driver finishing a piece
/// it had under way when the request changed, then plugging back up to the request. An
/// answer that withdraws a request comes this much (and a QMP command) later at most.
pub const WITHDRAW_WAIT: Duration = Duration::from_secs(10);

/// One device's part in a resize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VirtioMemChange {
    /// The device.
    pub id: String,
    /// Plugged before, bytes.
    pub from_bytes: u64,
    /// Plugged after, bytes.
    pub to_bytes: u64,
}

/// The requested size of each of `devices` (already in order) that makes `total` bytes:
/// each filled up to its maximum before the next.
pub fn spread(devices: &[VirtioMemDevice], total: u64) -> Vec<u64> {
    let mut left = total;
    devices
        .iter()
        .map(|d| {
            let take = left.min(d.max_size);
            left -= take;
            take
        })
        .collect()
}

/// What a virtio-mem resize did: the VM's memory before and after, and each device's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Memory before, bytes.
    pub from_bytes: u64,
    /// Memory after, bytes.
    pub to_bytes: u64,
    /// The devices whose plugged size changed.
    pub devices: Vec<VirtioMemChange>,
}

/// Resizes the VM to `target` bytes in all by changing its virtio-mem devices; boot
/// memory and DIMMs (`fixed` bytes) stay as they are.
pub async fn resize(
    ctx: &mut Ctx,
    target: u64,
    fixed: u64,
    mut devices: Vec<VirtioMemDevice>,
) -> Result<Changed, BridgeError> {
    devices.sort_by(|a, b| (a.node, &a.id).cmp(&(b.node, &b.id)));
    let wanted = check(ctx, target, fixed, &devices)?;
    let plugged: u64 = devices.iter().map(|d| d.plugged_size).sum();
    let mut done = Changed {
        from_bytes: fixed + plugged,
        to_bytes: fixed + plugged,
        devices: Vec::new(),
    };
    let block_size = ctx.block_size().await?;
    let caps = ctx.capabilities().await?;
    let online_type = caps
        .online_type
        .then_some(GuestMemoryOnlineType::OnlineMovable);
    let growing = devices
        .iter()
        .zip(&wanted)
        .any(|(d, &w)| w > d.plugged_size);
    keep(ctx, &devices, block_size).await?;
    let restore = if growing {
        policy::prepare(ctx, caps, online_type).await?
    } else {
        None
    };
    for (device, &want) in devices.iter().zip(&wanted) {
        if want == device.requested_size && want == device.plugged_size {
            continue;
        }
        let start = Instant::now();
        let asked = ctx
            .backend
            .set_requested_size(&device.id, want, ctx.deadline)
            .await;
        asked.map_err(|e| ctx.backend_error(e))?;
        ctx.step(
            "requested-size",
            start,
            format!("{}: {} -> {want}", device.id, device.requested_size),
        );
    }
    let reached = settle(ctx, &devices, &wanted, block_size, online_type, caps).await;
    policy::restore(ctx, restore).await;
    let reached = reached?;
    for (device, now) in devices.iter().zip(&reached) {
        if *now != device.plugged_size {
            done.devices.push(VirtioMemChange {
                id: device.id.clone(),
                from_bytes: device.plugged_size,
                to_bytes: *now,
            });
        }
    }
    done.to_bytes = fixed + reached.iter().sum::<u64>();
    Ok(done)
}

/// The desired memory `device` stands for: its whole range (blocks it has not plugged are
/// simply absent), onlined Movable like the DIMMs the bridge plugs; `None` where its
/// address is not known.
fn desired(device: &VirtioMemDevice, block_size: u64) -> Option<Desired> {
    let range = device.block_range(block_size);
    (!range.is_empty()).then(|| Desired {
        device: device.id.clone(),
        kind: Kind::VirtioMem,
        first_block: range.start,
        blocks: range.end - range.start,
        online_type: Some(GuestMemoryOnlineType::OnlineMovable),
        held_bytes: None,
    })
}

/// Records `devices` as desired memory (see the module docs); what it recorded.
pub(super) async fn keep(
    ctx: &Ctx,
    devices: &[VirtioMemDevice],
    block_size: u64,
) -> Result<Vec<Desired>, BridgeError> {
    let mut kept = Vec::new();
    for desired in devices.iter().filter_map(|d| desired(d, block_size)) {
        ctx.want(desired.clone()).await?;
        kept.push(desired);
    }
    Ok(kept)
}

/// The requested size per device for `target`, or why it cannot be had; nothing has
/// changed yet.
fn check(
    ctx: &Ctx,
    target: u64,
    fixed: u64,
    devices: &[VirtioMemDevice],
) -> Result<Vec<u64>, BridgeError> {
    if target < fixed {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} is below the boot memory and DIMMs ({fixed} bytes), which \
             virtio-mem cannot take away"
        )));
    }
    let wanted = target - fixed;
    let granule = devices
        .iter()
        .map(|d| d.block_size)
        .max()
        .unwrap_or(1)
        .max(1);
    if !wanted.is_multiple_of(granule) {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} less the boot memory and DIMMs ({fixed} bytes) is not a multiple \
             of the virtio-mem block size ({granule} bytes)"
        )));
    }
    let max: u64 = devices.iter().map(|d| d.max_size).sum();
    if wanted > max {
        return Err(ctx.hotplug_error(
            "check",
            format!(
                "size {target} is past what the VM's virtio-mem devices can hold ({} bytes: \
                 {fixed} fixed and {max} in virtio-mem); nothing was done",
                fixed + max
            ),
        ));
    }
    if let Some(d) = devices.iter().find(|d| d.addr.is_none()) {
        return Err(ctx.hotplug_error(
            "check",
            format!(
                "the hypervisor does not tell where virtio-mem device '{}' lives in the guest, \
                 so the guest's side cannot be checked; nothing was done",
                d.id
            ),
        ));
    }
    Ok(spread(devices, wanted))
}

/// Waits until every device has plugged what was asked and the guest has its blocks
/// online, onlining blocks the guest kernel left offline; the plugged size per device.
/// On a growth that does not complete in time, or a shrink that stops making progress,
/// sets `requested-size` back to what the guest holds and fails naming it.
async fn settle(
    ctx: &mut Ctx,
    before: &[VirtioMemDevice],
    wanted: &[u64],
    block_size: u64,
    online_type: Option<GuestMemoryOnlineType>,
    caps: Capabilities,
) -> Result<Vec<u64>, BridgeError> {
    let start = Instant::now();
    let grow_until = ctx.phase(ctx.settings.appear_timeout_ms);
    let budget = Duration::from_millis(ctx.settings.offline_budget_ms);
    let mut progress = (Instant::now(), plugged_of(before));
    let mut looked = start;
    // Only a growth can wait on the guest (for blocks to be onlined); a shrink is the
    // driver's alone, and QEMU's size tells how it goes.
    let growing = before.iter().zip(wanted).any(|(b, &w)| w > b.plugged_size);
    loop {
        let now = current(ctx, before).await?;
        let plugged = plugged_of(&now);
        if plugged != progress.1 {
            progress = (Instant::now(), plugged.clone());
        }
        // The guest is asked only once QEMU's side is there, or, growing, while it has not
        // moved for STALL (the driver may wait for blocks to be onlined); and at most every
        // GUEST_LOOK after the first: each look takes the guest's CPU from the plugging.
        let done_in_qemu = plugged == wanted;
        let stalled = growing && progress.0.elapsed() >= STALL && looked.elapsed() >= STALL;
        let first = looked == start;
        if (done_in_qemu && (first || looked.elapsed() >= GUEST_LOOK)) || stalled {
            looked = Instant::now();
            if let Some(plugged) =
                look(ctx, before, &now, wanted, block_size, online_type, caps).await?
            {
                ctx.step(
                    "settle",
                    start,
                    format!("{} bytes plugged, online", plugged.iter().sum::<u64>()),
                );
                return Ok(plugged);
            }
        }
        let shrinking = plugged.iter().zip(wanted).any(|(p, w)| p > w);
        let stuck = if shrinking {
            progress.0.elapsed() >= budget || Instant::now() >= ctx.deadline
        } else {
            Instant::now() >= grow_until
        };
        if stuck {
            return Err(give_up(ctx, &now, wanted, start).await);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One look at the guest: onlines blocks it left offline where memory is being added,
/// and, when QEMU's side is done and the guest has that memory online, the plugged
/// sizes (with a warning for memory outside ZONE_MOVABLE).
async fn look(
    ctx: &mut Ctx,
    before: &[VirtioMemDevice],
    now: &[VirtioMemDevice],
    wanted: &[u64],
    block_size: u64,
    online_type: Option<GuestMemoryOnlineType>,
    caps: Capabilities,
) -> Result<Option<Vec<u64>>, BridgeError> {
    // The reference agent fails the whole block list when a block vanishes while it
    // reads (the driver removing it): that look learns nothing from the guest.
    let view = match ctx.guest(caps).await {
        Ok(view) => view,
        Err(BridgeError::Agent(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Only where memory is being added: while shrinking, the driver offlines blocks
    // itself on their way out.
    let growing: Vec<VirtioMemDevice> = now
        .iter()
        .zip(before.iter().zip(wanted))
        .filter(|(_, (b, w))| **w > b.plugged_size)
        .map(|(d, _)| d.clone())
        .collect();
    let offline = offline_blocks(&growing, &view, block_size);
    if !offline.is_empty() {
        // Seen again at the next look (this view is from before).
        online(ctx, &offline, online_type).await?;
        return Ok(None);
    }
    let plugged = plugged_of(now);
    let guest_ok = now
        .iter()
        .zip(wanted)
        .all(|(d, &w)| online_bytes(d, &view, block_size) >= w.min(d.plugged_size));
    if plugged != wanted || !guest_ok {
        return Ok(None);
    }
    zone_warnings(ctx, now, &view, block_size, online_type);
    Ok(Some(plugged))
}

/// The devices of `before` as the hypervisor lists them now.
async fn current(
    ctx: &Ctx,
    before: &[VirtioMemDevice],
) -> Result<Vec<VirtioMemDevice>, BridgeError> {
    let listed = ctx.virtio_mem().await?;
    before
        .iter()
        .map(|b| {
            listed
                .iter()
                .find(|d| d.id == b.id)
                .cloned()
                .ok_or_else(|| {
                    ctx.hotplug_error(
                        "settle",
                        format!("virtio-mem device '{}' is gone from the VM", b.id),
                    )
                })
        })
        .collect()
}

fn plugged_of(devices: &[VirtioMemDevice]) -> Vec<u64> {
    devices.iter().map(|d| d.plugged_size).collect()
}

/// The guest's offline blocks in the devices' ranges.
fn offline_blocks(devices: &[VirtioMemDevice], view: &GuestView, block_size: u64) -> Vec<u64> {
    devices
        .iter()
        .flat_map(|d| d.block_range(block_size))
        .filter(|&i| view.block(i).state == BlockState::Offline)
        .collect()
}

/// Bytes of the guest's online blocks in `device`'s range.
fn online_bytes(device: &VirtioMemDevice, view: &GuestView, block_size: u64) -> u64 {
    device
        .block_range(block_size)
        .filter(|&i| view.block(i).state == BlockState::Online)
        .count() as u64
        * block_size
}

/// Onlines blocks the guest kernel left offline (its policy was `offline`, or the agent
/// cannot set it).
async fn online(
    ctx: &mut Ctx,
    blocks: &[u64],
    online_type: Option<GuestMemoryOnlineType>,
) -> Result<(), BridgeError> {
    let start = Instant::now();
    let failures = ctx.set(blocks, true, online_type).await?;
    // A block the driver removed meanwhile (ENOENT), or that the kernel onlined itself
    // between the look and the write (EINVAL), is seen at the next pass; any other
    // refusal is a failure.
    let failed: Vec<String> = failures
        .iter()
        .filter(|r| !matches!(r.error_code, Some(2 | 22)))
        .map(describe)
        .collect();
    if !failed.is_empty() {
        return Err(ctx.hotplug_error(
            "online",
            format!(
                "the guest could not online virtio-mem memory: {}",
                failed.join("; ")
            ),
        ));
    }
    let how = online_type.map_or("as the agent is configured", |t| t.as_str());
    ctx.step("online", start, format!("{} blocks, {how}", blocks.len()));
    Ok(())
}

/// A warning for each device with blocks online outside ZONE_MOVABLE when movable was
/// asked for: the guest may not give that memory back.
fn zone_warnings(
    ctx: &mut Ctx,
    devices: &[VirtioMemDevice],
    view: &GuestView,
    block_size: u64,
    online_type: Option<GuestMemoryOnlineType>,
) {
    if online_type != Some(GuestMemoryOnlineType::OnlineMovable) {
        return;
    }
    for d in devices {
        let stuck: Vec<String> = d
            .block_range(block_size)
            .map(|i| view.block(i))
            .filter(|b| b.state == BlockState::Online && b.movable() == Some(false))
            .map(|b| format!("{} ({})", b.phys_index, b.valid_zones.join(" ")))
            .collect();
        if !stuck.is_empty() {
            ctx.warnings.push(format!(
                "virtio-mem device '{}' has blocks online outside ZONE_MOVABLE: {} (the guest \
                 kernel onlined them itself); the guest may not be able to give that memory back",
                d.id,
                stuck.join(", ")
            ));
        }
    }
}

/// A device's request, withdrawn: what was asked before, and why setting it back failed
/// (if it did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawn {
    /// The device.
    pub id: String,
    /// Its `requested-size` before.
    pub requested: u64,
    /// Setting it to the plugged size failed: why.
    pub failed: Option<String>,
}

/// Withdraws every request in `devices` that the guest has not met: sets such a device's
/// `requested-size` to the size it has plugged, then waits until QEMU's plugged size has
/// stood at the request for a moment — the driver may finish a piece it had under way when
/// the request changed, then plugs back up to the request. After [`WITHDRAW_WAIT`] a size
/// still moving is taken as it is: a device still above its request (a piece the guest
/// cannot give back) gets the request set to it once more, one below keeps its request
/// (the driver is still plugging up to it). A look at QEMU that fails is tried again
/// until then. The devices as last seen (a `requested-size` is where each stays), and
/// each request withdrawn.
pub async fn withdraw(
    ctx: &mut Ctx,
    devices: &[VirtioMemDevice],
) -> (Vec<VirtioMemDevice>, Vec<Withdrawn>) {
    let until = Instant::now() + WITHDRAW_WAIT;
    // The operation's own deadline may be what ended it.
    ctx.deadline = ctx
        .deadline
        .max(until + Duration::from_millis(ctx.settings.hypervisor_timeout_ms));
    let mut now = devices.to_vec();
    let mut withdrawn = Vec::new();
    for d in &mut now {
        if d.requested_size != d.plugged_size {
            withdrawn.push(Withdrawn {
                id: d.id.clone(),
                requested: d.requested_size,
                failed: set_to_plugged(ctx, d).await,
            });
        }
    }
    if withdrawn.is_empty() || withdrawn.iter().any(|w| w.failed.is_some()) {
        return (now, withdrawn);
    }
    let mut met_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(POLL).await;
        match current(ctx, &now).await {
            Ok(devices) => now = devices,
            Err(e) => {
                tracing::debug!(vm = ctx.vm, error = %e, "virtio-mem devices not read; trying again")
            }
        }
        let met = now
            .iter()
            .filter(|d| withdrawn.iter().any(|w| w.id == d.id))
            .all(|d| d.requested_size == d.plugged_size);
        if met {
            let since = *met_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STALL {
                return (now, withdrawn);
            }
        } else {
            met_since = None;
        }
        if Instant::now() >= until {
            for d in now.iter_mut().filter(|d| d.plugged_size > d.requested_size) {
                let Some(w) = withdrawn.iter_mut().find(|w| w.id == d.id) else {
                    continue;
                };
                tracing::warn!(
                    vm = ctx.vm,
                    device = d.id,
                    requested = d.requested_size,
                    plugged = d.plugged_size,
                    "a withdrawn virtio-mem request is still not met: set to what the guest holds once more"
                );
                w.failed = set_to_plugged(ctx, d).await;
            }
            return (now, withdrawn);
        }
    }
}

/// Sets `device`'s `requested-size` to its plugged size (and so its copy); why it failed.
async fn set_to_plugged(ctx: &Ctx, device: &mut VirtioMemDevice) -> Option<String> {
    let set = ctx
        .backend
        .set_requested_size(&device.id, device.plugged_size, ctx.deadline)
        .await;
    match set {
        Ok(()) => {
            device.requested_size = device.plugged_size;
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

/// Withdraws the requests the guest did not meet ([`withdraw`]), and the error that says
/// where the resize got.
async fn give_up(
    ctx: &mut Ctx,
    now: &[VirtioMemDevice],
    wanted: &[u64],
    start: Instant,
) -> BridgeError {
    let mut parts: Vec<String> = now
        .iter()
        .zip(wanted)
        .filter(|(d, w)| d.plugged_size != **w)
        .map(|(d, w)| {
            format!(
                "device '{}' holds {} bytes, {w} were asked",
                d.id, d.plugged_size
            )
        })
        .collect();
    let elapsed = start.elapsed();
    let (now, withdrawn) = withdraw(ctx, now).await;
    let mut reset = Vec::new();
    for w in &withdrawn {
        let Some(d) = now.iter().find(|d| d.id == w.id) else {
            continue;
        };
        match &w.failed {
            None => reset.push(format!("{} to {}", w.id, d.requested_size)),
            Some(e) => parts.push(format!(
                "setting '{}' back to {} failed too: {e}",
                w.id, d.plugged_size
            )),
        }
    }
    let total: u64 = now.iter().map(|d| d.plugged_size).sum();
    let reset = if reset.is_empty() {
        String::new()
    } else {
        format!(
            "; requested-size is set back to what the guest holds ({}), so QEMU and the \
             guest stop trying",
            reset.join(", ")
        )
    };
    ctx.hotplug_error(
        "settle",
        format!(
            "the guest did not get there within {} ms: {}{reset}; its virtio-mem devices \
             hold {total} bytes",
            elapsed.as_millis(),
            parts.join("; ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, max: u64) -> VirtioMemDevice {
        VirtioMemDevice {
            id: id.into(),
            addr: Some(4 << 30),
            node: 0,
            block_size: 2 << 20,
            max_size: max,
            requested_size: 0,
            plugged_size: 0,
            memdev: String::new(),
        }
    }

    #[test]
    fn devices_fill_in_order_and_empty_from_the_last() {
        let gib = 1 << 30;
        let d = [device("a", 2 * gib), device("b", gib)];
        assert_eq!(spread(&d, 0), [0, 0]);
        assert_eq!(spread(&d, gib), [gib, 0]);
        assert_eq!(spread(&d, 2 * gib + (2 << 20)), [2 * gib, 2 << 20]);
        assert_eq!(spread(&d, 3 * gib), [2 * gib, gib]);
    }
}
