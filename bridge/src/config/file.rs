//! The TOML file: its schema, the keys renamed (still read under their old names for one
//! release, with a warning), and how it goes over the defaults.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    AuthConfig, BalloonConfig, Config, ConfigError, HotplugConfig, HttpConfig, LimitsConfig,
    Listen, LogFormat, SignalsConfig, TimeoutsConfig, TlsConfig, UnixSocketsConfig, VmConfig,
};

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct File {
    grpc_addr: Option<Listen>,
    jsonrpc_addr: Option<Listen>,
    unix_sockets: Option<UnixSocketsConfig>,
    metrics_addr: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    discover: Vec<String>,
    discover_interval_ms: Option<u64>,
    discover_owners: Option<Vec<u32>>,
    discover_proxmox: Option<PathBuf>,
    libvirt: Option<String>,
    vms: BTreeMap<String, VmEntry>,
    timeouts: TimeoutsConfig,
    limits: LimitsConfig,
    hotplug: HotplugConfig,
    balloon: BalloonConfig,
    signals: SignalsConfig,
    http: HttpConfig,
    coalesce_reads: Option<bool>,
    allow_insecure_tcp: Option<bool>,
    audit_log: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    tls: Option<TlsConfig>,
    auth: Option<AuthConfig>,
}

/// One `[vms]` entry: the agent's socket, or a table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum VmEntry {
    /// `NAME = "/path/qga.sock"`.
    Qga(PathBuf),
    /// `NAME = { qga = "...", qmp = "...", ... }`.
    Full(VmConfig),
}

impl From<VmEntry> for VmConfig {
    fn from(entry: VmEntry) -> Self {
        match entry {
            VmEntry::Qga(qga) => VmConfig::agent(qga),
            VmEntry::Full(vm) => vm,
        }
    }
}

/// A renamed key: the file may still give `old` for one release; it is read as `new`,
/// with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deprecation {
    /// The old key, e.g. `limits.max_connections`.
    pub old: &'static str,
    /// The key it is now, e.g. `limits.jsonrpc_max_connections`.
    pub new: &'static str,
}

impl fmt::Display for Deprecation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key {} is deprecated; use {}", self.old, self.new)
    }
}

/// Every renamed key; each old name is also a `#[serde(alias)]` of its new field.
pub(super) const RENAMED: &[Deprecation] = &[
    renamed("limits.max_connections", "limits.jsonrpc_max_connections"),
    renamed("limits.max_batch", "limits.jsonrpc_max_batch"),
    renamed(
        "limits.max_connection_calls",
        "limits.jsonrpc_max_connection_calls",
    ),
    renamed(
        "limits.max_request_bytes",
        "limits.jsonrpc_max_request_bytes",
    ),
    renamed(
        "limits.body_budget_bytes",
        "limits.jsonrpc_body_budget_bytes",
    ),
    renamed("hotplug.qmp_timeout_ms", "hotplug.hypervisor_timeout_ms"),
    renamed("hotplug.dimm_size", "hotplug.dimm_size_bytes"),
];

const fn renamed(old: &'static str, new: &'static str) -> Deprecation {
    Deprecation { old, new }
}

/// The renamed keys the file `text` uses by their old names; a key given by both names
/// is an error naming both. A file that does not parse yields none: the full parse
/// reports what is wrong with it.
fn deprecations(text: &str) -> Result<Vec<Deprecation>, ConfigError> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Ok(Vec::new());
    };
    let has = |key: &str| {
        let (section, name) = key.split_once('.').unwrap_or(("", key));
        table
            .get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key(name))
    };
    let mut used = Vec::new();
    for d in RENAMED.iter().filter(|d| has(d.old)) {
        if has(d.new) {
            return Err(ConfigError::Conflict {
                keys: (d.old.to_string(), d.new.to_string()),
                reason: format!(
                    "the same setting under its deprecated and its new name: keep only {}",
                    d.new
                ),
            });
        }
        used.push(*d);
    }
    Ok(used)
}

impl Config {
    /// Applies the TOML document `text` (from `path`) over what is set so far, and notes
    /// the deprecated keys it uses in `deprecated`.
    pub(super) fn apply_toml(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let deprecated = deprecations(text)?;
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        file.apply(self);
        self.deprecated = deprecated;
        Ok(())
    }
}

impl File {
    /// The file over `config`: a top-level key given replaces its value; the sections
    /// replace theirs whole (their absent keys at the defaults), `[vms]` the VMs given so
    /// far, and `[timeouts.commands]` adds to the default per-command timeouts.
    fn apply(self, config: &mut Config) {
        self.apply_top_level(config);
        config.discover = self.discover;
        config.http = self.http;
        config.hotplug = self.hotplug;
        config.balloon = self.balloon;
        config.signals = self.signals;
        config.timeouts = self.timeouts.over_defaults();
        config.limits = self.limits;
        config.vms = self
            .vms
            .into_iter()
            .map(|(name, entry)| (name, entry.into()))
            .collect();
    }

    /// The top-level keys, and the sections that are all or nothing (`[tls]`, `[auth]`,
    /// `[unix_sockets]`).
    fn apply_top_level(&self, config: &mut Config) {
        if let Some(a) = &self.grpc_addr {
            config.grpc_addr = a.clone();
        }
        if let Some(a) = &self.jsonrpc_addr {
            config.jsonrpc_addr = a.clone();
        }
        if let Some(u) = &self.unix_sockets {
            config.unix_sockets = u.clone();
        }
        if self.metrics_addr.is_some() {
            config.metrics_addr = self.metrics_addr;
        }
        if let Some(f) = self.log_format {
            config.log_format = f;
        }
        if let Some(ms) = self.discover_interval_ms {
            config.discover_interval = std::time::Duration::from_millis(ms);
        }
        if self.libvirt.is_some() {
            config.libvirt = self.libvirt.clone();
        }
        if let Some(owners) = &self.discover_owners {
            config.discover_owners = owners.clone();
        }
        if self.discover_proxmox.is_some() {
            config.discover_proxmox = self.discover_proxmox.clone();
        }
        if let Some(c) = self.coalesce_reads {
            config.coalesce_reads = c;
        }
        if let Some(a) = self.allow_insecure_tcp {
            config.allow_insecure_tcp = a;
        }
        if self.audit_log.is_some() {
            config.audit_log = self.audit_log.clone();
        }
        if let Some(dir) = &self.state_dir {
            config.state_dir = dir.clone();
        }
        if self.tls.is_some() {
            config.tls = self.tls.clone();
        }
        if self.auth.is_some() {
            config.auth = self.auth.clone();
        }
    }
}
