//! Argument validation with the reference agent's rules and messages.
//!
//! QEMU's QAPI input visitor reads the declared members in schema order (a missing or
//! mistyped member is reported first), then rejects any member left over. The texts are
//! not a contract for hosts, but matching them keeps our agent a true drop-in.

use qga_wire::{QgaError, schema::GuestMemoryOnlineType};
use serde_json::{Map, Value};

use crate::{
    present::{MAX_COUNT, MAX_TIMEOUT_MS},
    sysfs::OnlineType,
};

type Args = Option<Map<String, Value>>;

fn missing(name: &str) -> QgaError {
    QgaError::generic(format!("Parameter '{name}' is missing"))
}

fn unexpected(name: &str) -> QgaError {
    QgaError::generic(format!("Parameter '{name}' is unexpected"))
}

fn invalid_type(name: &str, expected: &str) -> QgaError {
    QgaError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// Rejects the first member of `map` not in `known`, naming it with `prefix`.
fn reject_unknown(map: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<(), QgaError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(unexpected(&format!("{prefix}{k}"))),
        None => Ok(()),
    }
}

/// For commands without arguments: any member is unexpected.
pub fn none(args: &Args) -> Result<(), QgaError> {
    match args {
        Some(map) => reject_unknown(map, &[], ""),
        None => Ok(()),
    }
}

/// `guest-sync` / `guest-sync-delimited`: `{"id": int}`.
pub fn sync_id(args: &Args) -> Result<i64, QgaError> {
    let map = args.as_ref().ok_or_else(|| missing("id"))?;
    let id = map.get("id").ok_or_else(|| missing("id"))?;
    let id = id.as_i64().ok_or_else(|| invalid_type("id", "integer"))?;
    reject_unknown(map, &["id"], "")?;
    Ok(id)
}

/// A QAPI `uint64`: non-negative integers, and negative ones wrapped like the reference.
fn uint64(v: &Value, name: &str) -> Result<u64, QgaError> {
    v.as_u64()
        .or_else(|| v.as_i64().map(|i| i as u64))
        .ok_or_else(|| QgaError::generic(format!("Parameter '{name}' expects uint64")))
}

fn boolean(v: &Value, name: &str) -> Result<bool, QgaError> {
    v.as_bool().ok_or_else(|| invalid_type(name, "boolean"))
}

/// The `mem-blks` member, shared by both set commands.
const MEM_BLKS: &str = "mem-blks";

/// The `online-type` member of `__org.qga-bridge_set-memory-blocks` and
/// `__org.qga-bridge_online-when-present`.
const ONLINE_TYPE: &str = "online-type";

/// `guest-set-memory-blocks`: `{"mem-blks": [{"phys-index": u64, "online": bool,
/// "can-offline"?: bool}, ...]}` as `(phys-index, online)` pairs; `can-offline` is
/// checked for type and otherwise ignored.
pub fn mem_blks(args: &Args) -> Result<Vec<(u64, bool)>, QgaError> {
    let map = args.as_ref().ok_or_else(|| missing(MEM_BLKS))?;
    let blocks = mem_blks_member(map)?;
    reject_unknown(map, &[MEM_BLKS], "")?;
    Ok(blocks)
}

/// `__org.qga-bridge_set-memory-blocks`: `{"mem-blks": [...], "online-type": "online" |
/// "online_movable" | "online_kernel"}`, both required, checked in that (schema) order and
/// worded as QAPI's input visitor words a bad enum value.
pub fn mem_blks_online_type(args: &Args) -> Result<(Vec<(u64, bool)>, OnlineType), QgaError> {
    let map = args.as_ref().ok_or_else(|| missing(MEM_BLKS))?;
    let blocks = mem_blks_member(map)?;
    let word = map.get(ONLINE_TYPE).ok_or_else(|| missing(ONLINE_TYPE))?;
    let online_type = online_type(word)?;
    reject_unknown(map, &[MEM_BLKS, ONLINE_TYPE], "")?;
    Ok((blocks, online_type))
}

/// `__org.qga-bridge_online-when-present`: `{"first": u64, "count": u64,
/// "online-type"?: ..., "timeout-ms": u64}`, checked in that (schema) order; `count` from
/// 1 to [`MAX_COUNT`], the range inside `u64`, `timeout-ms` at most [`MAX_TIMEOUT_MS`].
/// Without `online-type` the agent's `--online-type` applies.
pub fn online_when_present(args: &Args) -> Result<(u64, u64, Option<OnlineType>, u64), QgaError> {
    let map = args.as_ref().ok_or_else(|| missing("first"))?;
    let member = |name: &str| -> Result<u64, QgaError> {
        uint64(map.get(name).ok_or_else(|| missing(name))?, name)
    };
    let first = member("first")?;
    let count = member("count")?;
    if count == 0 || count > MAX_COUNT || first.checked_add(count).is_none() {
        return Err(QgaError::generic(format!(
            "Parameter 'count' must be from 1 to {MAX_COUNT}, and 'first' + 'count' must \
             not pass the largest block index"
        )));
    }
    let online_type = match map.get(ONLINE_TYPE) {
        None => None,
        Some(word) => Some(online_type(word)?),
    };
    let timeout_ms = member("timeout-ms")?;
    if timeout_ms > MAX_TIMEOUT_MS {
        return Err(QgaError::generic(format!(
            "Parameter 'timeout-ms' must be at most {MAX_TIMEOUT_MS}"
        )));
    }
    reject_unknown(map, &["first", "count", ONLINE_TYPE, "timeout-ms"], "")?;
    Ok((first, count, online_type, timeout_ms))
}

/// `__org.qga-bridge_set-auto-online`: `{"auto-online-blocks": "offline" | "online" |
/// "online_kernel" | "online_movable"}`, the word to write.
pub fn auto_online(args: &Args) -> Result<&'static str, QgaError> {
    const NAME: &str = "auto-online-blocks";
    let map = args.as_ref().ok_or_else(|| missing(NAME))?;
    let word = map.get(NAME).ok_or_else(|| missing(NAME))?;
    let word = word.as_str().ok_or_else(|| invalid_type(NAME, "string"))?;
    let word = ["offline", "online", "online_kernel", "online_movable"]
        .into_iter()
        .find(|w| *w == word)
        .ok_or_else(|| {
            QgaError::generic(format!("Parameter '{NAME}' does not accept value '{word}'"))
        })?;
    reject_unknown(map, &[NAME], "")?;
    Ok(word)
}

/// An `online-type` member's value, worded as QAPI's input visitor words a bad enum value.
fn online_type(word: &Value) -> Result<OnlineType, QgaError> {
    let word = word
        .as_str()
        .ok_or_else(|| invalid_type(ONLINE_TYPE, "string"))?;
    let online_type = GuestMemoryOnlineType::parse(word).ok_or_else(|| {
        QgaError::generic(format!(
            "Parameter '{ONLINE_TYPE}' does not accept value '{word}'"
        ))
    })?;
    Ok(online_type.into())
}

/// The `mem-blks` list of `map` as `(phys-index, online)` pairs; the caller rejects
/// members it does not know.
fn mem_blks_member(map: &Map<String, Value>) -> Result<Vec<(u64, bool)>, QgaError> {
    let list = map.get(MEM_BLKS).ok_or_else(|| missing(MEM_BLKS))?;
    let list = list
        .as_array()
        .ok_or_else(|| invalid_type(MEM_BLKS, "array"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{MEM_BLKS}[{i}]");
        let obj = entry
            .as_object()
            .ok_or_else(|| invalid_type(&at, "object"))?;
        let field = |name: &str| format!("{at}.{name}");
        let index = obj
            .get("phys-index")
            .ok_or_else(|| missing(&field("phys-index")))?;
        let index = uint64(index, &field("phys-index"))?;
        let online = obj.get("online").ok_or_else(|| missing(&field("online")))?;
        let online = boolean(online, &field("online"))?;
        if let Some(c) = obj.get("can-offline") {
            boolean(c, &field("can-offline"))?;
        }
        reject_unknown(
            obj,
            &["phys-index", "online", "can-offline"],
            &format!("{at}."),
        )?;
        out.push((index, online));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    fn desc(r: Result<impl std::fmt::Debug, QgaError>) -> String {
        r.expect_err("should fail").desc
    }

    #[test]
    fn mem_blks_rules() {
        assert_eq!(desc(mem_blks(&None)), "Parameter 'mem-blks' is missing");
        assert_eq!(
            desc(mem_blks(&args(json!({"mem-blks": 5})))),
            "Invalid parameter type for 'mem-blks', expected: array"
        );
        assert_eq!(
            desc(mem_blks(&args(json!({"mem-blks": [5]})))),
            "Invalid parameter type for 'mem-blks[0]', expected: object"
        );
        assert_eq!(
            desc(mem_blks(&args(json!({"mem-blks": [{"online": true}]})))),
            "Parameter 'mem-blks[0].phys-index' is missing"
        );
        assert_eq!(
            desc(mem_blks(&args(
                json!({"mem-blks": [{"phys-index": 1.5, "online": true}]})
            ))),
            "Parameter 'mem-blks[0].phys-index' expects uint64"
        );
        assert_eq!(
            desc(mem_blks(&args(
                json!({"mem-blks": [{"phys-index": 1, "online": true, "zzz": 1}]})
            ))),
            "Parameter 'mem-blks[0].zzz' is unexpected"
        );
        assert_eq!(
            desc(mem_blks(&args(json!({"mem-blks": [], "x": 1})))),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            mem_blks(&args(
                json!({"mem-blks": [{"phys-index": -1, "online": false, "can-offline": true}]})
            ))
            .ok(),
            Some(vec![(u64::MAX, false)])
        );
    }

    #[test]
    fn mem_blks_online_type_rules() {
        let parse = |v: Value| mem_blks_online_type(&args(v));
        assert_eq!(
            desc(mem_blks_online_type(&None)),
            "Parameter 'mem-blks' is missing"
        );
        assert_eq!(
            desc(parse(json!({"mem-blks": []}))),
            "Parameter 'online-type' is missing"
        );
        // Schema order: `mem-blks` is checked before `online-type`.
        assert_eq!(
            desc(parse(
                json!({"mem-blks": [{"phys-index": 1}], "online-type": "bogus"})
            )),
            "Parameter 'mem-blks[0].online' is missing"
        );
        assert_eq!(
            desc(parse(json!({"mem-blks": [], "online-type": "movable"}))),
            "Parameter 'online-type' does not accept value 'movable'"
        );
        assert_eq!(
            desc(parse(json!({"mem-blks": [], "online-type": 1}))),
            "Invalid parameter type for 'online-type', expected: string"
        );
        assert_eq!(
            desc(parse(
                json!({"mem-blks": [], "online-type": "online", "zzz": 1})
            )),
            "Parameter 'zzz' is unexpected"
        );
        for (word, t) in [
            ("online", OnlineType::Online),
            ("online_movable", OnlineType::OnlineMovable),
            ("online_kernel", OnlineType::OnlineKernel),
        ] {
            assert_eq!(
                parse(json!({"mem-blks": [{"phys-index": 7, "online": true}],
                             "online-type": word}))
                .ok(),
                Some((vec![(7, true)], t))
            );
        }
        // The standard command knows no `online-type`.
        assert_eq!(
            desc(mem_blks(&args(
                json!({"mem-blks": [], "online-type": "online"})
            ))),
            "Parameter 'online-type' is unexpected"
        );
    }

    #[test]
    fn sync_and_none() {
        assert_eq!(sync_id(&args(json!({"id": -5}))).ok(), Some(-5));
        assert_eq!(desc(sync_id(&None)), "Parameter 'id' is missing");
        assert_eq!(
            desc(sync_id(&args(json!({"id": "x"})))),
            "Invalid parameter type for 'id', expected: integer"
        );
        assert!(none(&args(json!({}))).is_ok());
        assert_eq!(
            desc(none(&args(json!({"a": 1})))),
            "Parameter 'a' is unexpected"
        );
    }

    #[test]
    fn online_when_present_rules() {
        let parse = |v: Value| online_when_present(&args(v));
        assert_eq!(
            desc(online_when_present(&None)),
            "Parameter 'first' is missing"
        );
        assert_eq!(
            desc(parse(json!({"first": 1, "timeout-ms": 5}))),
            "Parameter 'count' is missing"
        );
        assert_eq!(
            desc(parse(json!({"first": "1", "count": 1, "timeout-ms": 5}))),
            "Parameter 'first' expects uint64"
        );
        let range = "Parameter 'count' must be from 1 to 65536, and 'first' + 'count' must \
                     not pass the largest block index";
        for bad in [
            json!({"first": 1, "count": 0, "timeout-ms": 5}),
            json!({"first": 1, "count": 65537, "timeout-ms": 5}),
            json!({"first": -1, "count": 2, "timeout-ms": 5}),
        ] {
            assert_eq!(desc(parse(bad)), range);
        }
        assert_eq!(
            desc(parse(
                json!({"first": 1, "count": 1, "online-type": "movable"})
            )),
            "Parameter 'online-type' does not accept value 'movable'"
        );
        assert_eq!(
            desc(parse(json!({"first": 1, "count": 1}))),
            "Parameter 'timeout-ms' is missing"
        );
        assert_eq!(
            desc(parse(
                json!({"first": 1, "count": 1, "timeout-ms": 300_001})
            )),
            "Parameter 'timeout-ms' must be at most 300000"
        );
        assert_eq!(
            desc(parse(
                json!({"first": 1, "count": 1, "timeout-ms": 5, "z": 1})
            )),
            "Parameter 'z' is unexpected"
        );
        assert_eq!(
            parse(json!({"first": 32, "count": 4, "timeout-ms": 1000})).ok(),
            Some((32, 4, None, 1000))
        );
        assert_eq!(
            parse(
                json!({"first": 32, "count": 4, "online-type": "online_kernel",
                         "timeout-ms": 0})
            )
            .ok(),
            Some((32, 4, Some(OnlineType::OnlineKernel), 0))
        );
    }

    #[test]
    fn auto_online_rules() {
        let parse = |v: Value| auto_online(&args(v));
        assert_eq!(
            desc(auto_online(&None)),
            "Parameter 'auto-online-blocks' is missing"
        );
        assert_eq!(
            desc(parse(json!({"auto-online-blocks": 1}))),
            "Invalid parameter type for 'auto-online-blocks', expected: string"
        );
        assert_eq!(
            desc(parse(json!({"auto-online-blocks": "movable"}))),
            "Parameter 'auto-online-blocks' does not accept value 'movable'"
        );
        assert_eq!(
            desc(parse(json!({"auto-online-blocks": "offline", "x": 1}))),
            "Parameter 'x' is unexpected"
        );
        for word in ["offline", "online", "online_kernel", "online_movable"] {
            assert_eq!(parse(json!({"auto-online-blocks": word})).ok(), Some(word));
        }
    }
}
