//! The virtio balloon as a backend sees it: the device, QEMU's `actual`, and the guest
//! driver's statistics. QEMU's balloon works on a *logical* VM size: boot memory plus the
//! DIMMs (never virtio-mem), so the memory the balloon holds is that size less `actual`.

use serde::{Deserialize, Serialize};

/// A VM's virtio balloon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BalloonDevice {
    /// QEMU's device id (libvirt's alias); empty for a device QEMU was given without one.
    pub id: String,
    /// The guest's driver gives pages back when the guest runs out of memory
    /// (`deflate-on-oom`, libvirt's `autodeflate`): the balloon then may shrink on its own.
    pub deflate_on_oom: bool,
    /// The guest's driver reports freed pages to the host, which drops them
    /// (`free-page-reporting`, libvirt's `freePageReporting`).
    pub free_page_reporting: bool,
    /// QEMU's `actual`: the logical VM size (boot memory and DIMMs) less what the balloon
    /// holds, bytes.
    pub actual: u64,
    /// How often the guest driver's statistics are asked for, seconds (0: not asked for;
    /// `None`: the hypervisor does not tell).
    pub stats_interval: Option<u64>,
}

/// The guest balloon driver's statistics, as QEMU's `guest-stats` or libvirt's memory
/// statistics give them. A value the driver did not report is `None`, never zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BalloonStats {
    /// When the driver last reported, seconds since the Unix epoch (`None`: never).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_update: Option<u64>,
    /// Bytes swapped in since the guest booted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub swap_in_bytes: Option<u64>,
    /// Bytes swapped out since the guest booted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub swap_out_bytes: Option<u64>,
    /// Major page faults since the guest booted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub major_faults: Option<u64>,
    /// Minor page faults since the guest booted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub minor_faults: Option<u64>,
    /// Memory the guest does not use at all, bytes (its MemFree).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub free_bytes: Option<u64>,
    /// Memory the guest's kernel manages, bytes (its MemTotal).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub total_bytes: Option<u64>,
    /// Memory the guest could use without swapping, bytes (its MemAvailable).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub available_bytes: Option<u64>,
    /// Page cache the guest could drop, bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_caches_bytes: Option<u64>,
    /// Huge page allocations that succeeded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hugetlb_allocations: Option<u64>,
    /// Huge page allocations that failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    /// Whether the driver reported anything at all.
    pub fn reported(&self) -> bool {
        self.last_update.is_some_and(|t| t > 0)
    }
}

/// QEMU's "not reported" (`-1` as an unsigned 64-bit number) as `None`.
pub fn reported(value: u64) -> Option<u64> {
    (value != u64::MAX).then_some(value)
}

/// The balloon's no-balloon refusal, for [`set_balloon`](super::MemoryBackend::set_balloon).
pub fn no_balloon() -> super::BackendError {
    super::BackendError::Refused {
        step: "balloon".into(),
        reason: "the VM has no virtio balloon".into(),
    }
}

/// Refuses a target below `least` bytes before the hypervisor is asked: QEMU takes no 0
/// (`Parameter 'target' expects a size`), libvirt nothing under 1 KiB.
pub fn check_target(target: u64, least: u64) -> Result<(), super::BackendError> {
    if target < least {
        return Err(super::BackendError::Refused {
            step: "balloon".into(),
            reason: format!("a balloon target of {target} bytes: at least {least} is needed"),
        });
    }
    Ok(())
}
