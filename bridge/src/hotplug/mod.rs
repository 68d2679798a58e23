//! Memory hotplug: DIMMs plugged and unplugged through a VM's
//! [`MemoryBackend`](crate::backend::MemoryBackend) (QMP or
//! libvirt), their blocks onlined and offlined through its agent, as one operation that
//! completes or leaves the VM as it was.
//!
//! - [`layout`]: the hypervisor's DIMMs joined with the guest's blocks and zones.
//! - [`ctx`]: what an operation works with: its agent and backend calls.
//! - [`plug`], [`unplug`], [`resize`]: the operations, step by step, with their undo paths.
//! - [`balloon`]: the virtio balloon, the third way to resize, and the size it keeps.
//!
//! One operation runs per VM at a time ([`lock`]): a second caller's operation is refused
//! as ABORTED rather than queued, since a control plane that sent it has a stale view of
//! the VM; the bridge's own work on the VM (the [`keeper`]'s passes, [`recover`]y) never
//! refuses a caller: the caller's operation waits for it, within its deadline. An operation runs
//! in a task of its own: a caller that leaves does not cut it half-way, and its outcome is
//! reported (for the audit trail, see [`report`]) and, with a `request-id`, recorded in the [`Journal`] for the caller's retry —
//! its intent before it acts, its outcome before the VM is released.

pub mod balloon;
pub mod ctx;
pub mod desired;
pub mod keeper;
pub mod layout;
pub mod lock;
pub mod memory;
pub mod outcome;
pub mod plug;
pub mod policy;
pub mod recover;
pub mod report;
pub mod resize;
pub mod unplug;
pub mod virtio_mem;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use self::{
    ctx::Ctx,
    layout::{Dimm, Layout},
    lock::Held,
    memory::{Admitted, VmMemory},
    plug::PlugArgs,
    report::{Ended, Report, Witness},
    resize::Resized,
};
use crate::{
    backend::{self, Step},
    call::hotplug_method,
    config::{self, Config},
    error::{BridgeError, Outcome},
    journal::{Journal, Key},
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
    /// `memory-balloon`.
    Balloon {
        /// The memory the guest may use, bytes.
        target: u64,
    },
}

impl Operation {
    /// The JSON-RPC method name, also used in the audit trail and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Plug(_) => hotplug_method::PLUG,
            Self::Unplug { .. } => hotplug_method::UNPLUG,
            Self::Resize { .. } => hotplug_method::RESIZE,
            Self::Balloon { .. } => hotplug_method::BALLOON,
        }
    }
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Effect {
    /// The DIMM plugged, or unplugged.
    Dimm {
        /// The DIMM as it was plugged, or as it was before it was unplugged.
        dimm: Dimm,
    },
    /// What `memory-balloon` did.
    Balloon {
        /// The balloon as it was asked to be and is.
        balloon: balloon::Ballooned,
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

/// What hotplug needs of the configuration.
#[derive(Debug, Clone)]
pub struct HotplugSettings {
    /// `[hotplug]`: sizes, timeouts, request-ids.
    pub hotplug: config::HotplugConfig,
    /// The VMs whose `auto_online` differs from `hotplug.auto_online`
    /// (`[vms] NAME = { ..., auto_online = "keep" }`).
    pub auto_online_of: BTreeMap<String, config::AutoOnline>,
    /// Largest set sent to an agent (`limits.max_set_entries`).
    pub max_set_entries: usize,
    /// What the VMs' memory backends are opened with.
    pub backend: backend::Bounds,
    /// `[balloon]`: the floor and how long a balloon may stand still.
    pub balloon: config::BalloonConfig,
}

impl HotplugSettings {
    /// The hotplug settings of `config`.
    pub fn of(config: &Config) -> Arc<Self> {
        Arc::new(Self {
            hotplug: config.hotplug.clone(),
            auto_online_of: config
                .vms
                .iter()
                .filter_map(|(name, vm)| Some((name.clone(), vm.auto_online?)))
                .collect(),
            max_set_entries: config.limits.max_set_entries,
            backend: backend::Bounds {
                timeouts: backend::Timeouts {
                    command: Duration::from_millis(config.hotplug.hypervisor_timeout_ms),
                    eject: Duration::from_millis(config.hotplug.eject_timeout_ms),
                },
                max_qmp_bytes: config.hotplug.max_qmp_bytes,
                connect: Duration::from_millis(config.timeouts.connect_ms),
                shared_idle: Duration::from_millis(config.timeouts.shared_idle_ms),
            },
            balloon: config.balloon.clone(),
        })
    }
}

/// Memory hotplug: runs operations on VMs' [`VmMemory`], reported and counted. Cheap to
/// clone: a task that must run to its end gets its own.
#[derive(Debug, Clone)]
pub struct Hotplug {
    settings: Arc<HotplugSettings>,
    /// Where the keeper's and recovery's changes are reported.
    witness: Arc<dyn Witness>,
    metrics: Arc<Metrics>,
    journal: Journal,
    /// The keeper's restores under way.
    pending: Arc<keeper::Pending>,
    /// The balloon targets the keeper set.
    balloon_sets: Arc<keeper::BalloonSets>,
}

/// The refusal for a VM without a memory backend.
fn no_backend(vm: &str) -> BridgeError {
    BridgeError::Hotplug {
        vm: vm.to_string(),
        step: "check".into(),
        reason: "the VM has no QMP socket configured (--qmp NAME=SOCKET or \
                 [vms.NAME] qmp = ...), so the bridge cannot plug DIMMs into it"
            .into(),
        blocks: Vec::new(),
    }
}

/// The VM an operation or layout is for: its name, agent session and hotplug state (if
/// it has a memory backend).
#[derive(Debug)]
pub struct Target<'a> {
    /// The VM's name.
    pub vm: &'a str,
    /// Its agent.
    pub session: Arc<Session>,
    /// Its memory backend and hotplug state.
    pub memory: Option<Arc<VmMemory>>,
}

/// A caller's operation, as hotplug takes it.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub op: Operation,
    /// The caller's request-id, if it gave one: a retry gets the first call's outcome.
    pub request_id: Option<String>,
    /// The caller's identity, which scopes its request-ids.
    pub identity: Option<String>,
    /// The caller's deadline.
    pub deadline: Option<Instant>,
}

/// One operation's identity for its report: on which VM, what, and since when.
struct Ticket<'a> {
    vm: &'a str,
    op: &'a Operation,
    key: Option<&'a Key>,
    start: std::time::Instant,
}

impl Ticket<'_> {
    /// Reports `result` through `report` (`replayed`: answered from the journal).
    fn tell(&self, report: Report, result: &Result<Done, BridgeError>, replayed: bool) {
        report(&Ended {
            vm: self.vm,
            op: self.op,
            request_id: self.key.map(|k| k.id.as_str()),
            replayed,
            result,
            elapsed: self.start.elapsed(),
        });
    }

    /// Reports `result` (see [`Ticket::tell`]) and returns it: the answer.
    fn answer(
        &self,
        report: Report,
        result: Result<Done, BridgeError>,
        replayed: bool,
    ) -> Result<Done, BridgeError> {
        self.tell(report, &result, replayed);
        result
    }
}

impl Hotplug {
    /// Hotplug with `settings`, reporting its own changes to `witness`, counting in
    /// `metrics`, recording request-ids in `journal`.
    pub fn new(
        settings: Arc<HotplugSettings>,
        witness: Arc<dyn Witness>,
        metrics: Arc<Metrics>,
        journal: Journal,
    ) -> Self {
        Self {
            settings,
            witness,
            metrics,
            journal,
            pending: Arc::default(),
            balloon_sets: Arc::default(),
        }
    }

    /// The journal it records request-ids and desired memory in.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// When an operation asked for now with `deadline` must end: by the caller's
    /// deadline or the operation's own timeout (`hotplug.timeout_ms`), the earlier.
    fn until(&self, deadline: Option<Instant>) -> Instant {
        let own = Instant::now() + Duration::from_millis(self.settings.hotplug.timeout_ms);
        deadline.map_or(own, |d| d.min(own))
    }

    fn ctx(
        &self,
        vm: &str,
        memory: &VmMemory,
        session: Arc<Session>,
        deadline: Option<Instant>,
    ) -> Ctx {
        Ctx {
            vm: vm.to_string(),
            session,
            backend: memory.backend(),
            journal: self.journal.clone(),
            settings: {
                let mut s = self.settings.hotplug.clone();
                if let Some(&a) = self.settings.auto_online_of.get(vm) {
                    s.auto_online = a;
                }
                s
            },
            max_set_entries: self.settings.max_set_entries,
            balloon: self.settings.balloon.clone(),
            deadline: self.until(deadline),
            steps: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The memory layout of `target`.
    pub async fn layout(
        &self,
        target: Target<'_>,
        deadline: Option<Instant>,
    ) -> Result<Layout, BridgeError> {
        let memory = target.memory.ok_or_else(|| no_backend(target.vm))?;
        let ctx = self.ctx(target.vm, &memory, target.session, deadline);
        let block_size = ctx.block_size().await?;
        let caps = ctx.capabilities().await?;
        let boot = ctx.memory().await?.boot;
        let devices = ctx.dimms().await?;
        let vmem = ctx.virtio_mem().await?;
        let guest = ctx.guest(caps).await?;
        let mut layout = layout::build(block_size, boot, &devices, &vmem, &guest);
        // A balloon that cannot be read does not cost the rest of the layout.
        match balloon::view(&ctx).await {
            Ok(b) => layout.balloon = b,
            Err(e) => layout
                .warnings
                .push(format!("the VM's virtio balloon cannot be read: {e}")),
        }
        Ok(layout)
    }

    /// Runs `request` on `target` (its caller already authorized). With a request-id,
    /// a retry by the same identity returns the first call's remembered outcome. Every
    /// outcome, refusals included, goes to `report`, once.
    pub async fn run(
        &self,
        target: Target<'_>,
        request: Request,
        report: Report,
    ) -> Result<Done, BridgeError> {
        let Request {
            op,
            request_id,
            identity,
            deadline,
        } = request;
        let vm = target.vm;
        let key = request_id.map(|id| Key { identity, id });
        let start = std::time::Instant::now();
        let ticket = Ticket {
            vm,
            op: &op,
            key: key.as_ref(),
            start,
        };
        // The whole call, waiting for the VM included, ends by then.
        let until = self.until(deadline);
        let admitted = match &target.memory {
            Some(m) => m
                .admit(vm, &op, key.as_ref(), &self.journal, until)
                .await
                .map(|a| (a, m.clone())),
            None => Err(no_backend(vm)),
        };
        let (guard, memory) = match admitted {
            Ok((Admitted::Run(guard), memory)) => (guard, memory),
            Ok((Admitted::Replay(result), _)) => return ticket.answer(report, result, true),
            Ok((Admitted::Recover(held), memory)) => {
                let result = self
                    .recovered(&ticket, memory, target.session, held, until)
                    .await;
                // Answered from the recovered outcome, unless recovery could not finish.
                let replayed = !matches!(result, Err(BridgeError::Aborted(_)));
                return ticket.answer(report, result, replayed);
            }
            Err(e) => return ticket.answer(report, Err(e), false),
        };
        // Every operation's intent is durable before it acts (in its task: see `spawn`);
        // one without a request-id under a key of the bridge's own, forgotten when it ends.
        let journaled = key.clone().unwrap_or_else(Journal::own_key);
        let running = Running {
            ctx: self.ctx(vm, &memory, target.session, Some(until)),
            journaled,
            guard,
            report,
            op,
            key,
            start,
        };
        self.spawn(running).await.unwrap_or_else(|e| {
            Err(BridgeError::Hotplug {
                vm: vm.to_string(),
                step: "task".into(),
                reason: format!("the operation's task failed: {e}"),
                blocks: Vec::new(),
            })
        })
    }

    /// The answer to a retry of an operation a stopped bridge left unfinished: the VM is
    /// recovered now, while `held`, and the retry gets the outcome recorded for its
    /// request-id.
    async fn recovered(
        &self,
        t: &Ticket<'_>,
        memory: Arc<VmMemory>,
        session: Arc<Session>,
        held: Held,
        until: Instant,
    ) -> Result<Done, BridgeError> {
        let raw = t.key.map(|k| Journal::raw_key(t.vm, k));
        let outcomes = self.recover_now(t.vm, memory, session, held, until).await?;
        match outcomes.into_iter().find(|(r, _)| Some(r) == raw.as_ref()) {
            Some((_, stored)) => stored.result(t.vm),
            None => memory::after_recovery(t.vm, t.op, t.key, &self.journal),
        }
    }

    /// Runs an admitted operation in a task of its own, so that it runs to its end even
    /// if the caller leaves (stopping half-way would leave a DIMM half plugged; leaving
    /// while its intent is written would leave the entry marked as running here): makes
    /// its intent durable, runs it, then counts, reports and remembers its outcome and
    /// releases the VM.
    fn spawn(&self, r: Running) -> tokio::task::JoinHandle<Result<Done, BridgeError>> {
        let metrics = self.metrics.clone();
        let journal = self.journal.clone();
        tokio::spawn(async move {
            let Running {
                mut ctx,
                journaled,
                guard,
                report,
                op,
                key,
                start,
            } = r;
            let (vm, method) = (ctx.vm.clone(), op.method());
            let (_, args) = outcome::intent(&op);
            if let Err(e) = journal.begin(&vm, &journaled, method, args).await {
                let result = Err(ctx.hotplug_error(
                    "journal",
                    format!("cannot record the operation before acting: {e}; nothing was done"),
                ));
                let ticket = Ticket {
                    vm: &vm,
                    op: &op,
                    key: key.as_ref(),
                    start,
                };
                ticket.tell(report, &result, false);
                return result;
            }
            let result = execute(&mut ctx, &op).await;
            let vm = vm.as_str();
            metrics.call(vm, method, Outcome::of(&result), start.elapsed());
            let ticket = Ticket {
                vm,
                op: &op,
                key: key.as_ref(),
                start,
            };
            ticket.tell(report, &result, false);
            match &result {
                Ok(_) => tracing::info!(vm, method, "memory hotplug done"),
                Err(e) => tracing::warn!(vm, method, error = %e, "memory hotplug failed"),
            }
            if let Err(e) = keeper::remember(&journal, vm, &op, &result).await {
                tracing::error!(vm, method, error = %e, "cannot record the VM's desired memory");
            }
            let ended = match &key {
                Some(key) => {
                    let outcome = outcome::Stored::json_of(&result);
                    journal.end(vm, key, outcome::intent(&op), outcome).await
                }
                None => journal.forget(vm, &journaled).await,
            };
            if let Err(e) = ended {
                // The operation happened; its entry stays `running`: a retry here is told
                // the outcome was not recorded, and after a restart it is recovered. It is
                // never run again.
                tracing::error!(vm, method, error = %e, "cannot record the operation's outcome");
            }
            drop(guard);
            result
        })
    }
}

/// An operation admitted to run: everything its task needs.
struct Running {
    ctx: Ctx,
    /// The operation's key in the journal: its request-id's, or one of the bridge's own.
    journaled: Key,
    /// The VM, released when the operation ends.
    guard: Held,
    /// Where its outcome goes.
    report: Report,
    op: Operation,
    key: Option<Key>,
    start: std::time::Instant,
}

/// Runs `op` to its end with `ctx`, and what it did with the steps it took.
async fn execute(ctx: &mut Ctx, op: &Operation) -> Result<Done, BridgeError> {
    let what = match op {
        Operation::Plug(args) => plug::plug(ctx, args)
            .await
            .map(|dimm| Effect::Dimm { dimm }),
        Operation::Unplug { dimm } => unplug::unplug(ctx, dimm)
            .await
            .map(|dimm| Effect::Dimm { dimm }),
        Operation::Resize { size } => resize::resize(ctx, *size).await.map(Effect::Resized),
        Operation::Balloon { target } => balloon::balloon(ctx, *target)
            .await
            .map(|balloon| Effect::Balloon { balloon }),
    };
    // A kept balloon holds its size of the VM's new memory (see `balloon`).
    if what.is_ok()
        && !matches!(op, Operation::Balloon { .. })
        && let Err(e) = balloon::rebalance(ctx).await
    {
        ctx.warnings.push(format!(
            "the balloon could not be set again after this {}: {e}; the keeper tries again",
            op.method()
        ));
    }
    what.map(|what| Done {
        what,
        steps: std::mem::take(&mut ctx.steps),
        warnings: std::mem::take(&mut ctx.warnings),
    })
}
