//! One configured VM (`[vms]`, `--vm`, `--qmp`): where the bridge reaches its agent and
//! its hypervisor, how it holds the agent's socket, and its own hotplug settings.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{AutoOnline, Cli, Config, ConfigError};
use crate::names::validate_vm_name;

/// A configured VM. In the file, `NAME = "/path/qga.sock"` or
/// `NAME = { qga = "...", qmp = "...", mode = "shared", auto_online = "keep" }`; a
/// misspelt key is an error, not a VM without hotplug.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The agent's (QGA chardev) socket.
    pub qga: PathBuf,
    /// The QMP socket, for memory hotplug.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// How the bridge holds the sockets.
    #[serde(default)]
    pub mode: SocketMode,
    /// This VM's `hotplug.auto_online`, when it differs.
    #[serde(default)]
    pub auto_online: Option<AutoOnline>,
}

impl VmConfig {
    /// A VM reached at agent socket `qga` only, held exclusively.
    pub fn agent(qga: PathBuf) -> Self {
        Self {
            qga,
            qmp: None,
            mode: SocketMode::Exclusive,
            auto_online: None,
        }
    }

    /// Whether its sockets are shared with other tools: released when idle.
    pub fn shared(&self) -> bool {
        self.mode == SocketMode::Shared
    }
}

/// How the bridge holds a VM's agent socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketMode {
    /// Connected for as long as the bridge runs: the fastest calls, and the only client
    /// (QEMU's socket chardev serves one at a time). For sockets given to the bridge alone.
    #[default]
    Exclusive,
    /// Released `timeouts.shared_idle_ms` after the last call, so other tools (Proxmox's
    /// `qm guest cmd`, `socat`) get the socket between the bridge's calls; each burst of
    /// calls pays a connect and a resync.
    Shared,
}

/// `name` as a TOML key: bare when it can be, else quoted (`vms."web.1"`).
pub(super) fn toml_key(name: &str) -> Cow<'_, str> {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{name:?}"))
    }
}

impl Config {
    /// VM names, a QMP socket per VM, and no more VMs than `limits.max_vms`.
    pub(super) fn validate_vms(&self, cli: &Cli) -> Result<(), ConfigError> {
        for name in self.vms.keys() {
            validate_vm_name(name).map_err(|e| ConfigError::invalid(cli.vm_key(name), e))?;
        }
        let mut qmp_sockets: BTreeMap<&Path, &str> = BTreeMap::new();
        for (name, vm) in &self.vms {
            let Some(socket) = vm.qmp.as_deref() else {
                continue;
            };
            if let Some(other) = qmp_sockets.insert(socket, name) {
                return Err(ConfigError::Conflict {
                    keys: (cli.qmp_key(other, socket), cli.qmp_key(name, socket)),
                    reason: format!(
                        "VMs '{other}' and '{name}' have the same QMP socket {}",
                        socket.display()
                    ),
                });
            }
        }
        if self.vms.len() > self.limits.max_vms {
            return Err(ConfigError::invalid(
                "limits.max_vms",
                format!(
                    "{} is fewer than the {} VMs configured",
                    self.limits.max_vms,
                    self.vms.len()
                ),
            ));
        }
        Ok(())
    }
}
