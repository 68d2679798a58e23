//! The libvirt harness against a real libvirtd (started when not running): a transient
//! domain boots, its agent answers through `virsh qemu-agent-command`, a DIMM goes in and
//! out live, and the domain outlives a libvirtd restart.
//!
//! Needs libvirt-daemon-system and libvirt-clients, root, and the guest image; fails, never
//! skips, without them.

use std::{fmt::Display, ops::ControlFlow};

use qga_e2e::{
    libvirt::{Domain, Libvirtd, virsh},
    wait::{PATIENCE, until_blocking},
};
use serde_json::{Value, json};

const DIMM: &str = "<memory model='dimm'><target><size unit='MiB'>512</size><node>0</node>\
                    </target></memory>";

/// How long one agent command through libvirt may wait for the answer, in seconds: a
/// bound, not a timing (onlining and offlining in a TCG guest on a loaded machine can take
/// a while; the bridge's own default for a set is two minutes).
const AGENT_TIMEOUT_S: u32 = 120;

/// `(phys-index, online)` of every memory block, through libvirt.
fn blocks(d: &Domain) -> Vec<(u64, bool)> {
    let reply = d
        .agent_command(
            &json!({"execute": "guest-get-memory-blocks"}),
            AGENT_TIMEOUT_S,
        )
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
            AGENT_TIMEOUT_S,
        )
        .expect("guest-set-memory-blocks");
    let results = reply["return"].as_array().expect("a list of results");
    assert!(
        results.iter().all(|r| r["response"] == "success"),
        "{reply}"
    );
}

/// Polls `probe` until it breaks, within [`PATIENCE`]; fails with `what`, the last state
/// seen and the guest's console.
fn wait_until<T, S: Display>(
    d: &Domain,
    what: &str,
    mut probe: impl FnMut() -> ControlFlow<T, S>,
) -> T {
    until_blocking(what, PATIENCE, || anyhow::Ok(probe()))
        .unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{}", d.console_text()))
}

#[test]
fn dimm_in_and_out_through_libvirt_and_a_libvirtd_restart() {
    let d = Domain::start("qga-e2e-harness", "ours").expect("domain boots");
    d.wait_for_agent(PATIENCE).expect("agent answers");
    let before = blocks(&d);
    assert!(!before.is_empty(), "the agent lists the boot memory");
    let mem_before = d.control().mem_total_kib().expect("MemTotal");

    d.attach_live(DIMM).expect("attach-device --live");
    let xml = d.dumpxml().expect("dumpxml");
    assert!(xml.contains("<alias name='dimm0'/>"), "{xml}");
    let added: Vec<u64> = wait_until(&d, "4 new blocks", || {
        let added: Vec<u64> = blocks(&d)
            .into_iter()
            .filter(|b| !before.contains(b))
            .map(|(i, _)| i)
            .collect();
        if added.len() == 4 {
            ControlFlow::Break(added)
        } else {
            ControlFlow::Continue(format!("new blocks {added:?}"))
        }
    });

    set_online(&d, &added, true);
    let grown = mem_before + 512 * 1024;
    wait_until(&d, "MemTotal grows by 512 MiB", || {
        match d.control().mem_total_kib() {
            Ok(kib) if kib == grown => ControlFlow::Break(()),
            Ok(kib) => ControlFlow::Continue(format!("MemTotal {kib} KiB")),
            Err(e) => ControlFlow::Continue(format!("MemTotal unreadable: {e:#}")),
        }
    });
    set_online(&d, &added, false);
    d.virsh("detach-device-alias", &["dimm0", "--live"])
        .expect("detach-device-alias");
    wait_until(&d, "dimm0 leaves the live XML", || match d.dumpxml() {
        Ok(x) if !x.contains("dimm0") => ControlFlow::Break(()),
        Ok(x) => ControlFlow::Continue(x),
        Err(e) => ControlFlow::Continue(format!("dumpxml: {e:#}")),
    });
    assert_eq!(blocks(&d), before, "the DIMM's blocks are gone");

    // The domain outlives its daemon: QEMU keeps running, a new libvirtd reconnects.
    Libvirtd::stop().expect("stop libvirtd");
    assert!(virsh(["list"]).is_err(), "libvirtd is down");
    Libvirtd::start().expect("start libvirtd");
    d.wait_for_agent(PATIENCE)
        .expect("agent answers after the restart");
    assert_eq!(d.control().mem_total_kib().expect("MemTotal"), mem_before);
}
