//! What a VM's worker tells the rest of the bridge about its channel: the status
//! `ListVms` reports and the VM's metrics series.

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use super::{AgentState, VmStatus, lock};
use crate::{error::BridgeError, metrics::Metrics};

/// A worker's reporting handle; its channel holds a copy. See the module docs.
#[derive(Debug, Clone)]
pub(super) struct Vitals {
    /// The VM's name.
    pub(super) name: String,
    /// This session's claim on the VM's metric series.
    pub(super) claim: u64,
    pub(super) status: Arc<Mutex<VmStatus>>,
    pub(super) metrics: Arc<Metrics>,
}

impl Vitals {
    /// Claims `name`'s metric series for a new session, reporting into `status`.
    pub(super) fn new(name: &str, status: Arc<Mutex<VmStatus>>, metrics: Arc<Metrics>) -> Self {
        let claim = metrics.claim_vm(name);
        metrics.set_connected(name, claim, false);
        Self {
            name: name.to_string(),
            claim,
            status,
            metrics,
        }
    }

    /// Changes the status.
    pub(super) fn update(&self, f: impl FnOnce(&mut VmStatus)) {
        f(&mut lock(&self.status));
    }

    /// The agent answered: the channel is up.
    pub(super) fn contact(&self) {
        self.metrics.set_connected(&self.name, self.claim, true);
        self.update(|s| {
            if !matches!(s.state, AgentState::Connected | AgentState::Busy) {
                s.connections += 1;
            }
            s.state = AgentState::Connected;
            s.last_contact = Some(SystemTime::now());
        });
    }

    /// The channel is down, for `reason`.
    pub(super) fn disconnected(&self, reason: &str) {
        self.metrics.set_connected(&self.name, self.claim, false);
        self.update(|s| {
            s.state = AgentState::Disconnected;
            s.last_error = Some(reason.to_string());
        });
    }

    /// Records what went wrong last without changing the state.
    pub(super) fn error(&self, reason: String) {
        self.update(|s| s.last_error = Some(reason));
    }

    /// The error for a call the agent cannot be reached for.
    pub(super) fn unavailable(&self, reason: impl Into<String>) -> BridgeError {
        BridgeError::Unavailable {
            vm: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// The error for a reply the bridge cannot accept.
    pub(super) fn bad_reply(&self, reason: String) -> BridgeError {
        BridgeError::BadReply {
            vm: self.name.clone(),
            reason,
        }
    }

    /// Drops the VM's series when the session ends (unless a newer session owns them).
    pub(super) fn release(&self) {
        self.metrics.release_vm(&self.name, self.claim);
    }
}
