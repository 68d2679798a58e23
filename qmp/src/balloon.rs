//! Typed QMP commands for the virtio balloon, and the QOM commands it needs.
//!
//! [`Qmp::query_balloon`] tells QEMU's `actual` (the logical VM size, boot memory plus
//! DIMMs, less what the balloon holds); [`Qmp::balloon`] asks the guest's driver for a new
//! size. Both fail with class `DeviceNotActive` when the VM has no balloon
//! ([`QmpError::is_device_not_active`]).
//!
//! Everything else is a QOM property of the device, which has no `query-*` command:
//! [`Qmp::find_balloon`] looks for it among the devices with an id
//! (`/machine/peripheral`) and without one (`/machine/peripheral-anon`), and
//! [`Qmp::balloon_property`] / [`Qmp::set_balloon_property`] read and write its
//! `deflate-on-oom`, `free-page-reporting`, `guest-stats-polling-interval` (seconds, 0: off)
//! and `guest-stats` ([`GuestStats`]). On QEMU 7.2 every one of them answers on the
//! PCI proxy (`/machine/peripheral/ID`) and on its child `virtio-backend` alike; the
//! helpers try the proxy first and the child second, for a QEMU or a transport where
//! only one of them has it.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::{Qmp, QmpError};

/// Where QEMU keeps the devices given an id.
pub const PERIPHERAL: &str = "/machine/peripheral";
/// Where QEMU keeps the devices given without an id (`device[0]`, ...).
pub const PERIPHERAL_ANON: &str = "/machine/peripheral-anon";
/// The virtio device inside a virtio proxy (PCI, CCW), where its own properties live.
pub const VIRTIO_BACKEND: &str = "virtio-backend";

/// QEMU's `BalloonInfo`, the answer to `query-balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The logical VM size (boot memory and DIMMs) less what the balloon holds, bytes.
    /// With no guest driver it is the whole logical size.
    pub actual: u64,
}

/// One entry of `qom-list`: a property of a QOM object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPropertyInfo {
    /// The property's name; for a child, the child's name.
    pub name: String,
    /// Its type: `bool`, `int`, `child<virtio-balloon-pci>`, `link<bus>`, ...
    #[serde(rename = "type")]
    pub kind: String,
}

impl ObjectPropertyInfo {
    /// The child's QOM type, if the property is a child (`child<TYPE>`).
    pub fn child_type(&self) -> Option<&str> {
        self.kind.strip_prefix("child<")?.strip_suffix('>')
    }
}

/// A virtio balloon device as QOM lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonPath {
    /// Its QOM path (`/machine/peripheral/balloon0`, `/machine/peripheral-anon/device[0]`).
    pub path: String,
    /// Its device id; empty for a device given without one.
    pub id: String,
    /// Its QOM type (`virtio-balloon-pci`, `virtio-balloon-ccw`, `virtio-balloon-device`,
    /// ...).
    pub kind: String,
}

/// The balloon's `guest-stats` property: what the guest's driver last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestStats {
    /// When the driver last reported, seconds since the Unix epoch; 0: never.
    pub last_update: u64,
    /// The values; each is `u64::MAX` until the driver reports it.
    pub stats: GuestStatValues,
}

/// The values of [`GuestStats`]: QEMU's names, QEMU's units; `u64::MAX` (QEMU's -1) is
/// "not reported", and so is a value an older QEMU does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestStatValues {
    /// Bytes swapped in since boot.
    #[serde(default = "not_reported")]
    pub stat_swap_in: u64,
    /// Bytes swapped out since boot.
    #[serde(default = "not_reported")]
    pub stat_swap_out: u64,
    /// Major page faults since boot.
    #[serde(default = "not_reported")]
    pub stat_major_faults: u64,
    /// Minor page faults since boot.
    #[serde(default = "not_reported")]
    pub stat_minor_faults: u64,
    /// Unused memory, bytes (MemFree).
    #[serde(default = "not_reported")]
    pub stat_free_memory: u64,
    /// Memory the guest's kernel manages, bytes (MemTotal).
    #[serde(default = "not_reported")]
    pub stat_total_memory: u64,
    /// Memory available without swapping, bytes (MemAvailable).
    #[serde(default = "not_reported")]
    pub stat_available_memory: u64,
    /// Page cache that could be dropped, bytes.
    #[serde(default = "not_reported")]
    pub stat_disk_caches: u64,
    /// Huge page allocations that succeeded.
    #[serde(default = "not_reported")]
    pub stat_htlb_pgalloc: u64,
    /// Huge page allocations that failed.
    #[serde(default = "not_reported")]
    pub stat_htlb_pgfail: u64,
}

/// QEMU's "not reported": -1 as an unsigned 64-bit number.
fn not_reported() -> u64 {
    u64::MAX
}

/// `value`'s members as command arguments; `value` is always an object literal here.
fn args(value: Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Whether a QOM type is a virtio balloon (any transport).
fn is_balloon(kind: &str) -> bool {
    kind.starts_with("virtio-balloon")
}

impl Qmp {
    /// `query-balloon`: QEMU's `actual`. A VM without a balloon fails with class
    /// `DeviceNotActive`.
    pub async fn query_balloon(&self, deadline: Instant) -> Result<BalloonInfo, QmpError> {
        self.execute_as("query-balloon", None, deadline).await
    }

    /// `balloon VALUE`: asks the guest's driver to leave the guest `value` bytes of the
    /// logical VM size. QEMU answers at once and caps the value at the VM's size; it
    /// refuses 0 (`GenericError`), and fails with `DeviceNotActive` without a balloon.
    pub async fn balloon(&self, value: u64, deadline: Instant) -> Result<(), QmpError> {
        self.execute("balloon", args(json!({"value": value})), deadline)
            .await?;
        Ok(())
    }

    /// `qom-list PATH`: the properties and children of the object at `path`.
    pub async fn qom_list(
        &self,
        path: &str,
        deadline: Instant,
    ) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
        self.execute_as("qom-list", args(json!({"path": path})), deadline)
            .await
    }

    /// `qom-get PATH PROPERTY`, as QEMU gives it. No object at `path` fails with class
    /// `DeviceNotFound`, no such property with `GenericError`.
    pub async fn qom_get(
        &self,
        path: &str,
        property: &str,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let arguments = args(json!({"path": path, "property": property}));
        self.execute("qom-get", arguments, deadline).await
    }

    /// [`Qmp::qom_get`] decoded as `T` ([`QmpError::Protocol`] when it does not decode).
    pub async fn qom_get_as<T: DeserializeOwned>(
        &self,
        path: &str,
        property: &str,
        deadline: Instant,
    ) -> Result<T, QmpError> {
        let value = self.qom_get(path, property, deadline).await?;
        serde_json::from_value(value).map_err(|e| {
            QmpError::Protocol(format!(
                "qom-get {path} {property} gave an unexpected value: {e}"
            ))
        })
    }

    /// `qom-set PATH PROPERTY VALUE`.
    pub async fn qom_set(
        &self,
        path: &str,
        property: &str,
        value: Value,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        let arguments = args(json!({"path": path, "property": property, "value": value}));
        self.execute("qom-set", arguments, deadline).await?;
        Ok(())
    }

    /// The VM's virtio balloon as QOM lists it: the first one among the devices with an
    /// id, then among those without; `None` when there is none.
    pub async fn find_balloon(&self, deadline: Instant) -> Result<Option<BalloonPath>, QmpError> {
        for parent in [PERIPHERAL, PERIPHERAL_ANON] {
            let children = self.qom_list(parent, deadline).await?;
            let found = children.iter().find_map(|p| {
                let kind = p.child_type().filter(|k| is_balloon(k))?;
                Some(BalloonPath {
                    path: format!("{parent}/{}", p.name),
                    id: if parent == PERIPHERAL {
                        p.name.clone()
                    } else {
                        String::new()
                    },
                    kind: kind.to_string(),
                })
            });
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Property `property` of the balloon at `path`, decoded as `T`: from the device at
    /// `path`, or, where that object has no such property, from its `virtio-backend`
    /// child. When neither has it, the first error is returned.
    pub async fn balloon_property<T: DeserializeOwned>(
        &self,
        path: &str,
        property: &str,
        deadline: Instant,
    ) -> Result<T, QmpError> {
        match self.qom_get_as(path, property, deadline).await {
            Err(e) if no_such_property(&e) => {
                let child = format!("{path}/{VIRTIO_BACKEND}");
                self.qom_get_as(&child, property, deadline)
                    .await
                    .map_err(|_| e)
            }
            r => r,
        }
    }

    /// Sets property `property` of the balloon at `path` to `value`, on the device or,
    /// where it has no such property, on its `virtio-backend` child.
    pub async fn set_balloon_property(
        &self,
        path: &str,
        property: &str,
        value: Value,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        match self.qom_set(path, property, value.clone(), deadline).await {
            Err(e) if no_such_property(&e) => {
                let child = format!("{path}/{VIRTIO_BACKEND}");
                self.qom_set(&child, property, value, deadline)
                    .await
                    .map_err(|_| e)
            }
            r => r,
        }
    }
}

/// QEMU's answer for a property the object does not have (`Property 'T.NAME' not found`,
/// class `GenericError`); an object that is not there is `DeviceNotFound` instead.
fn no_such_property(e: &QmpError) -> bool {
    matches!(e, QmpError::Command { class, desc } if class == "GenericError" && desc.contains("not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stats_decode_as_qemu_7_2_sends_them() {
        let max = u64::MAX;
        let g: GuestStats = serde_json::from_value(json!({"stats": {
            "stat-htlb-pgalloc": max, "stat-swap-out": max, "stat-available-memory": max,
            "stat-htlb-pgfail": max, "stat-free-memory": 1024, "stat-minor-faults": max,
            "stat-major-faults": max, "stat-total-memory": max, "stat-swap-in": max,
            "stat-disk-caches": max}, "last-update": 0}))
        .expect("decodes");
        assert_eq!(g.last_update, 0);
        assert_eq!(g.stats.stat_free_memory, 1024);
        assert_eq!(g.stats.stat_swap_in, max);
    }

    #[test]
    fn values_an_older_qemu_lacks_are_not_reported() {
        let g: GuestStats =
            serde_json::from_value(json!({"stats": {"stat-swap-in": 7}, "last-update": 9}))
                .expect("decodes");
        assert_eq!((g.last_update, g.stats.stat_swap_in), (9, 7));
        assert_eq!(g.stats.stat_disk_caches, u64::MAX);
        assert_eq!(g.stats.stat_htlb_pgfail, u64::MAX);
    }

    #[test]
    fn children_are_told_from_properties() {
        let p = |name: &str, kind: &str| ObjectPropertyInfo {
            name: name.into(),
            kind: kind.into(),
        };
        assert_eq!(
            p("b", "child<virtio-balloon-pci>").child_type(),
            Some("virtio-balloon-pci")
        );
        assert_eq!(p("type", "string").child_type(), None);
        assert_eq!(p("iothread", "link<iothread>").child_type(), None);
        assert!(is_balloon("virtio-balloon-ccw") && !is_balloon("virtio-mem-pci"));
    }

    #[test]
    fn a_missing_property_is_told_from_a_missing_object() {
        let e = |class: &str, desc: &str| QmpError::Command {
            class: class.into(),
            desc: desc.into(),
        };
        assert!(no_such_property(&e(
            "GenericError",
            "Property 'virtio-balloon-pci.x' not found"
        )));
        assert!(!no_such_property(&e(
            "DeviceNotFound",
            "Device '/machine/peripheral/b' not found"
        )));
        assert!(!no_such_property(&e("GenericError", "Invalid parameter")));
    }
}
