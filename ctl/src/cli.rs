//! The command line: global connection options and the commands, each with an example.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Examples, for `-h` and `--help`.
macro_rules! examples {
    () => {
        "\
Examples:
  qgactl vm list
  qgactl blocks vm1
  qgactl set vm1 32=online 33=offline
  qgactl memory layout vm1
  qgactl memory stats vm1
  qgactl memory plug vm1 512MiB
  qgactl memory unplug vm1 qga-dimm0
  qgactl memory resize vm1 2GiB
  qgactl --endpoint https://bridge:50051 --ca ca.pem --cert me.pem --key me.key vm list"
    };
}

/// Examples, exit codes and where settings come from, for `--help`.
const LONG_HELP: &str = concat!(
    examples!(),
    "

Exit codes:
  0        success
  1        a local error: unreadable config, certificate or key file, bad endpoint
  2        a usage error (unknown command or option, a bad size or block change)
  3        the call succeeded but the guest refused some block changes (set)
  20+CODE  the bridge answered gRPC status CODE, e.g. 23 INVALID_ARGUMENT, 25 NOT_FOUND,
           27 PERMISSION_DENIED, 28 RESOURCE_EXHAUSTED, 29 FAILED_PRECONDITION,
           30 ABORTED, 34 UNAVAILABLE (also: the bridge cannot be reached), 36 UNAUTHENTICATED

Settings come from, first to last: options, environment (QGACTL_ENDPOINT, QGACTL_CA,
QGACTL_CERT, QGACTL_KEY, QGACTL_SERVER_NAME, QGACTL_OUTPUT, QGA_TOKEN), the config file
(--config, QGACTL_CONFIG, or $XDG_CONFIG_HOME/qgactl/config.toml, by default
~/.config/qgactl/config.toml: endpoint, ca, cert, key, token, server_name, output)."
);

/// The operator's client of qga-bridge: VMs, memory blocks and memory hotplug.
#[derive(Debug, Parser)]
#[command(name = "qgactl", version, after_help = examples!(), after_long_help = LONG_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// How to print results.
    #[arg(long, short, global = true, value_enum, env = "QGACTL_OUTPUT")]
    pub output: Option<Output>,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the bridge is and how to prove who we are.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// The bridge's gRPC endpoint: https://HOST:PORT, http://127.0.0.1:PORT or unix:/PATH.
    #[arg(long, global = true, env = "QGACTL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// CA certificate (PEM) the bridge's certificate must chain to (https).
    #[arg(long, global = true, env = "QGACTL_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "QGACTL_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "QGACTL_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Bearer token, sent as `authorization: Bearer TOKEN`.
    #[arg(long, global = true, env = "QGA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The name the bridge's certificate must carry, when it is not the endpoint's host.
    #[arg(long, global = true, env = "QGACTL_SERVER_NAME")]
    pub server_name: Option<String>,
    /// The config file (default: $XDG_CONFIG_HOME/qgactl/config.toml).
    #[arg(long, global = true, env = "QGACTL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Give up on a call after this many seconds (default: the bridge's own limits).
    #[arg(long, global = true, value_name = "SECONDS")]
    pub timeout: Option<f64>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Tables and sentences for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// VMs the bridge serves.
    #[command(subcommand)]
    Vm(VmCommand),
    /// A VM's memory blocks: index, state, zone, whether it can be offlined.
    #[command(after_help = "Example: qgactl blocks vm1")]
    Blocks {
        /// The VM.
        vm: String,
    },
    /// The guest's memory block size.
    #[command(after_help = "Example: qgactl block-info vm1")]
    BlockInfo {
        /// The VM.
        vm: String,
    },
    /// Onlines and offlines memory blocks: INDEX=online or INDEX=offline.
    #[command(after_help = "Example: qgactl set vm1 32=online 33=offline")]
    Set {
        /// The VM.
        vm: String,
        /// Block changes, in order.
        #[arg(required = true, value_parser = parse_change)]
        changes: Vec<(u64, bool)>,
    },
    /// Memory: layout, the guest's stats, plug, unplug, resize.
    #[command(subcommand)]
    Memory(MemoryCommand),
    /// Prints a shell completion script.
    #[command(after_help = "Example: qgactl completions bash > /etc/bash_completion.d/qgactl")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// VM commands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Lists the VMs you may see, with their agent channel's state.
    #[command(after_help = "Example: qgactl vm list")]
    List,
}

/// Memory hotplug commands.
#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// Boot memory, each DIMM with its blocks and zones, and totals.
    #[command(after_help = "Example: qgactl memory layout vm1")]
    Layout {
        /// The VM.
        vm: String,
    },
    /// The guest's memory as its agent sees it (sizes, pressure, distress counters) and
    /// the host's totals, each with its age.
    #[command(after_help = "Example: qgactl memory stats vm1\n\
                            Pressure (PSI) is the percent of wall time some or all tasks \
                            stalled on memory over 10 s, 60 s and 300 s.")]
    Stats {
        /// The VM.
        vm: String,
    },
    /// Plugs a DIMM and onlines its blocks (movable by default, so it can come out again).
    #[command(after_help = "Example: qgactl memory plug vm1 512MiB --node 0")]
    Plug {
        /// The VM.
        vm: String,
        /// How much: bytes or 512MiB, 1GiB, ...
        #[arg(value_parser = parse_size)]
        size: u64,
        /// NUMA node of the DIMM.
        #[arg(long)]
        node: Option<u32>,
        /// How the blocks are onlined.
        #[arg(long, value_enum)]
        online_type: Option<OnlineType>,
        #[command(flatten)]
        request: RequestId,
    },
    /// Offlines a DIMM's blocks and unplugs it.
    #[command(after_help = "Example: qgactl memory unplug vm1 qga-dimm0")]
    Unplug {
        /// The VM.
        vm: String,
        /// The DIMM's id, as `memory layout` shows it.
        dimm: String,
        #[command(flatten)]
        request: RequestId,
    },
    /// Plugs or unplugs DIMMs until the VM has SIZE in all, boot memory included.
    #[command(after_help = "Example: qgactl memory resize vm1 2GiB")]
    Resize {
        /// The VM.
        vm: String,
        /// The VM's memory in all: bytes or 2GiB, ...
        #[arg(value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        request: RequestId,
    },
    /// Sets the memory the guest may use with its virtio balloon: TARGET in all (boot,
    /// DIMMs and virtio-mem, less the balloon); answers once QEMU's balloon is there.
    #[command(after_help = "Example: qgactl memory balloon vm1 768MiB")]
    Balloon {
        /// The VM.
        vm: String,
        /// The memory the guest may use: bytes or 768MiB, 2GiB, ... (a multiple of 1 MiB)
        #[arg(value_parser = parse_size)]
        target: u64,
        #[command(flatten)]
        request: RequestId,
    },
}

/// A request id, so a retry of the same operation gets its first outcome.
#[derive(Debug, Clone, Args)]
pub struct RequestId {
    /// The operation's request id; one is generated (and printed) when not given. Retry a
    /// failed call with the same id: the bridge answers the first outcome, never acts twice.
    #[arg(long)]
    pub request_id: Option<String>,
}

/// The zone new blocks go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnlineType {
    /// ZONE_MOVABLE: the memory can be unplugged again (the default).
    OnlineMovable,
    /// The kernel picks (usually ZONE_NORMAL: the DIMM cannot come out).
    Online,
    /// ZONE_NORMAL.
    OnlineKernel,
}

fn parse_size(text: &str) -> Result<u64, String> {
    crate::size::parse(text).map_err(|e| e.to_string())
}

/// `32=online` -> (32, true); `33=offline` -> (33, false).
pub fn parse_change(text: &str) -> Result<(u64, bool), String> {
    let bad = || format!("'{text}' is not INDEX=online or INDEX=offline");
    let (index, state) = text.split_once('=').ok_or_else(bad)?;
    let index = index.trim().parse().map_err(|_| bad())?;
    match state.trim() {
        "online" => Ok((index, true)),
        "offline" => Ok((index, false)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_changes() {
        assert_eq!(parse_change("32=online"), Ok((32, true)));
        assert_eq!(parse_change("33=offline"), Ok((33, false)));
        for bad in ["32", "x=online", "32=on", "=online", "-1=offline"] {
            assert!(parse_change(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn resize_takes_the_vm_first() {
        let cli =
            Cli::try_parse_from(["qgactl", "memory", "resize", "vm1", "2GiB"]).expect("parses");
        match cli.command {
            Command::Memory(MemoryCommand::Resize { vm, size, .. }) => {
                assert_eq!((vm.as_str(), size), ("vm1", 2 << 30));
            }
            other => panic!("{other:?}"),
        }
    }
}
