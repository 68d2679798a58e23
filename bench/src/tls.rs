//! What TLS costs: gRPC Ping latency and throughput over 1,000 VMs through three release
//! bridges on the same agents, one plaintext, one TLS, one mutual TLS, measured side by
//! side in one run.

use std::time::Instant;

use anyhow::Context;
use qga_proto::v1::{PingRequest, guest_agent_client::GuestAgentClient};
use qga_testkit::{BridgeProcess, Certs};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::{
    load::{drive_pings, warm_sessions},
    report::Report,
    soak::{Agents, Role, vm_table},
    stats::{Samples, fmt_duration, ratio},
};

const VMS: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Tls,
    Mutual,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plaintext",
            Self::Tls => "TLS 1.3",
            Self::Mutual => "mutual TLS 1.3",
        }
    }
}

/// A bridge in `mode` and channels to it.
struct Side {
    mode: Mode,
    _bridge: BridgeProcess,
    channels: Vec<Channel>,
}

async fn side(mode: Mode, vms: &str, certs: &Certs) -> anyhow::Result<Side> {
    let path = |f: &str| certs.path(f).display().to_string();
    let tls = match mode {
        Mode::Plain => String::new(),
        Mode::Tls => format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            path("server.pem"),
            path("server.key")
        ),
        Mode::Mutual => format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            path("server.pem"),
            path("server.key"),
            path("ca.pem")
        ),
    };
    let config = format!("{tls}[limits]\nqueue_depth = 256\n[vms]\n{vms}");
    let bridge = if mode == Mode::Plain {
        BridgeProcess::start(&config, &[])
    } else {
        BridgeProcess::start_tls(&config, &[])
    }
    .context("starting qga-bridge")?;
    let read = |f: &str| std::fs::read(certs.path(f)).context("reading certificates");
    let mut channels = Vec::new();
    for _ in 0..4 {
        let channel = match mode {
            Mode::Plain => Channel::from_shared(bridge.grpc_url())?,
            Mode::Tls | Mode::Mutual => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read("ca.pem")?))
                    .domain_name("localhost");
                if mode == Mode::Mutual {
                    tls = tls.identity(Identity::from_pem(read("bench.pem")?, read("bench.key")?));
                }
                Channel::from_shared(format!("https://{}", bridge.grpc_addr()))?.tls_config(tls)?
            }
        };
        channels.push(channel.connect().await?);
    }
    Ok(Side {
        mode,
        _bridge: bridge,
        channels,
    })
}

/// The section.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let (rounds, secs) = if quick { (300, 2) } else { (3000, 8) };
    let certs = Certs::generate(&["bench"]).context("openssl certificates")?;
    let dir = tempfile::tempdir()?;
    let _agents = Agents::start(dir.path(), VMS, |_| Role::Healthy)?;
    let vms = vm_table(dir.path(), VMS);
    let mut sides = Vec::new();
    for mode in [Mode::Plain, Mode::Tls, Mode::Mutual] {
        sides.push(side(mode, &vms, &certs).await?);
    }
    // Warm every session of every bridge.
    for s in &sides {
        warm_sessions(&s.channels[0], VMS).await?;
    }
    let latency = latencies(&sides, rounds).await?;
    // Throughput: 128 callers on 4 connections, one bridge at a time.
    let mut rates = Vec::new();
    for s in &sides {
        let (rate, _, failed) = drive_pings(s.channels.clone(), VMS, 128, secs).await?;
        anyhow::ensure!(
            failed == 0,
            "{} calls failed over {}",
            failed,
            s.mode.name()
        );
        rates.push(rate);
    }

    intro(report, rounds, secs);
    for (k, s) in sides.iter().enumerate() {
        report.row(&[
            s.mode.name().into(),
            fmt_duration(latency[k].p50()),
            fmt_duration(latency[k].p99()),
            ratio(latency[k].p50(), latency[0].p50()),
            format!("{:.0}", rates[k]),
            format!("{:.2}", rates[k] / rates[0]),
        ]);
    }
    report.end_table();
    Ok(())
}

/// Ping latency on each side: one call per bridge per round, alternating, on warm
/// connections; `rounds` rounds recorded after 50 that are not.
async fn latencies(sides: &[Side], rounds: usize) -> anyhow::Result<Vec<Samples>> {
    let mut latency: Vec<Samples> = sides
        .iter()
        .map(|_| Samples::with_capacity(rounds))
        .collect();
    let mut clients: Vec<_> = sides
        .iter()
        .map(|s| GuestAgentClient::new(s.channels[0].clone()))
        .collect();
    for round in 0..rounds + 50 {
        for (k, c) in clients.iter_mut().enumerate() {
            let t = Instant::now();
            c.ping(PingRequest {
                vm: format!("vm{}", round % VMS),
            })
            .await?;
            if round >= 50 {
                latency[k].push(t.elapsed());
            }
        }
    }
    Ok(latency)
}

/// The section's heading, how it measures, and the head of its table.
fn intro(report: &mut Report, rounds: usize, secs: u64) {
    report.heading("What TLS costs");
    report.para(&format!(
        "Three release `qga-bridge`s in front of the same 1,000 fake agents: plaintext, TLS 1.3 \
         (ECDSA P-256 certificate from `openssl`, rustls with ring), and mutual TLS (client \
         certificate verified on every connection). Latency: a tonic client on a warm connection \
         calls Ping on each bridge in turn, {rounds} rounds. Throughput: 128 callers on 4 warm \
         connections for {secs} s, one bridge at a time. Connections are long-lived, as a control \
         plane's are, so the handshake is not in these figures; what is left is record encryption."
    ));
    report.table(&[
        "transport",
        "Ping p50",
        "Ping p99",
        "Ping p50 / plaintext",
        "calls/s (128 callers)",
        "calls/s / plaintext",
    ]);
}
