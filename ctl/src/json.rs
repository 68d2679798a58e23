//! The bridge's answers as JSON for `--output json`: proto field names, enums as
//! lower-case words, times in Unix seconds.

use qga_proto::v1 as pb;
use serde_json::{Value, json};

/// An agent channel's state as a word.
pub fn agent_state(s: pb::AgentState) -> &'static str {
    match s {
        pb::AgentState::Unspecified => "unknown",
        pb::AgentState::Disconnected => "disconnected",
        pb::AgentState::Connecting => "connecting",
        pb::AgentState::Connected => "connected",
        pb::AgentState::Busy => "busy",
        pb::AgentState::Idle => "idle",
    }
}

/// A block change's result as a word.
pub fn response(r: pb::MemoryBlockResponseType) -> &'static str {
    match r {
        pb::MemoryBlockResponseType::Unspecified => "unknown",
        pb::MemoryBlockResponseType::Success => "success",
        pb::MemoryBlockResponseType::NotFound => "not-found",
        pb::MemoryBlockResponseType::OperationNotSupported => "operation-not-supported",
        pb::MemoryBlockResponseType::OperationFailed => "operation-failed",
    }
}

/// A layout block's state as a word.
pub fn block_state(s: pb::BlockState) -> &'static str {
    match s {
        pb::BlockState::Unspecified => "unknown",
        pb::BlockState::Online => "online",
        pb::BlockState::Offline => "offline",
        pb::BlockState::Absent => "absent",
    }
}

fn seconds(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

/// One block change's result.
pub fn block_result(r: &pb::MemoryBlockResult) -> Value {
    json!({
        "phys_index": r.phys_index,
        "response": response(r.response()),
        "error_code": r.error_code,
    })
}

/// One VM of `vm list`.
pub fn vm(v: &pb::Vm) -> Value {
    json!({
        "name": v.name,
        "socket": v.socket,
        "state": agent_state(v.state()),
        "last_contact": v.last_contact.as_ref().map(seconds),
        "last_error": v.last_error,
        "last_write": v.last_write.as_ref().map(|w| json!({
            "at": w.at.as_ref().map(seconds),
            "command": w.command,
            "outcome": w.outcome,
            "detail": w.detail,
            "results": w.results.iter().map(block_result).collect::<Vec<_>>(),
            "late": w.late,
        })),
    })
}

/// One block of a layout.
pub fn layout_block(b: &pb::LayoutBlock) -> Value {
    json!({
        "phys_index": b.phys_index,
        "state": block_state(b.state()),
        "valid_zones": b.valid_zones,
        "can_offline": b.can_offline,
    })
}

/// One DIMM with its blocks.
pub fn dimm(d: &pb::Dimm) -> Value {
    json!({
        "kind": "dimm",
        "id": d.id,
        "addr": d.addr,
        "size": d.size,
        "node": d.node,
        "slot": d.slot,
        "memdev": d.memdev,
        "hotplugged": d.hotplugged,
        "blocks": d.blocks.iter().map(layout_block).collect::<Vec<_>>(),
        "removable": d.removable,
    })
}

/// A whole layout.
pub fn layout(l: &pb::MemoryLayout) -> Value {
    json!({
        "block_size": l.block_size,
        "boot_bytes": l.boot_bytes,
        "plugged_bytes": l.plugged_bytes,
        "online_bytes": l.online_bytes,
        "movable_bytes": l.movable_bytes,
        "devices": l.dimms.iter().map(dimm).collect::<Vec<_>>(),
        "virtio_mem": l.virtio_mem.iter().map(|v| json!({
            "id": v.id,
            "addr": v.addr,
            "node": v.node,
            "block_size": v.block_size,
            "max_size": v.max_size,
            "requested_size": v.requested_size,
            "plugged_size": v.plugged_size,
            "blocks": v.blocks.iter().map(layout_block).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "other_blocks": l.other_blocks.iter().map(layout_block).collect::<Vec<_>>(),
        "auto_online_blocks": l.auto_online_blocks,
        "zones_known": l.zones_known,
        "warnings": l.warnings,
        "balloon": l.balloon.as_ref().map(|b| json!({
            "id": b.id,
            "deflate_on_oom": b.deflate_on_oom,
            "free_page_reporting": b.free_page_reporting,
            "actual_bytes": b.actual_bytes,
            "held_bytes": b.held_bytes,
            "usable_bytes": b.usable_bytes,
            "kept_bytes": b.kept_bytes,
        })),
    })
}

/// One step of a hotplug operation.
pub fn step(s: &pb::Step) -> Value {
    json!({ "name": s.name, "duration_ms": s.duration_ms, "detail": s.detail })
}

/// A guest's `/proc/meminfo` fields, bytes (absent: `null`).
pub fn meminfo(m: &pb::GuestMeminfo) -> Value {
    json!({
        "mem_total": m.mem_total,
        "mem_free": m.mem_free,
        "mem_available": m.mem_available,
        "buffers": m.buffers,
        "cached": m.cached,
        "swap_cached": m.swap_cached,
        "active_anon": m.active_anon,
        "inactive_anon": m.inactive_anon,
        "active_file": m.active_file,
        "inactive_file": m.inactive_file,
        "unevictable": m.unevictable,
        "mlocked": m.mlocked,
        "swap_total": m.swap_total,
        "swap_free": m.swap_free,
        "zswap": m.zswap,
        "zswapped": m.zswapped,
        "dirty": m.dirty,
        "writeback": m.writeback,
        "anon_pages": m.anon_pages,
        "mapped": m.mapped,
        "shmem": m.shmem,
        "kernel_reclaimable": m.kernel_reclaimable,
        "slab_reclaimable": m.slab_reclaimable,
        "slab_unreclaimable": m.slab_unreclaimable,
        "kernel_stack": m.kernel_stack,
        "page_tables": m.page_tables,
        "percpu": m.percpu,
        "vmalloc_used": m.vmalloc_used,
        "commit_limit": m.commit_limit,
        "committed_as": m.committed_as,
        "hugetlb": m.hugetlb,
        "balloon": m.balloon,
    })
}

/// A guest's `/proc/vmstat` distress counters (absent: `null`).
pub fn vmstat(m: &pb::GuestVmstat) -> Value {
    json!({
        "oom_kill": m.oom_kill,
        "pgmajfault": m.pgmajfault,
        "allocstall": m.allocstall,
        "pswpin": m.pswpin,
        "pswpout": m.pswpout,
        "workingset_refault_anon": m.workingset_refault_anon,
        "workingset_refault_file": m.workingset_refault_file,
        "pgscan_kswapd": m.pgscan_kswapd,
        "pgscan_direct": m.pgscan_direct,
        "pgsteal_kswapd": m.pgsteal_kswapd,
        "pgsteal_direct": m.pgsteal_direct,
    })
}
