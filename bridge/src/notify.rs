//! systemd's readiness protocol (`sd_notify(3)`), so `Type=notify` units know when the
//! bridge serves, reloads and stops.
//!
//! One datagram per state change, `KEY=VALUE` lines, sent to the unix datagram socket
//! named by `$NOTIFY_SOCKET`: a path, or an abstract-namespace name written `@name`.
//! Without the variable (not started by systemd) every call does nothing. Failures are
//! logged and otherwise ignored: a lost notification must not stop a serving bridge.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

/// Where notifications go: the socket of `$NOTIFY_SOCKET`, or nowhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. Unset or empty: a notifier that sends nothing. Unusable
    /// (relative path, socket cannot be created): logged, and a notifier that sends
    /// nothing — systemd then times the start out, which names the problem in its log.
    pub fn from_env() -> Self {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET").filter(|n| !n.is_empty()) else {
            return Self { target: None };
        };
        let target =
            address(name.as_encoded_bytes()).and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match target {
            Ok(target) => Self {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!(socket = ?name, error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                Self { target: None }
            }
        }
    }

    /// Sends one state change, `KEY=VALUE` lines (e.g. `"READY=1\nSTATUS=serving"`).
    pub fn send(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::warn!(error = %e, state, "cannot notify systemd");
        }
    }

    /// Serving: `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Reloading (SIGHUP): `RELOADING=1` and the `MONOTONIC_USEC` timestamp that systemd
    /// 253's `Type=notify-reload` requires (older systemd ignores it); [`Self::ready`]
    /// when done.
    pub fn reloading(&self) {
        match monotonic_usec() {
            Some(usec) => self.send(&format!(
                "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
            )),
            None => self.send("RELOADING=1\nSTATUS=reloading"),
        }
    }

    /// Shutting down: `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }
}

/// `$NOTIFY_SOCKET` as a socket address: `@name` is abstract, anything else an absolute
/// path.
fn address(name: &[u8]) -> io::Result<SocketAddr> {
    match name {
        [b'@', abstract_name @ ..] => SocketAddr::from_abstract_name(abstract_name),
        [b'/', ..] => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(name))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor an @abstract name",
        )),
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> Option<u128> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u128::try_from(t.tv_sec).ok()?;
    let nanos = u128::try_from(t.tv_nsec).ok()?;
    Some(secs * 1_000_000 + nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let abs = address(b"@qga/notify").expect("abstract");
        assert_eq!(abs.as_abstract_name(), Some(&b"qga/notify"[..]));
        let path = address(b"/run/systemd/notify").expect("path");
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(address(b"relative").is_err());
    }

    #[test]
    fn abstract_socket_receives_the_state() {
        let name = format!("qga-bridge-notify-unit-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind");
        let n = Notifier {
            target: Some((UnixDatagram::unbound().expect("socket"), addr)),
        };
        n.reloading();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).expect("recv");
        let text = std::str::from_utf8(&buf[..len]).expect("utf-8");
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }

    #[test]
    fn unset_sends_nothing() {
        Notifier { target: None }.ready("x");
    }
}
