//! Each VM's desired state, one value per (VM, device): what the bridge made a VM have
//! and must keep having across guest reboots. The journal stores the values as JSON and
//! knows nothing of what they say (hotplug's `Desired` memory devices today).

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use super::{Journal, JournalError};

/// Desired devices: key `VM NUL DEVICE-ID`, value JSON. (The name is from when it held
/// DIMMs only.)
pub(super) const DIMMS: TableDefinition<&str, &[u8]> = TableDefinition::new("desired-dimms");

fn key(vm: &str, device: &str) -> String {
    format!("{vm}\0{device}")
}

impl Journal {
    /// Records that VM `vm` should have device `device` as `desired` says (after it was
    /// plugged); durable when this returns.
    pub async fn want<T: Serialize>(
        &self,
        vm: &str,
        device: &str,
        desired: &T,
    ) -> Result<(), JournalError> {
        let key = key(vm, device);
        let bytes = serde_json::to_vec(desired).map_err(|e| self.unreadable(e.to_string()))?;
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

    /// Every VM's desired devices, by VM name, decoded as `T`.
    pub fn wanted<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, JournalError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.store(e))?;
        let table = txn.open_table(DIMMS).map_err(|e| self.store(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.store(e))? {
            let (k, v) = item.map_err(|e| self.store(e))?;
            let vm = k.value().split('\0').next().unwrap_or_default().to_string();
            let desired: T = serde_json::from_slice(v.value())
                .map_err(|e| self.unreadable(format!("a desired device does not decode: {e}")))?;
            out.push((vm, desired));
        }
        Ok(out)
    }

    /// VM `vm`'s desired devices, decoded as `T`: a range read of that VM's keys only, so
    /// one VM's recovery does not read every VM's.
    pub fn wanted_by<T: DeserializeOwned>(&self, vm: &str) -> Result<Vec<T>, JournalError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.store(e))?;
        let table = txn.open_table(DIMMS).map_err(|e| self.store(e))?;
        // Keys are `VM NUL DEVICE`: NUL sorts first and cannot be in a VM name, so the VM's
        // keys are exactly those from `VM NUL` up to `VM \x01`.
        let (from, to) = (format!("{vm}\0"), format!("{vm}\u{1}"));
        let mut out = Vec::new();
        for item in table
            .range(from.as_str()..to.as_str())
            .map_err(|e| self.store(e))?
        {
            let (_, v) = item.map_err(|e| self.store(e))?;
            let desired: T = serde_json::from_slice(v.value())
                .map_err(|e| self.unreadable(format!("a desired device does not decode: {e}")))?;
            out.push(desired);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::journal::Retention;

    #[tokio::test]
    async fn desired_devices_are_kept_per_vm_across_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Retention {
            per_vm: 8,
            ttl: std::time::Duration::from_secs(60),
            max_entries: 64,
        };
        let d = |first: u64| json!({"first-block": first, "blocks": 4});
        {
            let j = Journal::open(dir.path(), limits).expect("open");
            assert_eq!(j.wanted::<Value>().expect("read"), vec![]);
            j.want("vm1", "qga-dimm0", &d(32)).await.expect("want");
            j.want("vm1", "qga-dimm1", &d(36)).await.expect("want");
            j.want("vm2", "qga-dimm0", &d(32)).await.expect("want");
            j.unwant("vm1", "qga-dimm0").await.expect("unwant");
        }
        let j = Journal::open(dir.path(), limits).expect("reopen");
        assert_eq!(
            j.wanted::<Value>().expect("read"),
            vec![("vm1".to_string(), d(36)), ("vm2".to_string(), d(32))]
        );
        // One VM's read is that VM's values only, not a name it prefixes.
        j.want("vm1.b", "qga-dimm0", &d(40)).await.expect("want");
        assert_eq!(j.wanted_by::<Value>("vm1").expect("read"), vec![d(36)]);
        assert_eq!(j.wanted_by::<Value>("vm1.b").expect("read"), vec![d(40)]);
        assert_eq!(
            j.wanted_by::<Value>("vm").expect("read"),
            Vec::<Value>::new()
        );
    }
}
