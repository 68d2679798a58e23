//! The guest kernel's memory signals from `/proc`, for the
//! `__org.qga-bridge_get-memory-stats` extension: `meminfo`, `pressure/memory`, `vmstat`,
//! `uptime` and `sys/kernel/random/boot_id`, under a configurable root
//! (`--procfs-root`; tests point it at a fake tree).
//!
//! A host polls this every second per VM, so a call costs four opens and a few small
//! reads through one stack buffer, and no heap allocation but the reply's boot id: each
//! file is read line by line up to a per-file cap ([`lines`]), each line parsed in place
//! ([`parse`]). The boot id is read once: it cannot change while the agent runs (a
//! reboot ends the agent too). Nothing grows with the number of calls.
//!
//! Only `/proc/meminfo` is required: when it cannot be read the call fails. Everything
//! else is optional: a missing or unreadable file (no PSI, `EOPNOTSUPP` under `psi=0`, a
//! kernel without a counter) leaves its readings absent, never zero. So does a malformed
//! line: it is skipped, the rest of the file still counts, and the first such oddity is
//! logged as a warning (later ones at debug level, so a once-a-second poll does not fill
//! the log). A file longer than its cap is read up to the cap; readings after it are
//! absent.

pub mod lines;
pub mod parse;
#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use qga_wire::schema::{GuestMeminfo, GuestMemoryPressure, GuestMemoryStats, GuestVmstat};
use rustix::io::Errno;

use self::{
    lines::{Summary, for_each_line},
    parse::{Parsed, Stall},
};
use crate::sysfs::strerror;

/// The buffer every file is read through: a page, as the kernel's `seq_file` fills it.
const BUF: usize = 4096;

/// Bytes read at most of `/proc/meminfo` (about 1.5 KiB on Linux 6.x).
pub const MEMINFO_CAP: usize = 16 * 1024;
/// Bytes read at most of `/proc/vmstat` (about 4 KiB on Linux 6.x; it grows with kernels).
pub const VMSTAT_CAP: usize = 32 * 1024;
/// Bytes read at most of a PSI file (two lines of about 60 bytes).
pub const PRESSURE_CAP: usize = 1024;
/// Bytes read at most of `/proc/uptime` and `boot_id` (one short line each).
pub const LINE_CAP: usize = 128;

/// Why `__org.qga-bridge_get-memory-stats` failed: `/proc/meminfo` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {}: {}", path.display(), strerror(*errno))]
pub struct MeminfoError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub errno: Errno,
}

/// The memory files of one procfs root.
#[derive(Debug)]
pub struct ProcFs {
    meminfo: PathBuf,
    pressure: PathBuf,
    vmstat: PathBuf,
    uptime: PathBuf,
    boot_id: PathBuf,
    /// The boot id, once read.
    boot_id_read: OnceLock<String>,
    /// Whether an oddity has been logged as a warning already.
    warned: AtomicBool,
}

impl ProcFs {
    /// The files under `root` (normally `/proc`), paths built once here so that calls
    /// allocate none.
    pub fn new(root: &Path) -> Self {
        Self {
            meminfo: root.join("meminfo"),
            pressure: root.join("pressure/memory"),
            vmstat: root.join("vmstat"),
            uptime: root.join("uptime"),
            boot_id: root.join("sys/kernel/random/boot_id"),
            boot_id_read: OnceLock::new(),
            warned: AtomicBool::new(false),
        }
    }

    /// One snapshot: the `__org.qga-bridge_get-memory-stats` reply.
    pub fn memory_stats(&self) -> Result<GuestMemoryStats, MeminfoError> {
        let mut buf = [0u8; BUF];
        Ok(GuestMemoryStats {
            meminfo: self.meminfo(&mut buf)?,
            pressure: self.pressure(&mut buf),
            vmstat: self.vmstat(&mut buf),
            uptime_ms: self.first_line(&self.uptime, &mut buf, parse::uptime_ms),
            boot_id: self.boot_id(&mut buf),
        })
    }

    /// The boot id, read on the first call that can (absent until then).
    fn boot_id(&self, buf: &mut [u8]) -> Option<String> {
        if let Some(id) = self.boot_id_read.get() {
            return Some(id.clone());
        }
        let id = self.first_line(&self.boot_id, buf, |l| parse::boot_id(l).map(String::from))?;
        Some(self.boot_id_read.get_or_init(|| id).clone())
    }

    fn meminfo(&self, buf: &mut [u8]) -> Result<GuestMeminfo, MeminfoError> {
        let mut m = GuestMeminfo::default();
        let mut malformed = 0;
        let read = for_each_line(&self.meminfo, buf, MEMINFO_CAP, |line| {
            malformed += usize::from(parse::meminfo(&mut m, line) == Parsed::Malformed);
        });
        match read {
            Ok(summary) => {
                self.note(&self.meminfo, summary, malformed);
                Ok(m)
            }
            Err(errno) => Err(MeminfoError {
                path: self.meminfo.clone(),
                errno,
            }),
        }
    }

    /// PSI: absent without the file or when reading it fails (`EOPNOTSUPP` under `psi=0`),
    /// and when neither line parses.
    fn pressure(&self, buf: &mut [u8]) -> Option<GuestMemoryPressure> {
        let mut p = GuestMemoryPressure::default();
        let mut malformed = 0;
        let read = for_each_line(
            &self.pressure,
            buf,
            PRESSURE_CAP,
            |line| match parse::pressure(line) {
                Some((Stall::Some, values)) => p.some = Some(values),
                Some((Stall::Full, values)) => p.full = Some(values),
                None => malformed += 1,
            },
        );
        let summary = self.optional(&self.pressure, read)?;
        self.note(&self.pressure, summary, malformed);
        (p.some.is_some() || p.full.is_some()).then_some(p)
    }

    /// The distress counters; all absent when the file cannot be read.
    fn vmstat(&self, buf: &mut [u8]) -> GuestVmstat {
        let mut v = GuestVmstat::default();
        let mut malformed = 0;
        let read = for_each_line(&self.vmstat, buf, VMSTAT_CAP, |line| {
            malformed += usize::from(parse::vmstat(&mut v, line) == Parsed::Malformed);
        });
        match self.optional(&self.vmstat, read) {
            Some(summary) => {
                self.note(&self.vmstat, summary, malformed);
                v
            }
            None => GuestVmstat::default(),
        }
    }

    /// `parse` of the first line of a one-line file; absent when it cannot be read or
    /// does not parse.
    fn first_line<T>(
        &self,
        path: &Path,
        buf: &mut [u8],
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let mut value = None;
        let mut lines = 0;
        let read = for_each_line(path, buf, LINE_CAP, |line| {
            lines += 1;
            if lines == 1 {
                value = parse(line);
            }
        });
        let summary = self.optional(path, read)?;
        self.note(path, summary, usize::from(lines > 0 && value.is_none()));
        value
    }

    /// The summary of a read whose failure only leaves readings absent (logged at debug
    /// level: a kernel without PSI says so on every call).
    fn optional(&self, path: &Path, read: Result<Summary, Errno>) -> Option<Summary> {
        read.map_err(|errno| tracing::debug!(path = %path.display(), %errno, "not read"))
            .ok()
    }

    /// Logs what a read skipped: the first time as a warning, later at debug level.
    fn note(&self, path: &Path, summary: Summary, malformed: usize) {
        if malformed == 0 && summary.too_long == 0 && !summary.capped {
            return;
        }
        let path = path.display();
        let (too_long, capped) = (summary.too_long, summary.capped);
        if self.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(%path, malformed, too_long, capped, "lines skipped");
        } else {
            tracing::warn!(%path, malformed, too_long, capped,
                "lines skipped: their readings are left out of memory stats (warned once)");
        }
    }
}

impl Default for ProcFs {
    /// The real `/proc`.
    fn default() -> Self {
        Self::new(Path::new("/proc"))
    }
}
