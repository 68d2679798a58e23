//! Resize: on a VM with virtio-mem devices, by changing their requested size alone
//! (`virtio_mem.rs`); otherwise unplug DIMMs newest first while the VM has more memory than asked, then plug
//! DIMMs of `hotplug.dimm_size_bytes` until it has what was asked — added together and onlined
//! together, so the guest brings them up in parallel.

use serde::{Deserialize, Serialize};

use super::{
    ctx::{Ctx, with_note},
    layout::Dimm,
    plug::plug_dimms,
    unplug::unplug,
    virtio_mem::{self, VirtioMemChange},
};
use crate::{
    backend::{DimmDevice, MemorySize},
    error::BridgeError,
};

/// What `resize` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Resized {
    /// Memory before, bytes.
    pub from_bytes: u64,
    /// Memory after, bytes.
    pub to_bytes: u64,
    /// DIMMs plugged, in order.
    pub plugged: Vec<Dimm>,
    /// DIMMs unplugged, in order.
    pub unplugged: Vec<Dimm>,
    /// virtio-mem devices resized (a VM with virtio-mem is resized with it alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio_mem: Vec<VirtioMemChange>,
}

impl Resized {
    /// What the VM has after this resize so far, for an error's reason.
    fn progress(&self) -> String {
        format!(
            "; the VM has {} bytes now ({} DIMMs plugged, {} unplugged by this resize)",
            self.to_bytes,
            self.plugged.len(),
            self.unplugged.len()
        )
    }
}

/// Unplugs DIMMs newest (highest address) first while the VM has more than `target`
/// bytes, then plugs DIMMs of `hotplug.dimm_size_bytes` (the last one smaller) until it has
/// `target`.
pub async fn resize(ctx: &mut Ctx, target: u64) -> Result<Resized, BridgeError> {
    let vmem = ctx.virtio_mem().await?;
    if !vmem.is_empty() {
        let MemorySize { boot, .. } = ctx.memory().await?;
        let dimms: u64 = ctx.dimms().await?.iter().map(|d| d.size).sum();
        let changed = virtio_mem::resize(ctx, target, boot + dimms, vmem).await?;
        return Ok(Resized {
            from_bytes: changed.from_bytes,
            to_bytes: changed.to_bytes,
            plugged: Vec::new(),
            unplugged: Vec::new(),
            virtio_mem: changed.devices,
        });
    }
    let block_size = ctx.block_size().await?;
    let MemorySize { boot, plugged } = ctx.memory().await?;
    check_target(ctx, target, boot, block_size)?;
    let from = boot + plugged;
    let mut done = Resized {
        from_bytes: from,
        to_bytes: from,
        plugged: Vec::new(),
        unplugged: Vec::new(),
        virtio_mem: Vec::new(),
    };
    let mut devices = ctx.dimms().await?;
    devices.retain(|d| !d.id.is_empty() && d.hotpluggable);
    devices.sort_by_key(|d| std::cmp::Reverse(d.addr));
    let removable: u64 = devices.iter().map(|d| d.size).sum();
    if from.saturating_sub(removable) > target {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} is below what the VM keeps without its hot-unpluggable DIMMs \
             ({} bytes: boot memory and memory devices the bridge cannot unplug)",
            from.saturating_sub(removable)
        )));
    }
    shrink(ctx, &mut done, &devices, target).await?;
    grow(ctx, &mut done, target).await?;
    if done.to_bytes != target {
        let reason = format!(
            "the VM has {} bytes, not {target}{}",
            done.to_bytes,
            done.progress()
        );
        return Err(ctx.hotplug_error("resize", reason));
    }
    Ok(done)
}

/// Refuses a target below the boot memory or off the guest's block size, and a
/// configured DIMM size the guest cannot use.
fn check_target(ctx: &Ctx, target: u64, boot: u64, block_size: u64) -> Result<(), BridgeError> {
    if target < boot {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} is below the boot memory ({boot} bytes), which cannot be unplugged"
        )));
    }
    if !(target - boot).is_multiple_of(block_size) {
        return Err(BridgeError::InvalidRequest(format!(
            "size {target} minus the boot memory ({boot} bytes) is not a multiple of the \
             guest's block size ({block_size} bytes)"
        )));
    }
    let dimm_size = ctx.settings.dimm_size_bytes;
    if !dimm_size.is_multiple_of(block_size) {
        return Err(ctx.hotplug_error(
            "check",
            format!(
                "hotplug.dimm_size_bytes ({dimm_size}) is not a multiple of the guest's block \
                 size ({block_size})"
            ),
        ));
    }
    Ok(())
}

/// Unplugs `devices` in order while the VM has more than `target` bytes.
async fn shrink(
    ctx: &mut Ctx,
    done: &mut Resized,
    devices: &[DimmDevice],
    target: u64,
) -> Result<(), BridgeError> {
    for device in devices {
        if done.to_bytes <= target {
            break;
        }
        let dimm = unplug(ctx, &device.id)
            .await
            .map_err(|e| with_note(e, &done.progress()))?;
        done.to_bytes -= dimm.device.size;
        done.unplugged.push(dimm);
    }
    Ok(())
}

/// Plugs DIMMs of `hotplug.dimm_size_bytes` (the last one smaller) until the VM has `target`:
/// all added first, then onlined together; if any fails, all of them are taken out.
async fn grow(ctx: &mut Ctx, done: &mut Resized, target: u64) -> Result<(), BridgeError> {
    let mut sizes = Vec::new();
    let mut missing = target.saturating_sub(done.to_bytes);
    while missing > 0 {
        let size = ctx.settings.dimm_size_bytes.min(missing);
        sizes.push(size);
        missing -= size;
    }
    if sizes.is_empty() {
        return Ok(());
    }
    let dimms = plug_dimms(ctx, &sizes, None, None)
        .await
        .map_err(|e| with_note(e, &done.progress()))?;
    for dimm in dimms {
        done.to_bytes += dimm.device.size;
        done.plugged.push(dimm);
    }
    Ok(())
}
