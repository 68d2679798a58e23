//! What an operation works with — its VM's agent session and memory backend, settings
//! and deadline — and what it has done so far (steps, warnings); the agent calls and
//! backend calls operations are made of, with their errors named for the VM.

use std::{sync::Arc, time::Duration};

use qga_wire::schema::{
    GuestAgentInfo, GuestMemoryBlock, GuestMemoryBlockResponse, GuestMemoryBlockResponseType,
    GuestMemoryOnlineType, command,
};
use tokio::time::Instant;

use super::layout::GuestView;
use crate::{
    backend::{BackendError, DimmDevice, MemoryBackend, MemorySize, Step, VirtioMemDevice},
    call::{BlockChanges, Call, Reply},
    config,
    error::BridgeError,
    hotplug::desired::Desired,
    journal::Journal,
    session::Session,
};

/// What the agent offers beyond QGA.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    /// `__org.qga-bridge_get-memory-zones`.
    pub zones: bool,
    /// `__org.qga-bridge_set-memory-blocks`.
    pub online_type: bool,
    /// `__org.qga-bridge_online-when-present`.
    pub online_when_present: bool,
    /// `__org.qga-bridge_set-auto-online`.
    pub auto_online: bool,
    /// `__org.qga-bridge_get-memory-stats`.
    pub memory_stats: bool,
}

impl Capabilities {
    /// Which extensions `info` lists as enabled.
    pub fn of(info: &GuestAgentInfo) -> Self {
        let has = |name: &str| {
            info.supported_commands
                .iter()
                .any(|c| c.name == name && c.enabled)
        };
        Self {
            zones: has(command::GET_MEMORY_ZONES),
            online_type: has(command::SET_MEMORY_BLOCKS_ONLINE_TYPE),
            online_when_present: has(command::ONLINE_WHEN_PRESENT),
            auto_online: has(command::SET_AUTO_ONLINE) && has(command::GET_MEMORY_ZONES),
            memory_stats: has(command::GET_MEMORY_STATS),
        }
    }
}

/// Everything an operation works with, and what it has done so far.
#[derive(Debug)]
pub struct Ctx {
    /// The VM's name.
    pub vm: String,
    /// Its agent.
    pub session: Arc<Session>,
    /// Its hypervisor.
    pub backend: Arc<dyn MemoryBackend>,
    /// Where desired memory is recorded.
    pub journal: Journal,
    /// Timeouts and sizes.
    pub settings: config::HotplugConfig,
    /// Largest set the bridge sends.
    pub max_set_entries: usize,
    /// `[balloon]`: the floor and how long a balloon may stand still.
    pub balloon: config::BalloonConfig,
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

/// One block's failed result, for a person: its number, what failed and the errno.
pub fn describe(r: &GuestMemoryBlockResponse) -> String {
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

/// A backend's error, named for VM `vm`.
pub fn named(vm: &str, e: BackendError) -> BridgeError {
    let vm = vm.to_string();
    match e {
        BackendError::Unavailable(reason) => BridgeError::Unavailable { vm, reason },
        BackendError::Busy(reason) => BridgeError::Busy { vm, reason },
        BackendError::Timeout { command } => BridgeError::DeadlineExceeded { vm, command },
        BackendError::Refused { step, reason } => BridgeError::Hotplug {
            vm,
            step,
            reason,
            blocks: Vec::new(),
        },
        BackendError::BadReply(reason) => BridgeError::BadReply { vm, reason },
    }
}

/// Whether a failed offlining is worth another try: page migration can need several.
pub fn transient(r: &GuestMemoryBlockResponse) -> bool {
    r.response == GuestMemoryBlockResponseType::OperationFailed
        && matches!(r.error_code, Some(16 | 11))
}

impl Ctx {
    /// Records `desired` as this VM's desired memory, durably.
    pub async fn want(&self, desired: Desired) -> Result<(), BridgeError> {
        self.journal
            .want(&self.vm, &desired.device, &desired)
            .await
            .map_err(|e| self.hotplug_error("journal", e.to_string()))
    }

    /// A failed `step` of this operation.
    pub fn hotplug_error(&self, step: &str, reason: String) -> BridgeError {
        BridgeError::Hotplug {
            vm: self.vm.clone(),
            step: step.to_string(),
            reason,
            blocks: Vec::new(),
        }
    }

    /// A backend's error, named for this VM.
    pub fn backend_error(&self, e: BackendError) -> BridgeError {
        named(&self.vm, e)
    }

    /// Records a step that started at `start`.
    pub fn step(&mut self, name: &'static str, start: Instant, detail: String) {
        self.steps.push(Step::since(name, start, detail));
    }

    /// The VM's DIMMs, from its hypervisor.
    pub async fn dimms(&self) -> Result<Vec<DimmDevice>, BridgeError> {
        let dimms = self.backend.dimms(self.deadline).await;
        dimms.map_err(|e| self.backend_error(e))
    }

    /// The VM's virtio-mem devices, from its hypervisor.
    pub async fn virtio_mem(&self) -> Result<Vec<VirtioMemDevice>, BridgeError> {
        let devices = self.backend.virtio_mem(self.deadline).await;
        devices.map_err(|e| self.backend_error(e))
    }

    /// The VM's boot and plugged memory, from its hypervisor.
    pub async fn memory(&self) -> Result<MemorySize, BridgeError> {
        let memory = self.backend.memory(self.deadline).await;
        memory.map_err(|e| self.backend_error(e))
    }

    /// Calls the agent. A read is bounded by the operation's deadline; a write, once
    /// sent, gets the command's whole configured time, since cutting it short would leave
    /// the guest changing while the bridge believes the step failed. A channel busy with an
    /// earlier write's late outcome is waited for, within the deadline.
    pub async fn agent(&self, call: Call) -> Result<Reply, BridgeError> {
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
        match self.agent(Call::Info).await? {
            Reply::Info(info) => Ok(Capabilities::of(&info)),
            _ => Ok(Capabilities::default()),
        }
    }

    /// The guest's blocks, without zones.
    pub async fn blocks(&self) -> Result<GuestView, BridgeError> {
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
    pub async fn set(
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
    pub fn phase(&self, limit_ms: u64) -> Instant {
        (Instant::now() + Duration::from_millis(limit_ms)).min(self.deadline)
    }
}

/// Time for undoing: ejecting, some QMP commands, and the agent calls around them.
pub fn undo_budget(s: &config::HotplugConfig) -> Duration {
    Duration::from_millis(
        s.eject_timeout_ms
            .saturating_add(s.hypervisor_timeout_ms.saturating_mul(3)),
    ) + UNDO_EXTRA
}

/// Adds what undoing did (or failed to do) to an operation's error. When undoing failed,
/// the VM is not as it was, so the error becomes a final hotplug failure (remembered for
/// the request-id) whatever it was, and says what may be left.
pub fn with_undo(e: BridgeError, undo: Result<(), String>) -> BridgeError {
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

/// Adds `note` to a hotplug failure's reason; other errors stay as they are.
pub fn with_note(e: BridgeError, note: &str) -> BridgeError {
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
