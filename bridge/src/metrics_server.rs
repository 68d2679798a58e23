//! The metrics endpoint: `GET /metrics` over HTTP/1 (in TLS when configured), behind
//! the same connection cap, `Host`/`Origin` policy and authentication as the API.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::{
    auth::Auth,
    http_policy::HttpPolicy,
    metrics::Metrics,
    tls::{Alpn, Tls},
    transport::{self, Gate},
};

/// Serves `/metrics` on the connections `gate` admits until `shutdown` turns true.
/// Header reads are bounded by `header_read_timeout`.
pub async fn serve(
    gate: Gate,
    metrics: Arc<Metrics>,
    header_read_timeout: Duration,
    policy: HttpPolicy,
    tls: Option<Arc<Tls>>,
    auth: Arc<Auth>,
    shutdown: watch::Receiver<bool>,
) {
    let policy = Arc::new(policy);
    loop {
        let conn = tokio::select! {
            c = gate.accept() => c,
            () = transport::stopped(shutdown.clone()) => return,
        };
        let metrics = metrics.clone();
        let policy = policy.clone();
        let tls = tls.clone();
        let auth = auth.clone();
        let stop = transport::stopped(shutdown.clone());
        tokio::spawn(async move {
            let conn =
                match transport::secure(conn, tls.as_deref(), Alpn::Http1, header_read_timeout)
                    .await
                {
                    Ok(conn) => conn,
                    Err(_) => {
                        metrics.refused("metrics", "tls_handshake");
                        return;
                    }
                };
            let peer = conn.peer();
            let svc = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let verdict = policy.check(req.headers());
                // Scrapers are callers like any other: local ones without [auth], an
                // identity (no grant needed) with it.
                let authorization = req.headers().get(hyper::header::AUTHORIZATION);
                let known = auth
                    .authenticate(&peer, authorization.map(|v| v.as_bytes()))
                    .is_ok();
                async move {
                    if let Err(why) = verdict {
                        metrics.refused("metrics", "host_or_origin");
                        Response::builder()
                            .status(StatusCode::FORBIDDEN)
                            .header("content-type", "text/plain")
                            .body(Full::new(Bytes::from_static(why.as_bytes())))
                    } else if !known {
                        metrics.refused("metrics", "unauthenticated");
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header("www-authenticate", "Bearer")
                            .body(Full::new(Bytes::from_static(b"unauthenticated\n")))
                    } else if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.encode())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                    }
                }
            });
            let conn =
                transport::http1(header_read_timeout).serve_connection(TokioIo::new(conn), svc);
            tokio::pin!(conn, stop);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// The address a metrics listener is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
