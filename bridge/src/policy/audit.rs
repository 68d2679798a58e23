//! The audit trail: one JSON line per state-changing call and per refused HTTP request —
//! when, who (transport and peer), what (VM, method, arguments), the outcome with the
//! per-block results, and how long it took.
//!
//! Writing never blocks a call: records go through a bounded queue to a writer thread.
//! When the queue is full or the file cannot be written (a full disk, say), records are
//! dropped, counted in `qga_bridge_audit_dropped_total`, and the trouble is logged once
//! per episode; the bridge keeps serving. Denials are capped per second, so a flood of
//! refused requests cannot crowd out the records of calls that changed a guest.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::Value;

use crate::{
    metrics::Metrics,
    policy::{Caller, auth::Identity},
};

/// Records waiting for the writer.
const QUEUE: usize = 4096;

/// Denial records written per second at most: a flood of refused requests must not crowd
/// the records of calls that changed guests out of the queue.
const MAX_DENIALS_PER_SECOND: u32 = 100;

/// Where the audit trail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Standard error, one JSON line each, whatever the log filter.
    Log,
    /// A file, appended to (created with mode 0600).
    File(PathBuf),
}

/// One audit line.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// Unix time in seconds (fractional).
    pub time: f64,
    /// `call` (a state-changing call) or `denied` (a request or call refused).
    pub kind: &'static str,
    /// `grpc` or `jsonrpc`; for the bridge's own changes, the part of it that made them
    /// (`keeper`, `recovery`).
    pub transport: &'static str,
    /// The peer.
    pub peer: Option<&'a str>,
    /// The caller's identity, if it proved one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a str>,
    /// The VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<&'a str>,
    /// The QGA command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// Its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// `ok`, an error outcome (`deadline_exceeded`, ...), `caller_left`, or why a request
    /// was denied.
    pub outcome: &'a str,
    /// The error's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per-block results of a set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Value>,
    /// Milliseconds from the call's start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// Seconds since the epoch, now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the writer thread is handed.
#[derive(Debug)]
enum Entry {
    /// A record's line.
    Line(String),
    /// Look at the reopen flag (SIGHUP).
    Wake,
}

/// The audit trail's writer handle. Cheap to share.
#[derive(Debug)]
pub struct Audit {
    tx: SyncSender<Entry>,
    /// Set by [`Audit::reopen`]; the writer reopens its file before its next write.
    reopen: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<Metrics>,
    /// (second, denials recorded in it).
    denials: std::sync::Mutex<(u64, u32)>,
}

impl Audit {
    /// Starts the writer for `sink`. A file that cannot be opened is an error: an audit
    /// trail asked for must exist from the start.
    pub fn start(sink: Sink, metrics: Arc<Metrics>) -> io::Result<Arc<Self>> {
        let file = match &sink {
            Sink::Log => None,
            Sink::File(path) => Some(open(path)?),
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer_metrics = metrics.clone();
        let reopen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = Writer {
            path: match sink {
                Sink::Log => None,
                Sink::File(path) => Some(path),
            },
            file,
            reopen: reopen.clone(),
        };
        std::thread::Builder::new()
            .name("qga-bridge-audit".into())
            .spawn(move || writer.run(rx, &writer_metrics))?;
        Ok(Arc::new(Self {
            tx,
            reopen,
            metrics,
            denials: std::sync::Mutex::new((0, 0)),
        }))
    }

    /// Whether one more denial may be recorded this second.
    fn denial_allowed(&self) -> bool {
        let second = now() as u64;
        let mut window = qga_wire::sync::lock(&self.denials);
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        window.1 <= MAX_DENIALS_PER_SECOND
    }

    /// Queues `record`; drops it (counted) if the writer is behind, or if it is one denial
    /// too many this second.
    pub fn record(&self, record: &Record<'_>) {
        if record.kind == "denied" && !self.denial_allowed() {
            self.metrics.audit_dropped();
            return;
        }
        let Ok(line) = serde_json::to_string(record) else {
            self.metrics.audit_dropped();
            return;
        };
        match self.tx.try_send(Entry::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.audit_dropped();
            }
        }
    }

    /// A record of `kind` from `caller` with everything else empty.
    pub fn base<'a>(kind: &'static str, caller: &'a Caller, outcome: &'a str) -> Record<'a> {
        Record {
            peer: caller.peer.as_deref(),
            identity: caller.identity.as_ref().map(Identity::name),
            ..Self::bridge(kind, caller.transport, outcome)
        }
    }

    /// A record of `kind` of a change the bridge made on its own, by its part `by`
    /// (`keeper`, `recovery`): no peer, no identity.
    pub fn bridge<'a>(kind: &'static str, by: &'static str, outcome: &'a str) -> Record<'a> {
        Record {
            time: now(),
            kind,
            transport: by,
            peer: None,
            identity: None,
            vm: None,
            method: None,
            arguments: None,
            outcome,
            error: None,
            results: None,
            duration_ms: None,
        }
    }

    /// Has the writer reopen the audit file by its path before its next write (SIGHUP,
    /// after logrotate moved it away): records go to the new file from then on. If it
    /// cannot be opened, the old one is kept and an error logged.
    pub fn reopen(&self) {
        self.reopen.store(true, std::sync::atomic::Ordering::SeqCst);
        // A full queue wakes the writer anyway.
        let _ = self.tx.try_send(Entry::Wake);
    }

    /// Records a request refused before it became a call (`why` says by what).
    pub fn denied(&self, caller: &Caller, why: &str) {
        self.record(&Self::base("denied", caller, why.trim_end()));
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The writer thread's state.
struct Writer {
    /// The file's path; `None`: standard error.
    path: Option<PathBuf>,
    file: Option<File>,
    reopen: Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    /// Reopens the file by its path if asked to.
    fn reopen_if_asked(&mut self) {
        if !self.reopen.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        match open(path) {
            Ok(f) => {
                self.file = Some(f);
                tracing::info!(path = %path.display(), "audit log reopened");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit log; writing to the old file");
            }
        }
    }

    /// Appends lines until every sender is gone.
    fn run(mut self, rx: Receiver<Entry>, metrics: &Metrics) {
        let mut failing = false;
        while let Ok(entry) = rx.recv() {
            self.reopen_if_asked();
            let mut buf = Vec::new();
            // Whatever else is queued goes out in the same write.
            for entry in std::iter::once(entry).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                if let Entry::Line(line) = entry {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
            }
            if buf.is_empty() {
                continue;
            }
            let mut stderr = io::stderr();
            let f: &mut dyn Write = match self.file.as_mut() {
                Some(f) => f,
                None => &mut stderr,
            };
            match f.write_all(&buf).and_then(|()| f.flush()) {
                Ok(()) => {
                    if failing {
                        tracing::warn!("audit log writable again");
                    }
                    failing = false;
                }
                Err(e) => {
                    let lost = buf.iter().filter(|&&b| b == b'\n').count();
                    for _ in 0..lost {
                        metrics.audit_dropped();
                    }
                    if !failing {
                        tracing::error!(error = %e, "cannot write the audit log; records are being dropped");
                    }
                    failing = true;
                }
            }
        }
    }
}
