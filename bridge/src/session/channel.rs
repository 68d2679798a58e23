//! How a worker reaches its VM's agent: a [`Channel`] runs one call at a time and, for a
//! state-changing call whose caller stopped waiting after the agent got it, awaits the
//! outcome that is still to come. Implementations: [`super::socket`] (a unix socket of
//! ours, running the QGA protocol itself) and [`super::libvirt`] (libvirt holds the
//! channel). The one worker loop around them is [`super::worker`].

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use super::{CallResult, Job, record::Late};
use crate::call::Call;

/// What running a job gave.
#[derive(Debug)]
pub(super) enum Executed<O> {
    /// The call's result, final.
    Done(CallResult),
    /// The caller stopped waiting (or its deadline passed) after a state-changing request
    /// reached the agent: the error goes to the caller, and `O` awaits the real outcome.
    Orphaned(CallResult, O),
}

/// A VM's agent channel. See the module docs.
pub(super) trait Channel: Send + 'static {
    /// What awaiting an orphaned call's outcome needs (a request id, a running future).
    type Orphan: Send;

    /// Runs `job`'s call until its deadline or until its caller leaves.
    fn execute(&mut self, job: &mut Job) -> impl Future<Output = Executed<Self::Orphan>> + Send;

    /// Awaits, up to `limit`, the outcome of `call` orphaned as `orphan`.
    fn outcome(
        &mut self,
        call: &Call,
        orphan: Self::Orphan,
        limit: Instant,
    ) -> impl Future<Output = Late> + Send;

    /// How long the channel may stay open without calls before [`Channel::release`]
    /// (shared mode, while connected); `None`: it stays.
    fn idle(&self) -> Option<Duration> {
        None
    }

    /// Closes the idle channel so that other clients get the agent.
    fn release(&mut self) {}
}
