//! `qga-fake-agent --sockets DIR --count N`: N fake agents on `DIR/vm<i>.sock`, for load
//! tests of the bridge (a thousand VMs on one host without a thousand guests). Prints
//! `ready N` once every socket listens; stops on SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use qga_fake_agent::FakeAgent;

#[derive(Parser)]
#[command(about = "Serve N fake QEMU Guest Agents on unix sockets")]
struct Cli {
    /// Directory for the sockets `vm0.sock` .. `vm<N-1>.sock`.
    #[arg(long = "sockets", visible_alias = "dir", value_name = "DIR")]
    dir: PathBuf,
    /// Number of agents.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Memory blocks per agent.
    #[arg(long, default_value_t = 16)]
    blocks: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    let mut agents = Vec::with_capacity(cli.count);
    for i in 0..cli.count {
        let path = cli.dir.join(format!("vm{i}.sock"));
        agents.push(
            FakeAgent::start(&path, cli.blocks)
                .with_context(|| format!("binding {}", path.display()))?,
        );
    }
    println!("ready {}", cli.count);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("SIGINT handler")?,
        _ = term.recv() => {}
    }
    // Dropping the agents removes their sockets.
    drop(agents);
    Ok(())
}
