//! The virtio balloon as a third way to resize: `memory-balloon` sets the memory the
//! guest may use, and the balloon's size is kept as desired memory.
//!
//! Sizes, as callers see them, are the VM's memory in all (boot memory, DIMMs and what
//! virtio-mem devices hold, as `memory-resize` counts it) less what the balloon holds.
//! QEMU's balloon works on another size: its `balloon` target and `actual` count boot
//! memory and DIMMs only ("ram" here), and it keeps the balloon's size in pages, so a
//! DIMM plugged or unplugged moves `actual` and leaves the balloon as big as it was. The
//! bridge therefore keeps the *balloon's size* ([`KEY`] in the desired memory, recorded
//! before the request is sent): after its own plug, unplug or resize it sets the balloon
//! again so that it holds that size, never leaving the guest less than the floor
//! ([`rebalance`]); the keeper sets it again where a guest reboot or a new QEMU left it
//! empty ([`reapply`]).
//!
//! An operation answers once QEMU's `actual` is at the target. Where it stands still for
//! `balloon.stall_ms` short of it (no driver in the guest, or a guest that cannot give
//! memory up), the rest of the request is withdrawn — the target set to where `actual`
//! stands, so that QEMU and the guest stop pulling — the balloon's size there is kept, and
//! the answer is a FAILED_PRECONDITION that names it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    ctx::Ctx,
    desired::{Desired, Kind},
    layout::BalloonView,
};
use crate::{
    backend::{BackendError, BalloonDevice, MemoryBackend},
    error::BridgeError,
};

/// The desired memory key of a VM's balloon (QEMU's ids start with a letter, so no device
/// id can take it).
pub const KEY: &str = "@balloon";

/// A balloon target's granularity: 1 MiB (libvirt sets the balloon in KiB, QEMU in 4 KiB
/// pages; a MiB is whole in both).
pub const GRAIN: u64 = 1 << 20;

/// The time kept back from a wait for withdrawing what it did not reach: one QMP
/// command, which takes milliseconds (a caller's short deadline still gets a wait).
const WITHDRAW_TIME: Duration = Duration::from_secs(1);

/// How often QEMU's `actual` is read while waiting.
const POLL: Duration = Duration::from_millis(10);

/// What `memory-balloon` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Ballooned {
    /// The balloon device's id.
    pub id: String,
    /// Memory the guest could use before, bytes.
    pub from_bytes: u64,
    /// Memory the guest can use now, bytes.
    pub to_bytes: u64,
    /// What was asked, bytes.
    pub target_bytes: u64,
    /// What the balloon holds now, bytes.
    pub held_bytes: u64,
    /// QEMU's `actual` now (boot memory and DIMMs less the balloon), bytes.
    pub actual_bytes: u64,
}

/// The VM's balloon for its layout, if it has one.
pub async fn view(ctx: &Ctx) -> Result<Option<BalloonView>, BridgeError> {
    let found = ctx.backend.balloon(ctx.deadline).await;
    let Some(device) = found.map_err(|e| ctx.backend_error(e))? else {
        return Ok(None);
    };
    let sizes = sizes(ctx).await?;
    let held = sizes.held(device.actual);
    Ok(Some(BalloonView {
        id: device.id,
        deflate_on_oom: device.deflate_on_oom,
        free_page_reporting: device.free_page_reporting,
        actual_bytes: device.actual,
        held_bytes: held,
        usable_bytes: sizes.usable(held),
        kept_bytes: kept_size(ctx)?,
    }))
}

/// A VM's sizes as the balloon sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Boot memory and DIMMs: QEMU's balloon size, bytes.
    pub ram: u64,
    /// The VM's memory in all (virtio-mem included), bytes.
    pub total: u64,
}

impl Sizes {
    /// The memory the balloon holds at QEMU's `actual`.
    pub fn held(&self, actual: u64) -> u64 {
        self.ram.saturating_sub(actual)
    }

    /// The memory the guest may use while the balloon holds `held`.
    pub fn usable(&self, held: u64) -> u64 {
        self.total.saturating_sub(held)
    }

    /// What a balloon kept at `want` bytes holds of these sizes: `want`, less where the
    /// guest would be left below `floor` (after an unplug, say).
    pub fn keeps(&self, want: u64, floor: u64) -> u64 {
        want.min(self.most_held(floor))
    }

    /// The most the balloon may hold: the guest keeps `floor` of its memory in all, and
    /// QEMU's target stays at least a grain.
    pub fn most_held(&self, floor: u64) -> u64 {
        self.total
            .saturating_sub(floor)
            .min(self.ram.saturating_sub(GRAIN))
    }
}

/// The VM's sizes, from its hypervisor.
pub async fn sizes(ctx: &Ctx) -> Result<Sizes, BridgeError> {
    let memory = ctx.memory().await?;
    let dimms = ctx
        .dimms()
        .await?
        .iter()
        .fold(0u64, |sum, d| sum.saturating_add(d.size));
    Ok(Sizes {
        ram: memory.boot.saturating_add(dimms),
        total: memory.boot.saturating_add(memory.plugged),
    })
}

/// The balloon's desired memory entry: it is to hold `held` bytes.
pub fn kept(held: u64) -> Desired {
    Desired {
        device: KEY.to_string(),
        kind: Kind::Balloon,
        first_block: 0,
        blocks: 0,
        online_type: None,
        held_bytes: Some(held),
    }
}

/// The VM's balloon; refused where it has none.
async fn device(ctx: &Ctx) -> Result<BalloonDevice, BridgeError> {
    let found = ctx.backend.balloon(ctx.deadline).await;
    found.map_err(|e| ctx.backend_error(e))?.ok_or_else(|| {
        ctx.hotplug_error(
            "check",
            "the VM has no virtio balloon (QEMU: -device virtio-balloon-pci; libvirt: \
             <memballoon model='virtio'>)"
                .into(),
        )
    })
}

/// What the balloon is to hold for a guest to have `target` bytes; refuses a target
/// off the grain, below the floor or above the VM's memory, and one the balloon cannot
/// reach (it holds boot memory and DIMMs only).
pub fn check(target: u64, sizes: Sizes, floor: u64) -> Result<u64, BridgeError> {
    let refuse = |why: String| Err(BridgeError::InvalidRequest(why));
    if !target.is_multiple_of(GRAIN) {
        return refuse(format!(
            "target {target} is not a multiple of 1 MiB ({GRAIN} bytes)"
        ));
    }
    if target < floor {
        return refuse(format!(
            "target {target} is below the balloon's floor ({floor} bytes, balloon.floor_bytes), \
             the least memory the bridge leaves a guest"
        ));
    }
    if target > sizes.total {
        return refuse(format!(
            "target {target} is above the VM's memory ({} bytes); plug memory to give it more",
            sizes.total
        ));
    }
    let held = sizes.total - target;
    if held > sizes.ram.saturating_sub(GRAIN) {
        return refuse(format!(
            "target {target} needs the balloon to hold {held} bytes, but it can take at most \
             {} (boot memory and DIMMs less 1 MiB; virtio-mem memory is resized, not ballooned)",
            sizes.ram.saturating_sub(GRAIN)
        ));
    }
    Ok(held)
}

/// `memory-balloon`: the guest is to have `target` bytes.
pub async fn balloon(ctx: &mut Ctx, target: u64) -> Result<Ballooned, BridgeError> {
    let device = device(ctx).await?;
    let sizes = sizes(ctx).await?;
    let held = check(target, sizes, ctx.balloon.floor_bytes)?;
    let value = sizes.ram - held;
    // The size is desired before it is asked for: a bridge that stops now keeps it.
    let before = kept_size(ctx)?;
    keep(ctx, held).await?;
    let start = Instant::now();
    if let Err(e) = ctx.backend.set_balloon(value, ctx.deadline).await {
        // Refused, or the hypervisor is gone: nothing was asked, nothing is kept anew. An
        // unanswered request may have been taken: its size stays kept.
        if !matches!(e, BackendError::Timeout { .. }) {
            match before {
                Some(size) => keep(ctx, size).await?,
                None => forget(ctx).await?,
            }
        }
        return Err(ctx.backend_error(e));
    }
    ctx.step(
        "balloon",
        start,
        format!(
            "QEMU's target {value} bytes of {} (the balloon to hold {held})",
            sizes.ram
        ),
    );
    let start = Instant::now();
    let actual = wait(ctx, value).await?;
    ctx.step(
        "wait-actual",
        start,
        format!("QEMU's actual {actual} bytes"),
    );
    if actual != value {
        return Err(stalled(ctx, sizes, value, actual).await);
    }
    Ok(Ballooned {
        id: device.id,
        from_bytes: sizes.usable(sizes.held(device.actual)),
        to_bytes: target,
        target_bytes: target,
        held_bytes: held,
        actual_bytes: actual,
    })
}

/// Waits until QEMU's `actual` is `value`, or comes no closer to it for
/// `balloon.stall_ms` (a balloon going back and forth does not hold the VM longer), or
/// the operation's deadline is [`WITHDRAW_TIME`] away (the withdrawal's); where it is
/// then.
async fn wait(ctx: &Ctx, value: u64) -> Result<u64, BridgeError> {
    let stall = Duration::from_millis(ctx.balloon.stall_ms);
    let command = Duration::from_millis(ctx.settings.hypervisor_timeout_ms).min(WITHDRAW_TIME);
    let end = ctx
        .deadline
        .checked_sub(command)
        .unwrap_or_else(Instant::now);
    let (mut best, mut moved) = (u64::MAX, Instant::now());
    loop {
        let read = ctx.backend.balloon_actual(ctx.deadline).await;
        let actual = read
            .map_err(|e| ctx.backend_error(e))?
            .ok_or_else(|| ctx.hotplug_error("balloon", "the VM's balloon is gone".into()))?;
        if actual == value {
            return Ok(actual);
        }
        let distance = actual.abs_diff(value);
        if distance < best {
            (best, moved) = (distance, Instant::now());
        }
        let now = Instant::now();
        if now.duration_since(moved) >= stall || now + POLL >= end {
            return Ok(actual);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Withdraws the rest of a request QEMU's `actual` stopped short of (`value`): the
/// target set to where it stands and that size kept; the error that says so.
async fn stalled(ctx: &mut Ctx, sizes: Sizes, value: u64, actual: u64) -> BridgeError {
    // `actual` is the guest driver's word: never kept past what the floor allows.
    let held = sizes
        .held(actual)
        .min(sizes.most_held(ctx.balloon.floor_bytes));
    let withdrawn = match ctx
        .backend
        .set_balloon(sizes.ram - held, ctx.deadline)
        .await
    {
        Ok(()) => keep(ctx, held).await.map(|()| "withdrawn".to_string()),
        Err(e) => Ok(format!("not withdrawn ({e})")),
    };
    let withdrawn = match withdrawn {
        Ok(w) => w,
        Err(e) => return e,
    };
    ctx.hotplug_error(
        "balloon",
        format!(
            "QEMU's actual stopped at {actual} bytes (the balloon holding {held}, the guest \
             {} bytes) short of the target {value} and did not move for {} ms or the \
             operation's time ran out: the guest's balloon driver cannot go further (is \
             virtio_balloon loaded? can the guest give that memory up?); the rest of the \
             request was {withdrawn}",
            sizes.usable(held),
            ctx.balloon.stall_ms
        ),
    )
}

/// After the bridge's own plug, unplug or resize of a VM whose balloon it keeps at
/// `held` bytes: sets the balloon again so it holds that much of the VM's new memory,
/// less where the guest would be left below the floor (then the kept size shrinks too,
/// with a warning). Changes nothing where nothing is kept or the balloon holds it.
pub async fn rebalance(ctx: &mut Ctx) -> Result<(), BridgeError> {
    let Some(want) = kept_size(ctx)? else {
        return Ok(());
    };
    let Some(device) = ctx
        .backend
        .balloon(ctx.deadline)
        .await
        .map_err(|e| ctx.backend_error(e))?
    else {
        return ctx
            .journal
            .unwant(&ctx.vm, KEY)
            .await
            .map_err(|e| ctx.hotplug_error("journal", e.to_string()));
    };
    let sizes = sizes(ctx).await?;
    let held = sizes.keeps(want, ctx.balloon.floor_bytes);
    if held != want {
        keep(ctx, held).await?;
        ctx.warnings.push(format!(
            "the balloon held {want} bytes; it now holds {held}, so that the guest keeps its \
             floor ({} bytes) of the VM's {} bytes",
            ctx.balloon.floor_bytes, sizes.total
        ));
    }
    if sizes.held(device.actual) == held && held == want {
        return Ok(());
    }
    let start = Instant::now();
    let value = sizes.ram - held;
    let set = ctx.backend.set_balloon(value, ctx.deadline).await;
    set.map_err(|e| ctx.backend_error(e))?;
    ctx.step(
        "balloon",
        start,
        format!(
            "QEMU's target {value} bytes of {}: the balloon kept at {held}",
            sizes.ram
        ),
    );
    Ok(())
}

/// Records that the bridge keeps the VM's balloon at `held` bytes (an empty one: nothing
/// to keep).
async fn keep(ctx: &Ctx, held: u64) -> Result<(), BridgeError> {
    if held == 0 {
        return forget(ctx).await;
    }
    ctx.want(kept(held)).await
}

/// Records that the bridge keeps no balloon size for the VM.
async fn forget(ctx: &Ctx) -> Result<(), BridgeError> {
    ctx.journal
        .unwant(&ctx.vm, KEY)
        .await
        .map_err(|e| ctx.hotplug_error("journal", e.to_string()))
}

/// The balloon size the bridge keeps for the VM, if any.
pub fn kept_size(ctx: &Ctx) -> Result<Option<u64>, BridgeError> {
    let wanted: Vec<Desired> = ctx
        .journal
        .wanted_by(&ctx.vm)
        .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?;
    Ok(wanted
        .iter()
        .find(|d| d.kind == Kind::Balloon)
        .and_then(|d| d.held_bytes))
}

/// The keeper's check of a balloon kept at `want` bytes, through `backend`: where it
/// holds less than that by more than a grain and the guest cannot have let it go on its
/// own (with `deflate-on-oom` it may deflate under memory pressure: only an empty
/// balloon — a reset, a new QEMU — counts there), what it is to hold and QEMU's target
/// for that; `None` where it is as kept, or there is no balloon.
pub async fn short(
    backend: &dyn MemoryBackend,
    sizes: Sizes,
    want: u64,
    floor: u64,
    until: Instant,
) -> Result<Option<(u64, u64)>, BackendError> {
    let Some(device) = backend.balloon(until).await? else {
        return Ok(None);
    };
    let held = sizes.keeps(want, floor);
    let now = sizes.held(device.actual);
    let short = now.saturating_add(GRAIN) < held;
    if !short || (device.deflate_on_oom && now > 0) {
        return Ok(None);
    }
    Ok(Some((held, sizes.ram - held)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sizes(boot: u64, dimms: u64, vmem: u64) -> Sizes {
        Sizes {
            ram: boot + dimms,
            total: boot + dimms + vmem,
        }
    }

    #[test]
    fn targets_off_the_grain_below_the_floor_or_above_the_memory_are_refused() {
        let s = sizes(512 * MIB, 0, 0);
        let floor = 256 * MIB;
        assert_eq!(check(256 * MIB, s, floor).ok(), Some(256 * MIB));
        assert_eq!(check(512 * MIB, s, floor).ok(), Some(0));
        for (target, says) in [
            (256 * MIB + 4096, "multiple of 1 MiB"),
            (128 * MIB, "below the balloon's floor"),
            (513 * MIB, "above the VM's memory"),
        ] {
            let e = check(target, s, floor).expect_err("refused");
            assert!(
                matches!(&e, BridgeError::InvalidRequest(m) if m.contains(says)),
                "{target}: {e}"
            );
        }
    }

    #[test]
    fn the_balloon_cannot_take_virtio_mem_memory() {
        // 512 MiB boot, 2 GiB in virtio-mem: the balloon holds at most 511 MiB.
        let s = sizes(512 * MIB, 0, 2048 * MIB);
        assert_eq!(check(2049 * MIB, s, 256 * MIB).ok(), Some(511 * MIB));
        let e = check(2048 * MIB, s, 256 * MIB).expect_err("refused");
        assert!(
            e.to_string().contains("virtio-mem memory is resized"),
            "{e}"
        );
    }

    #[test]
    fn a_dimm_plugged_or_unplugged_keeps_the_balloons_size() {
        // 256 MiB held of 512 MiB; a 512 MiB DIMM plugged: QEMU's target moves with it.
        let before = sizes(512 * MIB, 0, 0);
        let held = check(256 * MIB, before, 256 * MIB).expect("allowed");
        let after = sizes(512 * MIB, 512 * MIB, 0);
        assert_eq!(after.keeps(held, 256 * MIB), held);
        assert_eq!(after.ram - held, 768 * MIB);
        assert_eq!(after.usable(held), 768 * MIB);
        // 700 MiB held of 1 GiB; the DIMM unplugged: the guest keeps its floor.
        let plugged = sizes(512 * MIB, 512 * MIB, 0);
        let held = check(324 * MIB, plugged, 256 * MIB).expect("allowed");
        assert_eq!(held, 700 * MIB);
        let unplugged = sizes(512 * MIB, 0, 0);
        let kept = unplugged.keeps(held, 256 * MIB);
        assert_eq!((kept, unplugged.usable(kept)), (256 * MIB, 256 * MIB));
    }
}
