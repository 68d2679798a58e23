//! The virtio balloon over QMP: `query-balloon` and `balloon` for QEMU's `actual` and the
//! target, and the device's QOM properties for everything else (found with `qom-list`,
//! its path kept until it stops answering; see [`qga_qmp::balloon`]).

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use qga_qmp::{BalloonPath, GuestStats, QmpError};
use qga_wire::sync::lock;
use tokio::time::Instant;

use super::{QmpBackend, error};
use crate::backend::{
    BackendError, BalloonDevice, BalloonStats,
    balloon::{check_target, no_balloon, reported},
};

/// What the backend knows of the balloon until QEMU's connection changes (a new QEMU) or
/// its path stops answering: where it is, its fixed properties once read, and the stats
/// polling interval once seen or set.
#[derive(Debug, Clone)]
pub(super) struct Known {
    path: BalloonPath,
    /// The QMP connection it was found on.
    connection: u64,
    /// `deflate-on-oom` and `free-page-reporting`.
    properties: Option<(bool, bool)>,
    /// `guest-stats-polling-interval`.
    polling: Option<u64>,
}

/// [`Known`], shared by the backend's clones.
pub(super) type Cache = Arc<Mutex<Option<Known>>>;

/// How often QEMU asks the guest's driver for statistics, seconds (0: never).
const INTERVAL: &str = "guest-stats-polling-interval";

/// A QMP failure and the command that failed.
type Failed = (&'static str, QmpError);

impl QmpBackend {
    /// The balloon's QOM path: the one found before unless `fresh`, else looked for now
    /// (and kept).
    async fn balloon_path(
        &self,
        fresh: bool,
        until: Instant,
    ) -> Result<Option<BalloonPath>, BackendError> {
        let connection = self.qmp.connections();
        if !fresh
            && let Some(known) = lock(&self.balloon)
                .as_ref()
                .filter(|k| k.connection == connection)
        {
            return Ok(Some(known.path.clone()));
        }
        let found = self
            .qmp
            .find_balloon(self.timeouts.command_until(until))
            .await
            .map_err(|e| error("qom-list", e))?;
        *lock(&self.balloon) = found.clone().map(|path| Known {
            path,
            connection,
            properties: None,
            polling: None,
        });
        Ok(found)
    }

    /// `read` on the balloon's QOM path; where a kept path has no device any more (it
    /// was unplugged, or replaced), the balloon is looked for again and `read` runs once
    /// more. `None`: the VM has no balloon.
    async fn on_balloon<T, F, Fut>(
        &self,
        until: Instant,
        read: F,
    ) -> Result<Option<T>, BackendError>
    where
        F: Fn(BalloonPath) -> Fut,
        Fut: Future<Output = Result<T, Failed>>,
    {
        let mut fresh = false;
        loop {
            let Some(path) = self.balloon_path(fresh, until).await? else {
                return Ok(None);
            };
            match read(path).await {
                Err((_, e)) if !fresh && e.is_device_not_found() => fresh = true,
                Ok(value) => return Ok(Some(value)),
                Err((step, e)) => return Err(error(step, e)),
            }
        }
    }

    /// The balloon's property `property` at `path`, decoded as `T`.
    async fn property<T: serde::de::DeserializeOwned>(
        &self,
        path: &BalloonPath,
        property: &str,
        until: Instant,
    ) -> Result<T, Failed> {
        self.qmp
            .balloon_property(&path.path, property, self.timeouts.command_until(until))
            .await
            .map_err(|e| ("qom-get", e))
    }

    /// The device at `path`, with QEMU's `actual`.
    async fn read_device(
        &self,
        path: BalloonPath,
        actual: u64,
        until: Instant,
    ) -> Result<BalloonDevice, Failed> {
        let (deflate_on_oom, free_page_reporting) = match self.known(&path, |k| k.properties) {
            Some(p) => p,
            None => {
                let p = (
                    self.property(&path, "deflate-on-oom", until).await?,
                    self.property(&path, "free-page-reporting", until).await?,
                );
                self.learn(&path, |k| k.properties = Some(p));
                p
            }
        };
        let polling = match self.known(&path, |k| k.polling) {
            Some(n) => n,
            None => self.property(&path, INTERVAL, until).await?,
        };
        Ok(BalloonDevice {
            deflate_on_oom,
            free_page_reporting,
            stats_interval: Some(polling),
            id: path.id,
            actual,
        })
    }

    /// What [`Known`] says of the balloon at `path`, if it is the one known.
    fn known<T>(&self, path: &BalloonPath, what: impl Fn(&Known) -> Option<T>) -> Option<T> {
        lock(&self.balloon)
            .as_ref()
            .filter(|k| k.path == *path)
            .and_then(what)
    }

    /// Notes in [`Known`] what was learnt of the balloon at `path`, if it is the one known.
    fn learn(&self, path: &BalloonPath, note: impl FnOnce(&mut Known)) {
        if let Some(k) = lock(&self.balloon).as_mut().filter(|k| k.path == *path) {
            note(k);
        }
    }

    /// The guest driver's statistics from the device at `path`, turning QEMU's polling
    /// on (every `interval` seconds) first where it is off.
    async fn read_stats(
        &self,
        path: BalloonPath,
        interval: u64,
        until: Instant,
    ) -> Result<BalloonStats, Failed> {
        let polling = match self.known(&path, |k| k.polling.filter(|&n| n > 0)) {
            Some(n) => n,
            None => self.property(&path, INTERVAL, until).await?,
        };
        if polling > 0 {
            self.learn(&path, |k| k.polling = Some(polling));
        } else if interval > 0 {
            self.qmp
                .set_balloon_property(
                    &path.path,
                    INTERVAL,
                    interval.into(),
                    self.timeouts.command_until(until),
                )
                .await
                .map_err(|e| ("qom-set", e))?;
            self.learn(&path, |k| k.polling = Some(interval));
        }
        let stats: GuestStats = self.property(&path, "guest-stats", until).await?;
        Ok(stats_of(&stats))
    }

    /// See [`MemoryBackend::balloon`](crate::backend::MemoryBackend::balloon).
    pub(super) async fn balloon_device(
        &self,
        until: Instant,
    ) -> Result<Option<BalloonDevice>, BackendError> {
        let Some(actual) = self.query_actual(until).await? else {
            return Ok(None);
        };
        match self
            .on_balloon(until, |path| self.read_device(path, actual, until))
            .await?
        {
            Some(device) => Ok(Some(device)),
            None => Err(BackendError::BadReply(
                "QEMU has an active balloon but lists no virtio-balloon device under \
                 /machine/peripheral or /machine/peripheral-anon"
                    .into(),
            )),
        }
    }

    /// See [`MemoryBackend::balloon_actual`](crate::backend::MemoryBackend::balloon_actual):
    /// `query-balloon` alone.
    pub(super) async fn query_actual(&self, until: Instant) -> Result<Option<u64>, BackendError> {
        match self
            .qmp
            .query_balloon(self.timeouts.command_until(until))
            .await
        {
            Ok(info) => Ok(Some(info.actual)),
            // A QEMU without the command has no balloon either.
            Err(e) if e.is_device_not_active() || e.is_command_not_found() => {
                *lock(&self.balloon) = None;
                Ok(None)
            }
            Err(e) => Err(error("query-balloon", e)),
        }
    }

    /// See [`MemoryBackend::set_balloon`](crate::backend::MemoryBackend::set_balloon).
    pub(super) async fn request_balloon(
        &self,
        target: u64,
        until: Instant,
    ) -> Result<(), BackendError> {
        check_target(target, 1)?;
        match self
            .qmp
            .balloon(target, self.timeouts.command_until(until))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_device_not_active() || e.is_command_not_found() => Err(no_balloon()),
            Err(e) => Err(error("balloon", e)),
        }
    }

    /// See [`MemoryBackend::balloon_stats`](crate::backend::MemoryBackend::balloon_stats).
    pub(super) async fn guest_stats(
        &self,
        interval: u64,
        until: Instant,
    ) -> Result<Option<BalloonStats>, BackendError> {
        self.on_balloon(until, |path| self.read_stats(path, interval, until))
            .await
    }
}

/// QEMU's `guest-stats` as the backend reports them: "not reported" and "never" as `None`.
fn stats_of(g: &GuestStats) -> BalloonStats {
    let s = &g.stats;
    BalloonStats {
        last_update: (g.last_update > 0).then_some(g.last_update),
        swap_in_bytes: reported(s.stat_swap_in),
        swap_out_bytes: reported(s.stat_swap_out),
        major_faults: reported(s.stat_major_faults),
        minor_faults: reported(s.stat_minor_faults),
        free_bytes: reported(s.stat_free_memory),
        total_bytes: reported(s.stat_total_memory),
        available_bytes: reported(s.stat_available_memory),
        disk_caches_bytes: reported(s.stat_disk_caches),
        hugetlb_allocations: reported(s.stat_htlb_pgalloc),
        hugetlb_failures: reported(s.stat_htlb_pgfail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreported_values_and_a_never_are_none() {
        let max = u64::MAX;
        let g: GuestStats = serde_json::from_value(serde_json::json!({"last-update": 0,
            "stats": {"stat-swap-in": max, "stat-free-memory": max}}))
        .expect("decodes");
        let s = stats_of(&g);
        assert_eq!(s, BalloonStats::default());
        assert!(!s.reported());
    }

    #[test]
    fn reported_values_keep_their_units() {
        let g: GuestStats =
            serde_json::from_value(serde_json::json!({"last-update": 1_700_000_000,
            "stats": {"stat-swap-in": 4096, "stat-free-memory": 100 << 20,
            "stat-total-memory": 400 << 20, "stat-available-memory": 300 << 20,
            "stat-major-faults": 3, "stat-htlb-pgfail": 0}}))
            .expect("decodes");
        let s = stats_of(&g);
        assert!(s.reported());
        assert_eq!(s.last_update, Some(1_700_000_000));
        assert_eq!(s.swap_in_bytes, Some(4096));
        assert_eq!(
            (s.free_bytes, s.total_bytes, s.available_bytes),
            (Some(100 << 20), Some(400 << 20), Some(300 << 20))
        );
        assert_eq!((s.major_faults, s.hugetlb_failures), (Some(3), Some(0)));
        assert_eq!((s.swap_out_bytes, s.disk_caches_bytes), (None, None));
    }
}

/// [`QmpBackend`]'s balloon against a scripted monitor on a unix socket: what it asks
/// QEMU, and that a kept QOM path which stopped answering is looked for again.
#[cfg(test)]
mod monitor_tests {
    use std::{path::Path, time::Duration};

    use futures::{SinkExt, StreamExt};
    use qga_wire::codec::{Frame, QgaCodec};
    use serde_json::{Value, json};
    use tokio::net::UnixListener;
    use tokio_util::codec::Framed;

    use super::*;
    use crate::backend::{Bounds, MemoryBackend, Timeouts};

    /// QEMU's answer to one command: `Ok(return)` or `Err((class, desc))`.
    type Answer = Result<Value, (&'static str, &'static str)>;

    /// Serves one QMP client on `path`, answering with `script`; every command and its
    /// arguments go to the returned log.
    fn monitor<F>(path: &Path, script: F) -> Arc<Mutex<Vec<(String, Value)>>>
    where
        F: Fn(&str, &Value) -> Answer + Send + 'static,
    {
        let listener = UnixListener::bind(path).expect("bind");
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let mut conn = Framed::new(stream, QgaCodec::default());
            let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2,
                "micro": 0}, "package": ""}, "capabilities": []}});
            let _ = conn.send(greeting).await;
            while let Some(Ok(Frame::Value(request))) = conn.next().await {
                let command = request["execute"].as_str().unwrap_or_default().to_string();
                let arguments = request.get("arguments").cloned().unwrap_or(Value::Null);
                let answer = match command.as_str() {
                    "qmp_capabilities" => Ok(json!({})),
                    _ => script(&command, &arguments),
                };
                lock(&seen).push((command, arguments));
                let reply = match answer {
                    Ok(value) => json!({"return": value, "id": request["id"]}),
                    Err((class, desc)) => {
                        json!({"error": {"class": class, "desc": desc}, "id": request["id"]})
                    }
                };
                let _ = conn.send(reply).await;
            }
        });
        log
    }

    fn backend(path: &Path) -> QmpBackend {
        let bounds = Bounds {
            timeouts: Timeouts {
                command: Duration::from_secs(5),
                eject: Duration::from_secs(5),
            },
            max_qmp_bytes: 1 << 20,
            connect: Duration::from_secs(5),
            shared_idle: Duration::from_secs(60),
        };
        QmpBackend::new(path, false, &bounds)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// A QEMU with balloon `balloon0`, or, once `replaced`, `b2` (unplugged and plugged
    /// again under another id); polling off.
    fn replaceable_balloon(command: &str, arguments: &Value, replaced: bool) -> Answer {
        let path = arguments["path"].as_str().unwrap_or_default();
        let now = if replaced { "b2" } else { "balloon0" };
        match command {
            "query-balloon" => Ok(json!({"actual": 536870912})),
            "qom-list" if path == "/machine/peripheral" => {
                Ok(json!([{"name": now, "type": "child<virtio-balloon-pci>"}]))
            }
            _ if !path.starts_with(&format!("/machine/peripheral/{now}")) => {
                Err(("DeviceNotFound", "Device not found"))
            }
            "qom-get" => Ok(match arguments["property"].as_str() {
                Some(INTERVAL) => json!(0),
                Some("guest-stats") => json!({"last-update": 0, "stats": {}}),
                _ => json!(true),
            }),
            "qom-set" => Ok(json!({})),
            _ => Err(("CommandNotFound", "no")),
        }
    }

    #[tokio::test]
    async fn the_balloon_is_read_and_found_again_when_it_was_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let replaced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = replaced.clone();
        let log = monitor(&path, move |c, a| {
            replaceable_balloon(c, a, flag.load(std::sync::atomic::Ordering::SeqCst))
        });
        let qmp = backend(&path);
        let device = qmp.balloon(soon()).await.expect("read").expect("a balloon");
        assert_eq!(device.id, "balloon0");
        assert!(device.deflate_on_oom && device.free_page_reporting);
        assert_eq!((device.actual, device.stats_interval), (512 << 20, Some(0)));
        replaced.store(true, std::sync::atomic::Ordering::SeqCst);
        let stats = qmp.balloon_stats(5, soon()).await.expect("read");
        assert_eq!(stats, Some(BalloonStats::default()), "nothing reported yet");
        let log = lock(&log).clone();
        let set = log
            .iter()
            .find(|(c, _)| c == "qom-set")
            .expect("polling turned on");
        assert_eq!(
            set.1,
            json!({"path": "/machine/peripheral/b2", "property": INTERVAL, "value": 5})
        );
        let lists = log
            .iter()
            .filter(|(c, a)| c == "qom-list" && a["path"] == "/machine/peripheral");
        assert_eq!(
            lists.count(),
            2,
            "looked for once, and again when it was gone"
        );
    }

    #[tokio::test]
    async fn a_qemu_without_a_balloon_has_none_and_refuses_a_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let log = monitor(&path, |command, _| match command {
            "query-balloon" | "balloon" => {
                Err(("DeviceNotActive", "No balloon device has been activated"))
            }
            "qom-list" => Ok(json!([{"name": "type", "type": "string"}])),
            _ => Err(("CommandNotFound", "no")),
        });
        let qmp = backend(&path);
        assert_eq!(qmp.balloon(soon()).await, Ok(None));
        assert_eq!(qmp.balloon_stats(5, soon()).await, Ok(None));
        let refused = qmp.set_balloon(256 << 20, soon()).await;
        assert_eq!(refused, Err(no_balloon()));
        let zero = qmp.set_balloon(0, soon()).await;
        assert!(
            matches!(zero, Err(BackendError::Refused { .. })),
            "{zero:?}"
        );
        let balloons = lock(&log).iter().filter(|(c, _)| c == "balloon").count();
        assert_eq!(balloons, 1, "a target of 0 is refused before QEMU is asked");
    }
}
