//! A test-only fault hook. With `QGA_BRIDGE_TEST_KILL_AFTER_STEP=NAME` in its environment
//! the bridge kills itself with SIGKILL the moment a hotplug step named `NAME`
//! (`object-add`, `device_add`, `wait-blocks`, `online`, `offline`, `device_del`, ...)
//! completes, so that tests can show what a crash at each step leaves and how the next
//! bridge recovers from it. Never set outside tests; read once.

use std::sync::OnceLock;

/// The environment variable.
pub const KILL_AFTER_STEP: &str = "QGA_BRIDGE_TEST_KILL_AFTER_STEP";

/// Called as step `name` completes: dies there if the hook names it.
pub fn step_done(name: &str) {
    static STEP: OnceLock<Option<String>> = OnceLock::new();
    let hook = STEP.get_or_init(|| std::env::var(KILL_AFTER_STEP).ok());
    if hook.as_deref() == Some(name) {
        eprintln!("qga-bridge: {KILL_AFTER_STEP}={name}: killing this process");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}
