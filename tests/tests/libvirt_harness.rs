//! The libvirt harness against a real libvirtd (started when not running): a transient
//! domain boots, its agent answers through `virsh qemu-agent-command`, a DIMM goes in and
//! out live, and the domain outlives a libvirtd restart.
//!
//! Needs libvirt-daemon-system and libvirt-clients, root, and the guest image; fails, never
//! skips, without them.

use std::time::{Duration, Instant};

use qga_e2e::libvirt::{Domain, Libvirtd, virsh};
use serde_json::{Value, json};

const DIMM: &str = "<memory model='dimm'><target><size unit='MiB'>512</size><node>0</node>\
                    </target></memory>";

/// `(phys-index, online)` of every memory block, through libvirt.
fn blocks(d: &Domain) -> Vec<(u64, bool)> {
    let reply = d
        .agent_command(&json!({"execute": "guest-get-memory-blocks"}), 5)
        .expect("guest-get-memory-blocks");
    let mut blocks: Vec<_> = reply["return"]
        .as_array()
        .expect("a list of blocks")
        .iter()
        .map(|b| {
            (
                b["phys-index"].as_u64().expect("index"),
                b["online"] == true,
            )
        })
        .collect();
    blocks.sort_unstable();
    blocks
}

fn set_online(d: &Domain, indices: &[u64], online: bool) {
    let blks: Vec<Value> = indices
        .iter()
        .map(|i| json!({"phys-index": i, "online": online}))
        .collect();
    let reply = d
        .agent_command(
            &json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": blks}}),
            10,
        )
        .expect("guest-set-memory-blocks");
    let results = reply["return"].as_array().expect("a list of results");
    assert!(
        results.iter().all(|r| r["response"] == "success"),
        "{reply}"
    );
}

/// Polls `cond` every 200 ms for up to `timeout`.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn dimm_in_and_out_through_libvirt_and_a_libvirtd_restart() {
    let d = Domain::start("qga-e2e-harness", "ours").expect("domain boots");
    d.wait_for_agent(Duration::from_secs(30))
        .expect("agent answers");
    let before = blocks(&d);
    assert!(!before.is_empty(), "the agent lists the boot memory");
    let mem_before = d.control().mem_total_kib().expect("MemTotal");

    d.attach_live(DIMM).expect("attach-device --live");
    let xml = d.dumpxml().expect("dumpxml");
    assert!(xml.contains("<alias name='dimm0'/>"), "{xml}");
    let mut added = Vec::new();
    wait_until("4 new blocks", Duration::from_secs(10), || {
        added = blocks(&d)
            .into_iter()
            .filter(|b| !before.contains(b))
            .map(|(i, _)| i)
            .collect();
        added.len() == 4
    });

    set_online(&d, &added, true);
    let grown = mem_before + 512 * 1024;
    wait_until("MemTotal grows by 512 MiB", Duration::from_secs(10), || {
        d.control().mem_total_kib().ok() == Some(grown)
    });
    set_online(&d, &added, false);
    d.virsh("detach-device-alias", &["dimm0", "--live"])
        .expect("detach-device-alias");
    wait_until("dimm0 leaves the live XML", Duration::from_secs(10), || {
        d.dumpxml().is_ok_and(|x| !x.contains("dimm0"))
    });
    assert_eq!(blocks(&d), before, "the DIMM's blocks are gone");

    // The domain outlives its daemon: QEMU keeps running, a new libvirtd reconnects.
    Libvirtd::stop().expect("stop libvirtd");
    assert!(virsh(["list"]).is_err(), "libvirtd is down");
    Libvirtd::start().expect("start libvirtd");
    d.wait_for_agent(Duration::from_secs(10))
        .expect("agent answers after the restart");
    assert_eq!(d.control().mem_total_kib().expect("MemTotal"), mem_before);
}
