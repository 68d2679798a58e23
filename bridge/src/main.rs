//! The `qga-bridge` binary: configuration, logging, then serve until SIGTERM or SIGINT;
//! SIGHUP reloads the TLS files and reopens the audit log. Under systemd (`Type=notify`)
//! it reports ready, reloading and stopping on `$NOTIFY_SOCKET`.

mod notify;

use anyhow::Context;
use clap::Parser;
use qga_bridge::{
    Bridge, Config,
    config::{Cli, LogFormat},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli)?;
    let filter =
        EnvFilter::try_from_env("QGA_BRIDGE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    if std::env::var_os(qga_bridge::fault::KILL_AFTER_STEP).is_some() && !qga_bridge::fault::ARMED {
        tracing::warn!(
            "{} is set, but this build has no test hooks: ignored",
            qga_bridge::fault::KILL_AFTER_STEP
        );
    }
    for deprecated in &config.deprecated {
        tracing::warn!("{deprecated}");
    }
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let notify = notify::Notifier::from_env();
    let bridge = Bridge::start(config).await?;
    notify.ready(&serving_status(&bridge));
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                break;
            }
            _ = hup.recv() => {
                notify.reloading();
                bridge.reopen_audit();
                match bridge.reload_tls() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the current certificates"),
                }
                notify.ready(&serving_status(&bridge));
            }
        }
    }
    notify.stopping();
    // Calls in flight may finish (each is bounded by its deadline); a second signal
    // stops at once.
    tokio::select! {
        () = bridge.shutdown() => {}
        _ = term.recv() => tracing::warn!("second SIGTERM: exiting without waiting for calls"),
        _ = int.recv() => tracing::warn!("second SIGINT: exiting without waiting for calls"),
    }
    Ok(())
}

/// The `STATUS=` line systemd shows: how many VMs are served.
fn serving_status(bridge: &Bridge) -> String {
    format!("serving {} VMs", bridge.vm_count())
}
