//! End-to-end harness: a real QEMU guest with memory hotplug, our bridge in front of it,
//! and the scenario both the tests and the docker compose run drive through the bridge.
//!
//! - [`image`]: builds (or reuses) the guest kernel and initramfs.
//! - [`qmp`]: a small QMP client (hot-add and unplug DIMMs).
//! - [`guest`]: [`guest::GuestControl`] talks to a running guest's QMP and control
//!   sockets; [`guest::Guest`] also owns the QEMU process (boot, restart, clean-up).
//! - [`libvirt`]: libvirtd (started when not running) and the guest as a transient libvirt
//!   domain.
//! - [`bridge`]: the `qga-bridge` binary as a process, and clients for both APIs.
//! - [`scenario`]: the memory hotplug scenario, step by step, with timings.
//! - [`wait`]: polling a condition within a generous bound instead of sleeping.

pub mod bridge;
pub mod guest;
pub mod image;
pub mod libvirt;
pub mod qmp;
pub mod scenario;
pub mod wait;
