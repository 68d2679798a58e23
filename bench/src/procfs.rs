//! What the report needs from `/proc`: a process's memory and CPU time, and the machine.

use std::{fs, io, time::Duration};

/// Memory figures of one process, in KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Peak resident set size (`VmHWM`).
    pub peak_kib: u64,
    /// Current resident set size (`VmRSS`).
    pub rss_kib: u64,
}

/// Reads `VmHWM` and `VmRSS` of `pid`.
pub fn memory(pid: u32) -> io::Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        peak_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
    })
}

/// User plus system CPU time consumed so far by `pid` (all its threads).
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let (user, sys) = cpu_split(pid)?;
    Ok(user + sys)
}

/// User and system CPU time consumed so far by `pid` (all its threads), separately.
pub fn cpu_split(pid: u32) -> io::Result<(Duration, Duration)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields after its closing parenthesis are fixed.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': state is field 3 overall, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let secs = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks_per_second());
    Ok((secs(ticks(11)), secs(ticks(12))))
}

fn clock_ticks_per_second() -> f64 {
    // Linux has reported USER_HZ = 100 to user space on every architecture we run on.
    100.0
}

/// A one-line description of this machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.1} GiB RAM, Linux {}",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let m = memory(me).expect("own status");
        assert!(m.rss_kib > 0 && m.peak_kib >= m.rss_kib);
        cpu_time(me).expect("own stat");
        assert!(machine().contains("cores"));
    }
}
