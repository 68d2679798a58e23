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
//!
//! Each interrupted operation then gets its final outcome in the journal, audited as
//! `recover`, and a retry of its request-id is answered with it: a plug whose DIMM was
//! kept succeeds with that DIMM; one that left none fails at step `interrupted`, nothing
//! plugged; an unplug succeeds (DIMM gone) or fails at `interrupted` (DIMM kept); a resize
//! fails at `interrupted`, the VM as `memory-layout` shows it.

use qga_wire::schema::GuestMemoryOnlineType;
use tokio::time::Instant;

use super::{
    Done, Effect, Hotplug, Target,
    ctx::Ctx,
    layout::{self, BlockState, Dimm, GuestView},
    outcome::Stored,
    plug,
};
use crate::{
    audit::{Audit, Caller, Record},
    backend::{DimmDevice, Step},
    call::hotplug_method,
    error::{BridgeError, Outcome},
    journal::{Entry, State, desired::Desired},
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
            if wanted.iter().any(|w| w.dimm == d.id) {
                continue;
            }
            let range = d.block_range(block_size);
            let desired = Desired {
                dimm: d.id.clone(),
                first_block: range.start,
                blocks: range.end - range.start,
                online_type: Some(GuestMemoryOnlineType::OnlineMovable),
            };
            self.journal
                .want(&ctx.vm, desired.clone())
                .await
                .map_err(|e| ctx.hotplug_error("journal", e.to_string()))?;
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
        // Offline blocks of kept DIMMs, adopted or desired before, come online now.
        let view = ctx.guest(caps).await?;
        for d in &kept {
            if !devices.iter().any(|x| x.id == d.dimm) {
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
            view,
        })
    }
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
    let was = found.wanted.iter().find(|w| w.dimm == id);
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
