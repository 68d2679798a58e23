//! One snapshot of a VM's memory as the bridge sees it — the guest agent's stats and the
//! hypervisor's totals, taken together at one instant — and the reply a caller gets of it,
//! with each part's age.

use std::time::SystemTime;

use qga_wire::schema::GuestMemoryStats;
use serde::{Serialize, Serializer};
use tokio::time::Instant;

use crate::{
    backend::{BalloonStats, MemorySize},
    metrics::GuestGauges,
};

/// A VM's memory at one instant. A part the bridge could not get is its reason instead:
/// an agent without the extension, a VM without a hypervisor backend or one unreachable.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// When the bridge started taking it (its age counts from here).
    pub taken: Instant,
    /// The same instant on the wall clock.
    pub at: SystemTime,
    /// The agent's `__org.qga-bridge_get-memory-stats`, or why there is none.
    pub agent: Result<GuestMemoryStats, String>,
    /// The hypervisor's boot and plugged memory, or why there are none.
    pub bridge: Result<MemorySize, String>,
    /// The VM's balloon (`None`: it has none), or why it could not be read.
    pub balloon: Result<Option<BalloonReading>, String>,
}

/// A VM's balloon at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonReading {
    /// The device's id.
    pub id: String,
    /// QEMU's `actual`, bytes.
    pub actual: u64,
    /// What the balloon holds, bytes.
    pub held: u64,
    /// The guest driver's statistics, once it reported (`None`: not yet, or never).
    pub stats: Option<BalloonStats>,
}

impl Snapshot {
    /// The guest's boot id, as its agent reported it: a change means the guest rebooted
    /// and its counters started again.
    pub fn boot_id(&self) -> Option<&str> {
        self.agent.as_ref().ok()?.boot_id.as_deref()
    }

    /// `MemTotal` − `MemAvailable`, when the guest reported both.
    pub fn working_set(&self) -> Option<u64> {
        working_set(self.agent.as_ref().ok()?)
    }

    /// What the VM's Prometheus gauges are set to, when the agent gave its stats.
    pub fn gauges(&self) -> Option<GuestGauges> {
        let stats = self.agent.as_ref().ok()?;
        Some(GuestGauges {
            working_set: working_set(stats),
            available: stats.meminfo.mem_available,
            pressure_some_avg10: stats.pressure.and_then(|p| p.some).map(|line| line.avg10),
            at: self.at,
        })
    }

    /// The reply to a caller, its ages counted up to `now`.
    pub fn view(&self, now: Instant) -> MemoryStats {
        let age_ms = u64::try_from(now.saturating_duration_since(self.taken).as_millis())
            .unwrap_or(u64::MAX);
        let (agent, agent_stats_unavailable) = match &self.agent {
            Ok(stats) => (
                Some(AgentStats {
                    age_ms,
                    working_set: working_set(stats),
                    stats: stats.clone(),
                }),
                None,
            ),
            Err(why) => (None, Some(why.clone())),
        };
        let (bridge, bridge_totals_unavailable) = match &self.bridge {
            Ok(m) => (
                Some(BridgeTotals {
                    age_ms,
                    boot_bytes: m.boot,
                    plugged_bytes: m.plugged,
                    total_bytes: m.boot.saturating_add(m.plugged),
                    usable_bytes: None,
                }),
                None,
            ),
            Err(why) => (None, Some(why.clone())),
        };
        // What the guest may use is known where the balloon is (or there is none).
        let held = self
            .balloon
            .as_ref()
            .ok()
            .map(|b| b.as_ref().map_or(0, |b| b.held));
        let (balloon, balloon_unavailable) = match &self.balloon {
            Ok(None) => (None, Some("the VM has no virtio balloon".to_string())),
            Ok(Some(b)) => (
                Some(BalloonPart {
                    age_ms,
                    id: b.id.clone(),
                    actual_bytes: b.actual,
                    held_bytes: b.held,
                    stats: b.stats.clone(),
                }),
                None,
            ),
            Err(why) => (None, Some(why.clone())),
        };
        MemoryStats {
            taken_at: self.at,
            agent,
            agent_stats_unavailable,
            bridge: bridge.map(|b| BridgeTotals {
                usable_bytes: held.map(|h| b.total_bytes.saturating_sub(h)),
                ..b
            }),
            bridge_totals_unavailable,
            balloon,
            balloon_unavailable,
        }
    }
}

fn working_set(stats: &GuestMemoryStats) -> Option<u64> {
    let m = &stats.meminfo;
    Some(m.mem_total?.saturating_sub(m.mem_available?))
}

/// The reply of `memory-stats` / `GetMemoryStats`: each part present, or absent with
/// its reason under `*-unavailable`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryStats {
    /// When the snapshot was taken, Unix seconds.
    #[serde(serialize_with = "unix_seconds")]
    pub taken_at: SystemTime,
    /// The guest agent's stats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStats>,
    /// Why there are no agent stats (the agent lacks the extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_stats_unavailable: Option<String>,
    /// The hypervisor's totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeTotals>,
    /// Why there are no totals (no hypervisor backend, or it did not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge_totals_unavailable: Option<String>,
    /// The virtio balloon and its driver's statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonPart>,
    /// Why there is no balloon part (the VM has none, or no hypervisor backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon_unavailable: Option<String>,
}

/// The balloon as the hypervisor reports it, and its guest driver's statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BalloonPart {
    /// How old the reading is, milliseconds.
    pub age_ms: u64,
    /// The device's id.
    pub id: String,
    /// QEMU's `actual` (boot memory and DIMMs less the balloon), bytes.
    pub actual_bytes: u64,
    /// What the balloon holds, bytes.
    pub held_bytes: u64,
    /// The driver's statistics, once it reported; a value it did not report is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<BalloonStats>,
}

/// The agent's snapshot (members as the agent names them), and what the bridge derives.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentStats {
    /// How old the stats are, milliseconds.
    pub age_ms: u64,
    /// `mem-total` − `mem-available`, bytes, when both are known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_set: Option<u64>,
    /// `meminfo`, `pressure`, `vmstat`, `uptime-ms`, `boot-id`.
    #[serde(flatten)]
    pub stats: GuestMemoryStats,
}

/// The VM's memory as its hypervisor has it (balloon not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BridgeTotals {
    /// How old the totals are, milliseconds.
    pub age_ms: u64,
    /// Memory the VM booted with.
    pub boot_bytes: u64,
    /// In DIMMs and plugged by virtio-mem devices.
    pub plugged_bytes: u64,
    /// Boot plus plugged.
    pub total_bytes: u64,
    /// What the guest may use: the total less what the balloon holds (absent when the
    /// balloon could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usable_bytes: Option<u64>,
}

fn unix_seconds<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    s.serialize_f64(secs)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use qga_wire::schema::{GuestMeminfo, GuestMemoryPressure, GuestPressureLine};
    use serde_json::json;

    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_021_600_500),
            agent: Ok(GuestMemoryStats {
                meminfo: GuestMeminfo {
                    mem_total: Some(1000),
                    mem_available: Some(600),
                    ..GuestMeminfo::default()
                },
                pressure: Some(GuestMemoryPressure {
                    some: Some(GuestPressureLine {
                        avg10: 2.5,
                        ..GuestPressureLine::default()
                    }),
                    full: None,
                }),
                boot_id: Some("b1".into()),
                ..GuestMemoryStats::default()
            }),
            bridge: Ok(MemorySize {
                boot: 512,
                plugged: 256,
            }),
            balloon: Ok(None),
        }
    }

    #[test]
    fn the_reply_derives_the_working_set_and_ages_each_part() {
        let s = snapshot();
        let v = serde_json::to_value(s.view(s.taken + Duration::from_millis(7))).expect("json");
        assert_eq!(
            v,
            json!({"taken-at": 1764021600.5,
                "agent": {"age-ms": 7, "working-set": 400,
                    "meminfo": {"mem-total": 1000, "mem-available": 600},
                    "pressure": {"some": {"avg10": 2.5, "avg60": 0.0, "avg300": 0.0,
                                          "total": 0}},
                    "vmstat": {}, "boot-id": "b1"},
                "bridge": {"age-ms": 7, "boot-bytes": 512, "plugged-bytes": 256,
                           "total-bytes": 768, "usable-bytes": 768},
                "balloon-unavailable": "the VM has no virtio balloon"})
        );
        assert_eq!(s.boot_id(), Some("b1"));
        let g = s.gauges().expect("gauges");
        assert_eq!((g.working_set, g.available), (Some(400), Some(600)));
        assert_eq!(g.pressure_some_avg10, Some(2.5));
    }

    #[test]
    fn a_missing_part_is_its_reason_and_no_working_set_without_both_fields() {
        let mut s = snapshot();
        s.agent = Err("the guest's agent does not offer it".into());
        s.bridge = Err("no backend".into());
        s.balloon = Err("no backend".into());
        let v = serde_json::to_value(s.view(s.taken)).expect("json");
        assert_eq!(
            v,
            json!({"taken-at": 1764021600.5,
                   "agent-stats-unavailable": "the guest's agent does not offer it",
                   "bridge-totals-unavailable": "no backend",
                   "balloon-unavailable": "no backend"})
        );
        assert_eq!((s.gauges(), s.boot_id()), (None, None));
        let mut s = snapshot();
        if let Ok(a) = &mut s.agent {
            a.meminfo.mem_available = None;
        }
        assert_eq!(s.working_set(), None);
        assert_eq!(s.gauges().and_then(|g| g.working_set), None);
    }

    #[test]
    fn a_balloon_shows_what_it_holds_and_the_guest_may_use_less() {
        let mut s = snapshot();
        s.balloon = Ok(Some(BalloonReading {
            id: "balloon0".into(),
            actual: 384,
            held: 128,
            stats: Some(BalloonStats {
                last_update: Some(1_764_021_600),
                available_bytes: Some(300),
                ..BalloonStats::default()
            }),
        }));
        let v = serde_json::to_value(s.view(s.taken + Duration::from_millis(3))).expect("json");
        assert_eq!(v["bridge"]["usable-bytes"], 640);
        assert_eq!(
            v["balloon"],
            json!({"age-ms": 3, "id": "balloon0", "actual-bytes": 384, "held-bytes": 128,
                   "stats": {"last-update": 1764021600u64, "available-bytes": 300}})
        );
        assert!(v.get("balloon-unavailable").is_none());
        // A balloon that could not be read: what the guest may use is not known.
        s.balloon = Err("query-balloon timed out".into());
        let v = serde_json::to_value(s.view(s.taken)).expect("json");
        assert!(v["bridge"].get("usable-bytes").is_none(), "{v}");
        assert_eq!(v["balloon-unavailable"], "query-balloon timed out");
    }
}
