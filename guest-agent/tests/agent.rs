//! `qga-agent` through its real unix socket, on fake sysfs trees: every case of the
//! protocol notes (`shared/spec/qga-protocol.md`), plus write failures with real errnos.

use std::fs;

use qga_testkit::{AgentKind, AgentProcess, FakeSysfs, QgaClient};
use serde_json::{Value, json};

fn start(tree: &FakeSysfs, extra: &[&str]) -> (AgentProcess, QgaClient) {
    let agent = AgentProcess::start(AgentKind::Ours, tree, extra).expect("agent starts");
    let client = agent.client().expect("connect");
    (agent, client)
}

fn ret(reply: Value) -> Value {
    assert!(
        reply.get("error").is_none(),
        "unexpected error reply: {reply}"
    );
    reply["return"].clone()
}

fn error(reply: &Value) -> (&str, &str) {
    let e = &reply["error"];
    (
        e["class"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error reply: {reply}")),
        e["desc"].as_str().unwrap_or_default(),
    )
}

fn sorted_blocks(v: Value) -> Vec<Value> {
    let mut blocks = v.as_array().expect("array of blocks").clone();
    blocks.sort_by_key(|b| b["phys-index"].as_u64());
    blocks
}

fn set(client: &mut QgaClient, entries: Value) -> Value {
    ret(client
        .execute(
            "guest-set-memory-blocks",
            Some(json!({ "mem-blks": entries })),
        )
        .expect("reply"))
}

#[test]
fn lists_blocks_with_reference_semantics() {
    let tree = FakeSysfs::new();
    tree.block(0, Some("online"), Some("1"))
        .block(1, Some("offline"), Some("1"))
        .block(2, Some("going-offline"), Some("1"))
        .block(3, Some("online"), Some("0"))
        .block(4, Some("online"), None) // no `removable`: cannot offline
        .block(5, None, Some("1")) // no `state`: online, cannot offline
        .odd_dir("memoryfoo") // skipped, not phys-index 0
        .odd_dir("memory_1");
    fs::write(tree.memory_dir().join("memory99"), "a file, not a block").expect("write");
    let (_agent, mut c) = start(&tree, &[]);
    let blocks = sorted_blocks(ret(c
        .execute("guest-get-memory-blocks", None)
        .expect("reply")));
    assert_eq!(
        blocks,
        vec![
            json!({"phys-index": 0, "online": true, "can-offline": true}),
            json!({"phys-index": 1, "online": false, "can-offline": true}),
            json!({"phys-index": 2, "online": false, "can-offline": true}),
            json!({"phys-index": 3, "online": true, "can-offline": false}),
            json!({"phys-index": 4, "online": true, "can-offline": false}),
            json!({"phys-index": 5, "online": true, "can-offline": false}),
        ]
    );
}

#[test]
fn large_tree_is_listed_completely() {
    let tree = FakeSysfs::with_blocks(3000, "offline");
    tree.set_state(1234, "online");
    let (_agent, mut c) = start(&tree, &[]);
    let blocks = sorted_blocks(ret(c
        .execute("guest-get-memory-blocks", None)
        .expect("reply")));
    assert_eq!(blocks.len(), 3000);
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(b["phys-index"], json!(i));
        assert_eq!(b["online"], json!(i == 1234));
    }
}

#[test]
fn block_info_reads_hex_size() {
    let tree = FakeSysfs::new();
    tree.block_size(0x1000_0000);
    let (_agent, mut c) = start(&tree, &[]);
    assert_eq!(
        ret(c
            .execute("guest-get-memory-block-info", None)
            .expect("reply")),
        json!({"size": 268435456})
    );
}

#[test]
fn set_follows_reference_rules_in_order() {
    let tree = FakeSysfs::new();
    tree.block(0, Some("online"), Some("1"))
        .block(1, Some("offline"), Some("1"))
        .block(5, None, Some("1"));
    let (_agent, mut c) = start(&tree, &[]);
    let results = set(
        &mut c,
        json!([
            {"phys-index": 1, "online": true},
            {"phys-index": 1, "online": true},          // duplicate: processed again, no-op
            {"phys-index": 0, "online": false, "can-offline": false},
            {"phys-index": 42, "online": true},          // no such block
            {"phys-index": -1, "online": false},         // -1 wraps to u64::MAX
            {"phys-index": 5, "online": false},          // no `state`: cannot offline
            {"phys-index": 5, "online": true},           // no `state`: already online
        ]),
    );
    assert_eq!(
        results,
        json!([
            {"phys-index": 1, "response": "success"},
            {"phys-index": 1, "response": "success"},
            {"phys-index": 0, "response": "success"},
            {"phys-index": 42, "response": "not-found", "error-code": 2},
            {"phys-index": 18446744073709551615u64, "response": "not-found", "error-code": 2},
            {"phys-index": 5, "response": "operation-not-supported", "error-code": 2},
            {"phys-index": 5, "response": "success"},
        ])
    );
    assert_eq!(tree.state(1), "online");
    assert_eq!(tree.state(0), "offline");
    assert_eq!(set(&mut c, json!([])), json!([]));
}

#[test]
fn matching_state_is_not_written() {
    let tree = FakeSysfs::new();
    tree.block(0, Some("online"), Some("1"))
        .block(1, Some("going-offline"), Some("1"));
    let (_agent, mut c) = start(&tree, &[]);
    let state0 = tree.memory_dir().join("memory0/state");
    let before = fs::metadata(&state0)
        .expect("stat")
        .modified()
        .expect("mtime");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let results = set(
        &mut c,
        json!([{"phys-index": 0, "online": true}, {"phys-index": 1, "online": false}]),
    );
    assert_eq!(results[0]["response"], "success");
    assert_eq!(results[1]["response"], "success");
    assert_eq!(
        fs::metadata(&state0)
            .expect("stat")
            .modified()
            .expect("mtime"),
        before
    );
    assert_eq!(tree.state(1), "going-offline");
}

#[test]
fn online_type_decides_the_word_written() {
    for (flag, word) in [
        (None, "online"),
        (Some("online_movable"), "online_movable"),
        (Some("online_kernel"), "online_kernel"),
    ] {
        let tree = FakeSysfs::with_blocks(2, "offline");
        let extra: Vec<&str> = flag.map(|f| vec!["--online-type", f]).unwrap_or_default();
        let (_agent, mut c) = start(&tree, &extra);
        let r = set(&mut c, json!([{"phys-index": 1, "online": true}]));
        assert_eq!(r, json!([{"phys-index": 1, "response": "success"}]));
        assert_eq!(tree.state(1), word);
        assert_eq!(tree.state(0), "offline");
    }
}

#[test]
fn online_type_from_config_file() {
    let tree = FakeSysfs::with_blocks(1, "offline");
    let conf = tempfile::NamedTempFile::new().expect("temp file");
    fs::write(conf.path(), "[general]\nonline-type=online_movable\n").expect("write conf");
    let conf_path = conf.path().to_str().expect("utf-8 path");
    // Our harness passes `-c /dev/null`; a later `-c` wins.
    let (_agent, mut c) = start(&tree, &["-c", conf_path]);
    set(&mut c, json!([{"phys-index": 0, "online": true}]));
    assert_eq!(tree.state(0), "online_movable");
}

#[test]
fn write_failures_report_the_real_errno() {
    let tree = FakeSysfs::new();
    tree.block(0, Some("offline"), Some("1"))
        .block(1, Some("online"), Some("1"));
    // `state` as a directory: reading it fails with EISDIR (21).
    tree.block(2, None, Some("1"));
    fs::create_dir(tree.memory_dir().join("memory2/state")).expect("mkdir");
    // A block directory we cannot enter as a directory: ENOTDIR (20) on open.
    fs::remove_dir_all(tree.memory_dir().join("memory0")).expect("rm");
    fs::write(tree.memory_dir().join("memory0"), "").expect("file");
    let (_agent, mut c) = start(&tree, &[]);
    let r = set(
        &mut c,
        json!([{"phys-index": 2, "online": false}, {"phys-index": 0, "online": true}]),
    );
    assert_eq!(
        r,
        json!([
            {"phys-index": 2, "response": "operation-failed", "error-code": 21},
            {"phys-index": 0, "response": "operation-failed", "error-code": 20},
        ])
    );
    // Block 1 is fine and still works after the failures.
    assert_eq!(
        set(&mut c, json!([{"phys-index": 1, "online": false}]))[0]["response"],
        "success"
    );
}

#[test]
fn missing_memory_tree() {
    let tree = FakeSysfs::new();
    tree.remove_memory_dir();
    let (_agent, mut c) = start(&tree, &[]);
    assert_eq!(
        ret(c.execute("guest-get-memory-blocks", None).expect("reply")),
        json!([])
    );
    assert_eq!(
        set(
            &mut c,
            json!([{"phys-index": 0, "online": true}, {"phys-index": 1, "online": false}])
        ),
        // qemu-ga 7.2 keeps opendir's errno (ENOENT) as the error code.
        json!([
            {"phys-index": 0, "response": "operation-not-supported", "error-code": 2},
            {"phys-index": 1, "response": "operation-not-supported", "error-code": 2},
        ])
    );
    let info = c
        .execute("guest-get-memory-block-info", None)
        .expect("reply");
    assert_eq!(error(&info).0, "GenericError");
    assert_eq!(
        error(&info).1,
        "open(\"/sys/devices/system/memory/\"): No such file or directory"
    );
}

#[test]
fn argument_errors_match_the_reference() {
    let tree = FakeSysfs::with_blocks(1, "online");
    let (_agent, mut c) = start(&tree, &[]);
    let cases = [
        (
            json!({"x": 1}),
            "guest-get-memory-blocks",
            "Parameter 'x' is unexpected",
        ),
        (
            json!({}),
            "guest-set-memory-blocks",
            "Parameter 'mem-blks' is missing",
        ),
        (
            json!({"mem-blks": 5}),
            "guest-set-memory-blocks",
            "Invalid parameter type for 'mem-blks', expected: array",
        ),
        (
            json!({"mem-blks": [5]}),
            "guest-set-memory-blocks",
            "Invalid parameter type for 'mem-blks[0]', expected: object",
        ),
        (
            json!({"mem-blks": [{"online": true}]}),
            "guest-set-memory-blocks",
            "Parameter 'mem-blks[0].phys-index' is missing",
        ),
        (
            json!({"mem-blks": [{"phys-index": 1}]}),
            "guest-set-memory-blocks",
            "Parameter 'mem-blks[0].online' is missing",
        ),
        (
            json!({"mem-blks": [{"phys-index": "a", "online": true}]}),
            "guest-set-memory-blocks",
            "Parameter 'mem-blks[0].phys-index' expects uint64",
        ),
        (
            json!({"mem-blks": [{"phys-index": 1, "online": "yes"}]}),
            "guest-set-memory-blocks",
            "Invalid parameter type for 'mem-blks[0].online', expected: boolean",
        ),
        (
            json!({"mem-blks": [{"phys-index": 1, "online": true, "zzz": 1}]}),
            "guest-set-memory-blocks",
            "Parameter 'mem-blks[0].zzz' is unexpected",
        ),
        (
            json!({"id": "x"}),
            "guest-sync",
            "Invalid parameter type for 'id', expected: integer",
        ),
        (json!({"a": 1}), "guest-ping", "Parameter 'a' is unexpected"),
    ];
    for (args, cmd, desc) in cases {
        let reply = c.execute(cmd, Some(args.clone())).expect("reply");
        assert_eq!(error(&reply), ("GenericError", desc), "{cmd} {args}");
    }
    // Nothing was changed by the rejected calls.
    assert_eq!(tree.state(0), "online");
}

#[test]
fn request_errors_and_id_echo() {
    let tree = FakeSysfs::with_blocks(1, "online");
    let (_agent, mut c) = start(&tree, &[]);
    for (req, desc) in [
        (json!([1, 2]), "QMP input must be a JSON object"),
        (json!("hello"), "QMP input must be a JSON object"),
        (
            json!({"execut": "guest-ping"}),
            "QMP input member 'execut' is unexpected",
        ),
        (
            json!({"execute": 5}),
            "QMP input member 'execute' must be a string",
        ),
        (
            json!({"execute": "guest-ping", "arguments": []}),
            "QMP input member 'arguments' must be an object",
        ),
        (json!({"arguments": {}}), "QMP input lacks member 'execute'"),
    ] {
        assert_eq!(
            error(&c.request(&req).expect("reply")),
            ("GenericError", desc),
            "{req}"
        );
    }
    let reply = c
        .request(&json!({"execute": "guest-nope", "id": 7}))
        .expect("reply");
    assert_eq!(
        error(&reply),
        (
            "CommandNotFound",
            "The command guest-nope has not been found"
        )
    );
    assert_eq!(reply["id"], 7);
    for id in [
        json!("abc"),
        json!(42),
        json!(null),
        json!([1, {"a": null}]),
    ] {
        let reply = c
            .request(&json!({"execute": "guest-ping", "id": id.clone()}))
            .expect("reply");
        assert_eq!(reply, json!({"return": {}, "id": id}));
    }
    assert_eq!(
        ret(c
            .execute("guest-sync", Some(json!({"id": -5})))
            .expect("reply")),
        json!(-5)
    );
}

#[test]
fn disabled_and_allowed_commands() {
    let tree = FakeSysfs::with_blocks(1, "online");
    let (_agent, mut c) = start(&tree, &["-b", "guest-get-memory-blocks,guest-ping"]);
    let reply = c.execute("guest-get-memory-blocks", None).expect("reply");
    assert_eq!(
        error(&reply),
        (
            "CommandNotFound",
            "Command guest-get-memory-blocks has been disabled"
        )
    );
    let info = ret(c.execute("guest-info", None).expect("reply"));
    let enabled = |name: &str| {
        info["supported_commands"]
            .as_array()
            .and_then(|cmds| cmds.iter().find(|c| c["name"] == name))
            .map(|c| (c["enabled"].clone(), c["success-response"].clone()))
    };
    assert_eq!(
        enabled("guest-get-memory-blocks"),
        Some((json!(false), json!(true)))
    );
    assert_eq!(enabled("guest-ping"), Some((json!(false), json!(true))));
    assert_eq!(
        enabled("guest-set-memory-blocks"),
        Some((json!(true), json!(true)))
    );
    assert!(info["version"].is_string());

    let (_agent2, mut c2) = start(&tree, &["-a", "guest-get-memory-block-info"]);
    assert!(
        c2.execute("guest-get-memory-block-info", None)
            .expect("reply")
            .get("return")
            .is_some()
    );
    assert_eq!(
        error(&c2.execute("guest-ping", None).expect("reply")).0,
        "CommandNotFound"
    );
    // The host can still resynchronise under an allow list.
    assert_eq!(
        ret(c2
            .execute("guest-sync", Some(json!({"id": 1})))
            .expect("reply")),
        json!(1)
    );
}

#[test]
fn framing_delimiters_and_recovery() {
    let tree = FakeSysfs::with_blocks(1, "online");
    let (agent, mut c) = start(&tree, &[]);
    // Two requests back to back without a delimiter, split mid-token.
    c.send_raw(br#"{"execute":"guest-ping","id":1}{"execute":"gue"#)
        .expect("send");
    c.send_raw(br#"st-ping","id":2}"#).expect("send");
    assert_eq!(c.read_reply().expect("reply")["id"], 1);
    assert_eq!(c.read_reply().expect("reply")["id"], 2);
    // guest-sync-delimited: 0xFF immediately before the reply.
    c.send_raw(br#"{"execute":"guest-sync-delimited","arguments":{"id":99}}"#)
        .expect("send");
    let line = c.read_line_raw().expect("line");
    assert_eq!(line[0], 0xFF);
    assert_eq!(
        serde_json::from_slice::<Value>(&line[1..]).expect("json"),
        json!({"return": 99})
    );
    // A stray 0xFF resets the parser and is answered with one error.
    c.send_raw(b"{\"execute\":\xff").expect("send");
    let reply = c.read_reply().expect("reply");
    assert_eq!(error(&reply).0, "GenericError");
    assert!(error(&reply).1.starts_with("JSON parse error, stray"));
    // Malformed JSON, then the next request is answered.
    c.send_raw(b"garbage\n").expect("send");
    assert_eq!(
        error(&c.read_reply().expect("reply")),
        (
            "GenericError",
            "JSON parse error, invalid keyword 'garbage'"
        )
    );
    let deep = "[".repeat(1100) + &"]".repeat(1100);
    c.send_raw(deep.as_bytes()).expect("send");
    assert_eq!(
        error(&c.read_reply().expect("reply")).1,
        "JSON nesting depth limit exceeded"
    );
    assert_eq!(
        ret(c.execute("guest-ping", None).expect("reply")),
        json!({})
    );

    // A half-sent request from one client does not leak into the next connection.
    c.send_raw(br#"{"execute":"guest-ping","id":"#)
        .expect("send");
    drop(c);
    let mut fresh = agent.client().expect("connect");
    assert_eq!(
        fresh.execute("guest-ping", None).expect("reply"),
        json!({"return": {}})
    );
}

/// The `__org.qga-bridge_*` extensions over the real socket: zones of a tree large enough
/// to be scanned in parallel, a set with a per-call online type, filtering and listing.
#[test]
fn zone_extensions() {
    const ZONES: &str = "__org.qga-bridge_get-memory-zones";
    const SET: &str = "__org.qga-bridge_set-memory-blocks";
    let tree = FakeSysfs::with_blocks(1500, "online");
    tree.set_state(1200, "offline").set_state(1201, "offline");
    for i in 0..1500 {
        let zones = if i < 1200 {
            "Normal\n"
        } else {
            "Normal Movable\n"
        };
        fs::write(
            tree.memory_dir().join(format!("memory{i}/valid_zones")),
            zones,
        )
        .expect("write zones");
    }
    fs::write(tree.memory_dir().join("auto_online_blocks"), "offline\n").expect("write");
    let (_agent, mut c) = start(&tree, &["--online-type", "online_kernel"]);
    let zones = ret(c.execute(ZONES, None).expect("reply"));
    assert_eq!(zones["auto-online-blocks"], "offline");
    assert!(zones.get("online-policy").is_none() && zones.get("auto-movable-ratio").is_none());
    let blocks = sorted_blocks(zones["blocks"].clone());
    assert_eq!(blocks.len(), 1500);
    assert_eq!(
        blocks[7],
        json!({"phys-index": 7, "online": true, "valid-zones": ["Normal"], "removable": true})
    );
    assert_eq!(
        blocks[1201],
        json!({"phys-index": 1201, "online": false, "valid-zones": ["Normal", "Movable"],
               "removable": true})
    );
    // Same set as guest-get-memory-blocks.
    let listed = sorted_blocks(ret(c
        .execute("guest-get-memory-blocks", None)
        .expect("reply")));
    assert!(
        listed
            .iter()
            .zip(&blocks)
            .all(|(l, z)| l["phys-index"] == z["phys-index"] && l["online"] == z["online"])
    );

    // The per-call online type wins over --online-type; the standard command keeps it.
    let r = ret(c
        .execute(
            SET,
            Some(json!({"mem-blks": [{"phys-index": 1200, "online": true}],
                        "online-type": "online_movable"})),
        )
        .expect("reply"));
    assert_eq!(r, json!([{"phys-index": 1200, "response": "success"}]));
    assert_eq!(tree.state(1200), "online_movable");
    set(&mut c, json!([{"phys-index": 1201, "online": true}]));
    assert_eq!(tree.state(1201), "online_kernel");
    let bad = c
        .execute(
            SET,
            Some(json!({"mem-blks": [{"phys-index": 5, "online": false}],
                        "online-type": "movable"})),
        )
        .expect("reply");
    assert_eq!(
        error(&bad),
        (
            "GenericError",
            "Parameter 'online-type' does not accept value 'movable'"
        )
    );
    assert_eq!(tree.state(5), "online");

    // Listed after the standard commands; blocked by name like them.
    let info = ret(c.execute("guest-info", None).expect("reply"));
    let names: Vec<&str> = info["supported_commands"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        &names[names.len() - 5..],
        [
            ZONES,
            SET,
            "__org.qga-bridge_online-when-present",
            "__org.qga-bridge_set-auto-online",
            "__org.qga-bridge_get-memory-stats",
        ]
    );
    let (_agent2, mut c2) = start(&tree, &["-b", &format!("{ZONES},{SET}")]);
    for name in [ZONES, SET] {
        assert_eq!(
            error(&c2.execute(name, None).expect("reply")),
            (
                "CommandNotFound",
                format!("Command {name} has been disabled").as_str()
            )
        );
    }
    let out = std::process::Command::new(qga_testkit::bin_path("qga-agent"))
        .args(["-b", "help"])
        .output()
        .expect("run");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.lines().rev().take(5).eq([
            "__org.qga-bridge_get-memory-stats",
            "__org.qga-bridge_set-auto-online",
            "__org.qga-bridge_online-when-present",
            SET,
            ZONES
        ]),
        "{list}"
    );
}

/// `__org.qga-bridge_get-memory-stats` over the real socket: `--procfs-root` on a fake
/// tree, this machine's real `/proc`, and blocked by name.
#[test]
fn memory_stats_extension() {
    const STATS: &str = "__org.qga-bridge_get-memory-stats";
    let tree = FakeSysfs::with_blocks(1, "online");
    let proc = tempfile::tempdir().expect("tempdir");
    fs::write(
        proc.path().join("meminfo"),
        "MemTotal: 2048 kB\nShmem: 1 kB\n",
    )
    .expect("write");
    fs::write(proc.path().join("vmstat"), "pgmajfault 3\n").expect("write");
    let root = proc.path().to_str().expect("utf-8 path");
    let (_agent, mut c) = start(&tree, &["--procfs-root", root]);
    assert_eq!(
        ret(c.execute(STATS, None).expect("reply")),
        json!({"meminfo": {"mem-total": 2_097_152, "shmem": 1024},
               "vmstat": {"pgmajfault": 3}})
    );

    // The real /proc of this machine: the fields every Linux since 3.14 has.
    let (_real, mut r) = start(&tree, &[]);
    let stats = ret(r.execute(STATS, None).expect("reply"));
    for member in [
        "mem-total",
        "mem-free",
        "mem-available",
        "cached",
        "committed-as",
    ] {
        assert!(
            stats["meminfo"][member].as_u64().is_some(),
            "{member}: {stats}"
        );
    }
    assert!(stats["vmstat"]["pgmajfault"].as_u64().is_some(), "{stats}");
    assert!(
        stats["uptime-ms"].as_u64().is_some_and(|ms| ms > 0),
        "{stats}"
    );
    assert_eq!(stats["boot-id"].as_str().map(str::len), Some(36), "{stats}");
    let again = ret(r.execute(STATS, None).expect("reply"));
    assert_eq!(again["boot-id"], stats["boot-id"]);

    let (_blocked, mut b) = start(&tree, &["-b", STATS]);
    assert_eq!(
        error(&b.execute(STATS, None).expect("reply")),
        (
            "CommandNotFound",
            format!("Command {STATS} has been disabled").as_str()
        )
    );
}

#[test]
fn flags_of_qemu_ga_are_accepted() {
    let bin = qga_testkit::bin_path("qga-agent");
    let out = std::process::Command::new(&bin)
        .args(["-b", "help"])
        .output()
        .expect("run");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && list.contains("guest-set-memory-blocks"));
    let out = std::process::Command::new(&bin)
        .args([
            "-c",
            "/dev/null",
            "-m",
            "unix-listen",
            "-p",
            "/tmp/x.sock",
            "-b",
            "guest-ping",
            "--online-type",
            "online_movable",
            "-D",
        ])
        .output()
        .expect("run");
    let conf = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{conf}");
    for line in [
        "[general]",
        "method=unix-listen",
        "path=/tmp/x.sock",
        "block-rpcs=guest-ping;",
        "online-type=online_movable",
    ] {
        assert!(
            conf.lines().any(|l| l == line),
            "missing {line} in:\n{conf}"
        );
    }
    let out = std::process::Command::new(&bin)
        .arg("-V")
        .output()
        .expect("run");
    assert!(out.status.success());
    let out = std::process::Command::new(&bin)
        .args(["--online-type", "movable"])
        .output()
        .expect("run");
    assert!(!out.status.success());
}
