//! Configuration: command line over an optional TOML file.
//!
//! ```toml
//! grpc_addr = "127.0.0.1:50051"          # or "unix:/run/qga-bridge/grpc.sock"
//! jsonrpc_addr = "127.0.0.1:8080"
//! metrics_addr = "127.0.0.1:9100"      # optional
//! log_format = "text"                   # or "json"
//! audit_log = "/var/log/qga-bridge/audit.jsonl"  # default: standard error
//! state_dir = "/var/lib/qga-bridge"     # the journal (default: $STATE_DIRECTORY, else this)
//!
//! [unix_sockets]                        # unix:PATH listeners
//! mode = 0o660                          # who may connect
//! group = 64055                         # gid of the socket (default: the bridge's)
//!
//! [tls]                                 # every listener over TLS 1.2/1.3; reloaded on SIGHUP
//! cert = "/etc/qga-bridge/server.pem"
//! key = "/etc/qga-bridge/server.key"
//! client_ca = "/etc/qga-bridge/clients-ca.pem"  # optional: require client certificates
//!
//! [[auth.tokens]]                       # bearer tokens, as SHA-256 hex of the token
//! identity = "autoscaler"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! [[auth.grants]]                       # identities: token identities or certificate DNS names
//! identity = "autoscaler"
//! role = "write"                        # or "read"
//! vms = ["web-*"]
//! libvirt = "qemu:///system"            # serve libvirt's running domains (see docs/libvirt-and-proxmox.md)
//! discover = ["/run/qemu/*/qga.sock"]    # agent sockets nobody else holds
//! discover_interval_ms = 2000
//! discover_owners = [0, 64055]          # uids a discovered socket may belong to
//!                                       # (default: root and the bridge's own euid)
//! discover_proxmox = "/var/run/qemu-server"  # Proxmox VE: <vmid>.qga and <vmid>.qmp, shared
//!
//! [vms]
//! vm1 = "/run/qemu/vm1/qga.sock"         # the agent only
//! vm2 = { qga = "/run/qemu/vm2/qga.sock", qmp = "/run/qemu/vm2/qmp-bridge.sock" }
//! vm3 = { qga = "/var/run/qemu-server/103.qga", mode = "shared" }  # released when idle
//! vm4 = { qga = "/run/qemu/vm4/qga.sock", qmp = "/run/qemu/vm4/qmp-bridge.sock", auto_online = "keep" }
//!
//! [hotplug]                             # DIMMs over QMP (VMs with a qmp socket) or libvirt
//! dimm_size_bytes = 536870912           # bytes per DIMM that memory-resize plugs
//! timeout_ms = 120000                   # a whole plug, unplug or resize
//! appear_timeout_ms = 10000             # a new DIMM's blocks show up in the guest
//! eject_timeout_ms = 10000              # the guest ejects an unplugged DIMM
//! offline_budget_ms = 10000             # offlining a DIMM's blocks (EBUSY retries) before giving up
//! auto_online = "movable"               # guest's auto_online_blocks kept online_movable; "keep": untouched
//! hypervisor_timeout_ms = 5000          # each QMP command or libvirt call
//! max_qmp_bytes = 1048576               # largest QMP message read
//! max_request_ids = 256                 # remembered request-ids per VM
//! request_id_ttl_s = 86400              # and for how long
//! restore_interval_ms = 2000            # re-online plugged memory's offline blocks (guest reboots)
//!
//! [balloon]                             # the virtio balloon (memory-balloon)
//! floor_bytes = 268435456               # the least memory a balloon target leaves a guest
//! stall_ms = 5000                       # QEMU's actual standing still this long ends the wait
//! stats_interval_s = 2                  # the guest driver's statistics period, set where off
//!
//! [signals]                             # the guest's memory signals (memory-stats)
//! max_age_ms = 1000                     # answer from a snapshot younger than this, else ask the agent
//! poll_interval_ms = 10000              # refresh connected VMs' snapshots and gauges; 0: off
//!
//! [timeouts]                            # milliseconds
//! default_ms = 10000
//! connect_ms = 2000
//! resync_ms = 3000
//! shared_idle_ms = 1000                 # a shared VM's socket is released this long after a call
//! [timeouts.commands]
//! guest-set-memory-blocks = 120000
//!
//! [limits]                              # bridge-wide, or every server alike:
//! queue_depth = 64                      # calls waiting per VM
//! max_reply_bytes = 4194304             # largest reply accepted from a guest
//! max_set_entries = 4096                # block changes per guest-set-memory-blocks
//! max_stale_frames = 64                 # unrelated frames one call may skip
//! max_stale_bytes = 8388608             # unrelated bytes one call may skip
//! parse_budget_bytes = 67108864         # large replies parsed at once, bridge-wide
//! max_vms = 4096                        # VMs in all, configured and discovered
//! max_in_flight = 4096                  # calls being served at once, bridge-wide
//! header_read_timeout_ms = 10000        # HTTP/1 request header (JSON-RPC, metrics), TLS handshake
//! keepalive_interval_ms = 30000         # HTTP/2 and WebSocket pings
//! keepalive_timeout_ms = 10000          # unanswered ping: connection closed
//!                                       # one server's, by its prefix:
//! jsonrpc_max_connections = 1024        # concurrent JSON-RPC connections
//! jsonrpc_max_request_bytes = 4194304   # largest JSON-RPC request body
//! jsonrpc_max_connection_calls = 16     # calls in flight on one JSON-RPC connection
//! jsonrpc_max_batch = 32                # calls in one JSON-RPC batch
//! jsonrpc_body_budget_bytes = 8388608   # large request bodies read at once, bridge-wide
//! grpc_max_connections = 1024           # concurrent gRPC connections
//! grpc_max_streams = 100                # concurrent gRPC calls per connection
//! grpc_max_pending_resets = 20          # HTTP/2 streams reset before being served
//! metrics_max_connections = 16          # concurrent metrics scrapes
//! ```
//!
//! Renamed keys are still read under their old names for one release, with a warning
//! (`RENAMED` in `file.rs`); giving both names is an error.

mod auth;
mod balloon;
mod cli;
mod error;
mod file;
mod hotplug;
mod limits;
mod listen;
mod signals;
mod timeouts;
mod vm;

#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

pub use self::{
    auth::{AuthConfig, AuthConfigError, GrantConfig, Role, TokenConfig},
    balloon::BalloonConfig,
    cli::{Cli, LogFormat},
    error::{Bound, ConfigError},
    file::Deprecation,
    hotplug::{AutoOnline, HotplugConfig},
    limits::LimitsConfig,
    listen::{HttpConfig, Listen, TlsConfig, UnixSocketsConfig},
    signals::{MIN_POLL_INTERVAL_MS, SignalsConfig},
    timeouts::TimeoutsConfig,
    vm::{SocketMode, VmConfig},
};
use crate::names::proxmox_patterns;

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub grpc_addr: Listen,
    /// JSON-RPC listen address.
    pub jsonrpc_addr: Listen,
    /// Mode and group of unix-socket listeners.
    pub unix_sockets: UnixSocketsConfig,
    /// Metrics listen address, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Statically configured VMs, by name.
    pub vms: BTreeMap<String, VmConfig>,
    /// Memory hotplug.
    pub hotplug: HotplugConfig,
    /// The virtio balloon: floor, stall, statistics period.
    pub balloon: BalloonConfig,
    /// The guest's memory signals: snapshot age and background poll.
    pub signals: SignalsConfig,
    /// Globs for socket discovery.
    pub discover: Vec<String>,
    /// How often discovery rescans.
    pub discover_interval: Duration,
    /// The uids a discovered socket may be owned by; sockets of anyone else are refused.
    pub discover_owners: Vec<u32>,
    /// Proxmox VE's run directory, whose `<vmid>.qga` and `<vmid>.qmp` sockets are
    /// discovered as shared VMs named by their vmid.
    pub discover_proxmox: Option<PathBuf>,
    /// libvirt connection URI whose running domains are served.
    pub libvirt: Option<String>,
    /// Deadlines.
    pub timeouts: TimeoutsConfig,
    /// Limits.
    pub limits: LimitsConfig,
    /// Serve concurrent identical reads of one VM with one agent call.
    pub coalesce_reads: bool,
    /// `Host` and `Origin` checks.
    pub http: HttpConfig,
    /// Listening on non-loopback TCP without TLS was asked for explicitly.
    pub allow_insecure_tcp: bool,
    /// The audit trail's file; `None`: the log stream.
    pub audit_log: Option<PathBuf>,
    /// The journal's directory, locked by one bridge at a time.
    pub state_dir: PathBuf,
    /// TLS for every listener; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// Tokens and grants. `None` (no `[auth]` section): only local (or, with
    /// `allow_insecure_tcp`, all) callers, each allowed everything. `Some`, even empty:
    /// every caller must prove an identity and is allowed only what it is granted.
    pub auth: Option<AuthConfig>,
    /// The deprecated keys the file used: warned about once logging is set up.
    pub deprecated: Vec<Deprecation>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 50051))),
            jsonrpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080))),
            unix_sockets: UnixSocketsConfig::default(),
            metrics_addr: None,
            log_format: LogFormat::Text,
            vms: BTreeMap::new(),
            hotplug: HotplugConfig::default(),
            balloon: BalloonConfig::default(),
            signals: SignalsConfig::default(),
            discover: Vec::new(),
            discover_interval: Duration::from_secs(2),
            discover_owners: default_discover_owners(),
            discover_proxmox: None,
            libvirt: None,
            timeouts: TimeoutsConfig::default(),
            limits: LimitsConfig::default(),
            coalesce_reads: true,
            http: HttpConfig::default(),
            allow_insecure_tcp: false,
            audit_log: None,
            state_dir: default_state_dir(),
            tls: None,
            auth: None,
            deprecated: Vec::new(),
        }
    }
}

/// The state directory when none is given: systemd's `$STATE_DIRECTORY` (the first, if
/// it lists several), else `/var/lib/qga-bridge`.
fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/qga-bridge"))
}

/// Root and the bridge's own effective uid: whoever could have created a socket the
/// bridge can use anyway. libvirt runs QEMU as its own user (`libvirt-qemu`, `qemu`):
/// add that uid to `discover_owners`.
fn default_discover_owners() -> Vec<u32> {
    let mut owners = vec![0, rustix::process::geteuid().as_raw()];
    owners.dedup();
    owners
}

impl Config {
    /// The configuration from the command line over the file it names, validated.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = &cli.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            config.apply_toml(path, &text)?;
        }
        cli.apply(&mut config)?;
        config
            .validate(cli)
            .map_err(|e| e.named_as_written(&config.deprecated))?;
        Ok(config)
    }

    /// Every section; `cli` tells which values came from flags, to name them as given.
    fn validate(&self, cli: &Cli) -> Result<(), ConfigError> {
        self.validate_listeners(cli)?;
        if let Some(auth) = &self.auth {
            auth.check()?;
        }
        self.http.validate(cli)?;
        self.limits.validate()?;
        self.hotplug.validate()?;
        self.signals.validate()?;
        self.balloon.validate()?;
        self.timeouts.validate()?;
        self.validate_vms(cli)?;
        self.validate_discovery(cli)
    }

    /// Discovery: a UTF-8 Proxmox directory, owners to accept, globs that parse.
    fn validate_discovery(&self, cli: &Cli) -> Result<(), ConfigError> {
        if let Some(dir) = &self.discover_proxmox
            && proxmox_patterns(dir).is_none()
        {
            let by_flag = cli.discover_proxmox.is_some();
            return Err(ConfigError::invalid(
                Cli::given_as(by_flag, "--discover-proxmox", "discover_proxmox"),
                format!("{} is not UTF-8", dir.display()),
            ));
        }
        if (!self.discover.is_empty() || self.discover_proxmox.is_some())
            && self.discover_owners.is_empty()
        {
            return Err(ConfigError::invalid(
                "discover_owners",
                "no uid given: every discovered socket would be refused",
            ));
        }
        for pattern in &self.discover {
            glob::Pattern::new(pattern).map_err(|e| {
                let by_flag = cli.discover.contains(pattern);
                ConfigError::invalid(
                    Cli::given_as(by_flag, "--discover", "discover"),
                    format!("bad glob '{pattern}': {e}"),
                )
            })?;
        }
        Ok(())
    }
}
