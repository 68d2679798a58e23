//! One line of `/proc/meminfo`, `/proc/vmstat` or a PSI file, and the one-line files
//! `/proc/uptime` and `boot_id`, parsed without allocating. Every parser refuses what it
//! does not understand exactly (no sign, no unit it does not expect, no overflow): the
//! caller then leaves the reading absent rather than guess.

use qga_wire::schema::{GuestMeminfo, GuestPressureLine, GuestVmstat};

/// What a line gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A reading we want, stored.
    Stored,
    /// A line of a field we do not report.
    Ignored,
    /// A field we want, but its line was malformed: nothing stored.
    Malformed,
}

/// A decimal `u64`: ASCII digits only, at least one, no overflow.
pub fn number(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// `N kB` (the kernel's KiB) in bytes.
fn kib(value: &[u8]) -> Option<u64> {
    let digits = value.strip_suffix(b" kB")?.trim_ascii();
    number(digits)?.checked_mul(1024)
}

/// Where the `/proc/meminfo` field `name` goes, if we report it.
fn meminfo_field<'m>(m: &'m mut GuestMeminfo, name: &[u8]) -> Option<&'m mut Option<u64>> {
    Some(match name {
        b"MemTotal" => &mut m.mem_total,
        b"MemFree" => &mut m.mem_free,
        b"MemAvailable" => &mut m.mem_available,
        b"Buffers" => &mut m.buffers,
        b"Cached" => &mut m.cached,
        b"SwapCached" => &mut m.swap_cached,
        b"Active(anon)" => &mut m.active_anon,
        b"Inactive(anon)" => &mut m.inactive_anon,
        b"Active(file)" => &mut m.active_file,
        b"Inactive(file)" => &mut m.inactive_file,
        b"Unevictable" => &mut m.unevictable,
        b"Mlocked" => &mut m.mlocked,
        b"SwapTotal" => &mut m.swap_total,
        b"SwapFree" => &mut m.swap_free,
        b"Zswap" => &mut m.zswap,
        b"Zswapped" => &mut m.zswapped,
        b"Dirty" => &mut m.dirty,
        b"Writeback" => &mut m.writeback,
        b"AnonPages" => &mut m.anon_pages,
        b"Mapped" => &mut m.mapped,
        b"Shmem" => &mut m.shmem,
        b"KReclaimable" => &mut m.kernel_reclaimable,
        b"SReclaimable" => &mut m.slab_reclaimable,
        b"SUnreclaim" => &mut m.slab_unreclaimable,
        b"KernelStack" => &mut m.kernel_stack,
        b"PageTables" => &mut m.page_tables,
        b"Percpu" => &mut m.percpu,
        b"VmallocUsed" => &mut m.vmalloc_used,
        b"CommitLimit" => &mut m.commit_limit,
        b"Committed_AS" => &mut m.committed_as,
        b"Hugetlb" => &mut m.hugetlb,
        b"Balloon" => &mut m.balloon,
        _ => return None,
    })
}

/// A `/proc/meminfo` line, `Name:   1234 kB`, into `m` (a repeated field: the last wins).
pub fn meminfo(m: &mut GuestMeminfo, line: &[u8]) -> Parsed {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Parsed::Ignored;
    };
    let Some(field) = meminfo_field(m, &line[..colon]) else {
        return Parsed::Ignored;
    };
    match kib(line[colon + 1..].trim_ascii()) {
        Some(bytes) => {
            *field = Some(bytes);
            Parsed::Stored
        }
        None => Parsed::Malformed,
    }
}

/// Where the `/proc/vmstat` counter `name` goes, if we report it (`allocstall_*` are
/// summed by the caller).
fn vmstat_field<'v>(v: &'v mut GuestVmstat, name: &[u8]) -> Option<&'v mut Option<u64>> {
    Some(match name {
        b"oom_kill" => &mut v.oom_kill,
        b"pgmajfault" => &mut v.pgmajfault,
        b"pswpin" => &mut v.pswpin,
        b"pswpout" => &mut v.pswpout,
        b"workingset_refault_anon" => &mut v.workingset_refault_anon,
        // Before Linux 5.9 only page cache refaults were counted, under this name.
        b"workingset_refault_file" | b"workingset_refault" => &mut v.workingset_refault_file,
        b"pgscan_kswapd" => &mut v.pgscan_kswapd,
        b"pgscan_direct" => &mut v.pgscan_direct,
        b"pgsteal_kswapd" => &mut v.pgsteal_kswapd,
        b"pgsteal_direct" => &mut v.pgsteal_direct,
        _ => return None,
    })
}

/// A `/proc/vmstat` line, `name 1234`, into `v`; every `allocstall_*` (and older
/// kernels' single `allocstall`) adds to `allocstall`, modulo 2^64 as the kernel's
/// counters wrap.
pub fn vmstat(v: &mut GuestVmstat, line: &[u8]) -> Parsed {
    let Some(space) = line.iter().position(|&b| b == b' ') else {
        return Parsed::Ignored;
    };
    let (name, value) = (&line[..space], &line[space + 1..]);
    if name == b"allocstall" || name.starts_with(b"allocstall_") {
        return match number(value) {
            Some(n) => {
                v.allocstall = Some(v.allocstall.unwrap_or(0).wrapping_add(n));
                Parsed::Stored
            }
            None => Parsed::Malformed,
        };
    }
    let Some(field) = vmstat_field(v, name) else {
        return Parsed::Ignored;
    };
    match number(value) {
        Some(n) => {
            *field = Some(n);
            Parsed::Stored
        }
        None => Parsed::Malformed,
    }
}

/// Which line of a PSI file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// `some`: at least one task stalled.
    Some,
    /// `full`: all non-idle tasks stalled.
    Full,
}

/// A PSI percentage: digits with at most one `.`, as the kernel prints `%lu.%02lu`.
fn percent(text: &[u8]) -> Option<f64> {
    let plain = text.iter().all(|b| b.is_ascii_digit() || *b == b'.');
    if !plain || text.iter().filter(|&&b| b == b'.').count() > 1 {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// A PSI line, `some avg10=0.12 avg60=0.05 avg300=0.01 total=12345`: all four values or
/// nothing (unknown `key=value` members are skipped, for kernels that may add some).
pub fn pressure(line: &[u8]) -> Option<(Stall, GuestPressureLine)> {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let stall = match words.next()? {
        b"some" => Stall::Some,
        b"full" => Stall::Full,
        _ => return None,
    };
    let (mut avg10, mut avg60, mut avg300, mut total) = (None, None, None, None);
    for word in words {
        let eq = word.iter().position(|&b| b == b'=')?;
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        match key {
            b"avg10" => avg10 = Some(percent(value)?),
            b"avg60" => avg60 = Some(percent(value)?),
            b"avg300" => avg300 = Some(percent(value)?),
            b"total" => total = Some(number(value)?),
            _ => {}
        }
    }
    let line = GuestPressureLine {
        avg10: avg10?,
        avg60: avg60?,
        avg300: avg300?,
        total: total?,
    };
    Some((stall, line))
}

/// `/proc/uptime`'s first field, `12345.67` seconds, in milliseconds (fraction digits
/// past the third are dropped).
pub fn uptime_ms(line: &[u8]) -> Option<u64> {
    let first = line.split(|&b| b == b' ').next()?;
    let (secs, frac) = match first.iter().position(|&b| b == b'.') {
        Some(dot) => (&first[..dot], &first[dot + 1..]),
        None => (first, &b""[..]),
    };
    let mut ms = number(secs)?.checked_mul(1000)?;
    if !frac.is_empty() {
        number(frac)?;
        for (i, scale) in [100, 10, 1].into_iter().enumerate() {
            let digit = frac.get(i).map_or(0, |d| u64::from(d - b'0'));
            ms = ms.checked_add(digit * scale)?;
        }
    }
    Some(ms)
}

/// `boot_id`: a UUID as the kernel prints it, 8-4-4-4-12 lower-case hex digits.
pub fn boot_id(line: &[u8]) -> Option<&str> {
    let uuid = line.trim_ascii_end();
    let shape = uuid.len() == 36
        && uuid.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !shape {
        return None;
    }
    std::str::from_utf8(uuid).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_plain_decimal_without_overflow() {
        assert_eq!(number(b"0"), Some(0));
        assert_eq!(number(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"-1",
            b"+1",
            b"1 ",
            b"0x10",
            b"1.5",
        ] {
            assert_eq!(number(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn meminfo_lines_in_bytes() {
        let mut m = GuestMeminfo::default();
        assert_eq!(
            meminfo(&mut m, b"MemTotal:       24683772 kB"),
            Parsed::Stored
        );
        assert_eq!(
            meminfo(&mut m, b"Active(anon):         32 kB"),
            Parsed::Stored
        );
        assert_eq!(
            meminfo(&mut m, b"Committed_AS:     333600 kB"),
            Parsed::Stored
        );
        assert_eq!(
            meminfo(&mut m, b"HugePages_Total:       0"),
            Parsed::Ignored
        );
        assert_eq!(meminfo(&mut m, b"no colon at all"), Parsed::Ignored);
        assert_eq!(m.mem_total, Some(24_683_772 * 1024));
        assert_eq!(m.active_anon, Some(32 * 1024));
        assert_eq!(m.committed_as, Some(333_600 * 1024));
        // Overflowing bytes, a missing or unexpected unit, junk: nothing stored.
        let max_kib = u64::MAX / 1024;
        for bad in [
            format!("MemFree: {} kB", max_kib + 1),
            "MemFree: 12".into(),
            "MemFree: 12 MB".into(),
            "MemFree: -12 kB".into(),
            "MemFree: kB".into(),
            "MemFree:".into(),
        ] {
            assert_eq!(meminfo(&mut m, bad.as_bytes()), Parsed::Malformed, "{bad}");
        }
        assert_eq!(m.mem_free, None);
        let biggest = format!("MemFree: {max_kib} kB");
        assert_eq!(meminfo(&mut m, biggest.as_bytes()), Parsed::Stored);
        assert_eq!(m.mem_free, Some(max_kib * 1024));
    }

    #[test]
    fn vmstat_lines_and_the_allocstall_sum() {
        let mut v = GuestVmstat::default();
        for line in [
            &b"oom_kill 3"[..],
            b"allocstall_dma 1",
            b"allocstall_normal 18446744073709551615",
            b"allocstall_movable 5",
            b"workingset_refault 9",
            b"nr_free_pages 12",
        ] {
            vmstat(&mut v, line);
        }
        assert_eq!(v.oom_kill, Some(3));
        assert_eq!(v.allocstall, Some(5), "1 + (2^64 - 1) + 5 modulo 2^64");
        assert_eq!(v.workingset_refault_file, Some(9), "the pre-5.9 name");
        assert_eq!(vmstat(&mut v, b"pgmajfault -1"), Parsed::Malformed);
        assert_eq!(vmstat(&mut v, b"allocstall_dma32 x"), Parsed::Malformed);
        assert_eq!(v.pgmajfault, None);
        assert_eq!(v.allocstall, Some(5));
    }

    #[test]
    fn pressure_lines_all_or_nothing() {
        let (stall, line) =
            pressure(b"some avg10=1.25 avg60=0.50 avg300=100.00 total=123456").expect("some");
        assert_eq!(stall, Stall::Some);
        assert_eq!((line.avg10, line.avg60, line.avg300), (1.25, 0.5, 100.0));
        assert_eq!(line.total, 123_456);
        let with_more = b"full avg10=0.00 avg60=0.00 avg300=0.00 total=0 avg3600=1.00";
        assert_eq!(pressure(with_more).map(|(s, _)| s), Some(Stall::Full));
        for bad in [
            &b"some avg10=0.00 avg60=0.00 total=0"[..],
            b"some avg10=nan avg60=0.00 avg300=0.00 total=0",
            b"some avg10=inf avg60=0.00 avg300=0.00 total=0",
            b"some avg10=1.2.3 avg60=0.00 avg300=0.00 total=0",
            b"some avg10=-1.00 avg60=0.00 avg300=0.00 total=0",
            b"some avg10=0.00 avg60=0.00 avg300=0.00 total=-5",
            b"some avg10 avg60=0.00 avg300=0.00 total=0",
            b"irq avg10=0.00 avg60=0.00 avg300=0.00 total=0",
            b"",
        ] {
            assert_eq!(pressure(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn uptime_in_milliseconds() {
        assert_eq!(uptime_ms(b"309.33 277.82"), Some(309_330));
        assert_eq!(uptime_ms(b"5.1 1.00"), Some(5_100));
        assert_eq!(uptime_ms(b"7.123456 0"), Some(7_123));
        assert_eq!(uptime_ms(b"42"), Some(42_000));
        assert_eq!(uptime_ms(b"18446744073709551.615 0"), Some(u64::MAX));
        assert_eq!(uptime_ms(b"18446744073709551.616 0"), None);
        for bad in [
            &b""[..],
            b"x.5 1",
            b"1.x 1",
            b"-1.00 2",
            b"18446744073709552.00 1",
        ] {
            assert_eq!(uptime_ms(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn boot_ids_are_uuids() {
        let id = b"5889bf78-0dfd-42f7-9946-53a6f23825f7";
        assert_eq!(boot_id(id), Some("5889bf78-0dfd-42f7-9946-53a6f23825f7"));
        assert_eq!(
            boot_id(b"5889bf78-0dfd-42f7-9946-53a6f23825f7\n").map(str::len),
            Some(36)
        );
        for bad in [
            &b""[..],
            b"5889bf78-0dfd-42f7-9946-53a6f23825f",
            b"5889bf78x0dfd-42f7-9946-53a6f23825f7",
            b"5889bf78-0dfd-42f7-9946-53a6f23825fg",
        ] {
            assert_eq!(boot_id(bad), None);
        }
    }
}
