//! Loading: the file, the flags over it, and what validation refuses, by which key.

use std::path::Path;

use clap::Parser;

use super::{cli::DEFAULT_PROXMOX_DIR, *};

/// `Config::load` of the file `text` (written to a temporary file) and the flags `args`.
fn load(text: &str, args: &[&str]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("c.toml");
    std::fs::write(&file, text).expect("write");
    let cli = Cli {
        config: Some(file),
        ..Cli::try_parse_from(std::iter::once("qga-bridge").chain(args.iter().copied()))
            .expect("parses")
    };
    Config::load(&cli)
}

/// The message of the error loading `text` with `args`.
fn refused(text: &str, args: &[&str]) -> String {
    load(text, args).expect_err("refused").to_string()
}

#[test]
fn toml_and_flags() {
    let mut c = Config::default();
    c.apply_toml(
        Path::new("t.toml"),
        "grpc_addr = \"127.0.0.1:1\"\n[vms]\nvm1 = \"/a.sock\"\n[timeouts]\ndefault_ms = 50\n[timeouts.commands]\nguest-ping = 7\n[limits]\nqueue_depth = 3\n",
    )
    .expect("valid");
    assert_eq!(
        c.grpc_addr,
        Listen::Tcp("127.0.0.1:1".parse().expect("addr"))
    );
    assert_eq!(c.vms["vm1"], VmConfig::agent("/a.sock".into()));
    assert_eq!(
        c.timeouts.for_command("guest-ping"),
        Duration::from_millis(7)
    );
    assert_eq!(
        c.timeouts.for_command("guest-info"),
        Duration::from_millis(50)
    );
    assert_eq!(
        c.timeouts.for_command("guest-set-memory-blocks"),
        Duration::from_secs(120)
    );
    assert_eq!(c.limits.queue_depth, 3);
    assert!(c.apply_toml(Path::new("t"), "bogus = 1\n").is_err());
}

#[test]
fn vms_with_qmp_sockets() {
    let mut c = Config::default();
    c.apply_toml(
        Path::new("t.toml"),
        "[vms]\na = \"/a.sock\"\nb = { qga = \"/b.sock\", qmp = \"/b.qmp\" }\nc = { qga = \"/c.sock\", auto_online = \"keep\" }\n[hotplug]\ndimm_size_bytes = 1073741824\n",
    )
    .expect("valid");
    assert_eq!(c.hotplug.auto_online, AutoOnline::Movable);
    assert_eq!(
        c.vms["c"].auto_online,
        Some(AutoOnline::Keep),
        "a VM's own auto_online"
    );
    assert!(
        Config::default()
            .apply_toml(
                Path::new("t.toml"),
                "[vms]\nc = { qga = \"/c\", auto_online = \"off\" }\n"
            )
            .is_err(),
        "an unknown auto_online is refused"
    );
    assert_eq!(c.vms.len(), 3);
    assert_eq!(c.vms["b"].qga, PathBuf::from("/b.sock"));
    assert_eq!(c.vms["b"].qmp, Some(PathBuf::from("/b.qmp")));
    assert_eq!(c.vms.values().filter(|vm| vm.qmp.is_some()).count(), 1);
    assert_eq!(c.hotplug.dimm_size_bytes, 1 << 30);
    assert!(!c.vms.values().any(VmConfig::shared));
    c.apply_toml(
        Path::new("t.toml"),
        "[vms]\np = { qga = \"/p.qga\", mode = \"shared\" }\n",
    )
    .expect("valid");
    assert!(c.vms["p"].shared());
    assert!(
        c.apply_toml(Path::new("t"), "[vms]\nb = { qmp = \"/b.qmp\" }\n")
            .is_err(),
        "no agent socket"
    );
    assert!(
        c.apply_toml(
            Path::new("t"),
            "[vms]\nb = { qga = \"/b.sock\", qpm = \"/b.qmp\" }\n"
        )
        .is_err(),
        "a misspelt key"
    );
}

#[test]
fn flags_over_the_files_vms() {
    let c = load(
        "[vms]\na = { qga = \"/a\", mode = \"shared\", auto_online = \"keep\" }\n",
        &["--vm", "a=/new", "--qmp", "a=/a.qmp", "--vm", "b=/b"],
    )
    .expect("valid");
    let a = &c.vms["a"];
    assert_eq!(
        a.qga,
        PathBuf::from("/new"),
        "--vm replaces the agent socket"
    );
    assert_eq!(a.qmp, Some(PathBuf::from("/a.qmp")));
    assert!(a.shared(), "and keeps the file's other settings");
    assert_eq!(a.auto_online, Some(AutoOnline::Keep));
    assert_eq!(c.vms["b"], VmConfig::agent("/b".into()));

    let err = refused("", &["--vm", "a=/a", "--qmp", "z=/z"]);
    assert_eq!(
        err,
        "invalid configuration: --qmp z=/z: VM 'z' has a QMP socket but no agent socket: \
         give it with --vm or [vms]"
    );
}

#[test]
fn errors_name_the_key_as_written() {
    let err = refused("[limits]\nmax_in_flight = 0\n", &[]);
    assert_eq!(
        err,
        "invalid configuration: limits.max_in_flight: must be at least 1, not 0"
    );
    let err = refused("[timeouts]\nresync_ms = 0\n", &[]);
    assert!(
        err.contains("timeouts.resync_ms: must be at least 1"),
        "{err}"
    );
    let err = refused("[hotplug]\ntimeout_ms = 86400001\n", &[]);
    assert!(
        err.contains("hotplug.timeout_ms: must be at most 86400000 (one day), not 86400001"),
        "{err}"
    );
    let err = refused(
        "[vms]\na = { qga = \"/a\", qmp = \"/q\" }\nb = { qga = \"/b\", qmp = \"/q\" }\n",
        &[],
    );
    assert_eq!(
        err,
        "invalid configuration: vms.a.qmp and vms.b.qmp: VMs 'a' and 'b' have the same QMP \
         socket /q"
    );
    let err = refused(
        "[vms]\n\"web.1\" = { qga = \"/a\", qmp = \"/q\" }\n",
        &["--vm", "b=/b", "--qmp", "b=/q"],
    );
    assert!(
        err.contains("--qmp b=/q and vms.\"web.1\".qmp: VMs 'b' and 'web.1'"),
        "{err}"
    );
    let err = refused("[vms]\n\"a b\" = \"/a\"\n", &[]);
    assert!(err.contains("vms.\"a b\": invalid VM name 'a b'"), "{err}");
    let err = refused("[limits]\nbody_budget_bytes = 1024\n", &[]);
    assert!(
        err.contains("limits.body_budget_bytes and limits.jsonrpc_max_request_bytes: the budget"),
        "the key as the user wrote it, deprecated: {err}"
    );
    let err = refused("[unix_sockets]\nmode = 0o1777\n", &[]);
    assert!(
        err.contains("unix_sockets.mode: 1777 is not a file mode"),
        "{err}"
    );
    let err = refused("[http]\nallowed_origins = [\"https://a/\"]\n", &[]);
    assert!(
        err.contains("http.allowed_origins: 'https://a/' must be"),
        "{err}"
    );
    let err = refused("", &["--allowed-origin", "a.example"]);
    assert!(
        err.contains("--allowed-origin: 'a.example' must be"),
        "{err}"
    );
    let err = refused("", &["--discover", "/run/[*/q"]);
    assert!(err.contains("--discover: bad glob '/run/[*/q'"), "{err}");
    let err = refused("[[auth.tokens]]\nidentity = \"x\"\nsha256 = \"abc\"\n", &[]);
    assert!(
        err.contains("auth.tokens: the token of 'x': sha256 must be 64 hex digits"),
        "{err}"
    );
}

#[test]
fn non_loopback_tcp_needs_the_explicit_flag() {
    let open = |allow: bool| Cli {
        jsonrpc_addr: Some(Listen::Tcp(SocketAddr::from(([0, 0, 0, 0], 8080)))),
        allow_insecure_tcp: allow,
        ..Cli::default()
    };
    let err = Config::load(&open(false)).expect_err("refused").to_string();
    assert!(
        err.contains("--jsonrpc-addr: the JSON-RPC address 0.0.0.0:8080 is not loopback"),
        "{err}"
    );
    assert!(Config::load(&open(true)).is_ok());
    let err = refused("metrics_addr = \"0.0.0.0:9100\"\n", &[]);
    assert!(
        err.contains("metrics_addr: the metrics address 0.0.0.0:9100 is not loopback"),
        "{err}"
    );
    let ipv6 = Cli {
        grpc_addr: Some("[::1]:50051".parse().expect("addr")),
        jsonrpc_addr: Some("unix:/run/qga-bridge/jsonrpc.sock".parse().expect("unix")),
        ..Cli::default()
    };
    assert!(
        Config::load(&ipv6).is_ok(),
        "IPv6 loopback and unix sockets are local"
    );
    assert!("unix:relative.sock".parse::<Listen>().is_err());
}

#[test]
fn discover_proxmox_flag_and_key() {
    let parse = |args: &[&str]| {
        let cli = Cli::try_parse_from(std::iter::once("qga-bridge").chain(args.iter().copied()))
            .expect("parses");
        Config::load(&cli).expect("valid").discover_proxmox
    };
    assert_eq!(parse(&[]), None);
    assert_eq!(
        parse(&["--discover-proxmox"]),
        Some(PathBuf::from("/var/run/qemu-server")),
        "the default directory"
    );
    assert_eq!(
        parse(&["--discover-proxmox", "--vm", "a=/a"]),
        Some(PathBuf::from(DEFAULT_PROXMOX_DIR)),
        "a flag after it is not its value"
    );
    assert_eq!(
        parse(&["--discover-proxmox", "/srv/pve"]),
        Some(PathBuf::from("/srv/pve"))
    );
    assert_eq!(
        parse(&["--discover-proxmox=/srv/pve"]),
        Some(PathBuf::from("/srv/pve"))
    );

    let mut c = Config::default();
    c.apply_toml(
        Path::new("t.toml"),
        "discover_proxmox = \"/var/run/qemu-server\"\n",
    )
    .expect("valid");
    assert_eq!(
        c.discover_proxmox,
        Some(PathBuf::from("/var/run/qemu-server"))
    );
    assert!(c.discover.is_empty(), "no glob needed");

    let no_owners = "discover_proxmox = \"/pve\"\ndiscover_owners = []\n";
    let err = refused(no_owners, &[]);
    assert!(err.contains("discover_owners: no uid given"), "{err}");
    let err = refused(no_owners, &["--discover-proxmox", "/other"]);
    assert!(err.contains("discover_owners"), "still no owners: {err}");
}

#[test]
fn discovery_owners_and_max_vms() {
    let me = rustix::process::geteuid().as_raw();
    let c = Config::default();
    assert!(c.discover_owners.contains(&0) && c.discover_owners.contains(&me));
    assert_eq!(c.limits.max_vms, 4096);

    let text = "discover = [\"/run/*/q\"]\ndiscover_owners = [64055]\n[limits]\nmax_vms = 2\n";
    let c = load(text, &[]).expect("valid");
    assert_eq!(c.discover_owners, [64055]);
    assert_eq!(c.limits.max_vms, 2);
    let flags = ["--discover-owner", "7", "--discover-owner", "8"];
    assert_eq!(load(text, &flags).expect("valid").discover_owners, [7, 8]);

    let err = refused(
        "[vms]\na = \"/a\"\nb = \"/b\"\nc = \"/c\"\n[limits]\nmax_vms = 2\n",
        &[],
    );
    assert!(
        err.contains("limits.max_vms: 2 is fewer than the 3 VMs configured"),
        "{err}"
    );

    let err = refused("discover = [\"/run/*/q\"]\ndiscover_owners = []\n", &[]);
    assert!(err.contains("discover_owners"), "{err}");
}

#[test]
fn deprecated_keys_are_read_as_their_new_names_and_warned_about() {
    for d in file::RENAMED {
        let (section, old) = d.old.split_once('.').expect("a section");
        let (_, new) = d.new.split_once('.').expect("a section");
        let read = |key: &str| {
            let mut c = Config::default();
            c.apply_toml(Path::new("t"), &format!("[{section}]\n{key} = 7\n"))
                .expect("valid");
            c
        };
        let (by_old, by_new) = (read(old), read(new));
        assert_eq!(by_old.deprecated, [*d], "{d}");
        assert!(by_new.deprecated.is_empty(), "{}", d.new);
        assert_eq!(
            format!("{:?}{:?}", by_old.limits, by_old.hotplug),
            format!("{:?}{:?}", by_new.limits, by_new.hotplug),
            "{} is read as {}",
            d.old,
            d.new
        );
        assert_ne!(
            format!("{:?}{:?}", by_new.limits, by_new.hotplug),
            format!(
                "{:?}{:?}",
                Config::default().limits,
                Config::default().hotplug
            ),
            "{} is a key",
            d.new
        );
        let both = Config::default()
            .apply_toml(
                Path::new("t"),
                &format!("[{section}]\n{old} = 7\n{new} = 7\n"),
            )
            .expect_err("both names")
            .to_string();
        assert_eq!(
            both,
            format!(
                "invalid configuration: {} and {}: the same setting under its deprecated and \
                 its new name: keep only {}",
                d.old, d.new, d.new
            )
        );
    }
}

#[test]
fn deprecated_keys_through_load() {
    let c = load(
        "[limits]\nmax_connections = 5\nmax_batch = 6\n[hotplug]\nqmp_timeout_ms = 7000\n",
        &[],
    )
    .expect("valid");
    assert_eq!(c.limits.jsonrpc_max_connections, 5);
    assert_eq!(c.limits.jsonrpc_max_batch, 6);
    assert_eq!(c.hotplug.hypervisor_timeout_ms, 7000);
    let warnings: Vec<String> = c.deprecated.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "config key limits.max_connections is deprecated; use limits.jsonrpc_max_connections",
            "config key limits.max_batch is deprecated; use limits.jsonrpc_max_batch",
            "config key hotplug.qmp_timeout_ms is deprecated; use hotplug.hypervisor_timeout_ms",
        ]
    );
    let c = load("[limits]\njsonrpc_max_connections = 5\n", &[]).expect("valid");
    assert_eq!(c.limits.jsonrpc_max_connections, 5);
    assert!(c.deprecated.is_empty());
    let err = refused("[limits]\nmax_batch = 0\n", &[]);
    assert_eq!(
        err, "invalid configuration: limits.max_batch: must be at least 1, not 0",
        "named as written"
    );
}

#[test]
fn signals_section_defaults_bounds_and_off() {
    let c = load("", &[]).expect("defaults");
    assert_eq!(
        c.signals,
        SignalsConfig {
            max_age_ms: 1000,
            poll_interval_ms: 10_000
        }
    );
    let c = load("[signals]\nmax_age_ms = 0\npoll_interval_ms = 0\n", &[]).expect("off");
    assert_eq!((c.signals.max_age_ms, c.signals.poll_interval_ms), (0, 0));
    let c = load("[signals]\npoll_interval_ms = 1000\n", &[]).expect("one key");
    assert_eq!(c.signals.max_age_ms, 1000, "absent keys at their defaults");
    let err = refused("[signals]\npoll_interval_ms = 50\n", &[]);
    assert_eq!(
        err,
        "invalid configuration: signals.poll_interval_ms: must be at least 100, not 50"
    );
    let err = refused("[signals]\nmax_age_ms = 86400001\n", &[]);
    assert!(
        err.contains("signals.max_age_ms: must be at most 86400000 (one day)"),
        "{err}"
    );
    let err = refused("[signals]\nmax_age = 5\n", &[]);
    assert!(err.contains("unknown field `max_age`"), "{err}");
}
