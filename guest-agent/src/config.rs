//! Command line and config file, with qemu-ga's names so that `qga-agent` can replace
//! `qemu-ga` in a unit file or init script unchanged.
//!
//! The config file (default `/etc/qemu/qemu-ga.conf`) is a GLib key file; its `[general]`
//! section takes the long option names as keys (`method=`, `path=`, `block-rpcs=a;b`,
//! `verbose=true`, ...) plus our own `online-type=`, `sysfs-root=` and `procfs-root=`. The command line
//! overrides the file.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::Parser;
use qga_wire::codec::DEFAULT_MAX_MESSAGE;

use crate::{
    commands::{CommandFilter, CommandName},
    sysfs::OnlineType,
    transport::{Channel, Method},
};

/// The default config file, as qemu-ga reads it.
pub const DEFAULT_CONFIG: &str = "/etc/qemu/qemu-ga.conf";

/// `qga-agent` command line.
#[derive(Debug, Parser, Default)]
#[command(
    name = "qga-agent",
    version,
    args_override_self = true,
    about = "QEMU Guest Agent for memory-block hotplug (a drop-in for qemu-ga's memory-block commands)"
)]
pub struct Cli {
    /// Transport method: virtio-serial (default), unix-listen, vsock-listen, isa-serial.
    #[arg(short = 'm', long, value_enum)]
    pub method: Option<Method>,
    /// Device or socket path (vsock-listen: CID:PORT).
    #[arg(short = 'p', long)]
    pub path: Option<String>,
    /// Log to this file instead of stderr.
    #[arg(short = 'l', long)]
    pub logfile: Option<PathBuf>,
    /// Pid file (default /var/run/qemu-ga.pid).
    #[arg(short = 'f', long)]
    pub pidfile: Option<PathBuf>,
    /// Accepted for compatibility; this agent has no fsfreeze commands.
    #[arg(short = 'F', long, num_args = 0..=1)]
    pub fsfreeze_hook: Option<Option<PathBuf>>,
    /// State directory (absolute; default /var/run). This agent keeps no state in it.
    #[arg(short = 't', long)]
    pub statedir: Option<PathBuf>,
    /// Log extra debugging information.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Become a daemon.
    #[arg(short = 'd', long)]
    pub daemonize: bool,
    /// Comma-separated list of RPCs to disable ("help" lists them).
    #[arg(short = 'b', long)]
    pub block_rpcs: Option<String>,
    /// Comma-separated list of RPCs to enable; all others are disabled.
    #[arg(short = 'a', long)]
    pub allow_rpcs: Option<String>,
    /// Print a config file for the current options and exit.
    #[arg(short = 'D', long)]
    pub dump_conf: bool,
    /// Keep reopening the channel when it is unavailable or fails.
    #[arg(short = 'r', long)]
    pub retry_path: bool,
    /// Config file (default /etc/qemu/qemu-ga.conf; missing is fine).
    #[arg(short = 'c', long)]
    pub config: Option<PathBuf>,
    /// What to write to a block's `state` to online it: online (the kernel picks the
    /// zone, like qemu-ga), online_movable (can be offlined and unplugged again) or
    /// online_kernel.
    #[arg(long, value_enum)]
    pub online_type: Option<OnlineType>,
    /// Root of sysfs (tests point this at a fake tree).
    #[arg(long)]
    pub sysfs_root: Option<PathBuf>,
    /// Root of procfs, where memory stats are read (tests point this at a fake tree).
    #[arg(long)]
    pub procfs_root: Option<PathBuf>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file exists but cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key has a value we cannot use.
    #[error("config file {path}: bad value '{value}' for '{key}'")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Its value.
        value: String,
    },
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Transport.
    pub method: Method,
    /// Path for the transport, `None` for its default.
    pub path: Option<String>,
    /// Log file, `None` for stderr.
    pub logfile: Option<PathBuf>,
    /// Pid file.
    pub pidfile: PathBuf,
    /// State directory.
    pub statedir: PathBuf,
    /// Debug logging.
    pub verbose: bool,
    /// Fork into the background.
    pub daemonize: bool,
    /// Disabled commands.
    pub block_rpcs: Vec<String>,
    /// Enabled commands, when restricted.
    pub allow_rpcs: Option<Vec<String>>,
    /// Reopen the channel on failure.
    pub retry_path: bool,
    /// Word written to online blocks.
    pub online_type: OnlineType,
    /// Root of sysfs.
    pub sysfs_root: PathBuf,
    /// Root of procfs.
    pub procfs_root: PathBuf,
    /// Largest request, bytes.
    pub max_message: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            method: Method::VirtioSerial,
            path: None,
            logfile: None,
            pidfile: PathBuf::from("/var/run/qemu-ga.pid"),
            statedir: PathBuf::from("/var/run"),
            verbose: false,
            daemonize: false,
            block_rpcs: Vec::new(),
            allow_rpcs: None,
            retry_path: false,
            online_type: OnlineType::Online,
            sysfs_root: PathBuf::from("/sys"),
            procfs_root: PathBuf::from("/proc"),
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// Splits an RPC list; accepts qemu-ga's `,` on the command line and `;` in key files.
pub fn split_list(s: &str) -> Vec<String> {
    s.split([',', ';'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

impl Config {
    /// The configuration from `cli`, over the config file it names (or the default one).
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        let (path, required) = match &cli.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => config.apply_file(&path, &text)?,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Read { path, source }),
        }
        config.apply_cli(cli);
        Ok(config)
    }

    /// Applies the `[general]` section of a key file.
    pub fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let mut in_general = false;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                in_general = line == "[general]";
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if !in_general {
                continue;
            }
            let (key, value) = (key.trim(), value.trim());
            let bad = || ConfigError::BadValue {
                path: path.to_path_buf(),
                key: key.to_string(),
                value: value.to_string(),
            };
            match key {
                "method" => self.method = Method::parse(value).ok_or_else(bad)?,
                "path" => self.path = Some(value.to_string()),
                "logfile" => self.logfile = Some(PathBuf::from(value)),
                "pidfile" => self.pidfile = PathBuf::from(value),
                "statedir" => self.statedir = PathBuf::from(value),
                "verbose" => self.verbose = parse_bool(value).ok_or_else(bad)?,
                "daemon" | "daemonize" => self.daemonize = parse_bool(value).ok_or_else(bad)?,
                "retry-path" => self.retry_path = parse_bool(value).ok_or_else(bad)?,
                "block-rpcs" => self.block_rpcs = split_list(value),
                "allow-rpcs" => self.allow_rpcs = Some(split_list(value)),
                "online-type" => self.online_type = OnlineType::parse(value).ok_or_else(bad)?,
                "sysfs-root" => self.sysfs_root = PathBuf::from(value),
                "procfs-root" => self.procfs_root = PathBuf::from(value),
                // Keys of qemu-ga features this agent does not have (fsfreeze-hook, ...).
                other => tracing::debug!(key = other, "ignoring config key"),
            }
        }
        Ok(())
    }

    fn apply_cli(&mut self, cli: &Cli) {
        if let Some(m) = cli.method {
            self.method = m;
        }
        if let Some(p) = &cli.path {
            self.path = Some(p.clone());
        }
        if let Some(l) = &cli.logfile {
            self.logfile = Some(l.clone());
        }
        if let Some(p) = &cli.pidfile {
            self.pidfile = p.clone();
        }
        if let Some(t) = &cli.statedir {
            self.statedir = t.clone();
        }
        self.verbose |= cli.verbose;
        self.daemonize |= cli.daemonize;
        self.retry_path |= cli.retry_path;
        if let Some(b) = &cli.block_rpcs {
            self.block_rpcs = split_list(b);
        }
        if let Some(a) = &cli.allow_rpcs {
            self.allow_rpcs = Some(split_list(a));
        }
        if let Some(o) = cli.online_type {
            self.online_type = o;
        }
        if let Some(s) = &cli.sysfs_root {
            self.sysfs_root = s.clone();
        }
        if let Some(p) = &cli.procfs_root {
            self.procfs_root = p.clone();
        }
    }

    /// The command filter from `block-rpcs` and `allow-rpcs`.
    pub fn filter(&self) -> CommandFilter {
        CommandFilter::new(&self.block_rpcs, self.allow_rpcs.as_deref())
    }

    /// The channel settings.
    pub fn channel(&self) -> Channel {
        Channel {
            method: self.method,
            path: self.path.clone(),
            retry: self.retry_path,
            max_message: self.max_message,
            sysfs_root: self.sysfs_root.clone(),
        }
    }

    /// A key file equivalent to this configuration (`--dump-conf`).
    pub fn dump(&self) -> String {
        let mut s = String::from("[general]\n");
        let _ = writeln!(s, "daemon={}", self.daemonize);
        let _ = writeln!(s, "method={}", self.method.as_str());
        if let Some(p) = &self.path {
            let _ = writeln!(s, "path={p}");
        }
        if let Some(l) = &self.logfile {
            let _ = writeln!(s, "logfile={}", l.display());
        }
        let _ = writeln!(s, "pidfile={}", self.pidfile.display());
        let _ = writeln!(s, "statedir={}", self.statedir.display());
        let _ = writeln!(s, "verbose={}", self.verbose);
        let _ = writeln!(s, "retry-path={}", self.retry_path);
        if !self.block_rpcs.is_empty() {
            let _ = writeln!(s, "block-rpcs={};", self.block_rpcs.join(";"));
        }
        if let Some(a) = &self.allow_rpcs {
            let _ = writeln!(s, "allow-rpcs={};", a.join(";"));
        }
        let _ = writeln!(s, "online-type={}", self.online_type.as_str());
        let _ = writeln!(s, "sysfs-root={}", self.sysfs_root.display());
        let _ = writeln!(s, "procfs-root={}", self.procfs_root.display());
        s
    }
}

/// The text of `-b help`: one RPC per line.
pub fn rpc_list() -> String {
    CommandName::ALL
        .into_iter()
        .map(|c| format!("{}\n", c.name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_cli() {
        let mut c = Config::default();
        let text = "# comment\n[general]\nmethod=unix-listen\npath=/tmp/x.sock\nblock-rpcs=guest-ping;guest-info;\nverbose=true\nonline-type=online_movable\nprocfs-root=/fake/proc\nfsfreeze-hook=/x\n[other]\nmethod=bogus\n";
        c.apply_file(Path::new("f"), text).expect("valid file");
        assert_eq!(c.method, Method::UnixListen);
        assert_eq!(c.path.as_deref(), Some("/tmp/x.sock"));
        assert_eq!(c.block_rpcs, ["guest-ping", "guest-info"]);
        assert!(c.verbose);
        assert_eq!(c.online_type, OnlineType::OnlineMovable);
        assert_eq!(c.procfs_root, Path::new("/fake/proc"));
        let cli = Cli::parse_from([
            "qga-agent",
            "-m",
            "virtio-serial",
            "-b",
            "guest-sync",
            "--online-type",
            "online_kernel",
            "--procfs-root",
            "/other/proc",
        ]);
        c.apply_cli(&cli);
        assert_eq!(c.procfs_root, Path::new("/other/proc"));
        assert_eq!(c.method, Method::VirtioSerial);
        assert_eq!(c.block_rpcs, ["guest-sync"]);
        assert_eq!(c.online_type, OnlineType::OnlineKernel);
        // What we dump reads back the same.
        let mut again = Config::default();
        again
            .apply_file(Path::new("f"), &c.dump())
            .expect("dump parses");
        assert_eq!(again.dump(), c.dump());
    }

    #[test]
    fn bad_values_are_errors() {
        let mut c = Config::default();
        assert!(
            c.apply_file(Path::new("f"), "[general]\nonline-type=movable\n")
                .is_err()
        );
        assert!(
            c.apply_file(Path::new("f"), "[general]\nverbose=perhaps\n")
                .is_err()
        );
    }

    #[test]
    fn qemu_ga_flags_parse() {
        let cli = Cli::parse_from([
            "qga-agent",
            "-m",
            "unix-listen",
            "-p",
            "/s",
            "-l",
            "/log",
            "-f",
            "/pid",
            "-t",
            "/st",
            "-v",
            "-r",
            "-b",
            "guest-ping",
            "-F/hook",
        ]);
        assert_eq!(cli.method, Some(Method::UnixListen));
        assert_eq!(cli.fsfreeze_hook, Some(Some(PathBuf::from("/hook"))));
        assert!(cli.verbose && cli.retry_path);
    }
}
