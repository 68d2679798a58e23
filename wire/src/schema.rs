//! QAPI types of the commands this project speaks, with QGA's exact member names.
//!
//! The memory-block types come from QEMU's `qga/qapi-schema.json` (QEMU 2.3+). Note the
//! mixed spelling of `guest-info`: `supported_commands` has an underscore while
//! `success-response` has a hyphen; both are what the reference agent sends.
//!
//! Besides QGA's own commands, `qga-agent` implements five QAPI downstream extensions,
//! named by QAPI's convention `__RFQDN_name` with the reverse domain `org.qga-bridge`:
//! [`command::GET_MEMORY_ZONES`], [`command::SET_MEMORY_BLOCKS_ONLINE_TYPE`],
//! [`command::ONLINE_WHEN_PRESENT`], [`command::SET_AUTO_ONLINE`] and
//! [`command::GET_MEMORY_STATS`]. The first two exist because the kernel's `removable` attribute (qemu-ga's `can-offline`) reads 1 for every
//! block since Linux 5.7: only a block's zone tells whether it can ever be offlined and its
//! DIMM unplugged, and only the word written to `state` decides that zone. The standard
//! commands are unchanged, so a host that knows nothing of the extensions sees a plain QGA
//! agent. The third makes a plug one round trip: the agent waits for the blocks on the
//! kernel's own uevents and onlines each the moment it appears. The fourth lets the host
//! have the kernel online new memory itself, into the chosen zone, as it adds it. The
//! fifth reports the guest's memory signals (usage, pressure, reclaim, boot) in one call
//! cheap enough to poll every second.

use serde::{Deserialize, Serialize};

mod stats;

pub use stats::{
    GuestMeminfo, GuestMemoryPressure, GuestMemoryStats, GuestPressureLine, GuestVmstat,
};

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
    /// Downstream extension: `__org.qga-bridge_get-memory-zones` (no arguments) ->
    /// [`GuestMemoryZones`](super::GuestMemoryZones): the kernel's auto-online settings and
    /// each block's zones.
    pub const GET_MEMORY_ZONES: &str = "__org.qga-bridge_get-memory-zones";
    /// Downstream extension: `__org.qga-bridge_set-memory-blocks`
    /// [`{"mem-blks": [...], "online-type": ...}`](super::GuestSetMemoryBlocksOnlineTypeArgs)
    /// -> `[GuestMemoryBlockResponse]`: `guest-set-memory-blocks` with the zone chosen per
    /// call instead of by the agent's configuration.
    pub const SET_MEMORY_BLOCKS_ONLINE_TYPE: &str = "__org.qga-bridge_set-memory-blocks";
    /// Downstream extension: `__org.qga-bridge_online-when-present`
    /// [`{"first": N, "count": N, "online-type"?: ..., "timeout-ms": N}`](super::GuestOnlineWhenPresentArgs)
    /// -> `[GuestMemoryBlockResponse]`, one per block of the range in index order: waits
    /// for the blocks to appear (driven by the kernel's uevents) and onlines each as it
    /// does, so a host plugging a DIMM needs one call instead of a polling loop.
    pub const ONLINE_WHEN_PRESENT: &str = "__org.qga-bridge_online-when-present";
    /// Downstream extension: `__org.qga-bridge_set-auto-online`
    /// [`{"auto-online-blocks": WORD}`](super::GuestAutoOnline) -> the same, as the kernel
    /// reads it back (and the word before it as `previous`): sets the guest kernel's `auto_online_blocks`, so that memory it adds
    /// is onlined at once, into the zone the host chose, as the kernel adds it.
    pub const SET_AUTO_ONLINE: &str = "__org.qga-bridge_set-auto-online";
    /// Downstream extension: `__org.qga-bridge_get-memory-stats` (no arguments) ->
    /// [`GuestMemoryStats`](super::GuestMemoryStats): the guest kernel's own view of its
    /// memory (`/proc/meminfo`), its memory pressure (PSI), its reclaim and OOM counters
    /// (`/proc/vmstat`) and its boot, for a host that sizes the VM from inside.
    pub const GET_MEMORY_STATS: &str = "__org.qga-bridge_get-memory-stats";
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

/// How to bring a block online: the word written to its `state` file, which decides the
/// zone it joins (the kernel's own spelling, with underscores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestMemoryOnlineType {
    /// `online`: the kernel picks the zone; hot-added memory usually lands in ZONE_NORMAL,
    /// where unmovable kernel pages soon stop it from being offlined again.
    Online,
    /// `online_movable`: ZONE_MOVABLE, so the block can later be offlined and its DIMM
    /// unplugged; the kernel cannot use it for its own (unmovable) allocations.
    OnlineMovable,
    /// `online_kernel`: ZONE_NORMAL explicitly: usable for everything, rarely removable.
    OnlineKernel,
}

impl GuestMemoryOnlineType {
    /// Every value, in schema order.
    pub const ALL: [Self; 3] = [Self::Online, Self::OnlineMovable, Self::OnlineKernel];

    /// The word on the wire, which is also the word written to `state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::OnlineMovable => "online_movable",
            Self::OnlineKernel => "online_kernel",
        }
    }

    /// The value spelled `word`, if any.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == word)
    }
}

/// Arguments of `__org.qga-bridge_set-memory-blocks`: those of `guest-set-memory-blocks`
/// plus the word to write when onlining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestSetMemoryBlocksOnlineTypeArgs {
    /// The blocks to change, processed in order, exactly as for `guest-set-memory-blocks`.
    pub mem_blks: Vec<GuestMemoryBlock>,
    /// Written to `state` for entries with `online: true` (required; the agent's
    /// `--online-type` does not apply to this command).
    pub online_type: GuestMemoryOnlineType,
}

/// Arguments of `__org.qga-bridge_online-when-present`: a range of blocks, how to online
/// them, and how long to wait for them to appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestOnlineWhenPresentArgs {
    /// The first block: the `N` of `memoryN`.
    pub first: u64,
    /// How many blocks from `first` (at least one).
    pub count: u64,
    /// Written to `state` of each block found offline; absent: the agent's
    /// `--online-type`, as for `guest-set-memory-blocks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_type: Option<GuestMemoryOnlineType>,
    /// How long to wait for blocks to appear, milliseconds. Blocks still absent then are
    /// answered `not-found` (errno 2).
    pub timeout_ms: u64,
}

/// The guest kernel's `auto_online_blocks`: `offline`, `online`, `online_kernel` or
/// `online_movable` — what the kernel does with memory blocks as it adds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestAutoOnline {
    /// The kernel's word.
    pub auto_online_blocks: String,
    /// In `__org.qga-bridge_set-auto-online`'s reply: the word before the write, when it
    /// could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// One block in the `__org.qga-bridge_get-memory-zones` reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlockZones {
    /// The block number: the `N` of `/sys/devices/system/memory/memoryN`.
    pub phys_index: u64,
    /// Whether the block is online, read as for `guest-get-memory-blocks`.
    pub online: bool,
    /// The words of `memoryN/valid_zones`, e.g. `["Movable"]`. For an online block: the
    /// zone it is in, or `["none"]` if it spans zones (such a block can never be offlined).
    /// For an offline block: the zones onlining could put it in, the kernel's default
    /// (what plain `online` picks) first. Absent when the file is missing or unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_zones: Option<Vec<String>>,
    /// `memoryN/removable` as read, for completeness: since Linux 5.7 it is true for every
    /// block on kernels that can offline memory, so it says nothing about this block.
    /// Absent when the file is missing or unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removable: Option<bool>,
}

/// `__org.qga-bridge_get-memory-zones` reply: the kernel's policy for new blocks, and each
/// block's zones. Each policy member is absent when its file is missing (older kernels, no
/// memory hotplug) or unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryZones {
    /// `/sys/devices/system/memory/auto_online_blocks`, trimmed: what the kernel does with a
    /// hot-added block by itself (`offline`, `online`, `online_kernel`, `online_movable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_online_blocks: Option<String>,
    /// `/sys/module/memory_hotplug/parameters/online_policy`, trimmed (`contig-zones` or
    /// `auto-movable`; Linux 5.15+): how plain `online` picks a zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_policy: Option<String>,
    /// `/sys/module/memory_hotplug/parameters/auto_movable_ratio`: the largest
    /// MOVABLE:KERNEL ratio, in percent, the `auto-movable` policy keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_movable_ratio: Option<u64>,
    /// Every block, in the same set and order as `guest-get-memory-blocks` lists them.
    pub blocks: Vec<GuestMemoryBlockZones>,
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

    #[test]
    fn extension_names_follow_qapi_downstream_convention() {
        for name in [
            command::GET_MEMORY_ZONES,
            command::SET_MEMORY_BLOCKS_ONLINE_TYPE,
            command::ONLINE_WHEN_PRESENT,
            command::SET_AUTO_ONLINE,
            command::GET_MEMORY_STATS,
        ] {
            assert!(name.starts_with("__org.qga-bridge_"), "{name}");
        }
    }

    #[test]
    fn zones_members_are_kebab_case_and_absent_when_unknown() {
        let zones = GuestMemoryZones {
            auto_online_blocks: Some("offline".into()),
            online_policy: None,
            auto_movable_ratio: Some(301),
            blocks: vec![
                GuestMemoryBlockZones {
                    phys_index: 32,
                    online: false,
                    valid_zones: Some(vec!["Normal".into(), "Movable".into()]),
                    removable: Some(true),
                },
                GuestMemoryBlockZones {
                    phys_index: 0,
                    online: true,
                    valid_zones: None,
                    removable: None,
                },
            ],
        };
        let v = serde_json::to_value(&zones).expect("serialize");
        assert_eq!(
            v,
            json!({"auto-online-blocks": "offline", "auto-movable-ratio": 301, "blocks": [
                {"phys-index": 32, "online": false, "valid-zones": ["Normal", "Movable"],
                 "removable": true},
                {"phys-index": 0, "online": true}
            ]})
        );
        assert_eq!(
            serde_json::from_value::<GuestMemoryZones>(v).expect("parse"),
            zones
        );
    }

    #[test]
    fn online_type_args_use_the_kernel_words() {
        for t in GuestMemoryOnlineType::ALL {
            assert_eq!(
                serde_json::to_value(t).expect("serialize"),
                json!(t.as_str())
            );
            assert_eq!(GuestMemoryOnlineType::parse(t.as_str()), Some(t));
        }
        let args: GuestSetMemoryBlocksOnlineTypeArgs = serde_json::from_value(json!({
            "mem-blks": [{"phys-index": 1, "online": true}],
            "online-type": "online_movable"
        }))
        .expect("parse");
        assert_eq!(args.online_type, GuestMemoryOnlineType::OnlineMovable);
        assert!(
            serde_json::from_value::<GuestSetMemoryBlocksOnlineTypeArgs>(
                json!({"mem-blks": [], "online-type": "movable"})
            )
            .is_err()
        );
        assert!(
            serde_json::from_value::<GuestSetMemoryBlocksOnlineTypeArgs>(json!({"mem-blks": []}))
                .is_err()
        );
    }
}
