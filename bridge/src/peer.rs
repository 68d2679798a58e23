//! Who is at the other end of a connection, as far as the socket and the TLS session
//! tell: what authentication, the audit trail and the logs go by.

use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;

/// What the servers know of a connection's peer; gRPC requests carry it in their
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The peer's address (TCP).
    pub addr: Option<SocketAddr>,
    /// The peer's credentials (unix socket).
    pub unix: Option<UnixPeer>,
    /// The client certificate it presented (mutual TLS).
    pub certificate: Option<CertificateDer<'static>>,
}

/// A unix-socket peer's credentials (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, if known.
    pub pid: Option<i32>,
}

impl Peer {
    /// How logs and the audit trail name the peer: `IP:PORT` or `uid=U,gid=G,pid=P`.
    pub fn describe(&self) -> Option<String> {
        match (self.addr, self.unix) {
            (Some(addr), _) => Some(addr.to_string()),
            (None, Some(u)) => Some(match u.pid {
                Some(pid) => format!("uid={},gid={},pid={pid}", u.uid, u.gid),
                None => format!("uid={},gid={}", u.uid, u.gid),
            }),
            (None, None) => None,
        }
    }
}
