//! Hostile guests: a soak of 1,000 VMs of which a tenth misbehave for the whole run, and
//! a healthy VM's latency while eight guests flood the bridge.
//!
//! The agents are `qga_fake_agent`s in this process, on a runtime of their own, so the
//! soak can read what each agent actually applied. Every reply is checked against the
//! call that asked for it: each healthy VM owns a block range of its own, and set results
//! must name the requested blocks in order.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use qga_fake_agent::{FakeAgent, Hostile, HostileAgent};
use qga_proto::v1::{
    GetMemoryBlockInfoRequest, GetMemoryBlocksRequest, MemoryBlockChange, PingRequest,
    SetMemoryBlocksRequest, guest_agent_client::GuestAgentClient,
    guest_memory_client::GuestMemoryClient,
};
use tokio::{sync::Mutex, task::JoinHandle};
use tonic::{Request, transport::Channel};

use crate::{
    bridge::Bridge,
    procfs,
    report::Report,
    stats::{Samples, fmt_duration},
};

const VMS: usize = 1000;
/// Blocks per healthy VM; VM `i` owns `i * 1000 ..`.
const BLOCKS: u64 = 8;

/// What VM `i` is in the soak: every tenth is hostile, the hostile ones cycle through
/// the four hostile modes and an agent that restarts every second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Healthy,
    Hostile(Hostile),
    Restarting,
}

fn role(i: usize) -> Role {
    if i % 10 != 9 {
        return Role::Healthy;
    }
    match (i / 10) % 5 {
        4 => Role::Restarting,
        k => Role::Hostile(Hostile::ALL[k]),
    }
}

/// A small xorshift generator: the load needs spread, not statistics.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the callers saw.
#[derive(Default)]
struct Tally {
    healthy: Samples,
    healthy_failed: BTreeMap<String, u64>,
    hostile: BTreeMap<String, u64>,
    misdelivered: u64,
    sets_ok: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.healthy.extend(&other.healthy);
        for (k, v) in other.healthy_failed {
            *self.healthy_failed.entry(k).or_default() += v;
        }
        for (k, v) in other.hostile {
            *self.hostile.entry(k).or_default() += v;
        }
        self.misdelivered += other.misdelivered;
        self.sets_ok += other.sets_ok;
    }

    /// Counts one call's `outcome` on a VM in `role`: a right answer from a healthy VM is
    /// a latency sample (and a set answered, if `is_set`), a right answer from a hostile
    /// one is misdelivered, as is any wrong answer.
    fn record(
        &mut self,
        role: Role,
        is_set: bool,
        outcome: Result<bool, tonic::Code>,
        elapsed: Duration,
    ) {
        match (role, outcome) {
            (_, Ok(false)) => self.misdelivered += 1,
            (Role::Hostile(_), Ok(true)) => self.misdelivered += 1,
            (Role::Healthy, Ok(true)) => {
                self.healthy.push(elapsed);
                self.sets_ok += u64::from(is_set);
            }
            (Role::Healthy, Err(code)) => {
                *self.healthy_failed.entry(format!("{code:?}")).or_default() += 1;
            }
            (_, Ok(true)) => *self.hostile.entry("OK".into()).or_default() += 1,
            (_, Err(code)) => *self.hostile.entry(format!("{code:?}")).or_default() += 1,
        }
    }

    /// The soak's table over `secs`: what the callers saw, then the set outcomes
    /// accounted for (`sets`) and the bridge's memory (`rss`).
    fn rows(&self, secs: u64, sets: String, rss: String) -> [(&'static str, String); 7] {
        let rate = self.healthy.len() as f64 / secs as f64;
        [
            (
                "healthy calls answered",
                format!("{} ({rate:.0}/s)", self.healthy.len()),
            ),
            (
                "healthy p50 / p99",
                if self.healthy.is_empty() {
                    "-".into()
                } else {
                    self.healthy.p50_p99()
                },
            ),
            ("healthy calls failed", outcomes(&self.healthy_failed)),
            ("hostile and restarting VMs' calls", outcomes(&self.hostile)),
            ("misdelivered replies", self.misdelivered.to_string()),
            (
                "sets applied by healthy agents / answered / recorded late / lost",
                sets,
            ),
            ("bridge RSS idle / peak (MiB)", rss),
        ]
    }
}

fn with_deadline<T>(msg: T, d: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(d);
    r
}

/// One call on VM `vm` chosen by `r`: 40% Ping, 20% GetMemoryBlocks, 10%
/// GetMemoryBlockInfo, 30% SetMemoryBlocks (the `true` that comes first). `Ok(true)`:
/// answered and right; `Ok(false)`: answered but not the answer to this call; `Err`: the
/// status code.
async fn one_call(
    agent: &mut GuestAgentClient<Channel>,
    memory: &mut GuestMemoryClient<Channel>,
    vm: usize,
    r: u64,
) -> (bool, Result<bool, tonic::Code>) {
    let name = format!("vm{vm}");
    let base = vm as u64 * 1000;
    match r % 10 {
        0..=3 => (
            false,
            agent
                .ping(with_deadline(PingRequest { vm: name }, QUICK))
                .await
                .map(|_| true)
                .map_err(|s| s.code()),
        ),
        4 | 5 => (false, own_blocks(memory, name, base).await),
        6 => (
            false,
            memory
                .get_memory_block_info(with_deadline(GetMemoryBlockInfoRequest { vm: name }, QUICK))
                .await
                .map(|reply| reply.into_inner().size == 128 << 20)
                .map_err(|s| s.code()),
        ),
        _ => (true, set_two_blocks(memory, name, base, r).await),
    }
}

/// The deadline of a call that only reads.
const QUICK: Duration = Duration::from_secs(5);

/// GetMemoryBlocks on VM `name`: right when it lists exactly the blocks of that VM's
/// range, from `base`.
async fn own_blocks(
    memory: &mut GuestMemoryClient<Channel>,
    name: String,
    base: u64,
) -> Result<bool, tonic::Code> {
    memory
        .get_memory_blocks(with_deadline(GetMemoryBlocksRequest { vm: name }, QUICK))
        .await
        .map(|reply| {
            let idx: Vec<u64> = reply
                .into_inner()
                .blocks
                .iter()
                .map(|b| b.phys_index)
                .collect();
            idx == (base..base + BLOCKS).collect::<Vec<_>>()
        })
        .map_err(|s| s.code())
}

/// SetMemoryBlocks of two different blocks of VM `name`'s range (from `base`), both
/// online or both offline, as `r` picks: right when the results name the blocks asked
/// for, in order.
async fn set_two_blocks(
    memory: &mut GuestMemoryClient<Channel>,
    name: String,
    base: u64,
    r: u64,
) -> Result<bool, tonic::Code> {
    let first = base + (r >> 8) % BLOCKS;
    let second = base + ((r >> 8) + 1 + (r >> 16) % (BLOCKS - 1)) % BLOCKS;
    let asked = [first, second];
    let blocks = asked
        .iter()
        .map(|&phys_index| MemoryBlockChange {
            phys_index,
            online: (r >> 24).is_multiple_of(2),
        })
        .collect();
    let reply = memory
        .set_memory_blocks(with_deadline(
            SetMemoryBlocksRequest { vm: name, blocks },
            Duration::from_secs(10),
        ))
        .await;
    reply
        .map(|reply| {
            let got: Vec<u64> = reply
                .into_inner()
                .results
                .iter()
                .map(|b| b.phys_index)
                .collect();
            got == asked
        })
        .map_err(|s| s.code())
}

/// A free loopback port for the bridge's metrics.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET /metrics`.
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The sum of `qga_bridge_late_replies_total` over the VMs `keep` accepts.
fn late_replies(metrics: &str, keep: impl Fn(usize) -> bool) -> u64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("qga_bridge_late_replies_total{vm=\"vm"))
        .filter_map(|rest| {
            let (i, value) = rest.split_once("\"} ")?;
            keep(i.parse().ok()?).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

/// Agents on a runtime of their own; dropped with it.
pub struct Agents {
    runtime: Option<tokio::runtime::Runtime>,
    healthy: Vec<(usize, FakeAgent)>,
    _hostile: Vec<HostileAgent>,
}

impl Agents {
    pub fn start(dir: &Path, count: usize, role: impl Fn(usize) -> Role) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut healthy = Vec::new();
        let mut hostile = Vec::new();
        {
            let _in = runtime.enter();
            for i in 0..count {
                let path = dir.join(format!("vm{i}.sock"));
                match role(i) {
                    Role::Healthy => {
                        let base = i as u64 * 1000;
                        healthy.push((i, FakeAgent::start_blocks(&path, base..base + BLOCKS)?));
                    }
                    Role::Hostile(mode) => hostile.push(HostileAgent::start(&path, mode)?),
                    Role::Restarting => {
                        let base = i as u64 * 1000;
                        let mut agent = FakeAgent::start_blocks(&path, base..base + BLOCKS)?;
                        // Staggered, so restarts are spread over the second.
                        let offset = Duration::from_millis((i as u64 * 37) % 1000);
                        runtime.spawn(async move {
                            tokio::time::sleep(offset).await;
                            loop {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                agent = match agent.restart() {
                                    Ok(a) => a,
                                    Err(_) => return,
                                };
                            }
                        });
                    }
                }
            }
        }
        Ok(Self {
            runtime: Some(runtime),
            healthy,
            _hostile: hostile,
        })
    }

    /// Sets the healthy agents applied.
    fn sets_applied(&self) -> u64 {
        self.healthy
            .iter()
            .map(|(_, a)| a.control().calls("guest-set-memory-blocks"))
            .sum()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _in = self.runtime.as_ref().map(|r| r.enter());
        self.healthy.clear();
        self._hostile.clear();
        drop(_in);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

pub fn vm_table(dir: &Path, count: usize) -> String {
    (0..count)
        .map(|i| format!("vm{i} = \"{}/vm{i}.sock\"\n", dir.display()))
        .collect()
}

fn outcomes(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The section.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    report.heading("Hostile guests");
    soak(report, if quick { 5 } else { 60 }).await?;
    flood(report, if quick { 3 } else { 10 }).await
}

/// The soak: 1,000 VMs of which a tenth are hostile, random calls from 128 callers for
/// `secs`. Fails when a reply reached the wrong call or a set outcome was lost.
async fn soak(report: &mut Report, secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agents = Agents::start(dir.path(), VMS, role)?;
    let metrics_addr = free_addr()?;
    let bridge = Bridge::start(&format!(
        "metrics_addr = \"{metrics_addr}\"\n[limits]\nqueue_depth = 256\n[vms]\n{}",
        vm_table(dir.path(), VMS)
    ))?;
    let channels = bridge.channels(4).await?;
    warm_healthy(&channels[0]).await?;
    let idle = procfs::memory(bridge.pid())?;

    let callers = 128;
    let tally = call_randomly(&channels, callers, secs).await?;
    // Let writes whose callers gave up report their outcomes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = procfs::memory(bridge.pid())?;
    let metrics = tokio::task::spawn_blocking(move || scrape(metrics_addr)).await??;
    let late = late_replies(&metrics, |i| role(i) == Role::Healthy);
    let applied = agents.sets_applied();
    let lost = applied as i64 - tally.sets_ok as i64 - late as i64;

    soak_intro(report, secs, callers);
    report.table(&["measure", "value"]);
    let sets = format!("{applied} / {} / {late} / {lost}", tally.sets_ok);
    let rss = format!(
        "{:.1} / {:.1}",
        idle.rss_kib as f64 / 1024.0,
        peak.peak_kib as f64 / 1024.0
    );
    for (k, v) in tally.rows(secs, sets, rss) {
        report.row(&[k.to_string(), v]);
    }
    report.end_table();
    anyhow::ensure!(
        tally.misdelivered == 0,
        "{} replies reached the wrong call",
        tally.misdelivered
    );
    anyhow::ensure!(lost == 0, "{lost} set outcomes lost");
    drop(agents);
    Ok(())
}

/// Warms the healthy VMs' sessions, so that the soak starts in steady state.
async fn warm_healthy(channel: &Channel) -> anyhow::Result<()> {
    let mut warm = GuestAgentClient::new(channel.clone());
    for i in (0..VMS).filter(|&i| role(i) == Role::Healthy) {
        warm.ping(PingRequest {
            vm: format!("vm{i}"),
        })
        .await
        .with_context(|| format!("warming vm{i}"))?;
    }
    Ok(())
}

/// Runs `callers` concurrent [`caller`]s for `secs`, spread over `channels`, and adds up
/// what they saw.
async fn call_randomly(channels: &[Channel], callers: usize, secs: u64) -> anyhow::Result<Tally> {
    let stop = Instant::now() + Duration::from_secs(secs);
    let all = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for c in 0..callers {
        let channel = channels[c % channels.len()].clone();
        let all = all.clone();
        tasks.push(tokio::spawn(async move {
            let mine = caller(channel, c, stop).await;
            all.lock().await.merge(mine);
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(Arc::try_unwrap(all)
        .map_err(|_| anyhow::anyhow!("tally still shared"))?
        .into_inner())
}

/// Caller `c` until `stop`: back-to-back random calls on random VMs (a random sequence
/// of its own), each timed and judged by the VM's role.
async fn caller(channel: Channel, c: usize, stop: Instant) -> Tally {
    let mut agent = GuestAgentClient::new(channel.clone());
    let mut memory = GuestMemoryClient::new(channel);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut mine = Tally::default();
    while Instant::now() < stop {
        let r = rng.next();
        let vm = (r >> 40) as usize % VMS;
        let t = Instant::now();
        let (is_set, outcome) = one_call(&mut agent, &mut memory, vm, r).await;
        let elapsed = t.elapsed();
        mine.record(role(vm), is_set, outcome, elapsed);
    }
    mine
}

/// How the soak is run and what its figures mean.
fn soak_intro(report: &mut Report, secs: u64, callers: usize) {
    report.para(&format!(
        "{VMS} VMs behind one release `qga-bridge`, {secs} s: 900 healthy fake agents (each owning a \
         block range of its own, so a reply names the VM it came from) and 100 hostile ones, 20 each: \
         flood (16 MiB of 1 MiB stale replies per command), garbage (non-JSON answers), silent (never \
         answers), cut off (closes on the first frame), restarting (a good agent restarted every \
         second). {callers} gRPC callers on 4 connections pick a random VM per call: 40% Ping, 20% \
         GetMemoryBlocks, 10% GetMemoryBlockInfo, 30% SetMemoryBlocks of two blocks; deadlines 5 s \
         (10 s for sets). Misdelivered: a reply that is not the answer to its call (wrong VM's blocks, \
         set results naming other blocks, any success from a flood/garbage/silent/cut-off guest). \
         Lost set outcomes: sets the healthy agents applied, minus those answered to their callers, \
         minus those recorded late (`qga_bridge_late_replies_total`). Agents, bridge and callers \
         share the machine's 2 cores."
    ));
}

/// A healthy VM's Ping latency, alone and while eight flooding guests are called at the
/// same time. Fails when a flooder's call succeeds.
async fn flood(report: &mut Report, secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let flooders = 8;
    let agents = Agents::start(dir.path(), flooders + 1, |i| {
        if i == 0 {
            Role::Healthy
        } else {
            Role::Hostile(Hostile::Flood)
        }
    })?;
    let bridge = Bridge::start(&format!("[vms]\n{}", vm_table(dir.path(), flooders + 1)))?;
    flood_intro(report, flooders, secs);
    for flooding in [false, true] {
        let stop = Instant::now() + Duration::from_secs(secs);
        let callers = if flooding {
            call_flooders(&bridge, flooders, stop).await?
        } else {
            Vec::new()
        };
        let pings = ping_healthy(&bridge, stop).await?;
        let mut seen = BTreeMap::new();
        for c in callers {
            for (k, v) in c.await? {
                *seen.entry(k).or_default() += v;
            }
        }
        anyhow::ensure!(
            !seen.contains_key("OK"),
            "a flooder's call succeeded: {seen:?}"
        );
        report.row(&[
            if flooding {
                format!("{flooders} flooders called back to back")
            } else {
                "no flood (baseline)".into()
            },
            fmt_duration(pings.p50()),
            fmt_duration(pings.p99()),
            pings.len().to_string(),
            if flooding {
                outcomes(&seen)
            } else {
                "-".into()
            },
            format!(
                "{:.1}",
                procfs::memory(bridge.pid())?.peak_kib as f64 / 1024.0
            ),
        ]);
    }
    report.end_table();
    drop(agents);
    Ok(())
}

/// How the flood is run, and the head of its table.
fn flood_intro(report: &mut Report, flooders: usize, secs: u64) {
    report.para(&format!(
        "One healthy VM and {flooders} flooding guests (each answers the handshake, then sends 16 MiB \
         of 1 MiB stale replies per command and never the answer) behind one release `qga-bridge`. \
         One caller pings the healthy VM back to back for {secs} s; in the flood row, {flooders} more \
         callers call the flooders back to back (2 s deadline) at the same time. The bridge drops a \
         channel after 8 MiB of stale bytes in one call and backs off."
    ));
    report.table(&[
        "load",
        "healthy Ping p50",
        "healthy Ping p99",
        "healthy Pings",
        "flooders' calls (outcomes)",
        "bridge RSS peak (MiB)",
    ]);
}

/// One caller per flooding VM (`vm1` ..= `vm{flooders}`), each on a connection of its
/// own calling GetMemoryBlocks back to back until `stop`; each yields its calls' outcomes.
async fn call_flooders(
    bridge: &Bridge,
    flooders: usize,
    stop: Instant,
) -> anyhow::Result<Vec<JoinHandle<BTreeMap<String, u64>>>> {
    let mut callers = Vec::new();
    for k in 1..=flooders {
        let mut memory = GuestMemoryClient::new(bridge.channel().await?);
        callers.push(tokio::spawn(async move {
            let mut seen = BTreeMap::<String, u64>::new();
            while Instant::now() < stop {
                let code = memory
                    .get_memory_blocks(with_deadline(
                        GetMemoryBlocksRequest {
                            vm: format!("vm{k}"),
                        },
                        Duration::from_secs(2),
                    ))
                    .await
                    .map_or_else(|s| format!("{:?}", s.code()), |_| "OK".into());
                *seen.entry(code).or_default() += 1;
            }
            seen
        }));
    }
    Ok(callers)
}

/// Pings the healthy VM (`vm0`) back to back until `stop`, on a connection of its own;
/// fails on the first failed Ping.
async fn ping_healthy(bridge: &Bridge, stop: Instant) -> anyhow::Result<Samples> {
    let mut agent = GuestAgentClient::new(bridge.channel().await?);
    let mut pings = Samples::default();
    while Instant::now() < stop {
        let t = Instant::now();
        agent
            .ping(PingRequest { vm: "vm0".into() })
            .await
            .context("the healthy VM failed")?;
        pings.push(t.elapsed());
    }
    Ok(pings)
}
