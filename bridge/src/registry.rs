//! The VMs this bridge serves: configured ones, plus sockets discovered by glob.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use tokio::sync::watch;

use crate::{
    config::{Config, validate_vm_name},
    error::BridgeError,
    metrics::Metrics,
    session::{Session, VmStatus},
};

/// Name -> session. Sessions stop when removed and no call holds them.
pub struct Registry {
    sessions: RwLock<BTreeMap<String, Arc<Session>>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// A registry with the configured VMs (their sessions start on the current runtime).
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Arc<Self> {
        let registry = Arc::new(Self {
            sessions: RwLock::new(BTreeMap::new()),
            config: config.clone(),
            metrics,
        });
        for (name, socket) in &config.vms {
            registry.add(name, socket);
        }
        registry
    }

    /// The session of `vm`.
    pub fn get(&self, vm: &str) -> Result<Arc<Session>, BridgeError> {
        if vm.is_empty() {
            return Err(BridgeError::InvalidRequest("'vm' is required".into()));
        }
        let sessions = self
            .sessions
            .read()
            .map_err(|_| BridgeError::VmNotFound(vm.to_string()))?;
        sessions
            .get(vm)
            .cloned()
            .ok_or_else(|| BridgeError::VmNotFound(vm.to_string()))
    }

    /// Adds `name` (or moves it to a new socket).
    pub fn add(&self, name: &str, socket: &Path) {
        let Ok(mut sessions) = self.sessions.write() else {
            return;
        };
        if sessions.get(name).is_some_and(|s| s.socket() == socket) {
            return;
        }
        tracing::info!(vm = name, socket = %socket.display(), "VM added");
        let session = Session::spawn(name, socket, self.config.clone(), self.metrics.clone());
        sessions.insert(name.to_string(), session);
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) {
        if let Ok(mut sessions) = self.sessions.write()
            && sessions.remove(name).is_some()
        {
            tracing::info!(vm = name, "VM removed");
        }
    }

    /// Every VM's status, by name.
    pub fn list(&self) -> Vec<VmStatus> {
        match self.sessions.read() {
            Ok(s) => s.values().map(|s| s.status()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Number of VMs.
    pub fn len(&self) -> usize {
        self.sessions.read().map_or(0, |s| s.len())
    }

    /// True when no VM is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rescans the discovery globs until `shutdown`: adds new sockets, drops vanished ones
    /// (configured VMs are never dropped).
    pub async fn discover(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.config.discover.is_empty() {
            return;
        }
        let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
        loop {
            // Globbing reads directories: keep it off the async workers.
            let patterns = self.config.discover.clone();
            let now = tokio::task::spawn_blocking(move || scan(&patterns))
                .await
                .unwrap_or_else(|_| found.clone());
            for (name, socket) in &now {
                if self.config.vms.contains_key(name) {
                    continue;
                }
                if found.get(name) != Some(socket) {
                    self.add(name, socket);
                }
            }
            for name in found.keys() {
                if !now.contains_key(name) && !self.config.vms.contains_key(name) {
                    self.remove(name);
                }
            }
            found = now;
            tokio::select! {
                _ = tokio::time::sleep(self.config.discover_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The VM name for a discovered socket: its directory's name, without libvirt's
/// `domain-<id>-` prefix (`.../domain-3-web1/org.qemu.guest_agent.0` -> `web1`).
pub fn vm_name_for(socket: &Path) -> Option<String> {
    let dir = socket.parent()?.file_name()?.to_str()?;
    let name = dir
        .strip_prefix("domain-")
        .and_then(|rest| {
            let (id, name) = rest.split_once('-')?;
            id.chars().all(|c| c.is_ascii_digit()).then_some(name)
        })
        .unwrap_or(dir);
    validate_vm_name(name).ok().map(|()| name.to_string())
}

fn scan(patterns: &[String]) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for pattern in patterns {
        let Ok(paths) = glob::glob(pattern) else {
            continue;
        };
        for path in paths.flatten() {
            match vm_name_for(&path) {
                Some(name) => {
                    out.insert(name, path);
                }
                None => tracing::warn!(path = %path.display(), "cannot name discovered socket"),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_names() {
        let p =
            Path::new("/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0");
        assert_eq!(vm_name_for(p).as_deref(), Some("web1"));
        let p = Path::new("/run/vms/db-2/qga.sock");
        assert_eq!(vm_name_for(p).as_deref(), Some("db-2"));
        let p = Path::new("/run/vms/domain-x-y/qga.sock");
        assert_eq!(vm_name_for(p).as_deref(), Some("domain-x-y"));
        assert_eq!(vm_name_for(Path::new("/run/vms/bad name/q")), None);
    }
}
