//! `qga-e2e-scenario`: the end-to-end scenario against an already running bridge and
//! guest (the docker compose `e2e` service). Exits non-zero on the first failure.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use qga_e2e::{bridge::Clients, guest::GuestControl, scenario};

#[derive(Parser)]
#[command(
    about = "Hot-add, online, offline and unplug memory of a running guest through qga-bridge"
)]
struct Cli {
    /// gRPC endpoint of the bridge.
    #[arg(long, default_value = "http://bridge:50051")]
    grpc: String,
    /// JSON-RPC endpoint of the bridge.
    #[arg(long, default_value = "http://bridge:8080")]
    jsonrpc: String,
    /// VM name at the bridge.
    #[arg(long, default_value = "guest")]
    vm: String,
    /// The guest's QMP socket.
    #[arg(long, default_value = "/run/guest/qmp.sock")]
    qmp: PathBuf,
    /// The guest's control socket.
    #[arg(long, default_value = "/run/guest/control.sock")]
    control: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let c = Clients::connect(&cli.grpc, &cli.jsonrpc).await?;
    let g = GuestControl {
        qmp: cli.qmp,
        control: cli.control,
    };
    let mut t = scenario::Timings::default();
    let failed = scenario::ping_until_ok(&c, &cli.vm, Duration::from_secs(180)).await?;
    eprintln!("e2e: bridge and agent answer ({failed} calls failed while the guest booted)");
    scenario::unplug_cycle(&c, &cli.vm, &g, &mut t).await?;
    let start = std::time::Instant::now();
    g.restart_agent()?;
    let failed = scenario::ping_until_ok(&c, &cli.vm, Duration::from_secs(60)).await?;
    t.record(
        &format!("agent restart in the guest to next successful call ({failed} failed)"),
        start.elapsed(),
    );
    println!("e2e scenario passed");
    for (phase, d) in &t.0 {
        println!("  {phase}: {:.2} s", d.as_secs_f64());
    }
    Ok(())
}
