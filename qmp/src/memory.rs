//! Typed QMP commands for memory hotplug, with QEMU's QAPI types as serde types.
//!
//! Plugging a DIMM is two commands: [`Qmp::add_memory_backend_ram`] (`object-add` of a
//! `memory-backend-ram`), then [`Qmp::add_pc_dimm`] (`device_add` of a `pc-dimm` using it).
//! Unplugging is [`Qmp::device_del`], which QEMU answers at once; the DIMM is gone only when
//! the guest has ejected it, announced by a `DEVICE_DELETED` event
//! ([`Event::device_deleted`](crate::Event::device_deleted)); only then does
//! [`Qmp::object_del`] of the backend succeed. The VM must have been started with
//! `-m SIZE,slots=N,maxmem=MAX` and ACPI.
//!
//! Where QEMU (7.1 and later) tells the limits: [`Qmp::query_memory_config`] reads the
//! machine's `memory` property (`qom-get /machine memory`), which holds `size`, and, when
//! the VM has hotplug slots, `max-size` (maxmem) and `slots`. No `query-*` command reports
//! maxmem or the slot count.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::{Qmp, QmpError};

/// One entry of `query-memory-devices`. QEMU's `MemoryDeviceInfo` is a union on `type`;
/// DIMMs are typed, every other kind (`virtio-pmem`, `virtio-mem`, `sgx-epc`,
/// `hv-balloon`, kinds newer than this code) is kept as it came, so a VM with them does not
/// fail the query.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawMemoryDevice")]
pub enum MemoryDevice {
    /// `"type": "dimm"`: a `pc-dimm`.
    Dimm(PcDimmDeviceInfo),
    /// `"type": "nvdimm"`: an NVDIMM (same information as a DIMM). It takes a slot too.
    Nvdimm(PcDimmDeviceInfo),
    /// `"type": "virtio-mem"`: memory the guest's driver plugs and unplugs in blocks.
    VirtioMem(VirtioMemDeviceInfo),
    /// Any other kind.
    Other {
        /// QEMU's `type`.
        kind: String,
        /// QEMU's `data`, undecoded.
        data: Value,
    },
}

/// `MemoryDeviceInfo` as it comes, before the `type` is looked at.
#[derive(Deserialize)]
struct RawMemoryDevice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

impl TryFrom<RawMemoryDevice> for MemoryDevice {
    type Error = serde_json::Error;

    fn try_from(raw: RawMemoryDevice) -> Result<Self, Self::Error> {
        Ok(match raw.kind.as_str() {
            "dimm" => Self::Dimm(serde_json::from_value(raw.data)?),
            "nvdimm" => Self::Nvdimm(serde_json::from_value(raw.data)?),
            // A shape this code does not know (an older or newer QEMU) is kept as it came.
            "virtio-mem" => match serde_json::from_value(raw.data.clone()) {
                Ok(info) => Self::VirtioMem(info),
                Err(_) => Self::Other {
                    kind: raw.kind,
                    data: raw.data,
                },
            },
            _ => Self::Other {
                kind: raw.kind,
                data: raw.data,
            },
        })
    }
}

impl MemoryDevice {
    /// QEMU's `type` of the device.
    pub fn kind(&self) -> &str {
        match self {
            Self::Dimm(_) => "dimm",
            Self::Nvdimm(_) => "nvdimm",
            Self::VirtioMem(_) => "virtio-mem",
            Self::Other { kind, .. } => kind,
        }
    }

    /// The DIMM's information, if it is a `pc-dimm`.
    pub fn as_dimm(&self) -> Option<&PcDimmDeviceInfo> {
        match self {
            Self::Dimm(d) => Some(d),
            _ => None,
        }
    }

    /// The information of a device that occupies one of the `slots` (DIMM or NVDIMM).
    pub fn slotted(&self) -> Option<&PcDimmDeviceInfo> {
        match self {
            Self::Dimm(d) | Self::Nvdimm(d) => Some(d),
            Self::VirtioMem(_) | Self::Other { .. } => None,
        }
    }

    /// The device's information, if it is a `virtio-mem` device.
    pub fn as_virtio_mem(&self) -> Option<&VirtioMemDeviceInfo> {
        match self {
            Self::VirtioMem(d) => Some(d),
            _ => None,
        }
    }
}

/// QEMU's `VirtioMEMDeviceInfo`: a virtio-mem device's range, sizes and backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VirtioMemDeviceInfo {
    /// The device's id, if it was given one.
    #[serde(default)]
    pub id: Option<String>,
    /// Guest-physical start of its range (`max-size` bytes).
    pub memaddr: u64,
    /// What the host asks the guest to have plugged, bytes.
    pub requested_size: u64,
    /// What the guest has plugged, bytes.
    pub size: u64,
    /// The most it can plug, bytes.
    pub max_size: u64,
    /// Its granularity, bytes.
    pub block_size: u64,
    /// The guest NUMA node.
    pub node: i64,
    /// The backend's QOM path, e.g. `/objects/vmem0`.
    pub memdev: String,
}

/// QEMU's `PCDIMMDeviceInfo`: where a DIMM lives and what backs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcDimmDeviceInfo {
    /// The device's id (`device_add ... id=`), if it was given one.
    #[serde(default)]
    pub id: Option<String>,
    /// Guest-physical start address. Its memory blocks are `addr / block_size` up to
    /// `(addr + size) / block_size - 1`.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The hotplug slot it occupies.
    pub slot: i64,
    /// The guest NUMA node.
    pub node: i64,
    /// The backend's QOM path, e.g. `/objects/mem1` (see [`Self::memdev_id`]).
    pub memdev: String,
    /// Plugged at run time (not given on the command line).
    pub hotplugged: bool,
    /// Can be unplugged.
    pub hotpluggable: bool,
}

impl PcDimmDeviceInfo {
    /// The backend's id: the last component of [`Self::memdev`] (`/objects/mem1` → `mem1`).
    pub fn memdev_id(&self) -> &str {
        object_id(&self.memdev)
    }
}

impl VirtioMemDeviceInfo {
    /// The backend's id: the last component of [`Self::memdev`] (`/objects/vmem0` → `vmem0`).
    pub fn memdev_id(&self) -> &str {
        object_id(&self.memdev)
    }
}

/// The id of the object at QOM path `path`: its last component.
fn object_id(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `query-memory-size-summary`: RAM given at start and RAM plugged since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemorySizeSummary {
    /// The initial RAM (`-m SIZE`), in bytes.
    pub base_memory: u64,
    /// The hot-plugged RAM in bytes; absent when the machine cannot tell (QEMU omits it).
    #[serde(default)]
    pub plugged_memory: Option<u64>,
}

/// The machine's `memory` property (QAPI `MemorySizeConfiguration`, QEMU 7.1+): the
/// `-m size=…,slots=…,maxmem=…` the VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemorySizeConfiguration {
    /// The initial RAM, in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// `maxmem`: initial plus hot-pluggable RAM, in bytes. QEMU leaves it out when the VM
    /// has no hotplug slots.
    #[serde(default)]
    pub max_size: Option<u64>,
    /// The number of hotplug slots; left out when there are none.
    #[serde(default)]
    pub slots: Option<u64>,
}

/// One entry of `query-memdev`: a memory backend object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Memdev {
    /// The backend's id (`object-add ... id=`). Missing for some built-in backends.
    #[serde(default)]
    pub id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Pages may be merged (KSM).
    #[serde(default)]
    pub merge: bool,
    /// Included in core dumps.
    #[serde(default)]
    pub dump: bool,
    /// Preallocated.
    #[serde(default)]
    pub prealloc: bool,
    /// Mapped shared.
    #[serde(default)]
    pub share: bool,
    /// Swap space reserved, where QEMU reports it.
    #[serde(default)]
    pub reserve: Option<bool>,
    /// Host NUMA nodes it is bound to.
    #[serde(default)]
    pub host_nodes: Vec<u16>,
    /// The host NUMA policy: `default`, `preferred`, `bind`, `interleave`.
    #[serde(default)]
    pub policy: String,
}

/// QEMU's `VersionInfo`, from the greeting or `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The upstream version.
    pub qemu: VersionTriple,
    /// The distribution's package version (`Debian 1:7.2+dfsg-7+deb12u18`), or empty.
    #[serde(default)]
    pub package: String,
}

/// Major, minor, micro.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl std::fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let VersionTriple {
            major,
            minor,
            micro,
        } = self.qemu;
        write!(f, "{major}.{minor}.{micro}")?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// `value`'s members as command arguments; `value` is always an object literal here.
fn args(value: Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

impl Qmp {
    /// `query-version`: the QEMU this client talks to.
    pub async fn query_version(&self, deadline: Instant) -> Result<VersionInfo, QmpError> {
        self.execute_as("query-version", None, deadline).await
    }

    /// `query-memory-devices`: every memory device (DIMMs and others), plugged at start or
    /// since.
    pub async fn query_memory_devices(
        &self,
        deadline: Instant,
    ) -> Result<Vec<MemoryDevice>, QmpError> {
        self.execute_as("query-memory-devices", None, deadline)
            .await
    }

    /// `query-memory-size-summary`: initial and plugged RAM.
    pub async fn query_memory_size_summary(
        &self,
        deadline: Instant,
    ) -> Result<MemorySizeSummary, QmpError> {
        self.execute_as("query-memory-size-summary", None, deadline)
            .await
    }

    /// `query-memdev`: every memory backend, including the boot RAM's.
    pub async fn query_memdev(&self, deadline: Instant) -> Result<Vec<Memdev>, QmpError> {
        self.execute_as("query-memdev", None, deadline).await
    }

    /// `qom-get /machine memory`: size, maxmem and slots as the VM was started (QEMU 7.1
    /// and later; older QEMU answers with a `GenericError`, as it has no such property).
    pub async fn query_memory_config(
        &self,
        deadline: Instant,
    ) -> Result<MemorySizeConfiguration, QmpError> {
        let arguments = args(json!({"path": "/machine", "property": "memory"}));
        self.execute_as("qom-get", arguments, deadline).await
    }

    /// `qom-set ID requested-size BYTES`: asks the guest's virtio-mem driver behind device
    /// `id` to have `bytes` plugged. QEMU answers at once; the device's `size` follows as
    /// the guest plugs or unplugs.
    pub async fn set_requested_size(
        &self,
        id: &str,
        bytes: u64,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        let arguments = args(json!({"path": id, "property": "requested-size", "value": bytes}));
        self.execute("qom-set", arguments, deadline).await?;
        Ok(())
    }

    /// `object-add` of a `memory-backend-ram` named `id` of `size` bytes.
    pub async fn add_memory_backend_ram(
        &self,
        id: &str,
        size: u64,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        let arguments = args(json!({"qom-type": "memory-backend-ram", "id": id, "size": size}));
        self.execute("object-add", arguments, deadline).await?;
        Ok(())
    }

    /// `device_add` of a `pc-dimm` named `id` backed by the backend `memdev` (its id), on
    /// guest NUMA node `node` (QEMU picks one when `None`). QEMU picks the slot and address.
    pub async fn add_pc_dimm(
        &self,
        id: &str,
        memdev: &str,
        node: Option<u32>,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        let mut arguments = json!({"driver": "pc-dimm", "id": id, "memdev": memdev});
        if let Some(node) = node {
            arguments["node"] = node.into();
        }
        self.execute("device_add", args(arguments), deadline)
            .await?;
        Ok(())
    }

    /// `device_del` of device `id`. For a DIMM this only *asks* the guest to eject it: the
    /// call returns at once, and the DIMM is gone when the `DEVICE_DELETED` event comes.
    pub async fn device_del(&self, id: &str, deadline: Instant) -> Result<(), QmpError> {
        self.execute("device_del", args(json!({"id": id})), deadline)
            .await?;
        Ok(())
    }

    /// `object-del` of object `id` (a memory backend). Fails while a DIMM still uses it.
    pub async fn object_del(&self, id: &str, deadline: Instant) -> Result<(), QmpError> {
        self.execute("object-del", args(json!({"id": id})), deadline)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_devices_decode_dimms_and_keep_other_kinds() {
        let reply = json!([
            {"type": "dimm", "data": {"memdev": "/objects/m1", "hotplugged": true,
             "addr": 4294967296u64, "hotpluggable": true, "size": 134217728, "slot": 0,
             "node": 0, "id": "d1"}},
            {"type": "nvdimm", "data": {"memdev": "/objects/nv", "hotplugged": false,
             "addr": 8589934592u64, "hotpluggable": true, "size": 1, "slot": 1, "node": 0}},
            {"type": "virtio-mem", "data": {"memaddr": 1, "size": 0, "id": "vm0"}},
            {"type": "sgx-epc", "data": {"memaddr": 2, "size": 4096, "node": 0, "memdev": "/objects/e"}}
        ]);
        let devices: Vec<MemoryDevice> = serde_json::from_value(reply).expect("decodes");
        let d = devices[0].as_dimm().expect("a dimm");
        assert_eq!(d.id.as_deref(), Some("d1"));
        assert_eq!((d.addr, d.size, d.slot, d.node), (1 << 32, 128 << 20, 0, 0));
        assert_eq!(d.memdev_id(), "m1");
        assert!(d.hotplugged && d.hotpluggable);
        assert_eq!(devices[1].kind(), "nvdimm");
        assert_eq!(devices[1].slotted().map(|n| n.id.clone()), Some(None));
        assert!(devices[1].as_dimm().is_none());
        assert_eq!(devices[2].kind(), "virtio-mem");
        assert!(matches!(&devices[3], MemoryDevice::Other { kind, data }
            if kind == "sgx-epc" && data["size"] == 4096));
        assert!(devices[3].slotted().is_none());
    }

    #[test]
    fn a_dimm_missing_fields_does_not_decode() {
        let bad = json!([{"type": "dimm", "data": {"id": "d1"}}]);
        assert!(serde_json::from_value::<Vec<MemoryDevice>>(bad).is_err());
    }

    #[test]
    fn summaries_and_configurations_decode_with_optional_members() {
        let s: MemorySizeSummary =
            serde_json::from_value(json!({"base-memory": 268435456, "plugged-memory": 0}))
                .expect("decodes");
        assert_eq!(s.plugged_memory, Some(0));
        let s: MemorySizeSummary =
            serde_json::from_value(json!({"base-memory": 1})).expect("decodes");
        assert_eq!(s.plugged_memory, None);
        let c: MemorySizeConfiguration = serde_json::from_value(
            json!({"size": 268435456, "slots": 4, "max-size": 2147483648u64}),
        )
        .expect("decodes");
        assert_eq!((c.slots, c.max_size), (Some(4), Some(2 << 30)));
        let c: MemorySizeConfiguration =
            serde_json::from_value(json!({"size": 0})).expect("decodes");
        assert_eq!((c.size, c.slots, c.max_size), (Some(0), None, None));
    }

    #[test]
    fn memdevs_decode_as_qemu_7_2_sends_them() {
        let m: Vec<Memdev> = serde_json::from_value(json!([{"share": false, "reserve": true,
            "prealloc": false, "host-nodes": [], "size": 134217728, "merge": true,
            "dump": true, "policy": "default", "id": "m1"}]))
        .expect("decodes");
        assert_eq!(m[0].id.as_deref(), Some("m1"));
        assert_eq!(m[0].size, 128 << 20);
        assert_eq!(m[0].reserve, Some(true));
        assert_eq!(m[0].policy, "default");
    }

    #[test]
    fn versions_display_with_their_package() {
        let v: VersionInfo = serde_json::from_value(json!({"qemu": {"micro": 22, "minor": 2,
            "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}))
        .expect("decodes");
        assert_eq!(v.to_string(), "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)");
    }
}
