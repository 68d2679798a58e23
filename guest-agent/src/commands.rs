//! Command dispatch: one request in, its encoded reply out.
//!
//! Replies are serialised straight from the schema types into the output buffer, so a
//! reply for tens of thousands of blocks never exists as a `serde_json::Value` tree.

use std::collections::BTreeSet;

use qga_wire::{
    FrameError, QgaError, Request,
    codec::{DELIMITER, Frame},
    schema::{GuestAgentCommandInfo, GuestAgentInfo, GuestMemoryBlockInfo, command},
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    args,
    sysfs::{KernelWriter, MemoryTree, OnlineType, StateWriter},
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
}

impl CommandName {
    /// Every command, in the order `guest-info` and `-b help` list them.
    pub const ALL: [Self; 7] = [
        Self::SyncDelimited,
        Self::Sync,
        Self::Ping,
        Self::Info,
        Self::GetMemoryBlocks,
        Self::SetMemoryBlocks,
        Self::GetMemoryBlockInfo,
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
        }
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

/// The agent's state: where the memory tree is, how to online blocks, what is enabled.
#[derive(Debug)]
pub struct Agent {
    tree: MemoryTree,
    online_type: OnlineType,
    filter: CommandFilter,
    writer: Box<dyn StateWriter>,
}

impl Agent {
    /// An agent on `tree` writing through the kernel.
    pub fn new(tree: MemoryTree, online_type: OnlineType, filter: CommandFilter) -> Self {
        Self {
            tree,
            online_type,
            filter,
            writer: Box::new(KernelWriter),
        }
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
        let generic = |e: crate::sysfs::SysfsError| QgaError::generic(e.to_string());
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
}
