//! [`ProcFs::memory_stats`] on fake `/proc` trees.

use std::fs;

use qga_wire::schema::{GuestPressureLine, GuestVmstat};
use tempfile::TempDir;

use super::*;

/// `/proc/meminfo` of a Linux 6.18 guest, abridged (every field we report is here).
const MEMINFO: &str = "\
MemTotal:       24683772 kB
MemFree:        23886904 kB
MemAvailable:   24300748 kB
Buffers:            6468 kB
Cached:           587480 kB
SwapCached:            0 kB
Active:           250936 kB
Inactive:         366728 kB
Active(anon):         32 kB
Inactive(anon):    34036 kB
Active(file):     250904 kB
Inactive(file):   332692 kB
Unevictable:       13320 kB
Mlocked:            9800 kB
SwapTotal:       1048572 kB
SwapFree:        1048572 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:               720 kB
Writeback:             0 kB
AnonPages:         37176 kB
Mapped:            91316 kB
Shmem:             10312 kB
KReclaimable:      76836 kB
Slab:             100120 kB
SReclaimable:      76836 kB
SUnreclaim:        23284 kB
KernelStack:        2088 kB
PageTables:         1888 kB
CommitLimit:    12341884 kB
Committed_AS:     333600 kB
VmallocTotal:   34359738367 kB
VmallocUsed:        6340 kB
Percpu:              792 kB
Balloon:               0 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
";

const PRESSURE: &str = "\
some avg10=1.25 avg60=0.40 avg300=0.08 total=1234567
full avg10=0.50 avg60=0.10 avg300=0.02 total=345678
";

const VMSTAT: &str = "\
nr_free_pages 5971726
workingset_refault_anon 4
workingset_refault_file 57449
pswpin 11
pswpout 22
allocstall_dma 0
allocstall_dma32 1
allocstall_normal 2
allocstall_movable 3
allocstall_device 0
pgmajfault 1031
pgsteal_kswapd 50
pgsteal_direct 60
pgscan_kswapd 70
pgscan_direct 80
oom_kill 1
";

const BOOT_ID: &str = "5889bf78-0dfd-42f7-9946-53a6f23825f7";

/// A fake procfs root.
struct FakeProc(TempDir);

impl FakeProc {
    /// A root holding every file, as a kernel with PSI has them.
    fn full() -> Self {
        let p = Self(tempfile::tempdir().expect("tempdir"));
        p.write("meminfo", MEMINFO)
            .write("pressure/memory", PRESSURE)
            .write("vmstat", VMSTAT)
            .write("uptime", "309.33 277.82\n")
            .write("sys/kernel/random/boot_id", &format!("{BOOT_ID}\n"));
        p
    }

    fn write(&self, path: &str, text: &str) -> &Self {
        let path = self.0.path().join(path);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
        self
    }

    fn remove(&self, path: &str) -> &Self {
        fs::remove_file(self.0.path().join(path)).expect("rm");
        self
    }

    fn stats(&self) -> Result<GuestMemoryStats, MeminfoError> {
        ProcFs::new(self.0.path()).memory_stats()
    }
}

fn kib(n: u64) -> Option<u64> {
    Some(n * 1024)
}

#[test]
fn a_full_kernel_reports_everything_in_bytes() {
    let stats = FakeProc::full().stats().expect("stats");
    let m = stats.meminfo;
    assert_eq!(m.mem_total, kib(24_683_772));
    assert_eq!(m.mem_available, kib(24_300_748));
    assert_eq!((m.active_anon, m.inactive_file), (kib(32), kib(332_692)));
    assert_eq!(
        (m.swap_total, m.committed_as),
        (kib(1_048_572), kib(333_600))
    );
    assert_eq!(
        (m.kernel_reclaimable, m.slab_unreclaimable),
        (kib(76_836), kib(23_284))
    );
    assert_eq!(
        (m.percpu, m.vmalloc_used, m.hugetlb),
        (kib(792), kib(6_340), kib(0))
    );
    assert_eq!(
        (m.balloon, m.zswap),
        (Some(0), Some(0)),
        "a zero the kernel printed"
    );
    let json = serde_json::to_value(m).expect("serialize");
    assert_eq!(
        json.as_object().map(|o| o.len()),
        Some(32),
        "every field: {json}"
    );
    let line = |avg10, avg60, avg300, total| GuestPressureLine {
        avg10,
        avg60,
        avg300,
        total,
    };
    assert_eq!(
        stats.pressure,
        Some(GuestMemoryPressure {
            some: Some(line(1.25, 0.40, 0.08, 1_234_567)),
            full: Some(line(0.50, 0.10, 0.02, 345_678)),
        })
    );
    assert_eq!(
        stats.vmstat,
        GuestVmstat {
            oom_kill: Some(1),
            pgmajfault: Some(1031),
            allocstall: Some(6),
            pswpin: Some(11),
            pswpout: Some(22),
            workingset_refault_anon: Some(4),
            workingset_refault_file: Some(57_449),
            pgscan_kswapd: Some(70),
            pgscan_direct: Some(80),
            pgsteal_kswapd: Some(50),
            pgsteal_direct: Some(60),
        }
    );
    assert_eq!(stats.uptime_ms, Some(309_330));
    assert_eq!(stats.boot_id.as_deref(), Some(BOOT_ID));
}

#[test]
fn the_boot_id_is_read_once_it_is_there() {
    let proc = FakeProc::full();
    proc.remove("sys/kernel/random/boot_id");
    let procfs = ProcFs::new(proc.0.path());
    assert_eq!(procfs.memory_stats().expect("stats").boot_id, None);
    proc.write("sys/kernel/random/boot_id", BOOT_ID);
    assert_eq!(
        procfs.memory_stats().expect("stats").boot_id.as_deref(),
        Some(BOOT_ID)
    );
    // A guest's boot id cannot change under a running agent: it is not read again.
    proc.remove("sys/kernel/random/boot_id");
    assert_eq!(
        procfs.memory_stats().expect("stats").boot_id.as_deref(),
        Some(BOOT_ID)
    );
}

#[test]
fn a_kernel_without_psi_has_no_pressure_member() {
    let proc = FakeProc::full();
    proc.remove("pressure/memory");
    let stats = proc.stats().expect("stats");
    assert_eq!(stats.pressure, None);
    let json = serde_json::to_value(&stats).expect("serialize");
    assert!(json.get("pressure").is_none(), "{json}");
    assert!(stats.meminfo.mem_total.is_some() && stats.vmstat.oom_kill.is_some());
    // No directory at all (CONFIG_PSI off), or a file whose read fails (as `EOPNOTSUPP`
    // does under psi=0; a directory fails the read with EISDIR): the same.
    fs::remove_dir(proc.0.path().join("pressure")).expect("rmdir");
    assert_eq!(proc.stats().expect("stats").pressure, None);
    fs::create_dir_all(proc.0.path().join("pressure/memory")).expect("mkdir");
    assert_eq!(proc.stats().expect("stats").pressure, None);
}

#[test]
fn psi_lines_stand_alone() {
    let proc = FakeProc::full();
    proc.write(
        "pressure/memory",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    );
    let pressure = proc.stats().expect("stats").pressure.expect("some");
    assert_eq!(
        (pressure.some.map(|l| l.total), pressure.full),
        (Some(0), None)
    );
    proc.write("pressure/memory", "garbage\nfull avg10=1.00\n");
    assert_eq!(
        proc.stats().expect("stats").pressure,
        None,
        "no line parsed"
    );
}

#[test]
fn counters_the_kernel_lacks_are_absent_not_zero() {
    // An old kernel: no oom_kill, one `allocstall` for all zones, no split refault
    // counters, a short meminfo.
    let proc = FakeProc::full();
    proc.write(
        "vmstat",
        "pgmajfault 7\nallocstall 3\nworkingset_refault 9\n",
    )
    .write("meminfo", "MemTotal: 1024 kB\nMemFree: 512 kB\n")
    .remove("sys/kernel/random/boot_id");
    let stats = proc.stats().expect("stats");
    assert_eq!(
        stats.vmstat,
        GuestVmstat {
            pgmajfault: Some(7),
            allocstall: Some(3),
            workingset_refault_file: Some(9),
            ..GuestVmstat::default()
        }
    );
    assert_eq!(
        (stats.meminfo.mem_total, stats.meminfo.mem_available),
        (kib(1024), None)
    );
    assert_eq!(stats.boot_id, None);
    let json = serde_json::to_value(&stats).expect("serialize");
    assert_eq!(
        json["vmstat"],
        serde_json::json!({"pgmajfault": 7, "allocstall": 3,
        "workingset-refault-file": 9})
    );
    assert_eq!(
        json["meminfo"],
        serde_json::json!({"mem-total": 1_048_576,
        "mem-free": 524_288})
    );
    // Without the file at all: an empty object.
    proc.remove("vmstat").remove("uptime");
    let stats = proc.stats().expect("stats");
    assert_eq!(
        (stats.vmstat, stats.uptime_ms),
        (GuestVmstat::default(), None)
    );
}

#[test]
fn malformed_and_huge_lines_are_skipped_and_the_rest_counts() {
    let huge = "x".repeat(3 * BUF);
    let meminfo = format!(
        "MemTotal: 2048 kB\nMemFree: lots kB\n{huge}\nBuffers:\n\
         Cached: 99999999999999999999 kB\nShmem: 4 kB\nMemAvailable: 1024 kB"
    );
    let proc = FakeProc::full();
    proc.write("meminfo", &meminfo)
        .write(
            "vmstat",
            &format!("oom_kill 2\npswpin 1.5\n{huge} 1\npswpout 3\n"),
        )
        .write("uptime", "soon\n")
        .write("sys/kernel/random/boot_id", "not-a-uuid\n");
    let stats = proc.stats().expect("stats");
    let m = stats.meminfo;
    assert_eq!(
        (m.mem_total, m.shmem, m.mem_available),
        (kib(2048), kib(4), kib(1024))
    );
    assert_eq!((m.mem_free, m.buffers, m.cached), (None, None, None));
    assert_eq!(
        (
            stats.vmstat.oom_kill,
            stats.vmstat.pswpin,
            stats.vmstat.pswpout
        ),
        (Some(2), None, Some(3))
    );
    assert_eq!((stats.uptime_ms, stats.boot_id), (None, None));
}

#[test]
fn a_file_past_its_cap_is_read_up_to_it() {
    // A vmstat longer than the cap: counters before it are read, those after are absent
    // rather than read at unbounded cost.
    let filler: String = (0..VMSTAT_CAP / 16)
        .map(|i| format!("nr_filler_{i:04} 0\n"))
        .collect();
    assert!(filler.len() >= VMSTAT_CAP);
    let proc = FakeProc::full();
    proc.write("vmstat", &format!("pgmajfault 5\n{filler}oom_kill 1\n"));
    let v = proc.stats().expect("stats").vmstat;
    assert_eq!((v.pgmajfault, v.oom_kill), (Some(5), None));
    // A meminfo of MEMINFO_CAP bytes of noise first: its fields are beyond reach.
    let noise = format!("{}\n", "y".repeat(MEMINFO_CAP));
    proc.write("meminfo", &format!("{noise}MemTotal: 1 kB\n"));
    assert_eq!(
        proc.stats().expect("stats").meminfo,
        GuestMeminfo::default()
    );
}

#[test]
fn without_meminfo_the_call_fails() {
    let proc = FakeProc::full();
    proc.remove("meminfo");
    let err = proc.stats().expect_err("no meminfo");
    assert_eq!(err.errno, Errno::NOENT);
    assert!(
        err.to_string()
            .ends_with("meminfo: No such file or directory"),
        "{err}"
    );
}

#[test]
fn the_real_proc_parses() {
    // This machine's kernel: whatever it has must parse without a single oddity.
    let procfs = ProcFs::default();
    let stats = procfs.memory_stats().expect("/proc/meminfo");
    let m = stats.meminfo;
    assert!(
        m.mem_total.is_some_and(|t| t > 0) && m.mem_free.is_some(),
        "{m:?}"
    );
    assert!(
        stats.uptime_ms.is_some() && stats.boot_id.is_some(),
        "{stats:?}"
    );
    assert!(stats.vmstat.pgmajfault.is_some(), "{stats:?}");
    assert!(
        !procfs.warned.load(Ordering::Relaxed),
        "no line was skipped"
    );
}
