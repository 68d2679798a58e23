//! The virtio balloon through libvirt: the device and its settings from the live XML
//! (`<memballoon model='virtio' autodeflate='on' freePageReporting='on'>` with
//! `<alias name='balloon0'/>` and `<stats period='N'/>`; model `none` is no balloon),
//! `actual` and the guest driver's statistics from `virDomainMemoryStats` (KiB, and
//! libvirt's names: `AVAILABLE` is the guest's total, `USABLE` its available), the target
//! with `virDomainSetMemoryFlags`, which libvirt turns into QMP `balloon`.

use qga_libvirt::MemoryStats;
use tokio::time::Instant;

use super::{LibvirtBackend, error, xml::child};
use crate::backend::{
    BackendError, BalloonDevice, BalloonStats,
    balloon::{check_target, no_balloon},
};

/// A domain's balloon as its live XML tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemBalloon {
    /// Its alias (QEMU's device id), empty where libvirt wrote none.
    pub alias: String,
    /// `autodeflate='on'` (QEMU's `deflate-on-oom`).
    pub autodeflate: bool,
    /// `freePageReporting='on'`.
    pub free_page_reporting: bool,
    /// `<stats period='N'/>`: how often QEMU asks the driver for statistics, seconds; 0
    /// where libvirt writes none (not asked).
    pub period: u64,
}

/// The balloon part of a domain's live XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainBalloon {
    /// The balloon, if the domain has one.
    pub balloon: Option<MemBalloon>,
    /// `<currentMemory>`, bytes: libvirt's last word on QEMU's `actual`.
    pub current: Option<u64>,
}

/// The balloon part of a domain's live XML.
pub fn parse(xml: &str) -> Result<DomainBalloon, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let domain = doc.root_element();
    let current = child(domain, "currentMemory")
        .map(super::xml::size_of)
        .transpose()?;
    let balloon = child(domain, "devices")
        .and_then(|d| child(d, "memballoon"))
        .filter(|b| {
            b.attribute("model")
                .is_some_and(|m| m.starts_with("virtio"))
        })
        .map(|b| {
            let on = |name| b.attribute(name) == Some("on");
            let period = child(b, "stats").and_then(|s| s.attribute("period"));
            Ok::<_, String>(MemBalloon {
                alias: child(b, "alias")
                    .and_then(|a| a.attribute("name"))
                    .unwrap_or_default()
                    .to_string(),
                autodeflate: on("autodeflate"),
                free_page_reporting: on("freePageReporting"),
                period: period
                    .map(|p| p.trim().parse().map_err(|_| format!("stats period '{p}'")))
                    .transpose()?
                    .unwrap_or(0),
            })
        })
        .transpose()?;
    Ok(DomainBalloon { balloon, current })
}

/// KiB as bytes; a value too large to be bytes is none.
fn bytes(kib: Option<u64>) -> Option<u64> {
    kib.and_then(|k| k.checked_mul(1024))
}

/// libvirt's statistics as the backend reports them, in bytes and the guest's names.
fn stats_of(s: &MemoryStats) -> BalloonStats {
    BalloonStats {
        last_update: s.last_update.filter(|t| *t > 0),
        swap_in_bytes: bytes(s.swap_in_kib),
        swap_out_bytes: bytes(s.swap_out_kib),
        major_faults: s.major_faults,
        minor_faults: s.minor_faults,
        free_bytes: bytes(s.unused_kib),
        total_bytes: bytes(s.available_kib),
        available_bytes: bytes(s.usable_kib),
        disk_caches_bytes: bytes(s.disk_caches_kib),
        hugetlb_allocations: s.hugetlb_pgalloc,
        hugetlb_failures: s.hugetlb_pgfail,
    }
}

impl LibvirtBackend {
    /// The balloon part of the domain's live XML.
    async fn domain_balloon(&self, until: Instant) -> Result<DomainBalloon, BackendError> {
        let xml = self.live_xml(until).await?;
        parse(&xml).map_err(|reason| BackendError::Unavailable(format!("libvirt: {reason}")))
    }

    /// `virDomainMemoryStats`.
    async fn memory_stats(&self, until: Instant) -> Result<MemoryStats, BackendError> {
        self.libvirt
            .memory_stats(&self.dom, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("dommemstat", e))
    }

    /// See [`MemoryBackend::balloon`](crate::backend::MemoryBackend::balloon).
    pub(super) async fn balloon_device(
        &self,
        until: Instant,
    ) -> Result<Option<BalloonDevice>, BackendError> {
        let domain = self.domain_balloon(until).await?;
        let Some(balloon) = domain.balloon else {
            return Ok(None);
        };
        let actual = bytes(self.memory_stats(until).await?.actual_balloon_kib)
            .or(domain.current)
            .ok_or_else(|| {
                BackendError::BadReply(
                    "libvirt tells neither the balloon's actual size nor <currentMemory>".into(),
                )
            })?;
        Ok(Some(BalloonDevice {
            id: balloon.alias,
            deflate_on_oom: balloon.autodeflate,
            free_page_reporting: balloon.free_page_reporting,
            actual,
            stats_interval: Some(balloon.period),
        }))
    }

    /// See [`MemoryBackend::balloon_actual`](crate::backend::MemoryBackend::balloon_actual):
    /// the memory statistics alone where they tell it (an operation reads it every few
    /// milliseconds), the live XML too where they do not.
    pub(super) async fn balloon_actual_only(
        &self,
        until: Instant,
    ) -> Result<Option<u64>, BackendError> {
        match bytes(self.memory_stats(until).await?.actual_balloon_kib) {
            Some(actual) => Ok(Some(actual)),
            None => Ok(self.balloon_device(until).await?.map(|d| d.actual)),
        }
    }

    /// See [`MemoryBackend::set_balloon`](crate::backend::MemoryBackend::set_balloon):
    /// libvirt takes KiB, so `target` is rounded down to a KiB.
    pub(super) async fn request_balloon(
        &self,
        target: u64,
        until: Instant,
    ) -> Result<(), BackendError> {
        check_target(target, 1024)?;
        if self.domain_balloon(until).await?.balloon.is_none() {
            return Err(no_balloon());
        }
        self.libvirt
            .set_memory(&self.dom, target / 1024, self.timeouts.command_until(until))
            .await
            .map_err(|e| error("setmem", e))
    }

    /// See [`MemoryBackend::balloon_stats`](crate::backend::MemoryBackend::balloon_stats).
    pub(super) async fn guest_stats(
        &self,
        interval: u64,
        until: Instant,
    ) -> Result<Option<BalloonStats>, BackendError> {
        let Some(balloon) = self.domain_balloon(until).await?.balloon else {
            return Ok(None);
        };
        if balloon.period == 0 && interval > 0 {
            let secs = u32::try_from(interval).unwrap_or(u32::MAX);
            self.libvirt
                .set_memory_stats_period(&self.dom, secs, self.timeouts.command_until(until))
                .await
                .map_err(|e| error("dommemstat-period", e))?;
        }
        Ok(Some(stats_of(&self.memory_stats(until).await?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live domain XML as libvirt 9.0 writes it for a balloon with its options on.
    const XML: &str = r#"<domain type='kvm' id='4'>
  <name>vm1</name>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>786432</currentMemory>
  <devices>
    <memballoon model='virtio' autodeflate='on' freePageReporting='on'>
      <stats period='10'/>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </memballoon>
  </devices>
</domain>"#;

    #[test]
    fn the_balloon_its_options_and_period_come_from_the_live_xml() {
        let d = parse(XML).expect("parses");
        assert_eq!(d.current, Some(768 << 20));
        assert_eq!(
            d.balloon,
            Some(MemBalloon {
                alias: "balloon0".into(),
                autodeflate: true,
                free_page_reporting: true,
                period: 10,
            })
        );
    }

    #[test]
    fn options_left_out_are_off_and_no_stats_is_period_0() {
        let xml = "<domain><currentMemory unit='MiB'>512</currentMemory><devices>\
                   <memballoon model='virtio' autodeflate='off'><alias name='balloon0'/>\
                   </memballoon></devices></domain>";
        let b = parse(xml).expect("parses").balloon.expect("a balloon");
        assert!(!b.autodeflate && !b.free_page_reporting);
        assert_eq!(b.period, 0);
        let xml = "<domain><devices><memballoon model='virtio-non-transitional'/></devices>\
                   </domain>";
        let d = parse(xml).expect("parses");
        assert_eq!(d.balloon.map(|b| b.alias), Some(String::new()));
        assert_eq!(d.current, None);
    }

    #[test]
    fn model_none_or_no_memballoon_is_no_balloon() {
        let none = "<domain><devices><memballoon model='none'/></devices></domain>";
        assert_eq!(parse(none).map(|d| d.balloon), Ok(None));
        assert_eq!(
            parse("<domain><devices/></domain>").map(|d| d.balloon),
            Ok(None)
        );
        assert_eq!(parse("<domain/>").map(|d| d.balloon), Ok(None));
    }

    #[test]
    fn broken_xml_or_a_bad_period_is_an_error() {
        assert!(parse("<domain>").is_err());
        let bad = "<domain><devices><memballoon model='virtio'><stats period='soon'/>\
                   </memballoon></devices></domain>";
        assert!(parse(bad).is_err());
    }

    #[test]
    fn statistics_turn_to_bytes_under_the_guests_names() {
        let s = MemoryStats {
            swap_in_kib: Some(4),
            unused_kib: Some(100 << 10),
            available_kib: Some(400 << 10),
            usable_kib: Some(300 << 10),
            disk_caches_kib: Some(u64::MAX),
            actual_balloon_kib: Some(512 << 10),
            last_update: Some(1_700_000_000),
            major_faults: Some(3),
            ..MemoryStats::default()
        };
        let b = stats_of(&s);
        assert_eq!(b.swap_in_bytes, Some(4096));
        assert_eq!(b.free_bytes, Some(100 << 20), "UNUSED is MemFree");
        assert_eq!(b.total_bytes, Some(400 << 20), "AVAILABLE is MemTotal");
        assert_eq!(b.available_bytes, Some(300 << 20), "USABLE is MemAvailable");
        assert_eq!(b.disk_caches_bytes, None, "too large to be bytes");
        assert_eq!((b.major_faults, b.minor_faults), (Some(3), None));
        assert!(b.reported());
        let never = stats_of(&MemoryStats {
            last_update: Some(0),
            ..MemoryStats::default()
        });
        assert_eq!(never, BalloonStats::default());
    }
}
