//! The bridge's JSON-RPC params decoding.
//!
//! Input: the first byte picks the method (one of `call::NAMES`, or a name the bridge does
//! not serve), the rest is the params text (lossily made UTF-8, as JSON-RPC text always is).
//!
//! Invariants:
//! - `jsonrpc::decode(method, text, 16)` never panics; every refusal is `InvalidRequest`;
//! - when it succeeds, the text is one JSON object with no duplicate keys, its `vm` is the
//!   decoded VM, `timeout-ms` (if any) is the decoded timeout and in range, and the call is
//!   the method's;
//! - a `guest-set-memory-blocks` call has at most 16 changes, no phys-index twice, and they
//!   are exactly the `mem-blks` entries of the text, in order.

#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qga_bridge::{
    BridgeError,
    call::{Call, NAMES},
    api::jsonrpc::{self, MAX_TIMEOUT_MS},
};
use qga_wire::strict;

const MAX: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, params)) = data.split_first() else {
        return;
    };
    let method = NAMES.get(usize::from(pick) % (NAMES.len() + 1)).copied();
    let method = method.unwrap_or("guest-sync");
    let text = String::from_utf8_lossy(params);

    let decoded = match jsonrpc::decode(method, &text, MAX) {
        Ok(decoded) => decoded,
        Err(BridgeError::InvalidRequest(_)) => return,
        Err(other) => panic!("decoding params failed with {other:?}, not InvalidRequest"),
    };
    assert!(NAMES.contains(&method), "{method} decoded");
    assert_eq!(decoded.call.name(), method);

    let value = strict::from_slice(text.as_bytes()).expect("accepted params are strict JSON");
    let params = value.as_object().expect("accepted params are an object");
    assert_eq!(
        params.get("vm").and_then(|v| v.as_str()),
        Some(&decoded.vm[..])
    );
    match params.get("timeout-ms") {
        None => assert_eq!(decoded.timeout, None),
        Some(ms) => {
            let ms = ms.as_u64().expect("timeout-ms is a u64");
            assert!((1..=MAX_TIMEOUT_MS).contains(&ms));
            assert_eq!(decoded.timeout, Some(Duration::from_millis(ms)));
        }
    }

    let entries = params.get("mem-blks");
    match &decoded.call {
        Call::SetMemoryBlocks(changes) => {
            let blocks = changes.blocks();
            assert!(blocks.len() <= MAX, "{} changes accepted", blocks.len());
            let mut seen = HashSet::new();
            for b in blocks {
                assert!(seen.insert(b.phys_index), "block {} twice", b.phys_index);
                assert_eq!(b.can_offline, None);
            }
            let entries = entries
                .and_then(|e| e.as_array())
                .expect("mem-blks is a list");
            assert_eq!(entries.len(), blocks.len());
            for (entry, block) in entries.iter().zip(blocks) {
                assert_eq!(entry["phys-index"].as_u64(), Some(block.phys_index));
                assert_eq!(entry["online"].as_bool(), Some(block.online));
            }
        }
        _ => assert!(entries.is_none(), "{method} accepted mem-blks"),
    }
});
