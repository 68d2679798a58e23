//! The memory part of a libvirt domain's live XML: boot memory, DIMM slots, maximum
//! memory and the DIMMs, with libvirt's units.

use crate::backend::{DimmDevice, VirtioMemDevice};

/// A domain's memory, from its live XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainMemory {
    /// Memory at boot, bytes: `<memory>` less the DIMMs and virtio-mem devices.
    pub boot: u64,
    /// DIMM slots (`<maxMemory slots=...>`).
    pub slots: Option<u64>,
    /// The most memory the domain may have, bytes (`<maxMemory>`).
    pub max: Option<u64>,
    /// Its DIMMs.
    pub dimms: Vec<DimmDevice>,
    /// Its virtio-mem devices.
    pub virtio_mem: Vec<VirtioMemDevice>,
}

/// Largest domain XML read; libvirt's are a few KiB.
pub const MAX_XML_BYTES: usize = 4 << 20;

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

/// Bytes in a libvirt size element (its text in its `unit`).
pub(super) fn size_of(node: roxmltree::Node) -> Result<u64, String> {
    scaled(node.text().unwrap_or_default(), node.attribute("unit"))
}

/// `node`'s first child element named `name`.
pub(super) fn child<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
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
    let mut virtio_mem = Vec::new();
    if let Some(devices) = child(domain, "devices") {
        for memory in devices
            .children()
            .filter(|c| c.has_tag_name("memory") && c.attribute("model") == Some("virtio-mem"))
        {
            virtio_mem.push(virtio_mem_device(memory)?);
        }
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
    // libvirt's <memory> counts every memory device at its full size.
    let plugged: u64 = dimms.iter().map(|d| d.size).sum();
    let virtio: u64 = virtio_mem.iter().map(|v| v.max_size).sum();
    Ok(DomainMemory {
        boot: total.saturating_sub(plugged).saturating_sub(virtio),
        slots,
        max,
        dimms,
        virtio_mem,
    })
}

/// The live XML of virtio-mem device `alias` from the domain's `xml`, with `<requested>`
/// set to `bytes`: what `virDomainUpdateDeviceFlags` takes (libvirt finds the device by
/// all of it, its PCI address included, so it is kept as libvirt wrote it).
pub fn virtio_mem_requested(xml: &str, alias: &str, bytes: u64) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let device = doc
        .descendants()
        .filter(|n| n.has_tag_name("memory") && n.attribute("model") == Some("virtio-mem"))
        .find(|n| child(*n, "alias").and_then(|a| a.attribute("name")) == Some(alias))
        .ok_or_else(|| format!("the domain has no virtio-mem device '{alias}'"))?;
    let requested = child(device, "target")
        .and_then(|t| child(t, "requested"))
        .ok_or_else(|| format!("virtio-mem device '{alias}' has no <requested>"))?;
    let (d, r) = (device.range(), requested.range());
    Ok(format!(
        "{}<requested unit='b'>{bytes}</requested>{}",
        &xml[d.start..r.start],
        &xml[r.end..d.end]
    ))
}

/// A `<memory model='virtio-mem'>` device: `<target>` with `<size>` (the most it can
/// plug), `<node>`, `<block>`, `<requested>`, `<current>` (what the guest plugged) and,
/// where libvirt tells it, `<address base=...>`.
fn virtio_mem_device(memory: roxmltree::Node) -> Result<VirtioMemDevice, String> {
    let target = child(memory, "target").ok_or("a virtio-mem device has no <target>")?;
    let sized = |name: &str| -> Result<u64, String> {
        child(target, name)
            .ok_or_else(|| format!("a virtio-mem device has no <{name}>"))
            .map(size_of)?
    };
    let node = child(target, "node")
        .and_then(|n| n.text())
        .and_then(number)
        .unwrap_or(0);
    Ok(VirtioMemDevice {
        id: child(memory, "alias")
            .and_then(|a| a.attribute("name"))
            .unwrap_or_default()
            .to_string(),
        addr: child(target, "address")
            .and_then(|a| a.attribute("base"))
            .and_then(number),
        node: u32::try_from(node).unwrap_or(u32::MAX),
        block_size: sized("block")?,
        max_size: sized("size")?,
        requested_size: sized("requested")?,
        plugged_size: child(target, "current")
            .map(size_of)
            .transpose()?
            .unwrap_or(0),
        memdev: String::new(),
    })
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

    /// A virtio-mem device as libvirt 9.0 writes it in the live XML.
    const VIRTIO_MEM: &str = r#"<domain type='qemu' id='7'>
  <memory unit='KiB'>2621440</memory>
  <devices>
    <memory model='virtio-mem'>
      <target>
        <size unit='KiB'>2097152</size>
        <node>0</node>
        <block unit='KiB'>2048</block>
        <requested unit='KiB'>1048576</requested>
        <current unit='KiB'>524288</current>
      </target>
      <alias name='virtiomem0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </memory>
  </devices>
</domain>"#;

    #[test]
    fn virtio_mem_devices_are_read_and_their_requested_size_rewritten() {
        let m = parse(VIRTIO_MEM).expect("parse");
        assert_eq!(
            m.boot,
            512 << 20,
            "<memory> counts the device at its full size"
        );
        let v = &m.virtio_mem[0];
        assert_eq!(
            (
                v.id.as_str(),
                v.addr,
                v.max_size,
                v.block_size,
                v.requested_size,
                v.plugged_size
            ),
            ("virtiomem0", None, 2 << 30, 2 << 20, 1 << 30, 512 << 20)
        );
        let update = virtio_mem_requested(VIRTIO_MEM, "virtiomem0", 0).expect("found");
        assert!(
            update.starts_with("<memory model='virtio-mem'>"),
            "{update}"
        );
        assert!(update.ends_with("</memory>"), "{update}");
        assert!(
            update.contains("<requested unit='b'>0</requested>"),
            "{update}"
        );
        assert!(
            update.contains("slot='0x03'"),
            "the PCI address is kept: {update}"
        );
        let again = parse(&format!(
            "<domain><memory>1</memory><devices>{update}</devices></domain>"
        ));
        assert_eq!(again.map(|m| m.virtio_mem[0].requested_size), Ok(0));
        assert!(virtio_mem_requested(VIRTIO_MEM, "virtiomem9", 0).is_err());
    }
}
