//! The hotplug operations, step by step: each either completes or undoes what it did.
//!
//! Plug: `object-add`, `device_add` (libvirt: one live attach), wait for the DIMM's
//! blocks, online them, verify. Unplug: offline the DIMM's blocks (retrying EBUSY),
//! `device_del` (libvirt: a live detach), wait for `DEVICE_DELETED` (libvirt:
//! device-removed), `object-del` (libvirt deletes the backend itself). Resize: unplugs newest DIMMs first, then plugs, until
//! the VM's memory equals the target.

use std::{sync::Arc, time::Duration};

use qga_wire::schema::{
    GuestMemoryBlock, GuestMemoryBlockResponse, GuestMemoryBlockResponseType,
    GuestMemoryOnlineType, command,
};
use serde::Serialize;
use tokio::time::Instant;

use super::{
    Vmm,
    layout::{self, BlockState, Dimm, DimmDevice, GuestView},
    qemu::{self, EjectWatch, Ejection, NotAdded},
};
use crate::{
    call::{BlockChanges, Call, Reply},
    config,
    error::BridgeError,
    session::Session,
};

/// One step an operation took.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Step {
    /// What it was (`object-add`, `device_add`, `wait-blocks`, `online`, ...).
    pub name: &'static str,
    /// How long it took.
    pub duration_ms: f64,
    /// What it did.
    pub detail: String,
}

/// What the agent offers beyond QGA.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    /// `__org.qga-bridge_get-memory-zones`.
    pub zones: bool,
    /// `__org.qga-bridge_set-memory-blocks`.
    pub online_type: bool,
}

/// Everything an operation works with, and what it has done so far.
#[derive(Debug)]
pub struct Ctx {
    /// The VM.
    pub vm: String,
    /// Its agent.
    pub session: Arc<Session>,
    /// Its QEMU, over QMP or through libvirt.
    pub vmm: Vmm,
    /// Timeouts and sizes.
    pub settings: config::Hotplug,
    /// Largest set the bridge sends.
    pub max_set_entries: usize,
    /// The whole operation's deadline.
    pub deadline: Instant,
    /// Steps taken.
    pub steps: Vec<Step>,
    /// Things worth knowing that did not stop the operation.
    pub warnings: Vec<String>,
}

/// How often a busy channel is tried again.
const BUSY_PAUSE: Duration = Duration::from_millis(200);

/// Time given to undoing a failed operation, beyond the eject and QMP timeouts: the
/// operation's own deadline may be what failed it.
const UNDO_EXTRA: Duration = Duration::from_secs(30);

/// Linux errno names for the codes offlining reports.
fn errno(code: i64) -> String {
    let name = match code {
        1 => "EPERM",
        11 => "EAGAIN",
        13 => "EACCES",
        16 => "EBUSY",
        22 => "EINVAL",
        _ => return format!("errno {code}"),
    };
    format!("{name} (errno {code})")
}

fn describe(r: &GuestMemoryBlockResponse) -> String {
    let what = match r.response {
        GuestMemoryBlockResponseType::Success => "success",
        GuestMemoryBlockResponseType::NotFound => "not found",
        GuestMemoryBlockResponseType::OperationNotSupported => "operation not supported",
        GuestMemoryBlockResponseType::OperationFailed => "operation failed",
    };
    match r.error_code {
        Some(code) => format!("block {}: {what}, {}", r.phys_index, errno(code)),
        None => format!("block {}: {what}", r.phys_index),
    }
}

/// Whether a failed offlining is worth another try: page migration can need several.
fn transient(r: &GuestMemoryBlockResponse) -> bool {
    r.response == GuestMemoryBlockResponseType::OperationFailed
        && matches!(r.error_code, Some(16 | 11))
}

impl Ctx {
    fn hotplug_error(&self, step: &str, reason: String) -> BridgeError {
        BridgeError::Hotplug {
            vm: self.vm.clone(),
            step: step.to_string(),
            reason,
            blocks: Vec::new(),
        }
    }

    /// Records a step that started at `start`.
    pub fn step(&mut self, name: &'static str, start: Instant, detail: String) {
        self.steps.push(Step {
            name,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            detail,
        });
    }

    /// Calls the agent. A read is bounded by the operation's deadline; a write, once
    /// sent, gets the command's whole configured time, since cutting it short would leave
    /// the guest changing while the bridge believes the step failed. A channel busy with an
    /// earlier write's late outcome is waited for, within the deadline.
    async fn agent(&self, call: Call) -> Result<Reply, BridgeError> {
        let deadline = call.is_read().then_some(self.deadline);
        loop {
            match self.session.call(call.clone(), deadline).await {
                Err(BridgeError::Busy { .. }) if Instant::now() + BUSY_PAUSE < self.deadline => {
                    tokio::time::sleep(BUSY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// The guest's block size.
    pub async fn block_size(&self) -> Result<u64, BridgeError> {
        match self.agent(Call::GetMemoryBlockInfo).await? {
            Reply::GetMemoryBlockInfo(info) if info.size > 0 => Ok(info.size),
            _ => Err(BridgeError::BadReply {
                vm: self.vm.clone(),
                reason: "no usable block size".into(),
            }),
        }
    }

    /// Which extensions the agent lists (and has enabled) in `guest-info`.
    pub async fn capabilities(&self) -> Result<Capabilities, BridgeError> {
        let Reply::Info(info) = self.agent(Call::Info).await? else {
            return Ok(Capabilities::default());
        };
        let has = |name: &str| {
            info.supported_commands
                .iter()
                .any(|c| c.name == name && c.enabled)
        };
        Ok(Capabilities {
            zones: has(command::GET_MEMORY_ZONES),
            online_type: has(command::SET_MEMORY_BLOCKS_ONLINE_TYPE),
        })
    }

    /// The guest's blocks, without zones.
    async fn blocks(&self) -> Result<GuestView, BridgeError> {
        match self.agent(Call::GetMemoryBlocks).await? {
            Reply::GetMemoryBlocks(blocks) => Ok(GuestView::new(&blocks, None)),
            _ => Ok(GuestView::default()),
        }
    }

    /// The guest's blocks, with zones when the agent reports them.
    pub async fn guest(&self, caps: Capabilities) -> Result<GuestView, BridgeError> {
        if !caps.zones {
            return self.blocks().await;
        }
        // The zones reply lists every block with its state, as guest-get-memory-blocks
        // does: one agent call gives both.
        match self.agent(Call::GetMemoryZones).await? {
            Reply::MemoryZones(zones) => {
                let blocks: Vec<GuestMemoryBlock> = zones
                    .blocks
                    .iter()
                    .map(|b| GuestMemoryBlock {
                        phys_index: b.phys_index,
                        online: b.online,
                        can_offline: None,
                    })
                    .collect();
                Ok(GuestView::new(&blocks, Some(zones)))
            }
            _ => Ok(GuestView::default()),
        }
    }

    /// Onlines or offlines `indices` (onlining as `online_type`, or as the agent is
    /// configured when `None`); the failures.
    async fn set(
        &self,
        indices: &[u64],
        online: bool,
        online_type: Option<GuestMemoryOnlineType>,
    ) -> Result<Vec<GuestMemoryBlockResponse>, BridgeError> {
        let mut failures = Vec::new();
        for chunk in indices.chunks(self.max_set_entries.max(1)) {
            let changes = BlockChanges::new(chunk.iter().map(|&i| (i, online)), chunk.len())?;
            let call = match online_type {
                Some(t) if online => Call::SetMemoryBlocksOnlineType(changes, t),
                _ => Call::SetMemoryBlocks(changes),
            };
            if let Reply::SetMemoryBlocks(results) = self.agent(call).await? {
                failures.extend(
                    results
                        .into_iter()
                        .filter(|r| r.response != GuestMemoryBlockResponseType::Success),
                );
            }
        }
        Ok(failures)
    }

    /// The deadline of one phase: `limit` from now, never past the operation's.
    fn phase(&self, limit_ms: u64) -> Instant {
        (Instant::now() + Duration::from_millis(limit_ms)).min(self.deadline)
    }
}

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
    let devices = qemu::dimms(ctx).await?;
    qemu::check_room(ctx, &devices, args.size).await?;
    let memdevs = remove_orphans(ctx, &devices).await?;
    let (dimm_id, mem_id) =
        match qemu::add_dimm(ctx, &devices, &memdevs, args.size, args.node).await {
            Ok(ids) => ids,
            Err(NotAdded::Refused(e)) => return Err(e),
            Err(NotAdded::Unknown(e, dimm_id, mem_id)) => {
                let undo = undo_plug(ctx, &dimm_id, &mem_id, block_size).await;
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

/// Backends this bridge made (`qga-memN`) that no DIMM uses: left by a DIMM the guest
/// ejected after its unplug had given up. Deleted (best effort); the remaining backend ids
/// are returned.
async fn remove_orphans(ctx: &mut Ctx, devices: &[DimmDevice]) -> Result<Vec<String>, BridgeError> {
    let mut memdevs = qemu::memdev_ids(ctx).await?;
    let orphans: Vec<String> = memdevs
        .iter()
        .filter(|m| m.starts_with("qga-mem") && !devices.iter().any(|d| &d.memdev == *m))
        .cloned()
        .collect();
    for orphan in orphans {
        let start = Instant::now();
        match qemu::object_del(ctx, &orphan).await {
            Ok(()) => {
                memdevs.retain(|m| *m != orphan);
                ctx.step(
                    "object-del",
                    start,
                    format!("{orphan}, left by an earlier unplug"),
                );
            }
            Err(e) => {
                tracing::warn!(vm = %ctx.vm, backend = %orphan, error = %e, "cannot delete an unused backend");
            }
        }
    }
    Ok(memdevs)
}

/// Adds what undoing did (or failed to do) to an operation's error. When undoing failed,
/// the VM is not as it was, so the error becomes a final hotplug failure (remembered for
/// the request-id) whatever it was, and says what may be left.
fn with_undo(e: BridgeError, undo: Result<(), String>) -> BridgeError {
    match (e, undo) {
        (
            BridgeError::Hotplug {
                vm,
                step,
                reason,
                blocks,
            },
            undo,
        ) => {
            let note = match undo {
                Ok(()) => "; undone: the VM is as it was".to_string(),
                Err(why) => format!("; undoing failed too, the VM may keep part of it: {why}"),
            };
            BridgeError::Hotplug {
                vm,
                step,
                reason: reason + &note,
                blocks,
            }
        }
        (other, Ok(())) => other,
        (other, Err(why)) => BridgeError::Hotplug {
            vm: match &other {
                BridgeError::Unavailable { vm, .. }
                | BridgeError::DeadlineExceeded { vm, .. }
                | BridgeError::BadReply { vm, .. }
                | BridgeError::Busy { vm, .. } => vm.clone(),
                _ => String::new(),
            },
            step: "undo".into(),
            reason: format!("{other}; undoing failed too, the VM may keep part of it: {why}"),
            blocks: Vec::new(),
        },
    }
}

/// Waits for the new DIMM's blocks and onlines them.
async fn online_new(
    ctx: &mut Ctx,
    dimm_id: &str,
    block_size: u64,
    online_type: Option<GuestMemoryOnlineType>,
    caps: Capabilities,
) -> Result<Dimm, BridgeError> {
    let device = qemu::dimms(ctx)
        .await?
        .into_iter()
        .find(|d| d.id == dimm_id)
        .ok_or_else(|| ctx.hotplug_error("device_add", "QEMU does not list the new DIMM".into()))?;
    let range = device.block_range(block_size);
    let start = Instant::now();
    let until = ctx.phase(ctx.settings.appear_timeout_ms);
    // The guest sees a DIMM a few hundred milliseconds after device_add: poll the block
    // list (one cheap agent call) often, and read zones once all blocks are there.
    let mut pause = Duration::from_millis(10);
    loop {
        let view = ctx.blocks().await?;
        let seen = range
            .clone()
            .filter(|&i| view.block(i).state != BlockState::Absent)
            .count();
        if seen == range.clone().count() {
            break;
        }
        if Instant::now() + pause > until {
            return Err(ctx.hotplug_error(
                "wait-blocks",
                format!(
                    "{seen} of the DIMM's {} blocks ({}-{}) appeared in the guest within {} ms",
                    range.clone().count(),
                    range.start,
                    range.end.saturating_sub(1),
                    start.elapsed().as_millis()
                ),
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(40));
    }
    let view = ctx.guest(caps).await?;
    ctx.step(
        "wait-blocks",
        start,
        format!("blocks {}-{}", range.start, range.end.saturating_sub(1)),
    );
    let mut offline = Vec::new();
    for i in range.clone() {
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

/// Takes a half-plugged DIMM out again, on a budget of its own: the operation's deadline
/// may be what failed it.
async fn undo_plug(
    ctx: &mut Ctx,
    dimm_id: &str,
    mem_id: &str,
    block_size: u64,
) -> Result<(), String> {
    ctx.deadline = Instant::now() + undo_budget(&ctx.settings);
    let device = qemu::dimms(ctx)
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
    let memdevs = qemu::memdev_ids(ctx).await.map_err(|e| e.to_string())?;
    if memdevs.iter().any(|m| m == mem_id) {
        qemu::object_del(ctx, mem_id)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Time for undoing: ejecting, some QMP commands, and the agent calls around them.
fn undo_budget(s: &config::Hotplug) -> Duration {
    Duration::from_millis(
        s.eject_timeout_ms
            .saturating_add(s.qmp_timeout_ms.saturating_mul(3)),
    ) + UNDO_EXTRA
}

/// Whether QEMU still lists DIMM `dimm_id`, asked on a budget of its own (the
/// operation's deadline may have passed). If QEMU cannot be asked, it counts as plugged.
async fn still_plugged(ctx: &mut Ctx, dimm_id: &str) -> bool {
    ctx.deadline = ctx
        .deadline
        .max(Instant::now() + Duration::from_millis(ctx.settings.qmp_timeout_ms));
    qemu::dimms(ctx)
        .await
        .map_or(true, |d| d.iter().any(|d| d.id == dimm_id))
}

/// Why offlining stopped.
#[derive(Debug)]
struct OfflineFailed {
    /// The blocks the guest refused, with its errno.
    refused: Vec<GuestMemoryBlockResponse>,
    /// The agent could not be asked or did not answer.
    error: Option<BridgeError>,
}

impl OfflineFailed {
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.refused.iter().map(describe).collect();
        if let Some(e) = &self.error {
            parts.push(e.to_string());
        }
        parts.join("; ")
    }
}

/// Offlines `indices`, trying again after EBUSY/EAGAIN with backoff while time is left
/// (keeping enough to eject the DIMM or give the blocks back).
async fn offline_all(ctx: &mut Ctx, indices: &[u64]) -> Result<(), OfflineFailed> {
    let start = Instant::now();
    let reserve =
        Duration::from_millis(ctx.settings.eject_timeout_ms + 2 * ctx.settings.qmp_timeout_ms);
    let until = ctx
        .deadline
        .checked_sub(reserve)
        .unwrap_or(start)
        .max(start + Duration::from_secs(1));
    let mut pending = indices.to_vec();
    let mut pause = Duration::from_millis(100);
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
        if !refused.iter().all(transient) || Instant::now() + pause > until {
            return Err(OfflineFailed {
                refused,
                error: None,
            });
        }
        pending = refused.iter().map(|f| f.phys_index).collect();
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Gives back, after a failed removal, those of `candidates` (blocks online in `before`)
/// that are offline now — a write that timed out may still have offlined some — into the
/// zone each was in, on a budget of its own.
async fn reonline(
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
async fn eject(ctx: &mut Ctx, dimm_id: &str) -> Result<(), BridgeError> {
    let mut watch = EjectWatch::new(ctx);
    let start = Instant::now();
    qemu::device_del(ctx, dimm_id).await?;
    let until = ctx.phase(ctx.settings.eject_timeout_ms);
    let mut listening = true;
    loop {
        let poll = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            word = watch.next(&ctx.vm, dimm_id), if listening => match word {
                Some(Ejection::Deleted) => break,
                Some(Ejection::Refused(why)) => {
                    return Err(ctx.hotplug_error("wait-deleted", why));
                }
                Some(Ejection::Other) => {}
                None => listening = false,
            },
            () = poll => {
                // A failed query (QMP reconnecting) is tried again at the next poll.
                if qemu::dimms(ctx).await.is_ok_and(|d| !d.iter().any(|d| d.id == dimm_id)) {
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
    let device = qemu::dimms(ctx)
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
        let reason = failed.describe();
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
    qemu::object_del(ctx, &device.memdev).await.map_err(|e| {
        with_note(
            e,
            "; the DIMM is gone but its memory backend remains (retry object-del)",
        )
    })?;
    // libvirt deletes the backend itself: there was no step of ours.
    if matches!(ctx.vmm, Vmm::Qmp(_)) {
        ctx.step("object-del", start, device.memdev.clone());
    }
    Ok(before)
}

fn with_note(e: BridgeError, note: &str) -> BridgeError {
    match e {
        BridgeError::Hotplug {
            vm,
            step,
            reason,
            blocks,
        } => BridgeError::Hotplug {
            vm,
            step,
            reason: reason + note,
            blocks,
        },
        other => other,
    }
}

/// What `resize` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Resized {
    /// Memory before, bytes.
    pub from_bytes: u64,
    /// Memory after, bytes.
    pub to_bytes: u64,
    /// DIMMs plugged, in order.
    pub plugged: Vec<Dimm>,
    /// DIMMs unplugged, in order.
    pub unplugged: Vec<Dimm>,
}

/// Unplugs DIMMs newest (highest address) first while the VM has more than `target`
/// bytes, then plugs DIMMs of `hotplug.dimm_size` (the last one smaller) until it has
/// `target`.
pub async fn resize(ctx: &mut Ctx, target: u64) -> Result<Resized, BridgeError> {
    let block_size = ctx.block_size().await?;
    let (boot, plugged) = qemu::memory_summary(ctx).await?;
    let from = boot + plugged;
    if target < boot {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} is below the boot memory ({boot} bytes), which cannot be unplugged"
        )));
    }
    if !(target - boot).is_multiple_of(block_size) {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} minus the boot memory ({boot} bytes) is not a multiple of the \
             guest's block size ({block_size} bytes)"
        )));
    }
    let dimm_size = ctx.settings.dimm_size;
    if !dimm_size.is_multiple_of(block_size) {
        return Err(ctx.hotplug_error(
            "check",
            format!(
                "hotplug.dimm_size ({dimm_size}) is not a multiple of the guest's block size \
                 ({block_size})"
            ),
        ));
    }
    let mut done = Resized {
        from_bytes: from,
        to_bytes: from,
        plugged: Vec::new(),
        unplugged: Vec::new(),
    };
    let progress = |done: &Resized| {
        format!(
            "; the VM has {} bytes now ({} DIMMs plugged, {} unplugged by this resize)",
            done.to_bytes,
            done.plugged.len(),
            done.unplugged.len()
        )
    };
    let mut devices = qemu::dimms(ctx).await?;
    devices.retain(|d| !d.id.is_empty() && d.hotpluggable);
    devices.sort_by_key(|d| std::cmp::Reverse(d.addr));
    let removable: u64 = devices.iter().map(|d| d.size).sum();
    if from.saturating_sub(removable) > target {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} is below what the VM keeps without its hot-unpluggable DIMMs \
             ({} bytes: boot memory and memory devices the bridge cannot unplug)",
            from.saturating_sub(removable)
        )));
    }
    for device in devices {
        if done.to_bytes <= target {
            break;
        }
        match unplug(ctx, &device.id).await {
            Ok(dimm) => {
                done.to_bytes -= dimm.size;
                done.unplugged.push(dimm);
            }
            Err(e) => return Err(with_note(e, &progress(&done))),
        }
    }
    while done.to_bytes < target {
        let size = dimm_size.min(target - done.to_bytes);
        let args = PlugArgs {
            size,
            node: None,
            online_type: None,
        };
        match plug(ctx, &args).await {
            Ok(dimm) => {
                done.to_bytes += dimm.size;
                done.plugged.push(dimm);
            }
            Err(e) => return Err(with_note(e, &progress(&done))),
        }
    }
    if done.to_bytes != target {
        return Err(ctx.hotplug_error(
            "resize",
            format!(
                "the VM has {} bytes, not {target}{}",
                done.to_bytes,
                progress(&done)
            ),
        ));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_are_named() {
        let r = GuestMemoryBlockResponse {
            phys_index: 34,
            response: GuestMemoryBlockResponseType::OperationFailed,
            error_code: Some(16),
        };
        assert_eq!(describe(&r), "block 34: operation failed, EBUSY (errno 16)");
        assert!(transient(&r));
        let einval = GuestMemoryBlockResponse {
            error_code: Some(22),
            ..r
        };
        assert!(!transient(&einval));
    }
}
