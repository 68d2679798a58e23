//! Agent against reference: the same fake trees, the same client, alternating runs.

use std::time::{Duration, Instant};

use anyhow::Context;
use qga_testkit::{AgentKind, AgentProcess, FakeSysfs, QgaClient};
use serde_json::{Value, json};

use crate::{
    procfs::{self, Memory},
    report::Report,
    stats::{Samples, fmt_duration, ratio},
};

/// One agent's figures for one workload.
struct Side {
    latency: Samples,
    memory: Memory,
    /// Mean user and system CPU time per call.
    cpu: (Duration, Duration),
}

/// Time from sending `req` until the last byte of the reply arrived; the reply is parsed
/// and checked after the clock stops, so client-side JSON parsing is not counted.
fn timed(client: &mut QgaClient, req: &Value) -> anyhow::Result<Duration> {
    let bytes = serde_json::to_vec(req)?;
    let start = Instant::now();
    client.send_raw(&bytes)?;
    let line = client.read_line_raw()?;
    let elapsed = start.elapsed();
    let reply: Value = serde_json::from_slice(&line)?;
    anyhow::ensure!(reply.get("return").is_some(), "agent failed: {reply}");
    Ok(elapsed)
}

/// Runs `req` `runs` times on each agent, alternating, after one warm-up call each.
fn alternate(
    agents: [&AgentProcess; 2],
    runs: usize,
    mut req: impl FnMut(usize) -> Value,
) -> anyhow::Result<[Side; 2]> {
    let mut clients = [agents[0].client()?, agents[1].client()?];
    for c in &mut clients {
        timed(c, &req(0))?;
    }
    let mut lat = [Samples::with_capacity(runs), Samples::with_capacity(runs)];
    let mut cpu = [(Duration::ZERO, Duration::ZERO); 2];
    for i in 0..runs {
        for (k, (c, l)) in clients.iter_mut().zip(lat.iter_mut()).enumerate() {
            let (u0, s0) = procfs::cpu_split(agents[k].pid())?;
            l.push(timed(c, &req(i + 1))?);
            let (u1, s1) = procfs::cpu_split(agents[k].pid())?;
            cpu[k].0 += u1.saturating_sub(u0);
            cpu[k].1 += s1.saturating_sub(s0);
        }
    }
    let n = u32::try_from(runs.max(1)).unwrap_or(u32::MAX);
    let [l0, l1] = lat;
    Ok([
        Side {
            latency: l0,
            memory: procfs::memory(agents[0].pid())?,
            cpu: (cpu[0].0 / n, cpu[0].1 / n),
        },
        Side {
            latency: l1,
            memory: procfs::memory(agents[1].pid())?,
            cpu: (cpu[1].0 / n, cpu[1].1 / n),
        },
    ])
}

fn row(report: &mut Report, workload: &str, sides: &[Side; 2]) {
    let [ours, reference] = sides;
    report.row(&[
        workload.to_string(),
        ours.latency.p50_p99(),
        reference.latency.p50_p99(),
        ratio(reference.latency.p50(), ours.latency.p50()),
        format!(
            "{:.1} / {:.1}",
            mib(ours.memory.peak_kib),
            mib(ours.memory.rss_kib)
        ),
        format!(
            "{:.1} / {:.1}",
            mib(reference.memory.peak_kib),
            mib(reference.memory.rss_kib)
        ),
        format!(
            "{:.1}x",
            reference.memory.peak_kib as f64 / ours.memory.peak_kib.max(1) as f64
        ),
        format!(
            "{} / {}",
            fmt_duration(ours.cpu.0),
            fmt_duration(ours.cpu.1)
        ),
        format!(
            "{} / {}",
            fmt_duration(reference.cpu.0),
            fmt_duration(reference.cpu.1)
        ),
    ]);
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn start_pair(
    tree_ours: &FakeSysfs,
    tree_ref: &FakeSysfs,
) -> anyhow::Result<(AgentProcess, AgentProcess)> {
    let ours = AgentProcess::start(AgentKind::Ours, tree_ours, &[]).context("start qga-agent")?;
    let reference = AgentProcess::start(AgentKind::Reference, tree_ref, &[])
        .context("start qemu-ga (needs root, unshare and qemu-guest-agent)")?;
    Ok((ours, reference))
}

/// The whole section.
pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    intro(report);
    let get = json!({"execute": "guest-get-memory-blocks"});
    for (blocks, runs) in [(256u64, 200usize), (4096, 50), (32768, 12)] {
        let runs = if quick { runs / 4 + 1 } else { runs };
        let (t1, t2) = twin_trees(blocks, "online");
        let (ours, reference) = start_pair(&t1, &t2)?;
        let sides = alternate([&ours, &reference], runs, |_| get.clone())?;
        row(
            report,
            &format!("get-memory-blocks, {blocks} blocks ({runs} runs)"),
            &sides,
        );
    }
    real_sysfs(report, quick, &get)?;
    set_all_blocks(report, quick)?;
    report.end_table();
    idle(report)?;
    Ok(())
}

/// The section's heading, how it measures, and the head of its table.
fn intro(report: &mut Report) {
    report.heading("Agent against the reference");
    report.para(
        "`qga-agent` (release build) and Debian's `qemu-ga` 7.2 serve identical fake trees on tmpfs \
         (`/dev/shm`; qemu-ga sees its tree through a bind mount over `/sys/devices/system/memory` in \
         a private mount namespace). One blocking Rust client per agent over its unix socket; runs \
         alternate between the two agents, one warm-up call each first. A fresh pair of agents per \
         workload, so peak RSS (`VmHWM`) belongs to that workload; `RSS after` is `VmRSS` after the \
         last reply. CPU per call is the agent process's user and system time (all threads, 10 ms \
         clock ticks, averaged over the runs): it shows where the time goes. Latency runs from sending the request to the arrival of the last byte of the reply (the reply is parsed and checked after the clock stops).",
    );
    report.table(&[
        "workload",
        "qga-agent p50 / p99",
        "qemu-ga p50 / p99",
        "speed-up (p50)",
        "qga-agent peak / after (MiB)",
        "qemu-ga peak / after (MiB)",
        "peak RSS ratio",
        "qga-agent CPU/call user / sys",
        "qemu-ga CPU/call user / sys",
    ]);
}

/// Two identical fake trees of `blocks` blocks in `state`, one per agent.
fn twin_trees(blocks: u64, state: &str) -> (FakeSysfs, FakeSysfs) {
    (
        FakeSysfs::with_blocks(blocks, state),
        FakeSysfs::with_blocks(blocks, state),
    )
}

/// The row of `get` on this machine's own sysfs, both agents reading it.
fn real_sysfs(report: &mut Report, quick: bool, get: &Value) -> anyhow::Result<()> {
    let runs = if quick { 10 } else { 50 };
    let ours = AgentProcess::start_on_real_sysfs(AgentKind::Ours, &[])?;
    let reference = AgentProcess::start_on_real_sysfs(AgentKind::Reference, &[])?;
    let n = ours.client()?.request(get)?["return"]
        .as_array()
        .map_or(0, Vec::len);
    let sides = alternate([&ours, &reference], runs, |_| get.clone())?;
    row(
        report,
        &format!("get-memory-blocks, this machine's real sysfs, {n} blocks ({runs} runs)"),
        &sides,
    );
    Ok(())
}

/// The row of `guest-set-memory-blocks` on 4,096 blocks, each call flipping every one.
fn set_all_blocks(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let runs = if quick { 4 } else { 10 };
    let (t1, t2) = twin_trees(4096, "offline");
    let (ours, reference) = start_pair(&t1, &t2)?;
    // Each call flips every block, so every run writes 4,096 `state` files.
    let set = |i: usize| {
        let online = i.is_multiple_of(2);
        let blks: Vec<Value> = (0..4096)
            .map(|b| json!({"phys-index": b, "online": online}))
            .collect();
        json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": blks}})
    };
    let sides = alternate([&ours, &reference], runs, set)?;
    row(
        report,
        &format!("set-memory-blocks, 4096 entries, all change ({runs} runs)"),
        &sides,
    );
    Ok(())
}

/// CPU time and RSS of both agents sitting idle with a connected client.
fn idle(report: &mut Report) -> anyhow::Result<()> {
    const IDLE: Duration = Duration::from_secs(5);
    let (t1, t2) = twin_trees(64, "online");
    let (ours, reference) = start_pair(&t1, &t2)?;
    let _clients = (ours.client()?, reference.client()?);
    let before = [
        procfs::cpu_time(ours.pid())?,
        procfs::cpu_time(reference.pid())?,
    ];
    std::thread::sleep(IDLE);
    let after = [
        procfs::cpu_time(ours.pid())?,
        procfs::cpu_time(reference.pid())?,
    ];
    let mem = [
        procfs::memory(ours.pid())?,
        procfs::memory(reference.pid())?,
    ];
    report.para(&format!(
        "Idle for {} s with a client connected (unix-listen): qga-agent used {} of CPU and {:.1} MiB RSS; \
         qemu-ga used {} of CPU and {:.1} MiB RSS. (CPU time has 10 ms resolution.)",
        IDLE.as_secs(),
        fmt_duration(after[0].saturating_sub(before[0])),
        mib(mem[0].rss_kib),
        fmt_duration(after[1].saturating_sub(before[1])),
        mib(mem[1].rss_kib),
    ));
    Ok(())
}
