//! JSON-RPC 2.0 over HTTP and WebSocket (one port), with the QGA command names as methods.
//!
//! Params are by name: `{"vm": NAME, ...QGA's own arguments}`; the result is exactly the
//! agent's `return` value (checked against the schema first). `vm-list` lists the VMs.

use std::sync::Arc;

use jsonrpsee::{
    RpcModule,
    types::{ErrorObjectOwned, Params},
};
use qga_wire::schema::{
    GuestAgentInfo, GuestMemoryBlock, GuestMemoryBlockInfo, GuestMemoryBlockResponse, command,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};

use crate::{error::BridgeError, grpc::check, registry::Registry, session::AgentState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmParams {
    vm: String,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BlockChange {
    #[serde(rename = "phys-index")]
    phys_index: u64,
    online: bool,
    #[serde(rename = "can-offline", skip_serializing)]
    #[allow(dead_code)]
    can_offline: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParams {
    vm: String,
    #[serde(rename = "mem-blks")]
    mem_blks: Vec<BlockChange>,
}

fn invalid(e: impl std::fmt::Display) -> ErrorObjectOwned {
    BridgeError::InvalidRequest(e.to_string()).into()
}

fn parse<T: DeserializeOwned>(params: &Params<'_>) -> Result<T, ErrorObjectOwned> {
    match params.as_str() {
        Some(raw) if params.is_object() => serde_json::from_str(raw).map_err(invalid),
        _ => Err(invalid("params must be an object with at least \"vm\"")),
    }
}

/// Runs `command` and returns its `return` value exactly as the agent sent it, once it has
/// been checked to match the schema type `T` (a reply that does not is INTERNAL).
async fn forward<T: DeserializeOwned>(
    registry: &Registry,
    vm: &str,
    command: &'static str,
    arguments: Option<Map<String, Value>>,
) -> Result<Value, ErrorObjectOwned> {
    let session = registry.get(vm)?;
    let value = session.call(command, arguments, None).await?;
    check::<T>(vm, &value)?;
    Ok(value)
}

fn state_name(s: AgentState) -> &'static str {
    match s {
        AgentState::Disconnected => "disconnected",
        AgentState::Connecting => "connecting",
        AgentState::Connected => "connected",
    }
}

/// The method table over `registry`.
pub fn module(registry: Arc<Registry>) -> RpcModule<Arc<Registry>> {
    let mut m = RpcModule::new(registry);
    macro_rules! read {
        ($name:expr, $ty:ty) => {
            m.register_async_method($name, |params, reg, _| async move {
                let p: VmParams = parse(&params)?;
                forward::<$ty>(&reg, &p.vm, $name, None).await
            })
            .expect("method names are unique");
        };
    }
    read!(command::GET_MEMORY_BLOCKS, Vec<GuestMemoryBlock>);
    read!(command::GET_MEMORY_BLOCK_INFO, GuestMemoryBlockInfo);
    read!(command::PING, Map<String, Value>);
    read!(command::INFO, GuestAgentInfo);
    m.register_async_method(command::SET_MEMORY_BLOCKS, |params, reg, _| async move {
        let p: SetParams = parse(&params)?;
        let blks = serde_json::to_value(&p.mem_blks).map_err(invalid)?;
        let mut args = Map::new();
        args.insert("mem-blks".into(), blks);
        forward::<Vec<GuestMemoryBlockResponse>>(
            &reg,
            &p.vm,
            command::SET_MEMORY_BLOCKS,
            Some(args),
        )
        .await
    })
    .expect("method names are unique");
    m.register_method("vm-list", |params, reg, _| {
        let empty = params.as_str().is_none_or(|raw| {
            serde_json::from_str::<Value>(raw).is_ok_and(|v| v == json!({}) || v == json!([]))
        });
        if !empty {
            return Err(invalid("vm-list takes no params"));
        }
        let vms: Vec<Value> = reg
            .list()
            .into_iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "socket": s.socket.display().to_string(),
                    "state": state_name(s.state),
                    "last-contact": s.last_contact
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs_f64()),
                    "last-error": s.last_error,
                })
            })
            .collect();
        Ok::<_, ErrorObjectOwned>(Value::Array(vms))
    })
    .expect("method names are unique");
    m
}
