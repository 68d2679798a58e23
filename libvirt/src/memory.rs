//! A domain's memory statistics as `virDomainMemoryStats` gives them: tagged values,
//! only those QEMU and the guest's balloon driver reported.

use virt::sys;

/// `virDomainMemoryStats`, by tag; `None` where libvirt gave no value (libvirt leaves out
/// what the guest's driver has not reported). Sizes are KiB, as libvirt's.
///
/// libvirt's names are not the guest's: `available` is the guest's *total* memory
/// (MemTotal), `usable` what it could still use (MemAvailable), `unused` its free memory
/// (MemFree).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// KiB swapped in since boot (`SWAP_IN`).
    pub swap_in_kib: Option<u64>,
    /// KiB swapped out since boot (`SWAP_OUT`).
    pub swap_out_kib: Option<u64>,
    /// Major page faults since boot (`MAJOR_FAULT`).
    pub major_faults: Option<u64>,
    /// Minor page faults since boot (`MINOR_FAULT`).
    pub minor_faults: Option<u64>,
    /// The guest's free memory, KiB (`UNUSED`, MemFree).
    pub unused_kib: Option<u64>,
    /// The guest's total memory, KiB (`AVAILABLE`, MemTotal).
    pub available_kib: Option<u64>,
    /// The balloon's actual size: the logical VM size less what the balloon holds, KiB
    /// (`ACTUAL_BALLOON`).
    pub actual_balloon_kib: Option<u64>,
    /// QEMU's resident memory on the host, KiB (`RSS`).
    pub rss_kib: Option<u64>,
    /// What the guest could use without swapping, KiB (`USABLE`, MemAvailable).
    pub usable_kib: Option<u64>,
    /// When the guest's driver last reported, seconds since the Unix epoch (`LAST_UPDATE`;
    /// 0: never).
    pub last_update: Option<u64>,
    /// Page cache the guest could drop, KiB (`DISK_CACHES`).
    pub disk_caches_kib: Option<u64>,
    /// Huge page allocations that succeeded (`HUGETLB_PGALLOC`).
    pub hugetlb_pgalloc: Option<u64>,
    /// Huge page allocations that failed (`HUGETLB_PGFAIL`).
    pub hugetlb_pgfail: Option<u64>,
}

impl MemoryStats {
    /// The statistics in libvirt's `(tag, value)` pairs; a tag this code does not know is
    /// skipped.
    pub fn from_tags(tags: impl IntoIterator<Item = (u32, u64)>) -> Self {
        let mut s = Self::default();
        for (tag, value) in tags {
            let slot = match tag {
                sys::VIR_DOMAIN_MEMORY_STAT_SWAP_IN => &mut s.swap_in_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_SWAP_OUT => &mut s.swap_out_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_MAJOR_FAULT => &mut s.major_faults,
                sys::VIR_DOMAIN_MEMORY_STAT_MINOR_FAULT => &mut s.minor_faults,
                sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => &mut s.unused_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE => &mut s.available_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => &mut s.actual_balloon_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_RSS => &mut s.rss_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_USABLE => &mut s.usable_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE => &mut s.last_update,
                sys::VIR_DOMAIN_MEMORY_STAT_DISK_CACHES => &mut s.disk_caches_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_HUGETLB_PGALLOC => &mut s.hugetlb_pgalloc,
                sys::VIR_DOMAIN_MEMORY_STAT_HUGETLB_PGFAIL => &mut s.hugetlb_pgfail,
                _ => continue,
            };
            *slot = Some(value);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_land_in_their_fields_and_unknown_ones_are_skipped() {
        let s = MemoryStats::from_tags([
            (sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON, 524_288),
            (sys::VIR_DOMAIN_MEMORY_STAT_RSS, 100),
            (sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE, 400_000),
            (sys::VIR_DOMAIN_MEMORY_STAT_USABLE, 300_000),
            (sys::VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE, 1_700_000_000),
            (sys::VIR_DOMAIN_MEMORY_STAT_HUGETLB_PGFAIL, 0),
            (99, 1),
        ]);
        assert_eq!(s.actual_balloon_kib, Some(524_288));
        assert_eq!(
            (s.available_kib, s.usable_kib),
            (Some(400_000), Some(300_000))
        );
        assert_eq!(s.last_update, Some(1_700_000_000));
        assert_eq!(s.hugetlb_pgfail, Some(0));
        assert_eq!((s.unused_kib, s.swap_in_kib), (None, None));
    }

    #[test]
    fn nothing_reported_is_all_none() {
        assert_eq!(MemoryStats::from_tags([]), MemoryStats::default());
    }
}
