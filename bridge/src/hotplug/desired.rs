//! Desired memory: the devices the bridge plugged or resized, each with its block range
//! and how its blocks are to be online, and the size the balloon is to hold; kept in the
//! journal (as JSON, per VM and device) so that the keeper onlines again what a guest
//! reboot leaves offline and sets the balloon again where it came back empty.

use qga_wire::schema::GuestMemoryOnlineType;
use serde::{Deserialize, Serialize};

/// What kind of memory device a [`Desired`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// An ACPI DIMM: every block of its range is there while QEMU has it.
    #[default]
    Dimm,
    /// A virtio-mem device: the guest's driver adds the blocks of its range it plugs, so
    /// blocks of the range may be absent.
    VirtioMem,
    /// The virtio balloon: no blocks, a size it is to hold ([`Desired::held_bytes`]).
    Balloon,
}

/// A memory device the bridge plugged or resized, and how its blocks are to be online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Desired {
    /// The device's id (stored as `dimm` before virtio-mem).
    #[serde(alias = "dimm")]
    pub device: String,
    /// What kind of device it is.
    #[serde(default)]
    pub kind: Kind,
    /// The first block of its range.
    pub first_block: u64,
    /// The blocks of its range.
    pub blocks: u64,
    /// How they are onlined (`None`: as the agent is configured, for agents that cannot
    /// choose the zone).
    pub online_type: Option<GuestMemoryOnlineType>,
    /// The balloon's size, bytes ([`Kind::Balloon`] only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_bytes: Option<u64>,
}

impl Desired {
    /// Its block numbers.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.first_block..self.first_block.saturating_add(self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stored_before_virtio_mem_still_decode_as_dimms() {
        let old =
            br#"{"dimm":"qga-dimm0","first-block":32,"blocks":4,"online-type":"online_movable"}"#;
        let d: Desired = serde_json::from_slice(old).expect("decodes");
        assert_eq!((d.device.as_str(), d.kind), ("qga-dimm0", Kind::Dimm));
        let vmem = Desired {
            device: "vmem0".into(),
            kind: Kind::VirtioMem,
            first_block: 32,
            blocks: 16,
            online_type: None,
            held_bytes: None,
        };
        let json = serde_json::to_value(&vmem).expect("encodes");
        assert_eq!(json["kind"], "virtio-mem");
        assert_eq!(
            serde_json::from_value::<Desired>(json).expect("decodes"),
            vmem
        );
    }
}
