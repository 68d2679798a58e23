//! `qga-bench`: runs the benchmarks and writes `docs/BENCHMARKS.md`.
//!
//! Benchmarks never fail on a timing; they fail only when something they measure does
//! not work. Run through `./scripts/bench`, which builds in release mode first.

mod agent;
mod balloon;
mod bridge;
mod hotplug;
mod libvirt;
mod load;
mod procfs;
mod report;
mod soak;
mod stats;
mod tls;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Parser)]
#[command(about = "Benchmarks of qga-agent and qga-bridge; writes a Markdown report")]
struct Cli {
    /// Where to write the report.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
    /// Fewer runs (a smoke test of the harness, not figures to quote).
    #[arg(long)]
    quick: bool,
    /// Run only these sections (repeatable): agent, bridge, load, hostile, tls, hotplug,
    /// balloon, libvirt.
    /// The other sections of an existing report are kept.
    #[arg(long, value_name = "SECTION")]
    only: Vec<String>,
    /// Git commit measured (the script passes it).
    #[arg(long, default_value = "unknown")]
    commit: String,
}

impl Cli {
    /// ` --quick` when the run is quick, for the report's notes of how it was run.
    fn quick_flag(&self) -> &'static str {
        if self.quick { " --quick" } else { "" }
    }
}

/// The sections `--only` can name, in report order.
const SECTIONS: [&str; 8] = [
    "agent", "bridge", "load", "hostile", "tls", "hotplug", "balloon", "libvirt",
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(bad) = cli.only.iter().find(|o| !SECTIONS.contains(&o.as_str())) {
        anyhow::bail!("unknown section '{bad}' (known: {})", SECTIONS.join(", "));
    }
    let mut report = report::Report::default();
    let failed = run_sections(&cli, &mut report)?;
    reading_the_figures(&mut report);
    write_report(&cli, &report)?;
    if !failed.is_empty() {
        anyhow::bail!(
            "the report is written, but these did not work:\n{}",
            failed.join("\n")
        );
    }
    Ok(())
}

/// Runs the sections `--only` asks for (all by default) in report order, each on the
/// runtime that suits what it measures. Returns the operations that did not work but
/// are in the report: the run fails after writing it.
fn run_sections(cli: &Cli, report: &mut report::Report) -> anyhow::Result<Vec<String>> {
    let wanted = |s: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == s);
    if wanted("agent") {
        agent::run(report, cli.quick)?;
    }
    if wanted("bridge") {
        // Sequential latency: a single-threaded client, no cross-thread wake-ups of its own.
        current_thread()?.block_on(bridge::run(report, cli.quick))?;
    }
    // Load: a client that can use both cores.
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if wanted("load") {
        load.block_on(load::run(report, cli.quick))?;
    }
    if wanted("hostile") {
        load.block_on(soak::run(report, cli.quick))?;
    }
    if wanted("tls") {
        load.block_on(tls::run(report, cli.quick))?;
    }
    let mut failed = Vec::new();
    if wanted("hotplug") {
        // A real QEMU guest: boots and hotplug operations, timed on the wall clock.
        failed.extend(load.block_on(hotplug::run(report, cli.quick))?);
    }
    if wanted("balloon") {
        // A real QEMU guest with a virtio balloon: balloon moves, memory-stats, and the
        // host memory free page reporting returns.
        failed.extend(load.block_on(balloon::run(report, cli.quick))?);
    }
    if wanted("libvirt") {
        // Sequential latency on real guests: the libvirt backend against the direct socket.
        current_thread()?.block_on(libvirt::run(report, cli.quick))?;
    }
    Ok(failed)
}

/// A single-threaded runtime, for sections that measure sequential latency.
fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The report's last section: how to read the figures of every section.
fn reading_the_figures(report: &mut report::Report) {
    report.heading(report::LAST_SECTION);
    report.para(
        "Agent scans: the CPU columns split each agent's time into user and system; on tmpfs and \
         sysfs most of it is the kernel's per-file open/read/close, which our agent minimises \
         (two files per block, six syscalls, no allocation per block) and spreads over the cores, \
         but cannot remove — the speed-up is bounded by that kernel work and the core count. \
         Bridge latency: the ListVms / vm-list row is the transport floor (HTTP/2 or HTTP/1 through \
         the bridge with no agent call); a Ping costs that floor plus the agent round trip plus the \
         bridge's session hop. Load rows share the machine's cores between the load generator, \
         the bridge and the fake agents.",
    );
}

/// Writes the report to `--out` under a header naming the run; with `--only`, into the
/// existing report, replacing just the sections run.
fn write_report(cli: &Cli, report: &report::Report) -> anyhow::Result<()> {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let quick = cli.quick_flag();
    let header = format!(
        "# Benchmarks\n\nWritten by `./scripts/bench` (`qga-bench`{quick}). Machine: {}. Date: {date}. Commit: `{}`.\n\n\
         Figures from one run on a shared, noisy machine: compare the two sides of a row \
         (measured side by side, alternating), not rows across runs.\n",
        procfs::machine(),
        cli.commit,
    );
    let mut text = header + report.text();
    // `--only`: replace just the sections run, keep the rest of an existing report.
    if !cli.only.is_empty()
        && let Ok(old) = std::fs::read_to_string(&cli.out)
    {
        text = merge(cli, &old, report, &date);
    }
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.out, text).with_context(|| format!("writing {}", cli.out.display()))?;
    eprintln!("bench: wrote {}", cli.out.display());
    Ok(())
}

/// The existing report `old` with the sections just run put in place of theirs, each
/// noted as re-run alone on `date`.
fn merge(cli: &Cli, old: &str, report: &report::Report, date: &str) -> String {
    let quick = cli.quick_flag();
    let mut merged = report::Sections::parse(old);
    let mut titles = merged.replace(&report::Sections::parse(report.text()));
    titles.retain(|t| t != report::LAST_SECTION);
    let only = cli.only.join(" --only ");
    merged.note_rerun(&titles, &|_| {
        format!(
            "re-run alone (`qga-bench --only {only}{quick}`): Date: {date}. Commit: `{}`.",
            cli.commit
        )
    });
    merged.text()
}
