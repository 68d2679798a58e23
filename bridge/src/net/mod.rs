//! Connections before they become calls: the one tower layer every server passes
//! ([`gatekeeper`]: Host/Origin, authentication into a `Caller`, refusals counted and
//! audited), connection caps, TLS handshakes, header-read timeouts and the request body
//! budget ([`transport`], [`tls`], [`http`]: an HTTP/1 server's connections), and the `Host`/`Origin` policy ([`http_policy`]).

pub mod gatekeeper;
pub mod http;
pub mod http_policy;
pub mod tls;
pub mod transport;
