//! [`MemoryBackend`] over QEMU's QMP monitor: a DIMM is a `memory-backend-ram` object
//! (`qga-memN`) and a `pc-dimm` device (`qga-dimmN`) on it; ejects end with
//! `DEVICE_DELETED`, or with an `ACPI_DEVICE_OST` refusal from the guest. The virtio
//! balloon is in [`balloon`].

mod balloon;

use std::{path::Path, time::Duration};

use async_trait::async_trait;
use qga_qmp::{Qmp, QmpError, QmpLimits};
use qga_wire::backoff::Backoff;
use tokio::{sync::broadcast, time::Instant};

use super::{
    Added, BackendError, BalloonDevice, BalloonStats, Bounds, Deleted, DimmDevice, EjectWatch,
    Ejection, MemoryBackend, MemorySize, NewDimm, NotAdded, Room, Step, Timeouts, VirtioMemDevice,
};

/// Prefix of the memory backends this bridge makes.
const MEMDEV_PREFIX: &str = "qga-mem";

/// A VM's QEMU, over its QMP socket.
#[derive(Debug, Clone)]
pub struct QmpBackend {
    qmp: Qmp,
    timeouts: Timeouts,
    /// The virtio balloon's QOM path, once found.
    balloon: balloon::Cache,
}

impl QmpBackend {
    /// A backend on QMP socket `socket`, connected on first use within `bounds`; a
    /// `shared` socket is released `bounds.shared_idle` after the last command, and held
    /// while an operation waits for an event.
    pub fn new(socket: &Path, shared: bool, bounds: &Bounds) -> Self {
        let limits = QmpLimits {
            max_message: bounds.max_qmp_bytes,
            connect_timeout: bounds.connect,
            idle_close: shared.then_some(bounds.shared_idle),
            ..QmpLimits::default()
        };
        Self {
            qmp: Qmp::new(socket.to_path_buf(), limits),
            timeouts: bounds.timeouts,
            balloon: balloon::Cache::default(),
        }
    }

    /// The ids of every memory backend.
    async fn memdev_ids(&self, until: Instant) -> Result<Vec<String>, BackendError> {
        Ok(self
            .qmp
            .query_memdev(self.timeouts.command_until(until))
            .await
            .map_err(|e| error("query-memdev", e))?
            .into_iter()
            .filter_map(|m| m.id)
            .collect())
    }

    /// `object-add` of a RAM backend.
    async fn object_add(&self, id: &str, size: u64, until: Instant) -> Result<Step, BackendError> {
        let start = Instant::now();
        self.qmp
            .add_memory_backend_ram(id, size, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("object-add", e))?;
        let detail = format!("memory-backend-ram {id}, {size} bytes");
        Ok(Step::since("object-add", start, detail))
    }

    /// `device_add` of a pc-dimm.
    async fn device_add(
        &self,
        id: &str,
        memdev: &str,
        node: Option<u32>,
        until: Instant,
    ) -> Result<Step, BackendError> {
        let start = Instant::now();
        self.qmp
            .add_pc_dimm(id, memdev, node, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("device_add", e))?;
        Ok(Step::since(
            "device_add",
            start,
            format!("pc-dimm {id} on {memdev}"),
        ))
    }
}

/// QEMU's error for `step`: unreachable QEMU, a timeout, a refusal naming QEMU's reason,
/// or an answer that is not QMP.
fn error(step: &str, e: QmpError) -> BackendError {
    match e {
        QmpError::Unavailable(reason) => BackendError::Unavailable(format!("QMP socket: {reason}")),
        QmpError::Timeout { command } => BackendError::Timeout { command },
        QmpError::Command { class, desc } => BackendError::Refused {
            step: step.to_string(),
            reason: format!("QEMU refused it: {desc} ({class})"),
        },
        QmpError::Protocol(reason) => BackendError::BadReply(format!("QMP: {reason}")),
    }
}

/// The first `qga-dimmN` / `qga-memN` pair of ids that neither QEMU object uses.
impl QmpBackend {
    /// `query-memory-devices`: DIMMs, virtio-mem devices and the rest.
    async fn memory_devices(
        &self,
        until: Instant,
    ) -> Result<Vec<qga_qmp::MemoryDevice>, BackendError> {
        self.qmp
            .query_memory_devices(self.timeouts.command_until(until))
            .await
            .map_err(|e| error("query-memory-devices", e))
    }
}

fn free_ids(devices: &[DimmDevice], memdevs: &[String]) -> (String, String) {
    (0..)
        .map(|n| (format!("qga-dimm{n}"), format!("{MEMDEV_PREFIX}{n}")))
        .find(|(d, m)| {
            !devices.iter().any(|x| &x.id == d || &x.memdev == m) && !memdevs.contains(m)
        })
        .unwrap_or_default()
}

#[async_trait]
impl MemoryBackend for QmpBackend {
    async fn dimms(&self, until: Instant) -> Result<Vec<DimmDevice>, BackendError> {
        let devices = self.memory_devices(until).await?;
        Ok(devices
            .iter()
            .filter_map(|d| d.as_dimm())
            .map(|d| DimmDevice {
                id: d.id.clone().unwrap_or_default(),
                addr: d.addr,
                size: d.size,
                node: u32::try_from(d.node).unwrap_or_default(),
                slot: u32::try_from(d.slot).unwrap_or_default(),
                memdev: d.memdev_id().to_string(),
                hotplugged: d.hotplugged,
                hotpluggable: d.hotpluggable,
            })
            .collect())
    }

    async fn memory(&self, until: Instant) -> Result<MemorySize, BackendError> {
        let s = self
            .qmp
            .query_memory_size_summary(self.timeouts.command_until(until))
            .await
            .map_err(|e| error("query-memory-size-summary", e))?;
        Ok(MemorySize {
            boot: s.base_memory,
            plugged: s.plugged_memory.unwrap_or_default(),
        })
    }

    async fn room(&self, until: Instant) -> Result<Option<Room>, BackendError> {
        match self
            .qmp
            .query_memory_config(self.timeouts.command_until(until))
            .await
        {
            Ok(c) => Ok(Some(Room {
                slots: c.slots.unwrap_or_default(),
                max: c.max_size,
                boot: c.size,
            })),
            // QEMU before 7.1 cannot be asked; it refuses at device_add instead.
            Err(QmpError::Command { .. }) => Ok(None),
            Err(e) => Err(error("qom-get", e)),
        }
    }

    async fn unused_backends(
        &self,
        dimms: &[DimmDevice],
        until: Instant,
    ) -> Result<Vec<String>, BackendError> {
        let memdevs = self.memdev_ids(until).await?;
        Ok(memdevs
            .into_iter()
            .filter(|m| m.starts_with(MEMDEV_PREFIX) && !dimms.iter().any(|d| &d.memdev == m))
            .collect())
    }

    async fn delete_backend(&self, memdev: &str, until: Instant) -> Result<Deleted, BackendError> {
        if !self.memdev_ids(until).await?.iter().any(|m| m == memdev) {
            return Ok(Deleted::Absent);
        }
        // Pauses of 50 ms doubling to 1.6 s: about 3 s of tries in all.
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let deleted = self
                .qmp
                .object_del(memdev, self.timeouts.command_until(until))
                .await;
            let wait = pause.peek();
            match deleted {
                Ok(()) => return Ok(Deleted::Yes),
                Err(QmpError::Command { .. })
                    if wait < Duration::from_secs(2) && Instant::now() + wait < until =>
                {
                    tokio::time::sleep(pause.next_wait()).await;
                }
                Err(e) => return Err(error("object-del", e)),
            }
        }
    }

    async fn add_dimm(&self, new: NewDimm<'_>, steps: &mut Vec<Step>) -> Result<Added, NotAdded> {
        let memdevs = self
            .memdev_ids(new.until)
            .await
            .map_err(NotAdded::Refused)?;
        let (dimm, memdev) = free_ids(new.dimms, &memdevs);
        let unknown = |error, dimm: &str, memdev: &str| NotAdded::Unknown {
            error,
            dimm: dimm.to_string(),
            memdev: memdev.to_string(),
        };
        match self.object_add(&memdev, new.size, new.until).await {
            Ok(step) => steps.push(step),
            // QEMU refused: nothing was made. Lost or late: it may have been.
            Err(e @ BackendError::Refused { .. }) => return Err(NotAdded::Refused(e)),
            Err(e) => return Err(unknown(e, &dimm, &memdev)),
        }
        match self.device_add(&dimm, &memdev, new.node, new.until).await {
            Ok(step) => steps.push(step),
            Err(e) => return Err(unknown(e, &dimm, &memdev)),
        }
        Ok(Added { dimm, memdev })
    }

    async fn remove_dimm(&self, id: &str, until: Instant) -> Result<(), BackendError> {
        self.qmp
            .device_del(id, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("device_del", e))
    }

    fn watch(&self, id: &str) -> Box<dyn EjectWatch> {
        Box::new(QmpEjectWatch {
            events: self.qmp.events(),
            dimm: id.to_string(),
        })
    }

    async fn virtio_mem(&self, until: Instant) -> Result<Vec<VirtioMemDevice>, BackendError> {
        let devices = self.memory_devices(until).await?;
        Ok(devices
            .iter()
            .filter_map(|d| d.as_virtio_mem())
            .map(|d| VirtioMemDevice {
                id: d.id.clone().unwrap_or_default(),
                addr: Some(d.memaddr),
                node: u32::try_from(d.node).unwrap_or_default(),
                block_size: d.block_size,
                max_size: d.max_size,
                requested_size: d.requested_size,
                plugged_size: d.size,
                memdev: d.memdev_id().to_string(),
            })
            .collect())
    }

    async fn set_requested_size(
        &self,
        id: &str,
        bytes: u64,
        until: Instant,
    ) -> Result<(), BackendError> {
        self.qmp
            .set_requested_size(id, bytes, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("qom-set", e))
    }

    async fn balloon(&self, until: Instant) -> Result<Option<BalloonDevice>, BackendError> {
        self.balloon_device(until).await
    }

    async fn balloon_actual(&self, until: Instant) -> Result<Option<u64>, BackendError> {
        self.query_actual(until).await
    }

    async fn set_balloon(&self, target: u64, until: Instant) -> Result<(), BackendError> {
        self.request_balloon(target, until).await
    }

    async fn balloon_stats(
        &self,
        interval: u64,
        until: Instant,
    ) -> Result<Option<BalloonStats>, BackendError> {
        self.guest_stats(interval, until).await
    }
}

/// Whether an ACPI `_OST` status on an eject request is the guest's refusal: 1 (failure),
/// 2 (unrecognised) and 0x80-0x83 (ejection not supported, device in use, busy,
/// dependency busy). 0 is success and 0x84 "ejection in progress", which Linux reports
/// before every eject.
fn refused(status: i64) -> bool {
    matches!(status, 1 | 2 | 0x80..=0x83)
}

/// QEMU's `DEVICE_DELETED` and `ACPI_DEVICE_OST` events about one DIMM.
struct QmpEjectWatch {
    events: broadcast::Receiver<qga_qmp::Event>,
    dimm: String,
}

#[async_trait]
impl EjectWatch for QmpEjectWatch {
    async fn next(&mut self) -> Option<Ejection> {
        let e = match self.events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(_)) => return Some(Ejection::Other),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        let ours = |device: &Option<String>| device.as_deref() == Some(self.dimm.as_str());
        if e.device_deleted().is_some_and(|d| ours(&d.device)) {
            return Some(Ejection::Deleted);
        }
        Some(
            match e
                .acpi_device_ost()
                .filter(|o| ours(&o.device) && refused(o.status))
            {
                Some(ost) => Ejection::Refused(format!(
                    "the guest refused to eject the DIMM (ACPI _OST source {:#x}, status {:#x})",
                    ost.source, ost.status
                )),
                None => Ejection::Other,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_skip_what_qemu_already_has() {
        let d = |id: &str, memdev: &str| DimmDevice {
            id: id.into(),
            addr: 0,
            size: 0,
            node: 0,
            slot: 0,
            memdev: memdev.into(),
            hotplugged: true,
            hotpluggable: true,
        };
        assert_eq!(
            free_ids(&[], &[]),
            ("qga-dimm0".to_string(), "qga-mem0".to_string())
        );
        let (dimm, mem) = free_ids(&[d("qga-dimm0", "x")], &["qga-mem1".to_string()]);
        assert_eq!((dimm.as_str(), mem.as_str()), ("qga-dimm2", "qga-mem2"));
    }

    #[test]
    fn eject_in_progress_is_not_a_refusal() {
        assert!(!refused(0) && !refused(0x84), "success, in progress");
        assert!(refused(1) && refused(0x81) && refused(0x83));
    }
}
