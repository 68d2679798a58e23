//! `[balloon]`: the virtio balloon's floor, how long it may stand still before an
//! operation gives up on it, and how often the guest's driver reports its statistics.

use serde::Deserialize;

use super::{
    ConfigError,
    error::{Bound, DAY_MS},
};

/// The virtio balloon: what `memory-balloon` may ask and how it waits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalloonConfig {
    /// The least memory `memory-balloon` leaves a guest, bytes: a smaller target is
    /// refused. The default keeps a small Linux guest's kernel, init and agent alive; raise
    /// it for guests that run more.
    pub floor_bytes: u64,
    /// How long QEMU's `actual` may stand still short of the target before
    /// `memory-balloon` gives up, withdraws the rest of its request and answers with where
    /// the balloon stopped, milliseconds.
    pub stall_ms: u64,
    /// How often the guest's balloon driver is asked for its statistics (QEMU's
    /// `guest-stats-polling-interval`, libvirt's stats period), seconds; set where it is
    /// off when `memory-stats` first reads a VM's balloon. 0: never turned on.
    pub stats_interval_s: u64,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            floor_bytes: 256 << 20,
            // The driver moves thousands of pages a second; 5 s without one means it
            // cannot (no driver, or a guest that will not give memory up).
            stall_ms: 5_000,
            stats_interval_s: 2,
        }
    }
}

/// The longest stats interval: an hour (QEMU takes any; older stats are useless).
const MAX_STATS_INTERVAL_S: u64 = 3_600;

impl BalloonConfig {
    /// The floor at least 64 MiB, the stall from 1 ms to a day, the stats interval at most
    /// an hour.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::at_least("balloon.floor_bytes", self.floor_bytes, 64 << 20)?;
        ConfigError::at_least("balloon.stall_ms", self.stall_ms, 1)?;
        if self.stall_ms > DAY_MS {
            return Err(ConfigError::OutOfRange {
                key: "balloon.stall_ms".into(),
                value: self.stall_ms,
                bound: Bound::AtMostMs(DAY_MS),
            });
        }
        if self.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(ConfigError::OutOfRange {
                key: "balloon.stats_interval_s".into(),
                value: self.stats_interval_s,
                bound: Bound::AtMost(MAX_STATS_INTERVAL_S),
            });
        }
        Ok(())
    }
}
