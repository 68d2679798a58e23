//! The front ends: they decode a request's parameters, call the [`crate::service`], and
//! map its answer or [`crate::error::BridgeError`] onto their protocol ([`status`] is that
//! one table). Nothing else happens here.
//!
//! - [`grpc`]: tonic services, health and reflection; [`signals`]: its `MemorySignals`
//!   service.
//! - [`jsonrpc`]: JSON-RPC 2.0 over HTTP/1 and WebSocket (jsonrpsee).
//! - [`prometheus`]: the metrics endpoint.

pub mod grpc;
pub mod jsonrpc;
pub mod prometheus;
pub mod signals;
pub mod status;
