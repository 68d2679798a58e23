//! The connections of an HTTP/1 server (JSON-RPC over HTTP and WebSocket): a TLS
//! handshake within the header-read timeout, a per-connection call limit handed to the
//! handlers, the bridge-wide body budget, and the gatekeeper in front of every request.
//! The front end only supplies the request handler.

use std::{future::Future, sync::Arc, time::Duration};

use hyper::{body::Incoming, service::service_fn};
use jsonrpsee::server::HttpResponse;
use tokio::sync::Semaphore;
use tower::Service as _;

use crate::{
    metrics::Metrics,
    net::{
        Server,
        gatekeeper::Gatekeeper,
        tls::{Alpn, Tls},
        transport::{self, BodyBudget},
    },
};

/// The calls in flight on one connection (`limits.max_connection_calls`), carried in its
/// requests' extensions.
#[derive(Debug, Clone)]
pub struct ConnectionCalls(pub Arc<Semaphore>);

/// What every connection of an HTTP/1 server (JSON-RPC over HTTP and WebSocket) is served
/// with.
#[derive(Debug, Clone)]
pub struct Http1Connections {
    /// The server, as refusals are counted.
    pub server: Server,
    /// Bytes of large request bodies read at once, bridge-wide.
    pub budget: Arc<BodyBudget>,
    /// Time a client has to send a whole request header.
    pub header_timeout: Duration,
    /// Calls in flight per connection ([`ConnectionCalls`]).
    pub max_calls: usize,
    /// TLS, when configured.
    pub tls: Option<Arc<Tls>>,
    /// Every request passes it.
    pub keeper: Gatekeeper,
    /// Where refusals are counted.
    pub metrics: Arc<Metrics>,
}

impl Http1Connections {
    /// Serves one admitted connection with `rpc` until it closes or `stopped` fires: the
    /// TLS handshake, then every request through the gatekeeper, with the connection's
    /// [`Peer`](crate::net::transport::Peer) and [`ConnectionCalls`] in its extensions,
    /// its body within the budget.
    pub async fn serve<R>(
        self,
        socket: transport::Admitted,
        rpc: R,
        stopped: impl Future<Output = ()>,
    ) where
        R: tower::Service<
                hyper::Request<Incoming>,
                Response = HttpResponse,
                Error = Box<dyn std::error::Error + Send + Sync>,
            > + Clone
            + Send
            + 'static,
        R::Future: Send + 'static,
    {
        let tls = self.tls.as_deref();
        let conn = match transport::secure(socket, tls, Alpn::Http1, self.header_timeout).await {
            Ok(conn) => conn,
            Err(e) => {
                self.metrics.refused(self.server.name(), "tls_handshake");
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
        };
        let calls = ConnectionCalls(Arc::new(Semaphore::new(self.max_calls)));
        let peer = conn.peer();
        let budget = self.budget.clone();
        let budgeted = tower::service_fn(move |req: hyper::Request<Incoming>| {
            let (budget, mut rpc) = (budget.clone(), rpc.clone());
            async move {
                let declared = req
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let _bytes = budget.admit(declared).await;
                rpc.call(req).await.map_err(std::io::Error::other)
            }
        });
        let gated = tower::Layer::layer(&self.keeper, budgeted);
        let svc = service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req.extensions_mut().insert(calls.clone());
            gated.clone().call(req)
        });
        transport::serve_http1(conn, svc, self.header_timeout, stopped).await;
    }
}
