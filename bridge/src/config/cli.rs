//! The command line: the flags, and how they go over the file.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Parser;
use serde::Deserialize;

use super::{Config, ConfigError, Listen, TlsConfig, VmConfig, vm::toml_key};
use crate::names::validate_vm_name;

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
    /// TOML config file (see docs/bridge.md); flags override it.
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
pub(super) const DEFAULT_PROXMOX_DIR: &str = "/var/run/qemu-server";

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

impl Cli {
    /// The flags over `config` (the file's, or the defaults): a flag replaces its key;
    /// `--discover`, `--allowed-host` and `--allowed-origin` add to theirs; `--vm`
    /// replaces the agent socket of a VM the file gives (keeping its other settings).
    pub(super) fn apply(&self, config: &mut Config) -> Result<(), ConfigError> {
        self.apply_servers(config);
        self.apply_discovery(config);
        self.apply_vms(config)
    }

    /// Listeners, TLS, HTTP checks, logs and the state directory.
    fn apply_servers(&self, config: &mut Config) {
        if let Some(a) = &self.grpc_addr {
            config.grpc_addr = a.clone();
        }
        if let Some(a) = &self.jsonrpc_addr {
            config.jsonrpc_addr = a.clone();
        }
        if self.metrics_addr.is_some() {
            config.metrics_addr = self.metrics_addr;
        }
        if let Some(f) = self.log_format {
            config.log_format = f;
        }
        config.allow_insecure_tcp |= self.allow_insecure_tcp;
        if self.audit_log.is_some() {
            config.audit_log = self.audit_log.clone();
        }
        if let Some(dir) = &self.state_dir {
            config.state_dir = dir.clone();
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            });
        }
        let http = &mut config.http;
        http.allowed_hosts
            .extend(self.allowed_hosts.iter().cloned());
        http.allowed_origins
            .extend(self.allowed_origins.iter().cloned());
    }

    /// Discovery and libvirt.
    fn apply_discovery(&self, config: &mut Config) {
        config.discover.extend(self.discover.iter().cloned());
        if self.libvirt.is_some() {
            config.libvirt = self.libvirt.clone();
        }
        if !self.discover_owners.is_empty() {
            config.discover_owners = self.discover_owners.clone();
        }
        if self.discover_proxmox.is_some() {
            config.discover_proxmox = self.discover_proxmox.clone();
        }
    }

    /// `--vm` and `--qmp`; a QMP socket needs its VM's agent socket.
    fn apply_vms(&self, config: &mut Config) -> Result<(), ConfigError> {
        for (name, socket) in &self.vms {
            config
                .vms
                .entry(name.clone())
                .and_modify(|vm| vm.qga = socket.clone())
                .or_insert_with(|| VmConfig::agent(socket.clone()));
        }
        for (name, socket) in &self.qmp {
            let Some(vm) = config.vms.get_mut(name) else {
                return Err(ConfigError::invalid(
                    flag("--qmp", name, socket),
                    format!(
                        "VM '{name}' has a QMP socket but no agent socket: give it with --vm \
                         or [vms]"
                    ),
                ));
            };
            vm.qmp = Some(socket.clone());
        }
        Ok(())
    }

    /// How the user gave a setting: `flag` when the command line did (`by_flag`), else
    /// the file's `key`.
    pub(super) fn given_as(by_flag: bool, flag: &str, key: &str) -> String {
        if by_flag { flag } else { key }.to_string()
    }

    /// How VM `name` was given: `--vm NAME=SOCKET`, or `vms.NAME`.
    pub(super) fn vm_key(&self, name: &str) -> String {
        match self.vms.iter().find(|(n, _)| n == name) {
            Some((_, socket)) => flag("--vm", name, socket),
            None => format!("vms.{}", toml_key(name)),
        }
    }

    /// How QMP socket `socket` of VM `name` was given: `--qmp NAME=SOCKET`, or
    /// `vms.NAME.qmp`.
    pub(super) fn qmp_key(&self, name: &str, socket: &Path) -> String {
        if self.qmp.iter().any(|(n, s)| n == name && s == socket) {
            flag("--qmp", name, socket)
        } else {
            format!("vms.{}.qmp", toml_key(name))
        }
    }
}

/// `--FLAG NAME=SOCKET`, as typed.
fn flag(flag: &str, name: &str, socket: &Path) -> String {
    format!("{flag} {name}={}", socket.display())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
