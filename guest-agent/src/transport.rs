//! The channels the agent listens on, as qemu-ga names them (`-m`).
//!
//! - `virtio-serial`: the guest end of QEMU's `virtserialport`. It has no connection
//!   semantics: while no host is connected reads return end-of-file and `poll` reports
//!   `POLLHUP` continuously, so a naive loop spins. We register for `SIGIO` (`O_ASYNC`),
//!   which the virtio console driver raises when the host opens or closes the port, and
//!   sleep until then.
//! - `isa-serial`: a tty in raw mode.
//! - `unix-listen`: a listening unix socket, one client at a time.
//! - `vsock-listen`: a listening `AF_VSOCK` socket, `CID:PORT`, one client at a time.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::fs::{Mode, OFlags};
use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    commands::Agent,
    fd_stream::{FdStream, register},
    server::serve,
};

/// Where the virtio-serial port usually is (a udev symlink).
pub const VIRTIO_SERIAL_DEFAULT: &str = "/dev/virtio-ports/org.qemu.guest_agent.0";
/// The port name QEMU gives the guest agent channel.
pub const VIRTIO_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Default serial device for `isa-serial`.
pub const ISA_SERIAL_DEFAULT: &str = "/dev/ttyS0";
/// Default socket for `unix-listen`.
pub const UNIX_LISTEN_DEFAULT: &str = "/var/run/qemu-ga.sock";

/// How long to sleep between checks when no host is connected and no `SIGIO` arrives
/// (a safety net; the signal normally wakes us at once).
const IDLE_RECHECK: Duration = Duration::from_secs(30);
/// Pause before reopening a channel that failed, with `--retry-path`.
const RETRY_DELAY: Duration = Duration::from_secs(5);

/// The transport methods of qemu-ga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Method {
    /// The virtio-serial port (default).
    #[default]
    VirtioSerial,
    /// A listening unix socket.
    UnixListen,
    /// A listening vsock socket, `CID:PORT`.
    VsockListen,
    /// A serial tty.
    IsaSerial,
}

impl Method {
    /// The method's name on the command line and in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VirtioSerial => "virtio-serial",
            Self::UnixListen => "unix-listen",
            Self::VsockListen => "vsock-listen",
            Self::IsaSerial => "isa-serial",
        }
    }

    /// Parses a method name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::VirtioSerial,
            Self::UnixListen,
            Self::VsockListen,
            Self::IsaSerial,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// What the transport needs from the configuration.
#[derive(Debug, Clone)]
pub struct Channel {
    /// Transport method.
    pub method: Method,
    /// Device, socket path or `CID:PORT`; `None` for the method's default.
    pub path: Option<String>,
    /// Keep retrying when the channel cannot be opened or fails.
    pub retry: bool,
    /// Largest request accepted, in bytes.
    pub max_message: usize,
    /// Root of sysfs, to find virtio ports by name.
    pub sysfs_root: PathBuf,
}

/// Serves `agent` on `channel` until an unrecoverable error.
pub async fn run(channel: &Channel, agent: &Agent) -> io::Result<()> {
    match channel.method {
        Method::UnixListen => {
            let path = channel.path.as_deref().unwrap_or(UNIX_LISTEN_DEFAULT);
            unix_listen(Path::new(path), channel, agent).await
        }
        Method::VsockListen => {
            let path = channel.path.as_deref().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "vsock-listen needs --path CID:PORT",
                )
            })?;
            let (cid, port) = parse_vsock(path)?;
            vsock_listen(cid, port, channel, agent).await
        }
        Method::VirtioSerial | Method::IsaSerial => loop {
            match serial(channel, agent).await {
                Ok(()) => return Ok(()),
                Err(e) if channel.retry => {
                    tracing::warn!(error = %e, "channel failed; retrying");
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                Err(e) => return Err(e),
            }
        },
    }
}

async fn unix_listen(path: &Path, channel: &Channel, agent: &Agent) -> io::Result<()> {
    // A socket file left by an earlier run would make bind fail.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = UnixListener::bind(path)?;
    tracing::info!(path = %path.display(), "listening (unix-listen)");
    loop {
        let (stream, _) = listener.accept().await?;
        tracing::debug!("client connected");
        let (r, w) = stream.into_split();
        if let Err(e) = serve(r, w, agent, channel.max_message).await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
        tracing::debug!("client disconnected");
    }
}

/// Finds the virtio port named [`VIRTIO_PORT_NAME`] when the udev symlink is absent.
pub fn find_virtio_port(sysfs_root: &Path) -> Option<PathBuf> {
    let ports = std::fs::read_dir(sysfs_root.join("class/virtio-ports")).ok()?;
    ports.flatten().find_map(|entry| {
        let name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim() == VIRTIO_PORT_NAME).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

fn serial_path(channel: &Channel) -> io::Result<PathBuf> {
    if let Some(p) = &channel.path {
        return Ok(PathBuf::from(p));
    }
    match channel.method {
        Method::IsaSerial => Ok(PathBuf::from(ISA_SERIAL_DEFAULT)),
        _ => {
            let default = Path::new(VIRTIO_SERIAL_DEFAULT);
            if default.exists() {
                return Ok(default.to_path_buf());
            }
            find_virtio_port(&channel.sysfs_root).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no virtio-serial port named {VIRTIO_PORT_NAME}"),
                )
            })
        }
    }
}

async fn serial(channel: &Channel, agent: &Agent) -> io::Result<()> {
    let path = serial_path(channel)?;
    // Listen for SIGIO before opening, so a host connecting in between is not missed.
    let sigio = signal(SignalKind::io())?;
    let fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let port = if channel.method == Method::IsaSerial {
        let mut tio = rustix::termios::tcgetattr(&fd)?;
        tio.make_raw();
        rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &tio)?;
        FdStream::new(fd)?
    } else {
        request_sigio(&fd)?;
        FdStream::with_host_signal(fd, sigio)?
    };
    tracing::info!(path = %path.display(), method = channel.method.as_str(), "channel open");
    loop {
        serve(&port, &port, agent, channel.max_message).await?;
        // End of file: no host connected. Sleep until the driver signals a change.
        tracing::debug!("no host connected; waiting");
        port.host_change(IDLE_RECHECK).await;
    }
}

/// Asks the kernel to send us `SIGIO` when the port's state changes.
fn request_sigio(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_SETOWN on a descriptor we own, with our own pid; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, libc::getpid()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | OFlags::ASYNC)?;
    Ok(())
}

fn parse_vsock(s: &str) -> io::Result<(u32, u32)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad vsock address '{s}', expected CID:PORT"),
        )
    };
    let (cid, port) = s.split_once(':').ok_or_else(bad)?;
    let cid = match cid.parse::<i64>().map_err(|_| bad())? {
        -1 => libc::VMADDR_CID_ANY,
        c => u32::try_from(c).map_err(|_| bad())?,
    };
    Ok((cid, port.parse().map_err(|_| bad())?))
}

async fn vsock_listen(cid: u32, port: u32, channel: &Channel, agent: &Agent) -> io::Result<()> {
    let listener = register(vsock_socket(cid, port)?)?;
    tracing::info!(cid, port, "listening (vsock-listen)");
    loop {
        let fd = loop {
            let mut guard = listener.readable().await?;
            match guard.try_io(|l| {
                // SAFETY: accept4 on our listening socket; null address pointers are allowed.
                let fd = unsafe {
                    libc::accept4(
                        l.get_ref().as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    )
                };
                if fd < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                }
            }) {
                Ok(res) => break res?,
                Err(_would_block) => continue,
            }
        };
        let conn = FdStream::new(fd)?;
        if let Err(e) = serve(&conn, &conn, agent, channel.max_message).await {
            tracing::debug!(error = %e, "vsock client ended with an error");
        }
    }
}

fn vsock_socket(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let raw = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is a plain C struct for which all-zero bytes are valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm that outlives the call and `len` is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a socket we own; no memory is passed.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_addresses() {
        assert_eq!(parse_vsock("3:1234").ok(), Some((3, 1234)));
        assert_eq!(
            parse_vsock("-1:1234").ok(),
            Some((libc::VMADDR_CID_ANY, 1234))
        );
        assert!(parse_vsock("1234").is_err());
        assert!(parse_vsock("x:1").is_err());
    }

    #[test]
    fn methods_round_trip() {
        for m in [
            Method::VirtioSerial,
            Method::UnixListen,
            Method::VsockListen,
            Method::IsaSerial,
        ] {
            assert_eq!(Method::parse(m.as_str()), Some(m));
        }
    }

    #[test]
    fn finds_port_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (port, name) in [
            ("vport0p1", "org.qemu.other"),
            ("vport1p1", "org.qemu.guest_agent.0"),
        ] {
            let p = dir.path().join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(p.join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(
            find_virtio_port(dir.path()),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_virtio_port(Path::new("/nonexistent")), None);
    }
}
