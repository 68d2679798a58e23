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

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, broadcast, watch},
    time::Instant,
};
use virt::{connect::Connect, domain::Domain, sys};

pub use error::LibvirtError;

/// Capacity of the event channel: a subscriber that lags further rescans.
const EVENT_CAPACITY: usize = 1024;
/// Keepalive: a libvirtd that does not answer for `interval * (count + 1)` seconds is gone.
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long opening the connection may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

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
        /// The device's alias (`dimm0`).
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
    /// Woken when the connection is seen to be closed.
    lost: Arc<Notify>,
    connected: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
        });
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
        let mut backoff = BACKOFF_START;
        loop {
            if *stop.borrow() {
                break;
            }
            match self.open().await {
                Ok(()) => {
                    backoff = BACKOFF_START;
                    tracing::info!(uri = %self.uri, "libvirt connected");
                    self.connected.send_replace(true);
                    let _ = self.events.send(Event::Connected);
                    tokio::select! {
                        () = self.lost.notified() => {
                            self.close("the connection to libvirtd closed");
                        }
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                Err(e) => {
                    tracing::warn!(uri = %self.uri, error = %e, retry_in = ?backoff, "cannot connect to libvirt");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        self.close("the bridge is stopping");
    }

    /// Opens the connection and registers the callbacks, off the async workers.
    async fn open(&self) -> Result<(), LibvirtError> {
        let uri = self.uri.clone();
        let events = self.events.clone();
        let lost = self.lost.clone();
        let opening = tokio::task::spawn_blocking(move || {
            let conn = Connect::open(Some(&uri)).map_err(LibvirtError::from)?;
            // Without keepalive a libvirtd that hangs (rather than exits) is never noticed.
            if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
                tracing::debug!(error = %e, "libvirt keepalive not available");
            }
            events::Registered::new(conn, events, lost)
        });
        let registered = tokio::time::timeout(OPEN_TIMEOUT, opening)
            .await
            .map_err(|_| LibvirtError::Unavailable("opening the connection timed out".into()))?
            .map_err(|e| LibvirtError::Unavailable(format!("opening task failed: {e}")))??;
        *lock(&self.conn) = Some(registered);
        Ok(())
    }

    /// Drops the connection (deregistering callbacks off the async workers).
    fn close(&self, reason: &str) {
        let Some(registered) = lock(&self.conn).take() else {
            return;
        };
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
        if let Err(LibvirtError::Unavailable(_)) = &result {
            self.lost.notify_one();
        }
        result
    }

    /// The names of the running domains.
    pub async fn running_domains(&self, deadline: Instant) -> Result<Vec<String>, LibvirtError> {
        self.blocking(deadline, |c| {
            let domains = c.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?;
            Ok(domains.iter().map(Domain::name).collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Runs QGA `command` (a JSON object) through the domain's agent, which libvirt holds
    /// (`virDomainQemuAgentCommand`), waiting at most `timeout` (whole seconds, at least
    /// one: libvirt's granularity) and never past `deadline` here; returns the agent's reply
    /// as libvirt passes it on.
    pub async fn agent_command(
        &self,
        domain: &str,
        command: String,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<String, LibvirtError> {
        let seconds = i32::try_from(timeout.as_millis().div_ceil(1000))
            .unwrap_or(i32::MAX)
            .max(1);
        let name = domain.to_string();
        self.blocking(deadline, move |c| {
            Ok(c.lookup_domain_by_name(&name)?
                .qemu_agent_command(&command, seconds, 0)?)
        })
        .await
    }

    /// The domain's live XML.
    pub async fn domain_xml(
        &self,
        domain: &str,
        deadline: Instant,
    ) -> Result<String, LibvirtError> {
        let name = domain.to_string();
        self.blocking(deadline, move |c| {
            Ok(c.lookup_domain_by_name(&name)?.xml_desc(0)?)
        })
        .await
    }

    /// Attaches the device described by `xml` to the running domain (live only: the
    /// persistent definition is the operator's).
    pub async fn attach_device(
        &self,
        domain: &str,
        xml: &str,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let (name, xml) = (domain.to_string(), xml.to_string());
        self.blocking(deadline, move |c| {
            c.lookup_domain_by_name(&name)?
                .attach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)?;
            Ok(())
        })
        .await
    }

    /// Asks for the removal of the running domain's device `alias`. libvirt returns once
    /// the guest released it or after a short wait of its own; either way, the outcome is
    /// told by [`Event::DeviceRemoved`] or [`Event::DeviceRemovalFailed`].
    pub async fn detach_alias(
        &self,
        domain: &str,
        alias: &str,
        deadline: Instant,
    ) -> Result<(), LibvirtError> {
        let (name, alias) = (domain.to_string(), alias.to_string());
        self.blocking(deadline, move |c| {
            let domain = c.lookup_domain_by_name(&name)?;
            events::detach_alias(&domain, &alias, sys::VIR_DOMAIN_AFFECT_LIVE)
        })
        .await
    }
}
