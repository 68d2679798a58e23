//! The gRPC services of `qga.bridge.v1`, plus health and reflection.

use std::{sync::Arc, time::Duration};

use qga_proto::v1::{
    self as pb, guest_agent_server::GuestAgent, guest_memory_server::GuestMemory, vms_server::Vms,
};
use qga_wire::schema::{
    GuestAgentInfo, GuestMemoryBlock, GuestMemoryBlockInfo, GuestMemoryBlockResponse,
    GuestMemoryBlockResponseType, command,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::{
    error::BridgeError,
    registry::Registry,
    session::{AgentState, CallResult},
};

/// Implements all three services over one registry.
#[derive(Clone)]
pub struct Api {
    registry: Arc<Registry>,
}

impl Api {
    /// The services over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        vm: &str,
        command: &'static str,
        arguments: Option<Map<String, Value>>,
        deadline: Option<Instant>,
    ) -> Result<T, Status> {
        let session = self.registry.get(vm)?;
        let result: CallResult = session.call(command, arguments, deadline).await;
        Ok(decode(vm, result?)?)
    }
}

/// Parses an agent's `return` value into its schema type; anything else is a bad reply.
pub fn decode<T: DeserializeOwned>(vm: &str, value: Value) -> Result<T, BridgeError> {
    serde_json::from_value(value).map_err(|e| schema_mismatch(vm, e))
}

/// Checks that an agent's `return` value parses as its schema type, without consuming it.
pub fn check<T: DeserializeOwned>(vm: &str, value: &Value) -> Result<(), BridgeError> {
    T::deserialize(value)
        .map(drop)
        .map_err(|e| schema_mismatch(vm, e))
}

fn schema_mismatch(vm: &str, e: serde_json::Error) -> BridgeError {
    BridgeError::BadReply {
        vm: vm.to_string(),
        reason: format!("reply does not match the schema: {e}"),
    }
}

/// The caller's deadline from the `grpc-timeout` header, a little early so that our
/// DEADLINE_EXCEEDED (and the resync it triggers) wins over the transport's own timer.
fn deadline<T>(req: &Request<T>) -> Option<Instant> {
    let raw = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(raw)?;
    let margin = (timeout / 20).min(Duration::from_millis(50));
    Some(Instant::now() + timeout.saturating_sub(margin))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn response_type(t: GuestMemoryBlockResponseType) -> pb::MemoryBlockResponseType {
    match t {
        GuestMemoryBlockResponseType::Success => pb::MemoryBlockResponseType::Success,
        GuestMemoryBlockResponseType::NotFound => pb::MemoryBlockResponseType::NotFound,
        GuestMemoryBlockResponseType::OperationNotSupported => {
            pb::MemoryBlockResponseType::OperationNotSupported
        }
        GuestMemoryBlockResponseType::OperationFailed => {
            pb::MemoryBlockResponseType::OperationFailed
        }
    }
}

#[tonic::async_trait]
impl GuestMemory for Api {
    async fn get_memory_blocks(
        &self,
        req: Request<pb::GetMemoryBlocksRequest>,
    ) -> Result<Response<pb::GetMemoryBlocksResponse>, Status> {
        let deadline = deadline(&req);
        let blocks: Vec<GuestMemoryBlock> = self
            .call(
                &req.get_ref().vm,
                command::GET_MEMORY_BLOCKS,
                None,
                deadline,
            )
            .await?;
        Ok(Response::new(pb::GetMemoryBlocksResponse {
            blocks: blocks
                .into_iter()
                .map(|b| pb::MemoryBlock {
                    phys_index: b.phys_index,
                    online: b.online,
                    can_offline: b.can_offline,
                })
                .collect(),
        }))
    }

    async fn set_memory_blocks(
        &self,
        req: Request<pb::SetMemoryBlocksRequest>,
    ) -> Result<Response<pb::SetMemoryBlocksResponse>, Status> {
        let deadline = deadline(&req);
        let r = req.get_ref();
        let blks: Vec<Value> = r
            .blocks
            .iter()
            .map(|b| json!({"phys-index": b.phys_index, "online": b.online}))
            .collect();
        let mut args = Map::new();
        args.insert("mem-blks".into(), Value::Array(blks));
        let results: Vec<GuestMemoryBlockResponse> = self
            .call(&r.vm, command::SET_MEMORY_BLOCKS, Some(args), deadline)
            .await?;
        Ok(Response::new(pb::SetMemoryBlocksResponse {
            results: results
                .into_iter()
                .map(|x| pb::MemoryBlockResult {
                    phys_index: x.phys_index,
                    response: response_type(x.response) as i32,
                    error_code: x.error_code,
                })
                .collect(),
        }))
    }

    async fn get_memory_block_info(
        &self,
        req: Request<pb::GetMemoryBlockInfoRequest>,
    ) -> Result<Response<pb::GetMemoryBlockInfoResponse>, Status> {
        let deadline = deadline(&req);
        let info: GuestMemoryBlockInfo = self
            .call(
                &req.get_ref().vm,
                command::GET_MEMORY_BLOCK_INFO,
                None,
                deadline,
            )
            .await?;
        Ok(Response::new(pb::GetMemoryBlockInfoResponse {
            size: info.size,
        }))
    }
}

#[tonic::async_trait]
impl GuestAgent for Api {
    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let deadline = deadline(&req);
        let _: Map<String, Value> = self
            .call(&req.get_ref().vm, command::PING, None, deadline)
            .await?;
        Ok(Response::new(pb::PingResponse {}))
    }

    async fn get_info(
        &self,
        req: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        let deadline = deadline(&req);
        let info: GuestAgentInfo = self
            .call(&req.get_ref().vm, command::INFO, None, deadline)
            .await?;
        Ok(Response::new(pb::GetInfoResponse {
            version: info.version,
            supported_commands: info
                .supported_commands
                .into_iter()
                .map(|c| pb::AgentCommand {
                    name: c.name,
                    enabled: c.enabled,
                    success_response: c.success_response,
                })
                .collect(),
        }))
    }
}

/// The protobuf enum for a session state.
pub fn agent_state(s: AgentState) -> pb::AgentState {
    match s {
        AgentState::Disconnected => pb::AgentState::Disconnected,
        AgentState::Connecting => pb::AgentState::Connecting,
        AgentState::Connected => pb::AgentState::Connected,
    }
}

#[tonic::async_trait]
impl Vms for Api {
    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self
            .registry
            .list()
            .into_iter()
            .map(|s| pb::Vm {
                name: s.name,
                socket: s.socket.display().to_string(),
                state: agent_state(s.state) as i32,
                last_contact: s.last_contact.map(prost_types::Timestamp::from),
                last_error: s.last_error,
            })
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
