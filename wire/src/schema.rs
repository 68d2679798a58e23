//! QAPI types of the commands this project speaks, with QGA's exact member names.
//!
//! The memory-block types come from QEMU's `qga/qapi-schema.json` (QEMU 2.3+). Note the
//! mixed spelling of `guest-info`: `supported_commands` has an underscore while
//! `success-response` has a hyphen; both are what the reference agent sends.

use serde::{Deserialize, Serialize};

/// Command names.
pub mod command {
    /// `guest-sync {"id": INT}` -> `INT`.
    pub const SYNC: &str = "guest-sync";
    /// Like `guest-sync`, but the reply is preceded by the byte `0xFF`.
    pub const SYNC_DELIMITED: &str = "guest-sync-delimited";
    /// `guest-ping` -> `{}`.
    pub const PING: &str = "guest-ping";
    /// `guest-info` -> [`GuestAgentInfo`](super::GuestAgentInfo).
    pub const INFO: &str = "guest-info";
    /// `guest-get-memory-blocks` -> `[GuestMemoryBlock]`.
    pub const GET_MEMORY_BLOCKS: &str = "guest-get-memory-blocks";
    /// `guest-set-memory-blocks {"mem-blks": [...]}` -> `[GuestMemoryBlockResponse]`.
    pub const SET_MEMORY_BLOCKS: &str = "guest-set-memory-blocks";
    /// `guest-get-memory-block-info` -> [`GuestMemoryBlockInfo`](super::GuestMemoryBlockInfo).
    pub const GET_MEMORY_BLOCK_INFO: &str = "guest-get-memory-block-info";
}

/// One memory block: `{"phys-index": N, "online": BOOL, "can-offline": BOOL}`.
///
/// In replies `can-offline` is always present; in `guest-set-memory-blocks` requests it is
/// optional and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlock {
    /// The block number: the `N` of `/sys/devices/system/memory/memoryN`.
    pub phys_index: u64,
    /// Whether the block is online (or, in a request, should be).
    pub online: bool,
    /// Whether the kernel may be able to offline the block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// The outcome of one entry of `guest-set-memory-blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestMemoryBlockResponseType {
    /// The block is now in the requested state.
    Success,
    /// No such block.
    NotFound,
    /// The block cannot be put in that state at all (e.g. no `state` file).
    OperationNotSupported,
    /// The kernel refused; `error-code` carries its errno.
    OperationFailed,
}

/// One result of `guest-set-memory-blocks`, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlockResponse {
    /// The block the entry named.
    pub phys_index: u64,
    /// What happened.
    pub response: GuestMemoryBlockResponseType,
    /// The errno behind a failure; omitted on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
}

/// `guest-get-memory-block-info` reply: the block size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestMemoryBlockInfo {
    /// Bytes per block (`block_size_bytes`).
    pub size: u64,
}

/// Arguments of `guest-set-memory-blocks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestSetMemoryBlocksArgs {
    /// The blocks to change, processed in order.
    pub mem_blks: Vec<GuestMemoryBlock>,
}

/// Arguments of `guest-sync` and `guest-sync-delimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSyncArgs {
    /// Echoed as the whole `return` value.
    pub id: i64,
}

/// One entry of `guest-info`'s `supported_commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAgentCommandInfo {
    /// Command name.
    pub name: String,
    /// False when disabled by `--block-rpcs`/`--allow-rpcs`.
    pub enabled: bool,
    /// False for commands that never reply (e.g. `guest-shutdown`).
    #[serde(rename = "success-response")]
    pub success_response: bool,
}

/// `guest-info` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// The agent's version string.
    pub version: String,
    /// Every command the agent knows, enabled or not.
    pub supported_commands: Vec<GuestAgentCommandInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn member_names_are_qgas() {
        let b = GuestMemoryBlock {
            phys_index: 3,
            online: true,
            can_offline: Some(true),
        };
        assert_eq!(
            serde_json::to_value(b).expect("serialize"),
            json!({"phys-index": 3, "online": true, "can-offline": true})
        );
        let r = GuestMemoryBlockResponse {
            phys_index: 9,
            response: GuestMemoryBlockResponseType::OperationFailed,
            error_code: Some(16),
        };
        assert_eq!(
            serde_json::to_value(r).expect("serialize"),
            json!({"phys-index": 9, "response": "operation-failed", "error-code": 16})
        );
        let ok = GuestMemoryBlockResponse {
            phys_index: 9,
            response: GuestMemoryBlockResponseType::Success,
            error_code: None,
        };
        assert_eq!(
            serde_json::to_value(ok).expect("serialize"),
            json!({"phys-index": 9, "response": "success"})
        );
        let info = GuestAgentInfo {
            version: "1".into(),
            supported_commands: vec![GuestAgentCommandInfo {
                name: "guest-ping".into(),
                enabled: true,
                success_response: true,
            }],
        };
        assert_eq!(
            serde_json::to_value(info).expect("serialize"),
            json!({"version": "1", "supported_commands":
                [{"name": "guest-ping", "enabled": true, "success-response": true}]})
        );
    }

    #[test]
    fn set_args_accept_optional_can_offline() {
        let args: GuestSetMemoryBlocksArgs = serde_json::from_value(json!({"mem-blks": [
            {"phys-index": 1, "online": false},
            {"phys-index": 2, "online": true, "can-offline": false}
        ]}))
        .expect("parse");
        assert_eq!(args.mem_blks.len(), 2);
        assert_eq!(args.mem_blks[0].can_offline, None);
    }
}
