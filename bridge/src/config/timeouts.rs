//! `[timeouts]`: the deadlines of agent calls that do not bring their own, and of the
//! steps around them.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::ConfigError;

/// Deadlines applied to calls that do not bring their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Default per call, milliseconds.
    pub default_ms: u64,
    /// Connecting to a VM socket, milliseconds.
    pub connect_ms: u64,
    /// The resync handshake, milliseconds.
    pub resync_ms: u64,
    /// A shared VM's socket is released this long after its last call, milliseconds.
    pub shared_idle_ms: u64,
    /// Per QGA command, milliseconds.
    pub commands: BTreeMap<String, u64>,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        let commands = [
            // Onlining or offlining can make the kernel migrate pages for seconds.
            ("guest-set-memory-blocks", 120_000),
            ("__org.qga-bridge_set-memory-blocks", 120_000),
            // Tens of thousands of blocks take a while on a slow guest.
            ("guest-get-memory-blocks", 30_000),
            ("__org.qga-bridge_get-memory-zones", 30_000),
            ("guest-ping", 5_000),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            default_ms: 10_000,
            connect_ms: 2_000,
            resync_ms: 3_000,
            shared_idle_ms: 1_000,
            commands,
        }
    }
}

impl TimeoutsConfig {
    /// The default deadline for `command`.
    pub(crate) fn for_command(&self, command: &str) -> Duration {
        Duration::from_millis(*self.commands.get(command).unwrap_or(&self.default_ms))
    }

    /// The file's section over the defaults: its per-command entries add to the
    /// defaults' rather than replacing them all.
    pub(super) fn over_defaults(self) -> Self {
        let mut commands = Self::default().commands;
        commands.extend(self.commands);
        Self { commands, ..self }
    }

    /// All positive.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, ms) in [
            ("default_ms", self.default_ms),
            ("connect_ms", self.connect_ms),
            ("resync_ms", self.resync_ms),
            ("shared_idle_ms", self.shared_idle_ms),
        ] {
            ConfigError::at_least(&format!("timeouts.{name}"), ms, 1)?;
        }
        Ok(())
    }
}
