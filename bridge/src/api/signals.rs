//! The gRPC `MemorySignals` service: a VM's memory snapshot (see [`crate::signals`]) as
//! protobuf.

use qga_proto::v1::{self as pb, memory_signals_server::MemorySignals};
use qga_wire::schema::{GuestMeminfo, GuestMemoryPressure, GuestPressureLine, GuestVmstat};
use tonic::{Request, Response, Status};

use super::grpc::{Api, deadline};
use crate::signals::snapshot::{AgentStats, BalloonPart, BridgeTotals, MemoryStats};

#[tonic::async_trait]
impl MemorySignals for Api {
    async fn get_memory_stats(
        &self,
        req: Request<pb::GetMemoryStatsRequest>,
    ) -> Result<Response<pb::MemoryStats>, Status> {
        let caller = self.caller(&req)?;
        let stats = self
            .service()
            .memory_stats(&caller, &req.get_ref().vm, deadline(&req))
            .await?;
        Ok(Response::new(memory_stats(stats)))
    }
}

/// The reply as protobuf.
pub fn memory_stats(s: MemoryStats) -> pb::MemoryStats {
    pb::MemoryStats {
        taken_at: Some(prost_types::Timestamp::from(s.taken_at)),
        agent: s.agent.map(agent),
        agent_stats_unavailable: s.agent_stats_unavailable,
        bridge: s.bridge.map(bridge),
        bridge_totals_unavailable: s.bridge_totals_unavailable,
        balloon: s.balloon.map(balloon),
        balloon_unavailable: s.balloon_unavailable,
    }
}

fn balloon(b: BalloonPart) -> pb::BalloonReading {
    pb::BalloonReading {
        age_ms: b.age_ms,
        id: b.id,
        actual_bytes: b.actual_bytes,
        held_bytes: b.held_bytes,
        stats: b.stats.map(|s| pb::BalloonStats {
            last_update: s.last_update,
            swap_in_bytes: s.swap_in_bytes,
            swap_out_bytes: s.swap_out_bytes,
            major_faults: s.major_faults,
            minor_faults: s.minor_faults,
            free_bytes: s.free_bytes,
            total_bytes: s.total_bytes,
            available_bytes: s.available_bytes,
            disk_caches_bytes: s.disk_caches_bytes,
            hugetlb_allocations: s.hugetlb_allocations,
            hugetlb_failures: s.hugetlb_failures,
        }),
    }
}

fn agent(a: AgentStats) -> pb::GuestMemoryStats {
    let s = a.stats;
    pb::GuestMemoryStats {
        age_ms: a.age_ms,
        working_set: a.working_set,
        meminfo: Some(meminfo(&s.meminfo)),
        pressure: s.pressure.map(pressure),
        vmstat: Some(vmstat(&s.vmstat)),
        uptime_ms: s.uptime_ms,
        boot_id: s.boot_id,
    }
}

fn bridge(b: BridgeTotals) -> pb::BridgeMemoryTotals {
    pb::BridgeMemoryTotals {
        age_ms: b.age_ms,
        boot_bytes: b.boot_bytes,
        plugged_bytes: b.plugged_bytes,
        total_bytes: b.total_bytes,
        usable_bytes: b.usable_bytes,
    }
}

fn pressure(p: GuestMemoryPressure) -> pb::GuestMemoryPressure {
    let line = |l: GuestPressureLine| pb::PressureLine {
        avg10: l.avg10,
        avg60: l.avg60,
        avg300: l.avg300,
        total: l.total,
    };
    pb::GuestMemoryPressure {
        some: p.some.map(line),
        full: p.full.map(line),
    }
}

fn meminfo(m: &GuestMeminfo) -> pb::GuestMeminfo {
    pb::GuestMeminfo {
        mem_total: m.mem_total,
        mem_free: m.mem_free,
        mem_available: m.mem_available,
        buffers: m.buffers,
        cached: m.cached,
        swap_cached: m.swap_cached,
        active_anon: m.active_anon,
        inactive_anon: m.inactive_anon,
        active_file: m.active_file,
        inactive_file: m.inactive_file,
        unevictable: m.unevictable,
        mlocked: m.mlocked,
        swap_total: m.swap_total,
        swap_free: m.swap_free,
        zswap: m.zswap,
        zswapped: m.zswapped,
        dirty: m.dirty,
        writeback: m.writeback,
        anon_pages: m.anon_pages,
        mapped: m.mapped,
        shmem: m.shmem,
        kernel_reclaimable: m.kernel_reclaimable,
        slab_reclaimable: m.slab_reclaimable,
        slab_unreclaimable: m.slab_unreclaimable,
        kernel_stack: m.kernel_stack,
        page_tables: m.page_tables,
        percpu: m.percpu,
        vmalloc_used: m.vmalloc_used,
        commit_limit: m.commit_limit,
        committed_as: m.committed_as,
        hugetlb: m.hugetlb,
        balloon: m.balloon,
    }
}

fn vmstat(v: &GuestVmstat) -> pb::GuestVmstat {
    pb::GuestVmstat {
        oom_kill: v.oom_kill,
        pgmajfault: v.pgmajfault,
        allocstall: v.allocstall,
        pswpin: v.pswpin,
        pswpout: v.pswpout,
        workingset_refault_anon: v.workingset_refault_anon,
        workingset_refault_file: v.workingset_refault_file,
        pgscan_kswapd: v.pgscan_kswapd,
        pgscan_direct: v.pgscan_direct,
        pgsteal_kswapd: v.pgsteal_kswapd,
        pgsteal_direct: v.pgsteal_direct,
    }
}
