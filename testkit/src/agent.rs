//! Agent processes for tests: ours, or the reference `qemu-ga`, on a fake tree.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{FakeSysfs, QgaClient};

/// Where Debian installs the reference agent.
pub const QEMU_GA: &str = "/usr/sbin/qemu-ga";

/// How long an agent may take to create its socket: a bound for a loaded machine, not a
/// timing.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Which agent to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// Our `qga-agent`.
    Ours,
    /// The reference `qemu-ga` (Debian's `qemu-guest-agent`).
    Reference,
}

impl AgentKind {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ours => "qga-agent",
            Self::Reference => "qemu-ga",
        }
    }
}

/// The path of workspace binary `name` for the profile the current test runs in.
///
/// Test executables live in `target/<profile>/deps/`; binaries one level up. When the
/// binary is missing (e.g. `cargo test -p` of another package), it is built with
/// `cargo build --bin name` first. Under `cargo nextest run --workspace` every binary is
/// already built.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&workspace).args(["build", "--bin", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// A running agent serving a unix socket. Killed and cleaned up when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    kind: AgentKind,
    socket: PathBuf,
    _dir: TempDir,
}

impl AgentProcess {
    /// Starts `kind` on `tree` with `extra` arguments appended (e.g. `--online-type`).
    pub fn start(kind: AgentKind, tree: &FakeSysfs, extra: &[&str]) -> io::Result<Self> {
        Self::spawn(kind, Some(tree), extra)
    }

    /// Starts `kind` on this machine's real `/sys` (read-only use only!).
    pub fn start_on_real_sysfs(kind: AgentKind, extra: &[&str]) -> io::Result<Self> {
        Self::spawn(kind, None, extra)
    }

    fn spawn(kind: AgentKind, tree: Option<&FakeSysfs>, extra: &[&str]) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("qga-agent-").tempdir()?;
        let socket = dir.path().join("agent.sock");
        let pidfile = dir.path().join("agent.pid");
        let mut cmd = match (kind, tree) {
            (AgentKind::Ours, _) => {
                let mut cmd = Command::new(bin_path("qga-agent"));
                cmd.arg("-m").arg("unix-listen").arg("-p").arg(&socket);
                cmd.arg("-t").arg(dir.path()).arg("-f").arg(&pidfile);
                // A config file of the machine must not change what tests see.
                cmd.arg("-c").arg("/dev/null");
                let root = tree.map_or_else(|| PathBuf::from("/sys"), |t| t.root().to_path_buf());
                cmd.arg("--sysfs-root").arg(root);
                cmd
            }
            (AgentKind::Reference, Some(tree)) => {
                // A private mount namespace: the bind mount is seen by this agent only.
                // The tree's `devices/system` covers the real one, so the memory directory
                // itself may be missing, a file or a symlink, as in our agent's view.
                let mut cmd = Command::new("unshare");
                cmd.args(["-m", "--propagation", "private", "sh", "-c"]);
                cmd.arg("mount --bind \"$1\" /sys/devices/system && shift && exec \"$@\"");
                cmd.arg("sh").arg(tree.system_dir()).arg(QEMU_GA);
                cmd.arg("-m").arg("unix-listen").arg("-p").arg(&socket);
                cmd.arg("-t").arg(dir.path()).arg("-f").arg(&pidfile);
                cmd
            }
            (AgentKind::Reference, None) => {
                let mut cmd = Command::new(QEMU_GA);
                cmd.arg("-m").arg("unix-listen").arg("-p").arg(&socket);
                cmd.arg("-t").arg(dir.path()).arg("-f").arg(&pidfile);
                cmd
            }
        };
        cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null());
        let child = cmd.spawn()?;
        let mut agent = Self {
            child,
            kind,
            socket,
            _dir: dir,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited before serving: {status}",
                    self.kind.name()
                )));
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not create its socket", self.kind.name()),
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Which agent this is.
    pub fn kind(&self) -> AgentKind {
        self.kind
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's pid (for `/proc` measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new client connection.
    pub fn client(&self) -> io::Result<QgaClient> {
        QgaClient::connect(&self.socket)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
