//! `qga-e2e-scenario`: the end-to-end scenario against an already running bridge and
//! guest (the docker compose `e2e` service): refusals, the hot-add/online/offline/unplug
//! cycle (QMP by the scenario, blocks through the bridge), the bridge's own memory hotplug
//! (memory-plug, Unplug over the guest's qmp-bridge.sock), virtio-mem Resize and the
//! balloon (memory-balloon), an agent restart. Works on a stack that has been used, and
//! leaves it as it found it. Exits non-zero on the first failure.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use jsonrpsee::http_client::{HeaderMap, HeaderValue};
use qga_e2e::{
    bridge::{Clients, TlsClient},
    guest::GuestControl,
    scenario,
    wait::PATIENCE,
};

#[derive(Parser)]
#[command(
    about = "Hot-add, online, offline and unplug memory of a running guest through qga-bridge, \
             then plug and unplug a DIMM with the bridge's own memory hotplug"
)]
struct Cli {
    /// gRPC endpoint of the bridge.
    #[arg(long, default_value = "https://bridge:50051")]
    grpc: String,
    /// JSON-RPC endpoint of the bridge.
    #[arg(long, default_value = "https://bridge:8080")]
    jsonrpc: String,
    /// Directory of ./scripts/dev-certs output: `ca.pem`, and the `write` and `read`
    /// identities' certificates and keys.
    #[arg(long, default_value = "/certs")]
    certs: PathBuf,
    /// VM name at the bridge.
    #[arg(long, default_value = "guest")]
    vm: String,
    /// The guest's QMP socket (the scenario's own; the bridge has qmp-bridge.sock).
    #[arg(long, default_value = "/run/guest/qmp.sock")]
    qmp: PathBuf,
    /// The guest's control socket.
    #[arg(long, default_value = "/run/guest/control.sock")]
    control: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tls = |name: Option<&str>| TlsClient {
        ca: cli.certs.join("ca.pem"),
        identity: name.map(|n| {
            (
                cli.certs.join(format!("{n}.pem")),
                cli.certs.join(format!("{n}.key")),
            )
        }),
    };
    let connect = |who: Option<&'static str>, headers: HeaderMap| {
        let (grpc, jsonrpc, tls) = (cli.grpc.clone(), cli.jsonrpc.clone(), tls(who));
        async move { Clients::connect_tls(&grpc, &jsonrpc, &tls, headers).await }
    };
    let c = connect(Some("write"), HeaderMap::new()).await?;
    let g = GuestControl {
        qmp: cli.qmp,
        control: cli.control,
    };
    let mut t = scenario::Timings::default();
    let failed = scenario::ping_until_ok(&c, &cli.vm, Duration::from_secs(180)).await?;
    eprintln!("e2e: bridge and agent answer ({failed} calls failed while the guest booted)");
    // The stack may have been used (./scripts/up's examples plug and resize): the scenario
    // works from what it finds and leaves it so.
    let found = scenario::Found::read(&g)?;
    eprintln!("e2e: found {found:?}");
    let mut origin = HeaderMap::new();
    origin.insert("origin", HeaderValue::from_static("https://evil.example"));
    let reader = connect(Some("read"), HeaderMap::new()).await?;
    scenario::security_checks(
        &cli.vm,
        &connect(None, HeaderMap::new()).await?,
        &reader,
        &connect(Some("write"), origin).await?,
    )
    .await?;
    scenario::hotplug_denied(&reader, &cli.vm).await?;
    eprintln!(
        "e2e: no certificate, a read-only identity's set and memory-plug and a foreign Origin \
         are refused"
    );
    scenario::unplug_cycle(&c, &cli.vm, &g, &mut t).await?;
    scenario::bridge_hotplug_cycle(&c, &cli.vm, &g, &mut t).await?;
    eprintln!("e2e: memory-plug and Unplug of a 512 MiB DIMM through the bridge");
    scenario::virtio_mem_cycle(&c, &cli.vm, &g, &mut t).await?;
    eprintln!("e2e: Resize by 1 GiB and back through the guest's virtio-mem device");
    scenario::balloon_cycle(&c, &cli.vm, &g, &mut t).await?;
    eprintln!("e2e: memory-balloon 128 MiB down and back through the guest's balloon");
    let start = std::time::Instant::now();
    g.restart_agent()?;
    let failed = scenario::ping_until_ok(&c, &cli.vm, PATIENCE).await?;
    t.record(
        &format!("agent restart in the guest to next successful call ({failed} failed)"),
        start.elapsed(),
    );
    found.put_back_and_check(&c, &cli.vm, &g).await?;
    eprintln!(
        "e2e: QEMU's memory devices and balloon, auto_online_blocks and MemTotal are as found"
    );
    println!("e2e scenario passed");
    for (phase, d) in &t.0 {
        println!("  {phase}: {:.2} s", d.as_secs_f64());
    }
    Ok(())
}
