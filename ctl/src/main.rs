//! `qgactl`: the command-line client of qga-bridge. See `qgactl --help`.

mod cli;
mod commands;
mod connect;
mod exit;
mod json;
mod layout;
mod settings;
mod size;
mod stats;
mod table;

use std::{io::Write, process::ExitCode};

use clap::{CommandFactory, Parser};

use crate::{
    cli::{Cli, Command, Output},
    connect::Client,
    settings::Settings,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        return completions(shell);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(exit::LOCAL, &format!("cannot start: {e}")),
    };
    ExitCode::from(runtime.block_on(run(cli)))
}

/// Writes the completion script for `shell` to stdout in one piece. A reader that stops
/// early (`| grep -q`, `| head`) is not an error: it had what it wanted.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write as _;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "qgactl", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(
            exit::LOCAL,
            &format!("cannot write the completion script: {e}"),
        ),
    }
}

/// Prints `message` as qgactl's one error line and returns `code`.
fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("qgactl: {message}");
    ExitCode::from(code)
}

/// Runs the command; the exit code.
async fn run(cli: Cli) -> u8 {
    let settings = match Settings::load(&cli.connection, cli.output) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qgactl: {e}");
            return exit::LOCAL;
        }
    };
    let client = match Client::connect(&settings).await {
        Ok(c) => c,
        Err(e @ connect::ConnectError::Unreachable { .. }) => {
            eprintln!("qgactl: UNAVAILABLE: {e}");
            return exit::for_status(tonic::Code::Unavailable);
        }
        Err(e) => {
            eprintln!("qgactl: {e}");
            return exit::LOCAL;
        }
    };
    match commands::run(&client, cli.command).await {
        Ok(printed) => print(&printed, settings.output),
        Err(status) if transport_failure(&status) => {
            // The connection broke before the bridge answered (a refused TLS handshake,
            // a reset): no status of the bridge's.
            let why = connect::source_chain(&status);
            eprintln!("qgactl: UNAVAILABLE: cannot reach the bridge: {why}");
            exit::for_status(tonic::Code::Unavailable)
        }
        Err(status) => {
            // The server's detail, on one line.
            let message = status.message().replace('\n', " ");
            eprintln!("qgactl: {}: {message}", exit::name(status.code()));
            exit::for_status(status.code())
        }
    }
}

/// Whether `status` is tonic's report of a broken connection rather than an answer.
///
/// A status decoded from the bridge's reply never has a source; one tonic makes on this
/// side from a connection error always has. With TLS 1.3 a refused client certificate
/// shows only after the request is sent, as a reset (UNKNOWN) or a cancelled stream
/// (CANCELLED), depending on timing.
fn transport_failure(status: &tonic::Status) -> bool {
    use std::error::Error;
    use tonic::Code;
    status.source().is_some()
        && matches!(
            status.code(),
            Code::Unknown | Code::Cancelled | Code::Unavailable | Code::Internal
        )
}

/// Prints what a command gave, in the chosen form; the exit code.
fn print(printed: &commands::Printed, output: Output) -> u8 {
    let mut stderr = std::io::stderr().lock();
    for line in &printed.progress {
        let _ = writeln!(stderr, "{line}");
    }
    let body = match output {
        Output::Table => printed.text.clone(),
        Output::Json => {
            serde_json::to_string_pretty(&printed.json).unwrap_or_else(|_| "null".into()) + "\n"
        }
    };
    if std::io::stdout().lock().write_all(body.as_bytes()).is_err() {
        return exit::LOCAL;
    }
    if printed.partial {
        let _ = writeln!(stderr, "qgactl: the guest refused some block changes");
        exit::PARTIAL
    } else {
        0
    }
}
