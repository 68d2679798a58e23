//! The reply of `__org.qga-bridge_get-memory-stats`: the guest kernel's own memory
//! signals, for a host that sizes a VM from what its guest sees.
//!
//! Every reading is optional and absent — never zero — when the guest's kernel does not
//! have it (older kernels lack `MemAvailable`, `KReclaimable`, `Percpu`, the split
//! `workingset_refault_*` counters; kernels without PSI, or booted with `psi=0`, have no
//! pressure file) or when its line could not be parsed. A zero is a zero the kernel
//! reported. Members a later agent adds are ignored by older readers: none of these types
//! denies unknown fields.
//!
//! Units: sizes in bytes (the kernel's `kB` are KiB), PSI averages in percent of wall
//! time, PSI totals in microseconds, counters as the kernel counts them (events or
//! pages, monotonic since boot, so a host computes rates from the differences between
//! two calls of the same boot — see [`GuestMemoryStats::boot_id`]).

use serde::{Deserialize, Serialize};

/// `__org.qga-bridge_get-memory-stats` reply: one snapshot of the guest's memory.
///
/// What a sizing decision reads from it: the working set (about `mem-total` −
/// `mem-available`), the floor below which the guest cannot shrink (anonymous, shmem,
/// unevictable and kernel memory that reclaim cannot free), the distress signals
/// (pressure stalls, OOM kills, direct reclaim, major faults, swapping) and whether the
/// guest rebooted since the last call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryStats {
    /// `/proc/meminfo`.
    #[serde(default)]
    pub meminfo: GuestMeminfo,
    /// `/proc/pressure/memory`; absent when the kernel has no PSI (no file, or
    /// `EOPNOTSUPP` when booted with `psi=0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<GuestMemoryPressure>,
    /// The distress counters of `/proc/vmstat`; an empty object when the file is missing.
    #[serde(default)]
    pub vmstat: GuestVmstat,
    /// Time since the guest booted, milliseconds (`/proc/uptime`, first field). It falls
    /// back when the guest reboots; compare [`Self::boot_id`] to be sure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// `/proc/sys/kernel/random/boot_id`: a random UUID the kernel draws at each boot, so a
    /// changed value means the counters started again from zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// The `/proc/meminfo` fields a sizing decision needs, in bytes; each named after the
/// kernel's field (given in its doc) and absent when the kernel does not print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMeminfo {
    /// `MemTotal`: usable RAM, boot memory and onlined hotplugged memory less what the
    /// kernel reserved at boot and what a balloon took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total: Option<u64>,
    /// `MemFree`: memory nobody uses (a guest keeps this small on purpose: caches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_free: Option<u64>,
    /// `MemAvailable` (Linux 3.14+): the kernel's estimate of what new work can get
    /// without swapping; `mem-total` − this is the working set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_available: Option<u64>,
    /// `Buffers`: block-device cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffers: Option<u64>,
    /// `Cached`: page cache, including `shmem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<u64>,
    /// `SwapCached`: swapped-out memory also still in RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_cached: Option<u64>,
    /// `Active(anon)`: recently used anonymous memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_anon: Option<u64>,
    /// `Inactive(anon)`: anonymous memory reclaim would swap first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_anon: Option<u64>,
    /// `Active(file)`: recently used page cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_file: Option<u64>,
    /// `Inactive(file)`: page cache reclaim would drop first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_file: Option<u64>,
    /// `Unevictable`: memory reclaim cannot touch (mlocked, ramfs, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unevictable: Option<u64>,
    /// `Mlocked`: memory locked with `mlock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlocked: Option<u64>,
    /// `SwapTotal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_total: Option<u64>,
    /// `SwapFree`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_free: Option<u64>,
    /// `Zswap` (recent kernels): RAM used by the compressed swap cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zswap: Option<u64>,
    /// `Zswapped` (recent kernels): memory stored in zswap, uncompressed size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zswapped: Option<u64>,
    /// `Dirty`: page cache waiting to be written back (slow to reclaim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<u64>,
    /// `Writeback`: page cache being written back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback: Option<u64>,
    /// `AnonPages`: anonymous memory mapped into processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anon_pages: Option<u64>,
    /// `Mapped`: page cache mapped into processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped: Option<u64>,
    /// `Shmem`: shared memory and tmpfs, reclaimable only by swapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shmem: Option<u64>,
    /// `KReclaimable` (Linux 4.20+): kernel memory reclaim can free (reclaimable slab
    /// and the like).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_reclaimable: Option<u64>,
    /// `SReclaimable`: reclaimable slab (dentry and inode caches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slab_reclaimable: Option<u64>,
    /// `SUnreclaim`: slab reclaim cannot free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slab_unreclaimable: Option<u64>,
    /// `KernelStack`: kernel stacks of all tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_stack: Option<u64>,
    /// `PageTables`: the page tables of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_tables: Option<u64>,
    /// `Percpu` (Linux 4.16+): the per-CPU allocator's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percpu: Option<u64>,
    /// `VmallocUsed`: the kernel's vmalloc area in use (some older kernels print 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmalloc_used: Option<u64>,
    /// `CommitLimit`: what the kernel lets processes commit under strict overcommit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_limit: Option<u64>,
    /// `Committed_AS`: memory processes have allocated, touched or not — what the guest
    /// would need if all of it were used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_as: Option<u64>,
    /// `Hugetlb`: memory in huge-page pools of every size, used or not;
    /// reserved, never reclaimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb: Option<u64>,
    /// `Balloon` (recent kernels): memory a balloon driver (virtio-balloon, ...) holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<u64>,
}

/// `/proc/pressure/memory`: the share of wall time in which tasks stalled on memory.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryPressure {
    /// `some`: at least one task stalled (lost some time waiting for memory: reclaim,
    /// refaults, swap-in). Absent when its line is missing or malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub some: Option<GuestPressureLine>,
    /// `full`: every non-idle task stalled at once — the guest did no work at all.
    /// Absent when its line is missing or malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<GuestPressureLine>,
}

/// One line of a PSI file: running averages and the cumulative stall time.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestPressureLine {
    /// Percent of the last 10 seconds spent stalled.
    pub avg10: f64,
    /// Percent of the last 60 seconds.
    pub avg60: f64,
    /// Percent of the last 300 seconds.
    pub avg300: f64,
    /// Stall time since boot, microseconds: a host polling every second takes the
    /// difference for a rate finer than `avg10`.
    pub total: u64,
}

/// The `/proc/vmstat` counters that show distress, each since boot, absent when the
/// kernel does not print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestVmstat {
    /// `oom_kill` (Linux 4.13+): processes the OOM killer killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// `pgmajfault`: page faults that had to read from disk or swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgmajfault: Option<u64>,
    /// The sum of every `allocstall_*` (one per zone type; older kernels have a single
    /// `allocstall`): allocations that had to reclaim memory themselves (direct reclaim)
    /// — the guest ran short. Summed modulo 2^64 like the kernel's own counters, so
    /// differences stay right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocstall: Option<u64>,
    /// `pswpin`: pages swapped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pswpin: Option<u64>,
    /// `pswpout`: pages swapped out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pswpout: Option<u64>,
    /// `workingset_refault_anon` (Linux 5.9+): swapped-out anonymous pages needed again
    /// soon after — thrashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workingset_refault_anon: Option<u64>,
    /// `workingset_refault_file` (Linux 5.9+; `workingset_refault` before): dropped page
    /// cache needed again soon after — the cache is too small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workingset_refault_file: Option<u64>,
    /// `pgscan_kswapd`: pages the background reclaimer scanned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgscan_kswapd: Option<u64>,
    /// `pgscan_direct`: pages scanned by direct reclaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgscan_direct: Option<u64>,
    /// `pgsteal_kswapd`: pages the background reclaimer freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsteal_kswapd: Option<u64>,
    /// `pgsteal_direct`: pages direct reclaim freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsteal_direct: Option<u64>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> GuestMemoryStats {
        GuestMemoryStats {
            meminfo: GuestMeminfo {
                mem_total: Some(1 << 30),
                mem_available: Some(0),
                committed_as: Some(4096),
                ..GuestMeminfo::default()
            },
            pressure: Some(GuestMemoryPressure {
                some: Some(GuestPressureLine {
                    avg10: 1.5,
                    avg60: 0.25,
                    avg300: 0.0,
                    total: 123_456,
                }),
                full: None,
            }),
            vmstat: GuestVmstat {
                oom_kill: Some(0),
                allocstall: Some(7),
                ..GuestVmstat::default()
            },
            uptime_ms: Some(309_330),
            boot_id: Some("5889bf78-0dfd-42f7-9946-53a6f23825f7".into()),
        }
    }

    #[test]
    fn members_are_kebab_case_absent_when_unknown_and_round_trip() {
        let stats = sample();
        let v = serde_json::to_value(&stats).expect("serialize");
        assert_eq!(
            v,
            json!({
                "meminfo": {"mem-total": 1073741824, "mem-available": 0, "committed-as": 4096},
                "pressure": {"some": {"avg10": 1.5, "avg60": 0.25, "avg300": 0.0,
                                      "total": 123456}},
                "vmstat": {"oom-kill": 0, "allocstall": 7},
                "uptime-ms": 309330,
                "boot-id": "5889bf78-0dfd-42f7-9946-53a6f23825f7"
            })
        );
        assert_eq!(
            serde_json::from_value::<GuestMemoryStats>(v).expect("parse"),
            stats
        );
    }

    #[test]
    fn readers_tolerate_unknown_and_missing_members() {
        // A later agent's additions are ignored; an older agent's omissions are absent.
        let v = json!({
            "meminfo": {"mem-total": 1, "some-new-field": 2},
            "pressure": {"some": {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total": 0,
                                  "extra": true},
                         "irq": {}},
            "vmstat": {"new-counter": 3},
            "new-section": {"x": 1}
        });
        let stats: GuestMemoryStats = serde_json::from_value(v).expect("parse");
        assert_eq!(stats.meminfo.mem_total, Some(1));
        assert_eq!(stats.vmstat, GuestVmstat::default());
        assert_eq!(stats.boot_id, None);
        let empty: GuestMemoryStats = serde_json::from_value(json!({})).expect("parse");
        assert_eq!(empty, GuestMemoryStats::default());
        // A PSI line is all or nothing.
        assert!(serde_json::from_value::<GuestPressureLine>(json!({"avg10": 1.0})).is_err());
    }
}
