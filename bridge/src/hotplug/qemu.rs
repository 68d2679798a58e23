//! The QMP commands hotplug uses, each under its own deadline (`hotplug.qmp_timeout_ms`,
//! never past the operation's), recorded as a step when it changes the VM, and with
//! QEMU's errors turned into the bridge's.

use std::time::Duration;

use qga_qmp::QmpError;
use tokio::time::Instant;

use super::{layout::DimmDevice, ops::Ctx};
use crate::error::BridgeError;

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
    let devices = ctx
        .qmp
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
    let s = ctx
        .qmp
        .query_memory_size_summary(deadline(ctx))
        .await
        .map_err(|e| error(ctx, "query-memory-size-summary", e))?;
    Ok((s.base_memory, s.plugged_memory.unwrap_or_default()))
}

/// The ids of every memory backend.
pub async fn memdev_ids(ctx: &Ctx) -> Result<Vec<String>, BridgeError> {
    Ok(ctx
        .qmp
        .query_memdev(deadline(ctx))
        .await
        .map_err(|e| error(ctx, "query-memdev", e))?
        .into_iter()
        .filter_map(|m| m.id)
        .collect())
}

/// Refuses a DIMM of `size` bytes that QEMU has no slot or no room (maxmem) for, where
/// QEMU tells its limits (7.1 and later); older QEMU refuses at `device_add` instead.
pub async fn check_room(ctx: &Ctx, dimms: &[DimmDevice], size: u64) -> Result<(), BridgeError> {
    let config = match ctx.qmp.query_memory_config(deadline(ctx)).await {
        Ok(c) => c,
        Err(QmpError::Command { .. }) => return Ok(()),
        Err(e) => return Err(error(ctx, "qom-get", e)),
    };
    let refuse = |reason: String| BridgeError::Hotplug {
        vm: ctx.vm.clone(),
        step: "check".into(),
        reason,
        blocks: Vec::new(),
    };
    let slots = config.slots.unwrap_or_default();
    if dimms.len() as u64 >= slots {
        return Err(refuse(format!(
            "all {slots} DIMM slots are taken (QEMU -m ...,slots=N); nothing was done"
        )));
    }
    if let (Some(max), Some(boot)) = (config.max_size, config.size) {
        let plugged: u64 = dimms.iter().map(|d| d.size).sum();
        if boot + plugged + size > max {
            return Err(refuse(format!(
                "{size} more bytes would take the VM past maxmem ({max} bytes; it has \
                 {} now); nothing was done",
                boot + plugged
            )));
        }
    }
    Ok(())
}

/// `object-add` of a RAM backend.
pub async fn object_add(ctx: &mut Ctx, id: &str, size: u64) -> Result<(), BridgeError> {
    let start = Instant::now();
    ctx.qmp
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
pub async fn device_add(
    ctx: &mut Ctx,
    id: &str,
    memdev: &str,
    node: Option<u32>,
) -> Result<(), BridgeError> {
    let start = Instant::now();
    ctx.qmp
        .add_pc_dimm(id, memdev, node, deadline(ctx))
        .await
        .map_err(|e| error(ctx, "device_add", e))?;
    ctx.step("device_add", start, format!("pc-dimm {id} on {memdev}"));
    Ok(())
}

/// `device_del`: asks the guest to eject the DIMM.
pub async fn device_del(ctx: &Ctx, id: &str) -> Result<(), BridgeError> {
    ctx.qmp
        .device_del(id, deadline(ctx))
        .await
        .map_err(|e| error(ctx, "device_del", e))
}

/// `object-del` of a backend, tried again a few times: right after `DEVICE_DELETED` the
/// backend can still be in use for a moment.
pub async fn object_del(ctx: &Ctx, id: &str) -> Result<(), BridgeError> {
    let mut pause = Duration::from_millis(50);
    loop {
        match ctx.qmp.object_del(id, deadline(ctx)).await {
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
