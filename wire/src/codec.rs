//! Framing: a byte stream in, one [`Frame`] per JSON value out.
//!
//! QGA puts no delimiter between messages, so the decoder does what QEMU's JSON streamer
//! does: it lexes just enough (strings, escapes, scalars, brackets) to know where a value
//! ends, then hands exactly that slice to `serde_json`. Malformed input is reported as a
//! [`Frame::Invalid`] and the stream goes on, recovering at the same points as QEMU
//! (after a bad byte it skips to the next bracket or control character). The byte `0xFF`
//! anywhere resets the parser and is reported as [`Frame::Delimiter`].
//!
//! Memory is bounded: a value deeper than [`MAX_DEPTH`] or longer than the configured
//! maximum message size is reported once and the rest of it is skipped without being
//! stored, so a peer cannot make the decoder buffer more than the limit.
//!
//! Scanning is incremental: bytes already scanned are not looked at again when more
//! arrive, so a large value split into many reads costs one pass.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::Value;
use tokio_util::codec::{Decoder, Encoder};

/// The reset/delimiter byte. It never occurs in UTF-8 text.
pub const DELIMITER: u8 = 0xFF;

/// Maximum nesting of objects and arrays, as in QEMU's JSON parser.
pub const MAX_DEPTH: usize = 1024;

/// Default maximum size of one message, in bytes. A `guest-get-memory-blocks` reply for
/// 32,768 blocks is about 1.7 MB; the default leaves ample room above that.
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// One unit of the decoded stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A complete, well-formed JSON value (not necessarily an object).
    Value(Value),
    /// Malformed or over-limit input; the decoder has recovered and goes on.
    Invalid(FrameError),
    /// A `0xFF` byte: the parser was reset, any partial value discarded.
    Delimiter,
}

/// Why a stretch of input did not become a value. Each is reported once per bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The bytes form no valid JSON value.
    #[error("JSON parse error, {0}")]
    Syntax(String),
    /// A byte that cannot start any JSON token.
    #[error("JSON parse error, stray '{}'", printable(*.0))]
    Stray(u8),
    /// More than [`MAX_DEPTH`] nested objects/arrays.
    #[error("JSON nesting depth limit exceeded")]
    DepthExceeded,
    /// The value is longer than the decoder's maximum message size.
    #[error("JSON message size limit exceeded (limit {limit} bytes)")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
}

fn printable(b: u8) -> char {
    if b.is_ascii() {
        char::from(b)
    } else {
        char::REPLACEMENT_CHARACTER
    }
}

/// Transport or encoding failure; unlike [`FrameError`], the stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Reading or writing the underlying stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A message to send could not be serialised.
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where the lexer is within the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Start,
    /// Inside a string.
    Str,
    /// Right after a backslash inside a string.
    StrEscape,
    /// Inside a number or keyword (`true`, `null`, or garbage like `foo`).
    Scalar,
    /// After a stray byte: skipping to a bracket or control character, like QEMU.
    Recovery,
}

/// The QGA framing codec. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct QgaCodec {
    max_message: usize,
    lex: Lex,
    depth: usize,
    /// Bytes at the front of the buffer already scanned as part of the current value.
    scanned: usize,
    /// Skipping the rest of a value already reported as too deep or too large.
    discarding: bool,
    /// Host side: drop everything up to the next `0xFF` (see [`Self::skip_to_delimiter`]).
    seeking_delimiter: bool,
}

impl Default for QgaCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MESSAGE)
    }
}

impl QgaCodec {
    /// A codec that refuses values longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message: max_message.max(1),
            lex: Lex::Start,
            depth: 0,
            scanned: 0,
            discarding: false,
            seeking_delimiter: false,
        }
    }

    /// The maximum size of one message, in bytes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Forgets any partial value. The caller should clear its read buffer too.
    pub fn reset(&mut self) {
        let max = self.max_message;
        *self = Self::new(max);
    }

    /// Host side of resynchronisation: discard all input up to and including the next
    /// `0xFF`, which is then reported as [`Frame::Delimiter`]. Whatever an agent sent
    /// before the delimiter (stale replies, garbage) is never decoded.
    pub fn skip_to_delimiter(&mut self) {
        self.reset();
        self.seeking_delimiter = true;
    }

    /// Appends the `0xFF` delimiter byte.
    pub fn encode_delimiter(dst: &mut BytesMut) {
        dst.put_u8(DELIMITER);
    }

    /// Ends the current value at `end` and takes its bytes; `None` if it was being
    /// discarded.
    fn finish(&mut self, buf: &mut BytesMut, end: usize) -> Option<RawFrame> {
        let bytes = buf.split_to(end);
        self.scanned = 0;
        self.lex = Lex::Start;
        if std::mem::take(&mut self.discarding) {
            return None;
        }
        Some(RawFrame::Value(bytes.freeze()))
    }

    /// Reports `err`, dropping the `consumed` bytes scanned so far and skipping the rest of
    /// the current value (tracking its depth) without storing it.
    fn start_discarding(
        &mut self,
        buf: &mut BytesMut,
        consumed: usize,
        err: FrameError,
    ) -> RawFrame {
        buf.advance(consumed);
        self.scanned = 0;
        self.discarding = true;
        RawFrame::Invalid(err)
    }

    /// Reports a stray byte at `at`: drops the partial value and enters recovery.
    fn stray(&mut self, buf: &mut BytesMut, at: usize, byte: u8) -> RawFrame {
        buf.advance(at + 1);
        self.reset();
        self.lex = Lex::Recovery;
        RawFrame::Invalid(FrameError::Stray(byte))
    }
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// Parses one complete value the way QEMU does (duplicate keys refused), with QEMU's
/// error texts.
pub fn parse(bytes: &[u8]) -> Frame {
    match crate::strict::from_slice(bytes) {
        Ok(v) => Frame::Value(v),
        Err(e) => {
            let keyword = bytes.iter().all(u8::is_ascii_alphabetic);
            let message = e.to_string();
            let text = if keyword {
                format!("invalid keyword '{}'", String::from_utf8_lossy(bytes))
            } else if message.starts_with(crate::strict::DUPLICATE_KEY) {
                crate::strict::DUPLICATE_KEY.to_string()
            } else {
                message
            };
            Frame::Invalid(FrameError::Syntax(text))
        }
    }
}

/// What the scanner does after looking at one byte of the current value.
#[derive(Debug)]
enum Step {
    /// Go on to the next byte.
    Next,
    /// Look at the same byte again: it ended one token and may start the next.
    Again,
    /// The front of the buffer was dropped: scanning goes on from its new start.
    Restart,
    /// A frame is ready to hand over.
    Emit(RawFrame),
}

impl QgaCodec {
    /// Like [`Decoder::decode`], but hands over a complete value's bytes unparsed.
    pub fn decode_raw(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, CodecError> {
        if self.seeking_delimiter {
            return Ok(self.seek_delimiter(buf));
        }
        let mut i = self.scanned;
        while i < buf.len() {
            let b = buf[i];
            if b == DELIMITER {
                buf.advance(i + 1);
                self.reset();
                return Ok(Some(RawFrame::Delimiter));
            }
            match self.step(buf, i, b) {
                Step::Next => {}
                Step::Again => continue,
                Step::Restart => {
                    i = 0;
                    continue;
                }
                Step::Emit(frame) => return Ok(Some(frame)),
            }
            i += 1;
            if self.discarding {
                // Keep nothing of a value being skipped.
                buf.advance(i);
                i = 0;
            } else if i > self.max_message {
                let limit = self.max_message;
                return Ok(Some(self.start_discarding(
                    buf,
                    i,
                    FrameError::TooLarge { limit },
                )));
            }
        }
        self.scanned = i;
        Ok(None)
    }

    /// Host resynchronisation ([`Self::skip_to_delimiter`]): drops input up to and
    /// including the next `0xFF` and reports it, or drops all of `buf` if it has none.
    fn seek_delimiter(&mut self, buf: &mut BytesMut) -> Option<RawFrame> {
        match buf.iter().position(|&b| b == DELIMITER) {
            Some(p) => {
                buf.advance(p + 1);
                self.seeking_delimiter = false;
                Some(RawFrame::Delimiter)
            }
            None => {
                buf.clear();
                None
            }
        }
    }

    /// Advances the lexer over byte `b` at `i` (not the delimiter), by its current state.
    #[inline]
    fn step(&mut self, buf: &mut BytesMut, i: usize, b: u8) -> Step {
        match self.lex {
            Lex::Start => self.between_tokens(buf, i, b),
            Lex::Str => self.in_string(buf, i, b),
            Lex::StrEscape => {
                self.lex = Lex::Str;
                Step::Next
            }
            Lex::Scalar => self.in_scalar(buf, i, b),
            Lex::Recovery => self.recovering(buf, i, b),
        }
    }

    /// Between tokens: whitespace, brackets (tracking depth), separators, or the start of
    /// a string or scalar; anything else is a stray byte.
    #[inline]
    fn between_tokens(&mut self, buf: &mut BytesMut, i: usize, b: u8) -> Step {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => {
                // Between values: nothing of a value is pending, drop it.
                buf.advance(i + 1);
                Step::Restart
            }
            b' ' | b'\t' | b'\r' | b'\n' => Step::Next,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH && !self.discarding {
                    return Step::Emit(self.start_discarding(
                        buf,
                        i + 1,
                        FrameError::DepthExceeded,
                    ));
                }
                Step::Next
            }
            b'}' | b']' if self.depth == 0 => {
                misplaced(buf, i, format!("unexpected '{}'", char::from(b)))
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return self.end_value(buf, i + 1);
                }
                Step::Next
            }
            b',' | b':' if self.depth == 0 => misplaced(
                buf,
                i,
                format!("unexpected '{}', expecting value", char::from(b)),
            ),
            b',' | b':' => Step::Next,
            b'"' => {
                self.lex = Lex::Str;
                Step::Next
            }
            b if is_scalar_byte(b) => {
                self.lex = Lex::Scalar;
                Step::Next
            }
            other => Step::Emit(self.stray(buf, i, other)),
        }
    }

    /// Inside a string: only a backslash (escape) and the closing quote matter.
    #[inline]
    fn in_string(&mut self, buf: &mut BytesMut, i: usize, b: u8) -> Step {
        match b {
            b'\\' => self.lex = Lex::StrEscape,
            b'"' => {
                self.lex = Lex::Start;
                if self.depth == 0 {
                    return self.end_value(buf, i + 1);
                }
            }
            _ => {}
        }
        Step::Next
    }

    /// Inside a number or keyword: the first other byte ends it (a top-level one is a
    /// whole value) and is looked at again as the start of the next token.
    #[inline]
    fn in_scalar(&mut self, buf: &mut BytesMut, i: usize, b: u8) -> Step {
        if is_scalar_byte(b) {
            return Step::Next;
        }
        self.lex = Lex::Start;
        if self.depth == 0 {
            return self.end_value(buf, i);
        }
        Step::Again
    }

    /// After a stray byte: drops bytes until a bracket or control character, where QEMU
    /// resumes too, and resumes lexing there.
    #[inline]
    fn recovering(&mut self, buf: &mut BytesMut, i: usize, b: u8) -> Step {
        if matches!(b, b'{' | b'}' | b'[' | b']' | 0xFE) || (b < 0x20 && b != b'\t') {
            self.lex = Lex::Start;
            return Step::Again;
        }
        buf.advance(i + 1);
        Step::Restart
    }

    /// Ends a top-level value at `end`: its frame, or a restart at the new front of the
    /// buffer when the value was being discarded.
    #[inline]
    fn end_value(&mut self, buf: &mut BytesMut, end: usize) -> Step {
        match self.finish(buf, end) {
            Some(frame) => Step::Emit(frame),
            None => Step::Restart,
        }
    }
}

/// Reports a bracket or separator where no value is open: drops the input up to and
/// including it (at `at`) and hands over a syntax error with `text`.
fn misplaced(buf: &mut BytesMut, at: usize, text: String) -> Step {
    buf.advance(at + 1);
    Step::Emit(RawFrame::Invalid(FrameError::Syntax(text)))
}

impl QgaCodec {
    /// Like [`Decoder::decode_eof`], but hands over a complete value's bytes unparsed.
    pub fn decode_eof_raw(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, CodecError> {
        if let Some(frame) = self.decode_raw(buf)? {
            return Ok(Some(frame));
        }
        // A number or keyword at the very end is complete once the stream ends.
        let frame = if self.lex == Lex::Scalar && self.depth == 0 && !buf.is_empty() {
            let len = buf.len();
            self.finish(buf, len)
        } else {
            None
        };
        // Anything else left is an unfinished value nobody will complete.
        buf.clear();
        self.reset();
        Ok(frame)
    }
}

impl Decoder for QgaCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decode_raw(buf)?.map(RawFrame::parse))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decode_eof_raw(buf)?.map(RawFrame::parse))
    }
}

/// One unit of the decoded stream, a complete value still as text: what a host needs to
/// look at a reply's `id` before deciding whether to parse the rest (see [`RawCodec`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RawFrame {
    /// The bytes of one complete JSON value, not parsed (so not known to be well-formed).
    Value(Bytes),
    /// Malformed or over-limit input; the decoder has recovered and goes on.
    Invalid(FrameError),
    /// A `0xFF` byte: the parser was reset, any partial value discarded.
    Delimiter,
}

impl RawFrame {
    /// Parses a value's bytes into a [`Frame`], as [`QgaCodec`] would have.
    pub fn parse(self) -> Frame {
        match self {
            Self::Value(bytes) => parse(&bytes),
            Self::Invalid(e) => Frame::Invalid(e),
            Self::Delimiter => Frame::Delimiter,
        }
    }
}

/// [`QgaCodec`] for hosts that look at replies before parsing them: the same framing,
/// limits and recovery, but values come out as [`RawFrame::Value`] bytes.
#[derive(Debug, Clone, Default)]
pub struct RawCodec(pub QgaCodec);

impl Decoder for RawCodec {
    type Item = RawFrame;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, CodecError> {
        self.0.decode_raw(buf)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, CodecError> {
        self.0.decode_eof_raw(buf)
    }
}

impl<T: Serialize> Encoder<T> for RawCodec {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.0.encode(item, dst)
    }
}

impl<T: Serialize> Encoder<T> for QgaCodec {
    type Error = CodecError;

    /// Writes `item` as compact JSON followed by `\n`.
    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        serde_json::to_writer(dst.writer(), &item)?;
        dst.put_u8(b'\n');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode_all(codec: &mut QgaCodec, input: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).expect("decode") {
            out.push(f);
        }
        out
    }

    /// Found by the `codec` fuzz target: a number beyond u64 decoded to one float, whose
    /// encoding decoded to a neighbouring one. Float parsing is now correctly rounded, so
    /// decode, encode, decode gives the value back.
    #[test]
    fn large_numbers_survive_a_round_trip() {
        let line = b"{\"return\": {\"size\": 1410000000000000000000000000000000000000008864}}\n";
        let [Frame::Value(first)] = &frames(line)[..] else {
            panic!("one value");
        };
        let mut out = BytesMut::new();
        QgaCodec::default()
            .encode(first, &mut out)
            .expect("encodes");
        let [Frame::Value(again)] = &frames(&out)[..] else {
            panic!("one value");
        };
        assert_eq!(again, first);
    }

    fn frames(input: &[u8]) -> Vec<Frame> {
        decode_all(&mut QgaCodec::default(), input)
    }

    #[test]
    fn raw_frames_are_the_values_text_and_parse_to_the_same_frames() {
        let input: &[u8] = b"{\"return\": 1, \"id\": 2}garbage [1,\n2]\xff\"s\" 12 ";
        let mut raw = RawCodec::default();
        let mut buf = BytesMut::from(input);
        let mut got = Vec::new();
        while let Some(f) = raw.decode(&mut buf).expect("decode") {
            got.push(f);
        }
        assert_eq!(
            got[0],
            RawFrame::Value(Bytes::from_static(b"{\"return\": 1, \"id\": 2}"))
        );
        assert_eq!(got[2], RawFrame::Value(Bytes::from_static(b"[1,\n2]")));
        let parsed: Vec<Frame> = got.into_iter().map(RawFrame::parse).collect();
        assert_eq!(parsed, frames(input));
    }

    #[test]
    fn values_need_no_delimiter() {
        assert_eq!(
            frames(br#"{"a":1}{"b":[2]}  {"c":"}"}"#),
            vec![
                Frame::Value(json!({"a": 1})),
                Frame::Value(json!({"b": [2]})),
                Frame::Value(json!({"c": "}"}))
            ]
        );
    }

    #[test]
    fn braces_inside_strings_and_escapes_do_not_count() {
        assert_eq!(
            frames(br#"{"a":"\"{[","b":"\\"}"#),
            vec![Frame::Value(json!({"a": "\"{[", "b": "\\"}))]
        );
    }

    #[test]
    fn top_level_scalars_and_keywords() {
        assert_eq!(
            frames(b"\"hello\" 42 garbage\n"),
            vec![
                Frame::Value(json!("hello")),
                Frame::Value(json!(42)),
                Frame::Invalid(FrameError::Syntax("invalid keyword 'garbage'".into()))
            ]
        );
        // A trailing number is only complete at end of stream.
        let mut codec = QgaCodec::default();
        let mut buf = BytesMut::from(&b"17"[..]);
        assert_eq!(codec.decode(&mut buf).expect("decode"), None);
        assert_eq!(
            codec.decode_eof(&mut buf).expect("eof"),
            Some(Frame::Value(json!(17)))
        );
    }

    #[test]
    fn delimiter_resets_a_partial_value() {
        assert_eq!(
            frames(b"{\"execute\": \"gue\xff{\"x\":1}"),
            vec![Frame::Delimiter, Frame::Value(json!({"x": 1}))]
        );
    }

    #[test]
    fn stray_byte_recovers_at_next_bracket() {
        assert_eq!(
            frames(b"@@@ junk {\"ok\":true}"),
            vec![
                Frame::Invalid(FrameError::Stray(b'@')),
                Frame::Value(json!({"ok": true}))
            ]
        );
        assert_eq!(
            FrameError::Stray(0xFF).to_string(),
            "JSON parse error, stray '\u{FFFD}'"
        );
    }

    #[test]
    fn malformed_object_is_one_error_then_recovery() {
        assert_eq!(
            frames(b"{\"execute\" \"x\"}{\"y\":2}").len(),
            2,
            "one error, then the next value"
        );
        assert!(matches!(frames(b"}")[..], [Frame::Invalid(_)]));
    }

    #[test]
    fn depth_limit_reports_once_and_skips_the_value() {
        let mut input = vec![b'['; MAX_DEPTH + 10];
        input.extend(vec![b']'; MAX_DEPTH + 10]);
        input.extend(b"{\"next\":1}");
        assert_eq!(
            frames(&input),
            vec![
                Frame::Invalid(FrameError::DepthExceeded),
                Frame::Value(json!({"next": 1}))
            ]
        );
        let mut ok = vec![b'['; MAX_DEPTH];
        ok.extend(vec![b']'; MAX_DEPTH]);
        // serde_json's own recursion limit (128) is lower; the value is still one frame.
        assert_eq!(frames(&ok).len(), 1);
    }

    #[test]
    fn size_limit_bounds_the_buffer() {
        let mut codec = QgaCodec::new(64);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"{\"data\":\"");
        let mut got = Vec::new();
        for _ in 0..100 {
            buf.extend_from_slice(&[b'x'; 50]);
            while let Some(f) = codec.decode(&mut buf).expect("decode") {
                got.push(f);
            }
            assert!(buf.len() <= 64 + 50, "buffer grew to {}", buf.len());
        }
        buf.extend_from_slice(b"\"}{\"next\":1}");
        while let Some(f) = codec.decode(&mut buf).expect("decode") {
            got.push(f);
        }
        assert_eq!(
            got,
            vec![
                Frame::Invalid(FrameError::TooLarge { limit: 64 }),
                Frame::Value(json!({"next": 1}))
            ]
        );
    }

    #[test]
    fn skip_to_delimiter_drops_stale_input() {
        let mut codec = QgaCodec::default();
        let mut buf = BytesMut::from(&b"{\"return\": 1}\n{\"ret"[..]);
        codec.skip_to_delimiter();
        assert_eq!(codec.decode(&mut buf).expect("decode"), None);
        buf.extend_from_slice(b"urn\": 2}\xff{\"return\": 3}\n");
        assert_eq!(
            decode_all(&mut codec, &[]),
            Vec::<Frame>::new(),
            "nothing without input"
        );
        let mut got = Vec::new();
        while let Some(f) = codec.decode(&mut buf).expect("decode") {
            got.push(f);
        }
        assert_eq!(
            got,
            vec![Frame::Delimiter, Frame::Value(json!({"return": 3}))]
        );
    }

    #[test]
    fn encoder_writes_compact_json_and_newline() {
        let mut codec = QgaCodec::default();
        let mut dst = BytesMut::new();
        codec
            .encode(json!({"execute": "guest-ping"}), &mut dst)
            .expect("encode");
        QgaCodec::encode_delimiter(&mut dst);
        assert_eq!(&dst[..], b"{\"execute\":\"guest-ping\"}\n\xff");
    }
}
