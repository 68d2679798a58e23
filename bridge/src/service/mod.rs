//! The bridge's one internal API: agent calls, memory layout, hotplug operations, the
//! guest's memory signals and the VM list, for an authenticated [`Caller`]. Authorization, the audit trail and the
//! bridge-wide in-flight limit are applied here, once, whatever front end the call came
//! through; gRPC and JSON-RPC only decode parameters and map errors.

use std::sync::Arc;

use futures::StreamExt;
use tokio::{sync::Semaphore, time::Instant};

mod audited;

use self::audited::{AuditOnDrop, Trail};
use crate::{
    call::{Call, MEMORY_STATS_METHOD, Reply, hotplug_method},
    config::Config,
    error::BridgeError,
    hotplug::{
        Done, Hotplug, Operation, Request, Target, check_request_id, desired::Desired,
        layout::Layout,
    },
    journal::Journal,
    metrics::Metrics,
    net::{Server, gatekeeper::Gatekeeper},
    policy::{
        Caller,
        audit::{Audit, Record},
        auth::Auth,
    },
    session::VmStatus,
    signals::{self, Signals, SignalsSettings, snapshot::MemoryStats},
    vms::VmMap,
};

/// `(VM, item)` pairs grouped by VM.
fn by_vm<T>(
    items: impl IntoIterator<Item = (String, T)>,
) -> std::collections::BTreeMap<String, Vec<T>> {
    let mut out: std::collections::BTreeMap<String, Vec<T>> = Default::default();
    for (vm, item) in items {
        out.entry(vm).or_default().push(item);
    }
    out
}

/// VMs the keeper checks at once.
const KEEPER_CONCURRENCY: usize = 8;

/// VMs whose memory signals are polled at once.
const POLL_CONCURRENCY: usize = 16;

/// The service every front end calls. See the module docs.
#[derive(Debug)]
pub struct Service {
    vms: Arc<VmMap>,
    hotplug: Hotplug,
    signals: Signals,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    audit: Arc<Audit>,
    auth: Arc<Auth>,
    /// Calls being served, bridge-wide (`limits.max_in_flight`).
    in_flight: Semaphore,
}

impl Service {
    /// The service over `vms`.
    pub fn new(
        vms: Arc<VmMap>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        audit: Arc<Audit>,
        auth: Arc<Auth>,
        journal: Journal,
    ) -> Arc<Self> {
        Arc::new(Self {
            vms,
            hotplug: Hotplug::new(
                crate::hotplug::HotplugSettings::of(&config),
                Arc::new(Trail(audit.clone())),
                metrics.clone(),
                journal,
            ),
            signals: Signals::new(SignalsSettings::of(&config), metrics.clone()),
            in_flight: Semaphore::new(config.limits.max_in_flight),
            config,
            metrics,
            audit,
            auth,
        })
    }

    /// The security layer of `server`: it authenticates callers with the bridge's
    /// identities, counts refusals and audits them where [`Server::audits_refusals`]. An
    /// HTTP server adds its `Host`/`Origin` policy.
    pub fn gatekeeper(&self, server: Server) -> Gatekeeper {
        let keeper = Gatekeeper::new(server, self.auth.clone(), self.metrics.clone());
        if !server.audits_refusals() {
            keeper
        } else {
            keeper.audited(self.audit.clone())
        }
    }

    /// How many VMs are served.
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// Has the audit trail reopen its file by its path (SIGHUP, after logrotate).
    pub fn reopen_audit(&self) {
        self.audit.reopen();
    }

    /// The VMs `caller` has a role on, with their state.
    pub fn visible(&self, caller: &Caller) -> Vec<VmStatus> {
        let Some(identity) = &caller.identity else {
            return Vec::new();
        };
        self.vms
            .list()
            .into_iter()
            .filter(|vm| self.auth.role(identity, &vm.name).is_some())
            .collect()
    }

    /// Runs `call` from `caller` on `vm`'s agent by `deadline`, if the caller's grants
    /// allow it, within the bridge-wide in-flight limit. A state-changing call is audited
    /// with its outcome, also when its caller leaves; a denied call as a denial.
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
        let outcome = self.run_call(vm, call, deadline).await;
        if let Some(a) = audited.as_mut() {
            a.finish(&outcome);
        }
        outcome
    }

    async fn run_call(
        &self,
        vm: &str,
        call: Call,
        deadline: Option<Instant>,
    ) -> Result<Reply, BridgeError> {
        let _slot = self.in_flight_slot()?;
        let vm = self.vms.get(vm)?;
        vm.session.call(call, deadline).await
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
        self.hotplug.layout(self.target(vm)?, deadline).await
    }

    /// `vm`'s memory signals, for a caller with a read grant: its latest snapshot if
    /// young enough, else a new one (see [`crate::signals`]).
    pub async fn memory_stats(
        &self,
        caller: &Caller,
        vm: &str,
        deadline: Option<Instant>,
    ) -> Result<MemoryStats, BridgeError> {
        self.authorize(caller, vm, MEMORY_STATS_METHOD, false, || None)?;
        let _slot = self.in_flight_slot()?;
        let target = self.signals_target(vm)?;
        let snapshot = self.signals.stats(&target, deadline).await?;
        Ok(snapshot.view(Instant::now()))
    }

    /// How often [`Service::poll_signals`] is to run, if at all (`signals.poll_interval_ms`).
    pub fn signals_poll_interval(&self) -> Option<std::time::Duration> {
        self.signals.poll_interval()
    }

    /// One background poll of every VM's memory signals, a few VMs at a time. Not a
    /// caller's call: no grant, no in-flight slot; VMs in use are skipped.
    pub async fn poll_signals(&self) {
        let polls = self.vms.all().into_iter().map(|(name, vm)| async move {
            let target = signals::Target {
                vm: &name,
                session: vm.session.clone(),
                memory: vm.memory.clone(),
                signals: vm.signals.clone(),
            };
            self.signals.poll(&target).await;
        });
        futures::stream::iter(polls)
            .buffer_unordered(POLL_CONCURRENCY)
            .collect::<()>()
            .await;
    }

    /// VM `vm` as the signals see it.
    fn signals_target<'a>(&self, vm: &'a str) -> Result<signals::Target<'a>, BridgeError> {
        let found = self.vms.get(vm)?;
        Ok(signals::Target {
            vm,
            session: found.session.clone(),
            memory: found.memory.clone(),
            signals: found.signals.clone(),
        })
    }

    /// One pass of the keeper (see [`crate::hotplug::keeper`]) over every VM with DIMMs
    /// the bridge plugged, a few VMs at a time. Not a caller's call: no grant, no
    /// in-flight slot; what it changes is audited as `restore`.
    pub async fn keep_memory(&self) {
        self.recover().await;
        let wanted = match self.hotplug.journal().wanted::<Desired>() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the desired memory from the journal");
                return;
            }
        };
        let passes = by_vm(wanted).into_iter().map(|(vm, wanted)| async move {
            // A VM the bridge does not serve now (yet) keeps its desired memory.
            let Ok(target) = self.target(&vm) else {
                return;
            };
            if let Err(e) = self.hotplug.restore(target, &wanted).await {
                tracing::debug!(vm, error = %e, "memory keeper: VM not checked this time");
            }
        });
        futures::stream::iter(passes)
            .buffer_unordered(KEEPER_CONCURRENCY)
            .collect::<()>()
            .await;
    }

    /// Recovers the operations an earlier bridge stopped during, on the VMs served now
    /// (see [`crate::hotplug::recover`]).
    async fn recover(&self) {
        let interrupted = self.hotplug.journal().interrupted();
        for vm in by_vm(interrupted.into_iter().map(|(vm, raw, _)| (vm, raw))).into_keys() {
            let Ok(target) = self.target(&vm) else {
                continue;
            };
            if let Err(e) = self.hotplug.recover(target).await {
                tracing::warn!(vm, error = %e, "cannot recover an interrupted operation yet");
            }
        }
    }

    /// Runs hotplug operation `op` on `vm`, for a caller with a write grant; audited
    /// when it ends (also if the caller left before). A malformed `request_id` is
    /// refused before anything else.
    pub async fn memory_hotplug(
        &self,
        caller: &Caller,
        vm: &str,
        op: Operation,
        request_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<Done, BridgeError> {
        if let Some(id) = &request_id {
            check_request_id(id)?;
        }
        self.authorize(caller, vm, op.method(), true, || {
            serde_json::to_value(&op).ok()
        })?;
        let _slot = self.in_flight_slot()?;
        let target = self.target(vm)?;
        let request = Request {
            op,
            request_id,
            identity: caller.identity.as_ref().map(|i| i.name().to_string()),
            deadline,
        };
        let report = audited::operation(self.audit.clone(), caller.clone());
        let signals = self.vms.get(vm).map(|v| v.signals.clone());
        let done = self.hotplug.run(target, request, report).await;
        // The VM's memory may have changed: the next memory-stats takes a new snapshot.
        if let Ok(signals) = signals {
            signals.forget();
        }
        done
    }

    /// VM `vm` as hotplug sees it.
    fn target<'a>(&self, vm: &'a str) -> Result<Target<'a>, BridgeError> {
        let found = self.vms.get(vm)?;
        Ok(Target {
            vm,
            session: found.session.clone(),
            memory: found.memory.clone(),
        })
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
}
