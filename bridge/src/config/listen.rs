//! Where and how the front ends listen: their addresses, `[unix_sockets]`, `[tls]` and
//! `[http]`; and the check that nothing is served in plaintext off loopback unless asked.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{Cli, Config, ConfigError};

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

/// The `[unix_sockets]` section: unix-socket listeners' permissions.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UnixSocketsConfig {
    /// File mode of the socket (who may connect), e.g. `0o660`.
    pub mode: u32,
    /// Group (gid) of the socket; default: the bridge's own.
    pub group: Option<u32>,
}

impl Default for UnixSocketsConfig {
    fn default() -> Self {
        Self {
            mode: 0o660,
            group: None,
        }
    }
}

/// The `[tls]` section: PEM files.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; set, every client must present
    /// one (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// The `[http]` section: which `Host` and `Origin` headers the HTTP servers accept (DNS
/// rebinding and cross-site defences).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Extra names allowed in `Host`, besides the loopback names and the listen address.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) allowed to call; requests with any other `Origin`
    /// header are refused.
    pub allowed_origins: Vec<String>,
}

impl HttpConfig {
    /// Origins that are `scheme://host[:port]`.
    pub(super) fn validate(&self, cli: &Cli) -> Result<(), ConfigError> {
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/') != origin
            {
                let by_flag = cli.allowed_origins.contains(origin);
                return Err(ConfigError::invalid(
                    Cli::given_as(by_flag, "--allowed-origin", "http.allowed_origins"),
                    format!("'{origin}' must be scheme://host[:port], without a path"),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Listeners: a file mode that is one, and no plaintext TCP off loopback unless
    /// allowed.
    pub(super) fn validate_listeners(&self, cli: &Cli) -> Result<(), ConfigError> {
        if self.unix_sockets.mode > 0o777 {
            return Err(ConfigError::invalid(
                "unix_sockets.mode",
                format!("{:o} is not a file mode", self.unix_sockets.mode),
            ));
        }
        let tcp = |l: &Listen| match l {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        };
        let listeners = [
            (
                "gRPC",
                tcp(&self.grpc_addr),
                cli.grpc_addr.is_some(),
                "grpc_addr",
            ),
            (
                "JSON-RPC",
                tcp(&self.jsonrpc_addr),
                cli.jsonrpc_addr.is_some(),
                "jsonrpc_addr",
            ),
            (
                "metrics",
                self.metrics_addr,
                cli.metrics_addr.is_some(),
                "metrics_addr",
            ),
        ];
        let plaintext = self.tls.is_none() && !self.allow_insecure_tcp;
        for (server, addr, by_flag, key) in listeners {
            let Some(addr) = addr.filter(|a| plaintext && !a.ip().is_loopback()) else {
                continue;
            };
            let flag = format!("--{}", key.replace('_', "-"));
            return Err(ConfigError::invalid(
                Cli::given_as(by_flag, &flag, key),
                format!(
                    "the {server} address {addr} is not loopback and the bridge would serve it \
                     without TLS: anyone who can reach it could change guests' memory. Listen \
                     on a loopback address, configure TLS (--tls-cert, --tls-key, and \
                     --client-ca for client certificates), or pass --allow-insecure-tcp \
                     (allow_insecure_tcp = true) on a network you trust"
                ),
            ));
        }
        Ok(())
    }
}
