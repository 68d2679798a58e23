//! One VM's memory hotplug state: its [`MemoryBackend`], the lock its running operation
//! holds, and the request-ids of its operations with what came of them.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use qga_qmp::QmpLimits;
use qga_wire::sync::lock;

use super::{Done, Operation, Settings};
use crate::{
    backend::{MemoryBackend, Timeouts, libvirt::LibvirtBackend, qmp::QmpBackend},
    error::BridgeError,
};

/// Where a VM's memory backend comes from: the same source again keeps the backend and
/// its request-ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemorySource {
    /// A QMP socket, shared with other tools (released when idle) or not.
    Qmp {
        /// The socket.
        socket: PathBuf,
        /// Released when idle.
        shared: bool,
    },
    /// A libvirt domain run.
    Libvirt(qga_libvirt::Dom),
}

/// A request-id, scoped to the identity that sent it: one caller cannot replay
/// another's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The sender's identity.
    pub identity: Option<String>,
    /// The caller's request-id.
    pub id: String,
}

/// A request-id, the operation it named, and what came of it.
type Remembered = (Key, Operation, Result<Done, BridgeError>);

/// What a VM's operations leave behind.
#[derive(Debug, Default)]
struct State {
    /// The running operation's request-id, if it has one.
    running: Option<Key>,
    /// Request-ids and what came of them, oldest first.
    done: VecDeque<Remembered>,
}

/// Whether an operation runs, or what to answer instead.
#[derive(Debug)]
pub enum Admitted {
    /// It runs, holding the VM's lock.
    Run(tokio::sync::OwnedMutexGuard<()>),
    /// The remembered outcome of the same request-id.
    Replay(Result<Done, BridgeError>),
}

/// One VM's memory hotplug state. See the module docs.
#[derive(Debug)]
pub struct VmMemory {
    source: MemorySource,
    backend: Arc<dyn MemoryBackend>,
    /// Held by the running operation.
    busy: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
}

/// The per-command time limits of the backends.
fn timeouts(settings: &Settings) -> Timeouts {
    Timeouts {
        command: Duration::from_millis(settings.hotplug.qmp_timeout_ms),
        eject: Duration::from_millis(settings.hotplug.eject_timeout_ms),
    }
}

/// Whether a failed operation's outcome is final, so that a retry with its request id
/// gets it again: it acted, or found the request impossible. Transient failures (QEMU or
/// the agent unreachable, a deadline) are not remembered, so the retry runs.
fn remembered(result: &Result<Done, BridgeError>) -> bool {
    matches!(
        result,
        Ok(_) | Err(BridgeError::Hotplug { .. } | BridgeError::DimmNotFound { .. })
    )
}

impl VmMemory {
    fn new(source: MemorySource, backend: Arc<dyn MemoryBackend>) -> Self {
        Self {
            source,
            backend,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            state: Mutex::new(State::default()),
        }
    }

    /// Hotplug over QMP socket `socket` (connected on first use); a `shared` socket is
    /// released `timeouts.shared_idle_ms` after the last command, and held while an
    /// operation waits for an event.
    pub fn qmp(settings: &Settings, socket: &Path, shared: bool) -> Self {
        let limits = QmpLimits {
            max_message: settings.hotplug.max_qmp_bytes,
            connect_timeout: settings.connect,
            idle_close: shared.then_some(settings.shared_idle),
            ..QmpLimits::default()
        };
        let backend = QmpBackend::new(socket, limits, timeouts(settings));
        let source = MemorySource::Qmp {
            socket: socket.to_path_buf(),
            shared,
        };
        Self::new(source, Arc::new(backend))
    }

    /// Hotplug of libvirt domain run `dom` through `libvirt`.
    pub fn libvirt(
        settings: &Settings,
        libvirt: Arc<qga_libvirt::Libvirt>,
        dom: qga_libvirt::Dom,
    ) -> Self {
        let source = MemorySource::Libvirt(dom.clone());
        let backend = LibvirtBackend::new(libvirt, dom, timeouts(settings));
        Self::new(source, Arc::new(backend))
    }

    /// Where its backend comes from.
    pub fn source(&self) -> &MemorySource {
        &self.source
    }

    /// Its backend.
    pub fn backend(&self) -> Arc<dyn MemoryBackend> {
        self.backend.clone()
    }

    /// Decides whether `op` runs now on VM `vm`: the VM's lock is taken first and the
    /// remembered request-ids looked at under it, so a retry racing with the end of its
    /// first call gets the first call's outcome, never a second run.
    pub fn admit(
        &self,
        vm: &str,
        op: &Operation,
        key: Option<&Key>,
    ) -> Result<Admitted, BridgeError> {
        let guard = self.busy.clone().try_lock_owned();
        let mut state = lock(&self.state);
        if let Some(key) = key
            && let Some((_, first, result)) = state.done.iter().find(|(k, ..)| k == key)
        {
            if first != op {
                return Err(BridgeError::InvalidRequest(format!(
                    "request-id '{}' was used for another operation ({} {})",
                    key.id,
                    first.method(),
                    serde_json::to_string(first).unwrap_or_default()
                )));
            }
            return Ok(Admitted::Replay(result.clone()));
        }
        let Ok(guard) = guard else {
            let same = key.is_some() && state.running.as_ref() == key;
            return Err(BridgeError::Aborted(if same {
                format!(
                    "the operation with this request-id still runs on VM '{vm}'; \
                     retry with the same request-id for its outcome"
                )
            } else {
                format!("another memory hotplug operation runs on VM '{vm}'; nothing was done")
            }));
        };
        state.running = key.cloned();
        Ok(Admitted::Run(guard))
    }

    /// Ends the running operation: remembers its outcome under its request-id (keeping
    /// at most `max_ids`) when the outcome is final.
    pub fn finish(
        &self,
        key: Option<Key>,
        op: Operation,
        result: &Result<Done, BridgeError>,
        max_ids: usize,
    ) {
        let mut state = lock(&self.state);
        state.running = None;
        if let Some(key) = key
            && remembered(result)
        {
            if state.done.len() >= max_ids {
                state.done.pop_front();
            }
            state.done.push_back((key, op, result.clone()));
        }
    }
}
