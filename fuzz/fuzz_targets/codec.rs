//! The wire codec on arbitrary byte streams cut at arbitrary points.
//!
//! Input layout: a header byte, then (depending on it) chunk lengths, then the stream.
//! - bit 7 set: the stream is cut into chunks of `byte1 + 1` bytes each;
//! - otherwise `byte0 & 0x1f` explicit chunk lengths follow (one byte each, 0 = 256),
//!   and whatever is left after them is the last chunk;
//! - bit 6 set: the codec's maximum message size is 64 bytes instead of 4096;
//! - bit 5 set: the codec starts as a host resynchronising, with `skip_to_delimiter`.
//!   Nothing before the first `0xFF` may then be decoded.
//!
//! A seed that is a plain QGA stream just needs a leading `0x00` (no cuts).
//!
//! Invariants:
//! - decoding never panics and never fails (the codec reports bad input as frames);
//! - after the decoder has drained a chunk, its buffer holds at most the maximum message
//!   size: a peer cannot make it store more;
//! - the frames do not depend on where the stream was cut: decoding it in one piece gives
//!   the same frames;
//! - every `Frame::Value` encodes to one line of JSON that `strict::from_slice` parses
//!   back to the same value, and that the codec decodes back to exactly that one frame.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qga_fuzz::same_json as same;
use qga_wire::{Frame, QgaCodec, codec::DEFAULT_MAX_MESSAGE, strict};
use tokio_util::codec::{Decoder, Encoder};

/// How to decode: the codec's settings and where the stream is cut.
struct Plan<'a> {
    max: usize,
    resync: bool,
    chunks: Vec<&'a [u8]>,
}

/// Splits the input into the decoding plan.
fn split(data: &[u8]) -> Plan<'_> {
    let Some((&head, rest)) = data.split_first() else {
        return Plan {
            max: 4096,
            resync: false,
            chunks: Vec::new(),
        };
    };
    let mut plan = Plan {
        max: if head & 0x40 != 0 { 64 } else { 4096 },
        resync: head & 0x20 != 0,
        chunks: Vec::new(),
    };
    if head & 0x80 != 0 {
        if let Some((&size, stream)) = rest.split_first() {
            plan.chunks.extend(stream.chunks(usize::from(size) + 1));
        }
        return plan;
    }
    let cuts = usize::from(head & 0x1f).min(rest.len());
    let (lens, mut stream) = rest.split_at(cuts);
    for &len in lens {
        let len = if len == 0 { 256 } else { usize::from(len) }.min(stream.len());
        let (chunk, tail) = stream.split_at(len);
        plan.chunks.push(chunk);
        stream = tail;
    }
    plan.chunks.push(stream);
    plan
}

/// Feeds `chunks` to a fresh codec as a reader would, then ends the stream.
fn decode(max: usize, resync: bool, chunks: &[&[u8]], check_buffer: bool) -> Vec<Frame> {
    let mut codec = QgaCodec::new(max);
    if resync {
        codec.skip_to_delimiter();
    }
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).expect("decode never fails") {
            frames.push(frame);
        }
        if check_buffer {
            assert!(
                buf.len() <= max,
                "decoder keeps {} bytes, limit {max} (chunk of {})",
                buf.len(),
                chunk.len()
            );
        }
    }
    while let Some(frame) = codec.decode_eof(&mut buf).expect("decode_eof never fails") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "decode_eof leaves {} bytes", buf.len());
    frames
}

fuzz_target!(|data: &[u8]| {
    let Plan {
        max,
        resync,
        chunks,
    } = split(data);
    let frames = decode(max, resync, &chunks, true);

    let whole: Vec<u8> = chunks.concat();
    if resync {
        match whole.contains(&0xFF) {
            true => assert_eq!(frames.first(), Some(&Frame::Delimiter), "resync first"),
            false => assert_eq!(frames, [], "nothing decoded before a delimiter"),
        }
    }
    assert_eq!(
        decode(max, resync, &[&whole], false),
        frames,
        "frames depend on where the stream was cut ({} chunks)",
        chunks.len()
    );

    for frame in &frames {
        let Frame::Value(value) = frame else { continue };
        let mut out = BytesMut::new();
        QgaCodec::default()
            .encode(value, &mut out)
            .expect("a decoded value encodes");
        let (line, newline) = out.split_at(out.len() - 1);
        assert_eq!(newline, b"\n");
        assert!(!line.contains(&b'\n'), "encoding is one line");
        let back = strict::from_slice(line).expect("the encoding parses strictly");
        assert!(same(&back, value), "{back} != {value}");

        let mut again = QgaCodec::new(DEFAULT_MAX_MESSAGE);
        let mut frames = Vec::new();
        while let Some(f) = again.decode_eof(&mut out).expect("decode") {
            frames.push(f);
        }
        match &frames[..] {
            [Frame::Value(v)] => assert!(same(v, value), "{v} != {value}"),
            other => panic!("encoding of {value} decodes to {other:?}"),
        }
    }
});
