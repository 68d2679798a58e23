//! Discovery through a running bridge: colliding names are withheld until the collision
//! goes, symlinks, regular files and foreign-owned sockets are never served, and
//! `limits.max_vms` caps configured plus discovered VMs.
//!
//! Negative checks ride on a positive one: a marker socket is created with the refused
//! matches, and once one scan has exposed it, that scan has also seen (and refused) them.

mod common;

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{clients, config, rpc, start, until_listed};
use jsonrpsee::http_client::HttpClient;
use qga_bridge::config::VmConfig;
use qga_fake_agent::FakeAgent;
use serde_json::json;

fn domain(root: &Path, dir: &str) -> PathBuf {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).expect("mkdir");
    d.join("org.qemu.guest_agent.0")
}

fn discovering(root: &Path) -> qga_bridge::Config {
    let mut cfg = config(&[]);
    cfg.discover = vec![format!(
        "{}/domain-*/org.qemu.guest_agent.0",
        root.display()
    )];
    cfg.discover_interval = Duration::from_millis(20);
    cfg
}

async fn blocks(http: &HttpClient, vm: &str) -> usize {
    rpc(http, "guest-get-memory-blocks", json!({ "vm": vm }))
        .await
        .expect("VM answers")
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_names_are_withheld_until_one_goes() {
    let root = tempfile::tempdir().expect("tempdir");
    let first = FakeAgent::start(&domain(root.path(), "domain-1-web"), 2).expect("first");
    let bridge = start(discovering(root.path())).await;
    let c = clients(&bridge).await;
    until_listed(&c.http, |n| n == ["web"]).await;
    assert_eq!(blocks(&c.http, "web").await, 2);

    // Another domain whose directory gives the same name, and a marker.
    let second = FakeAgent::start(&domain(root.path(), "domain-2-web"), 3).expect("second");
    let _marker = FakeAgent::start(&domain(root.path(), "domain-3-marker"), 1).expect("marker");
    // The scan that adds the marker withdraws `web`: neither socket is reachable.
    until_listed(&c.http, |n| n == ["marker"]).await;
    let refused = rpc(&c.http, "guest-ping", json!({"vm": "web"}))
        .await
        .expect_err("web is ambiguous");
    assert_eq!(refused.0, -32001);

    // The first domain goes: `web` is back, and it is the second domain.
    drop(first);
    until_listed(&c.http, |n| n == ["marker", "web"]).await;
    assert_eq!(blocks(&c.http, "web").await, 3);
    drop(second);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_real_sockets_of_accepted_owners_are_served() {
    let root = tempfile::tempdir().expect("tempdir");
    let real = domain(root.path(), "domain-1-real");
    let _real = UnixListener::bind(&real).expect("bind");
    // A symlink to a real socket, a regular file.
    std::os::unix::fs::symlink(&real, domain(root.path(), "domain-2-link")).expect("symlink");
    std::fs::write(domain(root.path(), "domain-3-file"), b"").expect("file");
    let mut foreign = None;
    if rustix::process::geteuid().is_root() {
        let theirs = domain(root.path(), "domain-4-theirs");
        foreign = Some(UnixListener::bind(&theirs).expect("bind"));
        std::os::unix::fs::lchown(&theirs, Some(12345), None).expect("lchown");
    }
    let _marker = UnixListener::bind(domain(root.path(), "domain-5-marker")).expect("bind");

    let bridge = start(discovering(root.path())).await;
    let c = clients(&bridge).await;
    let names = until_listed(&c.http, |n| n.iter().any(|n| n == "marker")).await;
    assert_eq!(names, ["marker", "real"]);
    drop(foreign);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_vms_caps_configured_and_discovered() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cfg = discovering(root.path());
    let configured = VmConfig::agent(root.path().join("configured.sock"));
    cfg.vms.insert("cfg".into(), configured);
    cfg.limits.max_vms = 3;
    let mut sockets: Vec<Option<UnixListener>> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            Some(UnixListener::bind(domain(root.path(), &format!("domain-1-{n}"))).expect("bind"))
        })
        .collect();
    let bridge = start(cfg).await;
    let c = clients(&bridge).await;
    // Two discovered fit beside the configured one, in name order.
    until_listed(&c.http, |n| n == ["a", "b", "cfg"]).await;
    // A freed slot goes to the next match.
    sockets[0] = None;
    std::fs::remove_file(domain(root.path(), "domain-1-a")).expect("rm");
    until_listed(&c.http, |n| n == ["b", "c", "cfg"]).await;
    drop(sockets);
    bridge.shutdown().await;
}
