//! Connections before they become calls: the one tower layer every server passes
//! ([`gatekeeper`]: Host/Origin, authentication into a `Caller`, refusals counted and
//! audited), connection caps, TLS handshakes, header-read timeouts and the request body
//! budget ([`transport`], [`tls`], [`http`]: an HTTP/1 server's connections), and the `Host`/`Origin` policy ([`http_policy`]).

pub mod gatekeeper;
pub mod http;
pub mod http_policy;
pub mod tls;
pub mod transport;

/// The bridge's servers: what their callers are audited under (`Caller::transport`) and
/// their refusals counted for (`qga_bridge_refused_total{server}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// gRPC: our services, health and reflection.
    Grpc,
    /// JSON-RPC over HTTP and WebSocket.
    Jsonrpc,
    /// The Prometheus metrics endpoint.
    Metrics,
}

impl Server {
    /// The server's name, as labels and audit records spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Jsonrpc => "jsonrpc",
            Self::Metrics => "metrics",
        }
    }

    /// Whether refused callers go to the audit trail. The API servers' do: their callers
    /// change memory. A refused metrics scrape is only counted, so that a misconfigured
    /// scraper cannot flood the trail.
    pub const fn audits_refusals(self) -> bool {
        !matches!(self, Self::Metrics)
    }
}
