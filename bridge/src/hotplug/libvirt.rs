//! Memory hotplug through libvirt, for domains it runs: a DIMM is a
//! `<memory model='dimm'>` device attached and detached live, so libvirt's view of the
//! domain (its live XML) stays true. libvirt names the device (`dimmN`), makes and deletes
//! its memory backend itself, and tells of additions and removals with events.

use std::time::Duration;

use std::sync::Arc;

use qga_libvirt::{Dom, Event, LIBVIRT_OWN_WAIT, Libvirt, LibvirtError};
use tokio::{sync::broadcast, time::Instant};

use super::{layout::DimmDevice, ops::Ctx, qemu::NotAdded};
use crate::error::BridgeError;

/// A libvirt domain's hypervisor side: libvirt, and the domain run it serves.
#[derive(Debug, Clone)]
pub struct LibvirtVm {
    /// The connection.
    pub libvirt: Arc<Libvirt>,
    /// The domain run.
    pub dom: Dom,
}

/// A domain's memory, from its live XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainMemory {
    /// Memory at boot, bytes: `<memory>` less the DIMMs.
    pub boot: u64,
    /// DIMM slots (`<maxMemory slots=...>`).
    pub slots: Option<u64>,
    /// The most memory the domain may have, bytes (`<maxMemory>`).
    pub max: Option<u64>,
    /// Its DIMMs.
    pub dimms: Vec<DimmDevice>,
}

/// Largest domain XML read; libvirt's are a few KiB.
const MAX_XML_BYTES: usize = 4 << 20;

/// Bytes in `value` of libvirt's `unit` (default KiB, as libvirt's).
fn scaled(value: &str, unit: Option<&str>) -> Result<u64, String> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("'{value}' is not a size"))?;
    let factor: u64 = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1_000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        other => return Err(format!("unknown unit '{other}'")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{value} {factor} overflows"))
}

fn size_of(node: roxmltree::Node) -> Result<u64, String> {
    scaled(node.text().unwrap_or_default(), node.attribute("unit"))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The memory part of a domain's live XML.
pub fn parse(xml: &str) -> Result<DomainMemory, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let domain = doc.root_element();
    let total = child(domain, "memory")
        .ok_or("domain XML has no <memory>")
        .map(size_of)??;
    let max_memory = child(domain, "maxMemory");
    let slots = max_memory
        .and_then(|m| m.attribute("slots"))
        .and_then(number);
    let max = max_memory.map(size_of).transpose()?;
    let mut dimms = Vec::new();
    if let Some(devices) = child(domain, "devices") {
        for memory in devices
            .children()
            .filter(|c| c.has_tag_name("memory") && c.attribute("model") == Some("dimm"))
        {
            let target = child(memory, "target").ok_or("a <memory> device has no <target>")?;
            let size = child(target, "size")
                .ok_or("a <memory> device has no size")
                .map(size_of)??;
            let node = child(target, "node")
                .and_then(|n| n.text())
                .and_then(number)
                .unwrap_or(0);
            let alias = child(memory, "alias")
                .and_then(|a| a.attribute("name"))
                .unwrap_or_default()
                .to_string();
            let address = child(memory, "address").filter(|a| a.attribute("type") == Some("dimm"));
            let attr = |name| address.and_then(|a| a.attribute(name)).and_then(number);
            dimms.push(DimmDevice {
                // libvirt names the backend after the device: `mem` + alias.
                memdev: format!("mem{alias}"),
                id: alias,
                addr: attr("base").unwrap_or(0),
                size,
                node: u32::try_from(node).unwrap_or(u32::MAX),
                slot: u32::try_from(attr("slot").unwrap_or(0)).unwrap_or(u32::MAX),
                hotplugged: true,
                hotpluggable: true,
            });
        }
    }
    let plugged: u64 = dimms.iter().map(|d| d.size).sum();
    Ok(DomainMemory {
        boot: total.saturating_sub(plugged),
        slots,
        max,
        dimms,
    })
}

/// libvirt's error for `step` as the bridge reports it.
pub fn error(ctx: &Ctx, step: &str, e: LibvirtError) -> BridgeError {
    match e {
        LibvirtError::Unavailable(reason) | LibvirtError::NotRunning(reason) => {
            BridgeError::Unavailable {
                vm: ctx.vm.clone(),
                reason: format!("libvirt: {reason}"),
            }
        }
        LibvirtError::Busy(reason) => BridgeError::Busy {
            vm: ctx.vm.clone(),
            reason,
        },
        LibvirtError::Timeout | LibvirtError::TimedOut(_) => BridgeError::DeadlineExceeded {
            vm: ctx.vm.clone(),
            command: step.to_string(),
        },
        e @ (LibvirtError::Refused { .. }
        | LibvirtError::AgentFailed(_)
        | LibvirtError::AgentUnresponsive(_)) => BridgeError::Hotplug {
            vm: ctx.vm.clone(),
            step: step.to_string(),
            reason: e.to_string(),
            blocks: Vec::new(),
        },
    }
}

fn deadline(ctx: &Ctx) -> Instant {
    (Instant::now() + Duration::from_millis(ctx.settings.qmp_timeout_ms)).min(ctx.deadline)
}

/// The domain's memory now.
pub async fn memory(ctx: &Ctx, lv: &LibvirtVm) -> Result<DomainMemory, BridgeError> {
    let xml = lv
        .libvirt
        .domain_xml(&lv.dom, deadline(ctx))
        .await
        .map_err(|e| error(ctx, "dumpxml", e))?;
    if xml.len() > MAX_XML_BYTES {
        return Err(BridgeError::Unavailable {
            vm: ctx.vm.clone(),
            reason: format!("libvirt's domain XML is over {MAX_XML_BYTES} bytes"),
        });
    }
    parse(&xml).map_err(|reason| BridgeError::Unavailable {
        vm: ctx.vm.clone(),
        reason: format!("libvirt: {reason}"),
    })
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

/// Attaches a DIMM of `size` bytes under a fresh user alias and returns the alias, once
/// libvirt's device-added event came (or a second passed) and the live XML lists it. A
/// refusal made nothing; any other failure may have made the DIMM, under that alias.
pub async fn attach(
    ctx: &mut Ctx,
    lv: &LibvirtVm,
    before: &[DimmDevice],
    size: u64,
    node: Option<u32>,
) -> Result<String, NotAdded> {
    let alias = free_alias(before);
    let mut events = lv.libvirt.subscribe();
    let start = Instant::now();
    // libvirt may wait for the domain's job lock before it even starts.
    let until =
        (Instant::now() + Duration::from_millis(ctx.settings.qmp_timeout_ms) + LIBVIRT_OWN_WAIT)
            .min(ctx.deadline);
    let xml = dimm_xml(&alias, size, node.unwrap_or(0));
    if let Err(e) = lv.libvirt.attach_device(&lv.dom, &xml, until).await {
        let refused = matches!(e, LibvirtError::Refused { .. } | LibvirtError::Busy(_));
        let e = error(ctx, "attach-device", e);
        return Err(if refused {
            NotAdded::Refused(e)
        } else {
            NotAdded::Unknown(e, alias, String::new())
        });
    }
    let until = deadline(ctx).min(Instant::now() + Duration::from_secs(1));
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Ok(Event::DeviceAdded { domain, .. })) if domain == lv.dom.name => break,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
        }
    }
    let listed = match memory(ctx, lv).await {
        Ok(m) => m.dimms.iter().any(|d| d.id == alias),
        Err(e) => return Err(NotAdded::Unknown(e, alias, String::new())),
    };
    if !listed {
        let e = BridgeError::Hotplug {
            vm: ctx.vm.clone(),
            step: "attach-device".into(),
            reason: format!("libvirt accepted DIMM {alias} but does not list it"),
            blocks: Vec::new(),
        };
        return Err(NotAdded::Unknown(e, alias, String::new()));
    }
    ctx.step(
        "attach-device",
        start,
        format!("dimm {alias}, {size} bytes"),
    );
    Ok(alias)
}

/// Asks libvirt to detach DIMM `alias` (`virDomainDetachDeviceAlias`, which returns once
/// the request is sent): the removal event, the removal-failed event or the DIMM's absence
/// from the XML decides, as for QEMU's `device_del`.
pub async fn detach(ctx: &Ctx, lv: &LibvirtVm, alias: &str) -> Result<(), BridgeError> {
    let until =
        (Instant::now() + Duration::from_millis(ctx.settings.eject_timeout_ms)).min(ctx.deadline);
    match lv.libvirt.detach_alias(&lv.dom, alias, until).await {
        Ok(()) | Err(LibvirtError::Timeout) => Ok(()),
        Err(e) => Err(error(ctx, "device_del", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory parts of a live domain XML from libvirt 9.0 with one DIMM attached.
    const XML: &str = r#"<domain type='qemu' id='3'>
  <name>vm1</name>
  <maxMemory slots='4' unit='KiB'>4194304</maxMemory>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <devices>
    <memory model='dimm'>
      <target><size unit='KiB'>524288</size><node>0</node></target>
      <alias name='dimm0'/>
      <address type='dimm' slot='0' base='0x100000000'/>
    </memory>
    <memballoon model='none'/>
  </devices>
</domain>"#;

    #[test]
    fn the_live_xml_gives_boot_memory_limits_and_dimms() {
        let m = parse(XML).expect("parses");
        assert_eq!(m.boot, 512 << 20);
        assert_eq!(m.slots, Some(4));
        assert_eq!(m.max, Some(4 << 30));
        assert_eq!(m.dimms.len(), 1);
        let d = &m.dimms[0];
        assert_eq!(
            (
                d.id.as_str(),
                d.memdev.as_str(),
                d.addr,
                d.size,
                d.node,
                d.slot
            ),
            ("dimm0", "memdimm0", 1 << 32, 512 << 20, 0, 0)
        );
    }

    #[test]
    fn sizes_follow_libvirts_units() {
        assert_eq!(scaled("2", Some("GiB")), Ok(2 << 30));
        assert_eq!(scaled("2", Some("GB")), Ok(2_000_000_000));
        assert_eq!(scaled("512", None), Ok(512 << 10));
        assert!(scaled("1", Some("parsecs")).is_err());
        assert!(scaled(&u64::MAX.to_string(), Some("KiB")).is_err());
    }

    #[test]
    fn broken_xml_is_an_error_not_a_guess() {
        assert!(parse("<domain>").is_err());
        assert!(parse("<domain><devices/></domain>").is_err());
        let no_size = "<domain><memory>1</memory><devices><memory model='dimm'><target/>\
                       </memory></devices></domain>";
        assert!(parse(no_size).is_err());
    }
}
