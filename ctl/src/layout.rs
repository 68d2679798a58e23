//! A memory layout as text: totals, one row per memory device with its blocks and
//! zones, and the blocks of no device.

use qga_proto::v1 as pb;

use crate::{json, size::format as size, table};

/// `first-last` of consecutive block numbers, or a list when they are not consecutive.
fn ranges(blocks: &[pb::LayoutBlock]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for b in blocks {
        run = match run {
            Some((first, last)) if b.phys_index == last + 1 => Some((first, b.phys_index)),
            Some(done) => {
                out.push(range(done));
                Some((b.phys_index, b.phys_index))
            }
            None => Some((b.phys_index, b.phys_index)),
        };
    }
    out.extend(run.map(range));
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

fn range((first, last): (u64, u64)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// How many blocks are in each state: `4 online`, `2 online, 2 absent`.
fn states(blocks: &[pb::LayoutBlock]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for b in blocks {
        let s = json::block_state(b.state());
        match counts.iter_mut().find(|(name, _)| *name == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The zones the blocks are in (`Movable`, `Normal`, ...), `-` when unknown.
fn zones(blocks: &[pb::LayoutBlock]) -> String {
    let mut zones: Vec<&str> = blocks
        .iter()
        .flat_map(|b| b.valid_zones.iter().map(String::as_str))
        .collect();
    zones.sort_unstable();
    zones.dedup();
    if zones.is_empty() {
        "-".into()
    } else {
        zones.join(" ")
    }
}

/// One DIMM in a sentence: `512 MiB on node 0 at 0x100000000, blocks 32-35: 4 online
/// (Movable)`.
pub fn dimm_line(d: &pb::Dimm) -> String {
    format!(
        "{} on node {} at {:#x}, blocks {}: {} ({})",
        size(d.size),
        d.node,
        d.addr,
        ranges(&d.blocks),
        states(&d.blocks),
        zones(&d.blocks)
    )
}

/// The layout as text.
pub fn text(l: &pb::MemoryLayout) -> String {
    let mut out = totals(l);
    out.push('\n');
    out.push_str(&table::render(&DEVICE_HEADER, &device_rows(l)));
    out.push_str(&format!(
        "\nboot and other memory: blocks {}: {} ({})\n",
        ranges(&l.other_blocks),
        states(&l.other_blocks),
        zones(&l.other_blocks)
    ));
    for w in &l.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// The summary above the device table: block size, boot, plugged, total and online
/// memory, then `auto_online_blocks` when known.
fn totals(l: &pb::MemoryLayout) -> String {
    let mut out = format!(
        "block size  {}\nboot        {}\nplugged     {} in {} device(s)\ntotal       {}\nonline      {}",
        size(l.block_size),
        size(l.boot_bytes),
        size(l.plugged_bytes),
        l.dimms.len() + l.virtio_mem.len(),
        size(l.boot_bytes + l.plugged_bytes),
        size(l.online_bytes),
    );
    if let Some(m) = l.movable_bytes {
        out.push_str(&format!(" ({} movable)", size(m)));
    }
    out.push('\n');
    if let Some(a) = &l.auto_online_blocks {
        out.push_str(&format!("auto_online_blocks  {a}\n"));
    }
    if let Some(b) = &l.balloon {
        out.push_str(&balloon(b));
    }
    out
}

/// The balloon line: what it holds, what the guest may use, and its properties.
fn balloon(b: &pb::Balloon) -> String {
    let kept = b
        .kept_bytes
        .map_or_else(String::new, |k| format!(", kept at {}", size(k)));
    let on = |set: bool, name: &str| {
        if set {
            format!(", {name}")
        } else {
            String::new()
        }
    };
    format!(
        "balloon     {} holds {} (usable {}, QEMU actual {}{kept}{}{})\n",
        if b.id.is_empty() { "(no id)" } else { &b.id },
        size(b.held_bytes),
        size(b.usable_bytes),
        size(b.actual_bytes),
        on(b.deflate_on_oom, "deflate-on-oom"),
        on(b.free_page_reporting, "free-page-reporting"),
    )
}

/// The columns of the device table, one row per DIMM or virtio-mem device.
const DEVICE_HEADER: [&str; 10] = [
    "DEVICE",
    "KIND",
    "NODE",
    "SLOT",
    "ADDRESS",
    "SIZE",
    "BLOCKS",
    "STATE",
    "ZONES",
    "REMOVABLE",
];

/// The device table's rows: the DIMMs, then the virtio-mem devices.
fn device_rows(l: &pb::MemoryLayout) -> Vec<Vec<String>> {
    l.dimms
        .iter()
        .map(dimm_row)
        .chain(l.virtio_mem.iter().map(virtio_mem_row))
        .collect()
}

/// A DIMM's row of the device table.
fn dimm_row(d: &pb::Dimm) -> Vec<String> {
    vec![
        d.id.clone(),
        "dimm".into(),
        d.node.to_string(),
        d.slot.to_string(),
        format!("{:#x}", d.addr),
        size(d.size),
        ranges(&d.blocks),
        states(&d.blocks),
        zones(&d.blocks),
        yes_no(d.removable),
    ]
}

/// A virtio-mem device's row of the device table: its size is what is plugged, of the
/// most it can grow to, and what was asked.
fn virtio_mem_row(v: &pb::VirtioMem) -> Vec<String> {
    vec![
        v.id.clone(),
        "virtio-mem".into(),
        v.node.to_string(),
        "-".into(),
        v.addr.map_or("-".into(), |a| format!("{a:#x}")),
        format!(
            "{} of {} (asked {})",
            size(v.plugged_size),
            size(v.max_size),
            size(v.requested_size)
        ),
        ranges(&v.blocks),
        states(&v.blocks),
        zones(&v.blocks),
        "-".into(),
    ]
}

/// `yes`, `no`, or `-` when unknown.
fn yes_no(b: Option<bool>) -> String {
    b.map_or("-", |b| if b { "yes" } else { "no" }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: u64, state: pb::BlockState, zone: &str) -> pb::LayoutBlock {
        pb::LayoutBlock {
            phys_index: i,
            state: state as i32,
            valid_zones: vec![zone.to_string()],
            can_offline: Some(true),
        }
    }

    #[test]
    fn blocks_read_as_ranges_counts_and_zones() {
        let blocks = vec![
            block(32, pb::BlockState::Online, "Movable"),
            block(33, pb::BlockState::Online, "Movable"),
            block(35, pb::BlockState::Absent, "Movable"),
        ];
        assert_eq!(ranges(&blocks), "32-33,35");
        assert_eq!(states(&blocks), "2 online, 1 absent");
        assert_eq!(zones(&blocks), "Movable");
        assert_eq!(ranges(&[]), "-");
    }
}
