//! QMP events: what QEMU announces between replies, and typed views of the ones memory
//! hotplug waits for.

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use tokio::{sync::broadcast, time::Instant};

use crate::QmpError;

/// One asynchronous QEMU event, `{"event": NAME, "data": ..., "timestamp": ...}`.
///
/// Events come from QEMU at any time; [`Qmp::events`](crate::Qmp::events) hands out a
/// receiver of every event from the moment it is called.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name, e.g. `DEVICE_DELETED`.
    pub name: String,
    /// The event's `data` member; [`Value::Null`] when QEMU sent none.
    pub data: Value,
    /// QEMU's `timestamp` as (seconds, microseconds) since the epoch, when present.
    pub timestamp: Option<(i64, i64)>,
}

impl Event {
    /// The event in a QMP message object, if it is one (it has a string `event` member).
    pub(crate) fn from_message(message: &mut Map<String, Value>) -> Option<Self> {
        if !message.get("event").is_some_and(Value::is_string) {
            return None;
        }
        let Some(Value::String(name)) = message.remove("event") else {
            return None;
        };
        let data = message.remove("data").unwrap_or(Value::Null);
        let timestamp = message.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_i64()?,
                t.get("microseconds")?.as_i64()?,
            ))
        });
        Some(Self {
            name,
            data,
            timestamp,
        })
    }

    /// The event's data decoded as `T`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, QmpError> {
        T::deserialize(&self.data)
            .map_err(|e| QmpError::Protocol(format!("{} event data: {e}", self.name)))
    }

    /// The data of a `DEVICE_DELETED` event: a device (a DIMM after `device_del`) is gone.
    pub fn device_deleted(&self) -> Option<DeviceDeleted> {
        (self.name == DeviceDeleted::NAME)
            .then(|| self.data_as().ok())
            .flatten()
    }

    /// The data of an `ACPI_DEVICE_OST` event: the guest's answer to an ACPI hotplug
    /// request (a non-zero status on an eject means the guest refused to give the DIMM up).
    pub fn acpi_device_ost(&self) -> Option<AcpiOstInfo> {
        #[derive(Deserialize)]
        struct Data {
            info: AcpiOstInfo,
        }
        (self.name == AcpiOstInfo::EVENT)
            .then(|| self.data_as::<Data>().ok())
            .flatten()
            .map(|d| d.info)
    }
}

/// `DEVICE_DELETED`: QEMU removed a device. After `device_del` of a DIMM this is the signal
/// that the guest ejected it and its backend can be deleted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeviceDeleted {
    /// The device's id, when it has one.
    #[serde(default)]
    pub device: Option<String>,
    /// The device's QOM path.
    pub path: String,
}

impl DeviceDeleted {
    /// The event's name.
    pub const NAME: &'static str = "DEVICE_DELETED";
}

/// QEMU's `ACPIOSTInfo`: an ACPI `_OST` status the guest reported for a hotplug slot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AcpiOstInfo {
    /// The device's id, when it has one.
    #[serde(default)]
    pub device: Option<String>,
    /// The slot's index, as a string.
    pub slot: String,
    /// `DIMM` or `CPU`.
    pub slot_type: String,
    /// The ACPI `_OST` source event code (`0x3` eject request, `0x103` ejecting done, ...).
    pub source: i64,
    /// The ACPI `_OST` status code; 0 is success.
    pub status: i64,
}

impl AcpiOstInfo {
    /// The name of the event carrying it.
    pub const EVENT: &'static str = "ACPI_DEVICE_OST";
}

/// Waits on `events` for the first event `matches` accepts, until `deadline`.
///
/// Subscribe (with [`Qmp::events`](crate::Qmp::events)) *before* sending the command whose
/// event you wait for, or it may come before you listen. Fails with
/// [`QmpError::Timeout`] (naming `what`) when the deadline passes,
/// [`QmpError::Protocol`] when the receiver fell behind and events were dropped (the one
/// awaited may be among them: query QEMU's state instead), and
/// [`QmpError::Unavailable`] when the client is gone. Events are not delivered across a
/// lost connection: QEMU does not replay what it emitted while no client was attached, so
/// compare [`Qmp::connections`](crate::Qmp::connections) before and after, and re-query
/// state when it changed.
pub async fn wait_for_event(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    deadline: Instant,
    mut matches: impl FnMut(&Event) -> bool,
) -> Result<Event, QmpError> {
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: what.to_string(),
                });
            }
            Ok(Ok(event)) if matches(&event) => return Ok(event),
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                return Err(QmpError::Protocol(format!(
                    "{n} QMP events were dropped while waiting for {what} \
                     (the receiver fell behind; raise event_capacity)"
                )));
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err(QmpError::Unavailable("the QMP client was dropped".into()));
            }
        }
    }
}
