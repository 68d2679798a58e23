//! Discovery when the process is out of file descriptors: the scan cannot read the socket
//! directory, says it is incomplete, and nothing discovered is removed.
//!
//! Alone in its test binary: it lowers the process-wide descriptor limit for a moment.

use std::{collections::BTreeSet, fs::File, os::fd::AsRawFd, os::unix::net::UnixListener};

use qga_bridge::vms::discovery::{Discovery, scan};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Restores the descriptor limit, even if the test fails.
struct Restore(Rlimit);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: self.0.current,
                maximum: self.0.maximum,
            },
        );
    }
}

#[test]
fn running_out_of_descriptors_keeps_every_vm() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    for dir in ["domain-1-alpha", "domain-2-beta"] {
        let d = root.path().join(dir);
        std::fs::create_dir(&d).expect("mkdir");
        listeners.push(UnixListener::bind(d.join("org.qemu.guest_agent.0")).expect("bind"));
    }
    let pattern = vec![format!(
        "{}/domain-*/org.qemu.guest_agent.0",
        root.path().display()
    )];
    let owners = [0, rustix::process::geteuid().as_raw()];
    let mut discovery = Discovery::new(BTreeSet::new(), 4096);
    let first = scan(&pattern, &owners, &BTreeSet::new());
    assert!(first.is_complete(), "{:?}", first.errors);
    discovery.apply(first);
    let both: Vec<String> = discovery.exposed().keys().cloned().collect();
    assert_eq!(both, ["alpha", "beta"]);

    // No descriptor left: the lowest free one becomes the limit.
    let lowest_free = File::open("/dev/null").expect("open").as_raw_fd();
    let old = getrlimit(Resource::Nofile);
    let restore = Restore(Rlimit {
        current: old.current,
        maximum: old.maximum,
    });
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: u64::try_from(lowest_free).ok(),
            maximum: old.maximum,
        },
    )
    .expect("lower the descriptor limit");
    assert!(File::open("/dev/null").is_err(), "the limit holds");
    // Once without knowing the sockets (the glob alone), once as the discovery loop
    // does it (the known sockets are looked at directly: that needs no descriptor).
    let blind = scan(&pattern, &owners, &BTreeSet::new());
    let informed = scan(&pattern, &owners, discovery.taken());
    drop(restore);

    for s in [&blind, &informed] {
        assert!(
            !s.is_complete(),
            "EMFILE must make the scan incomplete: {s:?}"
        );
        assert!(
            s.errors.iter().any(|e| e.contains("os error 24")),
            "{:?}",
            s.errors
        );
    }
    assert!(blind.found.is_empty());
    assert_eq!(informed.found.len(), 2);
    for s in [blind, informed] {
        let changes = discovery.apply(s);
        assert!(changes.remove.is_empty(), "{changes:?}");
        let names: Vec<String> = discovery.exposed().keys().cloned().collect();
        assert_eq!(names, both);
    }
    drop(listeners);
}
