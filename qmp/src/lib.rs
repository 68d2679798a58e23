//! An async client of QMP, the QEMU Machine Protocol, for the bridge's memory hotplug.
//!
//! QMP uses the same framing as QGA (a stream of JSON objects), so connections reuse
//! [`qga_wire::codec::QgaCodec`] with its size and nesting bounds. On connect QEMU sends a
//! greeting `{"QMP": {...}}`; nothing works until `qmp_capabilities` is answered. Every
//! request carries an `id` that QEMU echoes in its reply; events
//! (`{"event": ..., "data": ..., "timestamp": ...}`) arrive at any time between replies.
//!
//! - [`Qmp`]: the client. One background task per client owns the connection: it writes
//!   requests, routes replies to their callers by `id`, broadcasts events, drops the
//!   connection when QEMU floods it with frames that are no reply, and ends when the last
//!   handle is dropped. Connects lazily, reconnects on the next command after a loss, backs
//!   off after failed attempts. Every call is bounded by its caller's deadline.
//! - [`QmpError`]: unavailable, timed out, refused by QEMU, or an unusable reply.
//! - [`Event`] and [`wait_for_event`]: events, with typed views of `DEVICE_DELETED` and
//!   `ACPI_DEVICE_OST`.
//! - [`memory`]: typed memory-hotplug commands (`query-memory-devices`,
//!   `query-memory-size-summary`, `query-memdev`, `object-add`, `device_add`,
//!   `device_del`, `object-del`, and maxmem/slots from the machine's `memory` property).
//! - [`balloon`]: the virtio balloon (`query-balloon`, `balloon`) and the QOM commands
//!   (`qom-list`, `qom-get`, `qom-set`) that find it and read its properties and the
//!   guest driver's statistics.
//!
//! QEMU serves one client per QMP socket: the bridge needs a `-qmp` socket of its own
//! (QEMU takes several, e.g. `-qmp unix:/run/qga-bridge/VM.qmp,server=on,wait=off` besides
//! libvirt's or Proxmox's monitor), or it locks the other client out and is locked out by it
//! — unless it lets go between commands ([`QmpLimits::idle_close`]; events are then seen only
//! while a command runs or someone holds a receiver from [`Qmp::events`]).
//! The connection is anything a [`Connector`] opens, so the protocol is unit-tested over
//! in-memory pipes against a scripted QEMU (`tests.rs`), and against a real QEMU in
//! `tests/real_qemu.rs`.

pub mod balloon;
mod client;
mod conn;
mod error;
mod event;
pub mod memory;

#[cfg(test)]
mod tests;

pub use balloon::{BalloonInfo, BalloonPath, GuestStatValues, GuestStats, ObjectPropertyInfo};
pub use client::{Connector, Qmp, QmpLimits, QmpState, UnixConnector};
pub use error::QmpError;
pub use event::{AcpiOstInfo, DeviceDeleted, Event, wait_for_event};
pub use memory::{
    Memdev, MemoryDevice, MemorySizeConfiguration, MemorySizeSummary, PcDimmDeviceInfo,
    VersionInfo, VersionTriple, VirtioMemDeviceInfo,
};

use qga_wire::sync::lock;
