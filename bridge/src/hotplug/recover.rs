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
//! - A virtio-mem device whose plugged size has not reached its requested size (a resize
//!   stopped while the guest was plugging or unplugging) gets its `requested-size` set to
//!   what the guest holds when recovery looks, so QEMU and the guest stop there; every
//!   virtio-mem device becomes desired memory and its offline blocks come online, Movable.
//!
//! Each interrupted operation then gets its final outcome in the journal, audited as
//! `recover`, and a retry of its request-id is answered with it: a plug whose DIMM was
//! kept succeeds with that DIMM; one that left none fails at step `interrupted`, nothing
//! plugged; an unplug succeeds (DIMM gone) or fails at `interrupted` (DIMM kept); a resize
//! fails at `interrupted`, naming the size the VM was left at (`memory-layout` shows it).

use qga_wire::schema::GuestMemoryOnlineType;
use tokio::time::Instant;

use super::{
    Done, Effect, Hotplug, Target,
    ctx::Ctx,
    layout::{self, BlockState, Dimm, GuestView},
    outcome::Stored,
    plug, virtio_mem,
};
use crate::{
    audit::{Audit, Caller, Record},
    backend::{DimmDevice, Step, VirtioMemDevice},
    call::hotplug_method,
    error::{BridgeError, Outcome},
    journal::{
        Entry, State,
        desired::{Desired, Kind},
    },
};

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
    /// The VM's virtio-mem devices before recovery.
    virtio_mem: Vec<VirtioMemDevice>,
    view: GuestView,
}

impl Hotplug {
    /// Recovers the interrupted operations `entries` (raw journal key, entry) of
    /// `target`. Nothing happens while an operation runs on the VM or without a memory
    /// backend: they stay pending for the next pass.
    pub async fn recover(
        &self,
        target: Target<'_>,
        entries: &[(String, Entry)],
    ) -> Result<(), BridgeError> {
        let Some(memory) = target.memory else {
            return Ok(());
        };
        let Some(_guard) = memory.try_hold() else {
            return Ok(());
        };
        let deadline =
            Instant::now() + std::time::Duration::from_millis(self.settings.hotplug.timeout_ms);
        let mut ctx = self.ctx(target.vm, &memory, target.session, Some(deadline));
        let found = self.converge(&mut ctx).await?;
        for (raw, entry) in entries {
            let stored = outcome(&ctx, entry, &found);
            let result = stored.result(&ctx.vm);
            let ended = Entry {
                state: State::Ended(serde_json::to_value(&stored).unwrap_or_default()),
                ..entry.clone()
            };
            self.journal
                .recovered(raw, ended)
                .await
                .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?;
            record(&self.audit, &ctx.vm, entry, &result);
            tracing::warn!(
                vm = ctx.vm,
                method = entry.method,
                outcome = Outcome::of(&result).as_str(),
                "recovered an operation a stopped bridge left unfinished"
            );
        }
        Ok(())
    }

    /// Brings the VM to one state (see the module docs); what it found.
    async fn converge(&self, ctx: &mut Ctx) -> Result<Found, BridgeError> {
        let block_size = ctx.block_size().await?;
        let caps = ctx.capabilities().await?;
        let devices = ctx.dimms().await?;
        let wanted: Vec<Desired> = self
            .journal
            .wanted()
            .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?
            .into_iter()
            .filter(|(vm, _)| *vm == ctx.vm)
            .map(|(_, d)| d)
            .collect();
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
        let vmem = ctx.virtio_mem().await?;
        kept.extend(settle_virtio_mem(ctx, &vmem, block_size).await?);
        // Offline blocks of kept devices, adopted or desired before, come online now.
        let view = ctx.guest(caps).await?;
        for d in &kept {
            let here = match d.kind {
                Kind::Dimm => devices.iter().any(|x| x.id == d.device),
                Kind::VirtioMem => vmem.iter().any(|x| x.id == d.device),
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
            view,
        })
    }
}

/// Sets each of `devices` whose plugged size is not its requested size to the plugged
/// size (see the module docs), and records every one as desired memory; those records.
async fn settle_virtio_mem(
    ctx: &Ctx,
    devices: &[VirtioMemDevice],
    block_size: u64,
) -> Result<Vec<Desired>, BridgeError> {
    for d in devices {
        if d.requested_size != d.plugged_size {
            ctx.backend
                .set_requested_size(&d.id, d.plugged_size, ctx.deadline)
                .await
                .map_err(|e| ctx.backend_error(e))?;
            tracing::warn!(
                vm = ctx.vm,
                device = d.id,
                requested = d.requested_size,
                plugged = d.plugged_size,
                "a virtio-mem request left by a stopped bridge is withdrawn: requested-size set to what the guest holds"
            );
        }
    }
    virtio_mem::keep(ctx, devices, block_size).await
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
        _ if !found.virtio_mem.is_empty() => interrupted(format!(
            "the bridge stopped during this {}; the next one left VM '{}' with {} and \
             onlined that memory: memory-layout shows the VM",
            entry.method,
            ctx.vm,
            found
                .virtio_mem
                .iter()
                .map(|d| {
                    let was = if d.requested_size == d.plugged_size {
                        String::new()
                    } else {
                        format!(" (its request for {} withdrawn)", d.requested_size)
                    };
                    format!(
                        "virtio-mem device '{}' at {} bytes{was}",
                        d.id, d.plugged_size
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
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

/// One audit line for a recovered operation.
fn record(audit: &Audit, vm: &str, entry: &Entry, result: &Result<Done, BridgeError>) {
    let caller = Caller {
        transport: "recovery",
        peer: None,
        identity: None,
    };
    audit.record(&Record {
        vm: Some(vm),
        method: Some("memory-recover"),
        arguments: Some(serde_json::json!({"method": entry.method, "arguments": entry.args})),
        error: result.as_ref().err().map(ToString::to_string),
        results: result
            .as_ref()
            .ok()
            .and_then(|d| serde_json::to_value(d).ok()),
        ..Audit::base("recover", &caller, Outcome::of(result).as_str())
    });
}
