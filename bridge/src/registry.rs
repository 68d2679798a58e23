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
    audit::{Audit, Caller},
    call::{Call, Reply},
    config::Config,
    discovery::{Discovery, Scan, scan},
    error::BridgeError,
    metrics::Metrics,
    session::{ParseBudget, Session, VmStatus},
};

pub use crate::discovery::vm_name_for;

/// Audits a state-changing call: with its outcome when it finishes, or as `caller_left`
/// when its caller goes away first (the session then records the late outcome in the
/// VM's `last_write`).
struct AuditOnDrop<'a> {
    audit: &'a Audit,
    caller: Caller,
    vm: &'a str,
    method: &'static str,
    arguments: Option<serde_json::Value>,
    start: std::time::Instant,
    done: bool,
}

impl<'a> AuditOnDrop<'a> {
    fn new(audit: &'a Audit, caller: Caller, vm: &'a str, call: &Call) -> Self {
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

    fn finish(&mut self, outcome: &Result<Reply, BridgeError>) {
        self.done = true;
        let (label, error, results) = match outcome {
            Ok(reply) => ("ok", None, serde_json::to_value(reply).ok()),
            Err(e) => (e.outcome(), Some(e.to_string()), None),
        };
        self.audit.call(
            self.caller,
            self.vm,
            self.method,
            self.arguments.take(),
            label,
            error,
            results,
            self.start.elapsed(),
        );
    }
}

impl Drop for AuditOnDrop<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.audit.call(
                self.caller,
                self.vm,
                self.method,
                self.arguments.take(),
                "caller_left",
                Some("the caller stopped waiting; the outcome goes to the VM's last_write".into()),
                None,
                self.start.elapsed(),
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
}

impl Registry {
    /// A registry with the configured VMs (their sessions start on the current runtime).
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, audit: Arc<Audit>) -> Arc<Self> {
        let registry = Arc::new(Self {
            sessions: RwLock::new(BTreeMap::new()),
            config: config.clone(),
            metrics,
            budget: ParseBudget::new(config.limits.parse_budget_bytes),
            in_flight: Semaphore::new(config.limits.max_in_flight),
            audit,
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

    /// Runs `call` from `caller` on `vm`'s agent by `deadline`, within the bridge-wide
    /// in-flight limit: over it, the call is refused at once rather than queued. A
    /// state-changing call is audited with its outcome, also when its caller leaves.
    pub async fn call(
        &self,
        caller: Caller,
        vm: &str,
        call: Call,
        deadline: Option<Instant>,
    ) -> Result<Reply, BridgeError> {
        let mut audited =
            (!call.is_read()).then(|| AuditOnDrop::new(&self.audit, caller, vm, &call));
        let outcome = self.call_inner(vm, call, deadline).await;
        if let Some(a) = audited.as_mut() {
            a.finish(&outcome);
        }
        outcome
    }

    async fn call_inner(
        &self,
        vm: &str,
        call: Call,
        deadline: Option<Instant>,
    ) -> Result<Reply, BridgeError> {
        let Ok(_slot) = self.in_flight.try_acquire() else {
            self.metrics.refused("bridge", "in_flight");
            return Err(BridgeError::Overloaded(format!(
                "{} calls in flight bridge-wide (limits.max_in_flight)",
                self.config.limits.max_in_flight
            )));
        };
        let session = self.get(vm)?;
        session.call(call, deadline).await
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
        let session = Session::spawn(
            name,
            socket,
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

    /// Rescans the discovery globs until `shutdown` and applies each scan (see
    /// [`crate::discovery`]): adds new sockets, drops vanished ones only after a complete
    /// scan, withholds ambiguous names; configured VMs are never dropped.
    pub async fn discover(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.config.discover.is_empty() {
            return;
        }
        let configured = self.config.vms.keys().cloned().collect();
        let mut discovery = Discovery::new(configured, self.config.limits.max_vms);
        loop {
            // Globbing reads directories: keep it off the async workers.
            let patterns = self.config.discover.clone();
            let owners = self.config.discover_owners.clone();
            let known = discovery.taken().clone();
            let scanned = tokio::task::spawn_blocking(move || scan(&patterns, &owners, &known))
                .await
                .unwrap_or_else(|e| Scan::failed(format!("scan task failed: {e}")));
            let changes = discovery.apply(scanned);
            for name in &changes.remove {
                self.remove(name);
            }
            for (name, socket) in &changes.add {
                self.add(name, socket);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.discover_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
