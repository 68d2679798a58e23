//! The keeper of each VM's desired memory. A guest reboot leaves the blocks of the DIMMs
//! QEMU still holds offline (or, with a distribution's udev rule, online in the kernel
//! zone), and the blocks a virtio-mem driver plugs again at boot offline too (the guest's
//! `auto_online_blocks` is back at its boot value); so does an agent or anyone else
//! offlining them. Every `hotplug.restore_interval_ms` the keeper reads the blocks of each
//! VM whose memory the bridge plugged or resized ([`Desired`], in the journal) and onlines
//! the offline ones with their recorded online type, Movable by default. It works the
//! same with our agent and qemu-ga (through `guest-set-memory-blocks`) and over QMP or
//! libvirt, and notices a reboot within one interval of the agent answering again.
//!
//! A DIMM's blocks are all expected; a virtio-mem device's range is sparse (the blocks
//! its driver has not plugged are absent), so only its offline blocks count.
//!
//! Blocks online outside ZONE_MOVABLE when Movable was recorded are never silently
//! accepted: they are counted in `qga_bridge_memory_wrong_zone_blocks` and logged (the
//! layout shows them as not removable). A desired device QEMU no longer has (at that
//! address) is dropped from the journal.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::Duration,
};

use qga_wire::{schema::GuestMemoryOnlineType, sync::lock};
use tokio::time::Instant;

use super::{
    Done, Effect, Hotplug, Operation, Target, balloon,
    ctx::{Ctx, describe},
    layout::{BlockState, Dimm, GuestView},
    report::Background,
};
use crate::{
    error::BridgeError,
    hotplug::desired::{Desired, Kind},
    journal::{Journal, JournalError},
};

/// When each VM's desired memory was first seen not all online, for the restore time.
#[derive(Debug, Default)]
pub struct Pending(Mutex<HashMap<String, Instant>>);

/// The balloon targets the keeper set, per VM, and when: the same target is not set
/// again within [`BALLOON_AGAIN`] (a guest that cannot reach it, a driver not loaded yet).
#[derive(Debug, Default)]
pub struct BalloonSets(Mutex<HashMap<String, (u64, Instant)>>);

/// How long the keeper leaves a balloon target it set before setting it again.
const BALLOON_AGAIN: Duration = Duration::from_secs(60);

impl BalloonSets {
    /// Whether target `value` is to be set on VM `vm` now; if so, noted as set.
    fn due(&self, vm: &str, value: u64) -> bool {
        let mut sets = lock(&self.0);
        let due = sets
            .get(vm)
            .is_none_or(|&(v, at)| v != value || at.elapsed() >= BALLOON_AGAIN);
        if due {
            sets.insert(vm.to_string(), (value, Instant::now()));
        }
        due
    }
}

/// What one pass over a VM did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Blocks onlined again.
    pub restored: usize,
    /// Blocks online outside ZONE_MOVABLE although Movable was recorded.
    pub wrong_zone: usize,
    /// Every desired block is online.
    pub complete: bool,
}

/// The desired DIMM `dimm` describes, from the blocks the operation reported.
fn desired(dimm: &Dimm, online_type: Option<GuestMemoryOnlineType>) -> Option<Desired> {
    let first = dimm.blocks.first()?.phys_index;
    Some(Desired {
        device: dimm.device.id.clone(),
        kind: Kind::Dimm,
        first_block: first,
        blocks: dimm.blocks.len() as u64,
        online_type: online_type.or(Some(GuestMemoryOnlineType::OnlineMovable)),
        held_bytes: None,
    })
}

/// Records in `journal` what a successful `op` changed in VM `vm`'s desired memory.
pub async fn remember(
    journal: &Journal,
    vm: &str,
    op: &Operation,
    result: &Result<Done, BridgeError>,
) -> Result<(), JournalError> {
    let Ok(done) = result else {
        return Ok(());
    };
    match (op, &done.what) {
        (Operation::Plug(args), Effect::Dimm { dimm }) => {
            if let Some(d) = desired(dimm, args.online_type) {
                journal.want(vm, &d.device, &d).await?;
            }
        }
        (Operation::Unplug { dimm }, _) => journal.unwant(vm, dimm).await?,
        (Operation::Resize { .. }, Effect::Resized(r)) => {
            for dimm in &r.unplugged {
                journal.unwant(vm, &dimm.device.id).await?;
            }
            for d in r.plugged.iter().filter_map(|d| desired(d, None)) {
                journal.want(vm, &d.device, &d).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl Hotplug {
    /// One pass of the keeper over `target`, whose desired DIMMs are `wanted`: a
    /// background pass, skipped (empty) while a caller's operation holds or waits for the
    /// VM, and ended at the next device once one waits (the next pass does the rest).
    pub async fn restore(
        &self,
        target: Target<'_>,
        wanted: &[Desired],
    ) -> Result<Pass, BridgeError> {
        let Some(memory) = target.memory else {
            return Ok(Pass::default());
        };
        let Some(background) = memory.background() else {
            return Ok(Pass::default());
        };
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.settings.hotplug.appear_timeout_ms);
        let ctx = self.ctx(target.vm, &memory, target.session, Some(deadline));
        // The balloon needs the hypervisor only, not the agent: checked first, with its
        // size read now that the VM is held (a caller's memory-balloon may just have
        // changed it).
        if wanted.iter().any(|d| d.kind == Kind::Balloon)
            && let Err(e) = self.keep_balloon(&ctx).await
        {
            tracing::debug!(vm = ctx.vm, error = %e, "memory keeper: balloon not checked");
        }
        if !wanted.iter().any(|d| d.kind != Kind::Balloon) {
            return Ok(Pass {
                complete: true,
                ..Pass::default()
            });
        }
        let (pass, missing) = self.restore_blocks(&ctx, wanted, &background).await?;
        self.metrics
            .memory_kept(&ctx.vm, pass.restored, pass.wrong_zone);
        self.pending(&ctx.vm, started, missing, pass.complete);
        Ok(pass)
    }

    /// Onlines the offline blocks of the desired devices in `wanted` (see [`restore`]):
    /// the pass, and whether any was found missing.
    ///
    /// [`restore`]: Hotplug::restore
    async fn restore_blocks(
        &self,
        ctx: &Ctx,
        wanted: &[Desired],
        background: &super::lock::Background,
    ) -> Result<(Pass, bool), BridgeError> {
        let caps = ctx.capabilities().await?;
        let view = ctx.guest(caps).await?;
        let mut pass = Pass {
            complete: true,
            ..Pass::default()
        };
        let (mut missing, mut present) = (false, None);
        for d in wanted.iter().filter(|d| d.kind != Kind::Balloon) {
            if background.caller_waits() {
                pass.complete = false;
                break;
            }
            let offline = self.check(ctx, &view, d, &mut pass);
            let absent = match d.kind {
                Kind::Dimm => d
                    .range()
                    .filter(|&i| view.block(i).state == BlockState::Absent)
                    .count(),
                Kind::VirtioMem | Kind::Balloon => 0,
            };
            if offline.is_empty() && absent == 0 {
                continue;
            }
            missing = true;
            // Only blocks of a device QEMU still has, where the journal says, are touched.
            if present.is_none() {
                present = Some(self.present(ctx).await?);
            }
            // A device listed without an address (only virtio-mem) cannot be checked there.
            let here = match present.as_ref().and_then(|p| p.get(&d.device)) {
                Some(Some(first)) => *first == d.first_block,
                Some(None) => true,
                None => false,
            };
            if !here {
                tracing::info!(
                    vm = ctx.vm,
                    device = d.device,
                    "a memory device the bridge plugged or resized is gone: no longer kept"
                );
                self.journal
                    .unwant(&ctx.vm, &d.device)
                    .await
                    .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?;
                continue;
            }
            // Blocks the guest does not list yet (it is still booting) come next pass.
            let onlined = self.online(ctx, caps.online_type, d, &offline).await;
            pass.restored += onlined;
            pass.complete &= absent == 0 && onlined == offline.len();
        }
        Ok((pass, missing))
    }

    /// Sets the VM's balloon again where it holds less than the size kept (see
    /// [`balloon::short`]), at most once a minute for the same target; reported when it
    /// does.
    async fn keep_balloon(&self, ctx: &Ctx) -> Result<(), BridgeError> {
        let Some(want) = balloon::kept_size(ctx)? else {
            return Ok(());
        };
        let sizes = balloon::sizes(ctx).await?;
        let floor = self.settings.balloon.floor_bytes;
        let short = balloon::short(ctx.backend.as_ref(), sizes, want, floor, ctx.deadline).await;
        let Some((held, value)) = short.map_err(|e| ctx.backend_error(e))? else {
            return Ok(());
        };
        if !self.balloon_sets.due(&ctx.vm, value) {
            return Ok(());
        }
        let set = ctx.backend.set_balloon(value, ctx.deadline).await;
        let error = set.err().map(|e| e.to_string());
        self.witness.saw(&Background::Ballooned {
            vm: &ctx.vm,
            held,
            target: value,
            error: error.clone(),
        });
        tracing::info!(
            vm = ctx.vm,
            held,
            target = value,
            error,
            "set the balloon again to hold the size the bridge keeps"
        );
        Ok(())
    }

    /// The offline blocks of `d` in `view`; counts its blocks in the wrong zone.
    fn check(&self, ctx: &Ctx, view: &GuestView, d: &Desired, pass: &mut Pass) -> Vec<u64> {
        let mut offline = Vec::new();
        for i in d.range() {
            let b = view.block(i);
            match b.state {
                BlockState::Offline => offline.push(i),
                BlockState::Online
                    if b.movable() == Some(false)
                        && d.online_type == Some(GuestMemoryOnlineType::OnlineMovable) =>
                {
                    pass.wrong_zone += 1;
                    tracing::warn!(
                        vm = ctx.vm,
                        device = d.device,
                        block = i,
                        zones = b.valid_zones.join(" "),
                        "a block of memory the bridge plugged is online outside ZONE_MOVABLE: the guest cannot give it back"
                    );
                }
                _ => {}
            }
        }
        offline
    }

    /// QEMU's DIMMs and virtio-mem devices: id -> first block (`None`: a virtio-mem
    /// device whose address the hypervisor does not tell).
    async fn present(&self, ctx: &Ctx) -> Result<BTreeMap<String, Option<u64>>, BridgeError> {
        let block_size = ctx.block_size().await?;
        let dimms = ctx
            .dimms()
            .await?
            .into_iter()
            .map(|d| (d.id.clone(), Some(d.block_range(block_size).start)));
        let vmem = ctx.virtio_mem().await?.into_iter().map(|d| {
            let range = d.block_range(block_size);
            (d.id, (!range.is_empty()).then_some(range.start))
        });
        Ok(dimms.chain(vmem).collect())
    }

    /// Onlines `blocks` of `d`; how many came online. Reported either way.
    pub(super) async fn online(
        &self,
        ctx: &Ctx,
        can_choose: bool,
        d: &Desired,
        blocks: &[u64],
    ) -> usize {
        if blocks.is_empty() {
            return 0;
        }
        let online_type = d.online_type.filter(|_| can_choose);
        match ctx.set(blocks, true, online_type).await {
            Ok(failures) => {
                let error = (!failures.is_empty())
                    .then(|| failures.iter().map(describe).collect::<Vec<_>>().join("; "));
                self.witness.saw(&Background::Restored {
                    vm: &ctx.vm,
                    desired: d,
                    blocks,
                    error,
                });
                tracing::info!(
                    vm = ctx.vm,
                    device = d.device,
                    blocks = blocks.len(),
                    failed = failures.len(),
                    "onlined the offline blocks of memory the bridge plugged"
                );
                blocks.len() - failures.len()
            }
            Err(e) => {
                self.witness.saw(&Background::Restored {
                    vm: &ctx.vm,
                    desired: d,
                    blocks,
                    error: Some(e.to_string()),
                });
                0
            }
        }
    }

    /// Tracks when VM `vm`'s desired memory was first seen not all online (`missing`);
    /// once it all is (`complete`), observes how long restoring took.
    fn pending(&self, vm: &str, started: Instant, missing: bool, complete: bool) {
        let mut pending = lock(&self.pending.0);
        if missing {
            pending.entry(vm.to_string()).or_insert(started);
        }
        if complete && let Some(since) = pending.remove(vm) {
            self.metrics.memory_restored_in(since.elapsed());
        }
    }
}
