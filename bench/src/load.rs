//! A host with 1,000 VMs: one bridge, 1,000 fake agents, many concurrent clients.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use qga_proto::v1::{
    GetMemoryBlocksRequest, PingRequest, guest_agent_client::GuestAgentClient,
    guest_memory_client::GuestMemoryClient,
};
use qga_testkit::bin_path;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::{
    bridge::Bridge,
    procfs,
    report::Report,
    stats::{Samples, fmt_duration},
};

const VMS: usize = 1000;

struct FakeAgents(std::process::Child);

impl Drop for FakeAgents {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_fakes(dir: &std::path::Path) -> anyhow::Result<FakeAgents> {
    let mut child = Command::new(bin_path("qga-fake-agent"))
        .arg("--dir")
        .arg(dir)
        .args(["--count", &VMS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qga-fake-agent")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut line = [0u8; 16];
    use std::io::Read;
    let n = out.read(&mut line)?;
    if !String::from_utf8_lossy(&line[..n]).starts_with("ready") {
        bail!("fake agents did not start");
    }
    Ok(FakeAgents(child))
}

/// Runs `calls` from `clients` concurrent tasks for `secs`; returns calls/s and latencies.
pub async fn drive<F, Fut>(
    clients: usize,
    secs: u64,
    call: F,
) -> anyhow::Result<(f64, Samples, u64)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let all = Arc::new(Mutex::new(Samples::default()));
    let stop = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let call = call.clone();
        let all = all.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Samples::default();
            let mut failed = 0u64;
            let mut i = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                if call(c, i).await {
                    mine.push(t.elapsed());
                } else {
                    failed += 1;
                }
                i += 1;
            }
            all.lock().await.extend(&mine);
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let samples = Arc::try_unwrap(all)
        .map_err(|_| anyhow::anyhow!("samples still shared"))?
        .into_inner();
    anyhow::ensure!(!samples.is_empty(), "no call succeeded ({failed} failed)");
    Ok((samples.len() as f64 / elapsed, samples, failed))
}

/// The section.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let secs = if quick { 3 } else { 10 };
    report.heading("One host with 1,000 VMs");
    let dir = tempfile::tempdir()?;
    let _fakes = start_fakes(dir.path())?;
    let vms: String = (0..VMS)
        .map(|i| format!("vm{i} = \"{}/vm{i}.sock\"\n", dir.path().display()))
        .collect();
    let bridge = Bridge::start(&format!("[limits]\nqueue_depth = 256\n[vms]\n{vms}"))?;
    let channels = warm_channels(&bridge).await?;
    let clients = 128;
    let ping = ping_row(&bridge, &channels, clients, secs).await?;
    report.para(&format!(
        "1,000 fake agents (`qga-fake-agent`: one process, one tokio task per socket, the real QGA framing \
         and handshake) behind one release `qga-bridge` configured with 1,000 VMs; every session warmed \
         first. Load: {clients} concurrent gRPC `Ping` callers (Rust, tonic, 4 HTTP/2 connections), each \
         cycling over the VMs, for {secs} s. Bridge, fake agents and load generator share this machine's \
         2 cores, so the bridge gets well under all of it."
    ));
    report.table(&[
        "load",
        "calls/s",
        "p50",
        "p99",
        "failed",
        "bridge CPU (cores)",
        "bridge RSS idle / peak (MiB)",
    ]);
    report.row(&ping);
    if let Some(row) = wrk_row(&bridge, secs)? {
        report.row(&row);
    }

    // Coalescing: every client polls the same VM's block list.
    for coalesce in [true, false] {
        report.row(&coalescing_row(dir.path(), clients, secs, coalesce).await?);
    }
    report.end_table();
    Ok(())
}

/// Four gRPC connections to `bridge`, with every VM's session warmed (connect + resync)
/// so the figures are steady state.
async fn warm_channels(bridge: &Bridge) -> anyhow::Result<Vec<Channel>> {
    let channels = bridge.channels(4).await?;
    warm_sessions(&channels[0], VMS).await?;
    Ok(channels)
}

/// Pings VMs `vm0` .. `vm{vms - 1}` once each on `channel`, so that every session is
/// connected and resynchronised before anything is measured.
pub async fn warm_sessions(channel: &Channel, vms: usize) -> anyhow::Result<()> {
    let mut warm = GuestAgentClient::new(channel.clone());
    for i in 0..vms {
        warm.ping(PingRequest {
            vm: format!("vm{i}"),
        })
        .await?;
    }
    Ok(())
}

/// [`drive`]s `clients` concurrent gRPC `Ping` callers for `secs`, spread over
/// `channels`, each cycling over VMs `vm0` .. `vm{vms - 1}` in an order of its own.
pub async fn drive_pings(
    channels: Vec<Channel>,
    vms: usize,
    clients: usize,
    secs: u64,
) -> anyhow::Result<(f64, Samples, u64)> {
    drive(clients, secs, move |c, i| {
        let mut client = GuestAgentClient::new(channels[c % channels.len()].clone());
        let vm = format!("vm{}", (c as u64 * 7919 + i * 31) % vms as u64);
        async move { client.ping(PingRequest { vm }).await.is_ok() }
    })
    .await
}

/// The row of `clients` concurrent gRPC `Ping` callers cycling over the VMs for `secs`,
/// spread over `channels`: calls/s, latency, failures, the bridge's CPU over the run
/// and its RSS idle (before) and peak (after).
async fn ping_row(
    bridge: &Bridge,
    channels: &[Channel],
    clients: usize,
    secs: u64,
) -> anyhow::Result<Vec<String>> {
    let rss_idle = procfs::memory(bridge.pid())?;
    let cpu0 = procfs::cpu_time(bridge.pid())?;
    let t0 = Instant::now();
    let (rate, lat, failed) = drive_pings(channels.to_vec(), VMS, clients, secs).await?;
    let cpu = procfs::cpu_time(bridge.pid())?
        .saturating_sub(cpu0)
        .as_secs_f64()
        / t0.elapsed().as_secs_f64();
    let mem = procfs::memory(bridge.pid())?;
    Ok(vec![
        format!("gRPC Ping, {clients} callers over 1,000 VMs"),
        format!("{rate:.0}"),
        fmt_duration(lat.p50()),
        fmt_duration(lat.p99()),
        failed.to_string(),
        format!("{cpu:.2}"),
        format!(
            "{:.1} / {:.1}",
            rss_idle.rss_kib as f64 / 1024.0,
            mem.peak_kib as f64 / 1024.0
        ),
    ])
}

/// The row of `clients` concurrent gRPC `GetMemoryBlocks` callers all on one VM, through
/// a bridge of its own with read coalescing on or off.
async fn coalescing_row(
    dir: &Path,
    clients: usize,
    secs: u64,
    coalesce: bool,
) -> anyhow::Result<Vec<String>> {
    let b = Bridge::start(&format!(
        "coalesce_reads = {coalesce}\n[limits]\nqueue_depth = 1024\n[vms]\nvm0 = \"{}/vm0.sock\"\n",
        dir.display()
    ))?;
    let ch = b.channel().await?;
    let (rate, lat, failed) = drive(clients, secs.min(5), move |_, _| {
        let mut client = GuestMemoryClient::new(ch.clone());
        async move {
            client
                .get_memory_blocks(GetMemoryBlocksRequest { vm: "vm0".into() })
                .await
                .is_ok()
        }
    })
    .await?;
    let mem = procfs::memory(b.pid())?;
    Ok(vec![
        format!(
            "gRPC GetMemoryBlocks, {clients} callers on one VM, coalescing {}",
            if coalesce { "on" } else { "off" }
        ),
        format!("{rate:.0}"),
        fmt_duration(lat.p50()),
        fmt_duration(lat.p99()),
        failed.to_string(),
        "-".into(),
        format!("- / {:.1}", mem.peak_kib as f64 / 1024.0),
    ])
}

/// JSON-RPC `guest-ping` over HTTP with wrk (if installed), random VM per request.
fn wrk_row(bridge: &Bridge, secs: u64) -> anyhow::Result<Option<Vec<String>>> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return Ok(None);
    }
    let script = tempfile::NamedTempFile::new()?;
    std::fs::write(
        script.path(),
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
             request = function()\n  local vm = \"vm\" .. math.random(0, {})\n  \
             return wrk.format(nil, \"/\", nil, '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"guest-ping\",\"params\":{{\"vm\":\"' .. vm .. '\"}}}}')\nend\n",
            VMS - 1
        ),
    )?;
    let cpu0 = procfs::cpu_time(bridge.pid())?;
    let t0 = Instant::now();
    let out = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            "128",
            "-d",
            &format!("{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script.path())
        .arg(bridge.jsonrpc())
        .output()?;
    let cpu = procfs::cpu_time(bridge.pid())?
        .saturating_sub(cpu0)
        .as_secs_f64()
        / t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let find = |prefix: &str| -> String {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| "?".into())
    };
    let non2xx = find("Non-2xx or 3xx responses:");
    let mem = procfs::memory(bridge.pid())?;
    Ok(Some(vec![
        "JSON-RPC guest-ping over HTTP, wrk -t2 -c128, random VM".into(),
        find("Requests/sec:"),
        find("50%"),
        find("99%"),
        if non2xx == "?" { "0".into() } else { non2xx },
        format!("{cpu:.2}"),
        format!("- / {:.1}", mem.peak_kib as f64 / 1024.0),
    ]))
}
