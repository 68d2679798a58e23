//! The agent's request handling on arbitrary byte streams.
//!
//! The input is what a host writes to the agent's port. It is decoded with the wire codec
//! (max message 4096) and every frame is answered by an [`Agent`] over sysfs and procfs
//! roots that do not exist, with a state writer that panics, so nothing is ever written.
//!
//! Invariants, per frame:
//! - exactly one reply, one line of JSON, `0xFF`-prefixed only for `guest-sync-delimited`;
//! - the reply parses strictly and is a well-formed QGA reply (`return` xor `error`);
//! - `id` is echoed exactly when the request was an object with an `id`;
//! - the outcome is what `Request::from_value` and `Command::parse` say: their error when
//!   they refuse, the sync id for the sync commands, `{}` for `guest-ping`, one
//!   `operation-not-supported` result per requested block and no blocks listed (no tree,
//!   as qemu-ga), an error for the block size and for the memory stats (no `meminfo`),
//!   `guest-info` always;
//!
//! and for the whole reply stream: a host's codec decodes it to exactly one reply per
//! request frame.

#![no_main]

use std::{os::fd::BorrowedFd, path::Path};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qga_agent::{
    Agent, Command, CommandFilter, MemoryTree, OnlineType, ProcFs, StateWriter,
    uevent::{BlockEvents, News},
};
use qga_fuzz::same_json;
use qga_wire::{
    ErrorClass, Frame, QgaCodec, QgaError, Request,
    message::{Outcome, Response},
    strict,
};
use rustix::io::Errno;
use serde_json::{Value, json};
use tokio_util::codec::Decoder;

/// A sysfs root that does not exist, and the procfs root under it.
const ROOT: &str = "/nonexistent/qga-fuzz-sysfs";

#[derive(Debug)]
struct NoWrites;

/// No uevents ever: `__org.qga-bridge_online-when-present` looks once and answers.
struct NoEvents;

impl BlockEvents for NoEvents {
    fn wait(&mut self, _until: std::time::Instant) -> News {
        News::TimedOut
    }
}

impl StateWriter for NoWrites {
    fn write_state(&self, _: BorrowedFd<'_>, index: u64, value: &str) -> Result<(), Errno> {
        panic!("the agent wrote {value:?} for block {index} although there is no tree");
    }
}

fn frames(data: &[u8], codec: &mut QgaCodec) -> Vec<Frame> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    while let Some(f) = codec.decode_eof(&mut buf).expect("decoding never fails") {
        out.push(f);
    }
    out
}

/// The reply the agent must give to `frame`, as far as it is known without a tree:
/// (whether it is `0xFF`-prefixed, the outcome when exactly known, the id).
fn expected(frame: &Frame) -> (bool, Option<Outcome>, Option<Value>, Option<Command>) {
    let value = match frame {
        Frame::Invalid(err) => {
            let outcome = Outcome::Error(QgaError::generic(err.to_string()));
            return (false, Some(outcome), None, None);
        }
        Frame::Delimiter => return (false, None, None, None),
        Frame::Value(value) => value,
    };
    let id = value.as_object().and_then(|o| o.get("id")).cloned();
    let req = match Request::from_value(value.clone()) {
        Ok(req) => req,
        Err(reply) => {
            assert_eq!(reply.id, id, "from_value keeps the id");
            return (false, Some(reply.outcome), id, None);
        }
    };
    assert_eq!(req.id, id);
    let cmd = match Command::parse(&req.execute, &req.arguments, &CommandFilter::default()) {
        Ok(cmd) => cmd,
        Err(e) => return (false, Some(Outcome::Error(e)), id, None),
    };
    let outcome = match &cmd {
        Command::Sync(n) | Command::SyncDelimited(n) => Some(Outcome::Return(json!(n))),
        Command::Ping => Some(Outcome::Return(json!({}))),
        Command::SetMemoryBlocks(blocks) | Command::SetMemoryBlocksOnlineType { blocks, .. } => {
            Some(Outcome::Return(Value::Array(
                blocks
                    .iter()
                    .map(|&(index, _)| {
                        json!({"phys-index": index, "response": "operation-not-supported",
                           "error-code": 2})
                    })
                    .collect(),
            )))
        }
        // Like qemu-ga: no memory directory at all lists no blocks.
        Command::GetMemoryBlocks => Some(Outcome::Return(json!([]))),
        Command::GetMemoryZones => Some(Outcome::Return(json!({"blocks": []}))),
        // No tree: every block of the range is answered at once, as the set does.
        Command::OnlineWhenPresent { first, count, .. } => Some(Outcome::Return(Value::Array(
            (*first..first + count)
                .map(|index| {
                    json!({"phys-index": index, "response": "operation-not-supported",
                           "error-code": 2})
                })
                .collect(),
        ))),
        Command::Info
        | Command::GetMemoryBlockInfo
        | Command::SetAutoOnline(_)
        | Command::GetMemoryStats => None,
    };
    let delimited = matches!(cmd, Command::SyncDelimited(_));
    (delimited, outcome, id, Some(cmd))
}

fuzz_target!(|data: &[u8]| {
    let agent = Agent::new(
        MemoryTree::new(Path::new(ROOT)),
        OnlineType::OnlineMovable,
        CommandFilter::default(),
    )
    .with_procfs(ProcFs::new(&Path::new(ROOT).join("proc")))
    .with_writer(Box::new(NoWrites))
    .with_events(Box::new(|| Box::new(NoEvents)));

    let input = frames(data, &mut QgaCodec::new(4096));
    let mut stream = Vec::new();
    for frame in &input {
        let mut out = Vec::new();
        agent.handle_frame(frame.clone(), &mut out);
        stream.extend_from_slice(&out);

        let (delimited, outcome, id, cmd) = expected(frame);
        let line = match out.split_first() {
            Some((&0xFF, rest)) if delimited => rest,
            _ => {
                assert!(!delimited, "no 0xFF before a guest-sync-delimited reply");
                &out[..]
            }
        };
        assert_eq!(line.last(), Some(&b'\n'), "reply ends with a newline");
        let line = &line[..line.len() - 1];
        assert!(
            !line.contains(&b'\n') && !line.contains(&0xFF),
            "reply is one line"
        );
        let value = strict::from_slice(line).expect("reply is strict JSON");
        let reply = Response::from_value(value.clone()).expect("reply is a well-formed reply");

        match (&reply.id, &id) {
            (None, None) => {}
            (Some(got), Some(want)) => assert!(same_json(got, want), "id {got} != {want}"),
            (got, want) => panic!("reply id {got:?}, request id {want:?}"),
        }
        match (&reply.outcome, &outcome) {
            (Outcome::Return(got), Some(Outcome::Return(want))) => {
                assert_eq!(got, want, "for {cmd:?}")
            }
            (Outcome::Error(got), Some(Outcome::Error(want))) => assert_eq!(got, want),
            (got, Some(want)) => panic!("reply {got:?}, expected {want:?}"),
            (Outcome::Error(e), None) => {
                assert_eq!(e.class, ErrorClass::GenericError);
                if let Some(cmd) = &cmd {
                    assert!(
                        !matches!(cmd, Command::Info),
                        "guest-info needs no tree: {e:?}"
                    );
                }
            }
            (Outcome::Return(v), None) => assert!(
                matches!(cmd, Some(Command::Info)) && v.get("supported_commands").is_some(),
                "unexpected success {v} for {cmd:?}"
            ),
        }
    }

    // A host reading the replies sees exactly one per request frame.
    let replies = frames(&stream, &mut QgaCodec::default());
    let values = replies
        .iter()
        .filter(|f| matches!(f, Frame::Value(_)))
        .count();
    assert_eq!(values, input.len(), "one reply per frame");
    assert!(
        replies
            .iter()
            .all(|f| matches!(f, Frame::Value(_) | Frame::Delimiter)),
        "host decodes only replies and delimiters: {replies:?}"
    );
});
