//! The kernel's memory-block tree, `/sys/devices/system/memory`.
//!
//! Listing reads each block's `state` and `removable` with `openat` relative to the
//! tree's directory into stack buffers: two opens, two small reads and two closes per
//! block, no heap allocation per block. Large trees are scanned on every core: sysfs
//! reads are kernel work that parallelises well. Writes open the block directory once
//! and work relative to it.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use qga_wire::schema::{GuestMemoryBlock, GuestMemoryBlockResponse, GuestMemoryBlockResponseType};
use rustix::{
    fs::{Dir, FileType, Mode, OFlags},
    io::Errno,
};

/// Trees with fewer blocks than this are scanned on the calling thread.
const PARALLEL_THRESHOLD: usize = 1024;

/// What is written to a block's `state` file to bring it online: the kernel's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnlineType {
    /// `online`: the kernel picks the zone (usually ZONE_NORMAL for hot-added memory, which
    /// may then refuse to go offline again). What the reference agent writes.
    #[default]
    #[value(name = "online")]
    Online,
    /// `online_movable`: ZONE_MOVABLE, so the block can be offlined and its DIMM unplugged;
    /// the kernel cannot use it for its own unmovable allocations.
    #[value(name = "online_movable")]
    OnlineMovable,
    /// `online_kernel`: ZONE_NORMAL explicitly, usable for every allocation, rarely removable.
    #[value(name = "online_kernel")]
    OnlineKernel,
}

impl OnlineType {
    /// The word written to `state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::OnlineMovable => "online_movable",
            Self::OnlineKernel => "online_kernel",
        }
    }

    /// Parses the kernel word (config files use the same spelling as the flag).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(Self::Online),
            "online_movable" => Some(Self::OnlineMovable),
            "online_kernel" => Some(Self::OnlineKernel),
            _ => None,
        }
    }
}

/// Failure that makes `guest-get-memory-blocks` or `-info` fail as a whole, as in the
/// reference (per-block failures of `set` are results, not errors).
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// A file or directory of the tree could not be opened or read.
    #[error("{op}(\"{path}\"): {source}")]
    Io {
        /// The failed operation, as the reference names it.
        op: &'static str,
        /// The file it was applied to.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `block_size_bytes` does not hold a hexadecimal number.
    #[error("cannot parse block size \"{0}\"")]
    BadBlockSize(String),
}

/// Writes a block's `state` file. The real writer is [`KernelWriter`]; tests substitute
/// one that fails with errnos a plain file tree cannot produce (EBUSY, EINVAL).
pub trait StateWriter: Send + Sync {
    /// Writes `value` to the `state` file of the block whose directory is `block`.
    fn write_state(&self, block: BorrowedFd<'_>, index: u64, value: &str) -> Result<(), Errno>;
}

/// Writes through the file system, like the kernel ABI expects: one `write` of the word.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelWriter;

impl StateWriter for KernelWriter {
    fn write_state(&self, block: BorrowedFd<'_>, _index: u64, value: &str) -> Result<(), Errno> {
        // O_TRUNC is harmless on sysfs and keeps plain-file test trees exact.
        let fd = rustix::fs::openat(
            block,
            "state",
            OFlags::WRONLY | OFlags::TRUNC | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let n = rustix::io::write(&fd, value.as_bytes())?;
        if n != value.len() {
            return Err(Errno::IO);
        }
        Ok(())
    }
}

/// The memory-block directory under a sysfs root.
#[derive(Debug, Clone)]
pub struct MemoryTree {
    dir: PathBuf,
}

impl MemoryTree {
    /// The tree under `sysfs_root` (normally `/sys`).
    pub fn new(sysfs_root: &Path) -> Self {
        Self {
            dir: sysfs_root.join("devices/system/memory"),
        }
    }

    /// `/…/devices/system/memory`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes per block, from `block_size_bytes` (hex without `0x`).
    pub fn block_size(&self) -> Result<u64, SysfsError> {
        let path = self.dir.join("block_size_bytes");
        let text = std::fs::read_to_string(&path).map_err(|source| SysfsError::Io {
            op: "open",
            path: path.display().to_string(),
            source,
        })?;
        let t = text.trim();
        u64::from_str_radix(t.trim_start_matches("0x"), 16)
            .map_err(|_| SysfsError::BadBlockSize(t.to_string()))
    }

    fn open_dir(&self) -> Result<Option<OwnedFd>, SysfsError> {
        match rustix::fs::open(
            &self.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io_error("open", &self.dir, e)),
        }
    }

    fn io_error(&self, op: &'static str, path: &Path, e: Errno) -> SysfsError {
        SysfsError::Io {
            op,
            path: path.display().to_string(),
            source: e.into(),
        }
    }

    /// Every block, in directory order. A missing tree is an empty list.
    ///
    /// Directory names whose suffix is not a decimal number are skipped (the reference
    /// reports them as phys-index 0).
    pub fn blocks(&self) -> Result<Vec<GuestMemoryBlock>, SysfsError> {
        let Some(dirfd) = self.open_dir()? else {
            return Ok(Vec::new());
        };
        let indices = self.block_indices(&dirfd)?;
        let mut out = vec![
            GuestMemoryBlock {
                phys_index: 0,
                online: false,
                can_offline: Some(false),
            };
            indices.len()
        ];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if indices.len() < PARALLEL_THRESHOLD || threads < 2 {
            read_blocks(&self.dir, dirfd.as_fd(), &indices, &mut out)?;
        } else {
            let chunk = indices.len().div_ceil(threads);
            let dirfd = dirfd.as_fd();
            std::thread::scope(|s| {
                let workers: Vec<_> = indices
                    .chunks(chunk)
                    .zip(out.chunks_mut(chunk))
                    .map(|(idx, dst)| s.spawn(move || read_blocks(&self.dir, dirfd, idx, dst)))
                    .collect();
                workers.into_iter().try_for_each(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(SysfsError::Io {
                            op: "scan",
                            path: self.dir.display().to_string(),
                            source: io::Error::other("scanner thread panicked"),
                        })
                    })
                })
            })?;
        }
        Ok(out)
    }

    /// The N of every `memoryN` directory, in directory order.
    fn block_indices(&self, dirfd: &OwnedFd) -> Result<Vec<u64>, SysfsError> {
        let dir = Dir::read_from(dirfd).map_err(|e| self.io_error("opendir", &self.dir, e))?;
        let mut indices = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| self.io_error("readdir", &self.dir, e))?;
            let Some(index) = parse_block_name(entry.file_name().to_bytes()) else {
                continue;
            };
            match entry.file_type() {
                FileType::Directory => indices.push(index),
                FileType::Unknown => {
                    let is_dir =
                        rustix::fs::statat(dirfd, entry.file_name(), rustix::fs::AtFlags::empty())
                            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                            .unwrap_or(false);
                    if is_dir {
                        indices.push(index);
                    }
                }
                _ => {}
            }
        }
        Ok(indices)
    }

    /// Brings each requested block online or offline, in order, one result per entry.
    pub fn set_blocks(
        &self,
        requests: &[(u64, bool)],
        online_type: OnlineType,
        writer: &dyn StateWriter,
    ) -> Vec<GuestMemoryBlockResponse> {
        let dirfd = match self.open_dir() {
            Ok(Some(fd)) => fd,
            // No tree at all: the kernel cannot hotplug memory.
            Ok(None) | Err(_) => {
                return requests
                    .iter()
                    .map(|&(phys_index, _)| {
                        response(
                            phys_index,
                            GuestMemoryBlockResponseType::OperationNotSupported,
                            None,
                        )
                    })
                    .collect();
            }
        };
        requests
            .iter()
            .map(|&(index, online)| set_block(dirfd.as_fd(), index, online, online_type, writer))
            .collect()
    }
}

fn response(
    phys_index: u64,
    response: GuestMemoryBlockResponseType,
    errno: Option<Errno>,
) -> GuestMemoryBlockResponse {
    GuestMemoryBlockResponse {
        phys_index,
        response,
        error_code: errno.map(|e| i64::from(e.raw_os_error())),
    }
}

fn set_block(
    dirfd: BorrowedFd<'_>,
    index: u64,
    online: bool,
    online_type: OnlineType,
    writer: &dyn StateWriter,
) -> GuestMemoryBlockResponse {
    use GuestMemoryBlockResponseType as R;
    let block = match open_block(dirfd, index) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return response(index, R::NotFound, Some(Errno::NOENT)),
        Err(e) => return response(index, R::OperationFailed, Some(e)),
    };
    let mut buf = [0u8; 32];
    let current = match read_small(block.as_fd(), "state", &mut buf) {
        Ok(state) => state.starts_with(b"online"),
        // Kernels without a `state` file cannot change blocks; onlining an already
        // usable block is a no-op, offlining is impossible.
        Err(Errno::NOENT) if online => return response(index, R::Success, None),
        Err(Errno::NOENT) => return response(index, R::OperationNotSupported, Some(Errno::NOENT)),
        Err(e) => return response(index, R::OperationFailed, Some(e)),
    };
    if current == online {
        return response(index, R::Success, None);
    }
    let word = if online {
        online_type.as_str()
    } else {
        "offline"
    };
    match writer.write_state(block.as_fd(), index, word) {
        Ok(()) => response(index, R::Success, None),
        Err(e) => response(index, R::OperationFailed, Some(e)),
    }
}

/// Reads `state` and `removable` of each block in `indices` into `out` (same length).
///
/// Each file is opened straight from the tree's directory (`memoryN/state`): two opens,
/// two reads and two closes per block, the fewest syscalls the sysfs ABI allows.
fn read_blocks(
    dir: &Path,
    dirfd: BorrowedFd<'_>,
    indices: &[u64],
    out: &mut [GuestMemoryBlock],
) -> Result<(), SysfsError> {
    let mut buf = [0u8; 32];
    for (&index, slot) in indices.iter().zip(out.iter_mut()) {
        slot.phys_index = index;
        let fail = |op, e: Errno, file: &str| SysfsError::Io {
            op,
            path: dir
                .join(format!("memory{index}/{file}"))
                .display()
                .to_string(),
            source: e.into(),
        };
        match read_attr(dirfd, index, "state", &mut buf) {
            Ok(state) => slot.online = state.starts_with(b"online"),
            // Old kernels without `state`: memory is always online and never removable.
            Err(Errno::NOENT) => {
                slot.online = true;
                slot.can_offline = Some(false);
                continue;
            }
            Err(e) => return Err(fail("read", e, "state")),
        }
        slot.can_offline = match read_attr(dirfd, index, "removable", &mut buf) {
            Ok(r) => Some(r.first().is_some_and(|&b| b != b'0')),
            Err(Errno::NOENT) => Some(false),
            Err(e) => return Err(fail("read", e, "removable")),
        };
    }
    Ok(())
}

/// Reads `memory<index>/<file>` relative to the tree, the path formatted on the stack.
fn read_attr<'b>(
    dirfd: BorrowedFd<'_>,
    index: u64,
    file: &str,
    buf: &'b mut [u8],
) -> Result<&'b [u8], Errno> {
    use std::io::Write as _;
    let mut name = [0u8; 48];
    let mut rest = &mut name[..];
    write!(rest, "memory{index}/{file}").map_err(|_| Errno::NAMETOOLONG)?;
    let len = 48 - rest.len();
    let path = std::str::from_utf8(&name[..len]).map_err(|_| Errno::INVAL)?;
    let fd = rustix::fs::openat(dirfd, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let n = rustix::io::read(&fd, &mut *buf)?;
    Ok(&buf[..n])
}

/// Opens `memory<index>` relative to the tree, as a directory handle for `*at` calls.
/// The name is formatted on the stack: no allocation per block.
fn open_block(dirfd: BorrowedFd<'_>, index: u64) -> Result<OwnedFd, Errno> {
    use std::io::Write as _;
    let mut buf = [0u8; 32];
    let mut rest = &mut buf[..];
    write!(rest, "memory{index}").map_err(|_| Errno::NAMETOOLONG)?;
    let len = 32 - rest.len();
    let name = std::str::from_utf8(&buf[..len]).map_err(|_| Errno::INVAL)?;
    rustix::fs::openat(
        dirfd,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Reads at most `buf.len()` bytes of a small sysfs attribute.
fn read_small<'b>(block: BorrowedFd<'_>, file: &str, buf: &'b mut [u8]) -> Result<&'b [u8], Errno> {
    let fd = rustix::fs::openat(block, file, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let n = rustix::io::read(&fd, &mut *buf)?;
    Ok(&buf[..n])
}

/// `memory<N>` with N a decimal number without sign; anything else is not a block.
pub fn parse_block_name(name: &[u8]) -> Option<u64> {
    let digits = name.strip_prefix(b"memory")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names() {
        assert_eq!(parse_block_name(b"memory0"), Some(0));
        assert_eq!(parse_block_name(b"memory4096"), Some(4096));
        assert_eq!(parse_block_name(b"memory"), None);
        assert_eq!(parse_block_name(b"memoryfoo"), None);
        assert_eq!(parse_block_name(b"memory_1"), None);
        assert_eq!(parse_block_name(b"memory+1"), None);
        assert_eq!(parse_block_name(b"memory99999999999999999999999"), None);
        assert_eq!(parse_block_name(b"block_size_bytes"), None);
    }

    #[test]
    fn online_type_words() {
        for t in [
            OnlineType::Online,
            OnlineType::OnlineMovable,
            OnlineType::OnlineKernel,
        ] {
            assert_eq!(OnlineType::parse(t.as_str()), Some(t));
        }
        assert_eq!(OnlineType::parse("movable"), None);
    }
}
