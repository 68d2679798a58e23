//! JSON-RPC 2.0 over HTTP and WebSocket (one port), with the QGA command names as methods.
//!
//! Params are by name: `{"vm": NAME, "timeout-ms"?: N, ...QGA's own arguments}`; the
//! result is the agent's `return` value decoded into its schema type (members the schema
//! does not name are dropped). `timeout-ms` bounds the call like gRPC's `grpc-timeout`;
//! the command's configured timeout is the default and the upper bound. `vm-list` lists
//! the VMs. `memory-layout`, `memory-plug`, `memory-unplug` and `memory-resize` are the
//! memory hotplug service (see [`crate::hotplug`]); `memory-stats` is the guest's memory
//! signals (see [`crate::signals`]).

use std::{sync::Arc, time::Duration};

use jsonrpsee::{
    Extensions, Methods, RpcModule,
    server::{BatchRequestConfig, PingConfig, Server as RpcServer, ServerConfig, stop_channel},
    types::{ErrorObjectOwned, Params},
};
use qga_wire::schema::GuestMemoryOnlineType;
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};
use tokio::{sync::watch, time::Instant};

use crate::{
    api::status::code,
    call::{self, Call, MEMORY_STATS_METHOD, ObjectOnly, Reply, hotplug_method},
    config::{Config, LimitsConfig},
    error::BridgeError,
    hotplug::{Operation, plug::PlugArgs},
    metrics::Metrics,
    net::Server,
    net::http::{ConnectionCalls, Http1Connections},
    net::http_policy::HttpPolicy,
    net::tls::Tls,
    net::transport::{self, BodyBudget, Gate},
    policy::Caller,
    service::Service,
};

/// The longest `timeout-ms` a caller may ask for: one day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

fn invalid(e: impl std::fmt::Display) -> ErrorObjectOwned {
    BridgeError::InvalidRequest(e.to_string()).into()
}

/// A method's params, decoded straight from the request text: no JSON tree is built,
/// `mem-blks` stays text until [`Call::from_qga`] decodes it entry by entry, and a
/// member named twice or not known is refused. A member given as `null` counts as given
/// (and is then refused as the wrong type, or as an argument the method does not take),
/// never as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Envelope<'a> {
    vm: String,
    #[serde(default, deserialize_with = "given")]
    timeout_ms: Option<u64>,
    #[serde(default, borrow, deserialize_with = "given")]
    mem_blks: Option<&'a RawValue>,
}

/// A member that is present: its value as `T`, `null` included (which most `T` refuse).
fn given<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A JSON-RPC call decoded: the VM, the caller's deadline and the agent call.
#[derive(Debug)]
pub struct Decoded {
    /// The VM.
    pub vm: String,
    /// The caller's `timeout-ms`, from now.
    pub timeout: Option<Duration>,
    /// What to ask the agent.
    pub call: Call,
}

/// Params of the hotplug methods: every member any of them takes; each method checks
/// that it got what it needs and nothing it does not. As in [`Envelope`], a member given
/// as `null` counts as given (and is refused), never as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HotplugParams {
    vm: String,
    #[serde(default, deserialize_with = "given")]
    timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "given")]
    size: Option<u64>,
    #[serde(default, deserialize_with = "given")]
    node: Option<u32>,
    #[serde(default, deserialize_with = "given")]
    online_type: Option<GuestMemoryOnlineType>,
    #[serde(default, deserialize_with = "given")]
    dimm: Option<String>,
    #[serde(default, deserialize_with = "given")]
    target: Option<u64>,
    #[serde(default, deserialize_with = "given")]
    request_id: Option<String>,
}

/// A decoded hotplug call: `None` as the operation is `memory-layout`.
#[derive(Debug)]
pub struct HotplugCall {
    /// The VM.
    pub vm: String,
    /// The caller's `timeout-ms`.
    pub timeout: Option<Duration>,
    /// The operation; `None` for `memory-layout`.
    pub op: Option<Operation>,
    /// The caller's `request-id`.
    pub request_id: Option<String>,
}

fn timeout(ms: Option<u64>) -> Result<Option<Duration>, BridgeError> {
    match ms {
        None => Ok(None),
        Some(ms @ 1..=MAX_TIMEOUT_MS) => Ok(Some(Duration::from_millis(ms))),
        Some(_) => Err(BridgeError::InvalidRequest(format!(
            "'timeout-ms' must be from 1 to {MAX_TIMEOUT_MS}"
        ))),
    }
}

/// Decodes the params of hotplug method `method`.
pub fn decode_hotplug(method: &str, params: &str) -> Result<HotplugCall, BridgeError> {
    let ObjectOnly(p) = serde_json::from_str::<ObjectOnly<HotplugParams>>(params)
        .map_err(|e| BridgeError::InvalidRequest(format!("params: {e}")))?;
    let unexpected = |present: bool, name: &str| {
        if present {
            Err(BridgeError::InvalidRequest(format!(
                "{method} takes no '{name}'"
            )))
        } else {
            Ok(())
        }
    };
    let needed = |name: &str| BridgeError::InvalidRequest(format!("{method} needs '{name}'"));
    let op = match method {
        hotplug_method::LAYOUT => {
            unexpected(p.size.is_some(), "size")?;
            unexpected(p.dimm.is_some(), "dimm")?;
            unexpected(p.request_id.is_some(), "request-id")?;
            None
        }
        hotplug_method::PLUG => {
            unexpected(p.dimm.is_some(), "dimm")?;
            Some(Operation::Plug(PlugArgs {
                size: p.size.ok_or_else(|| needed("size"))?,
                node: p.node,
                online_type: p.online_type,
            }))
        }
        hotplug_method::UNPLUG => {
            unexpected(p.size.is_some(), "size")?;
            Some(Operation::Unplug {
                dimm: p
                    .dimm
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| needed("dimm"))?,
            })
        }
        hotplug_method::RESIZE => {
            unexpected(p.dimm.is_some(), "dimm")?;
            Some(Operation::Resize {
                size: p.size.ok_or_else(|| needed("size"))?,
            })
        }
        hotplug_method::BALLOON => {
            unexpected(p.dimm.is_some(), "dimm")?;
            unexpected(p.size.is_some(), "size")?;
            Some(Operation::Balloon {
                target: p.target.ok_or_else(|| needed("target"))?,
            })
        }
        other => {
            return Err(BridgeError::InvalidRequest(format!(
                "unknown method '{other}'"
            )));
        }
    };
    if !matches!(op, Some(Operation::Balloon { .. })) {
        unexpected(p.target.is_some(), "target")?;
    }
    if !matches!(op, Some(Operation::Plug(_))) {
        unexpected(p.node.is_some(), "node")?;
        unexpected(p.online_type.is_some(), "online-type")?;
    }
    Ok(HotplugCall {
        vm: p.vm,
        timeout: timeout(p.timeout_ms)?,
        op,
        request_id: p.request_id,
    })
}

/// Params of `memory-stats`: the VM and an optional `timeout-ms`, nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StatsParams {
    vm: String,
    #[serde(default, deserialize_with = "given")]
    timeout_ms: Option<u64>,
}

/// Decodes `memory-stats` params: the VM and the caller's `timeout-ms`.
pub fn decode_stats(params: &str) -> Result<(String, Option<Duration>), BridgeError> {
    let ObjectOnly(p) = serde_json::from_str::<ObjectOnly<StatsParams>>(params)
        .map_err(|e| BridgeError::InvalidRequest(format!("params: {e}")))?;
    Ok((p.vm, timeout(p.timeout_ms)?))
}

/// The caller the gatekeeper put in `extensions` (none: refused by the service).
fn caller_of(extensions: &Extensions) -> Caller {
    extensions.get::<Caller>().cloned().unwrap_or(Caller {
        transport: Server::Jsonrpc.name(),
        peer: None,
        identity: None,
    })
}

/// Runs `memory-stats`, within its connection's in-flight limit.
async fn run_stats(
    front: &Front,
    params: &Params<'_>,
    extensions: &Extensions,
) -> Result<Value, ErrorObjectOwned> {
    let _slot = front.connection_slot(extensions)?;
    let raw = match params.as_str() {
        Some(raw) if params.is_object() => raw,
        _ => return Err(invalid("params must be an object with at least \"vm\"")),
    };
    let (vm, timeout) = decode_stats(raw)?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let caller = caller_of(extensions);
    let stats = front.service.memory_stats(&caller, &vm, deadline).await?;
    serde_json::to_value(stats)
        .map_err(|e| ErrorObjectOwned::owned(code::BAD_REPLY, e.to_string(), None::<()>))
}

/// Runs hotplug method `name`, within its connection's in-flight limit.
async fn run_hotplug(
    front: &Front,
    name: &str,
    params: &Params<'_>,
    extensions: &Extensions,
) -> Result<Value, ErrorObjectOwned> {
    let service = &front.service;
    let _slot = front.connection_slot(extensions)?;
    let raw = match params.as_str() {
        Some(raw) if params.is_object() => raw,
        _ => return Err(invalid("params must be an object with at least \"vm\"")),
    };
    let decoded = decode_hotplug(name, raw)?;
    let deadline = decoded.timeout.map(|t| Instant::now() + t);
    let caller = caller_of(extensions);
    let value = match decoded.op {
        None => serde_json::to_value(
            service
                .memory_layout(&caller, &decoded.vm, deadline)
                .await?,
        ),
        Some(op) => serde_json::to_value(
            service
                .memory_hotplug(&caller, &decoded.vm, op, decoded.request_id, deadline)
                .await?,
        ),
    };
    value.map_err(|e| ErrorObjectOwned::owned(code::BAD_REPLY, e.to_string(), None::<()>))
}

/// Decodes QGA command `method`'s params (the JSON text of an object) with at most
/// `max_set_entries` block changes. Everything a caller can get wrong is an
/// `InvalidRequest`.
pub fn decode(method: &str, params: &str, max_set_entries: usize) -> Result<Decoded, BridgeError> {
    let ObjectOnly(envelope) = serde_json::from_str::<ObjectOnly<Envelope<'_>>>(params)
        .map_err(|e| BridgeError::InvalidRequest(format!("params: {e}")))?;
    let timeout = timeout(envelope.timeout_ms)?;
    let call = Call::from_qga(
        method,
        envelope.mem_blks.map(RawValue::get),
        max_set_entries,
    )?;
    Ok(Decoded {
        vm: envelope.vm,
        timeout,
        call,
    })
}

/// What the methods work with: the service, and what the front end itself counts and
/// bounds.
#[derive(Debug, Clone)]
pub struct Front {
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    /// Block changes one set may carry (`limits.max_set_entries`).
    max_set_entries: usize,
    /// Calls in flight per connection (`limits.jsonrpc_max_connection_calls`).
    max_connection_calls: usize,
}

impl Front {
    /// The methods' context: `service`, counting in `metrics`, bounded by `limits`.
    pub fn new(service: Arc<Service>, metrics: Arc<Metrics>, limits: &LimitsConfig) -> Self {
        Self {
            service,
            metrics,
            max_set_entries: limits.max_set_entries,
            max_connection_calls: limits.jsonrpc_max_connection_calls,
        }
    }

    /// A slot of the connection's in-flight limit, held while a call is served; over the
    /// limit the call is refused at once.
    fn connection_slot(
        &self,
        extensions: &Extensions,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, BridgeError> {
        let Some(ConnectionCalls(calls)) = extensions.get::<ConnectionCalls>() else {
            return Ok(None);
        };
        calls.clone().try_acquire_owned().map(Some).map_err(|_| {
            self.metrics
                .refused(Server::Jsonrpc.name(), "connection_calls");
            BridgeError::Overloaded(format!(
                "{} calls in flight on this connection (limits.jsonrpc_max_connection_calls)",
                self.max_connection_calls
            ))
        })
    }
}

/// Runs QGA command `name` as asked by `params`, within its connection's in-flight limit.
async fn run(
    front: &Front,
    name: &str,
    params: &Params<'_>,
    extensions: &Extensions,
) -> Result<Reply, ErrorObjectOwned> {
    let _slot = front.connection_slot(extensions)?;
    let raw = match params.as_str() {
        Some(raw) if params.is_object() => raw,
        _ => return Err(invalid("params must be an object with at least \"vm\"")),
    };
    let decoded = decode(name, raw, front.max_set_entries)?;
    let deadline = decoded.timeout.map(|t| Instant::now() + t);
    let caller = caller_of(extensions);
    Ok(front
        .service
        .call(&caller, &decoded.vm, decoded.call, deadline)
        .await?)
}

/// Serves JSON-RPC over HTTP/1 and WebSocket on the connections `gate` admits until
/// `shutdown` turns true, then lets running calls finish.
///
/// Each connection gets its own in-flight limit, a header-read timeout, and WebSocket
/// pings; each request passes the [`Gatekeeper`] (Host/Origin, authentication), and large
/// request bodies wait for the bridge-wide body budget before they are read.
pub async fn serve(
    gate: Gate,
    front: Front,
    config: &Config,
    tls: Option<Arc<Tls>>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = &config.limits;
    let builder = RpcServer::builder()
        .set_config(server_config(limits))
        .to_service_builder();
    let keeper = front
        .service
        .gatekeeper(Server::Jsonrpc)
        .with_policy(HttpPolicy::new(&config.http, gate.local_addr()));
    let metrics = front.metrics.clone();
    let methods: Methods = module(front).into();
    let conn = Http1Connections {
        server: Server::Jsonrpc,
        budget: BodyBudget::new(
            limits.jsonrpc_body_budget_bytes,
            limits.jsonrpc_max_request_bytes,
        ),
        header_timeout: Duration::from_millis(limits.header_read_timeout_ms),
        max_calls: limits.jsonrpc_max_connection_calls,
        tls,
        keeper,
        metrics,
    };
    let (stop_handle, server_handle) = stop_channel();
    loop {
        let socket = tokio::select! {
            c = gate.accept() => c,
            () = transport::stopped(shutdown.clone()) => break,
        };
        let rpc = builder.clone().build(methods.clone(), stop_handle.clone());
        let stopped = stop_handle.clone().shutdown();
        tokio::spawn(conn.clone().serve(socket, rpc, stopped));
    }
    // WebSocket connections close; HTTP connections finish their requests. `stopped`
    // waits for every stop handle, this one included.
    drop(stop_handle);
    let _ = server_handle.stop();
    server_handle.stopped().await;
}

/// jsonrpsee's settings from the bridge's limits.
fn server_config(limits: &LimitsConfig) -> ServerConfig {
    let keepalive = Duration::from_millis(limits.keepalive_interval_ms);
    let ping = PingConfig::new()
        .ping_interval(keepalive)
        .inactive_limit(keepalive + Duration::from_millis(limits.keepalive_timeout_ms))
        .max_failures(1);
    ServerConfig::builder()
        // Sockets are capped by the gate; this cap (jsonrpsee counts requests) never binds
        // before it.
        .max_connections(limits.jsonrpc_max_connections)
        .max_request_body_size(limits.jsonrpc_max_request_bytes)
        .max_response_body_size(
            u32::try_from(limits.max_reply_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        .set_batch_request_config(BatchRequestConfig::Limit(limits.jsonrpc_max_batch))
        .enable_ws_ping(ping)
        .build()
}

/// `t` in Unix seconds, as `vm-list` reports times.
fn unix_seconds(t: std::time::SystemTime) -> Option<f64> {
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// The method table over `front`.
pub fn module(front: Front) -> RpcModule<Front> {
    let mut m = RpcModule::new(front);
    for name in call::NAMES {
        m.register_async_method(name, move |params, reg, extensions| async move {
            run(&reg, name, &params, &extensions).await
        })
        .expect("method names are unique");
    }
    for name in hotplug_method::ALL {
        m.register_async_method(name, move |params, reg, extensions| async move {
            run_hotplug(&reg, name, &params, &extensions).await
        })
        .expect("method names are unique");
    }
    m.register_async_method(MEMORY_STATS_METHOD, |params, reg, extensions| async move {
        run_stats(&reg, &params, &extensions).await
    })
    .expect("method names are unique");
    m.register_method("vm-list", |params, reg, extensions| {
        let empty = params.as_str().is_none_or(|raw| {
            serde_json::from_str::<Value>(raw).is_ok_and(|v| v == json!({}) || v == json!([]))
        });
        if !empty {
            return Err(invalid("vm-list takes no params"));
        }
        let Some(caller) = extensions.get::<Caller>() else {
            return Ok(Value::Array(Vec::new()));
        };
        let vms: Vec<Value> = reg
            .service
            .visible(caller)
            .into_iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "socket": s.socket.display().to_string(),
                    "state": s.state.as_str(),
                    "last-contact": s.last_contact.and_then(unix_seconds),
                    "last-error": s.last_error,
                    "last-write": s.last_write.map(|w| json!({
                        "at": unix_seconds(w.at),
                        "command": w.command,
                        "outcome": w.outcome,
                        "detail": w.detail,
                        "results": w.results,
                        "late": w.late,
                    })),
                })
            })
            .collect();
        Ok::<_, ErrorObjectOwned>(Value::Array(vms))
    })
    .expect("method names are unique");
    m
}

#[cfg(test)]
mod tests {
    use qga_wire::schema::command;

    use super::*;

    fn refused(method: &str, params: &str) -> String {
        match decode(method, params, 16) {
            Err(BridgeError::InvalidRequest(why)) => why,
            other => panic!("{params} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn hotplug_params_are_checked_per_method() {
        let ok = decode_hotplug(
            "memory-plug",
            r#"{"vm": "v", "size": 536870912, "online-type": "online_movable", "request-id": "r1"}"#,
        )
        .expect("valid plug");
        assert_eq!(
            ok.op,
            Some(Operation::Plug(PlugArgs {
                size: 512 << 20,
                node: None,
                online_type: Some(GuestMemoryOnlineType::OnlineMovable)
            }))
        );
        assert_eq!(ok.request_id.as_deref(), Some("r1"));
        let refused = |method: &str, params: &str| match decode_hotplug(method, params) {
            Err(BridgeError::InvalidRequest(why)) => why,
            other => panic!("{method} {params} should be refused, got {other:?}"),
        };
        assert!(refused("memory-plug", r#"{"vm": "v"}"#).contains("needs 'size'"));
        assert!(
            refused(
                "memory-plug",
                r#"{"vm": "v", "size": 1, "online-type": "movable"}"#
            )
            .contains("params")
        );
        assert!(
            refused("memory-unplug", r#"{"vm": "v", "dimm": "d", "size": 1}"#)
                .contains("no 'size'")
        );
        assert!(refused("memory-unplug", r#"{"vm": "v", "dimm": ""}"#).contains("needs 'dimm'"));
        assert!(
            refused("memory-resize", r#"{"vm": "v", "size": 1, "node": 0}"#).contains("no 'node'")
        );
        assert!(
            refused("memory-layout", r#"{"vm": "v", "request-id": "x"}"#)
                .contains("no 'request-id'")
        );
        assert!(refused("memory-layout", r#"["v"]"#).contains("expected an object"));
        assert!(refused("memory-layout", r#"{"vm": "v", "x": 1}"#).contains("unknown field"));
    }

    #[test]
    fn memory_stats_takes_the_vm_and_a_timeout_only() {
        let (vm, timeout) =
            decode_stats(r#"{"vm": "v", "timeout-ms": 500}"#).expect("valid params");
        assert_eq!(
            (vm.as_str(), timeout),
            ("v", Some(Duration::from_millis(500)))
        );
        for bad in [
            r#"{"vm": "v", "size": 1}"#,
            r#"{"vm": "v", "timeout-ms": null}"#,
            r#"{"vm": "v", "timeout-ms": 0}"#,
            r#"{}"#,
            r#"["v"]"#,
        ] {
            assert!(
                matches!(decode_stats(bad), Err(BridgeError::InvalidRequest(_))),
                "{bad}"
            );
        }
    }

    /// A hotplug member given as `null` is given, not absent, as for the QGA methods.
    #[test]
    fn null_hotplug_params_are_refused() {
        let refused = |method: &str, params: &str| match decode_hotplug(method, params) {
            Err(BridgeError::InvalidRequest(why)) => why,
            other => panic!("{method} {params} should be refused, got {other:?}"),
        };
        for (method, params) in [
            ("memory-layout", r#"{"vm": "v", "timeout-ms": null}"#),
            ("memory-plug", r#"{"vm": "v", "size": 1, "node": null}"#),
            (
                "memory-plug",
                r#"{"vm": "v", "size": 1, "online-type": null}"#,
            ),
            ("memory-plug", r#"{"vm": "v", "size": null}"#),
            ("memory-unplug", r#"{"vm": "v", "dimm": null}"#),
            (
                "memory-resize",
                r#"{"vm": "v", "size": 1, "request-id": null}"#,
            ),
            ("memory-layout", r#"{"vm": "v", "dimm": null}"#),
        ] {
            assert!(
                refused(method, params).starts_with("params"),
                "{method} {params}: {}",
                refused(method, params)
            );
        }
    }

    /// Found by the `jsonrpc_params` fuzz target: derived decoding took a JSON array as
    /// the fields in order, so `["vm1"]` was a valid envelope and `[5, true]` a valid
    /// block change.
    #[test]
    fn params_and_block_changes_are_objects_not_positional_lists() {
        let ping = command::PING;
        let set = command::SET_MEMORY_BLOCKS;
        assert!(refused(ping, r#"["vm1"]"#).contains("expected an object"));
        assert!(
            refused(set, r#"["vm1", null, [{"phys-index": 5, "online": true}]]"#)
                .contains("expected an object")
        );
        assert!(
            refused(set, r#"{"vm": "vm1", "mem-blks": [[5, true]]}"#)
                .contains("expected an object")
        );
        let ok = decode(
            set,
            r#"{"vm": "vm1", "mem-blks": [{"phys-index": 5, "online": true}]}"#,
            16,
        )
        .expect("object params");
        assert_eq!(ok.vm, "vm1");
        let Call::SetMemoryBlocks(changes) = ok.call else {
            panic!("not a set call: {:?}", ok.call);
        };
        assert_eq!(changes.blocks().len(), 1);
        assert!(decode(ping, r#" {"vm": "vm1", "timeout-ms": 5} "#, 16).is_ok());
        // null is given, not absent (found by fuzzing).
        let get = command::GET_MEMORY_BLOCKS;
        assert!(
            refused(get, r#"{"vm": "*", "mem-blks": null}"#).contains("takes no argument"),
            "{}",
            refused(get, r#"{"vm": "*", "mem-blks": null}"#)
        );
        assert!(refused(set, r#"{"vm": "v", "mem-blks": null}"#).contains("mem-blks"));
        assert!(refused(ping, r#"{"vm": "v", "timeout-ms": null}"#).contains("null"));
    }
}
