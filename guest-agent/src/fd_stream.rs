//! A non-blocking file descriptor (virtio-serial port, serial tty, vsock connection) as a
//! tokio stream, for [`crate::server::serve`].
//!
//! tokio keeps a descriptor's "closed" readiness for good once epoll has reported a
//! hang-up. A virtio-serial port reports `POLLHUP` whenever no host is connected — at
//! boot, before the host opens its end, and each time the host goes away — and later
//! the host connects: reads then return `EAGAIN` while the readiness still says
//! "closed, ready", so a read loop would never wait and the agent would take a whole
//! vCPU for as long as the host stays connected and idle (slowing everything the guest
//! does, memory hotplug included). On a would-block with a closed readiness, the stream
//! registers the descriptor with the reactor again, which starts from the port's state as
//! it is now.
//!
//! A reply to a port with no host waits for one: the driver can hand over a new host's
//! request before it learns that the host connected (data and the connection message
//! travel on different virtqueues), and a port with no host takes no bytes. The wait ends
//! on `SIGIO`, which the driver raises when the host connects or goes (and for incoming
//! data: a wake-up then only means "look again") ([`FdStream::with_host_signal`]); a later
//! host gets the reply as a stale one, which QGA hosts discard (`guest-sync`), as with
//! qemu-ga.
//!
//! Read and write from one task, one after the other, as [`crate::server::serve`] does:
//! registering again drops the other direction's waiting task without waking it.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll, ready},
    time::Duration,
};

use qga_wire::sync::lock;
use rustix::event::{PollFd, PollFlags};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, unix::AsyncFd},
    signal::unix::Signal,
};

/// A non-blocking descriptor as a tokio stream. Reading and writing go through
/// `&FdStream`, so one value serves both halves.
#[derive(Debug)]
pub struct FdStream {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` only after registering again failed; every call then fails.
    fd: Option<AsyncFd<OwnedFd>>,
    /// `SIGIO`, for a port that raises it when its host connects or goes.
    host_change: Option<Signal>,
}

/// Registers a descriptor we own with the runtime's reactor.
pub(crate) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which is its only owner from then on:
    // nothing else can close or replace the descriptor while it is registered.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

impl FdStream {
    /// Wraps a descriptor already in non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Self::with(fd, None)
    }

    /// Wraps a virtio-serial port (non-blocking) whose driver raises `host_change`
    /// (`SIGIO`, asked for with `O_ASYNC` and `F_SETOWN`) when its host connects or goes;
    /// the idle wait ([`FdStream::host_change`]) and a reply waiting for a host both
    /// wait on it.
    pub fn with_host_signal(fd: OwnedFd, host_change: Signal) -> io::Result<Self> {
        Self::with(fd, Some(host_change))
    }

    fn with(fd: OwnedFd, host_change: Option<Signal>) -> io::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                fd: Some(register(fd)?),
                host_change,
            }),
        })
    }

    /// Waits for the port's next `SIGIO` (the host connected or went, or data came; at
    /// once when one came since the last wait), at most `limit`; for `limit` on a
    /// descriptor without that signal.
    pub async fn host_change(&self, limit: Duration) {
        let changed = std::future::poll_fn(|cx| match lock(&self.inner).host_change.as_mut() {
            Some(signal) => signal.poll_recv(cx).map(drop),
            None => Poll::Pending,
        });
        let _ = tokio::time::timeout(limit, changed).await;
    }
}

/// Takes the descriptor out of the reactor and puts it back, clearing a stale "closed".
fn register_again(slot: &mut Option<AsyncFd<OwnedFd>>) -> io::Result<()> {
    if let Some(registered) = slot.take() {
        *slot = Some(register(registered.into_inner())?);
    }
    Ok(())
}

/// Whether the descriptor reports a hang-up now (no host at the other end).
fn hung_up(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::OUT)];
    // A zero timeout: the state as it is, without waiting.
    let polled = rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default()));
    polled.is_ok_and(|_| fds[0].revents().contains(PollFlags::HUP))
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "descriptor lost to a failed registration",
    )
}

impl AsyncRead for &FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = lock(&self.inner);
        loop {
            let registered = inner.fd.as_ref().ok_or_else(gone)?;
            let mut guard = ready!(registered.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref().as_fd(), &mut *unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing to read although the last hang-up said "ready": the other end is
                // back (a hung-up port reads end-of-file, not would-block).
                Err(_would_block) if closed => register_again(&mut inner.fd)?,
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for &FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = lock(&self.inner);
        loop {
            let registered = inner.fd.as_ref().ok_or_else(gone)?;
            let mut guard = ready!(registered.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref().as_fd(), data)?)) {
                Ok(res) => return Poll::Ready(res),
                // A port with no host takes no bytes (would-block) and reports a hang-up:
                // wait for the host to connect (or a pending signal of an earlier change).
                Err(_would_block) if closed && hung_up(registered.get_ref()) => {
                    let Some(signal) = inner.host_change.as_mut() else {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "the other end hung up",
                        )));
                    };
                    // tokio's signal streams never end: only "a signal came" matters.
                    let _signalled = ready!(signal.poll_recv(cx));
                }
                Err(_would_block) if closed => register_again(&mut inner.fd)?,
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::CString, time::Duration};

    use rustix::fs::{Mode, OFlags};
    use tokio::io::AsyncReadExt;

    use super::*;

    fn open(path: &std::path::Path, flags: OFlags) -> OwnedFd {
        rustix::fs::open(
            path,
            flags | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open the fifo")
    }

    /// A FIFO behaves like a virtio-serial port: its reader sees a hang-up and end-of-file
    /// once the writer has gone, and would-block once a writer is back. A read then must
    /// wait to be woken by data, not be woken again at once, over and over (the runtime's
    /// cooperative budget turns a stale readiness into a busy loop of polls).
    #[tokio::test(flavor = "current_thread")]
    async fn waits_after_the_other_end_hung_up_and_came_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("port");
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a valid NUL-terminated path; nothing is kept.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let stream = FdStream::new(open(&path, OFlags::RDONLY)).expect("register");
        let mut port = &stream;
        let mut buf = [0u8; 16];
        // The writer comes and goes: end-of-file, with the hang-up seen.
        drop(open(&path, OFlags::WRONLY));
        assert_eq!(port.read(&mut buf).await.expect("read"), 0, "end-of-file");
        // A writer is back and sends nothing yet: the read waits.
        let writer = open(&path, OFlags::WRONLY);
        let mut polls = 0u32;
        let mut unfilled = ReadBuf::new(&mut buf);
        let read = std::future::poll_fn(|cx| {
            polls += 1;
            Pin::new(&mut port).poll_read(cx, &mut unfilled)
        });
        let waited = tokio::time::timeout(Duration::from_millis(100), read).await;
        assert!(waited.is_err(), "a read returned with nothing written");
        assert!(
            polls <= 2,
            "polled {polls} times with nothing to read: the read spins"
        );
        rustix::io::write(&writer, b"{}").expect("write");
        let n = port.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"{}");
    }
}
