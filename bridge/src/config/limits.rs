//! `[limits]`: how much the bridge takes on at once. A knob of one server carries its
//! prefix (`jsonrpc_`, `grpc_`, `metrics_`); the others bound the whole bridge (or every
//! server alike). Sizes end in `_bytes`, durations in `_ms`.

use serde::Deserialize;

use super::ConfigError;

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls that may wait per VM; more get RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
    /// Largest reply accepted from a guest, bytes.
    pub max_reply_bytes: usize,
    /// Block changes one `guest-set-memory-blocks` call may carry.
    pub max_set_entries: usize,
    /// Unrelated frames (stale replies, garbage) one call may skip before the channel
    /// counts as flooded: it is dropped and backed off.
    pub max_stale_frames: u32,
    /// Bytes of unrelated values one call may skip, likewise.
    pub max_stale_bytes: usize,
    /// Bytes of large replies being parsed off the async workers at once, bridge-wide.
    pub parse_budget_bytes: usize,
    /// VMs served in all, configured and discovered; discovered sockets beyond it are
    /// not added.
    pub max_vms: usize,
    /// Calls being served at once, bridge-wide, both front ends; more get
    /// RESOURCE_EXHAUSTED at once.
    pub max_in_flight: usize,
    /// Time an HTTP/1 client has to send a whole request header (JSON-RPC and metrics),
    /// idle keep-alive time included, and any client to finish a TLS handshake,
    /// milliseconds.
    pub header_read_timeout_ms: u64,
    /// Interval of HTTP/2 (gRPC) and WebSocket pings, milliseconds.
    pub keepalive_interval_ms: u64,
    /// A ping unanswered this long closes its connection, milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Largest JSON-RPC request body (or WebSocket message), bytes.
    #[serde(alias = "max_request_bytes")]
    pub jsonrpc_max_request_bytes: u32,
    /// Concurrent JSON-RPC connections (HTTP and WebSocket) accepted.
    #[serde(alias = "max_connections")]
    pub jsonrpc_max_connections: u32,
    /// Calls in flight on one JSON-RPC connection (a WebSocket's pipelined calls, a
    /// batch's members); more get -32004 at once.
    #[serde(alias = "max_connection_calls")]
    pub jsonrpc_max_connection_calls: usize,
    /// Calls in one JSON-RPC batch; a larger batch is refused whole.
    #[serde(alias = "max_batch")]
    pub jsonrpc_max_batch: u32,
    /// Bytes of large JSON-RPC request bodies (256 KiB and more) read and handled at
    /// once, bridge-wide; further large requests wait.
    #[serde(alias = "body_budget_bytes")]
    pub jsonrpc_body_budget_bytes: u32,
    /// Concurrent gRPC connections accepted.
    pub grpc_max_connections: usize,
    /// Concurrent gRPC calls (HTTP/2 streams) per connection.
    pub grpc_max_streams: u32,
    /// HTTP/2 streams a client may open and reset before they are served; more close
    /// the connection (the "rapid reset" defence).
    pub grpc_max_pending_resets: usize,
    /// Concurrent connections to the metrics endpoint.
    pub metrics_max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            queue_depth: 64,
            // The largest real reply, guest-get-memory-blocks for 32,768 blocks (4 TiB in
            // 128 MiB blocks), is about 1.7 MB: more than twice that.
            max_reply_bytes: 4 * 1024 * 1024,
            max_set_entries: 4096,
            // A timed-out call's late reply and some noise; a guest sending more is
            // flooding, not answering.
            max_stale_frames: 64,
            max_stale_bytes: 8 * 1024 * 1024,
            parse_budget_bytes: 64 * 1024 * 1024,
            max_vms: 4096,
            max_in_flight: 4096,
            header_read_timeout_ms: 10_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            jsonrpc_max_request_bytes: 4 * 1024 * 1024,
            jsonrpc_max_connections: 1024,
            jsonrpc_max_connection_calls: 16,
            jsonrpc_max_batch: 32,
            jsonrpc_body_budget_bytes: 8 * 1024 * 1024,
            grpc_max_connections: 1024,
            grpc_max_streams: 100,
            grpc_max_pending_resets: 20,
            metrics_max_connections: 16,
        }
    }
}

impl LimitsConfig {
    /// Every count at least 1, and budgets that fit the largest request and reply.
    /// (`max_vms` against the configured VMs: [`super::Config::validate_vms`].)
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("max_set_entries", self.max_set_entries as u64),
            ("queue_depth", self.queue_depth as u64),
            ("max_vms", self.max_vms as u64),
            ("max_in_flight", self.max_in_flight as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            (
                "jsonrpc_max_connection_calls",
                self.jsonrpc_max_connection_calls as u64,
            ),
            ("jsonrpc_max_batch", u64::from(self.jsonrpc_max_batch)),
            (
                "jsonrpc_max_connections",
                u64::from(self.jsonrpc_max_connections),
            ),
            ("grpc_max_connections", self.grpc_max_connections as u64),
            ("grpc_max_streams", u64::from(self.grpc_max_streams)),
            (
                "grpc_max_pending_resets",
                self.grpc_max_pending_resets as u64,
            ),
            (
                "metrics_max_connections",
                self.metrics_max_connections as u64,
            ),
        ] {
            ConfigError::at_least(&format!("limits.{name}"), value, 1)?;
        }
        if self.jsonrpc_body_budget_bytes < self.jsonrpc_max_request_bytes {
            return Err(ConfigError::Conflict {
                keys: (
                    "limits.jsonrpc_body_budget_bytes".into(),
                    "limits.jsonrpc_max_request_bytes".into(),
                ),
                reason: format!(
                    "the budget ({}) is smaller than the largest request ({}): that request \
                     could never be read",
                    self.jsonrpc_body_budget_bytes, self.jsonrpc_max_request_bytes
                ),
            });
        }
        ConfigError::at_least("limits.max_reply_bytes", self.max_reply_bytes as u64, 1024)
    }
}
