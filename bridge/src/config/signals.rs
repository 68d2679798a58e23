//! `[signals]`: how fresh the guest's memory signals (`memory-stats`) must be, and how
//! often the bridge refreshes them by itself.

use serde::Deserialize;

use super::{
    ConfigError,
    error::{Bound, DAY_MS},
};

/// The guest's memory signals: the snapshot cache and the background poll.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// A `memory-stats` call is answered from a VM's latest snapshot while it is younger
    /// than this, milliseconds; otherwise the agent is asked then. 0: always asked.
    pub max_age_ms: u64,
    /// How often the bridge refreshes the snapshot (and its Prometheus gauges) of every
    /// connected VM by itself, milliseconds; 0: never (snapshots and gauges then follow
    /// callers' calls only).
    pub poll_interval_ms: u64,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        Self {
            max_age_ms: 1_000,
            // Gauges fresh for a scrape every 15-30 s, at one agent call and one hypervisor
            // call per VM every 10 s: 400 calls a second for a host of 4096 VMs, about
            // 100 µs of guest CPU each. A controller that needs every second asks itself.
            poll_interval_ms: 10_000,
        }
    }
}

/// The shortest background poll interval: faster than a scrape or a controller needs.
pub const MIN_POLL_INTERVAL_MS: u64 = 100;

impl SignalsConfig {
    /// Both at most a day; a poll interval, when on, at least [`MIN_POLL_INTERVAL_MS`].
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, ms) in [
            ("max_age_ms", self.max_age_ms),
            ("poll_interval_ms", self.poll_interval_ms),
        ] {
            if ms > DAY_MS {
                return Err(ConfigError::OutOfRange {
                    key: format!("signals.{name}"),
                    value: ms,
                    bound: Bound::AtMostMs(DAY_MS),
                });
            }
        }
        if self.poll_interval_ms > 0 {
            ConfigError::at_least(
                "signals.poll_interval_ms",
                self.poll_interval_ms,
                MIN_POLL_INTERVAL_MS,
            )?;
        }
        Ok(())
    }
}
