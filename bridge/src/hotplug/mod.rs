//! Memory hotplug: DIMMs plugged and unplugged over a VM's QMP socket, their blocks
//! onlined and offlined through its agent, as one operation that completes or leaves the
//! VM as it was.
//!
//! - [`layout`]: QEMU's DIMMs joined with the guest's blocks and zones.
//! - [`ops`]: plug, unplug and resize, step by step, with their undo paths.
//! - [`qemu`]: the QMP commands they use.
//!
//! One operation runs per VM at a time; a second one is refused as ABORTED rather than
//! queued, since a control plane that sent it has a stale view of the VM. An operation runs
//! in a task of its own: a caller that leaves does not cut it half-way, and its outcome is
//! audited and, with a `request-id`, remembered for the caller's retry.

pub mod layout;
pub mod ops;
pub mod qemu;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use qga_qmp::{Qmp, QmpLimits};
use serde::Serialize;
use tokio::time::Instant;

use self::{
    layout::{Dimm, Layout},
    ops::{Ctx, PlugArgs, Resized, Step},
};
use crate::{
    audit::{Audit, Caller, Record},
    config::Config,
    error::BridgeError,
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
            Self::Plug(_) => "memory-plug",
            Self::Unplug { .. } => "memory-unplug",
            Self::Resize { .. } => "memory-resize",
        }
    }
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Done {
    /// The operation's own result.
    #[serde(flatten)]
    pub what: Outcome,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// Things that hold but may surprise.
    pub warnings: Vec<String>,
}

/// The result of each kind of operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// The DIMM plugged, or unplugged.
    Dimm {
        /// It.
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

/// A request id, the operation it named, and what came of it.
type Remembered = (String, Operation, Result<Done, BridgeError>);

/// One VM's hotplug state.
#[derive(Debug)]
struct Vm {
    qmp: Qmp,
    /// Held by the running operation.
    busy: Arc<tokio::sync::Mutex<()>>,
    /// Request ids and what came of them, oldest first.
    done: Mutex<VecDeque<Remembered>>,
}

/// Memory hotplug for every VM with a QMP socket.
#[derive(Debug)]
pub struct Hotplug {
    vms: BTreeMap<String, Arc<Vm>>,
    config: Arc<Config>,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let limits = QmpLimits {
            max_message: config.hotplug.max_qmp_bytes,
            connect_timeout: Duration::from_millis(config.timeouts.connect_ms),
            ..QmpLimits::default()
        };
        let vms = config
            .qmp
            .iter()
            .map(|(name, socket)| {
                let vm = Vm {
                    qmp: Qmp::new(socket.clone(), limits.clone()),
                    busy: Arc::new(tokio::sync::Mutex::new(())),
                    done: Mutex::new(VecDeque::new()),
                };
                (name.clone(), Arc::new(vm))
            })
            .collect();
        Self {
            vms,
            config,
            audit,
            metrics,
        }
    }

    /// The QMP socket of `vm`, if it has one.
    pub fn socket(&self, vm: &str) -> Option<&std::path::Path> {
        self.vms.get(vm).map(|v| v.qmp.socket())
    }

    fn vm(&self, name: &str) -> Result<&Arc<Vm>, BridgeError> {
        self.vms.get(name).ok_or_else(|| BridgeError::Hotplug {
            vm: name.to_string(),
            step: "check".into(),
            reason: "the VM has no QMP socket configured (--qmp NAME=SOCKET or \
                     [vms.NAME] qmp = ...), so the bridge cannot plug DIMMs into it"
                .into(),
            blocks: Vec::new(),
        })
    }

    fn ctx(&self, vm: &str, qmp: Qmp, session: Arc<Session>, deadline: Option<Instant>) -> Ctx {
        let own = Instant::now() + Duration::from_millis(self.config.hotplug.timeout_ms);
        Ctx {
            vm: vm.to_string(),
            session,
            qmp,
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
        let ctx = self.ctx(vm, v.qmp.clone(), session, deadline);
        let block_size = ctx.block_size().await?;
        let caps = ctx.capabilities().await?;
        let (boot, _) = qemu::memory_summary(&ctx).await?;
        let devices = qemu::dimms(&ctx).await?;
        let guest = ctx.guest(caps).await?;
        Ok(layout::build(block_size, boot, &devices, &guest))
    }

    /// Runs `op` on `vm` for `caller` (already authorized). With `request_id`, a retry
    /// returns the first call's remembered outcome.
    pub async fn run(
        &self,
        caller: &Caller,
        vm: &str,
        session: Arc<Session>,
        op: Operation,
        request_id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<Done, BridgeError> {
        let v = self.vm(vm)?.clone();
        if let Some(id) = &request_id {
            let done = lock(&v.done);
            if let Some((_, first, result)) = done.iter().find(|(i, ..)| i == id) {
                if *first != op {
                    return Err(BridgeError::InvalidRequest(format!(
                        "request-id '{id}' was used for another operation ({} {})",
                        first.method(),
                        serde_json::to_string(first).unwrap_or_default()
                    )));
                }
                return result.clone();
            }
        }
        let Ok(guard) = v.busy.clone().try_lock_owned() else {
            return Err(BridgeError::Aborted(format!(
                "another memory hotplug operation runs on VM '{vm}'; nothing was done"
            )));
        };
        let mut ctx = self.ctx(vm, v.qmp.clone(), session, deadline);
        let audit = self.audit.clone();
        let metrics = self.metrics.clone();
        let caller = caller.clone();
        let max_ids = self.config.hotplug.max_request_ids;
        let vm = vm.to_string();
        let vm_name = vm.clone();
        // The operation runs to its end even if the caller leaves: stopping half-way would
        // leave a DIMM half plugged.
        let task = tokio::spawn(async move {
            let start = std::time::Instant::now();
            let what = match &op {
                Operation::Plug(args) => ops::plug(&mut ctx, args)
                    .await
                    .map(|dimm| Outcome::Dimm { dimm }),
                Operation::Unplug { dimm } => ops::unplug(&mut ctx, dimm)
                    .await
                    .map(|dimm| Outcome::Dimm { dimm }),
                Operation::Resize { size } => {
                    ops::resize(&mut ctx, *size).await.map(Outcome::Resized)
                }
            };
            let result = what.map(|what| Done {
                what,
                steps: std::mem::take(&mut ctx.steps),
                warnings: std::mem::take(&mut ctx.warnings),
            });
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.outcome(),
            };
            metrics.call(&vm, op.method(), outcome, start.elapsed());
            let mut arguments = serde_json::to_value(&op).ok();
            if let (Some(serde_json::Value::Object(a)), Some(id)) = (&mut arguments, &request_id) {
                a.insert("request-id".into(), id.clone().into());
            }
            audit.record(&Record {
                vm: Some(&vm),
                method: Some(op.method()),
                arguments,
                error: result.as_ref().err().map(ToString::to_string),
                results: result
                    .as_ref()
                    .ok()
                    .and_then(|d| serde_json::to_value(d).ok()),
                duration_ms: Some(start.elapsed().as_secs_f64() * 1000.0),
                ..Audit::base("call", &caller, outcome)
            });
            match &result {
                Ok(_) => tracing::info!(vm, method = op.method(), "memory hotplug done"),
                Err(e) => {
                    tracing::warn!(vm, method = op.method(), error = %e, "memory hotplug failed")
                }
            }
            if let Some(id) = request_id
                && remembered(&result)
            {
                let mut done = lock(&v.done);
                if done.len() >= max_ids {
                    done.pop_front();
                }
                done.push_back((id, op, result.clone()));
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
}
