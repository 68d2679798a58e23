//! A VM's hotplug lock, with callers first: the bridge's own work on a VM (the keeper's
//! passes, recovery, and any background pass to come) never makes a caller's operation
//! fail.
//!
//! Two locks make that rule:
//!
//! - the **caller slot**, held by a caller's operation (plug, unplug, resize) from its
//!   admission to its end. A caller's operation takes it without waiting: if it is held,
//!   another caller's operation runs on the VM and this one is refused as ABORTED
//!   (`-32011`), since the control plane that sent it has a stale view of the VM;
//! - the **VM lock**, held by whatever changes the VM. A caller's operation, once it has
//!   the slot, waits for it, bounded by the caller's deadline: the keeper's pass holds it
//!   for a short while and gives way at its next step once a caller waits
//!   ([`Background::caller_waits`]); recovery holds it until it is done. A background
//!   pass takes it only when it is free and no caller holds the slot.

use std::sync::Arc;

use tokio::{
    sync::{Mutex, OwnedMutexGuard},
    time::Instant,
};

/// One VM's hotplug lock. See the module docs.
#[derive(Debug, Default)]
pub struct VmLock {
    /// Held by a caller's operation, from its admission to its end.
    caller: Arc<Mutex<()>>,
    /// Held by whatever changes the VM: a caller's operation or a background pass.
    vm: Arc<Mutex<()>>,
}

/// A caller's slot on the VM, taken without waiting; the VM itself is not held yet.
#[derive(Debug)]
pub struct Slot {
    _caller: OwnedMutexGuard<()>,
}

/// A caller's operation's hold on the VM: its slot and the VM lock, both released when
/// it is dropped.
#[derive(Debug)]
pub struct Held {
    // Fields drop in order: the VM lock goes first, so no background pass starts in the
    // moment between the two releases (the slot is still held then).
    _vm: OwnedMutexGuard<()>,
    _slot: Slot,
}

/// A background pass's hold on the VM.
#[derive(Debug)]
pub struct Background {
    _vm: OwnedMutexGuard<()>,
    caller: Arc<Mutex<()>>,
}

impl Background {
    /// Whether a caller's operation waits for the VM: the pass should stop at its next
    /// step (what it has not done, its next pass does).
    pub fn caller_waits(&self) -> bool {
        self.caller.try_lock().is_err()
    }
}

impl VmLock {
    /// The caller slot, unless another caller's operation holds it.
    pub fn slot(&self) -> Option<Slot> {
        self.caller
            .clone()
            .try_lock_owned()
            .ok()
            .map(|g| Slot { _caller: g })
    }

    /// Waits with `slot` until the VM is free of background work, or `until`; `None`
    /// when `until` came first (the slot is given back).
    pub async fn hold(&self, slot: Slot, until: Instant) -> Option<Held> {
        let vm = tokio::time::timeout_at(until, self.vm.clone().lock_owned())
            .await
            .ok()?;
        Some(Held {
            _vm: vm,
            _slot: slot,
        })
    }

    /// Whether nothing holds the VM: no caller's operation, no background pass. Holds
    /// nothing itself: a read-only pass (the guest's memory signals) looks and goes on.
    pub fn idle(&self) -> bool {
        self.caller.try_lock().is_ok() && self.vm.try_lock().is_ok()
    }

    /// The VM for a background pass, if it is free and no caller's operation holds or
    /// waits for it.
    pub fn background(&self) -> Option<Background> {
        if self.caller.try_lock().is_err() {
            return None;
        }
        let vm = self.vm.clone().try_lock_owned().ok()?;
        Some(Background {
            _vm: vm,
            caller: self.caller.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_second_caller_is_refused_a_background_pass_skipped() {
        let lock = VmLock::default();
        assert!(lock.idle());
        let slot = lock.slot().expect("free");
        assert!(!lock.idle(), "a caller's slot is taken");
        let held = lock.hold(slot, soon()).await.expect("no background work");
        assert!(!lock.idle());
        assert!(lock.slot().is_none(), "another caller's operation runs");
        assert!(
            lock.background().is_none(),
            "a pass waits for the next tick"
        );
        drop(held);
        assert!(lock.slot().is_some());
        assert!(lock.background().is_some());
    }

    #[tokio::test]
    async fn a_caller_waits_for_a_background_pass_which_sees_it_waiting() {
        let lock = Arc::new(VmLock::default());
        let pass = lock.background().expect("free");
        assert!(!pass.caller_waits());
        let waiting = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let slot = lock.slot().expect("no other caller");
                lock.hold(slot, soon()).await.is_some()
            })
        };
        while !pass.caller_waits() {
            tokio::task::yield_now().await;
        }
        assert!(
            lock.slot().is_none(),
            "a second caller is refused meanwhile"
        );
        assert!(lock.background().is_none(), "no second pass meanwhile");
        drop(pass);
        assert!(waiting.await.expect("task"), "the caller got the VM");
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_at_the_deadline_and_gives_the_slot_back() {
        let lock = VmLock::default();
        let _pass = lock.background().expect("free");
        let slot = lock.slot().expect("free");
        let until = Instant::now() + Duration::from_millis(300);
        assert!(lock.hold(slot, until).await.is_none());
        assert!(lock.slot().is_some(), "the slot is free again");
    }
}
