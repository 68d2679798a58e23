//! The hypervisor side of memory hotplug: a [`MemoryBackend`] lists a VM's DIMMs and
//! limits, adds and removes DIMMs and deletes their memory backends, and tells how an
//! eject ends. Implementations: [`qmp`] (QEMU's monitor) and [`libvirt`] (a domain libvirt
//! runs). They know nothing of operations: the hotplug layer sequences their calls with
//! the agent's, records steps and undoes what failed. The virtio balloon ([`balloon`])
//! is read and set through the same seam.
//!
//! Each call gets the operation's deadline and bounds its own command by the backend's
//! command timeout within it.

pub mod balloon;
pub mod libvirt;
pub mod qmp;

pub use balloon::{BalloonDevice, BalloonStats};

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Where a VM's memory backend comes from: the same source again keeps the backend (and
/// the VM's hotplug state with it).
#[derive(Debug, Clone)]
pub enum Source {
    /// A QMP socket, shared with other tools (released when idle) or not.
    Qmp {
        /// The socket.
        socket: PathBuf,
        /// Released when idle.
        shared: bool,
    },
    /// A libvirt domain run, through the bridge's libvirt connection.
    Libvirt {
        /// The connection.
        libvirt: Arc<qga_libvirt::Libvirt>,
        /// The domain run.
        dom: qga_libvirt::Dom,
    },
}

impl PartialEq for Source {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Qmp { socket, shared },
                Self::Qmp {
                    socket: s,
                    shared: sh,
                },
            ) => socket == s && shared == sh,
            (Self::Libvirt { libvirt, dom }, Self::Libvirt { libvirt: l, dom: d }) => {
                Arc::ptr_eq(libvirt, l) && dom == d
            }
            _ => false,
        }
    }
}

impl Eq for Source {}

/// What every backend is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Per-command time limits.
    pub timeouts: Timeouts,
    /// The largest message read from a QMP socket (`hotplug.max_qmp_bytes`).
    pub max_qmp_bytes: usize,
    /// Connecting to a QMP socket (`timeouts.connect_ms`).
    pub connect: Duration,
    /// A shared QMP socket is released after this long idle (`timeouts.shared_idle_ms`).
    pub shared_idle: Duration,
}

/// The backend of `source`. A new hypervisor is a module beside [`qmp`] and [`libvirt`]
/// and one arm here.
pub fn open(source: &Source, bounds: &Bounds) -> Arc<dyn MemoryBackend> {
    match source {
        Source::Qmp { socket, shared } => Arc::new(qmp::QmpBackend::new(socket, *shared, bounds)),
        Source::Libvirt { libvirt, dom } => Arc::new(libvirt::LibvirtBackend::new(
            libvirt.clone(),
            dom.clone(),
            bounds.timeouts,
        )),
    }
}

/// A DIMM as the hypervisor reports it: the one DIMM shape of the bridge, embedded in
/// the layout's [`crate::hotplug::layout::Dimm`] with the guest's view of its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DimmDevice {
    /// QEMU's device id, libvirt's alias (empty when QEMU has none).
    pub id: String,
    /// Guest physical address of its first byte.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// NUMA node.
    pub node: u32,
    /// Slot.
    pub slot: u32,
    /// The id of the memory backend object that holds its RAM.
    pub memdev: String,
    /// Plugged at run time rather than given on QEMU's command line.
    pub hotplugged: bool,
    /// QEMU's `hotpluggable`: whether it may be unplugged at all. Not in replies; a
    /// DIMM read back from the journal was plugged at run time, so it is.
    #[serde(skip_serializing, default = "hotpluggable")]
    pub hotpluggable: bool,
}

/// The default of [`DimmDevice::hotpluggable`] when read back.
fn hotpluggable() -> bool {
    true
}

impl DimmDevice {
    /// The block numbers the DIMM spans for `block_size`.
    pub fn block_range(&self, block_size: u64) -> std::ops::Range<u64> {
        let first = self.addr / block_size;
        first..first + self.size / block_size
    }
}

/// A virtio-mem device: a range of guest memory whose guest driver plugs and unplugs
/// `block_size` pieces of it until `plugged_size` is `requested_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VirtioMemDevice {
    /// QEMU's device id, libvirt's alias.
    pub id: String,
    /// Guest physical address of its range, where the hypervisor tells it (libvirt 9.0
    /// does not).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub addr: Option<u64>,
    /// NUMA node.
    pub node: u32,
    /// Its granularity, bytes (QEMU's `block-size`, libvirt's `<block>`).
    pub block_size: u64,
    /// The most it can plug, bytes (the range's length).
    pub max_size: u64,
    /// What the host asks the guest to have plugged, bytes.
    pub requested_size: u64,
    /// What the guest has plugged, bytes (QEMU's `size`, libvirt's `<current>`).
    pub plugged_size: u64,
    /// The id of the memory backend that holds its RAM (empty where libvirt manages it).
    pub memdev: String,
}

impl VirtioMemDevice {
    /// The guest's memory blocks its range covers (the guest adds them as it plugs);
    /// empty where its address is not known.
    pub fn block_range(&self, block_size: u64) -> std::ops::Range<u64> {
        match self.addr {
            Some(addr) if block_size > 0 => {
                let first = addr / block_size;
                first..first + self.max_size.div_ceil(block_size)
            }
            _ => 0..0,
        }
    }
}

/// Memory the VM booted with and memory plugged since, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize {
    /// Boot memory.
    pub boot: u64,
    /// In DIMMs, and what virtio-mem devices have plugged.
    pub plugged: u64,
}

/// How much memory a VM may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// DIMM slots in all.
    pub slots: u64,
    /// The most memory the VM may have, bytes, when known.
    pub max: Option<u64>,
    /// Boot memory, bytes, when known (for the maximum's arithmetic).
    pub boot: Option<u64>,
}

/// What deleting a memory backend did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The backend was deleted.
    Yes,
    /// There was no such backend.
    Absent,
    /// The hypervisor manages backends itself (libvirt deletes a DIMM's with it).
    NotOurs,
}

/// One step an operation took, as its reply lists them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Step {
    /// What it was (`object-add`, `device_add`, `wait-blocks`, `online`, ...).
    pub name: std::borrow::Cow<'static, str>,
    /// How long it took.
    pub duration_ms: f64,
    /// What it did, for a person reading the reply.
    pub detail: String,
}

impl Step {
    /// A step named `name` that started at `start` and ends now.
    pub fn since(name: &'static str, start: Instant, detail: String) -> Self {
        crate::fault::step_done(name);
        Self {
            name: name.into(),
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            detail,
        }
    }
}

/// Why a backend call failed, before the hotplug layer names the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The hypervisor cannot be reached (socket gone, libvirtd away, domain not running).
    #[error("{0}")]
    Unavailable(String),
    /// The hypervisor is busy with another job on the VM.
    #[error("{0}")]
    Busy(String),
    /// No answer to `command` in time.
    #[error("{command} timed out")]
    Timeout {
        /// The QMP command or libvirt call that was not answered.
        command: String,
    },
    /// The hypervisor refused `step`: nothing was done by it.
    #[error("{step}: {reason}")]
    Refused {
        /// The step (`object-add`, `attach-device`, `check`, ...).
        step: String,
        /// The hypervisor's reason.
        reason: String,
    },
    /// The hypervisor's answer could not be understood.
    #[error("{0}")]
    BadReply(String),
}

/// Why a DIMM was not added.
#[derive(Debug)]
pub enum NotAdded {
    /// Refused: nothing was made.
    Refused(BackendError),
    /// Failed or unanswered: the DIMM and its memory backend, under these ids, may exist.
    Unknown {
        /// What went wrong.
        error: BackendError,
        /// The DIMM's id.
        dimm: String,
        /// Its memory backend's id (empty where the hypervisor manages backends).
        memdev: String,
    },
}

/// A DIMM to add.
#[derive(Debug, Clone, Copy)]
pub struct NewDimm<'a> {
    /// The VM's DIMMs now, whose ids the new one must not take.
    pub dimms: &'a [DimmDevice],
    /// Bytes.
    pub size: u64,
    /// NUMA node (`None`: QEMU's or libvirt's default).
    pub node: Option<u32>,
    /// The operation's deadline.
    pub until: Instant,
}

/// A DIMM just added: its device id and its memory backend's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The DIMM's id.
    pub dimm: String,
    /// Its memory backend's id.
    pub memdev: String,
}

/// What an event says about a DIMM being ejected.
#[derive(Debug, PartialEq, Eq)]
pub enum Ejection {
    /// It is gone.
    Deleted,
    /// The guest refused, and why.
    Refused(String),
    /// Nothing about it.
    Other,
}

/// The events that tell how one DIMM's eject ends. Made before the removal is asked for,
/// so that no event is missed.
#[async_trait]
pub trait EjectWatch: Send {
    /// The next event's word on the DIMM; `None` once no more can come.
    async fn next(&mut self) -> Option<Ejection>;
}

/// Per-command time limits of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One command (`hotplug.hypervisor_timeout_ms`).
    pub command: Duration,
    /// Asking for an eject (`hotplug.eject_timeout_ms`); libvirt's detach may wait that
    /// long for the guest.
    pub eject: Duration,
}

impl Timeouts {
    /// The deadline of one command started now, never past `until`.
    pub fn command_until(&self, until: Instant) -> Instant {
        (Instant::now() + self.command).min(until)
    }
}

/// A VM's hypervisor, as memory hotplug uses it. See the module docs.
#[async_trait]
pub trait MemoryBackend: Send + Sync + std::fmt::Debug {
    /// The VM's DIMMs (pc-dimm; NVDIMMs and other memory devices are not ours to move).
    async fn dimms(&self, until: Instant) -> Result<Vec<DimmDevice>, BackendError>;

    /// Boot memory and memory in DIMMs.
    async fn memory(&self, until: Instant) -> Result<MemorySize, BackendError>;

    /// Slots and maximum memory; `None` where the hypervisor does not tell them (QEMU
    /// before 7.1, which refuses a DIMM too many at `device_add` instead).
    async fn room(&self, until: Instant) -> Result<Option<Room>, BackendError>;

    /// Memory backends this bridge made that no DIMM in `dimms` uses: left by a DIMM the
    /// guest ejected after its unplug had given up.
    async fn unused_backends(
        &self,
        dimms: &[DimmDevice],
        until: Instant,
    ) -> Result<Vec<String>, BackendError>;

    /// Deletes memory backend `memdev`; right after an eject it can still be in use for
    /// a moment, so a refusal is tried again for a short while.
    async fn delete_backend(&self, memdev: &str, until: Instant) -> Result<Deleted, BackendError>;

    /// Adds the DIMM `new` asks for, recording each step it takes in `steps`.
    async fn add_dimm(&self, new: NewDimm<'_>, steps: &mut Vec<Step>) -> Result<Added, NotAdded>;

    /// Asks the guest to eject DIMM `id`; how it ends comes through [`Self::watch`].
    async fn remove_dimm(&self, id: &str, until: Instant) -> Result<(), BackendError>;

    /// Starts listening for how DIMM `id`'s eject ends.
    fn watch(&self, id: &str) -> Box<dyn EjectWatch>;

    /// The VM's virtio-mem devices.
    async fn virtio_mem(&self, until: Instant) -> Result<Vec<VirtioMemDevice>, BackendError>;

    /// Asks the guest's driver behind virtio-mem device `id` to have `bytes` plugged; the
    /// device's plugged size follows as the guest plugs or unplugs.
    async fn set_requested_size(
        &self,
        id: &str,
        bytes: u64,
        until: Instant,
    ) -> Result<(), BackendError>;

    /// The VM's virtio balloon, if it has one. A backend that knows no balloon has none.
    async fn balloon(&self, until: Instant) -> Result<Option<BalloonDevice>, BackendError> {
        let _ = until;
        Ok(None)
    }

    /// QEMU's balloon `actual` alone, as cheaply as the hypervisor tells it (an operation
    /// reads it every few milliseconds while it waits); `None` without a balloon.
    async fn balloon_actual(&self, until: Instant) -> Result<Option<u64>, BackendError> {
        Ok(self.balloon(until).await?.map(|d| d.actual))
    }

    /// Asks the balloon to leave the guest `target` bytes of the logical VM size (QMP
    /// `balloon`, libvirt's live memory): the guest's driver inflates or deflates towards
    /// it and QEMU's `actual` follows. A VM without a balloon is refused.
    async fn set_balloon(&self, target: u64, until: Instant) -> Result<(), BackendError> {
        let _ = (target, until);
        Err(balloon::no_balloon())
    }

    /// The guest balloon driver's statistics, asking the hypervisor for them every
    /// `interval` seconds first where it does not yet (`None`: the VM has no balloon).
    async fn balloon_stats(
        &self,
        interval: u64,
        until: Instant,
    ) -> Result<Option<BalloonStats>, BackendError> {
        let _ = (interval, until);
        Ok(None)
    }
}
