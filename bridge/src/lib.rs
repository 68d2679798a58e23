//! `qga-bridge`: gRPC and JSON-RPC in front of the QEMU Guest Agents of a host's VMs.
//!
//! - [`config`]: flags and TOML file.
//! - [`call`]: every agent call, typed: name, arguments, reply, read or write.
//! - [`session`]: one task per VM owning its QGA socket — queueing, resync, deadlines,
//!   limits, coalescing. The core.
//! - [`service`]: the one internal API the front ends call: authorization, audit,
//!   in-flight limit, then an agent call or a hotplug operation.
//! - [`vms`]: VM name to agent session and memory backend; [`discovery`]: VM sockets
//!   found by glob, refusing what could route a call to the wrong VM; [`domains`]:
//!   libvirt's running domains.
//! - [`hotplug`]: memory hotplug operations; [`backend`]: the hypervisors they use;
//!   [`journal`]: their request-ids, intents and outcomes on disk, across restarts.
//! - [`signals`]: each VM's latest snapshot of its guest's memory (agent stats and the
//!   hypervisor's totals), refreshed for callers and in the background.
//! - [`grpc`] and [`jsonrpc`]: the two front ends; [`error`]: their shared error mapping;
//!   [`http_policy`]: the `Host` and `Origin` checks of the HTTP servers.
//! - [`metrics`]: Prometheus metrics and their endpoint; [`audit`]: the audit trail of
//!   state-changing calls and refused requests; [`auth`]: identities and grants.
//! - [`transport`]: connection caps, TLS handshakes, header-read timeouts and the request
//!   body budget the three servers share; [`tls`]: certificates, reloaded on SIGHUP.
//!
//! [`Bridge::start`] runs everything on the current tokio runtime.

pub mod api;
mod backend;
pub mod call;
pub mod config;
pub mod error;
pub mod fault;
pub mod hotplug;
pub mod journal;
pub mod metrics;
mod names;
mod net;
mod peer;
mod policy;
mod service;
mod session;
pub mod signals;
pub mod vms;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use api::{grpc, jsonrpc, prometheus};
use net::{Server, http_policy, tls, transport};
use policy::{audit, auth};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinSet,
};
use vms::domains;

pub use config::Config;
pub use error::BridgeError;
pub use metrics::Metrics;
use service::Service;
use vms::VmMap;

/// How long start waits for the first discovery scan and libvirt listing.
const FIRST_LOAD: Duration = Duration::from_secs(10);

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The TCP address or unix socket path asked for.
        addr: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("cannot open the audit log: {0}")]
    Audit(#[source] std::io::Error),
    /// The journal in the state directory is locked by another bridge or unreadable.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// The `[auth]` section is unusable.
    #[error(transparent)]
    Auth(auth::AuthConfigError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// libvirt's event loop could not be set up.
    #[error(transparent)]
    Libvirt(qga_libvirt::LibvirtError),
    /// gRPC reflection could not be set up.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
}

/// A running bridge. [`Bridge::shutdown`] stops it gracefully.
#[derive(Debug)]
pub struct Bridge {
    /// Bound gRPC TCP address (useful with port 0); `None` on a unix socket.
    pub grpc_addr: Option<SocketAddr>,
    /// Bound JSON-RPC TCP address; `None` on a unix socket.
    pub jsonrpc_addr: Option<SocketAddr>,
    /// Bound metrics address.
    pub metrics_addr: Option<SocketAddr>,
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    tls: Option<Arc<tls::Tls>>,
    /// Unix sockets listened on, removed at shutdown.
    sockets: Vec<std::path::PathBuf>,
    /// How long shutdown waits for calls and streams: the longest command timeout, and a
    /// little more.
    grace: Duration,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Binds `at`; returns the listener and, for TCP, the bound address.
async fn listen(
    at: &config::Listen,
    unix: &config::UnixSocketsConfig,
) -> Result<(transport::Listener, Option<SocketAddr>), StartError> {
    let failed = |source| StartError::Bind {
        addr: at.to_string(),
        source,
    };
    match at {
        config::Listen::Tcp(addr) => {
            let l = bind(*addr).await?;
            let bound = l.local_addr().map_err(failed)?;
            Ok((transport::Listener::Tcp(l), Some(bound)))
        }
        config::Listen::Unix(path) => {
            let l = transport::bind_unix(path, unix.mode, unix.group).map_err(failed)?;
            Ok((transport::Listener::Unix(l), None))
        }
    }
}

/// The longest time shutdown waits for calls and streams: the longest command timeout,
/// and a little more.
fn grace(config: &Config) -> Duration {
    let t = &config.timeouts;
    let longest = t.commands.values().copied().chain([t.default_ms]).max();
    Duration::from_millis(longest.unwrap_or(0)) + Duration::from_secs(5)
}

/// The unix sockets `config` listens on, removed at shutdown.
fn unix_sockets(config: &Config) -> Vec<std::path::PathBuf> {
    [&config.grpc_addr, &config.jsonrpc_addr]
        .into_iter()
        .filter_map(|l| match l {
            config::Listen::Unix(p) => Some(p.clone()),
            config::Listen::Tcp(_) => None,
        })
        .collect()
}

/// What every server is started with.
struct Servers<'a> {
    config: &'a Config,
    service: &'a Arc<Service>,
    metrics: &'a Arc<Metrics>,
    tls: Option<Arc<tls::Tls>>,
    shutdown: watch::Receiver<bool>,
    tasks: &'a mut JoinSet<()>,
}

impl Servers<'_> {
    /// gRPC (our services, health, reflection) on `grpc_addr`; returns the bound address.
    async fn grpc(&mut self) -> Result<Option<SocketAddr>, StartError> {
        let limits = &self.config.limits;
        let (listener, addr) = listen(&self.config.grpc_addr, &self.config.unix_sockets).await?;
        let router = grpc::router(self.service, limits)
            .await
            .map_err(StartError::Reflection)?;
        let gate = transport::Gate::new(
            listener,
            limits.grpc_max_connections,
            Server::Grpc,
            self.metrics.clone(),
        );
        let timeout = Duration::from_millis(limits.header_read_timeout_ms);
        let incoming = transport::incoming(gate, self.tls.clone(), timeout);
        self.tasks
            .spawn(grpc::serve(router, incoming, self.shutdown.clone()));
        Ok(addr)
    }

    /// JSON-RPC over HTTP and WebSocket on `jsonrpc_addr`; returns the bound address.
    async fn jsonrpc(&mut self) -> Result<Option<SocketAddr>, StartError> {
        let config = self.config;
        let (listener, addr) = listen(&config.jsonrpc_addr, &config.unix_sockets).await?;
        let max = config.limits.jsonrpc_max_connections as usize;
        let gate =
            transport::Gate::new(listener, max, Server::Jsonrpc, self.metrics.clone()).http();
        let front = jsonrpc::Front::new(self.service.clone(), self.metrics.clone(), &config.limits);
        let (tls, shutdown) = (self.tls.clone(), self.shutdown.clone());
        let config = config.clone();
        self.tasks
            .spawn(async move { jsonrpc::serve(gate, front, &config, tls, shutdown).await });
        Ok(addr)
    }

    /// The metrics endpoint on `metrics_addr`, if configured; returns the bound address.
    async fn metrics(&mut self) -> Result<Option<SocketAddr>, StartError> {
        let Some(addr) = self.config.metrics_addr else {
            return Ok(None);
        };
        let limits = &self.config.limits;
        let listener = bind(addr).await?;
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let max = limits.metrics_max_connections;
        let gate =
            transport::Gate::new(listener, max, Server::Metrics, self.metrics.clone()).http();
        let policy = http_policy::HttpPolicy::new(&self.config.http, Some(bound));
        let keeper = self.service.gatekeeper(Server::Metrics).with_policy(policy);
        self.tasks.spawn(prometheus::serve(
            gate,
            self.metrics.clone(),
            Duration::from_millis(limits.header_read_timeout_ms),
            keeper,
            self.tls.clone(),
            self.shutdown.clone(),
        ));
        Ok(Some(bound))
    }
}

/// Runs the memory keeper every `hotplug.restore_interval_ms` until shutdown.
async fn keep_memory(service: Arc<Service>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => service.keep_memory().await,
            _ = shutdown.changed() => return,
        }
    }
}

/// Polls every connected VM's memory signals every `every` until shutdown.
async fn poll_signals(service: Arc<Service>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => service.poll_signals().await,
            _ = shutdown.changed() => return,
        }
    }
}

/// The journal's bounds from `config`.
fn journal_limits(config: &Config) -> journal::Retention {
    journal::Retention {
        per_vm: config.hotplug.max_request_ids,
        ttl: Duration::from_secs(config.hotplug.request_id_ttl_s),
        max_entries: journal::Retention::MAX_ENTRIES,
    }
}

impl Bridge {
    /// Binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let sink = config
            .audit_log
            .clone()
            .map_or(audit::Sink::Log, audit::Sink::File);
        let audit = audit::Audit::start(sink, metrics.clone()).map_err(StartError::Audit)?;
        let auth = auth::Auth::new(config.auth.as_ref(), config.allow_insecure_tcp)
            .map_err(StartError::Auth)?;
        let journal = journal::Journal::open(&config.state_dir, journal_limits(&config))?;
        let vms = VmMap::new(config.clone(), metrics.clone());
        let service = Service::new(
            vms.clone(),
            config.clone(),
            metrics.clone(),
            audit,
            Arc::new(auth),
            journal,
        );
        let tls = config.tls.clone().map(tls::Tls::load).transpose()?;
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut servers = Servers {
            config: &config,
            service: &service,
            metrics: &metrics,
            tls: tls.clone(),
            shutdown: rx.clone(),
            tasks: &mut tasks,
        };
        let grpc_addr = servers.grpc().await?;
        let jsonrpc_addr = servers.jsonrpc().await?;
        let metrics_addr = servers.metrics().await?;
        let mut loaded = Vec::new();
        if let Some(uri) = &config.libvirt {
            let libvirt =
                qga_libvirt::Libvirt::start(uri, rx.clone()).map_err(StartError::Libvirt)?;
            let (tx, listed) = oneshot::channel();
            tasks.spawn(domains::follow(vms.clone(), libvirt, rx.clone(), tx));
            loaded.push(listed);
        }
        let every = Duration::from_millis(config.hotplug.restore_interval_ms);
        tasks.spawn(keep_memory(service.clone(), every, rx.clone()));
        if let Some(every) = service.signals_poll_interval() {
            tasks.spawn(poll_signals(service.clone(), every, rx.clone()));
        }
        let (tx, scanned) = oneshot::channel();
        tasks.spawn(vms.clone().discover(rx, tx));
        loaded.push(scanned);
        // Started means serving the VMs there are: wait (a bounded while, libvirtd may be
        // away) for the first discovery scan and libvirt listing.
        let first = futures::future::join_all(loaded);
        if tokio::time::timeout(FIRST_LOAD, first).await.is_err() {
            tracing::warn!(wait = ?FIRST_LOAD, "discovered VMs not all loaded yet; serving meanwhile");
        }
        tracing::info!(grpc = %config.grpc_addr, jsonrpc = %config.jsonrpc_addr, metrics = ?metrics_addr.map(prometheus::describe), vms = vms.len(), "qga-bridge serving");
        Ok(Self {
            grpc_addr,
            jsonrpc_addr,
            metrics_addr,
            service,
            metrics,
            tls,
            sockets: unix_sockets(&config),
            grace: grace(&config),
            shutdown,
            tasks,
        })
    }

    /// How many VMs it serves.
    pub fn vm_count(&self) -> usize {
        self.service.vm_count()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Reads the TLS files again (SIGHUP): new connections get the new certificates,
    /// established ones are untouched; on error the old ones stay. `Ok` without TLS.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        self.tls.as_ref().map_or(Ok(()), |t| t.reload())
    }

    /// Reopens the audit file by its path (SIGHUP, after logrotate moved it away).
    pub fn reopen_audit(&self) {
        self.service.reopen_audit();
    }

    /// Stops accepting calls, lets running ones finish (for at most the longest command
    /// timeout and a little more), and returns when all servers stopped.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drained = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace, drained).await.is_err() {
            // A stream that never ends (a health watch, say) must not hold the bridge.
            tracing::warn!(grace = ?self.grace, "connections still open at shutdown; closing them");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}
