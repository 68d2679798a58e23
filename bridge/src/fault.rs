//! A test-only fault hook, compiled in only with the `test-hooks` feature (the end-to-end
//! tests enable it; release builds and packages do not). With
//! `QGA_BRIDGE_TEST_KILL_AFTER_STEP=NAME` in its environment such a bridge kills itself
//! with SIGKILL the moment a hotplug step named `NAME` (`object-add`, `device_add`,
//! `wait-blocks`, `online`, `offline`, `device_del`, ...) completes, so that tests can
//! show what a crash at each step leaves and how the next bridge recovers from it. Read
//! once. Without the feature, [`step_done`] does nothing and the variable is ignored.

/// The environment variable.
pub const KILL_AFTER_STEP: &str = "QGA_BRIDGE_TEST_KILL_AFTER_STEP";

/// Called as step `name` completes: dies there if the hook names it.
#[cfg(feature = "test-hooks")]
pub fn step_done(name: &str) {
    use std::sync::OnceLock;
    static STEP: OnceLock<Option<String>> = OnceLock::new();
    let hook = STEP.get_or_init(|| std::env::var(KILL_AFTER_STEP).ok());
    if hook.as_deref() == Some(name) {
        eprintln!("qga-bridge: {KILL_AFTER_STEP}={name}: killing this process");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}

/// Called as step `name` completes: without the `test-hooks` feature, nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn step_done(_name: &str) {}

/// Whether this build has the hook, for a start-up warning when the variable is set in a
/// build that ignores it.
pub const ARMED: bool = cfg!(feature = "test-hooks");
