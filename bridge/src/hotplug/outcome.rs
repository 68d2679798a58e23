//! What a hotplug operation leaves in the [`Journal`](crate::journal::Journal), which
//! stores it as JSON without knowing hotplug's types: its intent (method and arguments)
//! and its final outcome ([`Stored`]).

use serde::{Deserialize, Serialize};

use super::{Done, Operation};
use crate::{error::BridgeError, journal::Entry};

/// The intent of `op` as journaled: its method and its arguments (as audited).
pub fn intent(op: &Operation) -> (&'static str, serde_json::Value) {
    (op.method(), serde_json::to_value(op).unwrap_or_default())
}

/// Whether `entry` records `op` (the same method with the same arguments).
pub fn records(entry: &Entry, op: &Operation) -> bool {
    let (method, args) = intent(op);
    entry.method == method && entry.args == args
}

/// A final outcome as stored: success, or one of the failures a retry gets again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stored {
    /// It did this.
    Done(Done),
    /// [`BridgeError::Hotplug`].
    Hotplug {
        /// The step.
        step: String,
        /// Why.
        reason: String,
        /// Per-block results.
        blocks: Vec<qga_wire::schema::GuestMemoryBlockResponse>,
    },
    /// [`BridgeError::DimmNotFound`].
    DimmNotFound {
        /// The DIMM asked for.
        dimm: String,
    },
}

impl Stored {
    /// The outcome to store for `result`; `None` for a failure a retry should not get
    /// again (transient: QEMU or the agent unreachable, a deadline).
    pub fn of(result: &Result<Done, BridgeError>) -> Option<Self> {
        match result {
            Ok(done) => Some(Self::Done(done.clone())),
            Err(BridgeError::Hotplug {
                step,
                reason,
                blocks,
                ..
            }) => Some(Self::Hotplug {
                step: step.clone(),
                reason: reason.clone(),
                blocks: blocks.clone(),
            }),
            Err(BridgeError::DimmNotFound { dimm, .. }) => {
                Some(Self::DimmNotFound { dimm: dimm.clone() })
            }
            Err(_) => None,
        }
    }

    /// The outcome again, for VM `vm`.
    pub fn result(&self, vm: &str) -> Result<Done, BridgeError> {
        match self {
            Self::Done(done) => Ok(done.clone()),
            Self::Hotplug {
                step,
                reason,
                blocks,
            } => Err(BridgeError::Hotplug {
                vm: vm.to_string(),
                step: step.clone(),
                reason: reason.clone(),
                blocks: blocks.clone(),
            }),
            Self::DimmNotFound { dimm } => Err(BridgeError::DimmNotFound {
                vm: vm.to_string(),
                dimm: dimm.clone(),
            }),
        }
    }
}

impl Stored {
    /// The outcome to journal for `result`, as JSON; `None` when not final.
    pub fn json_of(result: &Result<Done, BridgeError>) -> Option<serde_json::Value> {
        Self::of(result).and_then(|s| serde_json::to_value(s).ok())
    }

    /// A journaled outcome read back.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, serde_json::Error> {
        Self::deserialize(value)
    }
}
