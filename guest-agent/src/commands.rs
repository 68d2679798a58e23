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

/// Every command this agent implements, in the order `guest-info` lists them.
pub const COMMANDS: &[&str] = &[
    command::SYNC_DELIMITED,
    command::SYNC,
    command::PING,
    command::INFO,
    command::GET_MEMORY_BLOCKS,
    command::SET_MEMORY_BLOCKS,
    command::GET_MEMORY_BLOCK_INFO,
];

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

    /// Whether `name` may run.
    pub fn is_enabled(&self, name: &str) -> bool {
        if self.blocked.contains(name) {
            return false;
        }
        match &self.allowed {
            Some(allowed) => {
                allowed.contains(name) || name == command::SYNC || name == command::SYNC_DELIMITED
            }
            None => true,
        }
    }
}

/// The agent's state: where the memory tree is, how to online blocks, what is enabled.
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
        let name = req.execute.as_str();
        if !COMMANDS.contains(&name) {
            let err = QgaError::command_not_found(format!("The command {name} has not been found"));
            return encode_error(out, &err, id);
        }
        if !self.filter.is_enabled(name) {
            let err = QgaError::command_not_found(format!("Command {name} has been disabled"));
            return encode_error(out, &err, id);
        }
        if let Err(err) = self.run(name, &req.arguments, id, out) {
            encode_error(out, &err, id);
        }
    }

    fn run(
        &self,
        name: &str,
        args: &Option<Map<String, Value>>,
        id: Option<&Value>,
        out: &mut Vec<u8>,
    ) -> Result<(), QgaError> {
        match name {
            command::SYNC => encode_ok(out, &args::sync_id(args)?, id),
            command::SYNC_DELIMITED => {
                let sync = args::sync_id(args)?;
                out.push(DELIMITER);
                encode_ok(out, &sync, id);
            }
            command::PING => {
                args::none(args)?;
                encode_ok(out, &Map::new(), id);
            }
            command::INFO => {
                args::none(args)?;
                encode_ok(out, &self.info(), id);
            }
            command::GET_MEMORY_BLOCKS => {
                args::none(args)?;
                let blocks = self
                    .tree
                    .blocks()
                    .map_err(|e| QgaError::generic(e.to_string()))?;
                encode_ok(out, &blocks, id);
            }
            command::SET_MEMORY_BLOCKS => {
                let requests = args::mem_blks(args)?;
                let results =
                    self.tree
                        .set_blocks(&requests, self.online_type, self.writer.as_ref());
                encode_ok(out, &results, id);
            }
            command::GET_MEMORY_BLOCK_INFO => {
                args::none(args)?;
                let size = self
                    .tree
                    .block_size()
                    .map_err(|e| QgaError::generic(e.to_string()))?;
                encode_ok(out, &GuestMemoryBlockInfo { size }, id);
            }
            _ => {
                return Err(QgaError::command_not_found(format!(
                    "The command {name} has not been found"
                )));
            }
        }
        Ok(())
    }

    /// `guest-info`: our version and commands.
    pub fn info(&self) -> GuestAgentInfo {
        GuestAgentInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            supported_commands: COMMANDS
                .iter()
                .map(|&name| GuestAgentCommandInfo {
                    name: name.to_string(),
                    enabled: self.filter.is_enabled(name),
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
