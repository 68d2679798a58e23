//! The metrics endpoint: `GET /metrics` over HTTP/1 (in TLS when configured), behind
//! the same connection cap, `Host`/`Origin` policy and authentication as the API.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use tokio::sync::watch;
use tower::Service as _;

use crate::{
    metrics::Metrics,
    net::Server,
    net::gatekeeper::Gatekeeper,
    net::tls::{Alpn, Tls},
    net::transport::{self, Gate},
};

/// Serves `/metrics` on the connections `gate` admits until `shutdown` turns true, each
/// request through `keeper` (scrapers are callers like any other: local ones without
/// `[auth]`, an identity, no grant needed, with it). Header reads are bounded by
/// `header_read_timeout`.
pub async fn serve(
    gate: Gate,
    metrics: Arc<Metrics>,
    header_read_timeout: Duration,
    keeper: Gatekeeper,
    tls: Option<Arc<Tls>>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let socket = tokio::select! {
            c = gate.accept() => c,
            () = transport::stopped(shutdown.clone()) => return,
        };
        let (metrics, keeper, tls) = (metrics.clone(), keeper.clone(), tls.clone());
        let stop = transport::stopped(shutdown.clone());
        tokio::spawn(async move {
            let tls = tls.as_deref();
            let conn = match transport::secure(socket, tls, Alpn::Http1, header_read_timeout).await
            {
                Ok(conn) => conn,
                Err(_) => {
                    metrics.refused(Server::Metrics.name(), "tls_handshake");
                    return;
                }
            };
            let peer = conn.peer();
            let endpoint = tower::service_fn(move |req: Request<Incoming>| {
                std::future::ready(Ok::<_, Infallible>(respond(&metrics, &req)))
            });
            let gated = tower::Layer::layer(&keeper, endpoint);
            let svc = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                gated.clone().call(req)
            });
            transport::serve_http1(conn, svc, header_read_timeout, stop).await;
        });
    }
}

/// The answer to an admitted request: the metrics at `/metrics`, 404 elsewhere.
fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut response = if req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        r
    } else {
        Response::new(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
    };
    if req.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}

/// The address a metrics listener is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
