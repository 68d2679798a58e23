//! Security as one tower layer, used by all three servers (gRPC, JSON-RPC over HTTP and
//! WebSocket, metrics): every request is checked against the `Host`/`Origin` policy
//! (HTTP servers), its caller authenticated from the connection's [`Peer`] and the
//! `authorization` header, and the [`Caller`] put in the request's extensions for the
//! handlers; a refused request is answered here, in the server's own form (HTTP 403/401,
//! gRPC UNAUTHENTICATED), counted and, where configured, audited. Authorization (grants)
//! is the service's ([`crate::service`]), since it depends on the VM.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::Full;

use crate::{
    metrics::Metrics,
    net::Server,
    net::http_policy::HttpPolicy,
    net::transport::Peer,
    policy::auth::Auth,
    policy::{Caller, audit::Audit},
};

/// The answers a server gives to refused requests, in its own response type.
pub trait Refusal {
    /// The request broke the `Host`/`Origin` policy (`why`).
    fn forbidden(why: &'static str) -> Self;
    /// The caller proved no identity.
    fn unauthenticated() -> Self;
}

/// Plain HTTP answers (the metrics endpoint).
impl Refusal for http::Response<Full<Bytes>> {
    fn forbidden(why: &'static str) -> Self {
        text(http::StatusCode::FORBIDDEN, why).map(Full::new)
    }

    fn unauthenticated() -> Self {
        text(http::StatusCode::UNAUTHORIZED, "unauthenticated\n").map(Full::new)
    }
}

/// JSON-RPC's HTTP answers.
impl Refusal for http::Response<jsonrpsee::server::HttpBody> {
    fn forbidden(why: &'static str) -> Self {
        text(http::StatusCode::FORBIDDEN, why)
            .map(|b| jsonrpsee::server::HttpBody::from(b.to_vec()))
    }

    fn unauthenticated() -> Self {
        text(http::StatusCode::UNAUTHORIZED, "unauthenticated\n")
            .map(|b| jsonrpsee::server::HttpBody::from(b.to_vec()))
    }
}

/// gRPC's answers: a status in a trailers-only response.
impl Refusal for http::Response<tonic::body::Body> {
    fn forbidden(why: &'static str) -> Self {
        tonic::Status::permission_denied(why).into_http()
    }

    fn unauthenticated() -> Self {
        tonic::Status::unauthenticated("unauthenticated").into_http()
    }
}

/// A `text/plain` response; 401s name the Bearer scheme.
fn text(status: http::StatusCode, body: &'static str) -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::from_static(body.as_bytes()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    if status == http::StatusCode::UNAUTHORIZED {
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// The layer. See the module docs.
#[derive(Debug, Clone)]
pub struct Gatekeeper {
    /// The server callers are audited under and refusals are counted for.
    server: Server,
    /// The `Host`/`Origin` policy of an HTTP server.
    policy: Option<Arc<HttpPolicy>>,
    auth: Arc<Auth>,
    /// Where refusals are audited; `None`: not audited (metrics scrapes).
    audit: Option<Arc<Audit>>,
    metrics: Arc<Metrics>,
    /// Path prefixes served to anyone (gRPC health and reflection).
    public: &'static [&'static str],
}

impl Gatekeeper {
    /// A gatekeeper for `server`, authenticating with `auth`, counting in `metrics`.
    pub fn new(server: Server, auth: Arc<Auth>, metrics: Arc<Metrics>) -> Self {
        Self {
            server,
            policy: None,
            auth,
            audit: None,
            metrics,
            public: &[],
        }
    }

    /// Checks `Host` and `Origin` with `policy` first.
    pub fn with_policy(mut self, policy: HttpPolicy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// Audits refusals to `audit`.
    pub fn audited(mut self, audit: Arc<Audit>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Serves paths starting with any of `prefixes` without authentication.
    pub fn public(mut self, prefixes: &'static [&'static str]) -> Self {
        self.public = prefixes;
        self
    }

    /// The caller of `req` from `peer`, or why it is refused (and the refusal recorded).
    fn admit<B>(&self, req: &http::Request<B>, peer: &Peer) -> Result<Caller, Refused> {
        let mut caller = Caller {
            transport: self.server.name(),
            peer: peer.describe(),
            identity: None,
        };
        if let Some(policy) = &self.policy
            && let Err(why) = policy.check(req.headers())
        {
            self.metrics.refused(self.server.name(), "host_or_origin");
            self.deny(&caller, why);
            tracing::debug!(why, "HTTP request refused");
            return Err(Refused::Forbidden(why));
        }
        if self.public.iter().any(|p| req.uri().path().starts_with(p)) {
            return Ok(caller);
        }
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.auth.authenticate(peer, authorization) {
            Ok(identity) => {
                caller.identity = Some(identity);
                Ok(caller)
            }
            Err(e) => {
                self.metrics.refused(self.server.name(), "unauthenticated");
                // The reason goes to the audit trail; the caller learns nothing more.
                self.deny(&caller, &e.to_string());
                Err(Refused::Unauthenticated)
            }
        }
    }

    fn deny(&self, caller: &Caller, why: &str) {
        if let Some(audit) = &self.audit {
            audit.denied(caller, why);
        }
    }
}

/// Why a request was refused.
enum Refused {
    Forbidden(&'static str),
    Unauthenticated,
}

impl<S> tower::Layer<S> for Gatekeeper {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

/// A service behind the [`Gatekeeper`].
#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gatekeeper,
}

impl<S, B, R> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    http::Response<R>: Refusal + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
        match self.gate.admit(&req, &peer) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(refused) => {
                let response = match refused {
                    Refused::Forbidden(why) => Refusal::forbidden(why),
                    Refused::Unauthenticated => Refusal::unauthenticated(),
                };
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}
