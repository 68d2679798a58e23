//! Command dispatch: one request in, its encoded reply out.
//!
//! Besides QGA's commands the agent implements five QAPI downstream extensions (see
//! `qga_wire::schema`): `__org.qga-bridge_get-memory-zones`,
//! `__org.qga-bridge_set-memory-blocks`, `__org.qga-bridge_online-when-present`,
//! `__org.qga-bridge_set-auto-online` and `__org.qga-bridge_get-memory-stats`. They are
//! listed after the standard commands in `guest-info` and `-b help`, and
//! `--block-rpcs`/`--allow-rpcs` apply to them by name.
//!
//! Replies are serialised straight from the schema types into the output buffer, so a
//! reply for tens of thousands of blocks never exists as a `serde_json::Value` tree.

use std::{collections::BTreeSet, time::Duration};

use qga_wire::{
    FrameError, QgaError, Request,
    codec::{DELIMITER, Frame},
    schema::{
        GuestAgentCommandInfo, GuestAgentInfo, GuestAutoOnline, GuestMemoryBlockInfo, command,
    },
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    args,
    present::{WhenPresent, online_when_present},
    procfs::ProcFs,
    sysfs::{KernelWriter, MemoryTree, OnlineType, StateWriter},
    uevent::{BlockEvents, Polling, UeventSocket},
};

/// The name of a command this agent implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    /// `guest-sync-delimited`.
    SyncDelimited,
    /// `guest-sync`.
    Sync,
    /// `guest-ping`.
    Ping,
    /// `guest-info`.
    Info,
    /// `guest-get-memory-blocks`.
    GetMemoryBlocks,
    /// `guest-set-memory-blocks`.
    SetMemoryBlocks,
    /// `guest-get-memory-block-info`.
    GetMemoryBlockInfo,
    /// `__org.qga-bridge_get-memory-zones` (extension).
    GetMemoryZones,
    /// `__org.qga-bridge_set-memory-blocks` (extension).
    SetMemoryBlocksOnlineType,
    /// `__org.qga-bridge_online-when-present` (extension).
    OnlineWhenPresent,
    /// `__org.qga-bridge_set-auto-online` (extension).
    SetAutoOnline,
    /// `__org.qga-bridge_get-memory-stats` (extension).
    GetMemoryStats,
}

impl CommandName {
    /// Every command, in the order `guest-info` and `-b help` list them: QGA's own first,
    /// then the downstream extensions.
    pub const ALL: [Self; 12] = [
        Self::SyncDelimited,
        Self::Sync,
        Self::Ping,
        Self::Info,
        Self::GetMemoryBlocks,
        Self::SetMemoryBlocks,
        Self::GetMemoryBlockInfo,
        Self::GetMemoryZones,
        Self::SetMemoryBlocksOnlineType,
        Self::OnlineWhenPresent,
        Self::SetAutoOnline,
        Self::GetMemoryStats,
    ];

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::SyncDelimited => command::SYNC_DELIMITED,
            Self::Sync => command::SYNC,
            Self::Ping => command::PING,
            Self::Info => command::INFO,
            Self::GetMemoryBlocks => command::GET_MEMORY_BLOCKS,
            Self::SetMemoryBlocks => command::SET_MEMORY_BLOCKS,
            Self::GetMemoryBlockInfo => command::GET_MEMORY_BLOCK_INFO,
            Self::GetMemoryZones => command::GET_MEMORY_ZONES,
            Self::SetMemoryBlocksOnlineType => command::SET_MEMORY_BLOCKS_ONLINE_TYPE,
            Self::OnlineWhenPresent => command::ONLINE_WHEN_PRESENT,
            Self::SetAutoOnline => command::SET_AUTO_ONLINE,
            Self::GetMemoryStats => command::GET_MEMORY_STATS,
        }
    }

    /// Whether this is one of our QAPI downstream extensions (`__org.qga-bridge_*`), which
    /// the reference agent does not have.
    pub fn is_extension(self) -> bool {
        matches!(
            self,
            Self::GetMemoryZones
                | Self::SetMemoryBlocksOnlineType
                | Self::OnlineWhenPresent
                | Self::SetAutoOnline
                | Self::GetMemoryStats
        )
    }

    /// The command called `name`, if we implement it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// A request parsed into a command with validated arguments, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `guest-sync` echoing this id.
    Sync(i64),
    /// `guest-sync-delimited` echoing this id after a `0xFF` byte.
    SyncDelimited(i64),
    /// `guest-ping`.
    Ping,
    /// `guest-info`.
    Info,
    /// `guest-get-memory-blocks`.
    GetMemoryBlocks,
    /// `guest-set-memory-blocks` with its `(phys-index, online)` entries, in order.
    SetMemoryBlocks(Vec<(u64, bool)>),
    /// `guest-get-memory-block-info`.
    GetMemoryBlockInfo,
    /// `__org.qga-bridge_get-memory-zones`.
    GetMemoryZones,
    /// `__org.qga-bridge_set-memory-blocks`: `guest-set-memory-blocks` writing
    /// `online_type` instead of the configured `--online-type`.
    SetMemoryBlocksOnlineType {
        /// The `(phys-index, online)` entries, in order.
        blocks: Vec<(u64, bool)>,
        /// What to write to bring a block online.
        online_type: OnlineType,
    },
    /// `__org.qga-bridge_online-when-present`.
    OnlineWhenPresent {
        /// The first block.
        first: u64,
        /// How many blocks.
        count: u64,
        /// What to write to bring a block online; `None`: the configured `--online-type`.
        online_type: Option<OnlineType>,
        /// How long to wait for blocks to appear, milliseconds.
        timeout_ms: u64,
    },
    /// `__org.qga-bridge_set-auto-online` with the word to write.
    SetAutoOnline(&'static str),
    /// `__org.qga-bridge_get-memory-stats`.
    GetMemoryStats,
}

impl Command {
    /// Parses command `name` with `args`, checking in the reference's order: known, then
    /// enabled by `filter`, then the arguments.
    pub fn parse(
        name: &str,
        args: &Option<Map<String, Value>>,
        filter: &CommandFilter,
    ) -> Result<Self, QgaError> {
        let Some(kind) = CommandName::from_name(name) else {
            return Err(QgaError::command_not_found(format!(
                "The command {name} has not been found"
            )));
        };
        if !filter.is_enabled(kind) {
            return Err(QgaError::command_not_found(format!(
                "Command {name} has been disabled"
            )));
        }
        Ok(match kind {
            CommandName::Sync => Self::Sync(args::sync_id(args)?),
            CommandName::SyncDelimited => Self::SyncDelimited(args::sync_id(args)?),
            CommandName::SetMemoryBlocks => Self::SetMemoryBlocks(args::mem_blks(args)?),
            CommandName::Ping => args::none(args).map(|()| Self::Ping)?,
            CommandName::Info => args::none(args).map(|()| Self::Info)?,
            CommandName::GetMemoryBlocks => args::none(args).map(|()| Self::GetMemoryBlocks)?,
            CommandName::GetMemoryBlockInfo => {
                args::none(args).map(|()| Self::GetMemoryBlockInfo)?
            }
            CommandName::GetMemoryZones => args::none(args).map(|()| Self::GetMemoryZones)?,
            CommandName::GetMemoryStats => args::none(args).map(|()| Self::GetMemoryStats)?,
            CommandName::SetMemoryBlocksOnlineType => {
                let (blocks, online_type) = args::mem_blks_online_type(args)?;
                Self::SetMemoryBlocksOnlineType {
                    blocks,
                    online_type,
                }
            }
            CommandName::SetAutoOnline => Self::SetAutoOnline(args::auto_online(args)?),
            CommandName::OnlineWhenPresent => {
                let (first, count, online_type, timeout_ms) = args::online_when_present(args)?;
                Self::OnlineWhenPresent {
                    first,
                    count,
                    online_type,
                    timeout_ms,
                }
            }
        })
    }
}

/// Which commands are enabled: everything, minus `--block-rpcs`, restricted to
/// `--allow-rpcs` when given. `guest-sync` and `guest-sync-delimited` stay enabled under
/// an allow list, because a host cannot use the channel without them.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    blocked: BTreeSet<String>,
    allowed: Option<BTreeSet<String>>,
}

impl CommandFilter {
    /// A filter from the `-b` and `-a` lists.
    pub fn new(blocked: &[String], allowed: Option<&[String]>) -> Self {
        Self {
            blocked: blocked.iter().cloned().collect(),
            allowed: allowed.map(|a| a.iter().cloned().collect()),
        }
    }

    /// Whether `command` may run.
    pub fn is_enabled(&self, command: CommandName) -> bool {
        let name = command.name();
        if self.blocked.contains(name) {
            return false;
        }
        match &self.allowed {
            Some(allowed) => {
                allowed.contains(name)
                    || matches!(command, CommandName::Sync | CommandName::SyncDelimited)
            }
            None => true,
        }
    }
}

/// Subscribes to news of memory blocks appearing, for one
/// `__org.qga-bridge_online-when-present` call.
pub type EventSource = Box<dyn Fn() -> Box<dyn BlockEvents> + Send + Sync>;

/// The agent's state: where the memory tree and `/proc` are, how to online blocks, what
/// is enabled.
pub struct Agent {
    tree: MemoryTree,
    procfs: ProcFs,
    online_type: OnlineType,
    filter: CommandFilter,
    writer: Box<dyn StateWriter>,
    events: EventSource,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("tree", &self.tree)
            .field("procfs", &self.procfs)
            .field("online_type", &self.online_type)
            .field("filter", &self.filter)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// The kernel's uevent socket, or polling where it cannot be opened (a kernel without
/// netlink, a sandbox that forbids it): slower, never wrong.
fn kernel_events() -> Box<dyn BlockEvents> {
    match UeventSocket::open() {
        Ok(socket) => Box::new(socket),
        Err(e) => {
            tracing::warn!(error = %e, "no uevent socket: waiting for memory blocks by polling");
            Box::new(Polling)
        }
    }
}

impl Agent {
    /// An agent on `tree` writing through the kernel, reading the real `/proc`.
    pub fn new(tree: MemoryTree, online_type: OnlineType, filter: CommandFilter) -> Self {
        Self {
            tree,
            procfs: ProcFs::default(),
            online_type,
            filter,
            writer: Box::new(KernelWriter),
            events: Box::new(kernel_events),
        }
    }

    /// Reads memory stats from `procfs` instead of the real `/proc` (`--procfs-root`).
    pub fn with_procfs(mut self, procfs: ProcFs) -> Self {
        self.procfs = procfs;
        self
    }

    /// Replaces where news of appearing blocks comes from (tests script it).
    pub fn with_events(mut self, events: EventSource) -> Self {
        self.events = events;
        self
    }

    /// Replaces the `state` writer (tests inject errnos with it).
    pub fn with_writer(mut self, writer: Box<dyn StateWriter>) -> Self {
        self.writer = writer;
        self
    }

    /// Appends the reply to one decoded frame to `out`, if the frame warrants one.
    pub fn handle_frame(&self, frame: Frame, out: &mut Vec<u8>) {
        match frame {
            Frame::Value(value) => match Request::from_value(value) {
                Ok(req) => self.handle(req, out),
                Err(reply) => encode(out, &*reply),
            },
            Frame::Invalid(err) => encode_error(out, &QgaError::generic(err.to_string()), None),
            // The reference parses 0xFF as a stray byte and reports it; hosts expect that.
            Frame::Delimiter => encode_error(
                out,
                &QgaError::generic(FrameError::Stray(DELIMITER).to_string()),
                None,
            ),
        }
    }

    /// Appends the reply to `req` to `out`.
    pub fn handle(&self, req: Request, out: &mut Vec<u8>) {
        let id = req.id.as_ref();
        let result = Command::parse(&req.execute, &req.arguments, &self.filter)
            .and_then(|cmd| self.run(cmd, id, out));
        if let Err(err) = result {
            encode_error(out, &err, id);
        }
    }

    /// Runs `cmd`, appending its reply to `out` unless it fails.
    fn run(&self, cmd: Command, id: Option<&Value>, out: &mut Vec<u8>) -> Result<(), QgaError> {
        match cmd {
            Command::Sync(sync) => encode_ok(out, &sync, id),
            Command::SyncDelimited(sync) => {
                out.push(DELIMITER);
                encode_ok(out, &sync, id);
            }
            Command::Ping => encode_ok(out, &Map::new(), id),
            Command::Info => encode_ok(out, &self.info(), id),
            Command::GetMemoryBlocks => encode_ok(out, &self.tree.blocks().map_err(generic)?, id),
            Command::SetMemoryBlocks(requests) => {
                let results =
                    self.tree
                        .set_blocks(&requests, self.online_type, self.writer.as_ref());
                encode_ok(out, &results, id);
            }
            Command::GetMemoryBlockInfo => {
                let size = self.tree.block_size().map_err(generic)?;
                encode_ok(out, &GuestMemoryBlockInfo { size }, id);
            }
            Command::GetMemoryZones => encode_ok(out, &self.tree.zones().map_err(generic)?, id),
            Command::GetMemoryStats => {
                encode_ok(out, &self.procfs.memory_stats().map_err(generic)?, id);
            }
            Command::SetMemoryBlocksOnlineType {
                blocks,
                online_type,
            } => {
                let results = self
                    .tree
                    .set_blocks(&blocks, online_type, self.writer.as_ref());
                encode_ok(out, &results, id);
            }
            Command::OnlineWhenPresent {
                first,
                count,
                online_type,
                timeout_ms,
            } => {
                let req = WhenPresent {
                    first,
                    count,
                    online_type: online_type.unwrap_or(self.online_type),
                    timeout: Duration::from_millis(timeout_ms),
                };
                // Subscribed before the first look, so nothing is missed in between.
                let mut events = (self.events)();
                let results =
                    online_when_present(&self.tree, &req, self.writer.as_ref(), events.as_mut());
                encode_ok(out, &results, id);
            }
            Command::SetAutoOnline(word) => {
                let (auto_online_blocks, previous) =
                    self.tree.set_auto_online(word).map_err(generic)?;
                let reply = GuestAutoOnline {
                    auto_online_blocks,
                    previous,
                };
                encode_ok(out, &reply, id);
            }
        }
        Ok(())
    }

    /// `guest-info`: our version and commands.
    pub fn info(&self) -> GuestAgentInfo {
        GuestAgentInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            supported_commands: CommandName::ALL
                .into_iter()
                .map(|c| GuestAgentCommandInfo {
                    name: c.name().to_string(),
                    enabled: self.filter.is_enabled(c),
                    success_response: true,
                })
                .collect(),
        }
    }
}

/// A failure reading the kernel's files, as the reply's `GenericError`.
fn generic(e: impl std::fmt::Display) -> QgaError {
    QgaError::generic(e.to_string())
}

#[derive(Serialize)]
struct OkReply<'a, T> {
    #[serde(rename = "return")]
    ret: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrReply<'a> {
    error: &'a QgaError,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

fn encode<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let start = out.len();
    if serde_json::to_writer(&mut *out, value).is_err() {
        // Our own types always serialise; should one ever not, say so instead of
        // sending half a message.
        out.truncate(start);
        let err = QgaError::generic("internal error: reply could not be encoded");
        let _ = serde_json::to_writer(
            &mut *out,
            &ErrReply {
                error: &err,
                id: None,
            },
        );
    }
    out.push(b'\n');
}

fn encode_ok<T: Serialize>(out: &mut Vec<u8>, ret: &T, id: Option<&Value>) {
    encode(out, &OkReply { ret, id });
}

fn encode_error(out: &mut Vec<u8>, error: &QgaError, id: Option<&Value>) {
    encode(out, &ErrReply { error, id });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_listing_order() {
        for c in CommandName::ALL {
            assert_eq!(CommandName::from_name(c.name()), Some(c));
        }
        assert_eq!(CommandName::from_name("guest-nope"), None);
        assert_eq!(CommandName::ALL[0].name(), command::SYNC_DELIMITED);
    }

    #[test]
    fn parse_checks_known_then_enabled_then_arguments() {
        let filter = CommandFilter::new(&["guest-ping".to_string()], None);
        let args = serde_json::json!({"a": 1}).as_object().cloned();
        let desc = |r: Result<Command, QgaError>| r.expect_err("should fail").desc;
        assert_eq!(
            desc(Command::parse("guest-nope", &args, &filter)),
            "The command guest-nope has not been found"
        );
        assert_eq!(
            desc(Command::parse("guest-ping", &args, &filter)),
            "Command guest-ping has been disabled"
        );
        assert_eq!(
            desc(Command::parse("guest-info", &args, &filter)),
            "Parameter 'a' is unexpected"
        );
        assert_eq!(
            Command::parse("guest-info", &None, &filter).ok(),
            Some(Command::Info)
        );
    }

    /// The extensions on a fake sysfs tree, through [`Agent::handle`].
    mod extensions {
        use std::fs;

        use qga_testkit::FakeSysfs;
        use serde_json::json;

        use super::*;

        const ZONES: &str = command::GET_MEMORY_ZONES;
        const SET: &str = command::SET_MEMORY_BLOCKS_ONLINE_TYPE;
        const STATS: &str = command::GET_MEMORY_STATS;

        fn agent(tree: &FakeSysfs, filter: CommandFilter) -> Agent {
            Agent::new(MemoryTree::new(tree.root()), OnlineType::Online, filter)
        }

        /// Sends `{"execute": name, "arguments": args}` and returns the one reply.
        fn call(agent: &Agent, name: &str, args: Option<Value>) -> Value {
            let mut req = json!({ "execute": name });
            if let Some(args) = args {
                req["arguments"] = args;
            }
            let req = Request::from_value(req).expect("valid request");
            let mut out = Vec::new();
            agent.handle(req, &mut out);
            assert_eq!(out.last(), Some(&b'\n'), "one reply line");
            serde_json::from_slice(&out).expect("one JSON reply")
        }

        fn write(tree: &FakeSysfs, path: &str, text: &str) {
            let path = tree.root().join(path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).expect("mkdir");
            }
            fs::write(path, text).expect("write");
        }

        fn by_index(reply: &Value) -> Vec<Value> {
            let mut blocks = reply["return"]["blocks"]
                .as_array()
                .expect("blocks")
                .clone();
            blocks.sort_by_key(|b| b["phys-index"].as_u64());
            blocks
        }

        #[test]
        fn zones_of_online_and_offline_blocks() {
            let tree = FakeSysfs::new();
            tree.block(0, Some("online"), Some("1"))
                .block(1, Some("online"), Some("1"))
                .block(32, Some("offline"), Some("1"))
                .block(33, Some("going-offline"), Some("0"));
            let mem = "devices/system/memory";
            write(&tree, &format!("{mem}/memory0/valid_zones"), "DMA\n");
            write(&tree, &format!("{mem}/memory1/valid_zones"), "none\n");
            write(
                &tree,
                &format!("{mem}/memory32/valid_zones"),
                "Normal Movable\n",
            );
            write(&tree, &format!("{mem}/memory33/valid_zones"), "Movable\n");
            // A block the kernel is still adding: no node yet, so its zones are not read
            // (reading them then oopses Linux 6.1).
            tree.block(34, Some("offline"), Some("1"));
            write(&tree, &format!("{mem}/memory34/valid_zones"), "Normal\n");
            fs::remove_dir(tree.memory_dir().join("memory34/node0")).expect("rm node");
            write(&tree, &format!("{mem}/auto_online_blocks"), "offline\n");
            let params = "module/memory_hotplug/parameters";
            write(&tree, &format!("{params}/online_policy"), "auto-movable\n");
            write(&tree, &format!("{params}/auto_movable_ratio"), "301\n");
            let reply = call(&agent(&tree, CommandFilter::default()), ZONES, None);
            assert_eq!(reply["return"]["auto-online-blocks"], "offline");
            assert_eq!(reply["return"]["online-policy"], "auto-movable");
            assert_eq!(reply["return"]["auto-movable-ratio"], 301);
            assert_eq!(
                by_index(&reply),
                vec![
                    json!({"phys-index": 0, "online": true, "valid-zones": ["DMA"],
                           "removable": true}),
                    json!({"phys-index": 1, "online": true, "valid-zones": ["none"],
                           "removable": true}),
                    json!({"phys-index": 32, "online": false,
                           "valid-zones": ["Normal", "Movable"], "removable": true}),
                    json!({"phys-index": 33, "online": false, "valid-zones": ["Movable"],
                           "removable": false}),
                    json!({"phys-index": 34, "online": false, "removable": true}),
                ]
            );
            // The reply decodes as the schema type the bridge uses.
            let typed: qga_wire::schema::GuestMemoryZones =
                serde_json::from_value(reply["return"].clone()).expect("schema type");
            assert_eq!(typed.blocks.len(), 5);
        }

        #[test]
        fn zones_leave_unreadable_members_absent() {
            let tree = FakeSysfs::new();
            tree.block(0, Some("online"), None) // no removable, no valid_zones
                .block(5, None, Some("1")); // no state: online
            let mem = "devices/system/memory";
            // Unreadable (a directory), empty, or not a number: absent, not an error.
            fs::create_dir(tree.memory_dir().join("memory5/valid_zones")).expect("mkdir");
            write(&tree, &format!("{mem}/auto_online_blocks"), "");
            let params = "module/memory_hotplug/parameters";
            write(&tree, &format!("{params}/auto_movable_ratio"), "lots\n");
            let reply = call(&agent(&tree, CommandFilter::default()), ZONES, None);
            let members: Vec<&String> = reply["return"]
                .as_object()
                .expect("object")
                .keys()
                .collect();
            assert_eq!(members, ["blocks"], "no policy member");
            assert_eq!(
                by_index(&reply),
                vec![
                    json!({"phys-index": 0, "online": true}),
                    json!({"phys-index": 5, "online": true, "removable": true}),
                ]
            );
        }

        #[test]
        fn zones_without_a_memory_tree_or_with_arguments() {
            let tree = FakeSysfs::new();
            tree.remove_memory_dir();
            let params = "module/memory_hotplug/parameters";
            write(&tree, &format!("{params}/online_policy"), "contig-zones\n");
            let agent = agent(&tree, CommandFilter::default());
            assert_eq!(
                call(&agent, ZONES, None),
                json!({"return": {"online-policy": "contig-zones", "blocks": []}})
            );
            assert_eq!(
                call(&agent, ZONES, Some(json!({"x": 1}))),
                json!({"error": {"class": "GenericError",
                                 "desc": "Parameter 'x' is unexpected"}})
            );
            // Like guest-get-memory-blocks: a tree without blocks is an error.
            fs::create_dir_all(tree.memory_dir()).expect("mkdir");
            assert_eq!(
                call(&agent, ZONES, None),
                call(&agent, command::GET_MEMORY_BLOCKS, None)
            );
        }

        #[test]
        fn set_writes_the_requested_online_type() {
            for word in ["online", "online_movable", "online_kernel"] {
                let tree = FakeSysfs::with_blocks(3, "offline");
                tree.set_state(2, "online");
                // The configured --online-type (online) does not apply.
                let agent = agent(&tree, CommandFilter::default());
                let reply = call(
                    &agent,
                    SET,
                    Some(json!({"mem-blks": [
                        {"phys-index": 0, "online": true},
                        {"phys-index": 2, "online": false},
                        {"phys-index": 9, "online": true},
                    ], "online-type": word})),
                );
                assert_eq!(
                    reply,
                    json!({"return": [
                        {"phys-index": 0, "response": "success"},
                        {"phys-index": 2, "response": "success"},
                        {"phys-index": 9, "response": "not-found", "error-code": 2},
                    ]})
                );
                assert_eq!(tree.state(0), word);
                assert_eq!(tree.state(1), "offline");
                assert_eq!(tree.state(2), "offline");
            }
        }

        #[test]
        fn set_matches_the_standard_command() {
            let requests = json!([
                {"phys-index": 1, "online": true},
                {"phys-index": 0, "online": false, "can-offline": true},
                {"phys-index": 5, "online": false},
                {"phys-index": -1, "online": true},
            ]);
            let run = |name: &str, args: Value| {
                let tree = FakeSysfs::with_blocks(2, "offline");
                tree.set_state(0, "online").block(5, None, Some("1"));
                let reply = call(&agent(&tree, CommandFilter::default()), name, Some(args));
                (reply, tree.state(0), tree.state(1))
            };
            assert_eq!(
                run(SET, json!({"mem-blks": requests, "online-type": "online"})),
                run(command::SET_MEMORY_BLOCKS, json!({"mem-blks": requests}))
            );
        }

        #[test]
        fn bad_online_type_is_rejected_and_nothing_written() {
            let tree = FakeSysfs::with_blocks(1, "offline");
            let agent = agent(&tree, CommandFilter::default());
            for (online_type, desc) in [
                (
                    Some(json!("movable")),
                    "Parameter 'online-type' does not accept value 'movable'",
                ),
                (
                    Some(json!(true)),
                    "Invalid parameter type for 'online-type', expected: string",
                ),
                (None, "Parameter 'online-type' is missing"),
            ] {
                let mut args = json!({"mem-blks": [{"phys-index": 0, "online": true}]});
                if let Some(t) = online_type {
                    args["online-type"] = t;
                }
                assert_eq!(
                    call(&agent, SET, Some(args)),
                    json!({"error": {"class": "GenericError", "desc": desc}})
                );
                assert_eq!(tree.state(0), "offline");
            }
        }

        #[test]
        fn set_auto_online_writes_the_word_and_reads_it_back() {
            let tree = FakeSysfs::with_blocks(1, "online");
            write(
                &tree,
                "devices/system/memory/auto_online_blocks",
                "offline\n",
            );
            let agent = agent(&tree, CommandFilter::default());
            let set = command::SET_AUTO_ONLINE;
            assert_eq!(
                call(
                    &agent,
                    set,
                    Some(json!({"auto-online-blocks": "online_movable"}))
                ),
                json!({"return": {"auto-online-blocks": "online_movable",
                                  "previous": "offline"}})
            );
            assert_eq!(
                call(&agent, ZONES, None)["return"]["auto-online-blocks"],
                "online_movable"
            );
            assert_eq!(
                call(&agent, set, Some(json!({"auto-online-blocks": "movable"}))),
                json!({"error": {"class": "GenericError",
                    "desc": "Parameter 'auto-online-blocks' does not accept value 'movable'"}})
            );
            // A kernel without the file (no memory hotplug): the write's error.
            fs::remove_file(tree.memory_dir().join("auto_online_blocks")).expect("rm");
            fs::create_dir(tree.memory_dir().join("auto_online_blocks")).expect("mkdir");
            let reply = call(&agent, set, Some(json!({"auto-online-blocks": "offline"})));
            assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
            assert!(
                reply["error"]["desc"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("write sysfs file \"auto_online_blocks\"")),
                "{reply}"
            );
        }

        #[test]
        fn listed_in_guest_info_after_the_standard_commands() {
            let tree = FakeSysfs::with_blocks(1, "online");
            let reply = call(&agent(&tree, CommandFilter::default()), "guest-info", None);
            let names: Vec<&str> = reply["return"]["supported_commands"]
                .as_array()
                .expect("list")
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            assert_eq!(names.len(), CommandName::ALL.len());
            assert_eq!(
                &names[names.len() - 5..],
                [
                    ZONES,
                    SET,
                    command::ONLINE_WHEN_PRESENT,
                    command::SET_AUTO_ONLINE,
                    STATS,
                ]
            );
            for c in CommandName::ALL {
                assert_eq!(c.is_extension(), c.name().starts_with("__org.qga-bridge_"));
            }
            assert!(
                CommandName::ALL
                    .windows(2)
                    .all(|w| !w[0].is_extension() || w[1].is_extension()),
                "extensions come last"
            );
        }

        #[test]
        fn blocked_and_allowed_by_name() {
            let tree = FakeSysfs::with_blocks(1, "offline");
            let set_args = json!({"mem-blks": [{"phys-index": 0, "online": true}],
                                  "online-type": "online_movable"});
            let blocked = agent(
                &tree,
                CommandFilter::new(&[ZONES.to_string(), SET.to_string()], None),
            );
            for (name, args) in [(ZONES, None), (SET, Some(set_args.clone()))] {
                assert_eq!(
                    call(&blocked, name, args),
                    json!({"error": {"class": "CommandNotFound",
                                     "desc": format!("Command {name} has been disabled")}})
                );
            }
            assert_eq!(tree.state(0), "offline");
            let info = blocked.info();
            for c in &info.supported_commands {
                assert_eq!(c.enabled, c.name != ZONES && c.name != SET, "{}", c.name);
            }
            // An allow list naming one extension enables just that one (and the syncs).
            let allowed = agent(&tree, CommandFilter::new(&[], Some(&[SET.to_string()])));
            assert_eq!(
                call(&allowed, ZONES, None)["error"]["class"],
                "CommandNotFound"
            );
            assert_eq!(
                call(&allowed, SET, Some(set_args))["return"][0]["response"],
                "success"
            );
            assert_eq!(tree.state(0), "online_movable");
        }

        /// An agent whose `/proc` is a fake tree holding `meminfo` only, beside `tree`.
        fn stats_agent(tree: &FakeSysfs, filter: CommandFilter) -> Agent {
            write(
                tree,
                "proc/meminfo",
                "MemTotal: 1024 kB\nMemAvailable: 512 kB\n",
            );
            agent(tree, filter).with_procfs(ProcFs::new(&tree.root().join("proc")))
        }

        #[test]
        fn memory_stats_of_a_fake_proc() {
            let tree = FakeSysfs::with_blocks(1, "online");
            let agent = stats_agent(&tree, CommandFilter::default());
            // Only meminfo: everything else absent, the sections that are objects empty.
            assert_eq!(
                call(&agent, STATS, None),
                json!({"return": {"meminfo": {"mem-total": 1_048_576, "mem-available": 524_288},
                                  "vmstat": {}}})
            );
            write(&tree, "proc/vmstat", "oom_kill 0\nallocstall_normal 4\n");
            write(&tree, "proc/uptime", "1.50 0.00\n");
            let reply = call(&agent, STATS, None);
            let typed: qga_wire::schema::GuestMemoryStats =
                serde_json::from_value(reply["return"].clone()).expect("schema type");
            assert_eq!(
                (typed.vmstat.oom_kill, typed.vmstat.allocstall),
                (Some(0), Some(4))
            );
            assert_eq!((typed.uptime_ms, typed.pressure), (Some(1_500), None));
            assert_eq!(
                call(&agent, STATS, Some(json!({"x": 1}))),
                json!({"error": {"class": "GenericError",
                                 "desc": "Parameter 'x' is unexpected"}})
            );
            fs::remove_file(tree.root().join("proc/meminfo")).expect("rm");
            let reply = call(&agent, STATS, None);
            assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
            let desc = reply["error"]["desc"].as_str().unwrap_or_default();
            assert!(
                desc.ends_with("meminfo: No such file or directory"),
                "{reply}"
            );
        }

        #[test]
        fn memory_stats_blocked_and_allowed_by_name() {
            let tree = FakeSysfs::with_blocks(1, "online");
            let blocked = stats_agent(&tree, CommandFilter::new(&[STATS.to_string()], None));
            assert_eq!(
                call(&blocked, STATS, None),
                json!({"error": {"class": "CommandNotFound",
                                 "desc": format!("Command {STATS} has been disabled")}})
            );
            let info = blocked.info();
            for c in &info.supported_commands {
                assert_eq!(c.enabled, c.name != STATS, "{}", c.name);
            }
            let allowed = stats_agent(&tree, CommandFilter::new(&[], Some(&[STATS.to_string()])));
            assert_eq!(
                call(&allowed, STATS, None)["return"]["meminfo"]["mem-total"],
                1_048_576
            );
            assert_eq!(
                call(&allowed, ZONES, None)["error"]["class"],
                "CommandNotFound"
            );
        }
    }
}
