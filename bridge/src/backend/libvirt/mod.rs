//! [`MemoryBackend`] through libvirt, for domains it runs: a DIMM is a
//! `<memory model='dimm'>` device attached and detached live, so libvirt's view of the
//! domain (its live XML) stays true. libvirt makes and deletes a DIMM's memory backend
//! itself, and tells of additions and removals with events. A virtio-mem device is
//! resized with a live update of its `<requested>`; what the guest plugged, and where the
//! device lives, are read from QEMU (see [`LibvirtBackend::qemu_virtio_mem`]). The
//! virtio balloon is in [`balloon`].

pub mod balloon;
pub mod xml;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use qga_libvirt::{Dom, Event, LIBVIRT_OWN_WAIT, Libvirt, LibvirtError};
use qga_qmp::{MemoryDevice, VirtioMemDeviceInfo};
use tokio::{sync::broadcast, time::Instant};

use self::xml::{DomainMemory, MAX_XML_BYTES};
use super::{
    Added, BackendError, BalloonDevice, BalloonStats, Deleted, DimmDevice, EjectWatch, Ejection,
    MemoryBackend, MemorySize, NewDimm, NotAdded, Room, Step, Timeouts, VirtioMemDevice,
};

/// One run of a libvirt domain, through the bridge's libvirt connection.
#[derive(Debug, Clone)]
pub struct LibvirtBackend {
    libvirt: Arc<Libvirt>,
    dom: Dom,
    timeouts: Timeouts,
}

impl LibvirtBackend {
    /// The backend of domain run `dom`.
    pub fn new(libvirt: Arc<Libvirt>, dom: Dom, timeouts: Timeouts) -> Self {
        Self {
            libvirt,
            dom,
            timeouts,
        }
    }

    /// The domain's live XML, refused over [`MAX_XML_BYTES`].
    async fn live_xml(&self, until: Instant) -> Result<String, BackendError> {
        let xml = self
            .libvirt
            .domain_xml(&self.dom, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("dumpxml", e))?;
        if xml.len() > MAX_XML_BYTES {
            return Err(BackendError::Unavailable(format!(
                "libvirt's domain XML is over {MAX_XML_BYTES} bytes"
            )));
        }
        Ok(xml)
    }

    /// The domain's memory now, from its live XML.
    async fn domain_memory(&self, until: Instant) -> Result<DomainMemory, BackendError> {
        let xml = self.live_xml(until).await?;
        xml::parse(&xml).map_err(|reason| BackendError::Unavailable(format!("libvirt: {reason}")))
    }

    /// Waits for libvirt's device-added event on this domain (a second at most), then
    /// checks that the live XML lists DIMM `alias`.
    async fn confirm_added(
        &self,
        mut events: broadcast::Receiver<Event>,
        alias: &str,
        until: Instant,
    ) -> Result<(), BackendError> {
        let wait = self
            .timeouts
            .command_until(until)
            .min(Instant::now() + Duration::from_secs(1));
        loop {
            match tokio::time::timeout_at(wait, events.recv()).await {
                Ok(Ok(Event::DeviceAdded { domain, .. })) if domain == self.dom.name => break,
                Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
        }
        let listed = self.domain_memory(until).await?;
        if listed.dimms.iter().any(|d| d.id == alias) {
            Ok(())
        } else {
            Err(BackendError::Refused {
                step: "attach-device".into(),
                reason: format!("libvirt accepted DIMM {alias} but does not list it"),
            })
        }
    }
}

impl LibvirtBackend {
    /// QEMU's own view of the domain's virtio-mem devices, by id (libvirt's alias):
    /// `query-memory-devices` through libvirt's monitor passthrough, which libvirt notes
    /// as a `custom-monitor` taint. libvirt 9.0's XML does not tell a device's address,
    /// and its `<current>` follows QEMU's size-change event, which QEMU sends at most once
    /// a second: a growth would be seen up to a second late.
    async fn qemu_virtio_mem(
        &self,
        until: Instant,
    ) -> Result<HashMap<String, VirtioMemDeviceInfo>, BackendError> {
        let reply = self
            .libvirt
            .qemu_monitor(
                &self.dom,
                r#"{"execute":"query-memory-devices"}"#,
                self.timeouts.command_until(until),
            )
            .await
            .map_err(|e| error("query-memory-devices", e))?;
        #[derive(serde::Deserialize)]
        struct Reply {
            #[serde(rename = "return")]
            devices: Vec<MemoryDevice>,
        }
        let reply: Reply = serde_json::from_str(&reply)
            .map_err(|e| BackendError::BadReply(format!("QEMU through libvirt: {e}")))?;
        Ok(reply
            .devices
            .into_iter()
            .filter_map(|d| match d {
                MemoryDevice::VirtioMem(v) => Some((v.id.clone()?, v)),
                _ => None,
            })
            .collect())
    }
}

/// libvirt's error for `step`.
fn error(step: &str, e: LibvirtError) -> BackendError {
    match e {
        LibvirtError::Unavailable(reason) | LibvirtError::NotRunning(reason) => {
            BackendError::Unavailable(format!("libvirt: {reason}"))
        }
        LibvirtError::Busy(reason) => BackendError::Busy(reason),
        LibvirtError::Timeout | LibvirtError::TimedOut(_) => BackendError::Timeout {
            command: step.to_string(),
        },
        e @ (LibvirtError::Refused { .. }
        | LibvirtError::AgentFailed(_)
        | LibvirtError::AgentUnresponsive(_)) => BackendError::Refused {
            step: step.to_string(),
            reason: e.to_string(),
        },
    }
}

/// The device XML of DIMM `alias` of `size` bytes on NUMA node `node`.
fn dimm_xml(alias: &str, size: u64, node: u32) -> String {
    format!(
        "<memory model='dimm'><target><size unit='b'>{size}</size><node>{node}</node>\
         </target><alias name='{alias}'/></memory>"
    )
}

/// The first `ua-qga-dimmN` no DIMM has: a user alias (libvirt keeps the `ua-` ones it is
/// given), so the DIMM is known by name before libvirt is even asked.
fn free_alias(before: &[DimmDevice]) -> String {
    (0..)
        .map(|n| format!("ua-qga-dimm{n}"))
        .find(|a| !before.iter().any(|d| &d.id == a))
        .unwrap_or_default()
}

#[async_trait]
impl MemoryBackend for LibvirtBackend {
    async fn dimms(&self, until: Instant) -> Result<Vec<DimmDevice>, BackendError> {
        Ok(self.domain_memory(until).await?.dimms)
    }

    async fn memory(&self, until: Instant) -> Result<MemorySize, BackendError> {
        let m = self.domain_memory(until).await?;
        Ok(MemorySize {
            boot: m.boot,
            plugged: m.dimms.iter().map(|d| d.size).sum::<u64>()
                + m.virtio_mem.iter().map(|v| v.plugged_size).sum::<u64>(),
        })
    }

    async fn room(&self, until: Instant) -> Result<Option<Room>, BackendError> {
        let m = self.domain_memory(until).await?;
        let Some(slots) = m.slots else {
            return Err(BackendError::Refused {
                step: "check".into(),
                reason: "the domain has no <maxMemory slots='N'>, so libvirt cannot plug \
                         memory into it; nothing was done"
                    .into(),
            });
        };
        Ok(Some(Room {
            slots,
            max: m.max,
            boot: Some(m.boot),
        }))
    }

    /// None: libvirt deletes a DIMM's backend with the DIMM.
    async fn unused_backends(
        &self,
        _dimms: &[DimmDevice],
        _until: Instant,
    ) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }

    async fn delete_backend(
        &self,
        _memdev: &str,
        _until: Instant,
    ) -> Result<Deleted, BackendError> {
        Ok(Deleted::NotOurs)
    }

    /// Attaches the DIMM under a fresh user alias, confirmed once libvirt's device-added
    /// event came (or a second passed) and the live XML lists it. A refusal made nothing;
    /// any other failure may have made the DIMM, under that alias.
    async fn add_dimm(&self, new: NewDimm<'_>, steps: &mut Vec<Step>) -> Result<Added, NotAdded> {
        let alias = free_alias(new.dimms);
        let unknown = |error| NotAdded::Unknown {
            error,
            dimm: alias.clone(),
            memdev: String::new(),
        };
        let events = self.libvirt.subscribe();
        let start = Instant::now();
        // libvirt may wait for the domain's job lock before it even starts.
        let attach_until =
            (Instant::now() + self.timeouts.command + LIBVIRT_OWN_WAIT).min(new.until);
        let xml = dimm_xml(&alias, new.size, new.node.unwrap_or(0));
        if let Err(e) = self
            .libvirt
            .attach_device(&self.dom, &xml, attach_until)
            .await
        {
            let refused = matches!(e, LibvirtError::Refused { .. } | LibvirtError::Busy(_));
            let e = error("attach-device", e);
            return Err(if refused {
                NotAdded::Refused(e)
            } else {
                unknown(e)
            });
        }
        self.confirm_added(events, &alias, new.until)
            .await
            .map_err(unknown)?;
        steps.push(Step::since(
            "attach-device",
            start,
            format!("dimm {alias}, {} bytes", new.size),
        ));
        Ok(Added {
            memdev: format!("mem{alias}"),
            dimm: alias,
        })
    }

    /// `virDomainDetachDeviceAlias`, which returns once the request is sent: the removal
    /// event, the removal-failed event or the DIMM's absence from the XML decides.
    async fn remove_dimm(&self, id: &str, until: Instant) -> Result<(), BackendError> {
        let detach_until = (Instant::now() + self.timeouts.eject).min(until);
        match self.libvirt.detach_alias(&self.dom, id, detach_until).await {
            Ok(()) | Err(LibvirtError::Timeout) => Ok(()),
            Err(e) => Err(error("device_del", e)),
        }
    }

    fn watch(&self, id: &str) -> Box<dyn EjectWatch> {
        Box::new(LibvirtEjectWatch {
            events: self.libvirt.subscribe(),
            domain: self.dom.name.clone(),
            alias: id.to_string(),
        })
    }

    async fn virtio_mem(&self, until: Instant) -> Result<Vec<VirtioMemDevice>, BackendError> {
        let mut devices = self.domain_memory(until).await?.virtio_mem;
        if devices.is_empty() {
            return Ok(devices);
        }
        // QEMU's address and sizes; libvirt's word where QEMU does not list the device.
        let live = self.qemu_virtio_mem(until).await?;
        for d in &mut devices {
            if let Some(q) = live.get(&d.id) {
                d.addr = Some(q.memaddr);
                d.requested_size = q.requested_size;
                d.plugged_size = q.size;
            }
        }
        Ok(devices)
    }

    async fn set_requested_size(
        &self,
        id: &str,
        bytes: u64,
        until: Instant,
    ) -> Result<(), BackendError> {
        let deadline = self.timeouts.command_until(until);
        let xml = self
            .libvirt
            .domain_xml(&self.dom, deadline)
            .await
            .map_err(|e| error("dumpxml", e))?;
        let device =
            xml::virtio_mem_requested(&xml, id, bytes).map_err(|reason| BackendError::Refused {
                step: "update-device".into(),
                reason,
            })?;
        self.libvirt
            .update_device(&self.dom, &device, deadline)
            .await
            .map_err(|e| error("update-device", e))
    }

    async fn balloon(&self, until: Instant) -> Result<Option<BalloonDevice>, BackendError> {
        self.balloon_device(until).await
    }

    async fn balloon_actual(&self, until: Instant) -> Result<Option<u64>, BackendError> {
        self.balloon_actual_only(until).await
    }

    async fn set_balloon(&self, target: u64, until: Instant) -> Result<(), BackendError> {
        self.request_balloon(target, until).await
    }

    async fn balloon_stats(
        &self,
        interval: u64,
        until: Instant,
    ) -> Result<Option<BalloonStats>, BackendError> {
        self.guest_stats(interval, until).await
    }
}

/// libvirt's device-removed and device-removal-failed events about one DIMM.
struct LibvirtEjectWatch {
    events: broadcast::Receiver<Event>,
    domain: String,
    alias: String,
}

#[async_trait]
impl EjectWatch for LibvirtEjectWatch {
    async fn next(&mut self) -> Option<Ejection> {
        let ours = |domain: &str, alias: &str| domain == self.domain && alias == self.alias;
        match self.events.recv().await {
            Ok(Event::DeviceRemoved { domain, alias }) if ours(&domain, &alias) => {
                Some(Ejection::Deleted)
            }
            Ok(Event::DeviceRemovalFailed { domain, alias }) if ours(&domain, &alias) => {
                Some(Ejection::Refused(
                    "the guest refused to eject the DIMM (libvirt: device removal failed)".into(),
                ))
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => Some(Ejection::Other),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
