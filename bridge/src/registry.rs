//! The VMs this bridge serves: configured ones, plus sockets discovered by glob.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, RwLock},
};

use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};

use crate::{
    audit::{Audit, Caller, Record},
    auth::Auth,
    call::{Call, Reply, hotplug_method},
    config::Config,
    discovery::{DiscoveredVm, Discovery, Scan, proxmox_patterns, scan},
    error::BridgeError,
    hotplug::{Done, Hotplug, Operation, layout::Layout},
    metrics::Metrics,
    session::{ParseBudget, Session, VmStatus},
};

pub use crate::discovery::vm_name_for;

/// Audits a state-changing call: with its outcome when it finishes, or as `caller_left`
/// when its caller goes away first (the session then records the late outcome in the
/// VM's `last_write`).
struct AuditOnDrop<'a> {
    audit: &'a Audit,
    caller: &'a Caller,
    vm: &'a str,
    method: &'static str,
    arguments: Option<serde_json::Value>,
    start: std::time::Instant,
    done: bool,
}

impl<'a> AuditOnDrop<'a> {
    fn new(audit: &'a Audit, caller: &'a Caller, vm: &'a str, call: &Call) -> Self {
        Self {
            audit,
            caller,
            vm,
            method: call.name(),
            arguments: call.arguments(),
            start: std::time::Instant::now(),
            done: false,
        }
    }

    fn write(&mut self, outcome: &str, error: Option<String>, results: Option<serde_json::Value>) {
        self.done = true;
        self.audit.record(&Record {
            vm: Some(self.vm),
            method: Some(self.method),
            arguments: self.arguments.take(),
            error,
            results,
            duration_ms: Some(self.start.elapsed().as_secs_f64() * 1000.0),
            ..Audit::base("call", self.caller, outcome)
        });
    }

    fn finish(&mut self, outcome: &Result<Reply, BridgeError>) {
        match outcome {
            Ok(reply) => self.write("ok", None, serde_json::to_value(reply).ok()),
            Err(e) => self.write(e.outcome().as_str(), Some(e.to_string()), None),
        }
    }
}

impl Drop for AuditOnDrop<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.write(
                "caller_left",
                Some("the caller stopped waiting; the outcome goes to the VM's last_write".into()),
                None,
            );
        }
    }
}

/// Name -> session. Sessions stop when removed and no call holds them.
#[derive(Debug)]
pub struct Registry {
    sessions: RwLock<BTreeMap<String, Arc<Session>>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Shared by every session: bytes of large replies being parsed at once.
    budget: Arc<ParseBudget>,
    /// Calls being served, bridge-wide (`limits.max_in_flight`).
    in_flight: Semaphore,
    audit: Arc<Audit>,
    auth: Arc<Auth>,
    hotplug: Hotplug,
}

impl Registry {
    /// A registry with the configured VMs (their sessions start on the current runtime).
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        audit: Arc<Audit>,
        auth: Arc<Auth>,
    ) -> Arc<Self> {
        let registry = Arc::new(Self {
            sessions: RwLock::new(BTreeMap::new()),
            config: config.clone(),
            hotplug: Hotplug::new(config.clone(), audit.clone(), metrics.clone()),
            metrics,
            budget: ParseBudget::new(config.limits.parse_budget_bytes),
            in_flight: Semaphore::new(config.limits.max_in_flight),
            audit,
            auth,
        });
        for (name, socket) in &config.vms {
            registry.add(name, socket);
        }
        registry
    }

    /// The configuration the registry's sessions run with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics the registry's sessions report to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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

    /// The audit trail.
    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }

    /// The VMs `caller` has a role on, with their state.
    pub fn visible(&self, caller: &Caller) -> Vec<VmStatus> {
        let Some(identity) = &caller.identity else {
            return Vec::new();
        };
        self.list()
            .into_iter()
            .filter(|vm| self.auth.role(identity, &vm.name).is_some())
            .collect()
    }

    /// Authentication and grants.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// Runs `call` from `caller` on `vm`'s agent by `deadline`, if the caller's grants
    /// allow it, within the bridge-wide in-flight limit: over it, the call is refused at
    /// once rather than queued. A state-changing call is audited with its outcome, also
    /// when its caller leaves; a denied call is audited as a denial.
    pub async fn call(
        &self,
        caller: &Caller,
        vm: &str,
        call: Call,
        deadline: Option<Instant>,
    ) -> Result<Reply, BridgeError> {
        self.authorize(caller, vm, call.name(), !call.is_read(), || {
            call.arguments()
        })?;
        let mut audited =
            (!call.is_read()).then(|| AuditOnDrop::new(&self.audit, caller, vm, &call));
        let outcome = self.call_inner(vm, call, deadline).await;
        if let Some(a) = audited.as_mut() {
            a.finish(&outcome);
        }
        outcome
    }

    /// Checks `caller`'s grants for `method` on `vm` (`write`: it changes the guest);
    /// a refusal is audited with the call's `arguments`.
    fn authorize(
        &self,
        caller: &Caller,
        vm: &str,
        method: &str,
        write: bool,
        arguments: impl FnOnce() -> Option<serde_json::Value>,
    ) -> Result<(), BridgeError> {
        let authorized = match &caller.identity {
            Some(identity) => self.auth.authorize(identity, vm, write),
            // Front ends always authenticate first; a caller without an identity is a bug
            // and gets nothing.
            None => Err(BridgeError::Unauthenticated("no identity".into())),
        };
        if let Err(e) = &authorized {
            self.audit.record(&Record {
                vm: Some(vm),
                method: Some(method),
                arguments: arguments(),
                error: Some(e.to_string()),
                ..Audit::base("denied", caller, e.outcome().as_str())
            });
        }
        authorized
    }

    /// `vm`'s memory layout, for a caller with a read grant.
    pub async fn memory_layout(
        &self,
        caller: &Caller,
        vm: &str,
        deadline: Option<Instant>,
    ) -> Result<Layout, BridgeError> {
        self.authorize(caller, vm, hotplug_method::LAYOUT, false, || None)?;
        let _slot = self.in_flight_slot()?;
        let session = self.get(vm)?;
        self.hotplug.layout(vm, session, deadline).await
    }

    /// Runs hotplug operation `op` on `vm`, for a caller with a write grant; audited.
    pub async fn memory_hotplug(
        &self,
        caller: &Caller,
        vm: &str,
        op: Operation,
        request_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<Done, BridgeError> {
        self.authorize(caller, vm, op.method(), true, || {
            serde_json::to_value(&op).ok()
        })?;
        let _slot = self.in_flight_slot()?;
        let session = self.get(vm)?;
        self.hotplug
            .run(caller, vm, session, op, request_id, deadline)
            .await
    }

    async fn call_inner(
        &self,
        vm: &str,
        call: Call,
        deadline: Option<Instant>,
    ) -> Result<Reply, BridgeError> {
        let _slot = self.in_flight_slot()?;
        let session = self.get(vm)?;
        session.call(call, deadline).await
    }

    /// A slot of the bridge-wide in-flight limit (`limits.max_in_flight`), held while a
    /// call or hotplug request is served: over the limit, refused at once, not queued.
    fn in_flight_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BridgeError> {
        self.in_flight.try_acquire().map_err(|_| {
            self.metrics.refused("bridge", "in_flight");
            BridgeError::Overloaded(format!(
                "{} calls in flight bridge-wide (limits.max_in_flight)",
                self.config.limits.max_in_flight
            ))
        })
    }

    /// Adds `name` (or moves it to a new socket).
    pub fn add(&self, name: &str, socket: &Path) {
        self.add_mode(name, socket, false);
    }

    /// Adds discovered VM `name` (or moves it to new sockets), with its QMP socket and
    /// mode.
    pub fn add_discovered(&self, name: &str, vm: &DiscoveredVm) {
        self.add_mode(name, &vm.qga, vm.shared);
        self.hotplug.set_qmp(name, vm.qmp.as_deref(), vm.shared);
    }

    fn add_mode(&self, name: &str, socket: &Path, shared: bool) {
        let Ok(mut sessions) = self.sessions.write() else {
            return;
        };
        if sessions.get(name).is_some_and(|s| s.socket() == socket) {
            return;
        }
        tracing::info!(vm = name, socket = %socket.display(), shared, "VM added");
        let session = Session::spawn(
            name,
            socket,
            shared,
            self.config.clone(),
            self.metrics.clone(),
            self.budget.clone(),
        );
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

    /// Removes discovered VM `name`, with its QMP socket.
    fn remove_discovered(&self, name: &str) {
        self.remove(name);
        self.hotplug.set_qmp(name, None, false);
    }

    /// Adds libvirt domain run `dom`, served through `libvirt` (replacing an earlier run
    /// of the same domain), unless the name is taken by a VM from elsewhere or the bridge
    /// serves `limits.max_vms` already. Returns whether the domain is served.
    pub fn add_libvirt(&self, dom: &qga_libvirt::Dom, libvirt: &Arc<qga_libvirt::Libvirt>) -> bool {
        let name = dom.name.as_str();
        let Ok(mut sessions) = self.sessions.write() else {
            return false;
        };
        let socket = crate::session::libvirt_socket(libvirt, dom);
        let prefix = crate::session::libvirt_prefix(libvirt, name);
        match sessions.get(name) {
            Some(s) if s.socket() == socket => return true,
            Some(s) if !s.socket().to_string_lossy().starts_with(&prefix) => {
                tracing::warn!(vm = name, taken_by = %s.socket().display(), "libvirt domain not served: its name is taken");
                return false;
            }
            Some(_) => tracing::info!(vm = name, id = dom.id, "libvirt domain restarted"),
            None if sessions.len() >= self.config.limits.max_vms => {
                tracing::warn!(
                    vm = name,
                    max_vms = self.config.limits.max_vms,
                    "libvirt domain not served: limits.max_vms reached"
                );
                return false;
            }
            None => tracing::info!(
                vm = name,
                id = dom.id,
                uri = libvirt.uri(),
                "libvirt domain added"
            ),
        }
        let session = Session::spawn_libvirt(
            dom,
            libvirt.clone(),
            self.config.clone(),
            self.metrics.clone(),
            self.budget.clone(),
        );
        sessions.insert(name.to_string(), session);
        self.hotplug
            .set_libvirt(name, Some((libvirt.clone(), dom.clone())));
        true
    }

    /// Removes libvirt domain `name` (it stopped), if this bridge serves it through libvirt.
    pub fn remove_libvirt(&self, name: &str, libvirt: &qga_libvirt::Libvirt) {
        let prefix = crate::session::libvirt_prefix(libvirt, name);
        let Ok(mut sessions) = self.sessions.write() else {
            return;
        };
        if sessions
            .get(name)
            .is_some_and(|s| s.socket().to_string_lossy().starts_with(&prefix))
        {
            sessions.remove(name);
            self.hotplug.set_libvirt(name, None);
            tracing::info!(vm = name, "libvirt domain removed");
        }
    }

    /// The VMs served through `libvirt`, by name, with their sockets.
    pub fn libvirt_domains(
        &self,
        libvirt: &qga_libvirt::Libvirt,
    ) -> Vec<(String, std::path::PathBuf)> {
        let Ok(sessions) = self.sessions.read() else {
            return Vec::new();
        };
        sessions
            .iter()
            .filter(|(name, s)| {
                s.socket()
                    .to_string_lossy()
                    .starts_with(&crate::session::libvirt_prefix(libvirt, name))
            })
            .map(|(name, s)| (name.clone(), s.socket().to_path_buf()))
            .collect()
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

    /// Rescans the discovery globs (and Proxmox's directory) until `shutdown` and applies
    /// each scan (see [`crate::discovery`]): adds new sockets, drops vanished ones only
    /// after a complete scan, withholds ambiguous names; configured VMs are never dropped.
    pub async fn discover(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
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
                self.remove_discovered(name);
            }
            for (name, vm) in &changes.add {
                self.add_discovered(name, vm);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.discover_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
