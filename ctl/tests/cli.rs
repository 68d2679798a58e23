//! `qgactl` against a real bridge with fake agents and a scripted QEMU monitor: every
//! command, table and JSON output, the connection kinds (TCP, unix socket, TLS with client
//! certificates), token authentication, the config file, and the exit codes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use qga_bridge::{
    Bridge, Config,
    config::{AuthConfig, GrantConfig, Listen, Role, TlsConfig, TokenConfig, VmConfig},
};
use qga_fake_agent::FakeAgent;
use qga_testkit::{Certs, qmp};
use serde_json::{Value, json};

/// What one `qgactl` run gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `qgactl` with `args` and `env` (and no config file of the user's).
async fn qgactl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qgactl"));
    cmd.args(args)
        .env_remove("QGA_TOKEN")
        .env_remove("QGACTL_ENDPOINT")
        .env("XDG_CONFIG_HOME", "/nonexistent");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("joins")
        .expect("qgactl runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A QEMU monitor with boot memory 512 MiB and no DIMMs, which refuses `object-add` (so
/// a plug fails at a named step, as on a QEMU without room).
fn fake_qmp(path: &Path) -> qmp::FakeQmp {
    qmp::FakeQmp::start(path, |command, _| async move {
        match command.as_str() {
            "qmp_capabilities" => qmp::ok(json!({})),
            "query-memory-devices" | "query-memdev" => qmp::ok(json!([])),
            "query-memory-size-summary" => qmp::ok(json!({"base-memory": 536_870_912u64})),
            "object-add" => qmp::error("GenericError", "this QEMU has no room"),
            other => qmp::not_found(other),
        }
    })
    .expect("bind QMP socket")
}

/// A bridge serving VM `vm` (a fake agent with 8 blocks and the scripted monitor) and VM
/// `plain` (no monitor), configured by `tweak`.
struct Rig {
    dir: tempfile::TempDir,
    agents: Vec<FakeAgent>,
    bridge: Bridge,
    _qmp: qmp::FakeQmp,
}

impl Rig {
    async fn start(tweak: impl FnOnce(&mut Config, &Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, q) = (
            dir.path().join("vm.sock"),
            dir.path().join("plain.sock"),
            dir.path().join("qmp.sock"),
        );
        let agents = vec![
            FakeAgent::start(&a, 8).expect("agent"),
            FakeAgent::start(&b, 8).expect("agent"),
        ];
        let qmp = fake_qmp(&q);
        let mut config = Config {
            grpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            jsonrpc_addr: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        let vm = VmConfig {
            qmp: Some(q),
            ..VmConfig::agent(a)
        };
        config.vms.insert("vm".into(), vm);
        config.vms.insert("plain".into(), VmConfig::agent(b));
        tweak(&mut config, dir.path());
        let bridge = Bridge::start(config).await.expect("bridge starts");
        Self {
            dir,
            agents,
            bridge,
            _qmp: qmp,
        }
    }

    fn endpoint(&self, scheme: &str) -> String {
        format!(
            "{scheme}://{}",
            self.bridge.grpc_addr.expect("TCP listener")
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_against_fake_agents() {
    let rig = Rig::start(|_, _| {}).await;
    let e = rig.endpoint("http");
    let ep = ["--endpoint", e.as_str()];
    let with = |more: &[&'static str]| -> Vec<String> {
        ep.iter()
            .map(|s| s.to_string())
            .chain(more.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        qgactl(&args, &[]).await
    };

    let list = run(with(&["vm", "list"])).await;
    assert_eq!(list.code, 0, "{list:?}");
    assert!(list.stdout.starts_with("NAME"), "{list:?}");
    assert!(
        list.stdout.contains("plain") && list.stdout.contains("vm.sock"),
        "{list:?}"
    );
    let json_list = run(with(&["vm", "list", "--output", "json"])).await;
    let vms: Value = serde_json::from_str(&json_list.stdout).expect("json");
    assert_eq!(vms.as_array().map(Vec::len), Some(2), "{vms}");

    let blocks = run(with(&["blocks", "vm"])).await;
    assert_eq!(blocks.code, 0, "{blocks:?}");
    assert_eq!(
        blocks.stdout.lines().count(),
        9,
        "a header and 8 blocks: {blocks:?}"
    );
    assert!(
        blocks
            .stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("0 ") && l.contains("online"))
    );

    let info = run(with(&["block-info", "vm"])).await;
    assert_eq!(
        (info.code, info.stdout.as_str()),
        (0, "block size: 128 MiB (134217728 bytes)\n")
    );

    let set = run(with(&["set", "vm", "1=online", "2=offline"])).await;
    assert_eq!(set.code, 0, "{set:?}");
    assert!(set.stdout.contains("1      success"), "{set:?}");
    assert_eq!(rig.agents[0].control().online(1), Some(true));
    assert_eq!(rig.agents[0].control().online(2), Some(false));
    let partial = run(with(&["set", "vm", "99=online"])).await;
    assert_eq!(
        partial.code, 3,
        "a block the guest does not have: {partial:?}"
    );
    assert!(partial.stdout.contains("not-found"), "{partial:?}");

    let layout = run(with(&["memory", "layout", "vm"])).await;
    assert_eq!(layout.code, 0, "{layout:?}");
    assert!(layout.stdout.contains("boot        512 MiB"), "{layout:?}");
    assert!(layout.stdout.contains("DEVICE"), "{layout:?}");
    let layout_json = run(with(&["memory", "layout", "vm", "-o", "json"])).await;
    let l: Value = serde_json::from_str(&layout_json.stdout).expect("json");
    assert_eq!(l["boot_bytes"], 536_870_912u64, "{l}");

    let resize = run(with(&["memory", "resize", "vm", "512MiB"])).await;
    assert_eq!(resize.code, 0, "{resize:?}");
    assert_eq!(
        resize.stdout,
        "resized vm from 512 MiB to 512 MiB: plugged none; unplugged none\n"
    );
    assert!(
        resize.stderr.contains("request-id: qgactl-"),
        "a generated id is shown: {resize:?}"
    );
}

/// What the fake agent of VM `vm` reports: 1 GiB, 715.2 MiB available, PSI, no swap.
fn guest_stats() -> qga_wire::schema::GuestMemoryStats {
    use qga_wire::schema::{
        GuestMeminfo, GuestMemoryPressure, GuestMemoryStats, GuestPressureLine,
    };
    GuestMemoryStats {
        meminfo: GuestMeminfo {
            mem_total: Some(1 << 30),
            mem_available: Some(23_434_727 * 32),
            swap_total: Some(0),
            ..GuestMeminfo::default()
        },
        pressure: Some(GuestMemoryPressure {
            some: Some(GuestPressureLine {
                avg10: 2.5,
                avg60: 1.0,
                avg300: 0.25,
                total: 99,
            }),
            full: None,
        }),
        uptime_ms: Some(3_723_000),
        boot_id: Some("5889bf78".into()),
        ..GuestMemoryStats::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stats_in_a_table_and_as_json() {
    let rig = Rig::start(|_, _| {}).await;
    rig.agents[0]
        .control()
        .set_memory_stats(Some(guest_stats()));
    let e = rig.endpoint("http");
    let table = qgactl(&["--endpoint", &e, "memory", "stats", "vm"], &[]).await;
    assert_eq!(table.code, 0, "{table:?}");
    for want in [
        "guest (agent, ",
        "  total           1 GiB\n",
        "  available       715.2 MiB\n",
        "  working set     308.8 MiB\n",
        "  swap            none\n",
        "  pressure some   2.50% 1.00% 0.25%\n",
        "  pressure full   -\n",
        "  uptime          1h 2m 3s\n",
        "  boot id         5889bf78\n",
        "host (bridge, ",
        "  boot     512 MiB\n  plugged  0 B\n  total    512 MiB\n",
    ] {
        assert!(table.stdout.contains(want), "{want:?} in\n{}", table.stdout);
    }
    let json = qgactl(
        &["--endpoint", &e, "memory", "stats", "vm", "-o", "json"],
        &[],
    )
    .await;
    let v: Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v["agent"]["meminfo"]["mem_total"], 1u64 << 30, "{v}");
    assert_eq!(v["agent"]["meminfo"]["mem_free"], Value::Null, "{v}");
    assert_eq!(v["agent"]["pressure"]["some"]["avg10"], 2.5, "{v}");
    assert_eq!(v["agent"]["boot_id"], "5889bf78", "{v}");
    assert_eq!(v["bridge"]["total_bytes"], 536_870_912u64, "{v}");
    assert!(v["taken_at"].as_f64().is_some(), "{v}");

    // qemu-ga (the plain fake) has no stats, and no monitor is configured for it.
    let plain = qgactl(&["--endpoint", &e, "memory", "stats", "plain"], &[]).await;
    assert_eq!(plain.code, 0, "{plain:?}");
    assert!(
        plain.stdout.starts_with(
            "guest: no stats: the guest's agent does not offer \
             __org.qga-bridge_get-memory-stats (qemu-ga fake-1.0)\nhost: no totals: "
        ),
        "{plain:?}"
    );
    let unknown = qgactl(&["--endpoint", &e, "memory", "stats", "vm9"], &[]).await;
    assert_eq!(unknown.code, 25, "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_one_line_with_the_servers_detail_and_an_exit_code() {
    let rig = Rig::start(|_, _| {}).await;
    let e = rig.endpoint("http");
    let cases: [(&[&str], i32, &str); 8] = [
        (&["blocks", "nosuch"], 25, "NOT_FOUND: unknown VM 'nosuch'"),
        (
            &["memory", "plug", "vm", "512MiB"],
            29,
            "FAILED_PRECONDITION",
        ),
        (&["memory", "unplug", "vm", "qga-dimm7"], 25, "NOT_FOUND"),
        (&["memory", "resize", "vm", "100"], 23, "INVALID_ARGUMENT"),
        (
            &["memory", "balloon", "vm", "256MiB"],
            29,
            "the VM has no virtio balloon",
        ),
        (&["memory", "layout", "plain"], 29, "no QMP socket"),
        (&["memory", "plug", "vm", "lots"], 2, "is not a size"),
        (&["set", "vm", "5=up"], 2, "INDEX=online or INDEX=offline"),
    ];
    for (args, code, text) in cases {
        let mut all = vec!["--endpoint", e.as_str()];
        all.extend_from_slice(args);
        let r = qgactl(&all, &[]).await;
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        assert!(r.stderr.contains(text), "{args:?}: {r:?}");
        let errors: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("qgactl: "))
            .collect();
        assert!(errors.len() <= 1, "one error line: {r:?}");
    }
    // The plug named the step QEMU refused, and a retry with the printed id gets the same
    // outcome without QEMU being asked again.
    let args = [
        "--endpoint",
        e.as_str(),
        "memory",
        "plug",
        "vm",
        "512MiB",
        "--request-id",
        "r1",
    ];
    let first = qgactl(&args, &[]).await;
    assert!(first.stderr.contains("object-add"), "{first:?}");
    assert!(
        !first.stderr.contains("request-id: "),
        "no id generated when one is given"
    );
    let again = qgactl(&args, &[]).await;
    assert_eq!(
        (again.code, again.stderr.as_str()),
        (first.code, first.stderr.as_str())
    );

    let nobody = qgactl(&["--endpoint", "http://127.0.0.1:1", "vm", "list"], &[]).await;
    assert_eq!(nobody.code, 34, "{nobody:?}");
    assert!(
        nobody
            .stderr
            .starts_with("qgactl: UNAVAILABLE: cannot reach the bridge"),
        "{nobody:?}"
    );
    let odd = qgactl(&["--endpoint", "ftp://x", "vm", "list"], &[]).await;
    assert_eq!(odd.code, 1, "{odd:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_endpoint_and_the_config_file() {
    let rig = Rig::start(|c, dir| {
        c.grpc_addr = Listen::Unix(dir.join("grpc.sock"));
    })
    .await;
    let unix = format!("unix:{}", rig.dir.path().join("grpc.sock").display());
    let r = qgactl(&["--endpoint", &unix, "block-info", "plain"], &[]).await;
    assert_eq!(r.code, 0, "{r:?}");

    // The same from the config file, found under XDG_CONFIG_HOME; JSON by default there.
    let home = tempfile::tempdir().expect("tempdir");
    let conf = home.path().join("qgactl");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::write(
        conf.join("config.toml"),
        format!("endpoint = \"{unix}\"\noutput = \"json\"\n"),
    )
    .expect("write");
    let xdg = home.path().to_string_lossy().into_owned();
    let r = qgactl(&["block-info", "plain"], &[("XDG_CONFIG_HOME", &xdg)]).await;
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, "{\n  \"size\": 134217728\n}"),
        "{r:?}"
    );
    // Options win over the file.
    let r = qgactl(
        &["block-info", "plain", "-o", "table"],
        &[("XDG_CONFIG_HOME", &xdg)],
    )
    .await;
    assert!(r.stdout.starts_with("block size"), "{r:?}");
    let r = qgactl(
        &["--endpoint", "http://127.0.0.1:1", "block-info", "plain"],
        &[("XDG_CONFIG_HOME", &xdg)],
    )
    .await;
    assert_eq!(r.code, 34, "{r:?}");
    // A broken file is a local error that names it.
    std::fs::write(conf.join("config.toml"), "endpiont = 1\n").expect("write");
    let r = qgactl(&["vm", "list"], &[("XDG_CONFIG_HOME", &xdg)]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("config.toml"), "{r:?}");
}

fn sha256_hex(text: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf %s '{text}' | sha256sum"))
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_prove_who_calls_and_grants_limit_them() {
    let rig = Rig::start(|c, _| {
        c.auth = Some(AuthConfig {
            tokens: vec![
                TokenConfig {
                    identity: "ops".into(),
                    sha256: sha256_hex("w-secret"),
                },
                TokenConfig {
                    identity: "viewer".into(),
                    sha256: sha256_hex("r-secret"),
                },
            ],
            grants: vec![
                GrantConfig {
                    identity: "ops".into(),
                    role: Role::Write,
                    vms: vec!["*".into()],
                },
                GrantConfig {
                    identity: "viewer".into(),
                    role: Role::Read,
                    vms: vec!["*".into()],
                },
            ],
        });
    })
    .await;
    let e = rig.endpoint("http");
    let set = ["--endpoint", e.as_str(), "set", "vm", "3=online"];
    let none = qgactl(&set, &[]).await;
    assert_eq!(none.code, 36, "{none:?}");
    assert!(none.stderr.contains("UNAUTHENTICATED"), "{none:?}");
    let wrong = qgactl(&set, &[("QGA_TOKEN", "guess")]).await;
    assert_eq!(wrong.code, 36, "{wrong:?}");
    let reader = qgactl(&set, &[("QGA_TOKEN", "r-secret")]).await;
    assert_eq!(reader.code, 27, "{reader:?}");
    assert_eq!(
        rig.agents[0].control().online(3),
        Some(false),
        "nothing changed"
    );
    let mut with_flag = set.to_vec();
    with_flag.extend(["--token", "w-secret"]);
    let writer = qgactl(&with_flag, &[]).await;
    assert_eq!(writer.code, 0, "{writer:?}");
    assert_eq!(rig.agents[0].control().online(3), Some(true));
    let read = qgactl(
        &["--endpoint", &e, "blocks", "vm"],
        &[("QGA_TOKEN", "r-secret")],
    )
    .await;
    assert_eq!(read.code, 0, "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_client_certificates() {
    let certs = Arc::new(Certs::generate(&["write.example"]).expect("certs"));
    let c2 = certs.clone();
    let rig = Rig::start(move |c, _| {
        c.tls = Some(TlsConfig {
            cert: c2.path("server.pem"),
            key: c2.path("server.key"),
            client_ca: Some(c2.path("ca.pem")),
        });
        c.auth = Some(AuthConfig {
            tokens: vec![],
            grants: vec![GrantConfig {
                identity: "write.example".into(),
                role: Role::Write,
                vms: vec!["*".into()],
            }],
        });
    })
    .await;
    let port = rig.bridge.grpc_addr.expect("TCP listener").port();
    let e = format!("https://localhost:{port}");
    let p = |n: &str| -> PathBuf { certs.path(n) };
    let (ca, cert, key) = (p("ca.pem"), p("write.example.pem"), p("write.example.key"));
    let (ca, cert, key) = (
        ca.to_string_lossy().into_owned(),
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let tls = [
        "--endpoint",
        e.as_str(),
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
    ];
    let good = qgactl(&[&tls[..], &["set", "vm", "5=online"]].concat(), &[]).await;
    assert_eq!(good.code, 0, "{good:?}");
    assert_eq!(rig.agents[0].control().online(5), Some(true));
    // The same from the environment.
    let env = [
        ("QGACTL_ENDPOINT", e.as_str()),
        ("QGACTL_CA", &ca),
        ("QGACTL_CERT", &cert),
        ("QGACTL_KEY", &key),
    ];
    let from_env = qgactl(&["vm", "list"], &env).await;
    assert_eq!(from_env.code, 0, "{from_env:?}");
    // Without a client certificate the handshake fails: the bridge is not reachable.
    let anonymous = qgactl(&["--endpoint", &e, "--ca", &ca, "vm", "list"], &[]).await;
    assert_ne!(anonymous.code, 0, "{anonymous:?}");
    assert!(matches!(anonymous.code, 34 | 36), "{anonymous:?}");
    // A missing key file is a local error naming it.
    let mut no_key = tls;
    no_key[7] = "/nonexistent.key";
    let missing = qgactl(&[&no_key[..], &["vm", "list"]].concat(), &[]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("/nonexistent.key"), "{missing:?}");
    drop(rig);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn completions_for_three_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let r = qgactl(&["completions", shell], &[]).await;
        assert_eq!(r.code, 0, "{shell}: {r:?}");
        assert!(
            r.stdout.contains("qgactl") && r.stdout.len() > 1000,
            "{shell}"
        );
    }
    let help = qgactl(&["--help"], &[]).await;
    assert!(
        help.stdout.contains("Exit codes:")
            && help.stdout.contains("qgactl memory plug vm1 512MiB")
    );
}

#[test]
fn completions_to_a_reader_that_stops_early_succeed() {
    // `qgactl completions bash | grep -q qgactl` under `set -o pipefail`: grep's exit
    // closes the pipe; the script's writer must not fail for it.
    for _ in 0..5 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qgactl"))
            .args(["completions", "bash"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("qgactl runs");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("qgactl ends");
        assert!(
            out.status.success(),
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
