//! Prometheus metrics, and the small HTTP endpoint that serves them (`GET /metrics`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    vm: String,
    method: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 2.0, 22,
    ))
}

/// The bridge's metrics. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    connected: Family<VmLabels, Gauge>,
    resyncs: Family<VmLabels, Counter>,
    stale: Family<VmLabels, Counter>,
    coalesced: Family<VmLabels, Counter>,
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("qga_bridge");
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let connected = Family::<VmLabels, Gauge>::default();
        let resyncs = Family::<VmLabels, Counter>::default();
        let stale = Family::<VmLabels, Counter>::default();
        let coalesced = Family::<VmLabels, Counter>::default();
        registry.register("calls", "Calls by VM, method and outcome", calls.clone());
        registry.register(
            "call_duration_seconds",
            "Call latency by method",
            latency.clone(),
        );
        registry.register(
            "agent_connected",
            "1 while the bridge holds a resynchronised channel to the VM's agent",
            connected.clone(),
        );
        registry.register("resyncs", "Resync handshakes completed", resyncs.clone());
        registry.register(
            "stale_replies",
            "Replies and bytes discarded because no waiting call asked for them",
            stale.clone(),
        );
        registry.register(
            "coalesced_calls",
            "Calls served by another caller's identical in-flight read",
            coalesced.clone(),
        );
        Arc::new(Self {
            registry,
            calls,
            latency,
            connected,
            resyncs,
            stale,
            coalesced,
        })
    }

    /// Records a finished call.
    pub fn call(&self, vm: &str, method: &str, outcome: &str, elapsed: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                vm: vm.to_string(),
                method: method.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn vm(vm: &str) -> VmLabels {
        VmLabels { vm: vm.to_string() }
    }

    /// Whether the VM's channel is up.
    pub fn set_connected(&self, vm: &str, up: bool) {
        self.connected
            .get_or_create(&Self::vm(vm))
            .set(i64::from(up));
    }

    /// A completed resync.
    pub fn resync(&self, vm: &str) {
        self.resyncs.get_or_create(&Self::vm(vm)).inc();
    }

    /// A discarded stale reply or garbage.
    pub fn stale(&self, vm: &str) {
        self.stale.get_or_create(&Self::vm(vm)).inc();
    }

    /// A call served by coalescing.
    pub fn coalesced(&self, vm: &str) {
        self.coalesced.get_or_create(&Self::vm(vm)).inc();
    }

    /// Coalesced calls so far for `vm` (tests and benchmarks read it).
    pub fn coalesced_count(&self, vm: &str) -> u64 {
        self.coalesced.get_or_create(&Self::vm(vm)).get()
    }

    /// Drops the per-VM series of a VM that went away.
    pub fn forget_vm(&self, vm: &str) {
        let l = Self::vm(vm);
        self.connected.remove(&l);
        self.resyncs.remove(&l);
        self.stale.remove(&l);
        self.coalesced.remove(&l);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move {
                    if req.uri().path() == "/metrics" {
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
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The address a metrics listener is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
