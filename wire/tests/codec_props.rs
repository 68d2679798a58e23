//! Property tests of the framing codec: the way bytes are split into reads never changes
//! what is decoded, and the decoder always recovers after garbage.

use bytes::BytesMut;
use proptest::prelude::*;
use qga_wire::{Frame, QgaCodec};
use serde_json::{Value, json};
use tokio_util::codec::Decoder;

/// Decodes `input` delivered in pieces cut at `cuts` (positions, any order, any count).
fn decode_split(input: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let mut codec = QgaCodec::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for w in points.windows(2) {
        buf.extend_from_slice(&input[w[0]..w[1]]);
        while let Some(f) = codec.decode(&mut buf).expect("decode never fails on bytes") {
            out.push(f);
        }
    }
    while let Some(f) = codec.decode_eof(&mut buf).expect("eof") {
        out.push(f);
    }
    out
}

/// Arbitrary QGA-like requests and replies, including strings with quotes, braces,
/// escapes and non-ASCII text.
fn message() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        "[a-z{}\\[\\]\"\\\\ é€-]{0,12}".prop_map(Value::from),
        Just(Value::Null),
    ];
    let tree = leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map("[a-z-]{1,8}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    ("[a-z-]{1,24}", tree, any::<Option<u32>>()).prop_map(|(name, args, id)| {
        let mut req = json!({"execute": name, "arguments": {"x": args}});
        if let Some(id) = id {
            req["id"] = json!(id);
        }
        req
    })
}

fn encode(msgs: &[Value], seps: &[String]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        bytes.extend_from_slice(serde_json::to_string(m).expect("serialize").as_bytes());
        if let Some(sep) = seps.get(i % seps.len().max(1)) {
            bytes.extend_from_slice(sep.as_bytes());
        }
    }
    bytes
}

fn values(frames: Vec<Frame>) -> Vec<Value> {
    frames
        .into_iter()
        .filter_map(|f| match f {
            Frame::Value(v) => Some(v),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Valid messages with any whitespace between them, split anywhere, decode to exactly
    /// those messages.
    #[test]
    fn any_split_of_valid_stream_yields_the_messages(
        msgs in prop::collection::vec(message(), 1..8),
        seps in prop::collection::vec("[ \t\r\n]{0,3}", 1..4),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let bytes = encode(&msgs, &seps);
        let frames = decode_split(&bytes, &cuts);
        prop_assert!(frames.iter().all(|f| matches!(f, Frame::Value(_))), "{:?}", frames);
        prop_assert_eq!(values(frames), msgs);
    }

    /// For arbitrary bytes, how they are split into reads never changes the frames.
    #[test]
    fn framing_is_independent_of_read_boundaries(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        prop_assert_eq!(decode_split(&bytes, &cuts), decode_split(&bytes, &[]));
    }

    /// After arbitrary garbage, a host's `0xFF` reset makes every later message decode.
    #[test]
    fn garbage_then_reset_recovers(
        garbage in prop::collection::vec(any::<u8>(), 0..200),
        msgs in prop::collection::vec(message(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = garbage;
        bytes.push(0xFF);
        bytes.extend(encode(&msgs, &["\n".to_string()]));
        let frames = decode_split(&bytes, &cuts);
        let last_reset = frames.iter().rposition(|f| *f == Frame::Delimiter).expect("reset seen");
        prop_assert_eq!(values(frames[last_reset + 1..].to_vec()), msgs);
    }

    /// Garbage without opening brackets or quotes, ended by a newline, is recovered from
    /// without any reset: the following messages are the last values decoded.
    #[test]
    fn garbage_line_then_messages_recovers(
        garbage in "[a-zA-Z0-9 @#$%&*!?~,:}\\]]{0,40}",
        msgs in prop::collection::vec(message(), 1..5),
    ) {
        let mut bytes = garbage.into_bytes();
        bytes.push(b'\n');
        bytes.extend(encode(&msgs, &["\n".to_string()]));
        let got = values(decode_split(&bytes, &[]));
        prop_assert!(got.len() >= msgs.len());
        prop_assert_eq!(&got[got.len() - msgs.len()..], &msgs[..]);
    }
}
