//! Recovery of operations a bridge stopped during (a crash, `kill -9`, a host restart).
//!
//! The journal holds each such operation's intent, not a log of its steps: what it left
//! is read from QEMU (or libvirt) and the guest, which are the truth, then brought to
//! one documented state, with the VM's lock held:
//!
//! - DIMMs the bridge names (`qga-dimmN`, `ua-qga-dimmN`) that QEMU has and the desired
//!   memory lacks were plugged by the interrupted operation: they are kept (finished),
//!   added to the desired memory and their blocks onlined, Movable.
//! - Memory backends the bridge made that no DIMM uses (a plug stopped between
//!   `object-add` and `device_add`, an unplug between the eject and `object-del`) are
//!   deleted.
//! - A DIMM an interrupted unplug named that QEMU still has stays, its blocks online again
//!   (undone); one QEMU no longer has is gone (finished).
//! - When a resize was interrupted, a virtio-mem device whose plugged size has not reached
//!   its requested size (the guest was plugging or unplugging) gets its `requested-size`
//!   set to what the guest holds when recovery looks, so QEMU and the guest stop there.
//!   Recovery then waits until QEMU's size stands at that request — the guest's driver may
//!   finish a piece it had under way and plug back up to it — for at most
//!   [`virtio_mem::WITHDRAW_WAIT`] (10 s; see [`virtio_mem::withdraw`] for a size still
//!   moving then), so that the answer names the state the VM stays in, however fast the
//!   guest is. Other operations never set a request, so they leave the requests alone (a
//!   guest still plugging at boot is not cut short). Every virtio-mem device becomes
//!   desired memory and its offline blocks come online, Movable.
//!
//! Recovery is the bridge's own work: the keeper's first pass after a restart runs it,
//! and a retry of an interrupted request-id that comes before that pass runs it at once
//! (a retry that comes during it waits for it). Either way the retry is answered with the
//! recovered outcome, never with a second run. Whoever recovers a VM reads its
//! interrupted operations while holding it, and the journal records each outcome once,
//! so an operation is recovered once and its answer never changes. Each interrupted
//! operation gets its final outcome in the journal, audited as `recover`, and a retry of
//! its request-id is answered with it from then on: a plug whose DIMM was
//! kept succeeds with that DIMM; one that left none fails at step `interrupted`, nothing
//! plugged; an unplug succeeds (DIMM gone) or fails at `interrupted` (DIMM kept); a resize
//! fails at `interrupted`, naming the size the VM was left at (`memory-layout` shows it).

use std::sync::Arc;

use qga_wire::schema::GuestMemoryOnlineType;
use tokio::time::Instant;

use super::{
    Done, Effect, Hotplug, Target, balloon,
    ctx::Ctx,
    layout::{self, BlockState, Dimm, GuestView},
    lock::Held,
    memory::VmMemory,
    outcome::Stored,
    plug,
    report::Background,
    virtio_mem,
};
use crate::{
    backend::{DimmDevice, Step, VirtioMemDevice},
    call::hotplug_method,
    error::{BridgeError, Outcome},
    hotplug::desired::{Desired, Kind},
    journal::{Entry, State},
    session::Session,
};

/// A recovery that failed outside its steps (its task).
fn recovery_failed(vm: &str, reason: String) -> BridgeError {
    BridgeError::Hotplug {
        vm: vm.to_string(),
        step: "recover".into(),
        reason,
        blocks: Vec::new(),
    }
}

/// Whether the bridge named DIMM `id`.
fn ours(id: &str) -> bool {
    id.starts_with("qga-dimm") || id.starts_with("ua-qga-dimm")
}

/// What recovery found, for the outcomes.
struct Found {
    block_size: u64,
    devices: Vec<DimmDevice>,
    /// DIMMs kept for the interrupted operation.
    adopted: Vec<DimmDevice>,
    /// The desired memory before recovery.
    wanted: Vec<Desired>,
    /// The VM's virtio-mem devices after recovery.
    virtio_mem: Vec<VirtioMemDevice>,
    /// The requests recovery withdrew.
    withdrawn: Vec<virtio_mem::Withdrawn>,
    view: GuestView,
}

impl Hotplug {
    /// Recovers the interrupted operations of `target`, as a background pass: nothing
    /// happens while a caller's operation holds or waits for the VM, or without a memory
    /// backend; they stay pending for the next pass (or the retry of one of their
    /// request-ids recovers them).
    pub async fn recover(&self, target: Target<'_>) -> Result<(), BridgeError> {
        let Some(memory) = target.memory else {
            return Ok(());
        };
        let Some(_pass) = memory.background() else {
            return Ok(());
        };
        self.recover_held(target.vm, &memory, target.session)
            .await
            .map(drop)
    }

    /// Recovers VM `vm`, which the retry of an interrupted operation holds, by `until`:
    /// each recovered operation's raw key and outcome. The recovery runs in a task of its
    /// own, holding the VM, so a caller that leaves or whose deadline passes does not cut
    /// it; such a caller's retry gets the outcome once it is recorded.
    pub(super) async fn recover_now(
        &self,
        vm: &str,
        memory: Arc<VmMemory>,
        session: Arc<Session>,
        held: Held,
        until: Instant,
    ) -> Result<Vec<(String, Stored)>, BridgeError> {
        let this = self.clone();
        let name = vm.to_string();
        let task = tokio::spawn(async move {
            let r = this.recover_held(&name, &memory, session).await;
            drop(held);
            r
        });
        let recovered = match tokio::time::timeout_at(until, task).await {
            Ok(joined) => joined.unwrap_or_else(|e| {
                Err(recovery_failed(
                    vm,
                    format!("the recovery's task failed: {e}"),
                ))
            }),
            Err(_) => {
                return Err(BridgeError::Aborted(format!(
                    "the operation with this request-id on VM '{vm}' was interrupted by a \
                     bridge restart and its recovery outlasted the call's deadline; retry \
                     with the same request-id for its outcome"
                )));
            }
        };
        recovered.map_err(|e| {
            tracing::warn!(vm, error = %e, "cannot recover an interrupted operation yet");
            BridgeError::Aborted(format!(
                "the operation with this request-id on VM '{vm}' was interrupted by a bridge \
                 restart and cannot be recovered yet ({e}); retry with the same request-id \
                 for its outcome"
            ))
        })
    }

    /// Recovers the interrupted operations of VM `vm`, which the caller holds, as the
    /// journal lists them now (another pass may have recovered some meanwhile); each
    /// one's raw key and outcome.
    async fn recover_held(
        &self,
        vm: &str,
        memory: &VmMemory,
        session: Arc<Session>,
    ) -> Result<Vec<(String, Stored)>, BridgeError> {
        let entries = self.journal.interrupted_on(vm);
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let deadline =
            Instant::now() + std::time::Duration::from_millis(self.settings.hotplug.timeout_ms);
        let mut ctx = self.ctx(vm, memory, session, Some(deadline));
        // Only a resize sets a virtio-mem device's request; a request another operation
        // left unmet is the guest's own business (it may be booting and plugging still).
        let withdraw = entries
            .iter()
            .any(|(_, e)| e.method == hotplug_method::RESIZE);
        let found = self.converge(&mut ctx, withdraw).await?;
        // An interrupted memory-balloon recorded the balloon's size before it asked QEMU:
        // that size is asked for again (the balloon's driver follows on its own).
        if entries
            .iter()
            .any(|(_, e)| e.method == hotplug_method::BALLOON)
            && let Err(e) = balloon::rebalance(&mut ctx).await
        {
            // The other operations' outcomes are recorded all the same; the keeper sets
            // the balloon again.
            tracing::warn!(vm, error = %e, "cannot ask for the recorded balloon size again");
        }
        let mut outcomes = Vec::new();
        for (raw, entry) in entries {
            let stored = outcome(&ctx, &entry, &found);
            let result = stored.result(&ctx.vm);
            let ended = Entry {
                state: State::Ended(serde_json::to_value(&stored).unwrap_or_default()),
                ..entry.clone()
            };
            let recorded = self
                .journal
                .recovered(&raw, ended)
                .await
                .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?;
            if recorded {
                self.witness.saw(&Background::Recovered {
                    vm: &ctx.vm,
                    method: &entry.method,
                    arguments: &entry.args,
                    result: &result,
                });
                tracing::warn!(
                    vm = ctx.vm,
                    method = entry.method,
                    outcome = Outcome::of(&result).as_str(),
                    "recovered an operation a stopped bridge left unfinished"
                );
            }
            outcomes.push((raw, stored));
        }
        Ok(outcomes)
    }

    /// Brings the VM to one state (see the module docs), withdrawing unmet virtio-mem
    /// requests if `withdraw`; what it found.
    async fn converge(&self, ctx: &mut Ctx, withdraw: bool) -> Result<Found, BridgeError> {
        let block_size = ctx.block_size().await?;
        let caps = ctx.capabilities().await?;
        let devices = ctx.dimms().await?;
        let wanted: Vec<Desired> = self
            .journal
            .wanted_by(&ctx.vm)
            .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?;
        let (mut adopted, mut kept) = (Vec::new(), wanted.clone());
        for d in devices.iter().filter(|d| ours(&d.id)) {
            if wanted.iter().any(|w| w.device == d.id) {
                continue;
            }
            let range = d.block_range(block_size);
            let desired = Desired {
                device: d.id.clone(),
                kind: Kind::Dimm,
                first_block: range.start,
                blocks: range.end - range.start,
                online_type: Some(GuestMemoryOnlineType::OnlineMovable),
                held_bytes: None,
            };
            ctx.want(desired.clone()).await?;
            kept.push(desired);
            adopted.push(d.clone());
        }
        if let Some((_, e)) = plug::remove_orphans(ctx, &devices)
            .await?
            .into_iter()
            .next()
        {
            return Err(ctx.backend_error(e));
        }
        let (vmem, withdrawn) = settle_virtio_mem(ctx, block_size, withdraw, &mut kept).await?;
        // Offline blocks of kept devices, adopted or desired before, come online now.
        let view = ctx.guest(caps).await?;
        for d in &kept {
            let here = match d.kind {
                Kind::Dimm => devices.iter().any(|x| x.id == d.device),
                Kind::VirtioMem => vmem.iter().any(|x| x.id == d.device),
                Kind::Balloon => false,
            };
            if !here {
                continue;
            }
            let offline: Vec<u64> = d
                .range()
                .filter(|&i| view.block(i).state == BlockState::Offline)
                .collect();
            self.online(ctx, caps.online_type, d, &offline).await;
        }
        let view = ctx.guest(caps).await?;
        Ok(Found {
            block_size,
            devices,
            adopted,
            wanted,
            virtio_mem: vmem,
            withdrawn,
            view,
        })
    }
}

/// Withdraws the requests of the VM's virtio-mem devices that the guest has not met, if
/// `withdraw` (see the module docs and [`virtio_mem::withdraw`]: bounded by
/// [`virtio_mem::WITHDRAW_WAIT`]), and records every device in `kept` as desired memory;
/// the devices as they are then, and the requests withdrawn.
async fn settle_virtio_mem(
    ctx: &mut Ctx,
    block_size: u64,
    withdraw: bool,
    kept: &mut Vec<Desired>,
) -> Result<(Vec<VirtioMemDevice>, Vec<virtio_mem::Withdrawn>), BridgeError> {
    let before = ctx.virtio_mem().await?;
    let (now, withdrawn) = if withdraw {
        virtio_mem::withdraw(ctx, &before).await
    } else {
        (before, Vec::new())
    };
    for w in &withdrawn {
        if let Some(e) = &w.failed {
            return Err(ctx.hotplug_error(
                "recover",
                format!(
                    "cannot withdraw the request of virtio-mem device '{}': {e}",
                    w.id
                ),
            ));
        }
        let size = now
            .iter()
            .find(|d| d.id == w.id)
            .map_or(0, |d| d.requested_size);
        tracing::warn!(
            vm = ctx.vm,
            device = w.id,
            requested = w.requested,
            now = size,
            "a virtio-mem request left by a stopped bridge is withdrawn: requested-size set to what the guest holds"
        );
    }
    kept.extend(virtio_mem::keep(ctx, &now, block_size).await?);
    Ok((now, withdrawn))
}

/// The failure an interrupted operation ends with.
fn interrupted(reason: String) -> Stored {
    Stored::Hotplug {
        step: "interrupted".into(),
        reason,
        blocks: Vec::new(),
    }
}

/// What became of interrupted operation `entry`, from what recovery `found`.
fn outcome(ctx: &Ctx, entry: &Entry, found: &Found) -> Stored {
    let recovered = |what: Effect, note: &str| {
        Stored::Done(Done {
            what,
            steps: vec![Step {
                name: "recover".into(),
                duration_ms: 0.0,
                detail: note.to_string(),
            }],
            warnings: vec![format!(
                "the bridge stopped during this {}; the next one {note}",
                entry.method
            )],
        })
    };
    let dimm = |d: &DimmDevice| -> Dimm { layout::dimm(d, found.block_size, &found.view) };
    match entry.method.as_str() {
        hotplug_method::PLUG => match found.adopted.first() {
            Some(d) => recovered(
                Effect::Dimm { dimm: dimm(d) },
                "found its DIMM in the VM and kept it (its blocks are onlined, movable, as the guest lists them)",
            ),
            None => interrupted(format!(
                "the bridge stopped during this plug on VM '{}' before its DIMM was added; \
                 nothing was left plugged",
                ctx.vm
            )),
        },
        hotplug_method::UNPLUG => {
            let id = entry.args["dimm"].as_str().unwrap_or_default();
            match found.devices.iter().find(|d| d.id == id) {
                Some(_) => interrupted(format!(
                    "the bridge stopped during this unplug; the DIMM '{id}' is still in VM \
                     '{}' and its blocks are online again",
                    ctx.vm
                )),
                None => recovered(
                    Effect::Dimm {
                        dimm: gone(id, found),
                    },
                    "found the DIMM gone from the VM and finished it",
                ),
            }
        }
        hotplug_method::BALLOON => interrupted(format!(
            "the bridge stopped during this memory-balloon; the next one asked QEMU again for \
             the balloon size it had recorded for VM '{}' (the guest's driver moves the balloon \
             there): memory-layout shows the balloon",
            ctx.vm
        )),
        _ if !found.virtio_mem.is_empty() => interrupted(format!(
            "the bridge stopped during this {}; the next one left VM '{}' with {} and \
             onlined that memory: memory-layout shows the VM",
            entry.method,
            ctx.vm,
            virtio_mem_left(found)
        )),
        _ => interrupted(format!(
            "the bridge stopped during this {}; the next one kept the DIMMs VM '{}' has \
             ({} of them plugged by it) and onlined them: memory-layout shows the VM",
            entry.method,
            ctx.vm,
            found.adopted.len()
        )),
    }
}

/// The virtio-mem devices recovery left, each at its size and with the request it
/// withdrew, for a person reading the answer.
fn virtio_mem_left(found: &Found) -> String {
    found
        .virtio_mem
        .iter()
        .map(|d| {
            let was = match found.withdrawn.iter().find(|w| w.id == d.id) {
                Some(w) => format!(" (its request for {} withdrawn)", w.requested),
                None => String::new(),
            };
            format!(
                "virtio-mem device '{}' at {} bytes{was}",
                d.id, d.requested_size
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// DIMM `id`, gone from the VM, as the desired memory knew it: where it was, how big.
fn gone(id: &str, found: &Found) -> Dimm {
    let was = found.wanted.iter().find(|w| w.device == id);
    let (addr, size) = was.map_or((0, 0), |w| {
        (
            w.first_block * found.block_size,
            w.blocks * found.block_size,
        )
    });
    Dimm {
        device: DimmDevice {
            id: id.to_string(),
            addr,
            size,
            node: 0,
            slot: 0,
            memdev: String::new(),
            hotplugged: true,
            hotpluggable: true,
        },
        blocks: Vec::new(),
        removable: None,
    }
}
