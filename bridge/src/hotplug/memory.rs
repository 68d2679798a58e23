//! One VM's memory hotplug state: its [`MemoryBackend`] and the lock its running
//! operation holds. The request-ids of its operations, with what came of them, are in the
//! [`Journal`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use qga_qmp::QmpLimits;

pub use crate::journal::Key;

use super::{
    Done, Operation, Settings,
    outcome::{Stored, records},
};
use crate::{
    backend::{MemoryBackend, Timeouts, libvirt::LibvirtBackend, qmp::QmpBackend},
    error::BridgeError,
    journal::{Journal, State},
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
}

/// The per-command time limits of the backends.
fn timeouts(settings: &Settings) -> Timeouts {
    Timeouts {
        command: Duration::from_millis(settings.hotplug.qmp_timeout_ms),
        eject: Duration::from_millis(settings.hotplug.eject_timeout_ms),
    }
}

impl VmMemory {
    fn new(source: MemorySource, backend: Arc<dyn MemoryBackend>) -> Self {
        Self {
            source,
            backend,
            busy: Arc::new(tokio::sync::Mutex::new(())),
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

    /// The VM's lock, unless an operation holds it.
    pub fn try_hold(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.busy.clone().try_lock_owned().ok()
    }

    /// Decides whether `op` runs now on VM `vm`: the VM's lock is taken first and the
    /// journal read under it. An operation records its outcome before it releases the
    /// lock, so a retry racing with the end of its first call gets the first call's
    /// outcome, never a second run.
    pub fn admit(
        &self,
        vm: &str,
        op: &Operation,
        key: Option<&Key>,
        journal: &Journal,
    ) -> Result<Admitted, BridgeError> {
        let guard = self.busy.clone().try_lock_owned();
        let entry = match key {
            Some(key) => journal.lookup(vm, key).map_err(|e| BridgeError::Hotplug {
                vm: vm.to_string(),
                step: "journal".into(),
                reason: format!("{e}; nothing was done"),
                blocks: Vec::new(),
            })?,
            None => None,
        };
        if let (Some(key), Some(entry)) = (key, &entry) {
            if !records(entry, op) {
                return Err(BridgeError::InvalidRequest(format!(
                    "request-id '{}' was used for another operation ({} {})",
                    key.id, entry.method, entry.args
                )));
            }
            match &entry.state {
                State::Ended(outcome) => {
                    let stored = Stored::from_json(outcome).map_err(|e| BridgeError::Hotplug {
                        vm: vm.to_string(),
                        step: "journal".into(),
                        reason: format!(
                            "the recorded outcome does not read back ({e}); nothing was done"
                        ),
                        blocks: Vec::new(),
                    })?;
                    return Ok(Admitted::Replay(stored.result(vm)));
                }
                State::Interrupted => return Err(recovering(vm, key)),
                State::Running if journal.live(vm, key) => {
                    return Err(BridgeError::Aborted(format!(
                        "the operation with this request-id still runs on VM '{vm}'; \
                         retry with the same request-id for its outcome"
                    )));
                }
                // Running, but not in this bridge: it could not record its end (the
                // journal failed); what it did is unknown to the journal.
                State::Running => return Ok(Admitted::Replay(Err(unrecorded(vm, key)))),
            }
        }
        match guard {
            Ok(guard) => Ok(Admitted::Run(guard)),
            Err(_) => Err(BridgeError::Aborted(format!(
                "another memory hotplug operation runs on VM '{vm}'; nothing was done"
            ))),
        }
    }
}

/// The answer to a retry of an operation a bridge stopped during, until it is recovered
/// (see [`super::recover`]): retryable.
fn recovering(vm: &str, key: &Key) -> BridgeError {
    BridgeError::Aborted(format!(
        "the operation with request-id '{}' on VM '{vm}' was interrupted by a bridge \
         restart and is being recovered; retry with the same request-id for its outcome",
        key.id
    ))
}

/// The answer to a retry of an operation whose end this bridge could not record.
fn unrecorded(vm: &str, key: &Key) -> BridgeError {
    BridgeError::Hotplug {
        vm: vm.to_string(),
        step: "journal".into(),
        reason: format!(
            "the operation with request-id '{}' ran, but its outcome could not be recorded; \
             it is not run again: memory-layout shows the VM as it is now",
            key.id
        ),
        blocks: Vec::new(),
    }
}
