//! Memory hotplug: DIMMs plugged and unplugged through a VM's [`MemoryBackend`] (QMP or
//! libvirt), their blocks onlined and offlined through its agent, as one operation that
//! completes or leaves the VM as it was.
//!
//! - [`layout`]: the hypervisor's DIMMs joined with the guest's blocks and zones.
//! - [`ctx`]: what an operation works with: its agent and backend calls.
//! - [`plug`], [`unplug`], [`resize`]: the operations, step by step, with their undo paths.
//!
//! One operation runs per VM at a time; a second one is refused as ABORTED rather than
//! queued, since a control plane that sent it has a stale view of the VM. An operation runs
//! in a task of its own: a caller that leaves does not cut it half-way, and its outcome is
//! audited and, with a `request-id`, remembered for the caller's retry.

pub mod ctx;
pub mod layout;
pub mod plug;
pub mod resize;
pub mod unplug;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use qga_qmp::QmpLimits;
use serde::Serialize;
use tokio::time::Instant;

use self::{
    ctx::Ctx,
    layout::{Dimm, Layout},
    plug::PlugArgs,
    resize::Resized,
};
use crate::{
    audit::{Audit, Caller, Record},
    backend::{MemoryBackend, Step, Timeouts, libvirt::LibvirtBackend, qmp::QmpBackend},
    call::hotplug_method,
    config::Config,
    error::{BridgeError, Outcome},
    metrics::Metrics,
    session::Session,
};

/// A hotplug operation and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Operation {
    /// `memory-plug`.
    Plug(PlugArgs),
    /// `memory-unplug`.
    Unplug {
        /// The DIMM's id.
        dimm: String,
    },
    /// `memory-resize`.
    Resize {
        /// The VM's memory in all, bytes.
        size: u64,
    },
}

impl Operation {
    /// The JSON-RPC method name, also used in the audit trail and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Plug(_) => hotplug_method::PLUG,
            Self::Unplug { .. } => hotplug_method::UNPLUG,
            Self::Resize { .. } => hotplug_method::RESIZE,
        }
    }
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Done {
    /// The operation's own result.
    #[serde(flatten)]
    pub what: Effect,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// Things that hold but may surprise.
    pub warnings: Vec<String>,
}

/// What each kind of operation did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Effect {
    /// The DIMM plugged, or unplugged.
    Dimm {
        /// The DIMM as it was plugged, or as it was before it was unplugged.
        dimm: Dimm,
    },
    /// What a resize did.
    Resized(Resized),
}

/// Request ids: 1-128 printable ASCII characters.
pub fn check_request_id(id: &str) -> Result<(), BridgeError> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(BridgeError::InvalidRequest(
            "request-id must be 1-128 printable ASCII characters".into(),
        ))
    }
}

/// A request-id, scoped to the identity that sent it: one caller cannot replay
/// another's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    identity: Option<String>,
    id: String,
}

/// A request-id, the operation it named, and what came of it.
type Remembered = (Key, Operation, Result<Done, BridgeError>);

/// What a VM's operations leave behind.
#[derive(Debug, Default)]
struct State {
    /// The running operation's request-id, if it has one.
    running: Option<Key>,
    /// Request-ids and what came of them, oldest first.
    done: VecDeque<Remembered>,
}

/// Where a VM's memory backend comes from, to tell whether a rediscovered VM keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A QMP socket, shared (released when idle) or not.
    Qmp {
        socket: std::path::PathBuf,
        shared: bool,
    },
    /// A libvirt domain run.
    Libvirt(qga_libvirt::Dom),
}

/// One VM's hotplug state.
#[derive(Debug)]
struct Vm {
    source: Source,
    backend: Arc<dyn MemoryBackend>,
    /// Held by the running operation.
    busy: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
}

impl Vm {
    fn new(source: Source, backend: Arc<dyn MemoryBackend>) -> Self {
        Self {
            source,
            backend,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            state: Mutex::new(State::default()),
        }
    }
}

/// Memory hotplug for every VM with a QMP socket.
#[derive(Debug)]
pub struct Hotplug {
    /// Configured VMs', and discovered ones' as discovery finds them.
    vms: std::sync::RwLock<BTreeMap<String, Arc<Vm>>>,
    config: Arc<Config>,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The per-command time limits of `config`'s backends.
fn timeouts(config: &Config) -> Timeouts {
    Timeouts {
        command: Duration::from_millis(config.hotplug.qmp_timeout_ms),
        eject: Duration::from_millis(config.hotplug.eject_timeout_ms),
    }
}

/// A VM's hotplug state with a QMP backend on `socket` (connected on first use); a shared
/// socket is released `timeouts.shared_idle_ms` after the last command, and held while
/// an operation waits for an event.
fn qmp_vm(config: &Config, socket: &std::path::Path, shared: bool) -> Vm {
    let limits = QmpLimits {
        max_message: config.hotplug.max_qmp_bytes,
        connect_timeout: Duration::from_millis(config.timeouts.connect_ms),
        idle_close: shared.then(|| Duration::from_millis(config.timeouts.shared_idle_ms)),
        ..QmpLimits::default()
    };
    let source = Source::Qmp {
        socket: socket.to_path_buf(),
        shared,
    };
    Vm::new(
        source,
        Arc::new(QmpBackend::new(socket, limits, timeouts(config))),
    )
}

/// Whether a failed operation's outcome is final, so that a retry with its request id
/// gets it again: it acted, or found the request impossible. Transient failures (QEMU or
/// the agent unreachable, a deadline) are not remembered, so the retry runs.
fn remembered(result: &Result<Done, BridgeError>) -> bool {
    matches!(
        result,
        Ok(_) | Err(BridgeError::Hotplug { .. } | BridgeError::DimmNotFound { .. })
    )
}

impl Hotplug {
    /// QMP clients for the configured VMs' QMP sockets (connected on first use).
    pub fn new(config: Arc<Config>, audit: Arc<Audit>, metrics: Arc<Metrics>) -> Self {
        let vms = config
            .qmp
            .iter()
            .map(|(name, socket)| {
                let shared = config.shared.contains(name);
                (name.clone(), Arc::new(qmp_vm(&config, socket, shared)))
            })
            .collect();
        Self {
            vms: std::sync::RwLock::new(vms),
            config,
            audit,
            metrics,
        }
    }

    /// Gives discovered VM `vm` QMP socket `socket` (`shared`: released when idle), or
    /// takes its QMP socket away (`None`). An operation running on it finishes on the
    /// old client; the same socket again keeps the client and its request-ids.
    pub fn set_qmp(&self, vm: &str, socket: Option<&std::path::Path>, shared: bool) {
        let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
        let Some(socket) = socket else {
            if vms.remove(vm).is_some() {
                tracing::info!(vm, "QMP socket removed");
            }
            return;
        };
        let source = Source::Qmp {
            socket: socket.to_path_buf(),
            shared,
        };
        if vms.get(vm).is_none_or(|v| v.source != source) {
            tracing::info!(vm, qmp = %socket.display(), "QMP socket added");
            vms.insert(
                vm.to_string(),
                Arc::new(qmp_vm(&self.config, socket, shared)),
            );
        }
    }

    /// Makes libvirt domain `vm` (run `dom`) pluggable through `libvirt`, or forgets it
    /// (`None`: the domain stopped). An operation running on an earlier run finishes (its
    /// calls fail: that run is gone).
    pub fn set_libvirt(
        &self,
        vm: &str,
        libvirt: Option<(Arc<qga_libvirt::Libvirt>, qga_libvirt::Dom)>,
    ) {
        let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
        let Some((connection, dom)) = libvirt else {
            vms.remove(vm);
            return;
        };
        let source = Source::Libvirt(dom.clone());
        if vms.get(vm).is_none_or(|v| v.source != source) {
            let backend = LibvirtBackend::new(connection, dom, timeouts(&self.config));
            vms.insert(vm.to_string(), Arc::new(Vm::new(source, Arc::new(backend))));
        }
    }

    fn vm(&self, name: &str) -> Result<Arc<Vm>, BridgeError> {
        read(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| BridgeError::Hotplug {
                vm: name.to_string(),
                step: "check".into(),
                reason: "the VM has no QMP socket configured (--qmp NAME=SOCKET or \
                     [vms.NAME] qmp = ...), so the bridge cannot plug DIMMs into it"
                    .into(),
                blocks: Vec::new(),
            })
    }

    fn ctx(
        &self,
        vm: &str,
        backend: Arc<dyn MemoryBackend>,
        session: Arc<Session>,
        deadline: Option<Instant>,
    ) -> Ctx {
        let own = Instant::now() + Duration::from_millis(self.config.hotplug.timeout_ms);
        Ctx {
            vm: vm.to_string(),
            session,
            backend,
            settings: self.config.hotplug.clone(),
            max_set_entries: self.config.limits.max_set_entries,
            deadline: deadline.map_or(own, |d| d.min(own)),
            steps: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// `vm`'s memory layout.
    pub async fn layout(
        &self,
        vm: &str,
        session: Arc<Session>,
        deadline: Option<Instant>,
    ) -> Result<Layout, BridgeError> {
        let v = self.vm(vm)?;
        let ctx = self.ctx(vm, v.backend.clone(), session, deadline);
        let block_size = ctx.block_size().await?;
        let caps = ctx.capabilities().await?;
        let boot = ctx.memory().await?.boot;
        let devices = ctx.dimms().await?;
        let guest = ctx.guest(caps).await?;
        Ok(layout::build(block_size, boot, &devices, &guest))
    }

    /// Runs `op` on `vm` for `caller` (already authorized). With `request_id`, a retry
    /// by the same identity returns the first call's remembered outcome. Every outcome,
    /// refusals included, is audited.
    pub async fn run(
        &self,
        caller: &Caller,
        vm: &str,
        session: Arc<Session>,
        op: Operation,
        request_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<Done, BridgeError> {
        let start = std::time::Instant::now();
        let key = request_id.map(|id| Key {
            identity: caller.identity.as_ref().map(|i| i.name().to_string()),
            id,
        });
        let admitted = self.admit(vm, &op, key.as_ref());
        let (v, guard) = match admitted {
            Ok(Admitted::Run(v, guard)) => (v, guard),
            Ok(Admitted::Replay(result)) => {
                record(
                    &self.audit,
                    caller,
                    vm,
                    &op,
                    key.as_ref(),
                    &result,
                    start,
                    true,
                );
                return result;
            }
            Err(e) => {
                let result = Err(e);
                record(
                    &self.audit,
                    caller,
                    vm,
                    &op,
                    key.as_ref(),
                    &result,
                    start,
                    false,
                );
                return result;
            }
        };
        let mut ctx = self.ctx(vm, v.backend.clone(), session, deadline);
        let audit = self.audit.clone();
        let metrics = self.metrics.clone();
        let caller = caller.clone();
        let max_ids = self.config.hotplug.max_request_ids;
        let vm = vm.to_string();
        let vm_name = vm.clone();
        // The operation runs to its end even if the caller leaves: stopping half-way would
        // leave a DIMM half plugged.
        let task = tokio::spawn(async move {
            let what = match &op {
                Operation::Plug(args) => plug::plug(&mut ctx, args)
                    .await
                    .map(|dimm| Effect::Dimm { dimm }),
                Operation::Unplug { dimm } => unplug::unplug(&mut ctx, dimm)
                    .await
                    .map(|dimm| Effect::Dimm { dimm }),
                Operation::Resize { size } => {
                    resize::resize(&mut ctx, *size).await.map(Effect::Resized)
                }
            };
            let result = what.map(|what| Done {
                what,
                steps: std::mem::take(&mut ctx.steps),
                warnings: std::mem::take(&mut ctx.warnings),
            });
            metrics.call(&vm, op.method(), Outcome::of(&result), start.elapsed());
            record(
                &audit,
                &caller,
                &vm,
                &op,
                key.as_ref(),
                &result,
                start,
                false,
            );
            match &result {
                Ok(_) => tracing::info!(vm, method = op.method(), "memory hotplug done"),
                Err(e) => {
                    tracing::warn!(vm, method = op.method(), error = %e, "memory hotplug failed")
                }
            }
            {
                let mut state = lock(&v.state);
                state.running = None;
                if let Some(key) = key
                    && remembered(&result)
                {
                    if state.done.len() >= max_ids {
                        state.done.pop_front();
                    }
                    state.done.push_back((key, op, result.clone()));
                }
            }
            drop(guard);
            result
        });
        task.await.unwrap_or_else(|e| {
            Err(BridgeError::Hotplug {
                vm: vm_name,
                step: "task".into(),
                reason: format!("the operation's task failed: {e}"),
                blocks: Vec::new(),
            })
        })
    }

    /// Decides whether `op` runs now: the VM's lock is taken first and the remembered
    /// request-ids looked at under it, so a retry racing with the end of its first call
    /// gets the first call's outcome, never a second run.
    fn admit(&self, vm: &str, op: &Operation, key: Option<&Key>) -> Result<Admitted, BridgeError> {
        let v = self.vm(vm)?;
        let guard = v.busy.clone().try_lock_owned();
        let mut state = lock(&v.state);
        if let Some(key) = key
            && let Some((_, first, result)) = state.done.iter().find(|(k, ..)| k == key)
        {
            if first != op {
                return Err(BridgeError::InvalidRequest(format!(
                    "request-id '{}' was used for another operation ({} {})",
                    key.id,
                    first.method(),
                    serde_json::to_string(first).unwrap_or_default()
                )));
            }
            return Ok(Admitted::Replay(result.clone()));
        }
        let Ok(guard) = guard else {
            let same = key.is_some() && state.running.as_ref() == key;
            return Err(BridgeError::Aborted(if same {
                format!(
                    "the operation with this request-id still runs on VM '{vm}'; \
                     retry with the same request-id for its outcome"
                )
            } else {
                format!("another memory hotplug operation runs on VM '{vm}'; nothing was done")
            }));
        };
        state.running = key.cloned();
        drop(state);
        Ok(Admitted::Run(v, guard))
    }
}

/// Whether an operation runs, or what to answer instead.
enum Admitted {
    /// It runs, holding the VM's lock.
    Run(Arc<Vm>, tokio::sync::OwnedMutexGuard<()>),
    /// The remembered outcome of the same request-id.
    Replay(Result<Done, BridgeError>),
}

/// One audit line for a hotplug operation (`replay`: a request-id's remembered outcome).
#[allow(clippy::too_many_arguments)]
fn record(
    audit: &Audit,
    caller: &Caller,
    vm: &str,
    op: &Operation,
    key: Option<&Key>,
    result: &Result<Done, BridgeError>,
    start: std::time::Instant,
    replay: bool,
) {
    let mut arguments = serde_json::to_value(op).ok();
    if let (Some(serde_json::Value::Object(a)), Some(key)) = (&mut arguments, key) {
        a.insert("request-id".into(), key.id.clone().into());
        if replay {
            a.insert("replayed".into(), true.into());
        }
    }
    let outcome = Outcome::of(result).as_str();
    audit.record(&Record {
        vm: Some(vm),
        method: Some(op.method()),
        arguments,
        error: result.as_ref().err().map(ToString::to_string),
        results: result
            .as_ref()
            .ok()
            .and_then(|d| serde_json::to_value(d).ok()),
        duration_ms: Some(start.elapsed().as_secs_f64() * 1000.0),
        ..Audit::base("call", caller, outcome)
    });
}
