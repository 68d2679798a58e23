//! The guest's memory signals: for each VM, one snapshot of its memory — the agent's
//! `__org.qga-bridge_get-memory-stats` and the hypervisor's boot and plugged memory, taken
//! together, with the instant it was taken and the guest's boot id — kept in memory (a
//! cache: nothing of it needs to survive a restart).
//!
//! A caller's `memory-stats` is answered from the VM's latest snapshot while it is younger
//! than `signals.max_age_ms`, or from one taken then; concurrent callers share one. Every
//! `signals.poll_interval_ms` the bridge refreshes the snapshot of each connected VM by
//! itself, which keeps the Prometheus gauges current; a poll never makes a caller wait or
//! be refused: it skips a VM whose agent has a call queued or running, whose hotplug lock
//! is held, whose snapshot a caller is taking or took within the interval, or whose agent
//! lacks the extension (asked again after [`LACKING_BACKOFF`] or a new connection).

mod agent;
pub mod snapshot;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use qga_wire::{schema::command, sync::lock};
use tokio::time::{Instant, timeout_at};

use self::snapshot::{BalloonReading, Snapshot};
use crate::{
    backend::{BackendError, BalloonStats, MemoryBackend, MemorySize},
    config::Config,
    error::BridgeError,
    hotplug::{ctx::named, memory::VmMemory},
    metrics::Metrics,
    session::{AgentSource, Session},
};

/// How long a poll leaves alone a VM whose agent lacks the extension, unless it connects
/// anew (the agent may have been replaced) or a caller asks.
pub const LACKING_BACKOFF: Duration = Duration::from_secs(600);

/// The longest a poll waits for a VM: a poll holds the agent's channel no longer.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the signals need of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SignalsSettings {
    /// Answer from a snapshot younger than this (`signals.max_age_ms`).
    pub max_age: Duration,
    /// The background poll's interval (`signals.poll_interval_ms`); `None`: off.
    pub poll_interval: Option<Duration>,
    /// A caller's call without its own deadline ends by then (`[timeouts]` of the command).
    pub timeout: Duration,
    /// The balloon driver's statistics period set where it is off
    /// (`balloon.stats_interval_s`).
    pub balloon_stats_interval: u64,
}

impl SignalsSettings {
    /// The signals settings of `config`.
    pub fn of(config: &Config) -> Self {
        let s = &config.signals;
        Self {
            max_age: Duration::from_millis(s.max_age_ms),
            poll_interval: (s.poll_interval_ms > 0)
                .then(|| Duration::from_millis(s.poll_interval_ms)),
            timeout: config.timeouts.for_command(command::GET_MEMORY_STATS),
            balloon_stats_interval: config.balloon.stats_interval_s,
        }
    }
}

/// One VM's signals: its latest snapshot, the turn of whoever takes the next one, and
/// whether its agent was found without the extension.
#[derive(Debug, Default)]
pub struct VmSignals {
    latest: Mutex<Option<Arc<Snapshot>>>,
    taking: tokio::sync::Mutex<()>,
    lacking: Mutex<Option<Lacking>>,
}

/// When a VM's agent was found without the extension, and on which connection.
#[derive(Debug, Clone, Copy)]
struct Lacking {
    since: Instant,
    connection: u64,
}

impl VmSignals {
    /// The latest snapshot, if younger than `max_age`.
    fn fresh(&self, max_age: Duration) -> Option<Arc<Snapshot>> {
        lock(&self.latest)
            .as_ref()
            .filter(|s| s.taken.elapsed() < max_age)
            .cloned()
    }

    /// Forgets the latest snapshot (the VM's memory changed: a hotplug operation ended).
    pub fn forget(&self) {
        *lock(&self.latest) = None;
    }
}

/// The VM a snapshot is taken of.
#[derive(Debug)]
pub struct Target<'a> {
    /// The VM's name.
    pub vm: &'a str,
    /// Its agent.
    pub session: Arc<Session>,
    /// Its hypervisor, if the bridge has one for it.
    pub memory: Option<Arc<VmMemory>>,
    /// Its snapshots.
    pub signals: Arc<VmSignals>,
}

/// The guest's memory signals of every VM. See the module docs.
#[derive(Debug)]
pub struct Signals {
    settings: SignalsSettings,
    metrics: Arc<Metrics>,
}

impl Signals {
    /// Signals with `settings`, setting the gauges in `metrics`.
    pub fn new(settings: SignalsSettings, metrics: Arc<Metrics>) -> Self {
        Self { settings, metrics }
    }

    /// The background poll's interval, if it is on.
    pub fn poll_interval(&self) -> Option<Duration> {
        self.settings.poll_interval
    }

    /// `t`'s snapshot for a caller: the latest if younger than `signals.max_age_ms`, else
    /// a new one (or one another caller took meanwhile), by `deadline`.
    pub async fn stats(
        &self,
        t: &Target<'_>,
        deadline: Option<Instant>,
    ) -> Result<Arc<Snapshot>, BridgeError> {
        let max_age = self.settings.max_age;
        if let Some(s) = t.signals.fresh(max_age) {
            return Ok(s);
        }
        let own = Instant::now() + self.settings.timeout;
        let until = deadline.map_or(own, |d| d.min(own));
        let _turn = timeout_at(until, t.signals.taking.lock())
            .await
            .map_err(|_| BridgeError::deadline(t.vm, command::GET_MEMORY_STATS))?;
        if let Some(s) = t.signals.fresh(max_age) {
            return Ok(s);
        }
        let snapshot = Arc::new(take(t, self.settings.balloon_stats_interval, until).await?);
        self.keep(t, snapshot.clone());
        Ok(snapshot)
    }

    /// One background poll of `t`, unless it should be left alone (see the module docs).
    pub async fn poll(&self, t: &Target<'_>) {
        let Some(interval) = self.settings.poll_interval else {
            return;
        };
        if !self.due(t, interval) {
            return;
        }
        // A caller is taking one: it is theirs to take.
        let Ok(_turn) = t.signals.taking.try_lock() else {
            return;
        };
        match take(
            t,
            self.settings.balloon_stats_interval,
            Instant::now() + POLL_TIMEOUT,
        )
        .await
        {
            Ok(snapshot) => self.keep(t, Arc::new(snapshot)),
            Err(e) => tracing::debug!(vm = t.vm, error = %e, "memory signals not polled"),
        }
    }

    /// Whether `t` is to be polled now.
    fn due(&self, t: &Target<'_>, interval: Duration) -> bool {
        let shared = matches!(t.session.source(), AgentSource::Socket { shared: true, .. });
        let busy = !t.session.idle() || t.memory.as_ref().is_some_and(|m| !m.idle());
        // A caller's snapshot from within the interval serves until the next poll.
        let recent = t.signals.fresh(interval / 2).is_some();
        if shared || busy || recent {
            return false;
        }
        let connection = t.session.status().connections;
        !lock(&t.signals.lacking)
            .is_some_and(|l| l.connection == connection && l.since.elapsed() < LACKING_BACKOFF)
    }

    /// Makes `snapshot` `t`'s latest, sets its gauges, and notes whether the agent lacked
    /// the extension.
    fn keep(&self, t: &Target<'_>, snapshot: Arc<Snapshot>) {
        match snapshot.gauges() {
            Some(g) => self.metrics.guest_memory(t.vm, t.session.claim(), &g),
            // Old numbers would read as current: an agent without stats has no gauges.
            None => self.metrics.guest_memory_gone(t.vm, t.session.claim()),
        }
        let actual = snapshot
            .balloon
            .as_ref()
            .ok()
            .and_then(|b| b.as_ref())
            .map(|b| b.actual);
        self.metrics.balloon_actual(t.vm, t.session.claim(), actual);
        {
            let mut lacking = lock(&t.signals.lacking);
            match &snapshot.agent {
                Ok(_) => *lacking = None,
                Err(why) if lacking.is_none() => {
                    tracing::info!(vm = t.vm, reason = %why, "no memory stats from the guest");
                    *lacking = Some(Lacking {
                        since: snapshot.taken,
                        connection: t.session.status().connections,
                    });
                }
                Err(_) => {}
            }
        }
        *lock(&t.signals.latest) = Some(snapshot);
    }
}

/// Takes a snapshot of `t` by `until`: the agent and the hypervisor asked at once. The
/// agent failing fails it (but for lacking the extension); the hypervisor failing leaves
/// its parts absent, with the reason.
async fn take(t: &Target<'_>, interval: u64, until: Instant) -> Result<Snapshot, BridgeError> {
    let (taken, at) = (Instant::now(), SystemTime::now());
    let (agent, (bridge, balloon)) = tokio::join!(
        agent::stats(&t.session, until),
        hypervisor(t.vm, &t.memory, interval, until)
    );
    Ok(Snapshot {
        taken,
        at,
        agent: agent?,
        bridge,
        balloon,
    })
}

/// The hypervisor's boot and plugged memory and its balloon, or why there are none.
async fn hypervisor(
    vm: &str,
    memory: &Option<Arc<VmMemory>>,
    interval: u64,
    until: Instant,
) -> (
    Result<MemorySize, String>,
    Result<Option<BalloonReading>, String>,
) {
    let Some(memory) = memory else {
        let why = "the VM has no hypervisor backend (no QMP socket or libvirt domain), so \
                   the bridge cannot tell its memory";
        return (Err(why.into()), Err(why.into()));
    };
    let backend = memory.backend();
    let size = match backend.memory(until).await {
        Ok(size) => size,
        Err(e) => {
            let why = named(vm, e).to_string();
            return (Err(why.clone()), Err(why));
        }
    };
    let balloon = balloon(backend.as_ref(), size, interval, until).await;
    (Ok(size), balloon.map_err(|e| named(vm, e).to_string()))
}

/// The VM's balloon with its driver's statistics (asked for every `interval` seconds
/// where they are not yet); `None` without a balloon.
async fn balloon(
    backend: &dyn MemoryBackend,
    size: MemorySize,
    interval: u64,
    until: Instant,
) -> Result<Option<BalloonReading>, BackendError> {
    let Some(device) = backend.balloon(until).await? else {
        return Ok(None);
    };
    // QEMU's balloon counts boot memory and DIMMs, not virtio-mem.
    let dimms = backend
        .dimms(until)
        .await?
        .iter()
        .fold(0u64, |sum, d| sum.saturating_add(d.size));
    let stats = backend.balloon_stats(interval, until).await?;
    Ok(Some(BalloonReading {
        id: device.id,
        actual: device.actual,
        held: size
            .boot
            .saturating_add(dimms)
            .saturating_sub(device.actual),
        stats: stats.filter(BalloonStats::reported),
    }))
}
