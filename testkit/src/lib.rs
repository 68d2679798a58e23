//! Test support shared by the agent, bridge, end-to-end tests and benchmarks.
//!
//! - [`FakeSysfs`]: a fake `/sys/devices/system/memory` tree in a temporary directory.
//! - [`AgentProcess`]: our `qga-agent` or the reference `qemu-ga` serving such a tree on
//!   a unix socket (the reference through a bind mount in a private mount namespace).
//! - [`QgaClient`]: a blocking QGA client over a unix socket, using the real codec.
//! - [`BridgeProcess`]: the `qga-bridge` binary on free loopback ports.
//! - [`bin_path`]: where a workspace binary is, building it if needed.
//! - [`qmp::FakeQmp`]: a scripted QEMU monitor on a unix socket.
//! - [`Pipes`]: in-memory connections for a client under test (the QMP client, the
//!   bridge's sessions), with [`PipeEnds`] the test's side of them.

mod agent;
mod bridge;
mod certs;
mod client;
mod pipes;
pub mod qmp;
mod sysfs;

pub use agent::{AgentKind, AgentProcess, bin_path};
pub use bridge::BridgeProcess;
pub use certs::Certs;
pub use client::QgaClient;
pub use pipes::{PipeEnds, Pipes};
pub use sysfs::{FakeSysfs, Node};
