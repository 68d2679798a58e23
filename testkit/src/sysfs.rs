//! Fake memory-block trees on a real file system (tmpfs or disk).

use std::{
    fs,
    ops::Range,
    path::{Path, PathBuf},
};

use tempfile::TempDir;

/// What [`FakeSysfs::replace`] puts in place of a file of the tree. Each yields a real
/// errno (or none) that root cannot bypass, identically in every tree:
///
/// | node | open `O_RDONLY` | read | open `O_DIRECTORY` | `d_type` |
/// |------|-----------------|------|--------------------|----------|
/// | `Dir` | ok | EISDIR | ok | DT_DIR |
/// | `File("")` | ok | EOF | ENOTDIR | DT_REG |
/// | `Symlink(own name)` | ELOOP | | ELOOP | DT_LNK |
/// | `Symlink("nowhere")` | ENOENT | | ENOENT | DT_LNK |
/// | `Fifo` | blocks! | | ENOTDIR | DT_FIFO |
/// | `Socket` | ENXIO | | ENOTDIR | DT_SOCK |
///
/// `Symlink("/dev/full")` reads as zero bytes and fails writes with ENOSPC;
/// `Symlink("/dev/null")` reads as EOF and accepts writes.
#[derive(Debug, Clone, Copy)]
pub enum Node<'a> {
    /// A regular file with these contents, written as is (no newline added).
    File(&'a str),
    /// An empty directory.
    Dir,
    /// A symbolic link to this target.
    Symlink(&'a str),
    /// A named pipe.
    Fifo,
    /// A unix socket (bound, then closed: the socket file stays).
    Socket,
}

/// A fake sysfs root holding `devices/system/memory` with `block_size_bytes` (128 MiB by
/// default) and the blocks the test adds. Removed when dropped.
///
/// Files are plain files, so writes by an agent land in them and can be read back with
/// [`FakeSysfs::state`]. Methods panic on I/O failure: this is test scaffolding.
#[derive(Debug)]
pub struct FakeSysfs {
    dir: TempDir,
}

impl Default for FakeSysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeSysfs {
    /// An empty tree with a 128 MiB block size. Prefers `/dev/shm` (tmpfs) when present,
    /// like sysfs an in-memory file system.
    pub fn new() -> Self {
        let dir = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("qga-sysfs-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new().prefix("qga-sysfs-").tempdir()
        }
        .expect("create temp dir");
        let tree = Self { dir };
        fs::create_dir_all(tree.memory_dir()).expect("create memory dir");
        tree.block_size(0x800_0000);
        tree
    }

    /// A tree with blocks `0..n`, all in `state`, removable.
    pub fn with_blocks(n: u64, state: &str) -> Self {
        let tree = Self::new();
        tree.blocks(0..n, state);
        tree
    }

    /// The sysfs root to pass as `--sysfs-root`.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The `devices/system` directory (what the reference gets bind-mounted over the real
    /// `/sys/devices/system`).
    pub fn system_dir(&self) -> PathBuf {
        self.dir.path().join("devices/system")
    }

    /// The `devices/system/memory` directory.
    pub fn memory_dir(&self) -> PathBuf {
        self.dir.path().join("devices/system/memory")
    }

    /// Sets `block_size_bytes` (written in hex without `0x`, as the kernel does).
    pub fn block_size(&self, bytes: u64) -> &Self {
        fs::write(
            self.memory_dir().join("block_size_bytes"),
            format!("{bytes:x}\n"),
        )
        .expect("write block size");
        self
    }

    /// Adds `memoryN` with the given `state` and `removable` contents (`None`: no file).
    pub fn block(&self, index: u64, state: Option<&str>, removable: Option<&str>) -> &Self {
        let dir = self.memory_dir().join(format!("memory{index}"));
        fs::create_dir_all(&dir).expect("create block dir");
        if let Some(s) = state {
            fs::write(dir.join("state"), format!("{s}\n")).expect("write state");
        }
        if let Some(r) = removable {
            fs::write(dir.join("removable"), format!("{r}\n")).expect("write removable");
        }
        fs::write(dir.join("phys_index"), format!("{index:08x}\n")).expect("write phys_index");
        // The kernel's link to the block's NUMA node (a directory stands in for it).
        fs::create_dir_all(dir.join("node0")).expect("create node link");
        self
    }

    /// Adds blocks `range`, all in `state`, removable.
    pub fn blocks(&self, range: Range<u64>, state: &str) -> &Self {
        for i in range {
            self.block(i, Some(state), Some("1"));
        }
        self
    }

    /// Adds a directory with an arbitrary name (e.g. `memoryfoo`) holding a `state`.
    pub fn odd_dir(&self, name: &str) -> &Self {
        let dir = self.memory_dir().join(name);
        fs::create_dir_all(&dir).expect("create odd dir");
        fs::write(dir.join("state"), "online\n").expect("write state");
        self
    }

    /// Removes the whole `devices/system/memory` directory (a kernel without hotplug).
    pub fn remove_memory_dir(&self) -> &Self {
        fs::remove_dir_all(self.memory_dir()).expect("remove memory dir");
        self
    }

    /// Replaces `path` (relative to the memory directory; `""` is the memory directory
    /// itself) with `node`, removing whatever was there first.
    pub fn replace(&self, path: &str, node: Node<'_>) -> &Self {
        let memory = self.memory_dir();
        let at = if path.is_empty() {
            memory
        } else {
            memory.join(path)
        };
        let at = at.as_path();
        match fs::symlink_metadata(at) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(at).expect("remove dir"),
            Ok(_) => fs::remove_file(at).expect("remove file"),
            Err(_) => {}
        }
        match node {
            Node::File(text) => fs::write(at, text).expect("write file"),
            Node::Dir => fs::create_dir(at).expect("create dir"),
            Node::Symlink(target) => std::os::unix::fs::symlink(target, at).expect("symlink"),
            Node::Fifo => rustix::fs::mknodat(
                rustix::fs::CWD,
                at,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .expect("mkfifo"),
            Node::Socket => drop(std::os::unix::net::UnixListener::bind(at).expect("bind")),
        }
        self
    }

    /// The current content of block `index`'s `state`, trimmed.
    pub fn state(&self, index: u64) -> String {
        self.state_of(&format!("memory{index}"))
    }

    /// The current content of `state` in directory `name` (e.g. `memory-1`), trimmed.
    pub fn state_of(&self, name: &str) -> String {
        fs::read_to_string(self.memory_dir().join(name).join("state"))
            .expect("read state")
            .trim()
            .to_string()
    }

    /// Overwrites block `index`'s `state`.
    pub fn set_state(&self, index: u64, state: &str) -> &Self {
        fs::write(
            self.memory_dir().join(format!("memory{index}/state")),
            format!("{state}\n"),
        )
        .expect("write state");
        self
    }
}
