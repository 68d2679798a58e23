//! Prometheus metrics: the counters every part of the bridge updates. The HTTP endpoint
//! that serves them is [`crate::api::prometheus`].
//!
//! Per-VM series belong to the VM's current session: a session claims its VM's name
//! ([`Metrics::claim_vm`]) and its worker's updates count only while the claim is the
//! latest, so when discovery replaces a VM (libvirt gives a restarted domain a new
//! socket) or drops it, the old worker's last updates cannot revive or overwrite series,
//! and [`Metrics::release_vm`] removes them for good.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::error::Outcome;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Metric, Registry},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    vm: String,
    method: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    server: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 2.0, 22,
    ))
}

/// The bridge's metrics. Cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    connected: Family<VmLabels, Gauge>,
    resyncs: Family<VmLabels, Counter>,
    stale: Family<VmLabels, Counter>,
    coalesced: Family<VmLabels, Counter>,
    late: Family<VmLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    audit_dropped: Counter,
    restored: Family<VmLabels, Counter>,
    wrong_zone: Family<VmLabels, Gauge>,
    restore_time: Histogram,
    guest: GuestFamilies,
    /// VM name -> the claim of its current session.
    owners: Mutex<HashMap<String, u64>>,
    next_claim: AtomicU64,
}

/// The memory keeper's metrics, registered in `r`: blocks restored, blocks in the wrong
/// zone, and the restore time.
fn memory_metrics(
    r: &mut Registry,
) -> (
    Family<VmLabels, Counter>,
    Family<VmLabels, Gauge>,
    Histogram,
) {
    let restored = add(
        r,
        "memory_restored_blocks",
        "Blocks of DIMMs the bridge plugged that it found offline (a guest reboot) and onlined again",
        Family::<VmLabels, Counter>::default(),
    );
    let wrong_zone = add(
        r,
        "memory_wrong_zone_blocks",
        "Blocks of DIMMs the bridge plugged as movable that are online outside ZONE_MOVABLE",
        Family::<VmLabels, Gauge>::default(),
    );
    let restore_time = add(
        r,
        "memory_restore_seconds",
        "From the keeper's first pass that saw a VM's plugged memory not all online to all of it online",
        latency_histogram(),
    );
    (restored, wrong_zone, restore_time)
}

/// A gauge of a float.
type FloatGauge = Gauge<f64, AtomicU64>;

/// The guest's memory signals an operator graphs, per VM, from its latest snapshot.
#[derive(Debug)]
struct GuestFamilies {
    working_set: Family<VmLabels, Gauge>,
    available: Family<VmLabels, Gauge>,
    pressure: Family<VmLabels, FloatGauge>,
    updated: Family<VmLabels, FloatGauge>,
    /// QEMU's balloon `actual`: kept apart from the agent's gauges (a qemu-ga guest has
    /// a balloon too).
    balloon_actual: Family<VmLabels, Gauge>,
}

impl GuestFamilies {
    /// The families, registered in `r`.
    fn new(r: &mut Registry) -> Self {
        Self {
            working_set: add(
                r,
                "guest_working_set_bytes",
                "The guest's MemTotal - MemAvailable (our agent's memory stats), bytes",
                Family::default(),
            ),
            available: add(
                r,
                "guest_available_bytes",
                "The guest's MemAvailable (our agent's memory stats), bytes",
                Family::default(),
            ),
            pressure: add(
                r,
                "guest_memory_pressure_some_avg10",
                "Share of the last 10 s some task in the guest stalled on memory (PSI some avg10), \
                 as a ratio from 0 to 1 (the kernel's percent / 100)",
                Family::default(),
            ),
            updated: add(
                r,
                "guest_stats_timestamp_seconds",
                "When the bridge took the guest's latest memory stats, Unix seconds",
                Family::default(),
            ),
            balloon_actual: add(
                r,
                "balloon_actual_bytes",
                "QEMU's virtio balloon actual: boot memory and DIMMs less what the balloon \
                 holds, bytes",
                Family::default(),
            ),
        }
    }

    /// Drops `l`'s series.
    fn remove(&self, l: &VmLabels) {
        self.working_set.remove(l);
        self.available.remove(l);
        self.pressure.remove(l);
        self.updated.remove(l);
    }
}

/// What one snapshot of a guest's memory sets its gauges to; an absent value removes its
/// series (a kernel without PSI has no pressure to graph).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestGauges {
    /// MemTotal - MemAvailable, bytes.
    pub working_set: Option<u64>,
    /// MemAvailable, bytes.
    pub available: Option<u64>,
    /// PSI `some` avg10, percent as the kernel gives it.
    pub pressure_some_avg10: Option<f64>,
    /// When the snapshot was taken.
    pub at: std::time::SystemTime,
}

/// Sets `family`'s series of `l` to `value`, or removes it when there is none.
fn set_or_remove<G: Metric + Default>(
    family: &Family<VmLabels, G>,
    l: &VmLabels,
    value: Option<impl FnOnce(&G)>,
) {
    match value {
        Some(set) => set(&family.get_or_create(l)),
        None => {
            family.remove(l);
        }
    }
}

/// Registers `metric` in `registry` as `name` with `help`; the metric, to keep.
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("qga_bridge");
        let (restored, wrong_zone, restore_time) = memory_metrics(&mut r);
        Arc::new(Self {
            calls: add(
                &mut r,
                "calls",
                "Calls by VM, method and outcome",
                Family::<CallLabels, Counter>::default(),
            ),
            latency: add(
                &mut r,
                "call_duration_seconds",
                "Call latency by method",
                Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                    latency_histogram,
                ),
            ),
            connected: add(
                &mut r,
                "agent_connected",
                "1 while the bridge holds a resynchronised channel to the VM's agent",
                Family::<VmLabels, Gauge>::default(),
            ),
            resyncs: add(
                &mut r,
                "resyncs",
                "Resync handshakes completed",
                Family::<VmLabels, Counter>::default(),
            ),
            stale: add(
                &mut r,
                "stale_replies",
                "Replies and bytes discarded because no waiting call asked for them",
                Family::<VmLabels, Counter>::default(),
            ),
            coalesced: add(
                &mut r,
                "coalesced_calls",
                "Calls served by another caller's identical in-flight read",
                Family::<VmLabels, Counter>::default(),
            ),
            late: add(
                &mut r,
                "late_replies",
                "Replies to state-changing calls that came after their caller stopped waiting",
                Family::<VmLabels, Counter>::default(),
            ),
            refused: add(
                &mut r,
                "refused",
                "Connections and calls refused by a transport limit, by server and limit",
                Family::<RefusedLabels, Counter>::default(),
            ),
            audit_dropped: add(
                &mut r,
                "audit_dropped",
                "Audit records dropped: the writer was behind or the file could not be written",
                Counter::default(),
            ),
            restored,
            wrong_zone,
            restore_time,
            guest: GuestFamilies::new(&mut r),
            registry: r,
            owners: Mutex::new(HashMap::new()),
            next_claim: AtomicU64::new(1),
        })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        qga_wire::sync::lock(&self.owners)
    }

    /// Counts a connection or call that `server` refused because limit `reason` was hit.
    pub fn refused(&self, server: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { server, reason })
            .inc();
    }

    /// Counts an audit record that could not be written.
    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
    }

    /// Counts what one keeper pass over `vm` found and did.
    pub fn memory_kept(&self, vm: &str, restored: usize, wrong_zone: usize) {
        let l = Self::vm(vm);
        if restored > 0 {
            self.restored.get_or_create(&l).inc_by(restored as u64);
        }
        self.wrong_zone
            .get_or_create(&l)
            .set(i64::try_from(wrong_zone).unwrap_or(i64::MAX));
    }

    /// Observes how long restoring a VM's plugged memory took.
    pub fn memory_restored_in(&self, elapsed: Duration) {
        self.restore_time.observe(elapsed.as_secs_f64());
    }

    /// Sets `vm`'s guest memory gauges from a snapshot (ignored unless `claim` still owns
    /// the VM, so a snapshot of a VM that went cannot revive its series).
    pub fn guest_memory(&self, vm: &str, claim: u64, g: &GuestGauges) {
        if !self.owns(vm, claim) {
            return;
        }
        let l = Self::vm(vm);
        let bytes = |v: Option<u64>| {
            v.map(|v| {
                move |gauge: &Gauge| {
                    gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
                }
            })
        };
        set_or_remove(&self.guest.working_set, &l, bytes(g.working_set));
        set_or_remove(&self.guest.available, &l, bytes(g.available));
        let ratio = g.pressure_some_avg10.map(|p| {
            move |gauge: &FloatGauge| {
                gauge.set(p / 100.0);
            }
        });
        set_or_remove(&self.guest.pressure, &l, ratio);
        let at =
            g.at.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
        self.guest.updated.get_or_create(&l).set(at);
    }

    /// Sets `vm`'s balloon gauge to QEMU's `actual`, or removes it (no balloon, or it did
    /// not answer), unless a newer session than `claim` owns the VM.
    pub fn balloon_actual(&self, vm: &str, claim: u64, actual: Option<u64>) {
        if !self.owns(vm, claim) {
            return;
        }
        let set = actual.map(|v| {
            move |gauge: &Gauge| {
                gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        });
        set_or_remove(&self.guest.balloon_actual, &Self::vm(vm), set);
    }

    /// Removes `vm`'s guest memory gauges (its agent no longer gives stats), unless a
    /// newer session than `claim` owns the VM.
    pub fn guest_memory_gone(&self, vm: &str, claim: u64) {
        if self.owns(vm, claim) {
            self.guest.remove(&Self::vm(vm));
        }
    }

    /// Makes a new session the owner of `vm`'s series; returns its claim.
    pub fn claim_vm(&self, vm: &str) -> u64 {
        let claim = self.next_claim.fetch_add(1, Ordering::Relaxed);
        self.owners().insert(vm.to_string(), claim);
        claim
    }

    fn owns(&self, vm: &str, claim: u64) -> bool {
        self.owners().get(vm) == Some(&claim)
    }

    /// Records a finished call.
    pub fn call(&self, vm: &str, method: &str, outcome: Outcome, elapsed: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                vm: vm.to_string(),
                method: method.to_string(),
                outcome: outcome.as_str().to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn vm(vm: &str) -> VmLabels {
        VmLabels { vm: vm.to_string() }
    }

    /// Whether the VM's channel is up (ignored unless `claim` still owns the VM).
    pub fn set_connected(&self, vm: &str, claim: u64, up: bool) {
        if self.owns(vm, claim) {
            self.connected
                .get_or_create(&Self::vm(vm))
                .set(i64::from(up));
        }
    }

    /// A completed resync (ignored unless `claim` still owns the VM).
    pub fn resync(&self, vm: &str, claim: u64) {
        if self.owns(vm, claim) {
            self.resyncs.get_or_create(&Self::vm(vm)).inc();
        }
    }

    /// `n` discarded stale replies or garbage (ignored unless `claim` still owns the VM).
    pub fn stale(&self, vm: &str, claim: u64, n: u32) {
        if n > 0 && self.owns(vm, claim) {
            self.stale.get_or_create(&Self::vm(vm)).inc_by(u64::from(n));
        }
    }

    /// A reply to a state-changing call whose caller had stopped waiting (ignored unless
    /// `claim` still owns the VM).
    pub fn late_reply(&self, vm: &str, claim: u64) {
        if self.owns(vm, claim) {
            self.late.get_or_create(&Self::vm(vm)).inc();
        }
    }

    /// A call served by coalescing.
    pub fn coalesced(&self, vm: &str) {
        self.coalesced.get_or_create(&Self::vm(vm)).inc();
    }

    /// Coalesced calls so far for `vm` (tests and benchmarks read it).
    pub fn coalesced_count(&self, vm: &str) -> u64 {
        self.coalesced.get_or_create(&Self::vm(vm)).get()
    }

    /// Drops `vm`'s series when `claim` still owns them (the VM went away rather than
    /// being replaced by a newer session).
    pub fn release_vm(&self, vm: &str, claim: u64) {
        let mut owners = self.owners();
        if owners.get(vm) != Some(&claim) {
            return;
        }
        owners.remove(vm);
        let l = Self::vm(vm);
        self.connected.remove(&l);
        self.resyncs.remove(&l);
        self.stale.remove(&l);
        self.coalesced.remove(&l);
        self.late.remove(&l);
        self.restored.remove(&l);
        self.wrong_zone.remove(&l);
        self.guest.remove(&l);
        self.guest.balloon_actual.remove(&l);
        for method in crate::call::all_methods() {
            for outcome in Outcome::ALL {
                self.calls.remove(&CallLabels {
                    vm: vm.to_string(),
                    method: method.to_string(),
                    outcome: outcome.as_str().to_string(),
                });
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_session_cannot_touch_its_successors_series() {
        let m = Metrics::new();
        let old = m.claim_vm("web1");
        m.set_connected("web1", old, true);
        m.call("web1", "guest-ping", Outcome::Ok, Duration::from_millis(1));
        let new = m.claim_vm("web1");
        m.set_connected("web1", new, true);
        // The old worker's last updates and its release change nothing.
        m.set_connected("web1", old, false);
        m.stale("web1", old, 3);
        m.release_vm("web1", old);
        let text = m.encode();
        assert!(
            text.contains("qga_bridge_agent_connected{vm=\"web1\"} 1"),
            "{text}"
        );
        assert!(!text.contains("qga_bridge_stale_replies_total{vm=\"web1\"}"));
        // The current session's release removes every series of the VM.
        m.release_vm("web1", new);
        assert!(!m.encode().contains("web1"), "{}", m.encode());
    }

    #[test]
    fn guest_gauges_follow_the_snapshot_and_go_with_the_vm() {
        let m = Metrics::new();
        let claim = m.claim_vm("vm1");
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_764_021_600_500);
        let mut g = GuestGauges {
            working_set: Some(3 << 20),
            available: Some(1 << 30),
            pressure_some_avg10: Some(12.5),
            at,
        };
        m.guest_memory("vm1", claim, &g);
        let text = m.encode();
        for want in [
            "qga_bridge_guest_working_set_bytes{vm=\"vm1\"} 3145728",
            "qga_bridge_guest_available_bytes{vm=\"vm1\"} 1073741824",
            "qga_bridge_guest_memory_pressure_some_avg10{vm=\"vm1\"} 0.125",
            "qga_bridge_guest_stats_timestamp_seconds{vm=\"vm1\"} 1764021600.5",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        // A kernel without PSI: no pressure series rather than a stale one.
        g.pressure_some_avg10 = None;
        m.guest_memory("vm1", claim, &g);
        assert!(
            !m.encode().contains("pressure_some_avg10{"),
            "{}",
            m.encode()
        );
        // A stale claim changes nothing; the owner's release removes every series.
        m.guest_memory(
            "vm1",
            claim + 1,
            &GuestGauges {
                working_set: Some(1),
                ..g
            },
        );
        assert!(m.encode().contains("working_set_bytes{vm=\"vm1\"} 3145728"));
        m.release_vm("vm1", claim);
        m.guest_memory("vm1", claim, &g);
        assert!(!m.encode().contains("vm1"), "{}", m.encode());
    }
}
