//! `qga-agent`: the in-guest half of qga-bridge, a QEMU Guest Agent for memory hotplug.
//!
//! It speaks QGA (see `qga-wire`) on the virtio-serial port and implements the
//! memory-block commands on `/sys/devices/system/memory`, with qemu-ga's flags and
//! replies, so any QGA host works with it.
//!
//! - [`config`]: qemu-ga's command line and config file, plus `--online-type`.
//! - [`transport`]: virtio-serial (no spinning while no host is connected), isa-serial,
//!   unix-listen and vsock-listen; [`fd_stream`]: a descriptor as a tokio stream that
//!   waits, not spins, once a hung-up virtio port has a host again.
//! - [`server`]: the request loop, one request at a time, a fresh parser per connection.
//! - [`commands`]: dispatch and reply encoding; [`args`]: argument validation. Besides
//!   QGA's commands, five downstream extensions: `__org.qga-bridge_get-memory-zones` (each
//!   block's zones and the kernel's auto-online policy), `__org.qga-bridge_set-memory-blocks`
//!   (onlining with a per-call `online-type`), `__org.qga-bridge_online-when-present`
//!   ([`present`]: waiting for a DIMM's blocks on the kernel's [`uevent`]s and onlining each
//!   as it appears), `__org.qga-bridge_set-auto-online` (the kernel's `auto_online_blocks`)
//!   and `__org.qga-bridge_get-memory-stats` ([`procfs`]: the guest's memory signals).
//! - [`sysfs`]: the memory-block tree: a fast parallel scan and ordered state writes.
//! - [`procfs`]: `meminfo`, memory pressure, `vmstat`, uptime and boot id, read with
//!   bounded cost.

pub mod args;
pub mod commands;
pub mod config;
pub mod fd_stream;
pub mod present;
pub mod procfs;
pub mod server;
pub mod sysfs;
pub mod transport;
pub mod uevent;

pub use commands::{Agent, Command, CommandFilter, CommandName};
pub use config::{Cli, Config};
pub use procfs::ProcFs;
pub use sysfs::{MemoryTree, OnlineType, StateWriter};
