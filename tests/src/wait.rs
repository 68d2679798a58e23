//! Waiting for a condition, never for a time: a TCG guest, QEMU, libvirtd and the bridge
//! take as long as a loaded machine lets them, so a test polls what it needs to see, within
//! a generous bound, and fails showing the last state it saw.

use std::{
    fmt::Display,
    future::Future,
    ops::ControlFlow,
    time::{Duration, Instant},
};

use anyhow::bail;

/// The bound for anything that must happen "soon" in a guest or a daemon: far above what
/// an idle machine needs, so that only a failure reaches it. Never a measured timing.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// How often a condition is looked at.
const POLL: Duration = Duration::from_millis(200);

/// Polls `probe` until it breaks with a value, for at most `within`. `Continue` carries
/// the state seen, shown with `what` if time runs out; an error ends the wait at once (a
/// failed call is a failure, not a state still converging).
pub async fn until<T, S, F, Fut>(what: &str, within: Duration, mut probe: F) -> anyhow::Result<T>
where
    S: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<ControlFlow<T, S>>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await? {
            ControlFlow::Break(v) => return Ok(v),
            ControlFlow::Continue(last) if Instant::now() >= deadline => {
                bail!("{what}: not within {within:?}; last seen: {last}")
            }
            ControlFlow::Continue(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// [`until`] for a blocking `probe`, on a thread that may block.
pub fn until_blocking<T, S: Display>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> anyhow::Result<ControlFlow<T, S>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match probe()? {
            ControlFlow::Break(v) => return Ok(v),
            ControlFlow::Continue(last) if Instant::now() >= deadline => {
                bail!("{what}: not within {within:?}; last seen: {last}")
            }
            ControlFlow::Continue(_) => std::thread::sleep(POLL),
        }
    }
}
