//! A VM's memory as the host and the guest see it together: QEMU's DIMMs mapped onto the
//! guest's memory blocks (block = address / block size), with each block's state and,
//! where the agent reports them, its zones.

use std::collections::BTreeMap;

use qga_wire::schema::{GuestMemoryBlock, GuestMemoryZones};
use serde::{Deserialize, Serialize};

use crate::backend::{DimmDevice, VirtioMemDevice};

/// What the guest does with one memory block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockState {
    /// Online: the guest uses it.
    Online,
    /// Offline: present, unused.
    Offline,
    /// QEMU has the memory but the guest does not list the block (not yet, or never).
    Absent,
}

/// One block in a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LayoutBlock {
    /// The block's number.
    pub phys_index: u64,
    /// Online, offline or absent.
    pub state: BlockState,
    /// The kernel's `valid_zones` words, when the agent reports zones.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub valid_zones: Vec<String>,
    /// Whether the block can be offlined, from its zone rather than the kernel's
    /// `removable` (which reads 1 for every block since Linux 5.7): an online block only
    /// in ZONE_MOVABLE. `None` when zones are unknown or the block is absent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub can_offline: Option<bool>,
}

impl LayoutBlock {
    /// Whether the block is online in ZONE_MOVABLE (`None`: zones unknown).
    pub fn movable(&self) -> Option<bool> {
        (!self.valid_zones.is_empty()).then(|| self.valid_zones == ["Movable"])
    }
}

/// One DIMM and its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Dimm {
    /// The DIMM as the hypervisor reports it.
    #[serde(flatten)]
    pub device: DimmDevice,
    /// Its blocks, lowest first.
    pub blocks: Vec<LayoutBlock>,
    /// Every online block is in ZONE_MOVABLE, so the DIMM can come out (`None`: zones
    /// unknown).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub removable: Option<bool>,
}

/// A virtio-mem device and the blocks of its range the guest has added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VirtioMem {
    /// The device as the hypervisor reports it.
    #[serde(flatten)]
    pub device: VirtioMemDevice,
    /// The guest's blocks in its range, lowest first (the guest adds a block when it
    /// plugs memory in it).
    pub blocks: Vec<LayoutBlock>,
}

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Layout {
    /// Bytes per block.
    pub block_size: u64,
    /// Memory the VM booted with.
    pub boot_bytes: u64,
    /// Memory in DIMMs and plugged by virtio-mem devices.
    pub plugged_bytes: u64,
    /// Bytes in online blocks.
    pub online_bytes: u64,
    /// Bytes of online blocks in ZONE_MOVABLE (zones known only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub movable_bytes: Option<u64>,
    /// The DIMMs, by address.
    pub dimms: Vec<Dimm>,
    /// The virtio-mem devices, by address.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub virtio_mem: Vec<VirtioMem>,
    /// Blocks of no DIMM and no virtio-mem device.
    pub other_blocks: Vec<LayoutBlock>,
    /// The kernel's `auto_online_blocks`, when reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_online_blocks: Option<String>,
    /// Whether the agent reports zones.
    pub zones_known: bool,
    /// What may surprise: DIMMs or virtio-mem devices with blocks online outside
    /// ZONE_MOVABLE.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub warnings: Vec<String>,
    /// The virtio balloon, when the VM has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub balloon: Option<BalloonView>,
}

/// A VM's balloon in its memory layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BalloonView {
    /// The device as the hypervisor reports it.
    pub id: String,
    /// The guest gives balloon pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// The guest reports freed pages, which the host drops.
    pub free_page_reporting: bool,
    /// QEMU's `actual`, bytes.
    pub actual_bytes: u64,
    /// What the balloon holds, bytes.
    pub held_bytes: u64,
    /// The memory the guest may use, bytes.
    pub usable_bytes: u64,
    /// The size the bridge keeps the balloon at, bytes (after a `memory-balloon`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kept_bytes: Option<u64>,
}

/// The online blocks of `blocks` outside ZONE_MOVABLE, as `N (Zone)`.
fn outside_movable(blocks: &[LayoutBlock]) -> Vec<String> {
    blocks
        .iter()
        .filter(|b| b.state == BlockState::Online && b.movable() == Some(false))
        .map(|b| format!("{} ({})", b.phys_index, b.valid_zones.join(" ")))
        .collect()
}

/// A warning for each DIMM with online blocks outside ZONE_MOVABLE: it cannot come out.
fn zone_warnings(dimms: &[Dimm]) -> Vec<String> {
    dimms
        .iter()
        .filter(|d| d.removable == Some(false))
        .filter_map(|d| {
            let stuck = outside_movable(&d.blocks);
            (!stuck.is_empty()).then(|| {
                format!(
                    "DIMM '{}' has blocks online outside ZONE_MOVABLE: {}; it cannot be unplugged",
                    d.device.id,
                    stuck.join(", ")
                )
            })
        })
        .collect()
}

/// Block number -> (online, valid zones).
type BlockIndex = BTreeMap<u64, (bool, Vec<String>)>;

/// The guest's view: its blocks and, if the agent offers them, their zones.
#[derive(Debug, Clone, Default)]
pub struct GuestView {
    /// The zone extension's reply, if the agent offers it.
    zones: Option<GuestMemoryZones>,
    index: BlockIndex,
}

impl GuestView {
    /// The view from `guest-get-memory-blocks` and, where offered, the zone extension.
    pub fn new(blocks: &[GuestMemoryBlock], zones: Option<GuestMemoryZones>) -> Self {
        let mut index: BlockIndex = blocks
            .iter()
            .map(|b| (b.phys_index, (b.online, Vec::new())))
            .collect();
        if let Some(zones) = &zones {
            for z in &zones.blocks {
                if let (Some(entry), Some(valid)) = (index.get_mut(&z.phys_index), &z.valid_zones) {
                    entry.1.clone_from(valid);
                }
            }
        }
        Self { zones, index }
    }

    /// The guest's state of `block`.
    pub fn block(&self, phys_index: u64) -> LayoutBlock {
        block_of(&self.index, phys_index)
    }
}

fn block_of(index: &BlockIndex, phys_index: u64) -> LayoutBlock {
    match index.get(&phys_index) {
        Some((online, zones)) => LayoutBlock {
            phys_index,
            state: if *online {
                BlockState::Online
            } else {
                BlockState::Offline
            },
            valid_zones: zones.clone(),
            can_offline: (!zones.is_empty()).then(|| !*online || zones == &["Movable"]),
        },
        None => LayoutBlock {
            phys_index,
            state: BlockState::Absent,
            valid_zones: Vec::new(),
            can_offline: None,
        },
    }
}

/// `device` with the guest's view of its blocks.
pub fn dimm(device: &DimmDevice, block_size: u64, guest: &GuestView) -> Dimm {
    dimm_with(device, block_size, &guest.index)
}

fn dimm_with(device: &DimmDevice, block_size: u64, index: &BlockIndex) -> Dimm {
    let blocks: Vec<LayoutBlock> = device
        .block_range(block_size)
        .map(|i| block_of(index, i))
        .collect();
    let online: Vec<&LayoutBlock> = blocks
        .iter()
        .filter(|b| b.state == BlockState::Online)
        .collect();
    let removable = online
        .iter()
        .map(|b| b.movable())
        .try_fold(true, |all, m| m.map(|m| all && m));
    Dimm {
        device: device.clone(),
        blocks,
        removable,
    }
}

/// Warnings for virtio-mem devices with blocks online outside ZONE_MOVABLE: the guest
/// may not be able to give that memory back.
fn virtio_mem_warnings(devices: &[VirtioMem]) -> impl Iterator<Item = String> + '_ {
    devices.iter().filter_map(|v| {
        let stuck = outside_movable(&v.blocks);
        (!stuck.is_empty()).then(|| {
            format!(
                "virtio-mem device '{}' has blocks online outside ZONE_MOVABLE: {}; the guest \
                 may not be able to give that memory back",
                v.device.id,
                stuck.join(", ")
            )
        })
    })
}

/// The virtio-mem devices, by address, with the guest's blocks of each range.
pub fn virtio_mem(
    block_size: u64,
    devices: &[VirtioMemDevice],
    guest: &GuestView,
) -> Vec<VirtioMem> {
    let mut devices = devices.to_vec();
    devices.sort_by_key(|d| d.addr);
    devices
        .into_iter()
        .map(|device| VirtioMem {
            blocks: device
                .block_range(block_size)
                .filter(|i| guest.index.contains_key(i))
                .map(|i| block_of(&guest.index, i))
                .collect(),
            device,
        })
        .collect()
}

/// Joins QEMU's DIMMs, virtio-mem devices and boot memory size with the guest's blocks.
pub fn build(
    block_size: u64,
    boot_bytes: u64,
    devices: &[DimmDevice],
    vmem: &[VirtioMemDevice],
    guest: &GuestView,
) -> Layout {
    let index = &guest.index;
    let mut devices = devices.to_vec();
    devices.sort_by_key(|d| d.addr);
    let dimms: Vec<Dimm> = devices
        .iter()
        .map(|d| dimm_with(d, block_size, index))
        .collect();
    let virtio_mem = virtio_mem(block_size, vmem, guest);
    let in_dimms: std::collections::BTreeSet<u64> = dimms
        .iter()
        .flat_map(|d| d.blocks.iter().map(|b| b.phys_index))
        .chain(
            virtio_mem
                .iter()
                .flat_map(|v| v.blocks.iter().map(|b| b.phys_index)),
        )
        .collect();
    let other_blocks: Vec<LayoutBlock> = index
        .keys()
        .filter(|i| !in_dimms.contains(i))
        .map(|&i| block_of(index, i))
        .collect();
    let online_blocks = index.values().filter(|(online, _)| *online).count() as u64;
    let zones_known = guest.zones.is_some();
    let movable_blocks = index
        .values()
        .filter(|(online, zones)| *online && zones == &["Movable"])
        .count() as u64;
    Layout {
        balloon: None,
        warnings: zone_warnings(&dimms)
            .into_iter()
            .chain(virtio_mem_warnings(&virtio_mem))
            .collect(),
        virtio_mem,
        block_size,
        boot_bytes,
        plugged_bytes: devices.iter().map(|d| d.size).sum::<u64>()
            + vmem.iter().map(|v| v.plugged_size).sum::<u64>(),
        online_bytes: online_blocks * block_size,
        movable_bytes: zones_known.then_some(movable_blocks * block_size),
        dimms,
        other_blocks,
        auto_online_blocks: guest
            .zones
            .as_ref()
            .and_then(|z| z.auto_online_blocks.clone()),
        zones_known,
    }
}

#[cfg(test)]
mod tests {
    use qga_wire::schema::GuestMemoryBlockZones;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn block(phys_index: u64, online: bool) -> GuestMemoryBlock {
        GuestMemoryBlock {
            phys_index,
            online,
            can_offline: Some(true),
        }
    }

    fn device(id: &str, addr: u64, size: u64) -> DimmDevice {
        DimmDevice {
            id: id.into(),
            addr,
            size,
            node: 0,
            slot: 0,
            memdev: format!("mem-{id}"),
            hotplugged: true,
            hotpluggable: true,
        }
    }

    #[test]
    fn dimms_own_the_blocks_of_their_address_range() {
        // 512 MiB boot (blocks 0-3), a 512 MiB DIMM at 4 GiB (blocks 32-35), of which the
        // guest has seen three.
        let blocks: Vec<GuestMemoryBlock> = (0..4)
            .map(|i| block(i, true))
            .chain([block(32, true), block(33, false), block(34, true)])
            .collect();
        let guest = GuestView::new(&blocks, None);
        let layout = build(
            128 * MIB,
            512 * MIB,
            &[device("d1", 4096 * MIB, 512 * MIB)],
            &[],
            &guest,
        );
        assert_eq!(layout.plugged_bytes, 512 * MIB);
        assert_eq!(layout.online_bytes, 6 * 128 * MIB);
        assert_eq!(layout.movable_bytes, None);
        assert_eq!(layout.other_blocks.len(), 4);
        let d = &layout.dimms[0];
        let states: Vec<(u64, BlockState)> =
            d.blocks.iter().map(|b| (b.phys_index, b.state)).collect();
        assert_eq!(
            states,
            [
                (32, BlockState::Online),
                (33, BlockState::Offline),
                (34, BlockState::Online),
                (35, BlockState::Absent)
            ]
        );
        assert_eq!(d.removable, None, "zones unknown");
    }

    /// A guest with blocks 0, 8-11, 16-17 online, each in the zone the test needs.
    fn zoned_guest() -> GuestView {
        let zone = |i: u64, z: &str| GuestMemoryBlockZones {
            phys_index: i,
            online: true,
            valid_zones: Some(vec![z.to_string()]),
            removable: Some(true),
        };
        let blocks = [
            block(0, true),
            block(8, true),
            block(9, true),
            block(10, true),
            block(11, true),
            block(16, true),
            block(17, true),
        ];
        GuestView::new(
            &blocks,
            Some(GuestMemoryZones {
                auto_online_blocks: Some("offline".into()),
                online_policy: None,
                auto_movable_ratio: None,
                blocks: vec![
                    zone(0, "Normal"),
                    zone(8, "Movable"),
                    zone(9, "Movable"),
                    zone(10, "Normal"),
                    zone(11, "Movable"),
                    zone(16, "Movable"),
                    zone(17, "Normal"),
                ],
            }),
        )
    }

    #[test]
    fn zones_say_whether_a_dimm_can_come_out() {
        let guest = zoned_guest();
        let layout = build(
            128 * MIB,
            128 * MIB,
            &[
                device("b", 1280 * MIB, 256 * MIB),
                device("a", 1024 * MIB, 256 * MIB),
            ],
            &[VirtioMemDevice {
                id: "vm0".into(),
                addr: Some(2048 * MIB),
                node: 0,
                block_size: 2 * MIB,
                max_size: 1024 * MIB,
                requested_size: 256 * MIB,
                plugged_size: 256 * MIB,
                memdev: "vmem0".into(),
            }],
            &guest,
        );
        let vmem = &layout.virtio_mem[0];
        assert_eq!(
            vmem.blocks.iter().map(|b| b.phys_index).collect::<Vec<_>>(),
            [16, 17],
            "the blocks the guest added in its range"
        );
        assert_eq!(layout.other_blocks.len(), 1, "block 0 only");
        assert_eq!(layout.dimms[0].device.id, "a", "sorted by address");
        assert_eq!(layout.dimms[0].removable, Some(true));
        assert_eq!(layout.dimms[0].blocks[0].can_offline, Some(true));
        assert_eq!(
            layout.other_blocks[0].can_offline,
            Some(false),
            "block 0 is Normal"
        );
        assert_eq!(
            layout.dimms[1].removable,
            Some(false),
            "block 10 is in Normal"
        );
        assert_eq!(layout.movable_bytes, Some(4 * 128 * MIB));
        assert_eq!(layout.auto_online_blocks.as_deref(), Some("offline"));
        assert!(layout.zones_known);
        assert_eq!(
            layout.warnings,
            [
                "DIMM 'b' has blocks online outside ZONE_MOVABLE: 10 (Normal); it cannot be unplugged",
                "virtio-mem device 'vm0' has blocks online outside ZONE_MOVABLE: 17 (Normal); \
                 the guest may not be able to give that memory back"
            ]
        );
    }
}
