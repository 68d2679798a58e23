//! What hotplug tells the layer above about the changes it made, so that it can audit
//! them: hotplug knows neither the audit trail nor who a caller is, only what was asked,
//! under which request-id, and how it ended.
//!
//! A caller's operation is reported once, through the [`Report`] the caller's layer hands
//! to [`super::Hotplug::run`] (also when the caller left before it ended: the operation
//! runs on in a task of its own). The bridge's own changes — blocks the keeper onlined
//! again, operations recovery finished — go to the bridge-wide [`Witness`].

use std::{fmt, time::Duration};

use super::{Done, Operation, desired::Desired};
use crate::error::BridgeError;

/// A caller's operation, as it ended: run, answered from the journal, or refused.
#[derive(Debug)]
pub struct Ended<'a> {
    /// The VM.
    pub vm: &'a str,
    /// What was asked.
    pub op: &'a Operation,
    /// The caller's request-id, if it gave one.
    pub request_id: Option<&'a str>,
    /// Answered from the journal (a retried request-id's remembered or recovered outcome)
    /// rather than run.
    pub replayed: bool,
    /// How it ended.
    pub result: &'a Result<Done, BridgeError>,
    /// Since the call arrived.
    pub elapsed: Duration,
}

/// Reports one caller's operation; called exactly once per [`super::Hotplug::run`].
pub type Report = Box<dyn FnOnce(&Ended<'_>) + Send>;

/// A change the bridge made on its own.
#[derive(Debug)]
pub enum Background<'a> {
    /// The keeper onlined `blocks` of desired memory `desired` again (`error`: some or
    /// all of them failed).
    Restored {
        /// The VM.
        vm: &'a str,
        /// The device and how its blocks are to be online.
        desired: &'a Desired,
        /// The blocks it tried to online.
        blocks: &'a [u64],
        /// What failed, if anything.
        error: Option<String>,
    },
    /// The keeper set the balloon again to hold `held` bytes (QEMU's target `target`),
    /// after a guest reboot or a new QEMU left it empty (`error`: the request failed).
    Ballooned {
        /// The VM.
        vm: &'a str,
        /// Bytes the balloon is to hold.
        held: u64,
        /// QEMU's target.
        target: u64,
        /// What failed, if anything.
        error: Option<String>,
    },
    /// Recovery gave an operation a stopped bridge left unfinished its final outcome.
    Recovered {
        /// The VM.
        vm: &'a str,
        /// The operation's method.
        method: &'a str,
        /// Its arguments, as journaled.
        arguments: &'a serde_json::Value,
        /// Its final outcome.
        result: &'a Result<Done, BridgeError>,
    },
}

/// Where the bridge's own changes are reported (the service's audit trail).
pub trait Witness: Send + Sync + fmt::Debug {
    /// Reports `change`.
    fn saw(&self, change: &Background<'_>);
}
