//! The VMs this bridge serves, by name: configured ones, sockets found by discovery, and
//! libvirt's running domains. Each VM has its agent's [`Session`] and, when the bridge can
//! reach its hypervisor, its memory hotplug state ([`VmMemory`]).
//!
//! A VM found again at the same source keeps its session (and its hotplug state, with
//! the request-ids it remembers); one found at a new source is replaced. Sessions stop when
//! removed and no call holds them.

pub mod discovery;
pub mod domains;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use qga_wire::sync::{read, write};
use tokio::sync::{oneshot, watch};

use self::discovery::{DiscoveredVm, Discovery, Scan, scan};
use crate::{
    backend::Source,
    config::Config,
    error::BridgeError,
    hotplug::{self, memory::VmMemory},
    metrics::Metrics,
    names::proxmox_patterns,
    session::{AgentSource, ParseBudget, Session, SessionSettings, VmStatus},
    signals::VmSignals,
};

/// One VM: its agent session, its memory backend if it has one, and its memory signals.
#[derive(Debug)]
pub struct Vm {
    /// The agent's session; it knows where the agent is reached.
    pub session: Arc<Session>,
    /// Memory hotplug state; `None` when the bridge has no way to the hypervisor.
    pub memory: Option<Arc<VmMemory>>,
    /// The latest snapshot of the guest's memory: kept with the session (a new agent
    /// source starts afresh), gone with the VM.
    pub signals: Arc<VmSignals>,
}

/// Name -> VM. See the module docs.
#[derive(Debug)]
pub struct VmMap {
    map: RwLock<BTreeMap<String, Arc<Vm>>>,
    config: Arc<Config>,
    /// What every session runs with.
    settings: Arc<SessionSettings>,
    /// What every memory backend runs with.
    hotplug: Arc<hotplug::HotplugSettings>,
    metrics: Arc<Metrics>,
    /// Shared by every session: bytes of large replies being parsed at once.
    budget: Arc<ParseBudget>,
}

impl VmMap {
    /// The configured VMs (their sessions start on the current runtime).
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Arc<Self> {
        let vms = Arc::new(Self {
            map: RwLock::new(BTreeMap::new()),
            budget: ParseBudget::new(config.limits.parse_budget_bytes),
            settings: SessionSettings::of(&config),
            hotplug: hotplug::HotplugSettings::of(&config),
            config: config.clone(),
            metrics,
        });
        for (name, vm) in &config.vms {
            let shared = vm.shared();
            let agent = AgentSource::Socket {
                path: vm.qga.clone(),
                shared,
            };
            let memory = vm
                .qmp
                .clone()
                .map(|socket| VmMemory::open(&vms.hotplug, Source::Qmp { socket, shared }));
            vms.put(name, agent, memory);
        }
        vms
    }

    /// VM `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Vm>, BridgeError> {
        if name.is_empty() {
            return Err(BridgeError::InvalidRequest("'vm' is required".into()));
        }
        read(&self.map)
            .get(name)
            .cloned()
            .ok_or_else(|| BridgeError::VmNotFound(name.to_string()))
    }

    /// Serves `name` at `agent` with `memory`: a new VM, or an existing one whose session
    /// and hotplug state are kept where their sources did not change.
    fn put(&self, name: &str, agent: AgentSource, memory: Option<VmMemory>) {
        let mut map = write(&self.map);
        let old = map.get(name);
        let (session, signals) = match old {
            Some(vm) if *vm.session.source() == agent => (vm.session.clone(), vm.signals.clone()),
            _ => {
                tracing::info!(vm = name, agent = %agent.describe().display(), "VM added");
                (self.spawn(name, agent), Arc::default())
            }
        };
        let memory = match (old.and_then(|vm| vm.memory.as_ref()), memory) {
            (Some(kept), Some(new)) if kept.source() == new.source() => Some(kept.clone()),
            (_, new) => new.map(Arc::new),
        };
        let vm = Vm {
            session,
            memory,
            signals,
        };
        map.insert(name.to_string(), Arc::new(vm));
    }

    fn spawn(&self, name: &str, agent: AgentSource) -> Arc<Session> {
        Session::spawn(
            name,
            agent,
            self.settings.clone(),
            self.metrics.clone(),
            self.budget.clone(),
        )
    }

    /// Adds discovered VM `name` (or moves it to new sockets), with its QMP socket.
    pub fn add_discovered(&self, name: &str, found: &DiscoveredVm) {
        let agent = AgentSource::Socket {
            path: found.qga.clone(),
            shared: found.shared,
        };
        let memory = found.qmp.clone().map(|socket| {
            let shared = found.shared;
            VmMemory::open(&self.hotplug, Source::Qmp { socket, shared })
        });
        self.put(name, agent, memory);
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) {
        if write(&self.map).remove(name).is_some() {
            tracing::info!(vm = name, "VM removed");
        }
    }

    /// Adds libvirt domain run `dom`, served through `libvirt` (replacing an earlier run
    /// of the same domain), unless the name is taken by a VM from elsewhere or the bridge
    /// serves `limits.max_vms` already. Returns whether the domain is served.
    pub fn add_libvirt(&self, dom: &qga_libvirt::Dom, libvirt: &Arc<qga_libvirt::Libvirt>) -> bool {
        let name = dom.name.as_str();
        let agent = AgentSource::Libvirt {
            libvirt: libvirt.clone(),
            dom: dom.clone(),
        };
        {
            let map = read(&self.map);
            match map.get(name).map(|vm| vm.session.source()) {
                Some(source) if *source == agent => return true,
                Some(source) if !source.is_libvirt(libvirt) => {
                    tracing::warn!(vm = name, taken_by = %source.describe().display(), "libvirt domain not served: its name is taken");
                    return false;
                }
                Some(_) => tracing::info!(vm = name, id = dom.id, "libvirt domain restarted"),
                None if map.len() >= self.config.limits.max_vms => {
                    tracing::warn!(
                        vm = name,
                        max_vms = self.config.limits.max_vms,
                        "libvirt domain not served: limits.max_vms reached"
                    );
                    return false;
                }
                None => {}
            }
        }
        let source = Source::Libvirt {
            libvirt: libvirt.clone(),
            dom: dom.clone(),
        };
        let memory = VmMemory::open(&self.hotplug, source);
        self.put(name, agent, Some(memory));
        true
    }

    /// Removes libvirt domain `name` (it stopped), if this bridge serves it through libvirt.
    pub fn remove_libvirt(&self, name: &str, libvirt: &qga_libvirt::Libvirt) {
        let mut map = write(&self.map);
        if map
            .get(name)
            .is_some_and(|vm| vm.session.source().is_libvirt(libvirt))
        {
            map.remove(name);
            tracing::info!(vm = name, "libvirt domain removed");
        }
    }

    /// The domain runs served through `libvirt`.
    pub fn libvirt_domains(&self, libvirt: &qga_libvirt::Libvirt) -> Vec<qga_libvirt::Dom> {
        read(&self.map)
            .values()
            .filter_map(|vm| match vm.session.source() {
                AgentSource::Libvirt { libvirt: l, dom } if l.uri() == libvirt.uri() => {
                    Some(dom.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Every VM, by name.
    pub fn all(&self) -> Vec<(String, Arc<Vm>)> {
        read(&self.map)
            .iter()
            .map(|(name, vm)| (name.clone(), vm.clone()))
            .collect()
    }

    /// Every VM's status, by name.
    pub fn list(&self) -> Vec<VmStatus> {
        read(&self.map)
            .values()
            .map(|vm| vm.session.status())
            .collect()
    }

    /// Number of VMs.
    pub fn len(&self) -> usize {
        read(&self.map).len()
    }

    /// True when no VM is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rescans the discovery globs (and Proxmox's directory) until `shutdown` and applies
    /// each scan (see [`crate::vms::discovery`]): adds new sockets, drops vanished ones only
    /// after a complete scan, withholds ambiguous names; configured VMs are never dropped.
    /// `loaded` is told after the first scan (dropped at once when nothing is discovered).
    pub async fn discover(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        loaded: oneshot::Sender<()>,
    ) {
        let mut loaded = Some(loaded);
        let proxmox = self.config.discover_proxmox.clone();
        let mut patterns = self.config.discover.clone();
        // Config validation refuses a directory that is not UTF-8.
        patterns.extend(
            proxmox
                .as_deref()
                .and_then(proxmox_patterns)
                .unwrap_or_default(),
        );
        if patterns.is_empty() {
            return;
        }
        let configured = self.config.vms.keys().cloned().collect();
        let mut discovery =
            Discovery::new(configured, self.config.limits.max_vms).with_proxmox(proxmox);
        loop {
            // Globbing reads directories: keep it off the async workers.
            let patterns = patterns.clone();
            let owners = self.config.discover_owners.clone();
            let known = discovery.taken().clone();
            let scanned = tokio::task::spawn_blocking(move || scan(&patterns, &owners, &known))
                .await
                .unwrap_or_else(|e| Scan::failed(format!("scan task failed: {e}")));
            let changes = discovery.apply(scanned);
            for name in &changes.remove {
                self.remove(name);
            }
            for (name, vm) in &changes.add {
                self.add_discovered(name, vm);
            }
            if let Some(tx) = loaded.take() {
                let _ = tx.send(());
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.discover_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
