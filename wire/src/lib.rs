//! The QEMU Guest Agent (QGA) wire protocol, shared by the in-guest agent and the host bridge.
//!
//! QGA is a stream of JSON objects with no delimiter between them. A host sends
//! `{"execute": NAME, "arguments": {...}, "id": ANY}`; the agent answers each with
//! `{"return": VALUE}` or `{"error": {"class": CLASS, "desc": TEXT}}`, echoing `id`.
//! The byte `0xFF`, which never occurs in UTF-8 JSON, resets the agent's parser and
//! prefixes the reply to `guest-sync-delimited`, which is how hosts resynchronise.
//!
//! - [`codec`]: [`QgaCodec`], a `tokio_util` `Decoder`/`Encoder` that splits a byte stream
//!   into JSON values, reports `0xFF` and malformed input as frames, and bounds memory.
//! - [`message`]: requests (as hosts send them, and as agents validate them), replies and
//!   error classes.
//! - [`schema`]: the QAPI types of the memory-block commands, of `guest-info` and of
//!   `qga-agent`'s extensions (`__org.qga-bridge_*`: zones, onlining, memory stats).
//! - [`strict`]: JSON parsing that, like QEMU, rejects duplicate object keys.
//! - [`connect`] (feature `connect`): where connections' byte streams come from.
//! - [`backoff`] and [`sync`]: the workspace's one retry backoff and one lock policy.

pub mod backoff;
pub mod codec;
#[cfg(feature = "connect")]
pub mod connect;
pub mod message;
pub mod schema;
pub mod strict;
pub mod sync;

pub use codec::{CodecError, Frame, FrameError, QgaCodec, RawCodec, RawFrame};
pub use message::{Command, ErrorClass, QgaError, Request, Response};
