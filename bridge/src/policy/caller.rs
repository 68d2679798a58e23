//! [`Caller`]: who a call is from, as the gatekeeper authenticated it.

use crate::policy::auth::Identity;

/// Who made a call: the front end, the peer's address and, once authenticated, the
/// identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The server the call came through: `grpc`, `jsonrpc` or `metrics`
    /// (`net::Server::name`).
    pub transport: &'static str,
    /// The peer: `IP:PORT`, or `uid=U,gid=G,pid=P` on a unix socket.
    pub peer: Option<String>,
    /// Who it proved to be; `None` before (or without) authentication.
    pub identity: Option<Identity>,
}
