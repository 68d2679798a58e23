//! A VM's memory snapshot (`memory stats`) as text — the guest's view, its pressure and
//! distress counters, the host's totals, each with its age — and as JSON.

use std::fmt::Write as _;

use qga_proto::v1 as pb;
use serde_json::{Value, json};

use crate::size::{approx, format as exact};

/// `label  value` lines, labels padded to one width.
fn lines(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(l, v)| format!("  {l:<width$}  {v}\n"))
        .collect()
}

/// A size the guest reported, or `-` when it did not.
fn size(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), approx)
}

/// A counter, or `-`.
fn count(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A PSI line as percentages: `2.50% 1.00% 0.50%` (10 s, 60 s, 300 s).
fn psi(line: Option<pb::PressureLine>) -> String {
    line.map_or_else(
        || "-".into(),
        |l| format!("{:.2}% {:.2}% {:.2}%", l.avg10, l.avg60, l.avg300),
    )
}

/// `1h 2m 3s` of milliseconds.
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, m, s) => format!("{h}h {m}m {s}s"),
    }
}

/// The guest's part: sizes, pressure, counters.
fn agent(a: &pb::GuestMemoryStats) -> String {
    let m = a.meminfo.unwrap_or_default();
    let v = a.vmstat.unwrap_or_default();
    let p = a.pressure.unwrap_or_default();
    let mut out = format!("guest (agent, {} ms old)\n", a.age_ms);
    let swap = match (m.swap_total, m.swap_free) {
        (Some(0), _) => "none".to_string(),
        (Some(t), Some(f)) => format!("{} used of {}", approx(t.saturating_sub(f)), approx(t)),
        _ => "-".to_string(),
    };
    out.push_str(&lines(&[
        ("total", size(m.mem_total)),
        ("available", size(m.mem_available)),
        ("working set", size(a.working_set)),
        ("free", size(m.mem_free)),
        ("cached", size(m.cached)),
        ("anonymous", size(m.anon_pages)),
        ("shmem", size(m.shmem)),
        ("unevictable", size(m.unevictable)),
        ("committed", size(m.committed_as)),
        ("swap", swap),
        ("pressure some", psi(p.some)),
        ("pressure full", psi(p.full)),
        ("oom kills", count(v.oom_kill)),
        ("direct reclaim", count(v.allocstall)),
        ("major faults", count(v.pgmajfault)),
        ("uptime", a.uptime_ms.map_or_else(|| "-".into(), duration)),
        ("boot id", a.boot_id.clone().unwrap_or_else(|| "-".into())),
    ]));
    if a.pressure.is_none() {
        out.push_str("  (no PSI: the guest kernel has none, or was booted with psi=0)\n");
    }
    out
}

/// The host's part: the hypervisor's totals.
fn bridge(b: &pb::BridgeMemoryTotals) -> String {
    format!("host (bridge, {} ms old)\n", b.age_ms)
        + &lines(&[
            ("boot", exact(b.boot_bytes)),
            ("plugged", exact(b.plugged_bytes)),
            ("total", exact(b.total_bytes)),
            ("usable", b.usable_bytes.map_or_else(|| "-".into(), exact)),
        ])
}

/// The balloon's part: what it holds and what its driver reported.
fn balloon(b: &pb::BalloonReading) -> String {
    let s = b.stats.unwrap_or_default();
    let mut out = format!("balloon {} ({} ms old)\n", b.id, b.age_ms);
    out.push_str(&lines(&[
        ("holds", exact(b.held_bytes)),
        ("actual", exact(b.actual_bytes)),
        ("guest total", size(s.total_bytes)),
        ("guest available", size(s.available_bytes)),
        ("guest free", size(s.free_bytes)),
        ("disk caches", size(s.disk_caches_bytes)),
        ("major faults", count(s.major_faults)),
        ("swapped in", size(s.swap_in_bytes)),
        ("swapped out", size(s.swap_out_bytes)),
    ]));
    if b.stats.is_none() {
        out.push_str("  (no statistics from the guest's balloon driver yet)\n");
    }
    out
}

/// The snapshot as text: the guest's part and the host's, or why each is missing.
/// Pressure is in percent of wall time over 10 s, 60 s and 300 s.
pub fn text(s: &pb::MemoryStats) -> String {
    let mut out = String::new();
    match (&s.agent, &s.agent_stats_unavailable) {
        (Some(a), _) => out.push_str(&agent(a)),
        (None, why) => {
            let why = why.as_deref().unwrap_or("no reason given");
            let _ = writeln!(out, "guest: no stats: {why}");
        }
    }
    match (&s.bridge, &s.bridge_totals_unavailable) {
        (Some(b), _) => out.push_str(&bridge(b)),
        (None, why) => {
            let why = why.as_deref().unwrap_or("no reason given");
            let _ = writeln!(out, "host: no totals: {why}");
        }
    }
    match (&s.balloon, &s.balloon_unavailable) {
        (Some(b), _) => out.push_str(&balloon(b)),
        (None, why) => {
            let why = why.as_deref().unwrap_or("no reason given");
            let _ = writeln!(out, "balloon: none: {why}");
        }
    }
    out
}

/// The snapshot as JSON: proto field names, absent readings as `null`.
pub fn json(s: &pb::MemoryStats) -> Value {
    let line = |l: &Option<pb::PressureLine>| {
        l.map(|l| {
            json!({"avg10": l.avg10, "avg60": l.avg60, "avg300": l.avg300,
                          "total": l.total})
        })
    };
    json!({
        "taken_at": s.taken_at.as_ref().map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9),
        "agent": s.agent.as_ref().map(|a| json!({
            "age_ms": a.age_ms,
            "working_set": a.working_set,
            "meminfo": a.meminfo.as_ref().map(crate::json::meminfo),
            "pressure": a.pressure.map(|p| json!({"some": line(&p.some), "full": line(&p.full)})),
            "vmstat": a.vmstat.as_ref().map(crate::json::vmstat),
            "uptime_ms": a.uptime_ms,
            "boot_id": a.boot_id,
        })),
        "agent_stats_unavailable": s.agent_stats_unavailable,
        "bridge": s.bridge.map(|b| json!({
            "age_ms": b.age_ms,
            "boot_bytes": b.boot_bytes,
            "plugged_bytes": b.plugged_bytes,
            "total_bytes": b.total_bytes,
            "usable_bytes": b.usable_bytes,
        })),
        "bridge_totals_unavailable": s.bridge_totals_unavailable,
        "balloon": s.balloon.as_ref().map(|b| json!({
            "age_ms": b.age_ms,
            "id": b.id,
            "actual_bytes": b.actual_bytes,
            "held_bytes": b.held_bytes,
            "stats": b.stats.map(|s| json!({
                "last_update": s.last_update,
                "swap_in_bytes": s.swap_in_bytes,
                "swap_out_bytes": s.swap_out_bytes,
                "major_faults": s.major_faults,
                "minor_faults": s.minor_faults,
                "free_bytes": s.free_bytes,
                "total_bytes": s.total_bytes,
                "available_bytes": s.available_bytes,
                "disk_caches_bytes": s.disk_caches_bytes,
                "hugetlb_allocations": s.hugetlb_allocations,
                "hugetlb_failures": s.hugetlb_failures,
            })),
        })),
        "balloon_unavailable": s.balloon_unavailable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_pressure_read_as_people_write_them() {
        assert_eq!(duration(59_999), "59s");
        assert_eq!(duration(61_000), "1m 1s");
        assert_eq!(duration(3_723_000), "1h 2m 3s");
        let l = pb::PressureLine {
            avg10: 2.5,
            avg60: 1.0,
            avg300: 0.0,
            total: 1,
        };
        assert_eq!(psi(Some(l)), "2.50% 1.00% 0.00%");
        assert_eq!(psi(None), "-");
    }
}
