//! The kernel's memory-block tree, `/sys/devices/system/memory`.
//!
//! Listing reads each block's `state` and `removable` with `openat` relative to the
//! tree's directory into stack buffers: two opens, two small reads and two closes per
//! block, no heap allocation per block. Large trees are scanned on every core: sysfs
//! reads are kernel work that parallelises well. Writes open the block directory once
//! and work relative to it.
//!
//! [`MemoryTree::zones`] serves the `__org.qga-bridge_get-memory-zones` extension: the same
//! block scan, plus each block's `valid_zones` and the kernel's auto-online policy
//! (`auto_online_blocks` in the tree, `online_policy` and `auto_movable_ratio` under
//! `module/memory_hotplug/parameters` of the same sysfs root). Zones are what tell a host
//! whether a block can ever be offlined: `removable` reads 1 for every block since Linux 5.7.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use qga_wire::schema::{
    GuestMemoryBlock, GuestMemoryBlockResponse, GuestMemoryBlockResponseType,
    GuestMemoryBlockZones, GuestMemoryOnlineType, GuestMemoryZones,
};
use rustix::{
    fs::{Dir, FileType, Mode, OFlags},
    io::Errno,
};

/// Trees with fewer blocks than this are scanned on the calling thread.
const PARALLEL_THRESHOLD: usize = 1024;

/// The memory-hotplug module's parameters (`online_policy`, `auto_movable_ratio`),
/// relative to the sysfs root.
const PARAMS_DIR: &str = "module/memory_hotplug/parameters";

/// Bytes read of `valid_zones`. The kernel prints at most a few zone names
/// (`DMA32 Normal Movable`); a file filling the buffer is taken as unreadable rather than
/// reported cut short.
const ZONES_BUF: usize = 128;

/// Bytes read of the one-word policy attributes (`online_movable`, `auto-movable`, `301`).
const WORD_BUF: usize = 32;

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

impl From<GuestMemoryOnlineType> for OnlineType {
    fn from(t: GuestMemoryOnlineType) -> Self {
        match t {
            GuestMemoryOnlineType::Online => Self::Online,
            GuestMemoryOnlineType::OnlineMovable => Self::OnlineMovable,
            GuestMemoryOnlineType::OnlineKernel => Self::OnlineKernel,
        }
    }
}

/// The memory directory as the reference names it in messages. Our replies say the same
/// whatever `--sysfs-root` is, so they compare byte for byte with qemu-ga's.
pub const MEMORY_DIR: &str = "/sys/devices/system/memory/";

/// The text glibc's `strerror` gives for `errno` (what qemu-ga appends to its messages).
pub fn strerror(errno: Errno) -> String {
    let text = io::Error::from(errno).to_string();
    let suffix = format!(" (os error {})", errno.raw_os_error());
    match text.strip_suffix(&suffix) {
        Some(plain) => plain.to_string(),
        None => text,
    }
}

/// How reading a small sysfs attribute failed: an `openat`, a `pread`, or nothing to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// `openat(O_RDONLY)` failed.
    Open(Errno),
    /// `pread` failed.
    Pread(Errno),
    /// `pread` returned 0 bytes.
    Eof,
}

impl ReadError {
    /// The errno the reference sees after the failure: 0 after an empty read, because it
    /// clears errno before opening.
    pub fn errno(self) -> i32 {
        match self {
            Self::Open(e) | Self::Pread(e) => e.raw_os_error(),
            Self::Eof => 0,
        }
    }

    /// The reference treats any failure leaving errno at ENOENT as "no such attribute".
    fn is_missing(self) -> bool {
        self.errno() == Errno::NOENT.raw_os_error()
    }
}

/// Failure that makes `guest-get-memory-blocks` or `-info` fail as a whole, worded as
/// qemu-ga 7.2 words it (per-block failures of `set` are results, not errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SysfsError {
    /// Listing: the memory directory exists but cannot be opened.
    ListDir(Errno),
    /// `open(O_RDONLY | O_DIRECTORY)` of the memory directory (`name` empty) or of a block
    /// directory (`name` is `memoryN/`) failed.
    OpenDir {
        /// The directory, relative to [`MEMORY_DIR`].
        name: String,
        /// Why.
        errno: Errno,
    },
    /// Reading an attribute (`state`, `removable`, `block_size_bytes`) failed.
    Read {
        /// The attribute's file name.
        file: &'static str,
        /// How.
        err: ReadError,
    },
    /// Writing a setting (`auto_online_blocks`) failed.
    Write {
        /// The file's name.
        file: &'static str,
        /// Why.
        errno: Errno,
    },
    /// The memory directory holds no block at all.
    NoBlocks,
    /// A scanner thread panicked (a bug, not an OS error).
    ScanPanicked,
}

impl std::fmt::Display for SysfsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ListDir(e) => write!(f, "Can't open directory\"{MEMORY_DIR}\": {}", strerror(*e)),
            Self::OpenDir { name, errno } => {
                write!(f, "open(\"{MEMORY_DIR}{name}\"): {}", strerror(*errno))
            }
            Self::Read { file, err } => match err {
                ReadError::Open(e) => write!(f, "open sysfs file \"{file}\": {}", strerror(*e)),
                ReadError::Pread(e) => write!(f, "pread sysfs file \"{file}\": {}", strerror(*e)),
                ReadError::Eof => write!(f, "pread sysfs file \"{file}\": unexpected EOF"),
            },
            Self::Write { file, errno } => {
                write!(f, "write sysfs file \"{file}\": {}", strerror(*errno))
            }
            Self::NoBlocks => f.write_str("guest reported zero memory blocks!"),
            Self::ScanPanicked => f.write_str("internal error: memory block scan failed"),
        }
    }
}

impl std::error::Error for SysfsError {}

/// Writes a block's `state` file. The real writer is [`KernelWriter`]; tests substitute
/// one that fails with errnos a plain file tree cannot produce (EBUSY, EINVAL).
pub trait StateWriter: Send + Sync + std::fmt::Debug {
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

/// The memory-block directory under a sysfs root, and the memory-hotplug module's
/// parameters under the same root.
#[derive(Debug, Clone)]
pub struct MemoryTree {
    dir: PathBuf,
    params: PathBuf,
}

impl MemoryTree {
    /// The tree under `sysfs_root` (normally `/sys`).
    pub fn new(sysfs_root: &Path) -> Self {
        Self {
            dir: sysfs_root.join("devices/system/memory"),
            params: sysfs_root.join(PARAMS_DIR),
        }
    }

    /// `/…/devices/system/memory`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `/…/module/memory_hotplug/parameters`, where `online_policy` and
    /// `auto_movable_ratio` live.
    pub fn params_dir(&self) -> &Path {
        &self.params
    }

    /// Bytes per block: `block_size_bytes` read as C's `strtol(text, NULL, 16)` would.
    pub fn block_size(&self) -> Result<u64, SysfsError> {
        let dirfd = self.open_dir().map_err(|errno| SysfsError::OpenDir {
            name: String::new(),
            errno,
        })?;
        let mut buf = [0u8; 20];
        let text = read_attr(dirfd.as_fd(), "block_size_bytes", &mut buf).map_err(|err| {
            SysfsError::Read {
                file: "block_size_bytes",
                err,
            }
        })?;
        Ok(strtol_hex(text))
    }

    /// Opens the memory directory (`O_RDONLY | O_DIRECTORY`, trailing slash, like opendir).
    fn open_dir(&self) -> Result<OwnedFd, Errno> {
        open_directory(&self.dir)
    }

    /// Opens the memory directory and lists its blocks, in directory order: `None` when
    /// there is no tree at all, an error when it cannot be listed or holds no block.
    fn list(&self) -> Result<Option<(OwnedFd, Listed)>, SysfsError> {
        let dirfd = match self.open_dir() {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(SysfsError::ListDir(e)),
        };
        let listed = block_indices(&dirfd)?;
        if listed.indices.is_empty() {
            return Err(SysfsError::NoBlocks);
        }
        Ok(Some((dirfd, listed)))
    }

    /// Every block, in directory order. A missing tree is an empty list; a tree without
    /// blocks is an error.
    ///
    /// Directory names whose suffix is not a decimal number are skipped (the reference
    /// reports them as phys-index 0). A block the kernel removes while it is read (a DIMM
    /// or virtio-mem memory being unplugged) is left out: it is gone. The reference fails
    /// the whole listing then ("open(...memoryN/): No such file or directory", or a
    /// `pread` ENODEV), which a host watching an unplug cannot tell from a broken guest.
    pub fn blocks(&self) -> Result<Vec<GuestMemoryBlock>, SysfsError> {
        self.blocks_read_by(read_block)
    }

    /// [`Self::blocks`], each block read by `read` (tests interpose on it).
    fn blocks_read_by<F>(&self, read: F) -> Result<Vec<GuestMemoryBlock>, SysfsError>
    where
        F: Fn(BorrowedFd<'_>, u64, &mut GuestMemoryBlock) -> Result<Read, SysfsError> + Sync,
    {
        let Some((dirfd, listed)) = self.list()? else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Option<GuestMemoryBlock>> = vec![None; listed.indices.len()];
        scan(
            dirfd.as_fd(),
            &listed.indices,
            &mut out,
            |dirfd, index, slot| {
                let mut block = GuestMemoryBlock {
                    phys_index: index,
                    online: false,
                    can_offline: Some(false),
                };
                match read(dirfd, index, &mut block) {
                    Ok(Read::Block) => *slot = Some(block),
                    Ok(Read::Gone) => {}
                    Err(_) if listed.gone(dirfd, index) => {}
                    Err(e) => return Err(e),
                }
                Ok(())
            },
        )?;
        Ok(out.into_iter().flatten().collect())
    }

    /// The `__org.qga-bridge_get-memory-zones` reply: every block of [`Self::blocks`]
    /// (same set, same order, same errors when a block's `state` cannot be read) with its
    /// `valid_zones` and `removable`, plus the kernel's auto-online policy.
    ///
    /// Everything beyond `state` is informational: a missing or unreadable attribute
    /// leaves its member absent instead of failing the command. A block that vanishes
    /// between the listing and its reading (the kernel removed it: virtio-mem unplugs
    /// while the host watches) is left out rather than failing the command.
    pub fn zones(&self) -> Result<GuestMemoryZones, SysfsError> {
        let mut zones = GuestMemoryZones {
            auto_online_blocks: None,
            online_policy: None,
            auto_movable_ratio: None,
            blocks: Vec::new(),
        };
        if let Some((dirfd, listed)) = self.list()? {
            let mut blocks: Vec<Option<GuestMemoryBlockZones>> = vec![None; listed.indices.len()];
            scan(
                dirfd.as_fd(),
                &listed.indices,
                &mut blocks,
                |dirfd, index, slot| {
                    let mut block = GuestMemoryBlockZones {
                        phys_index: index,
                        online: false,
                        valid_zones: None,
                        removable: None,
                    };
                    match read_block_zones(dirfd, index, &mut block) {
                        Ok(()) => *slot = Some(block),
                        Err(_) if listed.gone(dirfd, index) => {}
                        Err(e) => return Err(e),
                    }
                    Ok(())
                },
            )?;
            zones.blocks = blocks.into_iter().flatten().collect();
            let mut buf = [0u8; WORD_BUF];
            zones.auto_online_blocks = read_text(dirfd.as_fd(), "auto_online_blocks", &mut buf)
                .map(|t| t.trim().to_string());
        }
        if let Ok(params) = open_directory(&self.params) {
            let mut buf = [0u8; WORD_BUF];
            zones.online_policy =
                read_text(params.as_fd(), "online_policy", &mut buf).map(|t| t.trim().to_string());
            zones.auto_movable_ratio = read_text(params.as_fd(), "auto_movable_ratio", &mut buf)
                .and_then(|t| t.trim().parse().ok());
        }
        Ok(zones)
    }

    /// Whether block `index` is online now (`None`: it cannot be read).
    pub fn is_online(&self, index: u64) -> Option<bool> {
        let dirfd = self.open_dir().ok()?;
        read_online(dirfd.as_fd(), index, &mut NameBuf::new())
            .ok()
            .map(|o| o.unwrap_or(true))
    }

    /// Writes `word` to `auto_online_blocks` (one `write`, as the kernel ABI expects) and
    /// returns what the kernel reads back, and what it read before (when it could).
    pub fn set_auto_online(&self, word: &str) -> Result<(String, Option<String>), SysfsError> {
        let dirfd = self.open_dir().map_err(|errno| SysfsError::OpenDir {
            name: String::new(),
            errno,
        })?;
        let mut buf = [0u8; WORD_BUF];
        let previous =
            read_text(dirfd.as_fd(), "auto_online_blocks", &mut buf).map(|t| t.trim().to_string());
        let write = || -> Result<(), Errno> {
            let fd = rustix::fs::openat(
                &dirfd,
                "auto_online_blocks",
                OFlags::WRONLY | OFlags::TRUNC | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if rustix::io::write(&fd, word.as_bytes())? != word.len() {
                return Err(Errno::IO);
            }
            Ok(())
        };
        write().map_err(|errno| SysfsError::Write {
            file: "auto_online_blocks",
            errno,
        })?;
        let mut buf = [0u8; WORD_BUF];
        let now = read_attr(dirfd.as_fd(), "auto_online_blocks", &mut buf)
            .map(|t| String::from_utf8_lossy(t).trim().to_string())
            .map_err(|err| SysfsError::Read {
                file: "auto_online_blocks",
                err,
            })?;
        Ok((now, previous))
    }

    /// Brings each requested block online or offline, in order, one result per entry.
    pub fn set_blocks(
        &self,
        requests: &[(u64, bool)],
        online_type: OnlineType,
        writer: &dyn StateWriter,
    ) -> Vec<GuestMemoryBlockResponse> {
        use GuestMemoryBlockResponseType as R;
        let dirfd = match self.open_dir() {
            Ok(fd) => fd,
            Err(e) => {
                // No tree at all: the kernel cannot hotplug memory. Any other failure is a
                // failure (see `Divergence::UnopenableTreeFails` in the differential test).
                let kind = if e == Errno::NOENT {
                    R::OperationNotSupported
                } else {
                    R::OperationFailed
                };
                return requests
                    .iter()
                    .map(|&(phys_index, _)| response(phys_index, kind, Some(e.raw_os_error())))
                    .collect();
            }
        };
        requests
            .iter()
            .map(|&(index, online)| set_block(dirfd.as_fd(), index, online, online_type, writer))
            .collect()
    }
}

/// Opens directory `path` (`O_RDONLY | O_DIRECTORY`, trailing slash, like opendir).
fn open_directory(path: &Path) -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        path.join(""),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Runs `read` for each block of `indices` into the matching slot of `out` (same length),
/// on the calling thread for small trees and on every core for large ones. The error
/// returned is the first in directory order.
fn scan<T, F>(
    dirfd: BorrowedFd<'_>,
    indices: &[u64],
    out: &mut [T],
    read: F,
) -> Result<(), SysfsError>
where
    T: Send,
    F: Fn(BorrowedFd<'_>, u64, &mut T) -> Result<(), SysfsError> + Sync,
{
    let run = |idx: &[u64], dst: &mut [T]| {
        idx.iter()
            .zip(dst.iter_mut())
            .try_for_each(|(&index, slot)| read(dirfd, index, slot))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if indices.len() < PARALLEL_THRESHOLD || threads < 2 {
        return run(indices, out);
    }
    let chunk = indices.len().div_ceil(threads);
    let run = &run;
    std::thread::scope(|s| {
        let workers: Vec<_> = indices
            .chunks(chunk)
            .zip(out.chunks_mut(chunk))
            .map(|(idx, dst)| s.spawn(move || run(idx, dst)))
            .collect();
        // In chunk order, so the error reported is the first in directory order.
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or(Err(SysfsError::ScanPanicked)))
    })
}

/// The blocks a listing found.
#[derive(Debug, Default)]
struct Listed {
    /// The N of every `memoryN` entry the reference takes for a block directory, in
    /// directory order.
    indices: Vec<u64>,
    /// Those whose entry is not spelled as a block is read (`memory05`, or an index past
    /// `i64::MAX`, read as `memory-1`): nearly always none.
    odd: Vec<u64>,
}

impl Listed {
    /// Whether block `index`, whose reading failed, is gone from the tree: the kernel
    /// removed it while it was read. Asked only after a failure, to tell a block being
    /// removed (left out) from a broken one (a failure, as with the reference). An entry
    /// not spelled as it is read is never taken for gone: its path was never there.
    fn gone(&self, dirfd: BorrowedFd<'_>, index: u64) -> bool {
        !self.odd.contains(&index) && gone(dirfd, index)
    }
}

/// The blocks of the memory directory, as the reference takes them: every `memoryN`
/// entry, in directory order. Like qemu-ga it trusts `d_type & DT_DIR`, which is also set
/// for sockets and block devices (their open then fails), and skips unknown types; a
/// readdir error ends the listing as it does there.
fn block_indices(dirfd: &OwnedFd) -> Result<Listed, SysfsError> {
    let dir = Dir::read_from(dirfd).map_err(SysfsError::ListDir)?;
    let mut listed = Listed::default();
    for entry in dir {
        let Ok(entry) = entry else { break };
        let name = entry.file_name().to_bytes();
        let Some(index) = parse_block_name(name) else {
            continue;
        };
        if matches!(
            entry.file_type(),
            FileType::Directory | FileType::Socket | FileType::BlockDevice
        ) {
            listed.indices.push(index);
            if NameBuf::new().block(index, "").as_bytes() != name {
                listed.odd.push(index);
            }
        }
    }
    Ok(listed)
}

fn response(
    phys_index: u64,
    response: GuestMemoryBlockResponseType,
    errno: Option<i32>,
) -> GuestMemoryBlockResponse {
    GuestMemoryBlockResponse {
        phys_index,
        response,
        error_code: errno.map(i64::from),
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
        Err(Errno::NOENT) => {
            return response(index, R::NotFound, Some(Errno::NOENT.raw_os_error()));
        }
        Err(e) => return response(index, R::OperationFailed, Some(e.raw_os_error())),
    };
    let mut buf = [0u8; 10];
    let current = match read_attr(block.as_fd(), "state", &mut buf) {
        Ok(state) => state.starts_with(b"online"),
        // Kernels without a `state` file cannot change blocks; onlining an already
        // usable block is a no-op, offlining is impossible.
        Err(e) if e.is_missing() && online => return response(index, R::Success, None),
        Err(e) if e.is_missing() => {
            return response(index, R::OperationNotSupported, Some(e.errno()));
        }
        Err(e) => return response(index, R::OperationFailed, Some(e.errno())),
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
        Err(e) => response(index, R::OperationFailed, Some(e.raw_os_error())),
    }
}

/// What reading one block found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The block, read.
    Block,
    /// The block's directory is gone: the kernel removed it while it was read.
    Gone,
}

/// Whether block `index`'s directory (as it is read, `memoryN/`) is gone from the tree.
fn gone(dirfd: BorrowedFd<'_>, index: u64) -> bool {
    matches!(open_block(dirfd, index), Err(Errno::NOENT))
}

/// Reads block `index`'s `state` and `removable` into `slot`, as `guest-get-memory-blocks`
/// reports them.
///
/// Each file is opened straight from the tree's directory (`memoryN/state`): two opens,
/// two reads and two closes per block, the fewest syscalls the sysfs ABI allows.
fn read_block(
    dirfd: BorrowedFd<'_>,
    index: u64,
    slot: &mut GuestMemoryBlock,
) -> Result<Read, SysfsError> {
    slot.phys_index = index;
    let mut name = NameBuf::new();
    let Some(online) = read_online(dirfd, index, &mut name)? else {
        // Old kernels without `state`: always online and never removable.
        slot.online = true;
        slot.can_offline = Some(false);
        return Ok(Read::Block);
    };
    slot.online = online;
    let mut byte = [0u8; 1];
    slot.can_offline = match read_attr(dirfd, name.block(index, "/removable"), &mut byte) {
        Ok(r) => Some(r != b"0"),
        // A block removed between its `state` and its `removable` is not a block
        // without `removable`.
        Err(err) if err.is_missing() && gone(dirfd, index) => return Ok(Read::Gone),
        Err(err) if err.is_missing() => Some(false),
        Err(err) => {
            return Err(SysfsError::Read {
                file: "removable",
                err,
            });
        }
    };
    Ok(Read::Block)
}

/// Reads block `index`'s `state`, `removable` and `valid_zones` into `slot`. `state` is
/// read (and fails) exactly as for `guest-get-memory-blocks`; the other two are absent
/// when they cannot be read.
fn read_block_zones(
    dirfd: BorrowedFd<'_>,
    index: u64,
    slot: &mut GuestMemoryBlockZones,
) -> Result<(), SysfsError> {
    slot.phys_index = index;
    let mut name = NameBuf::new();
    // Old kernels without `state`: always online.
    slot.online = read_online(dirfd, index, &mut name)?.unwrap_or(true);
    let mut byte = [0u8; 1];
    slot.removable = read_attr(dirfd, name.block(index, "/removable"), &mut byte)
        .ok()
        .map(|r| r != b"0");
    // An offline block's candidate zones are worked out for its NUMA node; a block the
    // kernel is still adding has none yet, and reading its valid_zones then oopses Linux
    // 6.1 (zone_for_pfn_range on NUMA_NO_NODE; seen with virtio-mem). The `nodeN` link
    // comes once the node is set: without it, the zones are not known yet.
    if !slot.online && !has_node(dirfd, index) {
        slot.valid_zones = None;
        return Ok(());
    }
    let mut buf = [0u8; ZONES_BUF];
    slot.valid_zones = read_text(dirfd, name.block(index, "/valid_zones"), &mut buf)
        .map(|text| text.split_ascii_whitespace().map(String::from).collect());
    Ok(())
}

/// Whether block `index`'s directory has its `nodeN` link, which the kernel makes once it
/// has put the block under a NUMA node.
fn has_node(dirfd: BorrowedFd<'_>, index: u64) -> bool {
    let Ok(block) = open_block(dirfd, index) else {
        return false;
    };
    let Ok(dir) = Dir::read_from(&block) else {
        return false;
    };
    dir.filter_map(Result::ok)
        .any(|e| e.file_name().to_bytes().starts_with(b"node"))
}

/// Whether block `index` is online, from its `state`; `None` when the kernel has no
/// `state` file (then the block is always online and cannot be changed).
///
/// Only when reading `state` fails is the block directory opened on its own, because the
/// reference opens it first and reports its failure instead.
fn read_online(
    dirfd: BorrowedFd<'_>,
    index: u64,
    name: &mut NameBuf,
) -> Result<Option<bool>, SysfsError> {
    let mut buf = [0u8; 10];
    match read_attr(dirfd, name.block(index, "/state"), &mut buf) {
        Ok(state) => Ok(Some(state.starts_with(b"online"))),
        Err(err) => {
            open_block(dirfd, index).map_err(|errno| SysfsError::OpenDir {
                name: format!("memory{}/", index as i64),
                errno,
            })?;
            if err.is_missing() {
                Ok(None)
            } else {
                Err(SysfsError::Read { file: "state", err })
            }
        }
    }
}

/// The text of a small informational attribute, or `None` when it cannot be read, is
/// empty, is not UTF-8, or fills `buf` (then it may have been cut short).
fn read_text<'b>(dirfd: BorrowedFd<'_>, path: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    let len = buf.len();
    let text = read_attr(dirfd, path, buf).ok()?;
    if text.len() >= len {
        return None;
    }
    std::str::from_utf8(text).ok()
}

/// Reads at most `buf.len()` bytes from the start of `path` (relative to `dirfd`), as
/// qemu-ga's `ga_read_sysfs_file` does: `openat`, one `pread`, no bytes is an error.
fn read_attr<'b>(
    dirfd: BorrowedFd<'_>,
    path: &str,
    buf: &'b mut [u8],
) -> Result<&'b [u8], ReadError> {
    let fd = rustix::fs::openat(dirfd, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(ReadError::Open)?;
    let n = rustix::io::pread(&fd, &mut *buf, 0).map_err(ReadError::Pread)?;
    match buf.get(..n) {
        Some([]) | None => Err(ReadError::Eof),
        Some(read) => Ok(read),
    }
}

/// A block path formatted on the stack: no allocation per block.
struct NameBuf([u8; 48]);

impl NameBuf {
    fn new() -> Self {
        Self([0; 48])
    }

    /// `memory<index><suffix>`, the index printed signed as the reference's `PRId64`.
    /// 48 bytes hold the longest index with any suffix used here, and the text is ASCII,
    /// so neither fallback below is ever taken.
    fn block(&mut self, index: u64, suffix: &str) -> &str {
        use std::io::Write as _;
        let mut rest = &mut self.0[..];
        let _ = write!(rest, "memory{}{suffix}", index as i64);
        let len = 48 - rest.len();
        std::str::from_utf8(&self.0[..len]).unwrap_or_default()
    }
}

/// Opens `memory<index>/` relative to the tree (`O_RDONLY | O_DIRECTORY`, as the
/// reference), as a directory handle for `*at` calls.
fn open_block(dirfd: BorrowedFd<'_>, index: u64) -> Result<OwnedFd, Errno> {
    let mut name = NameBuf::new();
    let path = name.block(index, "/");
    rustix::fs::openat(
        dirfd,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// C's `strtol(text, NULL, 16)` converted to `uint64_t`, as the reference reads
/// `block_size_bytes`: leading white space, a sign, an optional `0x`, hex digits up to the
/// first other byte (or NUL); nothing parsable is 0, overflow saturates at `LONG_MAX` /
/// `LONG_MIN`, and negative values wrap.
pub fn strtol_hex(text: &[u8]) -> u64 {
    let mut rest = text.split(|&b| b == 0).next().unwrap_or_default();
    while let [b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r', tail @ ..] = rest {
        rest = tail;
    }
    let negative = match rest {
        [b'-', tail @ ..] => {
            rest = tail;
            true
        }
        [b'+', tail @ ..] => {
            rest = tail;
            false
        }
        _ => false,
    };
    if let [b'0', b'x' | b'X', tail @ ..] = rest
        && tail.first().is_some_and(u8::is_ascii_hexdigit)
    {
        rest = tail;
    }
    let mut magnitude: u64 = 0;
    for &b in rest {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        magnitude = magnitude
            .saturating_mul(16)
            .saturating_add(u64::from(digit));
    }
    let limit = if negative { 1 << 63 } else { i64::MAX as u64 };
    match (magnitude > limit, negative) {
        (true, false) => i64::MAX as u64,
        (true, true) => i64::MIN as u64,
        (false, false) => magnitude,
        (false, true) => magnitude.wrapping_neg(),
    }
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

    use qga_testkit::{FakeSysfs, Node};

    #[test]
    fn blocks_removed_while_the_listing_reads_them_are_left_out() {
        let tree = FakeSysfs::with_blocks(6, "online");
        let memory = MemoryTree::new(tree.root());
        let remove = |index: u64| {
            std::fs::remove_dir_all(tree.memory_dir().join(format!("memory{index}")))
                .expect("remove block");
        };
        let listed = memory
            .blocks_read_by(|dirfd, index, slot| match index {
                // Gone between the directory read and the block's own files.
                2 => {
                    remove(2);
                    read_block(dirfd, index, slot)
                }
                // Gone while its files were read: the kernel answers a read of a removed
                // attribute with ENODEV.
                4 => {
                    read_block(dirfd, index, slot)?;
                    remove(4);
                    Err(SysfsError::Read {
                        file: "removable",
                        err: ReadError::Pread(Errno::NODEV),
                    })
                }
                _ => read_block(dirfd, index, slot),
            })
            .expect("the listing survives the removals");
        let mut indices: Vec<u64> = listed.iter().map(|b| b.phys_index).collect();
        indices.sort_unstable();
        assert_eq!(indices, [0, 1, 3, 5]);
        assert!(
            listed
                .iter()
                .all(|b| b.online && b.can_offline == Some(true))
        );
    }

    #[test]
    fn a_block_that_is_there_but_unreadable_still_fails_the_listing() {
        let tree = FakeSysfs::with_blocks(4, "online");
        tree.replace("memory2/state", Node::Dir);
        let err = MemoryTree::new(tree.root())
            .blocks()
            .expect_err("like the reference");
        assert!(
            matches!(err, SysfsError::Read { file: "state", .. }),
            "{err:?}"
        );
        let err = MemoryTree::new(tree.root())
            .blocks_read_by(|_, index, slot| {
                slot.phys_index = index;
                Err(SysfsError::Read {
                    file: "removable",
                    err: ReadError::Pread(Errno::NODEV),
                })
            })
            .expect_err("an error of a block still there is not a removal");
        assert!(
            matches!(
                err,
                SysfsError::Read {
                    file: "removable",
                    ..
                }
            ),
            "{err:?}"
        );
    }

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
    fn block_size_parses_like_strtol() {
        let cases: &[(&str, u64)] = &[
            ("8000000\n", 0x800_0000),
            ("  0x10", 16),
            ("+0X1f", 31),
            ("-1", u64::MAX),
            ("-0x8", u64::MAX - 7),
            ("zz", 0),
            ("0x", 0),
            ("0xg", 0),
            ("12g4", 0x12),
            ("fffffffffffffffff", i64::MAX as u64),
            ("-fffffffffffffffff", 1 << 63),
            ("7fffffffffffffff", i64::MAX as u64),
            ("8000000000000000", i64::MAX as u64),
            ("-8000000000000000", 1 << 63),
            (" \t\n 8", 8),
            ("1 2", 1),
            ("1\x002", 1),
        ];
        for &(text, size) in cases {
            assert_eq!(strtol_hex(text.as_bytes()), size, "{text:?}");
        }
    }

    #[test]
    fn messages_read_like_the_reference() {
        assert_eq!(strerror(Errno::ISDIR), "Is a directory");
        assert_eq!(
            SysfsError::ListDir(Errno::NOTDIR).to_string(),
            "Can't open directory\"/sys/devices/system/memory/\": Not a directory"
        );
        assert_eq!(
            SysfsError::Read {
                file: "state",
                err: ReadError::Eof
            }
            .to_string(),
            "pread sysfs file \"state\": unexpected EOF"
        );
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

    #[test]
    fn wire_online_types_write_the_same_words() {
        for t in GuestMemoryOnlineType::ALL {
            assert_eq!(OnlineType::from(t).as_str(), t.as_str());
        }
    }

    #[test]
    fn params_live_under_the_same_root() {
        let tree = MemoryTree::new(Path::new("/x"));
        assert_eq!(tree.dir(), Path::new("/x/devices/system/memory"));
        assert_eq!(
            tree.params_dir(),
            Path::new("/x/module/memory_hotplug/parameters")
        );
    }
}
