//! libvirt for an async service.
//!
//! libvirt's API blocks, and its events arrive on an event loop thread of libvirt's own.
//! [`Libvirt`] hides both: every call runs on tokio's blocking pool under a deadline, and
//! domain and device events reach async code through a broadcast channel ([`Event`]).
//!
//! One connection is kept open. When it closes (libvirtd restarted, its socket gone), calls
//! fail as [`LibvirtError::Unavailable`] at once and a supervisor reopens it with capped
//! backoff, registers the event callbacks again and says so with [`Event::Connected`]; a
//! subscriber then rescans, since events that happened meanwhile were not seen.
//!
//! - [`error`]: libvirt's errors, sorted by what a caller can do about them.
//! - `events`: the C callbacks (the crate's only `unsafe`) and the event loop thread.

pub mod error;
mod events;
mod memory;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, Semaphore, broadcast, watch},
    task::JoinHandle,
    time::Instant,
};
use virt::{connect::Connect, domain::Domain, sys};

pub use error::LibvirtError;
pub use memory::MemoryStats;

/// Capacity of the event channel: a subscriber that lags further rescans.
const EVENT_CAPACITY: usize = 1024;
/// Keepalive: a libvirtd that does not answer for `interval * (count + 1)` seconds is gone.
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long opening the connection may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running domain: its name and the id of this run. A domain restarted under the same
/// name has another id, so calls meant for the old run fail as not running instead of
/// reaching the new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dom {
    /// The domain's name.
    pub name: String,
    /// libvirt's id of the domain's current run.
    pub id: u32,
}

/// Looks `dom` up and checks it is still the same run.
fn lookup(c: &Connect, dom: &Dom) -> Result<Domain, LibvirtError> {
    let domain = c.lookup_domain_by_name(&dom.name)?;
    match domain.id() {
        Some(id) if id == dom.id => Ok(domain),
        Some(id) => Err(LibvirtError::NotRunning(format!(
            "domain '{}' was restarted (run {} is gone, run {id} is a new one)",
            dom.name, dom.id
        ))),
        None => Err(LibvirtError::NotRunning(format!(
            "domain '{}' is not running",
            dom.name
        ))),
    }
}

/// Domain handles by name, with the run each was looked up for.
type Handles = Arc<Mutex<HashMap<String, (u32, Domain)>>>;

/// `dom`'s handle: the one kept for this run, or looked up (and kept). A call needs no
/// lookup round trip of its own; a handle is dropped when its domain starts or stops and
/// when the connection closes, so a call for a run that ended looks up again and fails as
/// not running. (Between a domain's restart and its lifecycle event — milliseconds — a
/// kept handle would reach the new run; its agent is not up for seconds after a start.)
fn handle(handles: &Handles, c: &Connect, dom: &Dom) -> Result<Domain, LibvirtError> {
    if let Some((id, d)) = lock(handles).get(&dom.name)
        && *id == dom.id
    {
        return Ok(d.clone());
    }
    let d = lookup(c, dom)?;
    lock(handles).insert(dom.name.clone(), (dom.id, d.clone()));
    Ok(d)
}

/// How long libvirt itself may hold an agent command beyond its timeout: up to 30 s for
/// the domain's job lock and 5 s for its own resync with an agent that went silent.
pub const LIBVIRT_OWN_WAIT: Duration = Duration::from_secs(36);

/// What libvirt told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection is (again) open: what happened while it was closed was not seen.
    Connected,
    /// The connection closed; calls fail until [`Event::Connected`].
    Disconnected {
        /// Why, as far as known.
        reason: String,
    },
    /// A domain started (booted, restored, migrated in).
    Started {
        /// Its name.
        domain: String,
        /// The id of this run.
        id: u32,
    },
    /// A domain stopped (shut down, destroyed, crashed, migrated away).
    Stopped {
        /// Its name.
        domain: String,
    },
    /// A device was added to a running domain.
    DeviceAdded {
        /// The domain's name.
        domain: String,
        /// The alias libvirt reports: for a DIMM, its memory backend's (`memdimm0`).
        alias: String,
    },
    /// The guest released a device and libvirt removed it.
    DeviceRemoved {
        /// The domain's name.
        domain: String,
        /// The device's alias.
        alias: String,
    },
    /// The guest refused to release a device.
    DeviceRemovalFailed {
        /// The domain's name.
        domain: String,
        /// The device's alias.
        alias: String,
    },
}

/// A libvirt connection for async code; see the [crate docs](crate).
#[derive(Debug)]
pub struct Libvirt {
    uri: String,
    /// The open connection and its event registrations; `None` while closed.
    conn: Mutex<Option<events::Registered>>,
    events: broadcast::Sender<Event>,
    /// Woken when the connection may have closed (checked before believed).
    lost: Arc<Notify>,
    connected: watch::Sender<bool>,
    /// Per domain: held while an agent command runs in libvirt, even after we stopped
    /// waiting for it, so that a silent agent ties up one blocking thread, not many.
    agent_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Handles of running domains (see [`handle`]).
    handles: Handles,
    /// An open that outlived its timeout: waited for, never started twice.
    opening: tokio::sync::Mutex<Option<JoinHandle<Result<events::Registered, LibvirtError>>>>,
}

use qga_wire::sync::lock;

impl Libvirt {
    /// Connects to `uri` (e.g. `qemu:///system`) in the background and keeps the connection
    /// open until `stop` turns true. Needs a tokio runtime; fails only if libvirt's event
    /// loop cannot be set up.
    pub fn start(uri: &str, stop: watch::Receiver<bool>) -> Result<Arc<Self>, LibvirtError> {
        events::start_loop()?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (connected, _) = watch::channel(false);
        let this = Arc::new(Self {
            uri: uri.to_string(),
            conn: Mutex::new(None),
            events,
            lost: Arc::new(Notify::new()),
            connected,
            agent_slots: Mutex::new(HashMap::new()),
            handles: Arc::default(),
            opening: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(forget_handles(this.handles.clone(), this.subscribe()));
        tokio::spawn(this.clone().supervise(stop));
        Ok(this)
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Events from now on. A receiver that lags gets `Lagged` and should rescan.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the connection is open; changes as it closes and reopens.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Keeps the connection open: opens it, waits until it closes, opens it again.
    async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = qga_wire::backoff::Backoff::new(BACKOFF_START, BACKOFF_MAX);
        loop {
            if *stop.borrow() {
                break;
            }
            match self.open().await {
                Ok(()) => {
                    backoff.reset();
                    tracing::info!(uri = %self.uri, "libvirt connected");
                    self.connected.send_replace(true);
                    let _ = self.events.send(Event::Connected);
                    loop {
                        tokio::select! {
                            () = self.lost.notified() => {}
                            _ = stop.wait_for(|s| *s) => break,
                        }
                        // A wake-up left over from an earlier connection, or a call's
                        // failure that was not the connection's: keep this one.
                        if !self.alive() {
                            break;
                        }
                    }
                    if *stop.borrow() {
                        break;
                    }
                    self.close("the connection to libvirtd closed");
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(uri = %self.uri, error = %e, retry_in = ?wait, "cannot connect to libvirt");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            }
        }
        self.close("the bridge is stopping");
    }

    /// Opens the connection and registers the callbacks, off the async workers. An open
    /// that takes longer than its timeout (a hung libvirtd) is waited for at the next
    /// attempt rather than started again.
    async fn open(&self) -> Result<(), LibvirtError> {
        let mut pending = self.opening.lock().await;
        let mut opening = match pending.take() {
            Some(handle) => handle,
            None => {
                let uri = self.uri.clone();
                let events = self.events.clone();
                let lost = self.lost.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = Connect::open(Some(&uri)).map_err(LibvirtError::from)?;
                    // Without keepalive a libvirtd that hangs (rather than exits) is never
                    // noticed.
                    if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
                        tracing::debug!(error = %e, "libvirt keepalive not available");
                    }
                    events::Registered::new(conn, events, lost)
                })
            }
        };
        let registered = match tokio::time::timeout(OPEN_TIMEOUT, &mut opening).await {
            Err(_) => {
                *pending = Some(opening);
                return Err(LibvirtError::Unavailable(
                    "opening the connection takes too long (libvirtd hung?)".into(),
                ));
            }
            Ok(joined) => joined
                .map_err(|e| LibvirtError::Unavailable(format!("opening task failed: {e}")))??,
        };
        *lock(&self.conn) = Some(registered);
        Ok(())
    }

    /// Whether the open connection is still alive (a local check, no round trip).
    fn alive(&self) -> bool {
        lock(&self.conn)
            .as_ref()
            .is_some_and(|r| r.connection().is_alive().unwrap_or(false))
    }

    /// Drops the connection (deregistering callbacks off the async workers).
    fn close(&self, reason: &str) {
        let Some(registered) = lock(&self.conn).take() else {
            return;
        };
        // Handles of the closed connection are of no use on the next one.
        lock(&self.handles).clear();
        tracing::warn!(uri = %self.uri, reason, "libvirt disconnected");
        self.connected.send_replace(false);
        let _ = self.events.send(Event::Disconnected {
            reason: reason.to_string(),
        });
        // Deregistering talks to libvirtd: never on an async worker.
        drop(tokio::task::spawn_blocking(move || drop(registered)));
    }

    /// The open connection, or why there is none.
    fn connection(&self) -> Result<Connect, LibvirtError> {
        lock(&self.conn)
            .as_ref()
            .map(|r| r.connection().clone())
            .ok_or_else(|| {
                LibvirtError::Unavailable(format!("not connected to libvirt at {}", self.uri))
            })
    }

    /// Runs `f` with the connection on the blocking pool, by `deadline`. A failure that
    /// says the connection is gone wakes the supervisor at once.
    async fn blocking<T, F>(&self, deadline: Instant, f: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, LibvirtError> + Send + 'static,
    {
        let conn = self.connection()?;
        let task = tokio::task::spawn_blocking(move || f(&conn));
        let result = match tokio::time::timeout_at(deadline, task).await {
            Err(_) => return Err(LibvirtError::Timeout),
            Ok(Err(e)) => {
                return Err(LibvirtError::Unavailable(format!(
                    "libvirt call failed: {e}"
                )));
            }
            Ok(Ok(r)) => r,
        };
        if let Err(LibvirtError::Unavailable(_)) = &result
            && !self.alive()
        {
            self.lost.notify_one();
        }
        result
    }

    /// The running domains.
    pub async fn running_domains(&self, deadline: Instant) -> Result<Vec<Dom>, LibvirtError> {
        self.blocking(deadline, |c| {
            let domains = c.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?;
            let mut running = Vec::with_capacity(domains.len());
            for d in &domains {
                if let Some(id) = d.id() {
                    running.push(Dom {
                        name: d.name()?,
                        id,
                    });
                }
            }
            Ok(running)
        })
        .await
    }

    /// Runs QGA `command` (a JSON object) through the domain's agent, which libvirt holds
    /// (`virDomainQemuAgentCommand`), waiting at most `timeout` (whole seconds, at least
    /// one: libvirt's granularity) and never past `deadline` here; returns the agent's reply
    /// as libvirt passes it on. One command per domain is in libvirt at a time: while an
    /// earlier one still runs there (even one we stopped waiting for), this fails at once
    /// as [`LibvirtError::Busy`].
    pub async fn agent_command(
        &self,
        dom: &Dom,
        command: String,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<String, LibvirtError> {
        let slot = lock(&self.agent_slots)
            .entry(dom.name.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone();
        let Ok(permit) = slot.try_acquire_owned() else {
            return Err(LibvirtError::Busy(
                "an earlier agent command is still running in libvirt".into(),
            ));
        };
        let seconds = i32::try_from(timeout.as_millis().div_ceil(1000))
            .unwrap_or(i32::MAX)
            .max(1);
        let (dom, handles) = (dom.clone(), self.handles.clone());
        self.blocking(deadline, move |c| {
            let _in_libvirt = permit;
            Ok(handle(&handles, c, &dom)?.qemu_agent_command(&command, seconds, 0)?)
        })
        .await
    }

    /// Forgets a domain's agent slot (it stopped).
    pub fn forget(&self, name: &str) {
        lock(&self.agent_slots).remove(name);
        lock(&self.handles).remove(name);
    }

    /// The domain's live XML.
    pub async fn domain_xml(&self, dom: &Dom, deadline: Instant) -> Result<String, LibvirtError> {
        let (dom, handles) = (dom.clone(), self.handles.clone());
        self.blocking(deadline, move |c| {
            Ok(handle(&handles, c, &dom)?.xml_desc(0)?)
        })
        .await
    }

    /// Attaches the device described by `xml` to the running domain (live only: the
    /// persistent definition is the operator's).
    pub async fn attach_device(
        &self,
        dom: &Dom,
        xml: &str,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let (dom, xml) = (dom.clone(), xml.to_string());
        self.blocking(deadline, move |c| {
            lookup(c, &dom)?.attach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)?;
            Ok(())
        })
        .await
    }

    /// Changes the running domain's device described by `xml` (live only); libvirt finds
    /// the device by what the XML says of it.
    pub async fn update_device(
        &self,
        dom: &Dom,
        xml: &str,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let (dom, xml) = (dom.clone(), xml.to_string());
        self.blocking(deadline, move |c| {
            lookup(c, &dom)?.update_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)?;
            Ok(())
        })
        .await
    }

    /// Runs QMP `command` (a JSON object) on the domain's QEMU through libvirt's monitor
    /// passthrough (`virDomainQemuMonitorCommand`) and returns QEMU's reply. libvirt notes
    /// the domain as tainted (`custom-monitor`) the first time: use it only to read what
    /// libvirt's XML does not tell.
    pub async fn qemu_monitor(
        &self,
        dom: &Dom,
        command: &str,
        deadline: Instant,
    ) -> Result<String, LibvirtError> {
        let (dom, command) = (dom.clone(), command.to_string());
        self.blocking(deadline, move |c| {
            Ok(lookup(c, &dom)?.qemu_monitor_command(&command, 0)?)
        })
        .await
    }

    /// Asks for the removal of the running domain's device `alias`
    /// (`virDomainDetachDeviceAlias`: libvirt returns once the request is sent); the
    /// outcome is told by [`Event::DeviceRemoved`] or [`Event::DeviceRemovalFailed`].
    pub async fn detach_alias(
        &self,
        dom: &Dom,
        alias: &str,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let (dom, alias) = (dom.clone(), alias.to_string());
        self.blocking(deadline, move |c| {
            events::detach_alias(&lookup(c, &dom)?, &alias, sys::VIR_DOMAIN_AFFECT_LIVE)
        })
        .await
    }
}

impl Libvirt {
    /// Sets the running domain's memory to `kib` KiB, live only
    /// (`virDomainSetMemoryFlags`): libvirt asks QEMU's balloon for it (QMP `balloon`),
    /// and refuses a domain without one.
    pub async fn set_memory(
        &self,
        dom: &Dom,
        kib: u64,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let dom = dom.clone();
        self.blocking(deadline, move |c| {
            lookup(c, &dom)?.set_memory_flags(kib, sys::VIR_DOMAIN_MEM_LIVE)?;
            Ok(())
        })
        .await
    }

    /// The running domain's memory statistics (`virDomainMemoryStats`): the balloon's
    /// actual size, QEMU's RSS and what the guest's balloon driver last reported.
    pub async fn memory_stats(
        &self,
        dom: &Dom,
        deadline: Instant,
    ) -> Result<MemoryStats, LibvirtError> {
        let (dom, handles) = (dom.clone(), self.handles.clone());
        self.blocking(deadline, move |c| {
            let stats = handle(&handles, c, &dom)?.memory_stats(0)?;
            Ok(MemoryStats::from_tags(stats.iter().map(|s| (s.tag, s.val))))
        })
        .await
    }

    /// Has QEMU ask the guest's balloon driver for its statistics every `secs` seconds
    /// (0: stop), live only (`virDomainSetMemoryStatsPeriod`).
    pub async fn set_memory_stats_period(
        &self,
        dom: &Dom,
        secs: u32,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let period = i32::try_from(secs).unwrap_or(i32::MAX);
        let dom = dom.clone();
        self.blocking(deadline, move |c| {
            lookup(c, &dom)?.set_memory_stats_period(period, sys::VIR_DOMAIN_MEM_LIVE)?;
            Ok(())
        })
        .await
    }
}

/// Drops a domain's kept handle as soon as it starts or stops, and all of them when the
/// connection closes or opens; when events were missed (a lagging receiver), all of them.
async fn forget_handles(handles: Handles, mut events: broadcast::Receiver<Event>) {
    loop {
        match events.recv().await {
            Ok(Event::Started { domain, .. } | Event::Stopped { domain }) => {
                lock(&handles).remove(&domain);
            }
            Ok(Event::Connected | Event::Disconnected { .. })
            | Err(broadcast::error::RecvError::Lagged(_)) => lock(&handles).clear(),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}
