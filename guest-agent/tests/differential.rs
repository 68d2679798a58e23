//! Differential test: `qga-agent` against the reference `qemu-ga` on identical fake trees.
//!
//! The reference is Debian's `qemu-guest-agent`; it reads the real path
//! `/sys/devices/system/memory`, so it runs in a private mount namespace with the fake tree
//! bind-mounted there (root and `unshare` needed — `./scripts/setup` installs it, CI runs as
//! root). Missing prerequisites make these tests fail, never skip.
//!
//! Both agents get the same requests; replies are compared after normalising only what the
//! protocol leaves open (block order). Deliberate divergences are listed in [`Divergence`]
//! and applied explicitly where they occur.

use qga_testkit::{AgentKind, AgentProcess, FakeSysfs, Node, QgaClient};
use serde_json::{Value, json};

/// Where our agent deliberately differs from qemu-ga 7.2.
#[derive(Debug, Clone, Copy)]
enum Divergence {
    /// `memoryfoo`-style directories: the reference parses the suffix with strtoul and
    /// reports phys-index 0 (a duplicate); we skip names without a decimal suffix.
    OddNamesSkipped,
    /// With `state` missing and `online: true`, the reference answers `success` plus a
    /// stale `error-code: 2`; the schema says error-code is omitted on success.
    NoErrorCodeOnSuccess,
    /// `guest-info`: our version, and only the commands we implement, plus our QAPI
    /// downstream extensions (`__org.qga-bridge_*`, listed last), which the reference lacks.
    InfoListsOurCommands,
    /// `guest-set-memory-blocks` when the memory directory exists but cannot be opened
    /// (ENOTDIR, ELOOP, EMFILE...): the reference leaves each result at `success` (with
    /// `error-code` set to the errno) although it touched no block. A host must not be
    /// told memory came online when nothing happened, so we answer `operation-failed`
    /// with the same error code.
    UnopenableTreeFails,
    /// A value nested deeper than 1024: both answer "JSON nesting depth limit exceeded",
    /// but the reference then reports every leftover closing bracket as its own error
    /// (1,026 more replies for 1,100 levels); we skip the rest of the value silently.
    DepthErrorOnce,
    /// A block the kernel removes while `guest-get-memory-blocks` reads it (memory being
    /// unplugged): the reference fails the whole listing (`open("…/memoryN/"): No such
    /// file or directory`, or `pread sysfs file "removable": No such device`); we leave
    /// the block out, since it is gone. Only a block whose directory is gone when its
    /// reading failed counts: every error path below, where the entry is still there,
    /// fails the same as the reference. A static tree cannot race like that; the unit
    /// test `sysfs::tests::blocks_removed_while_the_listing_reads_them_are_left_out`
    /// removes blocks mid-scan, and the QEMU end-to-end test lists during unplugs.
    VanishedBlocksLeftOut,
}

fn tree() -> FakeSysfs {
    let t = FakeSysfs::new();
    t.block(0, Some("online"), Some("1"))
        .block(1, Some("online"), Some("0"))
        .block(2, Some("offline"), Some("1"))
        .block(3, Some("going-offline"), Some("1"))
        .block(4, Some("online"), None)
        .block(5, None, Some("1"))
        .blocks(32..36, "offline");
    t
}

struct Pair {
    ours: AgentProcess,
    reference: AgentProcess,
}

impl Pair {
    fn start(ours_tree: &FakeSysfs, ref_tree: &FakeSysfs, extra: &[&str]) -> Self {
        let reference = AgentProcess::start(AgentKind::Reference, ref_tree, extra)
            .expect("the reference qemu-ga must run (root, unshare, qemu-guest-agent installed)");
        let ours =
            AgentProcess::start(AgentKind::Ours, ours_tree, extra).expect("qga-agent starts");
        Self { ours, reference }
    }

    fn clients(&self) -> (QgaClient, QgaClient) {
        (
            self.ours.client().expect("connect ours"),
            self.reference.client().expect("connect reference"),
        )
    }
}

/// The word a kernel would read from what the reference left in a plain-file `state`:
/// it writes without truncating, so `online` over `offline\n` leaves `onlinee`. Sysfs has
/// no such residue; this is an artefact of fake trees, not a protocol difference.
fn kernel_word(state: &str) -> &str {
    [
        "online_movable",
        "online_kernel",
        "going-offline",
        "offline",
        "online",
    ]
    .into_iter()
    .find(|w| state.starts_with(w))
    .unwrap_or(state)
}

fn sort_blocks(mut v: Value) -> Value {
    if let Some(blocks) = v.get_mut("return").and_then(Value::as_array_mut) {
        blocks.sort_by_key(|b| (b["phys-index"].as_u64(), b.to_string()));
    }
    v
}

fn apply(d: Divergence, reference: &mut Value) {
    match d {
        Divergence::OddNamesSkipped => {
            // Drop the phys-index 0 entries that only the reference reports.
            if let Some(blocks) = reference.get_mut("return").and_then(Value::as_array_mut) {
                let mut seen_zero = false;
                blocks.retain(|b| {
                    if b["phys-index"] != 0 {
                        return true;
                    }
                    let keep = !seen_zero;
                    seen_zero = true;
                    keep
                });
            }
        }
        Divergence::UnopenableTreeFails => {
            // Only that path yields success with an errno other than ENOENT's 2.
            if let Some(results) = reference.get_mut("return").and_then(Value::as_array_mut) {
                for r in results.iter_mut().filter(|r| {
                    r["response"] == "success" && r.get("error-code").is_some_and(|c| c != 2)
                }) {
                    r["response"] = json!("operation-failed");
                }
            }
        }
        Divergence::NoErrorCodeOnSuccess => {
            if let Some(results) = reference.get_mut("return").and_then(Value::as_array_mut) {
                for r in results.iter_mut().filter(|r| r["response"] == "success") {
                    if let Some(obj) = r.as_object_mut() {
                        obj.remove("error-code");
                    }
                }
            }
        }
        Divergence::InfoListsOurCommands
        | Divergence::DepthErrorOnce
        | Divergence::VanishedBlocksLeftOut => {}
    }
}

/// Sends `request` to both and asserts equal replies after `divergences`.
fn same(
    ours: &mut QgaClient,
    reference: &mut QgaClient,
    request: &Value,
    divergences: &[Divergence],
) -> Value {
    let a = sort_blocks(ours.request(request).expect("ours replies"));
    let mut b = sort_blocks(reference.request(request).expect("reference replies"));
    for d in divergences {
        apply(*d, &mut b);
    }
    assert_eq!(a, b, "request {request}");
    a
}

fn same_raw(ours: &mut QgaClient, reference: &mut QgaClient, bytes: &[u8]) -> Value {
    ours.send_raw(bytes).expect("send");
    reference.send_raw(bytes).expect("send");
    let a = ours.read_reply().expect("ours replies");
    let b = reference.read_reply().expect("reference replies");
    assert_eq!(a, b, "raw input {:?}", String::from_utf8_lossy(bytes));
    a
}

#[test]
fn queries_and_housekeeping_match() {
    let (t1, t2) = (tree(), tree());
    let pair = Pair::start(&t1, &t2, &[]);
    let (mut o, mut r) = pair.clients();
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-get-memory-blocks"}),
        &[],
    );
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-get-memory-block-info", "id": "x"}),
        &[],
    );
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-ping", "id": [1, {"a": null}]}),
        &[],
    );
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-sync", "arguments": {"id": -5}}),
        &[],
    );
    // guest-sync-delimited: byte-level framing, then equal values.
    for c in [&mut o, &mut r] {
        c.send_raw(br#"{"execute":"guest-sync-delimited","arguments":{"id":77}}"#)
            .expect("send");
    }
    let (lo, lr) = (
        o.read_line_raw().expect("line"),
        r.read_line_raw().expect("line"),
    );
    assert_eq!((lo[0], lr[0]), (0xFF, 0xFF));
    let parse = |l: &[u8]| serde_json::from_slice::<Value>(&l[1..]).expect("json after 0xFF");
    assert_eq!(parse(&lo), parse(&lr));
    // guest-info: every standard command we implement is listed the same way by the
    // reference; our extensions only by us.
    let _ = Divergence::InfoListsOurCommands;
    let oi = o.execute("guest-info", None).expect("reply");
    let ri = r.execute("guest-info", None).expect("reply");
    let ours = oi["return"]["supported_commands"].as_array().expect("list");
    let (extensions, standard): (Vec<&Value>, Vec<&Value>) = ours.iter().partition(|c| {
        c["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("__org.qga-bridge_"))
    });
    assert_eq!(extensions.len(), 5, "{oi}");
    for cmd in extensions {
        let name = cmd["name"].as_str().unwrap_or_default();
        let reply = r.execute(name, None).expect("reply");
        assert_eq!(reply["error"]["class"], "CommandNotFound", "{reply}");
    }
    for cmd in standard {
        let theirs = ri["return"]["supported_commands"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == cmd["name"]))
            .unwrap_or_else(|| panic!("reference lacks {}", cmd["name"]));
        assert_eq!(cmd, theirs);
    }
}

#[test]
fn set_memory_blocks_matches_and_leaves_the_same_trees() {
    let (t1, t2) = (tree(), tree());
    let pair = Pair::start(&t1, &t2, &[]);
    let (mut o, mut r) = pair.clients();
    let req = json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [
        {"phys-index": 32, "online": true},
        {"phys-index": 33, "online": true},
        {"phys-index": 33, "online": true},
        {"phys-index": 0, "online": false, "can-offline": true},
        {"phys-index": 3, "online": false},
        {"phys-index": 2, "online": false},
        {"phys-index": 99, "online": true},
        {"phys-index": -1, "online": true},
        {"phys-index": 5, "online": false},
        {"phys-index": 5, "online": true},
    ]}});
    same(&mut o, &mut r, &req, &[Divergence::NoErrorCodeOnSuccess]);
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": []}}),
        &[],
    );
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-get-memory-blocks"}),
        &[],
    );
    for i in [0, 1, 2, 3, 4, 32, 33, 34, 35] {
        assert_eq!(t1.state(i), kernel_word(&t2.state(i)), "block {i}");
    }
}

#[test]
fn odd_directory_names_are_the_listed_divergence() {
    let (t1, t2) = (tree(), tree());
    t1.odd_dir("memoryfoo");
    t2.odd_dir("memoryfoo");
    let pair = Pair::start(&t1, &t2, &[]);
    let (mut o, mut r) = pair.clients();
    let raw = r.execute("guest-get-memory-blocks", None).expect("reply");
    let zeros = raw["return"]
        .as_array()
        .map_or(0, |b| b.iter().filter(|b| b["phys-index"] == 0).count());
    assert_eq!(
        zeros, 2,
        "the reference reports memoryfoo as a second phys-index 0"
    );
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-get-memory-blocks"}),
        &[Divergence::OddNamesSkipped],
    );
}

#[test]
fn errors_match() {
    let (t1, t2) = (tree(), tree());
    let pair = Pair::start(&t1, &t2, &[]);
    let (mut o, mut r) = pair.clients();
    let requests = [
        json!([1, 2]),
        json!("hello"),
        json!({"execut": "guest-ping"}),
        json!({"exec-oob": "guest-ping"}),
        json!({"execute": 5}),
        json!({"execute": "guest-ping", "arguments": []}),
        json!({"execute": "guest-ping", "arguments": null}),
        json!({"arguments": {}}),
        json!({"execute": "guest-nope", "id": 42}),
        json!({"execute": "guest-ping", "arguments": {"a": 1}}),
        json!({"execute": "guest-get-memory-blocks", "arguments": {"x": 1}}),
        json!({"execute": "guest-sync"}),
        json!({"execute": "guest-sync", "arguments": {"id": "x"}}),
        json!({"execute": "guest-sync", "arguments": {"id": 1.5}}),
        json!({"execute": "guest-set-memory-blocks"}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": 5}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [5]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"online": true}]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 1}]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": "a", "online": true}]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 1.5, "online": true}]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 1, "online": "yes"}]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 1, "online": true, "can-offline": 5}]}}),
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 1, "online": true, "zzz": 5}]}}),
    ];
    for req in &requests {
        let reply = same(&mut o, &mut r, req, &[]);
        assert!(reply.get("error").is_some(), "{req} should fail");
    }
    same_raw(&mut o, &mut r, b"garbage\n");
    let dup = same_raw(
        &mut o,
        &mut r,
        br#"{"execute":"guest-ping","execute":"guest-nope"}"#,
    );
    assert_eq!(dup["error"]["desc"], "JSON parse error, duplicate key");
    same_raw(&mut o, &mut r, b"\xff");
    // Too deep: the first reply is the same; see `Divergence::DepthErrorOnce`.
    let _ = Divergence::DepthErrorOnce;
    let deep = "[".repeat(1100) + &"]".repeat(1100);
    let first = same_raw(&mut o, &mut r, deep.as_bytes());
    assert_eq!(first["error"]["desc"], "JSON nesting depth limit exceeded");
    let sync = json!({"execute": "guest-sync", "arguments": {"id": 4242}});
    assert_eq!(o.request(&sync).expect("reply"), json!({"return": 4242}));
    r.send_raw(sync.to_string().as_bytes()).expect("send");
    let mut extra = 0;
    while r.read_reply().expect("reply") != json!({"return": 4242}) {
        extra += 1;
    }
    assert!(extra > 1000, "reference emitted {extra} extra errors");
    // Both recovered.
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-ping", "id": 1}),
        &[],
    );
    // Nothing was changed by any of it.
    for i in [0, 1, 2, 3, 32] {
        assert_eq!(t1.state(i), kernel_word(&t2.state(i)));
    }
}

#[test]
fn disabled_commands_match() {
    let (t1, t2) = (tree(), tree());
    let pair = Pair::start(
        &t1,
        &t2,
        &["-b", "guest-get-memory-blocks,guest-set-memory-blocks"],
    );
    let (mut o, mut r) = pair.clients();
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-get-memory-blocks", "id": 3}),
        &[],
    );
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [{"phys-index": 2, "online": true}]}}),
        &[],
    );
    assert_eq!(t1.state(2), "offline");
    assert_eq!(t2.state(2), "offline");
    same(
        &mut o,
        &mut r,
        &json!({"execute": "guest-get-memory-block-info"}),
        &[],
    );
}

/// The base tree of [`sysfs_error_paths_match`]: two good blocks; block 5 is what the cases
/// break. Rebuilt from scratch, whatever the previous case left.
fn reset(t: &FakeSysfs) {
    t.replace("", Node::Dir)
        .block_size(0x800_0000)
        .block(0, Some("online"), Some("1"))
        .block(1, Some("offline"), Some("0"));
}

/// Every error path of the three memory commands, on trees broken identically for both
/// agents with things root cannot bypass: each case's replies must be equal.
#[test]
fn sysfs_error_paths_match() {
    // A block that is still there but broken fails like the reference; see
    // `Divergence::VanishedBlocksLeftOut` for one that is gone.
    let _ = Divergence::VanishedBlocksLeftOut;
    type Case = (&'static str, fn(&FakeSysfs));
    let cases: &[Case] = &[
        ("good tree", |_| {}),
        // The memory directory itself.
        ("memory dir missing (ENOENT)", |t| {
            t.remove_memory_dir();
        }),
        ("memory dir a file (ENOTDIR)", |t| {
            t.replace("", Node::File("x"));
        }),
        ("memory dir a symlink loop (ELOOP)", |t| {
            t.replace("", Node::Symlink("memory"));
        }),
        ("memory dir a dangling symlink (ENOENT)", |t| {
            t.replace("", Node::Symlink("nowhere"));
        }),
        ("memory dir without blocks", |t| {
            t.replace("", Node::Dir).block_size(0x800_0000);
        }),
        ("memory dir empty", |t| {
            t.replace("", Node::Dir);
        }),
        // `memory5` itself.
        ("memory5 a file", |t| {
            t.replace("memory5", Node::File("x"));
        }),
        ("memory5 a socket (d_type has DT_DIR's bit)", |t| {
            t.replace("memory5", Node::Socket);
        }),
        ("memory5 a fifo", |t| {
            t.replace("memory5", Node::Fifo);
        }),
        ("memory5 a symlink loop", |t| {
            t.replace("memory5", Node::Symlink("memory5"));
        }),
        ("memory5 a dangling symlink", |t| {
            t.replace("memory5", Node::Symlink("nowhere"));
        }),
        ("memory5 a symlink to a block", |t| {
            t.replace("memory5", Node::Symlink("memory1"));
        }),
        // Entries not spelled as a block is read: never taken for a block that went away.
        ("memory05 (read as memory5, which is not there)", |t| {
            t.odd_dir("memory05");
        }),
        ("memory18446744073709551615 (read as memory-1)", |t| {
            t.odd_dir("memory18446744073709551615");
        }),
        // Its `state`.
        ("state a directory (EISDIR on read)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::Dir);
        }),
        ("state empty (EOF)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::File(""));
        }),
        ("state a symlink loop (ELOOP)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::Symlink("state"));
        }),
        ("state a dangling symlink (ENOENT)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::Symlink("nowhere"));
        }),
        ("state missing", |t| {
            t.block(5, None, Some("1"));
        }),
        ("state /dev/full (writes fail with ENOSPC)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::Symlink("/dev/full"));
        }),
        ("state /dev/null (EOF)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::Symlink("/dev/null"));
        }),
        ("state a socket (ENXIO)", |t| {
            t.block(5, None, Some("1"))
                .replace("memory5/state", Node::Socket);
        }),
        // Its `removable`.
        ("removable a directory", |t| {
            t.block(5, Some("online"), None)
                .replace("memory5/removable", Node::Dir);
        }),
        ("removable empty", |t| {
            t.block(5, Some("online"), None)
                .replace("memory5/removable", Node::File(""));
        }),
        ("removable a symlink loop", |t| {
            t.block(5, Some("online"), None)
                .replace("memory5/removable", Node::Symlink("removable"));
        }),
        ("removable a dangling symlink", |t| {
            t.block(5, Some("online"), None)
                .replace("memory5/removable", Node::Symlink("nowhere"));
        }),
        ("removable /dev/full (a NUL byte)", |t| {
            t.block(5, Some("offline"), None)
                .replace("memory5/removable", Node::Symlink("/dev/full"));
        }),
        // `block_size_bytes`.
        ("block_size_bytes a directory", |t| {
            t.replace("block_size_bytes", Node::Dir);
        }),
        ("block_size_bytes empty", |t| {
            t.replace("block_size_bytes", Node::File(""));
        }),
        ("block_size_bytes a symlink loop", |t| {
            t.replace("block_size_bytes", Node::Symlink("block_size_bytes"));
        }),
        ("block_size_bytes missing", |t| {
            t.replace("block_size_bytes", Node::Symlink("nowhere"));
        }),
        ("block_size_bytes /dev/full", |t| {
            t.replace("block_size_bytes", Node::Symlink("/dev/full"));
        }),
    ];
    let (t1, t2) = (FakeSysfs::new(), FakeSysfs::new());
    let pair = Pair::start(&t1, &t2, &[]);
    let (mut o, mut r) = pair.clients();
    let set = json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [
        {"phys-index": 0, "online": true},
        {"phys-index": 1, "online": true},
        {"phys-index": 5, "online": true},
        {"phys-index": 5, "online": false},
        {"phys-index": -1, "online": false},
    ]}});
    let divergences = [
        Divergence::UnopenableTreeFails,
        Divergence::NoErrorCodeOnSuccess,
    ];
    for (name, setup) in cases {
        for t in [&t1, &t2] {
            reset(t);
            setup(t);
        }
        for request in [
            json!({"execute": "guest-get-memory-blocks", "id": name}),
            json!({"execute": "guest-get-memory-block-info", "id": name}),
            set.clone(),
        ] {
            same(&mut o, &mut r, &request, &divergences);
        }
    }
    // `block_size_bytes` as C's strtol(text, NULL, 16) reads it (under 20 bytes: the
    // reference does not terminate a full 20-byte read).
    for text in [
        "8000000\n",
        "  0x10",
        "+0X1f",
        "-1",
        "-0x8",
        "zz",
        "0x",
        "0xg",
        "12g4",
        "fffffffffffffffff",
        "-fffffffffffffffff",
        "7fffffffffffffff",
        "8000000000000000",
        "-8000000000000000",
        " \t\n 8",
        "1 2",
    ] {
        for t in [&t1, &t2] {
            reset(t);
            t.replace("block_size_bytes", Node::File(text));
        }
        same(
            &mut o,
            &mut r,
            &json!({"execute": "guest-get-memory-block-info", "id": text}),
            &[],
        );
    }
    // phys-index -1 names `memory-1` (the reference prints indices signed).
    for t in [&t1, &t2] {
        reset(t);
        t.odd_dir("memory-1");
    }
    let reply = same(&mut o, &mut r, &set, &divergences);
    assert_eq!(reply["return"][4]["response"], "success");
    assert_eq!(kernel_word(&t2.state_of("memory-1")), "offline");
    assert_eq!(t1.state_of("memory-1"), "offline");
}
