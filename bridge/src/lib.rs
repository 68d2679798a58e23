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
//! - [`hotplug`]: memory hotplug operations; [`backend`]: the hypervisors they use.
//! - [`grpc`] and [`jsonrpc`]: the two front ends; [`error`]: their shared error mapping;
//!   [`http_policy`]: the `Host` and `Origin` checks of the HTTP servers.
//! - [`metrics`]: Prometheus metrics and their endpoint; [`audit`]: the audit trail of
//!   state-changing calls and refused requests; [`auth`]: identities and grants.
//! - [`transport`]: connection caps, TLS handshakes, header-read timeouts and the request
//!   body budget the three servers share; [`tls`]: certificates, reloaded on SIGHUP.
//!
//! [`Bridge::start`] runs everything on the current tokio runtime.

pub mod audit;
pub mod auth;
pub mod backend;
pub mod call;
pub mod config;
pub mod discovery;
pub mod domains;
pub mod error;
pub mod gatekeeper;
pub mod grpc;
pub mod hotplug;
pub mod http_policy;
pub mod jsonrpc;
pub mod metrics;
pub mod metrics_server;
pub mod names;
pub mod peer;
pub mod service;
pub mod session;
pub mod tls;
pub mod transport;
pub mod vms;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use qga_proto::v1::{
    FILE_DESCRIPTOR_SET, guest_agent_server::GuestAgentServer,
    guest_memory_server::GuestMemoryServer, memory_hotplug_server::MemoryHotplugServer,
    vms_server::VmsServer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

pub use config::Config;
pub use error::BridgeError;
pub use metrics::Metrics;
pub use service::Service;
pub use vms::Vms;

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
    unix: &config::UnixSockets,
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
        let auth = Arc::new(
            auth::Auth::new(config.auth.as_ref(), config.allow_insecure_tcp)
                .map_err(StartError::Auth)?,
        );
        let vms = Vms::new(config.clone(), metrics.clone());
        let service = Service::new(vms.clone(), config.clone(), metrics.clone(), audit, auth);
        let tls = config.tls.clone().map(tls::Tls::load).transpose()?;
        let handshake_timeout = Duration::from_millis(config.limits.header_read_timeout_ms);
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        // gRPC: our services, health, reflection.
        let (grpc_listener, grpc_addr) = listen(&config.grpc_addr, &config.unix_sockets).await?;
        let api = grpc::Api::new(service.clone());
        let max_message = grpc::max_request_bytes(config.limits.max_set_entries);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<GuestMemoryServer<grpc::Api>>().await;
        health.set_serving::<GuestAgentServer<grpc::Api>>().await;
        health.set_serving::<VmsServer<grpc::Api>>().await;
        health.set_serving::<MemoryHotplugServer<grpc::Api>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let limits = &config.limits;
        let keepalive = Duration::from_millis(limits.keepalive_interval_ms);
        let gate = gatekeeper::Gatekeeper::new("grpc", service.auth().clone(), metrics.clone())
            .audited(service.audit().clone())
            .public(&["/grpc.health.v1.Health/", "/grpc.reflection."]);
        let router = tonic::transport::Server::builder()
            .layer(gate)
            .max_concurrent_streams(limits.grpc_max_streams)
            .http2_max_pending_accept_reset_streams(Some(limits.grpc_max_pending_resets))
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(GuestMemoryServer::new(api.clone()).max_decoding_message_size(max_message))
            .add_service(GuestAgentServer::new(api.clone()).max_decoding_message_size(max_message))
            .add_service(
                MemoryHotplugServer::new(api.clone()).max_decoding_message_size(max_message),
            )
            .add_service(VmsServer::new(api).max_decoding_message_size(max_message));
        let mut grpc_stop = rx.clone();
        let incoming = transport::incoming(
            transport::Gate::new(
                grpc_listener,
                limits.grpc_max_connections,
                "grpc",
                metrics.clone(),
            ),
            tls.clone(),
            handshake_timeout,
        );
        tasks.spawn(async move {
            let stop = async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });

        // JSON-RPC over HTTP and WebSocket.
        let (rpc_listener, jsonrpc_addr) =
            listen(&config.jsonrpc_addr, &config.unix_sockets).await?;
        let gate = transport::Gate::new(
            rpc_listener,
            limits.max_connections as usize,
            "jsonrpc",
            metrics.clone(),
        )
        .http();
        tasks.spawn(jsonrpc::serve(
            gate,
            service.clone(),
            tls.clone(),
            rx.clone(),
        ));

        // Metrics.
        let metrics_addr = match config.metrics_addr {
            Some(addr) => {
                let listener = bind(addr).await?;
                let bound = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
                let gate = transport::Gate::new(
                    listener,
                    limits.metrics_max_connections,
                    "metrics",
                    metrics.clone(),
                )
                .http();
                let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
                let policy = http_policy::HttpPolicy::new(&config.http, Some(bound));
                let keeper =
                    gatekeeper::Gatekeeper::new("metrics", service.auth().clone(), metrics.clone())
                        .with_policy(policy);
                tasks.spawn(metrics_server::serve(
                    gate,
                    metrics.clone(),
                    header_timeout,
                    keeper,
                    tls.clone(),
                    rx.clone(),
                ));
                Some(bound)
            }
            None => None,
        };

        if let Some(uri) = &config.libvirt {
            let libvirt =
                qga_libvirt::Libvirt::start(uri, rx.clone()).map_err(StartError::Libvirt)?;
            tasks.spawn(domains::follow(vms.clone(), libvirt, rx.clone()));
        }
        tasks.spawn(vms.clone().discover(rx));
        tracing::info!(grpc = %config.grpc_addr, jsonrpc = %config.jsonrpc_addr, metrics = ?metrics_addr.map(metrics_server::describe), vms = vms.len(), "qga-bridge serving");
        Ok(Self {
            grpc_addr,
            jsonrpc_addr,
            metrics_addr,
            service,
            metrics,
            tls,
            sockets: [&config.grpc_addr, &config.jsonrpc_addr]
                .into_iter()
                .filter_map(|l| match l {
                    config::Listen::Unix(p) => Some(p.clone()),
                    config::Listen::Tcp(_) => None,
                })
                .collect(),
            grace: Duration::from_millis(
                config
                    .timeouts
                    .commands
                    .values()
                    .copied()
                    .chain([config.timeouts.default_ms])
                    .max()
                    .unwrap_or(0),
            ) + Duration::from_secs(5),
            shutdown,
            tasks,
        })
    }

    /// The service the front ends call.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
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
        self.service.audit().reopen();
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
