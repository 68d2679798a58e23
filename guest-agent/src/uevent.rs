//! News of memory blocks appearing: the kernel's uevents on a `NETLINK_KOBJECT_UEVENT`
//! socket, or, where that socket cannot be opened, a short sleep that makes the caller
//! look again.
//!
//! The kernel announces each memory block it adds with a datagram
//! `add@/devices/system/memory/memoryN\0ACTION=add\0DEVPATH=...\0SUBSYSTEM=memory\0...`
//! after the block's sysfs files exist, so a block named in an `add` event can be onlined
//! at once. Events can be lost (the socket's buffer overflows: `ENOBUFS`); then the caller
//! is told to rescan.

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    io::Errno,
    net::{
        AddressFamily, RecvFlags, SocketFlags, SocketType, bind,
        netlink::{self, SocketAddrNetlink},
        recvfrom, socket_with, sockopt,
    },
};

use crate::sysfs::parse_block_name;

/// The kernel's uevent multicast group (udev's own re-broadcasts use group 2).
const KERNEL_GROUP: u32 = 1;

/// Receive buffer asked for: a DIMM of many blocks sends a burst of events.
const RECV_BUFFER: usize = 1 << 20;

/// Largest uevent datagram the kernel sends (`UEVENT_BUFFER_SIZE`).
const MAX_UEVENT: usize = 2048;

/// How often the fallback looks again when there is no uevent socket.
const POLL_PAUSE: Duration = Duration::from_millis(10);

/// What waiting brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// These blocks were added (in the order announced; may be empty when only other
    /// devices' events came).
    Added(Vec<u64>),
    /// Events may have been missed: look at the tree again.
    Rescan,
    /// The time is up.
    TimedOut,
}

/// Where news of added memory blocks comes from.
pub trait BlockEvents {
    /// Waits until something happens or `until` passes.
    fn wait(&mut self, until: Instant) -> News;
}

/// The block index of a kernel uevent announcing a memory block's `add`, if `msg` is one.
///
/// Checks the summary line (`add@DEVPATH`) and the `ACTION`, `SUBSYSTEM` and `DEVPATH`
/// keys: anything else — other actions, other subsystems, udev's own messages (which start
/// with `libudev`) — is `None`.
pub fn memory_block_added(msg: &[u8]) -> Option<u64> {
    let mut fields = msg.split(|&b| b == 0);
    let summary = fields.next()?;
    let at = summary.iter().position(|&b| b == b'@')?;
    if &summary[..at] != b"add" {
        return None;
    }
    let path = &summary[at + 1..];
    let name = path.strip_prefix(b"/devices/system/memory/")?;
    let index = parse_block_name(name)?;
    let (mut action, mut subsystem, mut devpath) = (false, false, false);
    for field in fields {
        match field {
            b"ACTION=add" => action = true,
            b"SUBSYSTEM=memory" => subsystem = true,
            f if f.strip_prefix(b"DEVPATH=") == Some(path) => devpath = true,
            _ => {}
        }
    }
    (action && subsystem && devpath).then_some(index)
}

/// The kernel's uevent socket, subscribed to the kernel's group.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl UeventSocket {
    /// Opens and subscribes. Events sent before this returns are not seen: rescan after.
    pub fn open() -> Result<Self, Errno> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        // Best effort: the default buffer holds a few hundred events.
        let _ = sockopt::set_socket_recv_buffer_size(&fd, RECV_BUFFER);
        bind(&fd, &SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        Ok(Self {
            fd,
            buf: vec![0; MAX_UEVENT],
        })
    }

    /// Every datagram queued now; `Err(Rescan)` if some were lost.
    fn drain(&mut self, added: &mut Vec<u64>) -> Result<(), News> {
        loop {
            match recvfrom(&self.fd, &mut self.buf[..], RecvFlags::DONTWAIT) {
                Ok((_, len, from)) => {
                    // Only the kernel (port 0) speaks for devices; a datagram cut short
                    // (`len` over the buffer) is not a whole event.
                    let kernel = from
                        .and_then(|a| SocketAddrNetlink::try_from(a).ok())
                        .is_some_and(|a| a.pid() == 0);
                    if kernel
                        && len <= self.buf.len()
                        && let Some(i) = memory_block_added(&self.buf[..len])
                    {
                        added.push(i);
                    }
                }
                Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => {}
                // ENOBUFS: the kernel dropped events. Anything else: this socket is of
                // no more use, and looking at the tree is always right.
                Err(_) => return Err(News::Rescan),
            }
        }
    }
}

impl BlockEvents for UeventSocket {
    fn wait(&mut self, until: Instant) -> News {
        let mut added = Vec::new();
        loop {
            if let Err(news) = self.drain(&mut added) {
                return news;
            }
            if !added.is_empty() {
                return News::Added(added);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return News::TimedOut;
            }
            let timeout = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(_) => return News::Rescan,
            }
        }
    }
}

/// Without a uevent socket: a short pause, then a rescan.
#[derive(Debug, Default)]
pub struct Polling;

impl BlockEvents for Polling {
    fn wait(&mut self, until: Instant) -> News {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return News::TimedOut;
        }
        std::thread::sleep(left.min(POLL_PAUSE));
        News::Rescan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(fields: &[&str]) -> Vec<u8> {
        let mut msg = Vec::new();
        for f in fields {
            msg.extend_from_slice(f.as_bytes());
            msg.push(0);
        }
        msg
    }

    #[test]
    fn memory_add_events_name_their_block() {
        let add = event(&[
            "add@/devices/system/memory/memory42",
            "ACTION=add",
            "DEVPATH=/devices/system/memory/memory42",
            "SUBSYSTEM=memory",
            "SEQNUM=2231",
        ]);
        assert_eq!(memory_block_added(&add), Some(42));
        for other in [
            // Other actions on memory blocks.
            event(&[
                "online@/devices/system/memory/memory42",
                "ACTION=online",
                "DEVPATH=/devices/system/memory/memory42",
                "SUBSYSTEM=memory",
            ]),
            // Other devices.
            event(&[
                "add@/devices/pci0000:00/0000:00:05.0/virtio2",
                "ACTION=add",
                "DEVPATH=/devices/pci0000:00/0000:00:05.0/virtio2",
                "SUBSYSTEM=virtio",
            ]),
            // The summary and the keys disagree.
            event(&[
                "add@/devices/system/memory/memory42",
                "ACTION=add",
                "DEVPATH=/devices/system/memory/memory43",
                "SUBSYSTEM=memory",
            ]),
            event(&["add@/devices/system/memory/memory42", "ACTION=add"]),
            // Not a block directory's name; udev's re-broadcast; nothing.
            event(&[
                "add@/devices/system/memory/memoryX",
                "ACTION=add",
                "DEVPATH=/devices/system/memory/memoryX",
                "SUBSYSTEM=memory",
            ]),
            b"libudev\0\xfe\xed\xca\xfe".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(memory_block_added(&other), None, "{other:?}");
        }
    }

    #[test]
    fn polling_asks_for_rescans_until_the_time_is_up() {
        let mut p = Polling;
        let until = Instant::now() + Duration::from_millis(30);
        assert_eq!(p.wait(until), News::Rescan);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(p.wait(until), News::TimedOut);
    }
}
