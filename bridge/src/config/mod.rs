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
//! libvirt = "qemu:///system"            # serve libvirt's running domains (see the README)
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
//! [hotplug]                             # DIMMs over QMP (VMs with a qmp socket)
//! dimm_size = 536870912                 # bytes per DIMM that memory-resize plugs
//! timeout_ms = 120000                   # a whole plug, unplug or resize
//! appear_timeout_ms = 10000             # a new DIMM's blocks show up in the guest
//! eject_timeout_ms = 10000              # the guest ejects an unplugged DIMM
//! offline_budget_ms = 10000             # offlining a DIMM's blocks (EBUSY retries) before giving up
//! auto_online = "movable"               # guest's auto_online_blocks kept online_movable; "keep": untouched
//! max_request_ids = 256                 # remembered request-ids per VM
//! request_id_ttl_s = 86400              # and for how long
//! restore_interval_ms = 2000            # re-online plugged memory's offline blocks (guest reboots)
//!
//! [timeouts]                            # milliseconds
//! default_ms = 10000
//! connect_ms = 2000
//! resync_ms = 3000
//! shared_idle_ms = 1000                 # a shared VM's socket is released this long after a call
//! [timeouts.commands]
//! guest-set-memory-blocks = 120000
//!
//! [limits]
//! queue_depth = 64                      # calls waiting per VM
//! max_reply_bytes = 4194304             # largest reply accepted from a guest
//! max_connections = 1024                # concurrent JSON-RPC connections
//! max_request_bytes = 4194304           # largest JSON-RPC request body
//! max_set_entries = 4096                # block changes per guest-set-memory-blocks
//! max_stale_frames = 64                 # unrelated frames one call may skip
//! max_stale_bytes = 8388608             # unrelated bytes one call may skip
//! parse_budget_bytes = 67108864         # large replies parsed at once, bridge-wide
//! max_vms = 4096                        # VMs in all, configured and discovered
//! max_in_flight = 4096                  # calls being served at once, bridge-wide
//! max_connection_calls = 16             # calls in flight on one JSON-RPC connection
//! max_batch = 32                        # calls in one JSON-RPC batch
//! body_budget_bytes = 8388608           # large request bodies read at once, bridge-wide
//! header_read_timeout_ms = 10000        # HTTP/1 request header (JSON-RPC, metrics)
//! keepalive_interval_ms = 30000         # HTTP/2 and WebSocket pings
//! keepalive_timeout_ms = 10000          # unanswered ping: connection closed
//! grpc_max_connections = 1024           # concurrent gRPC connections
//! grpc_max_streams = 100                # concurrent gRPC calls per connection
//! grpc_max_pending_resets = 20          # HTTP/2 streams reset before being served
//! metrics_max_connections = 16          # concurrent metrics scrapes
//! ```

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use serde::Deserialize;

use crate::names::{proxmox_patterns, validate_vm_name};

/// `qga-bridge` command line.
#[derive(Debug, Parser, Default)]
#[command(
    name = "qga-bridge",
    version,
    about = "gRPC and JSON-RPC front for the QEMU Guest Agents of the VMs on this host"
)]
pub struct Cli {
    /// A VM and its QGA chardev socket, `NAME=SOCKET` (repeatable).
    #[arg(long = "vm", value_name = "NAME=SOCKET", value_parser = parse_vm)]
    pub vms: Vec<(String, PathBuf)>,
    /// A VM's QMP socket, `NAME=SOCKET` (repeatable; the VM must be given with `--vm` or
    /// in the file): enables memory hotplug for it. QEMU serves one client per QMP
    /// socket, so give the bridge a `-qmp` socket of its own.
    #[arg(long = "qmp", value_name = "NAME=SOCKET", value_parser = parse_vm)]
    pub qmp: Vec<(String, PathBuf)>,
    /// TOML config file (see the README); flags override it.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Directory of the journal (request-ids and their outcomes), locked by one bridge
    /// at a time [default: $STATE_DIRECTORY (systemd's StateDirectory=), else
    /// /var/lib/qga-bridge].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// gRPC listen address, `IP:PORT` or `unix:PATH` [default: 127.0.0.1:50051].
    #[arg(long)]
    pub grpc_addr: Option<Listen>,
    /// JSON-RPC (HTTP and WebSocket) listen address, `IP:PORT` or `unix:PATH`
    /// [default: 127.0.0.1:8080].
    #[arg(long)]
    pub jsonrpc_addr: Option<Listen>,
    /// Prometheus metrics listen address (`/metrics`); off unless given.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Discover VM sockets matching this glob (repeatable); the VM name is the socket's
    /// directory name, without libvirt's `domain-N-` prefix.
    #[arg(long)]
    pub discover: Vec<String>,
    /// Serve the running domains of this libvirt connection (e.g. `qemu:///system`):
    /// their agents through libvirt, which holds their sockets, and memory hotplug
    /// through libvirt's device API. Domains come and go with libvirt's events.
    #[arg(long, value_name = "URI")]
    pub libvirt: Option<String>,
    /// A uid discovered sockets may be owned by (repeatable; replaces the file's
    /// `discover_owners`) [default: 0 and the bridge's effective uid].
    #[arg(long = "discover-owner", value_name = "UID")]
    pub discover_owners: Vec<u32>,
    /// Discover Proxmox VE's VMs in DIR: `<vmid>.qga` (and `<vmid>.qmp` for memory
    /// hotplug), VM name the vmid, both sockets shared with Proxmox's tools
    /// [default DIR: /var/run/qemu-server].
    #[arg(
        long,
        value_name = "DIR",
        num_args = 0..=1,
        default_missing_value = DEFAULT_PROXMOX_DIR
    )]
    pub discover_proxmox: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve every listener over TLS with this certificate chain (PEM); needs
    /// `--tls-key`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates issued by these CAs (PEM) on every listener.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Append the audit trail (one JSON line per state-changing call and per refused
    /// request) to this file [default: standard error].
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Serve on non-loopback TCP addresses without TLS. Anyone who can reach such an
    /// address can change guests' memory: only for a network you trust entirely.
    #[arg(long)]
    pub allow_insecure_tcp: bool,
    /// A name HTTP clients may use in `Host` (repeatable; adds to the file's
    /// `[http] allowed_hosts`) [always allowed: localhost, 127.0.0.1, [::1] and the
    /// listen address].
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// An `Origin` whose browser pages may call the JSON-RPC API (repeatable; adds to
    /// `[http] allowed_origins`) [default: none; requests carrying any other Origin are
    /// refused].
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
}

/// Where Proxmox VE's QEMU sockets are: `--discover-proxmox` without a value.
pub const DEFAULT_PROXMOX_DIR: &str = "/var/run/qemu-server";

fn parse_vm(s: &str) -> Result<(String, PathBuf), String> {
    let (name, socket) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=SOCKET, got '{s}'"))?;
    validate_vm_name(name)?;
    if socket.is_empty() {
        return Err(format!("VM '{name}' has an empty socket path"));
    }
    Ok((name.to_string(), PathBuf::from(socket)))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Deadlines applied to calls that do not bring their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Default per call, milliseconds.
    pub default_ms: u64,
    /// Connecting to a VM socket, milliseconds.
    pub connect_ms: u64,
    /// The resync handshake, milliseconds.
    pub resync_ms: u64,
    /// A shared VM's socket is released this long after its last call, milliseconds.
    pub shared_idle_ms: u64,
    /// Per QGA command, milliseconds.
    pub commands: BTreeMap<String, u64>,
}

impl Default for Timeouts {
    fn default() -> Self {
        let commands = [
            // Onlining or offlining can make the kernel migrate pages for seconds.
            ("guest-set-memory-blocks", 120_000),
            ("__org.qga-bridge_set-memory-blocks", 120_000),
            // Tens of thousands of blocks take a while on a slow guest.
            ("guest-get-memory-blocks", 30_000),
            ("__org.qga-bridge_get-memory-zones", 30_000),
            ("guest-ping", 5_000),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            default_ms: 10_000,
            connect_ms: 2_000,
            resync_ms: 3_000,
            shared_idle_ms: 1_000,
            commands,
        }
    }
}

impl Timeouts {
    /// The default deadline for `command`.
    pub fn for_command(&self, command: &str) -> Duration {
        Duration::from_millis(*self.commands.get(command).unwrap_or(&self.default_ms))
    }
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Calls that may wait per VM; more get RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
    /// Largest reply accepted from a guest, bytes.
    pub max_reply_bytes: usize,
    /// Largest JSON-RPC request body, bytes.
    pub max_request_bytes: u32,
    /// Concurrent JSON-RPC connections (HTTP and WebSocket) accepted.
    pub max_connections: u32,
    /// Block changes one `guest-set-memory-blocks` call may carry.
    pub max_set_entries: usize,
    /// Unrelated frames (stale replies, garbage) one call may skip before the channel
    /// counts as flooded: it is dropped and backed off.
    pub max_stale_frames: u32,
    /// Bytes of unrelated values one call may skip, likewise.
    pub max_stale_bytes: usize,
    /// Bytes of large replies being parsed off the async workers at once, bridge-wide.
    pub parse_budget_bytes: usize,
    /// VMs served in all, configured and discovered; discovered sockets beyond it are
    /// not added.
    pub max_vms: usize,
    /// Calls being served at once, bridge-wide, both front ends; more get
    /// RESOURCE_EXHAUSTED at once.
    pub max_in_flight: usize,
    /// Calls in flight on one JSON-RPC connection (a WebSocket's pipelined calls, a
    /// batch's members); more get -32004 at once.
    pub max_connection_calls: usize,
    /// Calls in one JSON-RPC batch; a larger batch is refused whole.
    pub max_batch: u32,
    /// Bytes of large JSON-RPC request bodies (256 KiB and more) read and handled at
    /// once, bridge-wide; further large requests wait.
    pub body_budget_bytes: u32,
    /// Time an HTTP/1 client has to send a whole request header (JSON-RPC and metrics),
    /// idle keep-alive time included, milliseconds.
    pub header_read_timeout_ms: u64,
    /// Interval of HTTP/2 (gRPC) and WebSocket pings, milliseconds.
    pub keepalive_interval_ms: u64,
    /// A ping unanswered this long closes its connection, milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Concurrent gRPC connections accepted.
    pub grpc_max_connections: usize,
    /// Concurrent gRPC calls (HTTP/2 streams) per connection.
    pub grpc_max_streams: u32,
    /// HTTP/2 streams a client may open and reset before they are served; more close
    /// the connection (the "rapid reset" defence).
    pub grpc_max_pending_resets: usize,
    /// Concurrent connections to the metrics endpoint.
    pub metrics_max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_depth: 64,
            // The largest real reply, guest-get-memory-blocks for 32,768 blocks (4 TiB in
            // 128 MiB blocks), is about 1.7 MB: more than twice that.
            max_reply_bytes: 4 * 1024 * 1024,
            max_request_bytes: 4 * 1024 * 1024,
            max_connections: 1024,
            max_set_entries: 4096,
            // A timed-out call's late reply and some noise; a guest sending more is
            // flooding, not answering.
            max_stale_frames: 64,
            max_stale_bytes: 8 * 1024 * 1024,
            parse_budget_bytes: 64 * 1024 * 1024,
            max_vms: 4096,
            max_in_flight: 4096,
            max_connection_calls: 16,
            max_batch: 32,
            body_budget_bytes: 8 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            grpc_max_connections: 1024,
            grpc_max_streams: 100,
            grpc_max_pending_resets: 20,
            metrics_max_connections: 16,
        }
    }
}

/// Where a front end listens: a TCP address, or a unix socket (`unix:PATH`), where the
/// socket file's mode and group decide who may connect and the peer's uid is known.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    /// `IP:PORT`.
    Tcp(SocketAddr),
    /// `unix:PATH` (absolute).
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(path) if Path::new(path).is_absolute() => Ok(Self::Unix(PathBuf::from(path))),
            Some(_) => Err(format!("'{s}': a unix socket path must be absolute")),
            None => s
                .parse()
                .map(Self::Tcp)
                .map_err(|e| format!("'{s}': expected IP:PORT or unix:PATH ({e})")),
        }
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One `[vms]` entry: the agent's socket, or a table with the agent's and QMP's.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum VmEntry {
    /// `NAME = "/path/qga.sock"`.
    Qga(PathBuf),
    /// `NAME = { qga = "...", qmp = "..." }`.
    Full(VmSockets),
}

/// `{ qga = "...", qmp = "...", mode = "..." }`; a misspelt key is an error, not a VM
/// without hotplug.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSockets {
    qga: PathBuf,
    #[serde(default)]
    qmp: Option<PathBuf>,
    #[serde(default)]
    mode: SocketMode,
    /// This VM's `hotplug.auto_online`, when it differs.
    #[serde(default)]
    auto_online: Option<AutoOnline>,
}

/// How the bridge holds a VM's agent socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketMode {
    /// Connected for as long as the bridge runs: the fastest calls, and the only client
    /// (QEMU's socket chardev serves one at a time). For sockets given to the bridge alone.
    #[default]
    Exclusive,
    /// Released `timeouts.shared_idle_ms` after the last call, so other tools (Proxmox's
    /// `qm guest cmd`, `socat`) get the socket between the bridge's calls; each burst of
    /// calls pays a connect and a resync.
    Shared,
}

/// Memory hotplug: how DIMMs are sized and how long each phase may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hotplug {
    /// Bytes per DIMM that a resize plugs (the last one may be smaller), a multiple of
    /// the guest's block size.
    pub dimm_size: u64,
    /// A whole plug, unplug or resize, unless the caller's deadline is sooner,
    /// milliseconds.
    pub timeout_ms: u64,
    /// How long a new DIMM's blocks may take to appear in the guest, milliseconds.
    pub appear_timeout_ms: u64,
    /// How long the guest may take to eject an unplugged DIMM (`DEVICE_DELETED`),
    /// milliseconds.
    pub eject_timeout_ms: u64,
    /// What the bridge does with the guest kernel's `auto_online_blocks` (our agent only).
    pub auto_online: AutoOnline,
    /// Per-VM `auto_online` (`[vms] NAME = { ..., auto_online = "keep" }`).
    #[serde(skip)]
    pub auto_online_of: BTreeMap<String, AutoOnline>,
    /// How long an unplug keeps offlining a DIMM's blocks (trying again after EBUSY)
    /// before it gives up and gives them back, milliseconds: a DIMM whose memory the guest
    /// will not release is answered within this, not the whole `timeout_ms`.
    pub offline_budget_ms: u64,
    /// QMP commands, milliseconds.
    pub qmp_timeout_ms: u64,
    /// Largest QMP message accepted, bytes.
    pub max_qmp_bytes: usize,
    /// Request ids remembered per VM for idempotent retries (oldest forgotten first).
    pub max_request_ids: usize,
    /// How long a request id is remembered, seconds.
    pub request_id_ttl_s: u64,
    /// How often the keeper checks that the DIMMs the bridge plugged are online (and
    /// onlines them again after a guest reboot), milliseconds.
    pub restore_interval_ms: u64,
}

impl Default for Hotplug {
    fn default() -> Self {
        Self {
            dimm_size: 512 << 20,
            // Offlining migrates pages and may need many tries on a busy guest.
            timeout_ms: 120_000,
            appear_timeout_ms: 10_000,
            eject_timeout_ms: 10_000,
            offline_budget_ms: 10_000,
            auto_online: AutoOnline::Movable,
            auto_online_of: BTreeMap::new(),
            qmp_timeout_ms: 5_000,
            max_qmp_bytes: 1 << 20,
            max_request_ids: 256,
            request_id_ttl_s: 86_400,
            restore_interval_ms: 2_000,
        }
    }
}

/// What the bridge does with a guest kernel's `auto_online_blocks` (`hotplug.auto_online`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoOnline {
    /// Keep it at `online_movable`, so the kernel onlines new memory into ZONE_MOVABLE
    /// itself as it adds it (as fast as memory hotplug gets); a plug asking for another
    /// online type sets it to that type for the plug, then back.
    Movable,
    /// Never change it: the bridge onlines new blocks as they appear.
    Keep,
}

/// The longest hotplug timeout: one day.
const MAX_HOTPLUG_MS: u64 = 86_400_000;

impl Hotplug {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("dimm_size", self.dimm_size),
            ("timeout_ms", self.timeout_ms),
            ("appear_timeout_ms", self.appear_timeout_ms),
            ("eject_timeout_ms", self.eject_timeout_ms),
            ("offline_budget_ms", self.offline_budget_ms),
            ("qmp_timeout_ms", self.qmp_timeout_ms),
            ("max_qmp_bytes", self.max_qmp_bytes as u64),
            ("max_request_ids", self.max_request_ids as u64),
            ("request_id_ttl_s", self.request_id_ttl_s),
            ("restore_interval_ms", self.restore_interval_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "hotplug.{name} must be at least 1"
                )));
            }
        }
        for (name, ms) in [
            ("timeout_ms", self.timeout_ms),
            ("appear_timeout_ms", self.appear_timeout_ms),
            ("eject_timeout_ms", self.eject_timeout_ms),
            ("offline_budget_ms", self.offline_budget_ms),
            ("qmp_timeout_ms", self.qmp_timeout_ms),
        ] {
            if ms > MAX_HOTPLUG_MS {
                return Err(ConfigError::Invalid(format!(
                    "hotplug.{name} must be at most {MAX_HOTPLUG_MS} (one day)"
                )));
            }
        }
        Ok(())
    }
}

/// Unix-socket listeners' permissions.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UnixSockets {
    /// File mode of the socket (who may connect), e.g. `0o660`.
    pub mode: u32,
    /// Group (gid) of the socket; default: the bridge's own.
    pub group: Option<u32>,
}

impl Default for UnixSockets {
    fn default() -> Self {
        Self {
            mode: 0o660,
            group: None,
        }
    }
}

/// Which `Host` and `Origin` headers the HTTP servers accept (DNS rebinding and
/// cross-site defences).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Extra names allowed in `Host`, besides the loopback names and the listen address.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) allowed to call; requests with any other `Origin`
    /// header are refused.
    pub allowed_origins: Vec<String>,
}

/// The `[tls]` section: PEM files.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; set, every client must present
    /// one (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// A bearer token, by the SHA-256 of its text (hex).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The identity the token proves.
    pub identity: String,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

/// What a role allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads only.
    Read,
    /// Reads and state-changing calls.
    Write,
}

/// A role on some VMs for an identity.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// The identity.
    pub identity: String,
    /// The role.
    pub role: Role,
    /// Globs of VM names.
    pub vms: Vec<String>,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// Grants.
    pub grants: Vec<GrantConfig>,
}

impl TokenConfig {
    /// The SHA-256 the token must hash to, from its 64 hex digits.
    pub fn digest(&self) -> Result<[u8; 32], AuthConfigError> {
        parse_hex32(&self.sha256).ok_or_else(|| {
            AuthConfigError(format!(
                "token of '{}': sha256 must be 64 hex digits (e.g. `printf %s TOKEN | sha256sum`)",
                self.identity
            ))
        })
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl GrantConfig {
    /// The VM globs, compiled.
    pub fn patterns(&self) -> Result<Vec<glob::Pattern>, AuthConfigError> {
        self.vms
            .iter()
            .map(|p| glob::Pattern::new(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthConfigError(format!("grant of '{}': {e}", self.identity)))
    }
}

impl AuthConfig {
    /// `Ok` when every token hash and grant glob is usable.
    pub fn check(&self) -> Result<(), AuthConfigError> {
        for token in &self.tokens {
            token.digest()?;
        }
        for grant in &self.grants {
            grant.patterns()?;
        }
        Ok(())
    }
}

/// Why the `[auth]` section is unusable.
#[derive(Debug, thiserror::Error)]
#[error("[auth]: {0}")]
pub struct AuthConfigError(String);

/// The TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct File {
    grpc_addr: Option<Listen>,
    jsonrpc_addr: Option<Listen>,
    unix_sockets: Option<UnixSockets>,
    metrics_addr: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    discover: Vec<String>,
    discover_interval_ms: Option<u64>,
    discover_owners: Option<Vec<u32>>,
    discover_proxmox: Option<PathBuf>,
    libvirt: Option<String>,
    vms: BTreeMap<String, VmEntry>,
    timeouts: Timeouts,
    limits: Limits,
    hotplug: Hotplug,
    http: Http,
    coalesce_reads: Option<bool>,
    allow_insecure_tcp: Option<bool>,
    audit_log: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    tls: Option<TlsFiles>,
    auth: Option<AuthConfig>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub grpc_addr: Listen,
    /// JSON-RPC listen address.
    pub jsonrpc_addr: Listen,
    /// Mode and group of unix-socket listeners.
    pub unix_sockets: UnixSockets,
    /// Metrics listen address, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Statically configured VMs: name and QGA socket.
    pub vms: BTreeMap<String, PathBuf>,
    /// QMP sockets of configured VMs, for memory hotplug.
    pub qmp: BTreeMap<String, PathBuf>,
    /// Configured VMs whose agent socket is shared with other tools: released when idle.
    pub shared: std::collections::BTreeSet<String>,
    /// Memory hotplug.
    pub hotplug: Hotplug,
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
    pub timeouts: Timeouts,
    /// Limits.
    pub limits: Limits,
    /// Serve concurrent identical reads of one VM with one agent call.
    pub coalesce_reads: bool,
    /// `Host` and `Origin` checks.
    pub http: Http,
    /// Listening on non-loopback TCP without TLS was asked for explicitly.
    pub allow_insecure_tcp: bool,
    /// The audit trail's file; `None`: the log stream.
    pub audit_log: Option<PathBuf>,
    /// The journal's directory, locked by one bridge at a time.
    pub state_dir: PathBuf,
    /// TLS for every listener; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Tokens and grants. `None` (no `[auth]` section): only local (or, with
    /// `allow_insecure_tcp`, all) callers, each allowed everything. `Some`, even empty:
    /// every caller must prove an identity and is allowed only what it is granted.
    pub auth: Option<AuthConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 50051))),
            jsonrpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080))),
            unix_sockets: UnixSockets::default(),
            metrics_addr: None,
            log_format: LogFormat::Text,
            vms: BTreeMap::new(),
            qmp: BTreeMap::new(),
            shared: std::collections::BTreeSet::new(),
            hotplug: Hotplug::default(),
            discover: Vec::new(),
            discover_interval: Duration::from_secs(2),
            discover_owners: default_discover_owners(),
            discover_proxmox: None,
            libvirt: None,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            coalesce_reads: true,
            http: Http::default(),
            allow_insecure_tcp: false,
            audit_log: None,
            state_dir: default_state_dir(),
            tls: None,
            auth: None,
        }
    }
}

/// The state directory when none is given: systemd's `$STATE_DIRECTORY` (the first, if
/// it lists several), else `/var/lib/qga-bridge`.
pub fn default_state_dir() -> PathBuf {
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
pub fn default_discover_owners() -> Vec<u32> {
    let mut owners = vec![0, rustix::process::geteuid().as_raw()];
    owners.dedup();
    owners
}

impl Config {
    /// The configuration from the command line over the file it names.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = &cli.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            config.apply_toml(path, &text)?;
        }
        if let Some(a) = &cli.grpc_addr {
            config.grpc_addr = a.clone();
        }
        if let Some(a) = &cli.jsonrpc_addr {
            config.jsonrpc_addr = a.clone();
        }
        if cli.metrics_addr.is_some() {
            config.metrics_addr = cli.metrics_addr;
        }
        if let Some(f) = cli.log_format {
            config.log_format = f;
        }
        config.discover.extend(cli.discover.iter().cloned());
        if cli.libvirt.is_some() {
            config.libvirt = cli.libvirt.clone();
        }
        if !cli.discover_owners.is_empty() {
            config.discover_owners = cli.discover_owners.clone();
        }
        if cli.discover_proxmox.is_some() {
            config.discover_proxmox = cli.discover_proxmox.clone();
        }
        for (name, socket) in &cli.vms {
            config.vms.insert(name.clone(), socket.clone());
        }
        for (name, socket) in &cli.qmp {
            config.qmp.insert(name.clone(), socket.clone());
        }
        config.allow_insecure_tcp |= cli.allow_insecure_tcp;
        if cli.audit_log.is_some() {
            config.audit_log = cli.audit_log.clone();
        }
        if let Some(dir) = &cli.state_dir {
            config.state_dir = dir.clone();
        }
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            config.tls = Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: cli.client_ca.clone(),
            });
        }
        config
            .http
            .allowed_hosts
            .extend(cli.allowed_hosts.iter().cloned());
        config
            .http
            .allowed_origins
            .extend(cli.allowed_origins.iter().cloned());
        config.validate()?;
        Ok(config)
    }

    /// Applies a TOML document.
    pub fn apply_toml(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(a) = file.grpc_addr {
            self.grpc_addr = a;
        }
        if let Some(a) = file.jsonrpc_addr {
            self.jsonrpc_addr = a;
        }
        if let Some(u) = file.unix_sockets {
            self.unix_sockets = u;
        }
        if file.metrics_addr.is_some() {
            self.metrics_addr = file.metrics_addr;
        }
        if let Some(f) = file.log_format {
            self.log_format = f;
        }
        if let Some(ms) = file.discover_interval_ms {
            self.discover_interval = Duration::from_millis(ms);
        }
        if file.libvirt.is_some() {
            self.libvirt = file.libvirt;
        }
        if let Some(owners) = file.discover_owners {
            self.discover_owners = owners;
        }
        if file.discover_proxmox.is_some() {
            self.discover_proxmox = file.discover_proxmox;
        }
        if let Some(c) = file.coalesce_reads {
            self.coalesce_reads = c;
        }
        if let Some(a) = file.allow_insecure_tcp {
            self.allow_insecure_tcp = a;
        }
        self.http = file.http;
        if file.audit_log.is_some() {
            self.audit_log = file.audit_log;
        }
        if let Some(dir) = file.state_dir {
            self.state_dir = dir;
        }
        if file.tls.is_some() {
            self.tls = file.tls;
        }
        if file.auth.is_some() {
            self.auth = file.auth;
        }
        self.discover = file.discover;
        // `[hotplug]` first: `[vms]` entries may override its `auto_online` per VM.
        self.hotplug = file.hotplug;
        self.set_vms(file.vms);
        // Per-command entries add to the defaults rather than replacing them all.
        let mut commands = self.timeouts.commands.clone();
        commands.extend(file.timeouts.commands.clone());
        self.timeouts = Timeouts {
            commands,
            ..file.timeouts
        };
        self.limits = file.limits;
        Ok(())
    }

    /// The file's `[vms]` replace the VMs given so far.
    fn set_vms(&mut self, vms: BTreeMap<String, VmEntry>) {
        self.vms.clear();
        self.qmp.clear();
        self.shared.clear();
        self.hotplug.auto_online_of.clear();
        for (name, entry) in vms {
            let (qga, qmp) = match entry {
                VmEntry::Qga(qga) => (qga, None),
                VmEntry::Full(VmSockets {
                    qga,
                    qmp,
                    mode,
                    auto_online,
                }) => {
                    if mode == SocketMode::Shared {
                        self.shared.insert(name.clone());
                    }
                    if let Some(a) = auto_online {
                        self.hotplug.auto_online_of.insert(name.clone(), a);
                    }
                    (qga, qmp)
                }
            };
            self.vms.insert(name.clone(), qga);
            if let Some(qmp) = qmp {
                self.qmp.insert(name, qmp);
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_listeners()?;
        self.validate_access()?;
        self.validate_vms()?;
        self.validate_discovery()?;
        self.validate_limits()?;
        self.validate_timeouts()
    }

    /// Listeners: a file mode that is one, and no plaintext TCP off loopback unless
    /// allowed.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let tcp = |l: &Listen| match l {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        };
        let listeners = [
            ("gRPC", tcp(&self.grpc_addr)),
            ("JSON-RPC", tcp(&self.jsonrpc_addr)),
            ("metrics", self.metrics_addr),
        ];
        if self.unix_sockets.mode > 0o777 {
            return Err(ConfigError::Invalid(format!(
                "unix_sockets.mode {:o} is not a file mode",
                self.unix_sockets.mode
            )));
        }
        for (server, addr) in listeners {
            let exposed = |a: &SocketAddr| !a.ip().is_loopback();
            if let Some(addr) =
                addr.filter(|a| exposed(a) && self.tls.is_none() && !self.allow_insecure_tcp)
            {
                return Err(ConfigError::Invalid(format!(
                    "the {server} address {addr} is not loopback and the bridge would serve it \
                     without TLS: anyone who can reach it could change guests' memory. Listen \
                     on a loopback address, configure TLS (--tls-cert, --tls-key, and \
                     --client-ca for client certificates), or pass --allow-insecure-tcp \
                     (allow_insecure_tcp = true) on a network you trust"
                )));
            }
        }
        Ok(())
    }

    /// `[auth]` and the HTTP origins.
    fn validate_access(&self) -> Result<(), ConfigError> {
        if let Some(auth) = &self.auth {
            auth.check()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        for origin in &self.http.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/') != origin
            {
                return Err(ConfigError::Invalid(format!(
                    "allowed origin '{origin}' must be scheme://host[:port], without a path"
                )));
            }
        }
        Ok(())
    }

    /// VM names, their QMP sockets, hotplug settings and `limits.max_vms`.
    fn validate_vms(&self) -> Result<(), ConfigError> {
        for name in self.vms.keys() {
            validate_vm_name(name).map_err(ConfigError::Invalid)?;
        }
        if let Some(name) = self.qmp.keys().find(|n| !self.vms.contains_key(*n)) {
            return Err(ConfigError::Invalid(format!(
                "VM '{name}' has a QMP socket but no agent socket: give it with --vm or [vms]"
            )));
        }
        self.hotplug.validate()?;
        let mut qmp_sockets: BTreeMap<&Path, &str> = BTreeMap::new();
        for (name, socket) in &self.qmp {
            if let Some(other) = qmp_sockets.insert(socket, name) {
                return Err(ConfigError::Invalid(format!(
                    "VMs '{other}' and '{name}' have the same QMP socket {}",
                    socket.display()
                )));
            }
        }
        if self.limits.max_vms == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_vms must be at least 1".into(),
            ));
        }
        if self.vms.len() > self.limits.max_vms {
            return Err(ConfigError::Invalid(format!(
                "{} VMs are configured but limits.max_vms is {}",
                self.vms.len(),
                self.limits.max_vms
            )));
        }
        Ok(())
    }

    /// Discovery: a UTF-8 Proxmox directory, owners to accept, globs that parse.
    fn validate_discovery(&self) -> Result<(), ConfigError> {
        if let Some(dir) = &self.discover_proxmox
            && proxmox_patterns(dir).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "discover_proxmox {} is not UTF-8",
                dir.display()
            )));
        }
        if (!self.discover.is_empty() || self.discover_proxmox.is_some())
            && self.discover_owners.is_empty()
        {
            return Err(ConfigError::Invalid(
                "discover_owners is empty: every discovered socket would be refused".into(),
            ));
        }
        for pattern in &self.discover {
            glob::Pattern::new(pattern)
                .map_err(|e| ConfigError::Invalid(format!("bad glob '{pattern}': {e}")))?;
        }
        Ok(())
    }

    /// `[limits]`: every count at least 1, and budgets that fit the largest request.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        if self.limits.max_set_entries == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_set_entries must be at least 1".into(),
            ));
        }
        if self.limits.queue_depth == 0 {
            return Err(ConfigError::Invalid(
                "limits.queue_depth must be at least 1".into(),
            ));
        }
        let l = &self.limits;
        for (name, value) in [
            ("max_in_flight", l.max_in_flight as u64),
            ("max_connection_calls", l.max_connection_calls as u64),
            ("max_batch", u64::from(l.max_batch)),
            ("max_connections", u64::from(l.max_connections)),
            ("grpc_max_connections", l.grpc_max_connections as u64),
            ("grpc_max_streams", u64::from(l.grpc_max_streams)),
            ("grpc_max_pending_resets", l.grpc_max_pending_resets as u64),
            ("metrics_max_connections", l.metrics_max_connections as u64),
            ("header_read_timeout_ms", l.header_read_timeout_ms),
            ("keepalive_interval_ms", l.keepalive_interval_ms),
            ("keepalive_timeout_ms", l.keepalive_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be at least 1"
                )));
            }
        }
        if l.body_budget_bytes < l.max_request_bytes {
            return Err(ConfigError::Invalid(format!(
                "limits.body_budget_bytes ({}) is smaller than limits.max_request_bytes ({}): \
                 the largest request could never be read",
                l.body_budget_bytes, l.max_request_bytes
            )));
        }
        if self.limits.max_reply_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_reply_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    /// `[timeouts]`: all positive.
    fn validate_timeouts(&self) -> Result<(), ConfigError> {
        if self.timeouts.default_ms == 0
            || self.timeouts.resync_ms == 0
            || self.timeouts.connect_ms == 0
            || self.timeouts.shared_idle_ms == 0
        {
            return Err(ConfigError::Invalid("timeouts must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_flags() {
        let mut c = Config::default();
        c.apply_toml(
            Path::new("t.toml"),
            "grpc_addr = \"127.0.0.1:1\"\n[vms]\nvm1 = \"/a.sock\"\n[timeouts]\ndefault_ms = 50\n[timeouts.commands]\nguest-ping = 7\n[limits]\nqueue_depth = 3\n",
        )
        .expect("valid");
        assert_eq!(
            c.grpc_addr,
            Listen::Tcp("127.0.0.1:1".parse().expect("addr"))
        );
        assert_eq!(c.vms["vm1"], PathBuf::from("/a.sock"));
        assert_eq!(
            c.timeouts.for_command("guest-ping"),
            Duration::from_millis(7)
        );
        assert_eq!(
            c.timeouts.for_command("guest-info"),
            Duration::from_millis(50)
        );
        assert_eq!(
            c.timeouts.for_command("guest-set-memory-blocks"),
            Duration::from_secs(120)
        );
        assert_eq!(c.limits.queue_depth, 3);
        assert!(c.apply_toml(Path::new("t"), "bogus = 1\n").is_err());
    }

    #[test]
    fn vms_with_qmp_sockets() {
        let mut c = Config::default();
        c.apply_toml(
            Path::new("t.toml"),
            "[vms]\na = \"/a.sock\"\nb = { qga = \"/b.sock\", qmp = \"/b.qmp\" }\nc = { qga = \"/c.sock\", auto_online = \"keep\" }\n[hotplug]\ndimm_size = 1073741824\n",
        )
        .expect("valid");
        assert_eq!(c.hotplug.auto_online, AutoOnline::Movable);
        assert_eq!(
            c.hotplug.auto_online_of.get("c"),
            Some(&AutoOnline::Keep),
            "a VM's own auto_online"
        );
        assert!(
            Config::default()
                .apply_toml(
                    Path::new("t.toml"),
                    "[vms]\nc = { qga = \"/c\", auto_online = \"off\" }\n"
                )
                .is_err(),
            "an unknown auto_online is refused"
        );
        assert_eq!(c.vms.len(), 3);
        assert_eq!(c.vms["b"], PathBuf::from("/b.sock"));
        assert_eq!(c.qmp.len(), 1);
        assert_eq!(c.qmp["b"], PathBuf::from("/b.qmp"));
        assert_eq!(c.hotplug.dimm_size, 1 << 30);
        assert!(c.shared.is_empty());
        c.apply_toml(
            Path::new("t.toml"),
            "[vms]\np = { qga = \"/p.qga\", mode = \"shared\" }\n",
        )
        .expect("valid");
        assert!(c.shared.contains("p"));
        assert!(
            c.apply_toml(Path::new("t"), "[vms]\nb = { qmp = \"/b.qmp\" }\n")
                .is_err(),
            "no agent socket"
        );
        assert!(
            c.apply_toml(
                Path::new("t"),
                "[vms]\nb = { qga = \"/b.sock\", qpm = \"/b.qmp\" }\n"
            )
            .is_err(),
            "a misspelt key"
        );
        let cli = Cli {
            vms: vec![("a".into(), "/a".into())],
            qmp: vec![("z".into(), "/z".into())],
            ..Cli::default()
        };
        let err = Config::load(&cli)
            .expect_err("qmp of unknown VM")
            .to_string();
        assert!(err.contains("no agent socket"), "{err}");
    }

    #[test]
    fn non_loopback_tcp_needs_the_explicit_flag() {
        let open = |allow: bool| Cli {
            jsonrpc_addr: Some(Listen::Tcp(SocketAddr::from(([0, 0, 0, 0], 8080)))),
            allow_insecure_tcp: allow,
            ..Cli::default()
        };
        let err = Config::load(&open(false)).expect_err("refused").to_string();
        assert!(err.contains("0.0.0.0:8080 is not loopback"), "{err}");
        assert!(Config::load(&open(true)).is_ok());
        let ipv6 = Cli {
            grpc_addr: Some("[::1]:50051".parse().expect("addr")),
            jsonrpc_addr: Some("unix:/run/qga-bridge/jsonrpc.sock".parse().expect("unix")),
            ..Cli::default()
        };
        assert!(
            Config::load(&ipv6).is_ok(),
            "IPv6 loopback and unix sockets are local"
        );
        assert!("unix:relative.sock".parse::<Listen>().is_err());
    }

    #[test]
    fn vm_flags() {
        assert_eq!(
            parse_vm("a=/s").ok(),
            Some(("a".into(), PathBuf::from("/s")))
        );
        assert!(parse_vm("a").is_err());
        assert!(parse_vm("a b=/s").is_err());
        assert!(parse_vm("a=").is_err());
    }

    #[test]
    fn discover_proxmox_flag_and_key() {
        let parse = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(std::iter::once("qga-bridge").chain(args.iter().copied()))
                    .expect("parses");
            Config::load(&cli).expect("valid").discover_proxmox
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(
            parse(&["--discover-proxmox"]),
            Some(PathBuf::from("/var/run/qemu-server")),
            "the default directory"
        );
        assert_eq!(
            parse(&["--discover-proxmox", "--vm", "a=/a"]),
            Some(PathBuf::from(DEFAULT_PROXMOX_DIR)),
            "a flag after it is not its value"
        );
        assert_eq!(
            parse(&["--discover-proxmox", "/srv/pve"]),
            Some(PathBuf::from("/srv/pve"))
        );
        assert_eq!(
            parse(&["--discover-proxmox=/srv/pve"]),
            Some(PathBuf::from("/srv/pve"))
        );

        let mut c = Config::default();
        c.apply_toml(
            Path::new("t.toml"),
            "discover_proxmox = \"/var/run/qemu-server\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.discover_proxmox,
            Some(PathBuf::from("/var/run/qemu-server"))
        );
        assert!(c.discover.is_empty(), "no glob needed");

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "discover_proxmox = \"/pve\"\ndiscover_owners = []\n")
            .expect("write");
        let cli = Cli {
            config: Some(file),
            ..Cli::default()
        };
        let err = Config::load(&cli).expect_err("no owners").to_string();
        assert!(err.contains("discover_owners"), "{err}");
        let flag = Cli {
            discover_proxmox: Some("/other".into()),
            ..cli
        };
        let err = Config::load(&flag)
            .expect_err("still no owners")
            .to_string();
        assert!(err.contains("discover_owners"), "{err}");
    }

    #[test]
    fn discovery_owners_and_max_vms() {
        let me = rustix::process::geteuid().as_raw();
        let c = Config::default();
        assert!(c.discover_owners.contains(&0) && c.discover_owners.contains(&me));
        assert_eq!(c.limits.max_vms, 4096);

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        let write = |text: &str| std::fs::write(&file, text).expect("write");
        let cli = Cli {
            config: Some(file.clone()),
            ..Cli::default()
        };

        write("discover = [\"/run/*/q\"]\ndiscover_owners = [64055]\n[limits]\nmax_vms = 2\n");
        let c = Config::load(&cli).expect("valid");
        assert_eq!(c.discover_owners, [64055]);
        assert_eq!(c.limits.max_vms, 2);
        let flags = Cli {
            discover_owners: vec![7, 8],
            ..Cli {
                config: Some(file.clone()),
                ..Cli::default()
            }
        };
        assert_eq!(Config::load(&flags).expect("valid").discover_owners, [7, 8]);

        write("[vms]\na = \"/a\"\nb = \"/b\"\nc = \"/c\"\n[limits]\nmax_vms = 2\n");
        let err = Config::load(&cli).expect_err("over max_vms").to_string();
        assert!(
            err.contains("3 VMs are configured but limits.max_vms is 2"),
            "{err}"
        );

        write("discover = [\"/run/*/q\"]\ndiscover_owners = []\n");
        let err = Config::load(&cli).expect_err("no owners").to_string();
        assert!(err.contains("discover_owners"), "{err}");
    }
}
