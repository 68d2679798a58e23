//! The typed call layer: every agent call the bridge makes, in one enum.
//!
//! Both front ends decode a request into a [`Call`], hand it to a
//! [`Session`](crate::session::Session), and encode the [`Reply`] that comes back. What
//! differs between commands — the QGA name, whether it changes the guest, whether
//! concurrent callers may share it, the reply type and the checks on it — is said here and
//! nowhere else. Replies are decoded into the wire crate's schema types, so members a schema
//! does not name never reach a caller, and a `guest-set-memory-blocks` result must name the
//! requested blocks in the requested order to be believed.

use std::collections::{BTreeMap, HashSet};

use qga_wire::schema::{
    GuestAgentInfo, GuestAutoOnline, GuestMemoryBlock, GuestMemoryBlockInfo,
    GuestMemoryBlockResponse, GuestMemoryOnlineType, GuestMemoryStats, GuestMemoryZones,
    GuestOnlineWhenPresentArgs, GuestSetMemoryBlocksArgs, command,
};
use serde::{
    Deserialize, Serialize,
    de::{
        DeserializeOwned, DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
        value::MapAccessDeserializer,
    },
};
use serde_json::Value;

use crate::error::BridgeError;

/// One call to a VM's agent, with typed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `guest-ping`: is the agent there?
    Ping,
    /// `guest-info`: the agent's version and commands.
    Info,
    /// `guest-get-memory-blocks`: every memory block and whether it is online.
    GetMemoryBlocks,
    /// `guest-get-memory-block-info`: the block size.
    GetMemoryBlockInfo,
    /// `guest-set-memory-blocks`: online or offline blocks.
    SetMemoryBlocks(BlockChanges),
    /// `__org.qga-bridge_get-memory-zones` (our agent's extension): each block's zones and
    /// the kernel's onlining policy. Only sent to agents that list it in `guest-info`.
    GetMemoryZones,
    /// `__org.qga-bridge_set-memory-blocks` (our agent's extension): like
    /// [`Call::SetMemoryBlocks`], onlining with the given type rather than the agent's.
    SetMemoryBlocksOnlineType(BlockChanges, GuestMemoryOnlineType),
    /// `__org.qga-bridge_online-when-present` (our agent's extension): waits in the guest
    /// for a range of blocks to appear and onlines each as it does; one result per block.
    OnlineWhenPresent(GuestOnlineWhenPresentArgs),
    /// `__org.qga-bridge_set-auto-online` (our agent's extension): the guest kernel's
    /// `auto_online_blocks`, so that it onlines memory into the chosen zone as it adds it.
    SetAutoOnline(GuestAutoOnline),
    /// `__org.qga-bridge_get-memory-stats` (our agent's extension): the guest kernel's
    /// memory signals (`/proc/meminfo`, PSI, `/proc/vmstat`, uptime, boot id). An agent
    /// without it answers `CommandNotFound`, which the signals layer turns into an absent
    /// part of its reply rather than an error.
    GetMemoryStats,
}

/// The QGA names of the standard calls, which are also JSON-RPC methods. The extensions
/// are used by memory hotplug only.
pub const NAMES: [&str; 5] = [
    command::PING,
    command::INFO,
    command::GET_MEMORY_BLOCKS,
    command::GET_MEMORY_BLOCK_INFO,
    command::SET_MEMORY_BLOCKS,
];

/// Our agent's extensions, which memory hotplug and the guest's memory signals send.
pub const EXTENSION_NAMES: [&str; 5] = [
    command::GET_MEMORY_ZONES,
    command::SET_MEMORY_BLOCKS_ONLINE_TYPE,
    command::ONLINE_WHEN_PRESENT,
    command::SET_AUTO_ONLINE,
    command::GET_MEMORY_STATS,
];

/// The memory hotplug service's method names: JSON-RPC methods, and the method of their
/// audit records and metrics series.
pub mod hotplug_method {
    /// A VM's memory layout.
    pub const LAYOUT: &str = "memory-layout";
    /// Plug a DIMM.
    pub const PLUG: &str = "memory-plug";
    /// Unplug a DIMM.
    pub const UNPLUG: &str = "memory-unplug";
    /// Resize a VM's memory.
    pub const RESIZE: &str = "memory-resize";
    /// Set the memory the guest may use with the virtio balloon.
    pub const BALLOON: &str = "memory-balloon";
    /// All of them.
    pub const ALL: [&str; 5] = [LAYOUT, PLUG, UNPLUG, RESIZE, BALLOON];
}

/// The JSON-RPC method of the guest's memory signals, also the method of its refusals'
/// audit records.
pub const MEMORY_STATS_METHOD: &str = "memory-stats";

/// Every method a VM's metrics series can be labelled with.
pub fn all_methods() -> impl Iterator<Item = &'static str> {
    NAMES
        .into_iter()
        .chain(EXTENSION_NAMES)
        .chain(hotplug_method::ALL)
        .chain([MEMORY_STATS_METHOD])
}

/// The changes of one `guest-set-memory-blocks` call: each block named once.
///
/// A block named twice makes the per-block results ambiguous and no guest needs it, so such
/// a request is refused before the guest is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockChanges(GuestSetMemoryBlocksArgs);

impl BlockChanges {
    /// Validates `(phys-index, online)` pairs, in the order they are to be applied: at
    /// most `max` of them, each block named once.
    pub fn new(
        changes: impl IntoIterator<Item = (u64, bool)>,
        max: usize,
    ) -> Result<Self, BridgeError> {
        let changes = changes.into_iter();
        let mut seen = HashSet::with_capacity(changes.size_hint().0.min(max));
        let mut mem_blks = Vec::with_capacity(changes.size_hint().0.min(max));
        for (phys_index, online) in changes {
            if mem_blks.len() == max {
                return Err(BridgeError::InvalidRequest(too_many(max)));
            }
            if !seen.insert(phys_index) {
                return Err(BridgeError::InvalidRequest(format!(
                    "block {phys_index} is named more than once"
                )));
            }
            mem_blks.push(GuestMemoryBlock {
                phys_index,
                online,
                can_offline: None,
            });
        }
        Ok(Self(GuestSetMemoryBlocksArgs { mem_blks }))
    }

    /// Decodes QGA's `mem-blks` list from JSON text, entry by entry: no JSON tree is built,
    /// and decoding stops at entry `max + 1`, so an oversized list costs no more memory
    /// than `max` entries. `can-offline` is accepted and ignored, like the agent does.
    pub fn from_json(text: &str, max: usize) -> Result<Self, BridgeError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let changes = BoundedList { max }
            .deserialize(&mut de)
            .and_then(|c| de.end().map(|()| c))
            .map_err(|e| BridgeError::InvalidRequest(format!("mem-blks: {e}")))?;
        Self::new(changes, max)
    }

    /// The changes, in order.
    pub fn blocks(&self) -> &[GuestMemoryBlock] {
        &self.0.mem_blks
    }
}

fn too_many(max: usize) -> String {
    format!("more than {max} block changes in one call (limits.max_set_entries)")
}

/// Decodes a JSON list of changes, refusing it at entry `max + 1`.
struct BoundedList {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for BoundedList {
    type Value = Vec<(u64, bool)>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedList {
    type Value = Vec<(u64, bool)>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a list of at most {} block changes", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(ObjectOnly(c)) = seq.next_element::<ObjectOnly<ChangeArgument>>()? {
            if out.len() == self.max {
                return Err(A::Error::custom(too_many(self.max)));
            }
            out.push((c.phys_index, c.online));
        }
        Ok(out)
    }
}

/// `guest-ping`'s reply: an object, always passed on as `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Pong {}

impl<'de> Deserialize<'de> for Pong {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, IgnoredAny>::deserialize(d).map(|_| Self {})
    }
}

/// What a [`Call`] returns: the variant of the same name, decoded into schema types.
///
/// Serialises exactly as QGA's `return` value of the command would, minus any member the
/// schema does not name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// [`Call::Ping`]
    Ping(Pong),
    /// [`Call::Info`]
    Info(GuestAgentInfo),
    /// [`Call::GetMemoryBlocks`]
    GetMemoryBlocks(Vec<GuestMemoryBlock>),
    /// [`Call::GetMemoryBlockInfo`]
    GetMemoryBlockInfo(GuestMemoryBlockInfo),
    /// [`Call::SetMemoryBlocks`] and [`Call::SetMemoryBlocksOnlineType`]: one result per
    /// requested change, in request order; [`Call::OnlineWhenPresent`]: one per block of
    /// the range, in index order.
    SetMemoryBlocks(Vec<GuestMemoryBlockResponse>),
    /// [`Call::GetMemoryZones`]
    MemoryZones(GuestMemoryZones),
    /// [`Call::SetAutoOnline`]: the setting as the kernel reads it back.
    AutoOnline(GuestAutoOnline),
    /// [`Call::GetMemoryStats`]: members the bridge does not know are dropped, and those
    /// an older agent lacks are absent (boxed: it is large beside the other replies).
    MemoryStats(Box<GuestMemoryStats>),
}

/// A struct decoded from a JSON object only. Derived `Deserialize` impls also take a JSON
/// array as the fields in order (`[5, true]` for `{"phys-index": 5, "online": true}`),
/// which neither QGA nor our JSON-RPC params allow.
#[derive(Debug)]
pub(crate) struct ObjectOnly<T>(pub(crate) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for Object<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        d.deserialize_map(Object(std::marker::PhantomData))
            .map(Self)
    }
}

/// One entry of QGA's `mem-blks`, as a caller may send it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ChangeArgument {
    phys_index: u64,
    online: bool,
    #[serde(default, rename = "can-offline")]
    _can_offline: Option<bool>,
}

/// A call's arguments on the wire.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Arguments<'a> {
    /// `{"mem-blks": [...]}`.
    Set(&'a GuestSetMemoryBlocksArgs),
    /// `{"mem-blks": [...], "online-type": ...}`.
    SetOnlineType {
        /// The blocks to online or offline, in order.
        #[serde(rename = "mem-blks")]
        mem_blks: &'a [GuestMemoryBlock],
        /// How to online.
        #[serde(rename = "online-type")]
        online_type: GuestMemoryOnlineType,
    },
    /// `{"first": N, "count": N, "online-type"?: ..., "timeout-ms": N}`.
    WhenPresent(&'a GuestOnlineWhenPresentArgs),
    /// `{"auto-online-blocks": WORD}`.
    AutoOnline(&'a GuestAutoOnline),
}

/// A call's request on the wire.
pub type Request<'a> = qga_wire::Command<'a, Arguments<'a>>;

impl Call {
    /// Builds a call from a QGA command name and the JSON text of its `mem-blks`
    /// argument, the only argument these commands take (how JSON-RPC callers send them).
    /// Unknown names, a missing or unexpected `mem-blks`, and bad or too many entries
    /// (over `max_entries`) are refused.
    pub fn from_qga(
        name: &str,
        mem_blks: Option<&str>,
        max_entries: usize,
    ) -> Result<Self, BridgeError> {
        let call = match name {
            command::PING => Self::Ping,
            command::INFO => Self::Info,
            command::GET_MEMORY_BLOCKS => Self::GetMemoryBlocks,
            command::GET_MEMORY_BLOCK_INFO => Self::GetMemoryBlockInfo,
            command::SET_MEMORY_BLOCKS => {
                let text = mem_blks.ok_or_else(|| {
                    BridgeError::InvalidRequest(format!("{name} needs 'mem-blks'"))
                })?;
                return Ok(Self::SetMemoryBlocks(BlockChanges::from_json(
                    text,
                    max_entries,
                )?));
            }
            other => {
                return Err(BridgeError::InvalidRequest(format!(
                    "unknown command '{other}'"
                )));
            }
        };
        match mem_blks {
            Some(_) => Err(BridgeError::InvalidRequest(format!(
                "{name} takes no argument 'mem-blks'"
            ))),
            None => Ok(call),
        }
    }

    /// The QGA command name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ping => command::PING,
            Self::Info => command::INFO,
            Self::GetMemoryBlocks => command::GET_MEMORY_BLOCKS,
            Self::GetMemoryBlockInfo => command::GET_MEMORY_BLOCK_INFO,
            Self::SetMemoryBlocks(_) => command::SET_MEMORY_BLOCKS,
            Self::GetMemoryZones => command::GET_MEMORY_ZONES,
            Self::SetMemoryBlocksOnlineType(..) => command::SET_MEMORY_BLOCKS_ONLINE_TYPE,
            Self::OnlineWhenPresent(_) => command::ONLINE_WHEN_PRESENT,
            Self::SetAutoOnline(_) => command::SET_AUTO_ONLINE,
            Self::GetMemoryStats => command::GET_MEMORY_STATS,
        }
    }

    /// How long the agent itself may wait before it answers, beyond doing the work: a
    /// call's configured timeout must leave it that time.
    pub fn agent_wait(&self) -> Option<std::time::Duration> {
        match self {
            Self::OnlineWhenPresent(a) => Some(std::time::Duration::from_millis(a.timeout_ms)),
            _ => None,
        }
    }

    /// Whether the call leaves the guest as it was, so sending it twice is harmless.
    pub fn is_read(&self) -> bool {
        !matches!(
            self,
            Self::SetMemoryBlocks(_)
                | Self::SetMemoryBlocksOnlineType(..)
                | Self::OnlineWhenPresent(_)
                | Self::SetAutoOnline(_)
        )
    }

    /// Whether concurrent identical calls may share one agent call: reads without
    /// arguments, whose reply is the same for every caller. Shared calls are keyed by
    /// [`Call::name`], so a call with arguments must never be listed here.
    pub fn coalescable(&self) -> bool {
        match self {
            Self::Ping
            | Self::Info
            | Self::GetMemoryBlocks
            | Self::GetMemoryBlockInfo
            | Self::GetMemoryZones
            | Self::GetMemoryStats => true,
            Self::SetMemoryBlocks(_)
            | Self::SetMemoryBlocksOnlineType(..)
            | Self::OnlineWhenPresent(_)
            | Self::SetAutoOnline(_) => false,
        }
    }

    /// The call's arguments as JSON (QGA's own shape), for the audit trail.
    pub fn arguments(&self) -> Option<serde_json::Value> {
        self.wire_arguments()
            .and_then(|a| serde_json::to_value(a).ok())
    }

    fn wire_arguments(&self) -> Option<Arguments<'_>> {
        match self {
            Self::SetMemoryBlocks(changes) => Some(Arguments::Set(&changes.0)),
            Self::SetMemoryBlocksOnlineType(changes, online_type) => {
                Some(Arguments::SetOnlineType {
                    mem_blks: changes.blocks(),
                    online_type: *online_type,
                })
            }
            Self::OnlineWhenPresent(args) => Some(Arguments::WhenPresent(args)),
            Self::SetAutoOnline(args) => Some(Arguments::AutoOnline(args)),
            _ => None,
        }
    }

    /// The request to send, tagged with `id`.
    pub fn request(&self, id: i64) -> Request<'_> {
        Request {
            execute: self.name(),
            arguments: self.wire_arguments(),
            id: Some(id),
        }
    }

    /// Decodes the agent's `return` value into this call's reply, or says why it cannot be
    /// believed (wrong shape; set results that do not answer the request).
    pub fn decode(&self, value: Value) -> Result<Reply, String> {
        Ok(match self {
            Self::Ping => Reply::Ping(parse(value)?),
            Self::Info => Reply::Info(parse(value)?),
            Self::GetMemoryBlocks => Reply::GetMemoryBlocks(parse(value)?),
            Self::GetMemoryBlockInfo => Reply::GetMemoryBlockInfo(parse(value)?),
            Self::SetMemoryBlocks(changes) | Self::SetMemoryBlocksOnlineType(changes, _) => {
                let results: Vec<GuestMemoryBlockResponse> = parse(value)?;
                check_results(changes.blocks(), &results)?;
                Reply::SetMemoryBlocks(results)
            }
            Self::GetMemoryZones => Reply::MemoryZones(parse(value)?),
            Self::OnlineWhenPresent(args) => {
                let results: Vec<GuestMemoryBlockResponse> = parse(value)?;
                check_range(args, &results)?;
                Reply::SetMemoryBlocks(results)
            }
            Self::SetAutoOnline(_) => Reply::AutoOnline(parse(value)?),
            Self::GetMemoryStats => {
                // An object only: a derived decoder would take `[]` as a snapshot of nothing.
                let ObjectOnly(stats) = parse(value)?;
                Reply::MemoryStats(Box::new(stats))
            }
        })
    }
}

fn parse<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("reply does not match the schema: {e}"))
}

/// An online-when-present result is believed only if it names each block of the range
/// once, in index order.
fn check_range(
    args: &GuestOnlineWhenPresentArgs,
    results: &[GuestMemoryBlockResponse],
) -> Result<(), String> {
    if results.len() as u64 != args.count {
        return Err(format!(
            "{} results for a range of {} blocks",
            results.len(),
            args.count
        ));
    }
    match (args.first..)
        .zip(results)
        .find(|(i, r)| r.phys_index != *i)
    {
        Some((i, r)) => Err(format!(
            "a result is for block {}, but block {i} was expected there",
            r.phys_index
        )),
        None => Ok(()),
    }
}

/// A set result is believed only if it names the requested blocks, in request order.
fn check_results(
    requested: &[GuestMemoryBlock],
    results: &[GuestMemoryBlockResponse],
) -> Result<(), String> {
    if requested.len() != results.len() {
        return Err(format!(
            "{} results for {} requested changes",
            results.len(),
            requested.len()
        ));
    }
    match requested
        .iter()
        .zip(results)
        .position(|(c, r)| c.phys_index != r.phys_index)
    {
        Some(i) => Err(format!(
            "result {i} is for block {}, but block {} was requested there",
            results[i].phys_index, requested[i].phys_index
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use qga_wire::schema::GuestMemoryBlockResponseType;
    use serde_json::json;

    use super::*;

    fn set(changes: &[(u64, bool)]) -> Call {
        Call::SetMemoryBlocks(BlockChanges::new(changes.iter().copied(), 4096).expect("valid"))
    }

    #[test]
    fn every_name_parses_back_to_its_call() {
        for name in NAMES {
            let mem_blks = (name == command::SET_MEMORY_BLOCKS).then_some("[]");
            let call = Call::from_qga(name, mem_blks, 4096).expect("known");
            assert_eq!(call.name(), name);
        }
    }

    #[test]
    fn requests_are_qga_json() {
        let call = set(&[(32, true), (33, false)]);
        assert_eq!(
            serde_json::to_value(call.request(7)).expect("serialise"),
            json!({"execute": "guest-set-memory-blocks", "id": 7, "arguments": {"mem-blks": [
                {"phys-index": 32, "online": true}, {"phys-index": 33, "online": false}]}})
        );
        assert_eq!(
            serde_json::to_value(Call::Ping.request(1)).expect("serialise"),
            json!({"execute": "guest-ping", "id": 1})
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        let refused = |name: &str, v: Option<&str>| Call::from_qga(name, v, 4).is_err();
        assert!(refused(command::PING, Some("[]")));
        assert!(refused(command::SET_MEMORY_BLOCKS, None));
        assert!(refused(command::SET_MEMORY_BLOCKS, Some("{}")));
        assert!(refused(
            command::SET_MEMORY_BLOCKS,
            Some(r#"[{"phys-index": 1}]"#)
        ));
        assert!(refused(
            command::SET_MEMORY_BLOCKS,
            Some(r#"[{"phys-index": 1, "online": true, "x": 1}]"#)
        ));
        assert!(refused(
            command::SET_MEMORY_BLOCKS,
            Some(r#"[{"phys-index": 1, "online": true, "online": false}]"#)
        ));
        assert!(refused(
            command::SET_MEMORY_BLOCKS,
            Some(r#"[{"phys-index": 1, "online": true}, {"phys-index": 1, "online": false}]"#)
        ));
        assert!(refused(
            command::SET_MEMORY_BLOCKS,
            Some(r#"[{"phys-index": -1, "online": true}]"#)
        ));
        assert!(refused(command::SET_MEMORY_BLOCKS, Some("[] []")));
        assert!(refused("guest-exec", None));
        let ok = Call::from_qga(
            command::SET_MEMORY_BLOCKS,
            Some(r#"[{"phys-index": 1, "online": true, "can-offline": false}]"#),
            4,
        );
        assert_eq!(ok, Ok(set(&[(1, true)])));
    }

    #[test]
    fn a_list_over_the_limit_is_refused_at_the_first_entry_too_many() {
        let entry = r#"{"phys-index": 1, "online": true}"#;
        let four: Vec<String> = (0..4)
            .map(|i| format!(r#"{{"phys-index": {i}, "online": true}}"#))
            .collect();
        let text = format!("[{}]", four.join(","));
        assert!(BlockChanges::from_json(&text, 4).is_ok());
        assert!(BlockChanges::from_json(&text, 3).is_err());
        // Entry 5 of 5: refused, however malformed what follows it is.
        let long = format!("[{}, {entry}, not json at all", four.join(","));
        let err = BlockChanges::from_json(&long, 4).expect_err("too many");
        assert!(err.to_string().contains("more than 4"), "{err}");
        assert!(BlockChanges::new((0..5).map(|i| (i, true)), 4).is_err());
    }

    #[test]
    fn unknown_members_do_not_survive_decoding() {
        let reply = Call::GetMemoryBlocks
            .decode(json!([{"phys-index": 1, "online": true, "can-offline": false, "x": 9}]))
            .expect("decodes");
        assert_eq!(
            serde_json::to_value(reply).expect("serialise"),
            json!([{"phys-index": 1, "online": true, "can-offline": false}])
        );
        let pong = Call::Ping.decode(json!({"anything": 1})).expect("decodes");
        assert_eq!(serde_json::to_value(pong).expect("serialise"), json!({}));
        assert!(Call::Ping.decode(json!([])).is_err());
        assert!(
            Call::GetMemoryBlockInfo
                .decode(json!({"size": -1}))
                .is_err()
        );
    }

    #[test]
    fn set_results_must_answer_the_request() {
        let call = set(&[(32, true), (33, true)]);
        let ok = |i: u64| json!({"phys-index": i, "response": "success"});
        let reply = call.decode(json!([ok(32), ok(33)])).expect("matches");
        assert_eq!(
            reply,
            Reply::SetMemoryBlocks(vec![
                GuestMemoryBlockResponse {
                    phys_index: 32,
                    response: GuestMemoryBlockResponseType::Success,
                    error_code: None
                },
                GuestMemoryBlockResponse {
                    phys_index: 33,
                    response: GuestMemoryBlockResponseType::Success,
                    error_code: None
                },
            ])
        );
        assert!(call.decode(json!([ok(33), ok(32)])).is_err(), "reordered");
        assert!(call.decode(json!([ok(32)])).is_err(), "short");
        assert!(
            call.decode(json!([ok(32), ok(33), ok(34)])).is_err(),
            "long"
        );
        assert!(call.decode(json!([ok(32), ok(34)])).is_err(), "other block");
    }

    #[test]
    fn online_when_present_is_a_write_that_answers_its_range() {
        let call = Call::OnlineWhenPresent(GuestOnlineWhenPresentArgs {
            first: 32,
            count: 2,
            online_type: Some(GuestMemoryOnlineType::OnlineMovable),
            timeout_ms: 9000,
        });
        assert_eq!(
            serde_json::to_value(call.request(3)).expect("serialise"),
            json!({"execute": "__org.qga-bridge_online-when-present", "id": 3, "arguments":
                   {"first": 32, "count": 2, "online-type": "online_movable",
                    "timeout-ms": 9000}})
        );
        assert!(!call.is_read() && !call.coalescable());
        assert_eq!(call.agent_wait(), Some(std::time::Duration::from_secs(9)));
        assert_eq!(Call::Ping.agent_wait(), None);
        let ok = |i: u64| json!({"phys-index": i, "response": "success"});
        let nf = json!({"phys-index": 33, "response": "not-found", "error-code": 2});
        assert!(call.decode(json!([ok(32), nf])).is_ok());
        assert!(call.decode(json!([ok(33), ok(32)])).is_err(), "reordered");
        assert!(call.decode(json!([ok(32)])).is_err(), "short");
        assert!(call.decode(json!([ok(32), ok(34)])).is_err(), "other block");
    }

    #[test]
    fn the_zone_extension_is_a_typed_call_too() {
        let changes = BlockChanges::new([(32, true)], 16).expect("valid");
        let call = Call::SetMemoryBlocksOnlineType(changes, GuestMemoryOnlineType::OnlineMovable);
        assert!(!call.is_read() && !call.coalescable());
        assert_eq!(
            serde_json::to_value(call.request(3)).expect("serialise"),
            json!({"execute": "__org.qga-bridge_set-memory-blocks", "id": 3, "arguments": {
                "mem-blks": [{"phys-index": 32, "online": true}],
                "online-type": "online_movable"}})
        );
        assert!(
            call.decode(json!([{"phys-index": 33, "response": "success"}]))
                .is_err()
        );
        let zones = Call::GetMemoryZones
            .decode(json!({"blocks": [{"phys-index": 1, "online": true,
                "valid-zones": ["Movable"], "extra": 1}]}))
            .expect("decodes");
        assert_eq!(
            serde_json::to_value(zones).expect("serialise"),
            json!({"blocks": [{"phys-index": 1, "online": true, "valid-zones": ["Movable"]}]})
        );
    }

    #[test]
    fn memory_stats_are_a_shared_read_tolerant_of_what_the_bridge_does_not_know() {
        let call = Call::GetMemoryStats;
        assert!(call.is_read() && call.coalescable());
        assert!(EXTENSION_NAMES.contains(&call.name()));
        assert_eq!(
            serde_json::to_value(call.request(4)).expect("serialise"),
            json!({"execute": "__org.qga-bridge_get-memory-stats", "id": 4})
        );
        let reply = call
            .decode(
                json!({"meminfo": {"mem-total": 1024, "mem-available": 512, "new": 1},
                "vmstat": {}, "later-section": {"x": 1}, "boot-id": "b"}),
            )
            .expect("decodes");
        assert_eq!(
            serde_json::to_value(reply).expect("serialise"),
            json!({"meminfo": {"mem-total": 1024, "mem-available": 512}, "vmstat": {},
                   "boot-id": "b"})
        );
        assert!(call.decode(json!({"meminfo": {"mem-total": -1}})).is_err());
        assert!(call.decode(json!([])).is_err());
    }

    #[test]
    fn only_sets_change_the_guest() {
        assert!(Call::Info.is_read() && Call::Info.coalescable());
        let s = set(&[]);
        assert!(!s.is_read() && !s.coalescable());
    }
}
