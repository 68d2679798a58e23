//! What hotplug asks of the hypervisor, over QMP or through libvirt ([`Vmm`]): each
//! command under its own deadline (`hotplug.qmp_timeout_ms`, never past the
//! operation's), recorded as a step when it changes the VM, and with QEMU's or libvirt's
//! errors turned into the bridge's.

use std::time::Duration;

use qga_qmp::{Qmp, QmpError};
use tokio::{sync::broadcast, time::Instant};

use super::{Vmm, layout::DimmDevice, libvirt, ops::Ctx};
use crate::error::BridgeError;

/// QEMU's QMP client, or the early return of `$libvirt` for a libvirt domain.
macro_rules! qmp_or {
    ($ctx:expr, |$l:ident| $libvirt:expr) => {
        match &$ctx.vmm {
            Vmm::Qmp(qmp) => qmp,
            Vmm::Libvirt($l) => return $libvirt,
        }
    };
}

/// QEMU's error for `step` as the bridge reports it: unreachable QEMU is UNAVAILABLE, a
/// deadline DEADLINE_EXCEEDED, a refusal a failed step naming QEMU's reason.
fn error(ctx: &Ctx, step: &str, e: QmpError) -> BridgeError {
    match e {
        QmpError::Unavailable(reason) => BridgeError::Unavailable {
            vm: ctx.vm.clone(),
            reason: format!("QMP socket: {reason}"),
        },
        QmpError::Timeout { command } => BridgeError::DeadlineExceeded {
            vm: ctx.vm.clone(),
            command,
        },
        QmpError::Command { class, desc } => BridgeError::Hotplug {
            vm: ctx.vm.clone(),
            step: step.to_string(),
            reason: format!("QEMU refused it: {desc} ({class})"),
            blocks: Vec::new(),
        },
        QmpError::Protocol(reason) => BridgeError::BadReply {
            vm: ctx.vm.clone(),
            reason: format!("QMP: {reason}"),
        },
    }
}

fn deadline(ctx: &Ctx) -> Instant {
    (Instant::now() + Duration::from_millis(ctx.settings.qmp_timeout_ms)).min(ctx.deadline)
}

/// The VM's DIMMs (pc-dimm; NVDIMMs and other memory devices are not ours to move).
pub async fn dimms(ctx: &Ctx) -> Result<Vec<DimmDevice>, BridgeError> {
    let qmp = qmp_or!(ctx, |l| Ok(libvirt::memory(ctx, l).await?.dimms));
    let devices = qmp
        .query_memory_devices(deadline(ctx))
        .await
        .map_err(|e| error(ctx, "query-memory-devices", e))?;
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

/// Boot memory and plugged memory, bytes.
pub async fn memory_summary(ctx: &Ctx) -> Result<(u64, u64), BridgeError> {
    let qmp = qmp_or!(ctx, |l| {
        let m = libvirt::memory(ctx, l).await?;
        Ok((m.boot, m.dimms.iter().map(|d| d.size).sum()))
    });
    let s = qmp
        .query_memory_size_summary(deadline(ctx))
        .await
        .map_err(|e| error(ctx, "query-memory-size-summary", e))?;
    Ok((s.base_memory, s.plugged_memory.unwrap_or_default()))
}

/// The ids of every memory backend of ours; none under libvirt, which makes and deletes
/// DIMMs' backends itself.
pub async fn memdev_ids(ctx: &Ctx) -> Result<Vec<String>, BridgeError> {
    let qmp = qmp_or!(ctx, |_l| Ok(Vec::new()));
    Ok(qmp
        .query_memdev(deadline(ctx))
        .await
        .map_err(|e| error(ctx, "query-memdev", e))?
        .into_iter()
        .filter_map(|m| m.id)
        .collect())
}

/// Refuses a DIMM of `size` bytes that the VM has no slot or no room (maxmem) for, where
/// QEMU (7.1 and later) or libvirt tells the limits; older QEMU refuses at `device_add`.
pub async fn check_room(ctx: &Ctx, dimms: &[DimmDevice], size: u64) -> Result<(), BridgeError> {
    let (slots, max, boot) = match &ctx.vmm {
        Vmm::Libvirt(l) => {
            let m = libvirt::memory(ctx, l).await?;
            let Some(slots) = m.slots else {
                return Err(BridgeError::Hotplug {
                    vm: ctx.vm.clone(),
                    step: "check".into(),
                    reason: "the domain has no <maxMemory slots='N'>, so libvirt cannot plug \
                             memory into it; nothing was done"
                        .into(),
                    blocks: Vec::new(),
                });
            };
            (slots, m.max, Some(m.boot))
        }
        Vmm::Qmp(qmp) => match qmp.query_memory_config(deadline(ctx)).await {
            Ok(c) => (c.slots.unwrap_or_default(), c.max_size, c.size),
            Err(QmpError::Command { .. }) => return Ok(()),
            Err(e) => return Err(error(ctx, "qom-get", e)),
        },
    };
    let refuse = |reason: String| BridgeError::Hotplug {
        vm: ctx.vm.clone(),
        step: "check".into(),
        reason,
        blocks: Vec::new(),
    };
    if dimms.len() as u64 >= slots {
        return Err(refuse(format!(
            "all {slots} DIMM slots are taken (QEMU -m ...,slots=N; libvirt \
             <maxMemory slots='N'>); nothing was done"
        )));
    }
    if let (Some(max), Some(boot)) = (max, boot) {
        let plugged: u64 = dimms.iter().map(|d| d.size).sum();
        if boot + plugged + size > max {
            return Err(refuse(format!(
                "{size} more bytes would take the VM past its maximum memory ({max} bytes; \
                 it has {} now); nothing was done",
                boot + plugged
            )));
        }
    }
    Ok(())
}

/// The first `qga-dimmN` / `qga-memN` pair of ids that neither QEMU object uses.
fn free_ids(devices: &[DimmDevice], memdevs: &[String]) -> (String, String) {
    (0..)
        .map(|n| (format!("qga-dimm{n}"), format!("qga-mem{n}")))
        .find(|(d, m)| {
            !devices.iter().any(|x| &x.id == d || &x.memdev == m) && !memdevs.contains(m)
        })
        .unwrap_or_default()
}

/// Why a DIMM was not added.
#[derive(Debug)]
pub enum NotAdded {
    /// Refused: nothing was made.
    Refused(BridgeError),
    /// Failed or unanswered: the DIMM (device id) and its backend may exist.
    Unknown(BridgeError, String, String),
}

/// Adds a DIMM of `size` bytes on NUMA node `node` (`devices` and `memdevs`: what the VM
/// has now) and returns its device and backend ids: `object-add` and `device_add` over
/// QMP, one live attach through libvirt.
pub async fn add_dimm(
    ctx: &mut Ctx,
    devices: &[DimmDevice],
    memdevs: &[String],
    size: u64,
    node: Option<u32>,
) -> Result<(String, String), NotAdded> {
    if let Vmm::Libvirt(l) = &ctx.vmm {
        let l = l.clone();
        let alias = libvirt::attach(ctx, &l, devices, size, node).await?;
        return Ok((alias.clone(), format!("mem{alias}")));
    }
    let (dimm_id, mem_id) = free_ids(devices, memdevs);
    if let Err(e) = object_add(ctx, &mem_id, size).await {
        // QEMU refused: nothing was made. Lost or late: it may have been.
        return Err(if matches!(e, BridgeError::Hotplug { .. }) {
            NotAdded::Refused(e)
        } else {
            NotAdded::Unknown(e, dimm_id, mem_id)
        });
    }
    if let Err(e) = device_add(ctx, &dimm_id, &mem_id, node).await {
        return Err(NotAdded::Unknown(e, dimm_id, mem_id));
    }
    Ok((dimm_id, mem_id))
}

/// `object-add` of a RAM backend.
async fn object_add(ctx: &mut Ctx, id: &str, size: u64) -> Result<(), BridgeError> {
    let start = Instant::now();
    qmp(ctx)?
        .add_memory_backend_ram(id, size, deadline(ctx))
        .await
        .map_err(|e| error(ctx, "object-add", e))?;
    ctx.step(
        "object-add",
        start,
        format!("memory-backend-ram {id}, {size} bytes"),
    );
    Ok(())
}

/// `device_add` of a pc-dimm.
async fn device_add(
    ctx: &mut Ctx,
    id: &str,
    memdev: &str,
    node: Option<u32>,
) -> Result<(), BridgeError> {
    let start = Instant::now();
    qmp(ctx)?
        .add_pc_dimm(id, memdev, node, deadline(ctx))
        .await
        .map_err(|e| error(ctx, "device_add", e))?;
    ctx.step("device_add", start, format!("pc-dimm {id} on {memdev}"));
    Ok(())
}

/// `device_del` (libvirt: a live detach): asks the guest to eject the DIMM.
pub async fn device_del(ctx: &Ctx, id: &str) -> Result<(), BridgeError> {
    let qmp = qmp_or!(ctx, |l| libvirt::detach(ctx, l, id).await);
    qmp.device_del(id, deadline(ctx))
        .await
        .map_err(|e| error(ctx, "device_del", e))
}

/// `object-del` of a backend, tried again a few times: right after `DEVICE_DELETED` the
/// backend can still be in use for a moment. Nothing under libvirt, which deletes it.
pub async fn object_del(ctx: &Ctx, id: &str) -> Result<(), BridgeError> {
    let qmp = qmp_or!(ctx, |_l| Ok(()));
    let mut pause = Duration::from_millis(50);
    loop {
        match qmp.object_del(id, deadline(ctx)).await {
            Ok(()) => return Ok(()),
            Err(QmpError::Command { .. })
                if Instant::now() + pause < ctx.deadline && pause < Duration::from_secs(2) =>
            {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => return Err(error(ctx, "object-del", e)),
        }
    }
}

/// The QMP client of a VM that QEMU's QMP serves.
fn qmp(ctx: &Ctx) -> Result<Qmp, BridgeError> {
    match &ctx.vmm {
        Vmm::Qmp(q) => Ok(q.clone()),
        Vmm::Libvirt(_) => Err(BridgeError::Hotplug {
            vm: ctx.vm.clone(),
            step: "check".into(),
            reason: "a QMP command was about to be sent to a libvirt domain; nothing was done"
                .into(),
            blocks: Vec::new(),
        }),
    }
}

/// Whether an ACPI `_OST` status on an eject request is the guest's refusal: 1 (failure),
/// 2 (unrecognised) and 0x80-0x83 (ejection not supported, device in use, busy,
/// dependency busy). 0 is success and 0x84 "ejection in progress", which Linux reports
/// before every eject.
fn refused(status: i64) -> bool {
    matches!(status, 1 | 2 | 0x80..=0x83)
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

/// The events that tell how an eject ends: QEMU's `DEVICE_DELETED` and `ACPI_DEVICE_OST`,
/// or libvirt's device-removed and device-removal-failed. Subscribe before `device_del`.
#[derive(Debug)]
pub enum EjectWatch {
    /// QMP events.
    Qmp(broadcast::Receiver<qga_qmp::Event>),
    /// libvirt events.
    Libvirt(broadcast::Receiver<qga_libvirt::Event>),
}

impl EjectWatch {
    /// Starts listening for the events of `ctx`'s VM.
    pub fn new(ctx: &Ctx) -> Self {
        match &ctx.vmm {
            Vmm::Qmp(q) => Self::Qmp(q.events()),
            Vmm::Libvirt(l) => Self::Libvirt(l.libvirt.subscribe()),
        }
    }

    /// The next event's word on DIMM `dimm` of VM `vm`; `None` once no more can come.
    pub async fn next(&mut self, vm: &str, dimm: &str) -> Option<Ejection> {
        use broadcast::error::RecvError;
        match self {
            Self::Qmp(events) => match events.recv().await {
                Ok(e) => {
                    if e.device_deleted()
                        .is_some_and(|d| d.device.as_deref() == Some(dimm))
                    {
                        return Some(Ejection::Deleted);
                    }
                    Some(
                        match e
                            .acpi_device_ost()
                            .filter(|o| o.device.as_deref() == Some(dimm) && refused(o.status))
                        {
                            Some(ost) => Ejection::Refused(format!(
                                "the guest refused to eject the DIMM (ACPI _OST source {:#x}, \
                                 status {:#x})",
                                ost.source, ost.status
                            )),
                            None => Ejection::Other,
                        },
                    )
                }
                Err(RecvError::Lagged(_)) => Some(Ejection::Other),
                Err(RecvError::Closed) => None,
            },
            Self::Libvirt(events) => match events.recv().await {
                Ok(qga_libvirt::Event::DeviceRemoved { domain, alias })
                    if domain == vm && alias == dimm =>
                {
                    Some(Ejection::Deleted)
                }
                Ok(qga_libvirt::Event::DeviceRemovalFailed { domain, alias })
                    if domain == vm && alias == dimm =>
                {
                    Some(Ejection::Refused(
                        "the guest refused to eject the DIMM (libvirt: device removal failed)"
                            .into(),
                    ))
                }
                Ok(_) | Err(RecvError::Lagged(_)) => Some(Ejection::Other),
                Err(RecvError::Closed) => None,
            },
        }
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
