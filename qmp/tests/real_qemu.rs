//! The client against a real QEMU (`qemu-system-x86_64`, Debian's `qemu-system-x86`).
//!
//! These tests fail, never skip, when QEMU is missing: CI installs it. Each starts its own
//! QEMU in a temporary directory with nothing to run (`-M none`, or a `pc` machine held
//! before its first instruction with `-S`), so they take a fraction of a second.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use qga_qmp::{Qmp, QmpError, QmpLimits, QmpState, wait_for_event};
use tokio::time::Instant;

/// A QEMU serving QMP on a unix socket in a temporary directory; killed when dropped.
struct Qemu {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts `qemu-system-x86_64` with `args` (besides the QMP socket) and waits until its
    /// socket takes connections (the file appears at `bind`, before QEMU listens: a
    /// connect in between is refused).
    fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(args)
            .args(["-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start qemu-system-x86_64 ({e}); this test needs it: \
                     apt-get install qemu-system-x86 (scripts/setup does)"
                )
            });
        let mut qemu = Self {
            child,
            socket,
            _dir: dir,
        };
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&qemu.socket).is_err() {
            if let Ok(Some(status)) = qemu.child.try_wait() {
                panic!("qemu-system-x86_64 exited at start: {status}");
            }
            assert!(
                std::time::Instant::now() < give_up,
                "QEMU's QMP socket did not take a connection"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        qemu
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_errors_events_and_memory_backends_on_a_real_qemu() {
    let qemu = Qemu::start(&["-M", "none"]);
    let qmp = Qmp::new(qemu.socket.clone(), QmpLimits::default());
    assert_eq!(qmp.socket(), qemu.socket);

    let version = qmp.query_version(soon()).await.expect("query-version");
    assert!(version.qemu.major >= 7, "{version}");
    assert_eq!(
        qmp.qemu_version(),
        Some(version),
        "the greeting says the same"
    );
    assert_eq!(qmp.state(), QmpState::Connected);

    let err = qmp
        .execute("no-such-command", None, soon())
        .await
        .expect_err("unknown command");
    assert!(err.is_command_not_found(), "{err}");

    // Events come between replies (QEMU sends STOP before the reply to `stop`).
    let mut events = qmp.events();
    qmp.execute("stop", None, soon()).await.expect("stop");
    let stop = wait_for_event(&mut events, "STOP", soon(), |e| e.name == "STOP")
        .await
        .expect("STOP event");
    assert!(stop.timestamp.is_some());
    qmp.execute("cont", None, soon()).await.expect("cont");
    wait_for_event(&mut events, "RESUME", soon(), |e| e.name == "RESUME")
        .await
        .expect("RESUME event");

    qmp.add_memory_backend_ram("m1", 128 << 20, soon())
        .await
        .expect("object-add");
    let memdevs = qmp.query_memdev(soon()).await.expect("query-memdev");
    let m1 = memdevs
        .iter()
        .find(|m| m.id.as_deref() == Some("m1"))
        .expect("m1 listed");
    assert_eq!(m1.size, 128 << 20);
    let err = qmp
        .add_memory_backend_ram("m1", 128 << 20, soon())
        .await
        .expect_err("duplicate id");
    assert_eq!(err.class(), Some("GenericError"), "{err}");
    qmp.object_del("m1", soon()).await.expect("object-del");
    let memdevs = qmp.query_memdev(soon()).await.expect("query-memdev");
    assert!(memdevs.iter().all(|m| m.id.as_deref() != Some("m1")));
    let err = qmp.object_del("m1", soon()).await.expect_err("gone");
    assert_eq!(err.class(), Some("GenericError"), "{err}");
    let err = qmp.device_del("nope", soon()).await.expect_err("no device");
    assert_eq!(err.class(), Some("DeviceNotFound"), "{err}");

    // A machine without hotplug slots: neither maxmem nor slots are reported.
    let config = qmp.query_memory_config(soon()).await.expect("qom-get");
    assert_eq!((config.max_size, config.slots), (None, None));
    assert!(
        qmp.query_memory_devices(soon())
            .await
            .expect("query-memory-devices")
            .is_empty()
    );
    qmp.query_memory_size_summary(soon())
        .await
        .expect("query-memory-size-summary");

    // QEMU serves one client per socket: a second one gets no greeting.
    let second = Qmp::new(
        qemu.socket.clone(),
        QmpLimits {
            connect_timeout: Duration::from_millis(300),
            ..QmpLimits::default()
        },
    );
    let err = second
        .execute("query-version", None, soon())
        .await
        .expect_err("locked out");
    assert!(
        matches!(&err, QmpError::Unavailable(m) if m.contains("another client")),
        "{err}"
    );
    // The first client is unaffected.
    qmp.query_version(soon()).await.expect("still served");
    assert_eq!(qmp.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dimm_plugged_into_a_real_qemu_is_listed_with_maxmem_and_slots() {
    let qemu = Qemu::start(&["-M", "pc", "-m", "128M,slots=2,maxmem=1G", "-S"]);
    let qmp = Qmp::new(qemu.socket.clone(), QmpLimits::default());
    let config = qmp.query_memory_config(soon()).await.expect("qom-get");
    assert_eq!(config.size, Some(128 << 20));
    assert_eq!(config.max_size, Some(1 << 30));
    assert_eq!(config.slots, Some(2));

    qmp.add_memory_backend_ram("mem1", 256 << 20, soon())
        .await
        .expect("object-add");
    qmp.add_pc_dimm("dimm1", "mem1", Some(0), soon())
        .await
        .expect("device_add");
    let devices = qmp
        .query_memory_devices(soon())
        .await
        .expect("query-memory-devices");
    let [device] = &devices[..] else {
        panic!("one device: {devices:?}");
    };
    let dimm = device.as_dimm().expect("a dimm");
    assert_eq!(dimm.id.as_deref(), Some("dimm1"));
    assert_eq!(dimm.memdev_id(), "mem1");
    assert_eq!((dimm.size, dimm.slot, dimm.node), (256 << 20, 0, 0));
    assert!(dimm.addr >= 1 << 32, "above 4 GiB: {:#x}", dimm.addr);
    assert!(dimm.hotplugged && dimm.hotpluggable);
    let summary = qmp
        .query_memory_size_summary(soon())
        .await
        .expect("summary");
    assert_eq!(summary.base_memory, 128 << 20);
    assert_eq!(summary.plugged_memory, Some(256 << 20));
    // The backend is in use: QEMU refuses to delete it.
    let err = qmp.object_del("mem1", soon()).await.expect_err("in use");
    assert_eq!(err.class(), Some("GenericError"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balloon_on_a_real_qemu_is_found_read_and_set() {
    let qemu = Qemu::start(&[
        "-M",
        "pc",
        "-m",
        "256M",
        "-S",
        "-device",
        "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on",
    ]);
    let qmp = Qmp::new(qemu.socket.clone(), QmpLimits::default());
    let found = qmp.find_balloon(soon()).await.expect("qom-list");
    let found = found.expect("the balloon is listed");
    assert_eq!(
        (found.path.as_str(), found.id.as_str(), found.kind.as_str()),
        (
            "/machine/peripheral/balloon0",
            "balloon0",
            "virtio-balloon-pci"
        )
    );
    // QEMU 7.2 answers on the PCI proxy and on its virtio child alike.
    for path in [found.path.clone(), format!("{}/virtio-backend", found.path)] {
        for property in ["deflate-on-oom", "free-page-reporting"] {
            let on: bool = qmp
                .qom_get_as(&path, property, soon())
                .await
                .expect("qom-get");
            assert!(on, "{path} {property}");
        }
    }
    // No guest driver: actual is the whole RAM, and stays so whatever is asked.
    let info = qmp.query_balloon(soon()).await.expect("query-balloon");
    assert_eq!(info.actual, 256 << 20);
    qmp.balloon(128 << 20, soon()).await.expect("balloon");
    let err = qmp.balloon(0, soon()).await.expect_err("0 is not a size");
    assert_eq!(err.class(), Some("GenericError"), "{err}");

    let interval = "guest-stats-polling-interval";
    let before: u64 = qmp
        .balloon_property(&found.path, interval, soon())
        .await
        .expect("get");
    assert_eq!(before, 0, "QEMU does not poll until asked");
    qmp.set_balloon_property(&found.path, interval, 5.into(), soon())
        .await
        .expect("qom-set");
    let after: u64 = qmp
        .balloon_property(&found.path, interval, soon())
        .await
        .expect("get");
    assert_eq!(after, 5);
    let stats: qga_qmp::GuestStats = qmp
        .balloon_property(&found.path, "guest-stats", soon())
        .await
        .expect("guest-stats");
    assert_eq!(stats.last_update, 0, "no driver, no report");
    assert_eq!(stats.stats.stat_free_memory, u64::MAX);
    assert_eq!(stats.stats.stat_total_memory, u64::MAX);
    let err = qmp
        .qom_get("/machine/peripheral/nope", interval, soon())
        .await
        .expect_err("no such device");
    assert!(err.is_device_not_found(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_qemu_without_a_balloon_says_so() {
    let qemu = Qemu::start(&["-M", "pc", "-m", "128M", "-S"]);
    let qmp = Qmp::new(qemu.socket.clone(), QmpLimits::default());
    let err = qmp.query_balloon(soon()).await.expect_err("no balloon");
    assert!(err.is_device_not_active(), "{err}");
    let err = qmp.balloon(64 << 20, soon()).await.expect_err("no balloon");
    assert!(err.is_device_not_active(), "{err}");
    assert_eq!(qmp.find_balloon(soon()).await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balloon_without_an_id_is_found_among_the_anonymous_devices() {
    let qemu = Qemu::start(&[
        "-M",
        "pc",
        "-m",
        "128M",
        "-S",
        "-device",
        "virtio-balloon-pci",
    ]);
    let qmp = Qmp::new(qemu.socket.clone(), QmpLimits::default());
    let found = qmp
        .find_balloon(soon())
        .await
        .expect("qom-list")
        .expect("found");
    assert_eq!(
        (found.path.as_str(), found.id.as_str()),
        ("/machine/peripheral-anon/device[0]", "")
    );
    let on: bool = qmp
        .balloon_property(&found.path, "free-page-reporting", soon())
        .await
        .expect("qom-get");
    assert!(!on, "off unless asked for");
}
