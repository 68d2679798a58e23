//! Each VM's desired memory: the DIMMs the bridge plugged and the virtio-mem devices it
//! resized, and how their blocks are to be online, so that what a guest reboot (or
//! anything else) leaves offline is onlined again.

use qga_wire::schema::GuestMemoryOnlineType;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Journal, JournalError};

/// Desired memory devices: key `VM NUL DEVICE-ID`, value JSON [`Desired`]. (The name is
/// from when it held DIMMs only.)
pub(super) const DIMMS: TableDefinition<&str, &[u8]> = TableDefinition::new("desired-dimms");

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
}

impl Desired {
    /// Its block numbers.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.first_block..self.first_block.saturating_add(self.blocks)
    }
}

fn key(vm: &str, device: &str) -> String {
    format!("{vm}\0{device}")
}

impl Journal {
    /// Records that VM `vm` should have `desired` (after it was plugged); durable when
    /// this returns.
    pub async fn want(&self, vm: &str, desired: Desired) -> Result<(), JournalError> {
        let key = key(vm, &desired.device);
        let bytes = serde_json::to_vec(&desired).map_err(|e| self.unreadable(e.to_string()))?;
        self.write(move |j, txn| {
            let mut t = txn.open_table(DIMMS).map_err(|e| j.store(e))?;
            t.insert(key.as_str(), bytes.as_slice())
                .map_err(|e| j.store(e))?;
            Ok(())
        })
        .await
    }

    /// Records that VM `vm` no longer has device `device` (unplugged, or gone).
    pub async fn unwant(&self, vm: &str, device: &str) -> Result<(), JournalError> {
        let key = key(vm, device);
        self.write(move |j, txn| {
            let mut t = txn.open_table(DIMMS).map_err(|e| j.store(e))?;
            t.remove(key.as_str()).map_err(|e| j.store(e))?;
            Ok(())
        })
        .await
    }

    /// Every VM's desired devices, by VM name.
    pub fn wanted(&self) -> Result<Vec<(String, Desired)>, JournalError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.store(e))?;
        let table = txn.open_table(DIMMS).map_err(|e| self.store(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.store(e))? {
            let (k, v) = item.map_err(|e| self.store(e))?;
            let vm = k.value().split('\0').next().unwrap_or_default().to_string();
            let desired: Desired = serde_json::from_slice(v.value())
                .map_err(|e| self.unreadable(format!("a desired device does not decode: {e}")))?;
            out.push((vm, desired));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Limits;

    #[tokio::test]
    async fn desired_dimms_are_kept_per_vm_across_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits {
            per_vm: 8,
            ttl: std::time::Duration::from_secs(60),
            max_entries: 64,
        };
        let d = |dimm: &str, first| Desired {
            device: dimm.into(),
            kind: Kind::Dimm,
            first_block: first,
            blocks: 4,
            online_type: Some(GuestMemoryOnlineType::OnlineMovable),
        };
        {
            let j = Journal::open(dir.path(), limits).expect("open");
            assert_eq!(j.wanted().expect("read"), vec![]);
            j.want("vm1", d("qga-dimm0", 32)).await.expect("want");
            j.want("vm1", d("qga-dimm1", 36)).await.expect("want");
            j.want("vm2", d("qga-dimm0", 32)).await.expect("want");
            j.unwant("vm1", "qga-dimm0").await.expect("unwant");
        }
        let j = Journal::open(dir.path(), limits).expect("reopen");
        let wanted = j.wanted().expect("read");
        assert_eq!(
            wanted,
            vec![
                ("vm1".to_string(), d("qga-dimm1", 36)),
                ("vm2".to_string(), d("qga-dimm0", 32))
            ]
        );
        assert_eq!(wanted[0].1.range(), 36..40);
    }

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
        };
        let json = serde_json::to_value(&vmem).expect("encodes");
        assert_eq!(json["kind"], "virtio-mem");
        assert_eq!(
            serde_json::from_value::<Desired>(json).expect("decodes"),
            vmem
        );
    }
}
