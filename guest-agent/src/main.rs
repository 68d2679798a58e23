//! The `qga-agent` binary: configuration, logging, daemon housekeeping, then the
//! transport loop until SIGTERM or SIGINT.

use std::{fs::File, io::Write as _, os::fd::AsFd, path::Path};

use anyhow::{Context, bail};
use clap::Parser;
use qga_agent::{Agent, Cli, Config, MemoryTree, ProcFs, config::rpc_list, transport};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.block_rpcs.as_deref() == Some("help") || cli.allow_rpcs.as_deref() == Some("help") {
        print!("{}", rpc_list());
        return Ok(());
    }
    let config = Config::load(&cli)?;
    if cli.dump_conf {
        print!("{}", config.dump());
        return Ok(());
    }
    init_logging(&config)?;
    if cli.fsfreeze_hook.is_some() {
        tracing::warn!("-F/--fsfreeze-hook ignored: this agent has no fsfreeze commands");
    }
    if !config.statedir.is_absolute() {
        bail!(
            "statedir must be an absolute path: {}",
            config.statedir.display()
        );
    }
    if config.daemonize {
        // SAFETY: called before any thread or runtime exists; daemon(3) forks and the
        // parent exits, so no other code observes the fork.
        if unsafe { libc::daemon(0, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("daemonize");
        }
    }
    let _pidfile = PidFile::create(&config.pidfile)?;

    let agent = Agent::new(
        MemoryTree::new(&config.sysfs_root),
        config.online_type,
        config.filter(),
    )
    .with_procfs(ProcFs::new(&config.procfs_root));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let channel = config.channel();
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            method = config.method.as_str(),
            online_type = config.online_type.as_str(),
            "qga-agent started"
        );
        tokio::select! {
            res = transport::run(&channel, &agent) => res.context("channel failed"),
            _ = term.recv() => { tracing::info!("SIGTERM: exiting"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: exiting"); Ok(()) }
        }
    })
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let default = if config.verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("QGA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &config.logfile {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// The pid file, locked for the agent's lifetime (a second instance fails to start, as
/// with qemu-ga) and removed on exit.
struct PidFile {
    path: std::path::PathBuf,
    _file: File,
}

impl PidFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening pid file {}", path.display()))?;
        rustix::fs::flock(
            file.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .with_context(|| format!("pid file {} is locked: already running?", path.display()))?;
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
