//! `[hotplug]`: how DIMMs are sized, how long each phase of an operation may take, what
//! is done with the guest's `auto_online_blocks`, and how request-ids are remembered.

use serde::Deserialize;

use super::{
    ConfigError,
    error::{Bound, DAY_MS},
};

/// Memory hotplug: how DIMMs are sized and how long each phase may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotplugConfig {
    /// Bytes per DIMM that a resize plugs (the last one may be smaller), a multiple of
    /// the guest's block size.
    #[serde(alias = "dimm_size")]
    pub dimm_size_bytes: u64,
    /// A whole plug, unplug or resize, unless the caller's deadline is sooner,
    /// milliseconds.
    pub timeout_ms: u64,
    /// How long a new DIMM's blocks may take to appear in the guest, milliseconds.
    pub appear_timeout_ms: u64,
    /// How long the guest may take to eject an unplugged DIMM (`DEVICE_DELETED`),
    /// milliseconds.
    pub eject_timeout_ms: u64,
    /// What the bridge does with the guest kernel's `auto_online_blocks` (our agent
    /// only); a VM may have its own (`[vms] NAME = { ..., auto_online = "keep" }`).
    pub auto_online: AutoOnline,
    /// How long an unplug keeps offlining a DIMM's blocks (trying again after EBUSY)
    /// before it gives up and gives them back, milliseconds: a DIMM whose memory the guest
    /// will not release is answered within this, not the whole `timeout_ms`.
    pub offline_budget_ms: u64,
    /// Each command to the hypervisor (a QMP command, a libvirt call), milliseconds.
    #[serde(alias = "qmp_timeout_ms")]
    pub hypervisor_timeout_ms: u64,
    /// Largest QMP message accepted, bytes.
    pub max_qmp_bytes: usize,
    /// Request ids remembered per VM for idempotent retries (oldest forgotten first).
    pub max_request_ids: usize,
    /// How long a request id is remembered, seconds.
    pub request_id_ttl_s: u64,
    /// How often the keeper checks that the DIMMs the bridge plugged are online (and
    /// onlines them again after a guest reboot), milliseconds.
    pub restore_interval_ms: u64,
}

impl Default for HotplugConfig {
    fn default() -> Self {
        Self {
            dimm_size_bytes: 512 << 20,
            // Offlining migrates pages and may need many tries on a busy guest.
            timeout_ms: 120_000,
            appear_timeout_ms: 10_000,
            eject_timeout_ms: 10_000,
            offline_budget_ms: 10_000,
            auto_online: AutoOnline::Movable,
            hypervisor_timeout_ms: 5_000,
            max_qmp_bytes: 1 << 20,
            max_request_ids: 256,
            request_id_ttl_s: 86_400,
            restore_interval_ms: 2_000,
        }
    }
}

/// What the bridge does with a guest kernel's `auto_online_blocks` (`hotplug.auto_online`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoOnline {
    /// Keep it at `online_movable`, so the kernel onlines new memory into ZONE_MOVABLE
    /// itself as it adds it (as fast as memory hotplug gets); a plug asking for another
    /// online type sets it to that type for the plug, then back.
    Movable,
    /// Never change it: the bridge onlines new blocks as they appear.
    Keep,
}

/// The longest hotplug timeout: one day.
const MAX_HOTPLUG_MS: u64 = DAY_MS;

impl HotplugConfig {
    /// Every value at least 1, every timeout at most a day.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let timeouts = [
            ("timeout_ms", self.timeout_ms),
            ("appear_timeout_ms", self.appear_timeout_ms),
            ("eject_timeout_ms", self.eject_timeout_ms),
            ("offline_budget_ms", self.offline_budget_ms),
            ("hypervisor_timeout_ms", self.hypervisor_timeout_ms),
        ];
        let others = [
            ("dimm_size_bytes", self.dimm_size_bytes),
            ("max_qmp_bytes", self.max_qmp_bytes as u64),
            ("max_request_ids", self.max_request_ids as u64),
            ("request_id_ttl_s", self.request_id_ttl_s),
            ("restore_interval_ms", self.restore_interval_ms),
        ];
        for (name, value) in others.iter().chain(&timeouts) {
            ConfigError::at_least(&format!("hotplug.{name}"), *value, 1)?;
        }
        for (name, ms) in timeouts {
            if ms > MAX_HOTPLUG_MS {
                return Err(ConfigError::OutOfRange {
                    key: format!("hotplug.{name}"),
                    value: ms,
                    bound: Bound::AtMostMs(MAX_HOTPLUG_MS),
                });
            }
        }
        Ok(())
    }
}
