//! One VM's memory hotplug state: its [`MemoryBackend`] and the lock its running
//! operation holds. The request-ids of its operations, with what came of them, are in the
//! [`Journal`].

use std::sync::Arc;

use tokio::time::Instant;

use super::{
    Done, HotplugSettings, Operation,
    lock::{Background, Held, VmLock},
    outcome::{Stored, records},
};
use crate::{
    backend::{self, MemoryBackend, Source},
    error::BridgeError,
    journal::{Journal, Key, State},
};

/// Whether an operation runs, or what to answer instead.
#[derive(Debug)]
pub enum Admitted {
    /// It runs, holding the VM.
    Run(Held),
    /// The remembered outcome of the same request-id.
    Replay(Result<Done, BridgeError>),
    /// Its request-id is of an operation a stopped bridge left unfinished, not recovered
    /// yet: recover the VM now, holding it, and answer with the recovered outcome.
    Recover(Held),
}

/// One VM's memory hotplug state. See the module docs.
#[derive(Debug)]
pub struct VmMemory {
    source: Source,
    backend: Arc<dyn MemoryBackend>,
    /// Held by the running operation or background pass.
    lock: VmLock,
}

impl VmMemory {
    /// The hotplug state of a VM whose backend is `source`, opened within `settings`'
    /// bounds (a QMP socket is connected on first use).
    pub fn open(settings: &HotplugSettings, source: Source) -> Self {
        Self {
            backend: backend::open(&source, &settings.backend),
            source,
            lock: VmLock::default(),
        }
    }

    /// Where its backend comes from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Its backend.
    pub fn backend(&self) -> Arc<dyn MemoryBackend> {
        self.backend.clone()
    }

    /// Whether no operation or background pass holds the VM (see [`VmLock::idle`]).
    pub fn idle(&self) -> bool {
        self.lock.idle()
    }

    /// The VM for a background pass (the keeper, recovery), if no operation holds or
    /// waits for it.
    pub fn background(&self) -> Option<Background> {
        self.lock.background()
    }

    /// Decides whether `op` runs on VM `vm`. A caller's operation is refused (ABORTED)
    /// only while another caller's operation runs (a retry of a request-id that ended
    /// still gets its outcome then); background work it waits for, until `until`. Before
    /// anything runs, the journal is read with the VM held, and an operation records its
    /// outcome before it lets go of it, so a retry racing with the end of its first call
    /// gets the first call's outcome, never a second run.
    pub async fn admit(
        &self,
        vm: &str,
        op: &Operation,
        key: Option<&Key>,
        journal: &Journal,
        until: Instant,
    ) -> Result<Admitted, BridgeError> {
        let Some(slot) = self.lock.slot() else {
            // Another caller's operation runs: a retry of a request-id that ended (or
            // that this one is) still gets its answer.
            return match answer(vm, op, key, journal)? {
                Some(Answer::Replay(result)) => Ok(Admitted::Replay(result)),
                Some(Answer::Refuse(e)) => Err(e),
                Some(Answer::Recover(pending)) => Err(pending),
                None => Err(BridgeError::Aborted(format!(
                    "another caller's memory hotplug operation runs on VM '{vm}'; nothing \
                     was done"
                ))),
            };
        };
        let held = self
            .lock
            .hold(slot, until)
            .await
            .ok_or_else(|| BridgeError::Waited {
                vm: vm.to_string(),
                reason: "the bridge's own work on the VM (the keeper onlining memory again, or \
                         recovery) did not end before the call's deadline (or \
                         hotplug.timeout_ms); nothing was done"
                    .into(),
            })?;
        Ok(match answer(vm, op, key, journal)? {
            None => Admitted::Run(held),
            Some(Answer::Replay(result)) => Admitted::Replay(result),
            Some(Answer::Refuse(e)) => return Err(e),
            Some(Answer::Recover(_)) => Admitted::Recover(held),
        })
    }
}

/// The answer to `op` under `key` on VM `vm` once the VM was recovered (see
/// [`super::recover`]): the outcome recovery recorded for it.
pub(super) fn after_recovery(
    vm: &str,
    op: &Operation,
    key: Option<&Key>,
    journal: &Journal,
) -> Result<Done, BridgeError> {
    match answer(vm, op, key, journal)? {
        Some(Answer::Replay(result)) => result,
        Some(Answer::Refuse(e) | Answer::Recover(e)) => Err(e),
        // Recovered, but its outcome is no longer kept (the per-VM bound or the TTL).
        None => Err(BridgeError::Hotplug {
            vm: vm.to_string(),
            step: "journal".into(),
            reason: "the operation with this request-id was interrupted by a bridge restart \
                     and recovered, but its outcome is no longer kept; it is not run again: \
                     memory-layout shows the VM as it is now"
                .into(),
            blocks: Vec::new(),
        }),
    }
}

/// What the journal says to answer a call under request-id `key` instead of running it.
enum Answer {
    /// The remembered outcome.
    Replay(Result<Done, BridgeError>),
    /// A refusal.
    Refuse(BridgeError),
    /// The operation was interrupted by a stopped bridge and is not recovered yet; the
    /// answer while it cannot be recovered now.
    Recover(BridgeError),
}

/// What to answer instead of running `op` under `key` on VM `vm`, if anything.
fn answer(
    vm: &str,
    op: &Operation,
    key: Option<&Key>,
    journal: &Journal,
) -> Result<Option<Answer>, BridgeError> {
    let Some(key) = key else {
        return Ok(None);
    };
    let entry = journal.lookup(vm, key).map_err(|e| BridgeError::Hotplug {
        vm: vm.to_string(),
        step: "journal".into(),
        reason: format!("{e}; nothing was done"),
        blocks: Vec::new(),
    })?;
    let Some(entry) = entry else {
        return Ok(None);
    };
    if !records(&entry, op) {
        return Err(BridgeError::InvalidRequest(format!(
            "request-id '{}' was used for another operation ({} {})",
            key.id, entry.method, entry.args
        )));
    }
    Ok(Some(match &entry.state {
        State::Ended(outcome) => {
            let stored = Stored::from_json(outcome).map_err(|e| BridgeError::Hotplug {
                vm: vm.to_string(),
                step: "journal".into(),
                reason: format!("the recorded outcome does not read back ({e}); nothing was done"),
                blocks: Vec::new(),
            })?;
            Answer::Replay(stored.result(vm))
        }
        State::Interrupted => Answer::Recover(recovering(vm, key)),
        State::Running if journal.live(vm, key) => Answer::Refuse(BridgeError::Aborted(format!(
            "the operation with this request-id still runs on VM '{vm}'; retry with the same \
             request-id for its outcome"
        ))),
        // Running, but not in this bridge: it could not record its end (the journal
        // failed); what it did is unknown to the journal.
        State::Running => Answer::Replay(Err(unrecorded(vm, key))),
    }))
}

/// The answer to a retry of an operation a bridge stopped during, until it is recovered
/// (see [`super::recover`]): retryable.
fn recovering(vm: &str, key: &Key) -> BridgeError {
    BridgeError::Aborted(format!(
        "the operation with request-id '{}' on VM '{vm}' was interrupted by a bridge \
         restart and awaits recovery; retry with the same request-id for its outcome",
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

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::config::Config;

    fn vm_memory(dir: &Path) -> VmMemory {
        let settings = HotplugSettings::of(&Config::default());
        let socket = dir.join("qmp.sock");
        VmMemory::open(
            &settings,
            Source::Qmp {
                socket,
                shared: false,
            },
        )
    }

    fn journal(dir: &Path) -> Journal {
        let limits = crate::journal::Retention {
            per_vm: 8,
            ttl: Duration::from_secs(3600),
            max_entries: 64,
        };
        Journal::open(&dir.join("state"), limits).expect("journal")
    }

    const OP: Operation = Operation::Resize { size: 1 << 30 };

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_caller_waits_for_background_work_and_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (memory, journal) = (Arc::new(vm_memory(dir.path())), journal(dir.path()));
        let pass = memory.background().expect("free");
        let waiting = {
            let (memory, journal) = (memory.clone(), journal.clone());
            tokio::spawn(async move { memory.admit("vm", &OP, None, &journal, soon()).await })
        };
        while !pass.caller_waits() {
            tokio::task::yield_now().await;
        }
        let second = memory.admit("vm", &OP, None, &journal, soon()).await;
        let Err(e) = second else {
            panic!("a second caller is refused while the first waits: {second:?}");
        };
        assert!(matches!(e, BridgeError::Aborted(_)), "{e:?}");
        assert!(e.to_string().contains("another caller's"), "{e}");
        drop(pass);
        let first = waiting.await.expect("joins");
        assert!(matches!(first, Ok(Admitted::Run(_))), "{first:?}");
        assert!(memory.background().is_none(), "the caller holds the VM");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_whose_deadline_passes_waiting_gets_deadline_exceeded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (memory, journal) = (vm_memory(dir.path()), journal(dir.path()));
        let _pass = memory.background().expect("free");
        let until = Instant::now() + Duration::from_millis(500);
        let r = memory.admit("vm", &OP, None, &journal, until).await;
        let Err(e) = r else {
            panic!("the pass outlasted the caller's deadline: {r:?}");
        };
        assert!(matches!(e, BridgeError::Waited { .. }), "{e:?}");
        assert!(e.to_string().contains("nothing was done"), "{e}");
        assert!(memory.lock.slot().is_some(), "the slot was given back");
    }

    #[tokio::test]
    async fn a_retry_of_an_ended_request_id_is_answered_while_another_caller_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (memory, journal) = (vm_memory(dir.path()), journal(dir.path()));
        let key = Key {
            identity: Some("cp".into()),
            id: "r1".into(),
        };
        let (method, args) = super::super::outcome::intent(&OP);
        journal
            .begin("vm", &key, method, args)
            .await
            .expect("begin");
        let failed = Err(BridgeError::DimmNotFound {
            vm: "vm".into(),
            dimm: "d".into(),
        });
        let outcome = Stored::json_of(&failed);
        journal
            .end("vm", &key, super::super::outcome::intent(&OP), outcome)
            .await
            .expect("end");
        let _other = memory
            .admit("vm", &OP, None, &journal, soon())
            .await
            .expect("admitted");
        let retry = memory.admit("vm", &OP, Some(&key), &journal, soon()).await;
        assert!(
            matches!(&retry, Ok(Admitted::Replay(r)) if *r == failed),
            "{retry:?}"
        );
    }
}
