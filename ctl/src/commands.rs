//! The commands: one gRPC call (or two) each, and what is printed of the answer, as text
//! for people and as JSON for scripts.

use std::collections::BTreeMap;

use qga_proto::v1::{
    self as pb, guest_memory_client::GuestMemoryClient, memory_hotplug_client::MemoryHotplugClient,
    memory_signals_client::MemorySignalsClient, vms_client::VmsClient,
};
use serde_json::{Value, json};
use tonic::Status;

use crate::{
    cli::{Command, MemoryCommand, OnlineType, VmCommand},
    connect::Client,
    json,
    size::format as size,
    table,
};

/// What a command printed: text for `table`, a document for `json`; progress lines (the
/// steps of a hotplug operation, warnings) go to stderr in table mode.
#[derive(Debug, Default)]
pub struct Printed {
    /// For `--output table`.
    pub text: String,
    /// For `--output json`.
    pub json: Value,
    /// Progress and warnings, for stderr.
    pub progress: Vec<String>,
    /// The call worked but the guest refused some of what was asked (exit code 3).
    pub partial: bool,
}

/// Runs `command` (not `completions`) on `client`.
pub async fn run(client: &Client, command: Command) -> Result<Printed, Status> {
    match command {
        Command::Vm(VmCommand::List) => vm_list(client).await,
        Command::Blocks { vm } => blocks(client, vm).await,
        Command::BlockInfo { vm } => block_info(client, vm).await,
        Command::Set { vm, changes } => set(client, vm, changes).await,
        Command::Memory(m) => memory(client, m).await,
        Command::Completions { .. } => Ok(Printed::default()),
    }
}

async fn memory(client: &Client, command: MemoryCommand) -> Result<Printed, Status> {
    match command {
        MemoryCommand::Layout { vm } => layout(client, vm).await,
        MemoryCommand::Stats { vm } => stats(client, vm).await,
        MemoryCommand::Plug {
            vm,
            size,
            node,
            online_type,
            request,
        } => plug(client, vm, size, node, online_type, request.request_id).await,
        MemoryCommand::Unplug { vm, dimm, request } => {
            unplug(client, vm, dimm, request.request_id).await
        }
        MemoryCommand::Resize { vm, size, request } => {
            resize(client, vm, size, request.request_id).await
        }
        MemoryCommand::Balloon {
            vm,
            target,
            request,
        } => balloon(client, vm, target, request.request_id).await,
    }
}

async fn vm_list(client: &Client) -> Result<Printed, Status> {
    let mut vms = VmsClient::new(client.channel.clone());
    let list = vms
        .list_vms(client.request(pb::ListVmsRequest {}))
        .await?
        .into_inner();
    let rows: Vec<Vec<String>> = list
        .vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                json::agent_state(v.state()).to_string(),
                v.socket.clone(),
                v.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    Ok(Printed {
        text: table::render(&["NAME", "STATE", "SOCKET", "LAST ERROR"], &rows),
        json: Value::Array(list.vms.iter().map(json::vm).collect()),
        ..Printed::default()
    })
}

/// Each block's zones and zone-based can-offline, from the layout, when the bridge can
/// give one (a VM without a QMP socket has none; then the zones are unknown).
async fn zones(client: &Client, vm: &str) -> BTreeMap<u64, pb::LayoutBlock> {
    let mut hotplug = MemoryHotplugClient::new(client.channel.clone());
    let request = client.request(pb::GetLayoutRequest { vm: vm.to_string() });
    let Ok(layout) = hotplug.get_layout(request).await else {
        return BTreeMap::new();
    };
    let layout = layout.into_inner();
    layout
        .dimms
        .into_iter()
        .flat_map(|d| d.blocks)
        .chain(layout.other_blocks)
        .map(|b| (b.phys_index, b))
        .collect()
}

async fn blocks(client: &Client, vm: String) -> Result<Printed, Status> {
    let mut memory = GuestMemoryClient::new(client.channel.clone());
    let request = client.request(pb::GetMemoryBlocksRequest { vm: vm.clone() });
    let blocks = memory.get_memory_blocks(request).await?.into_inner().blocks;
    let zones = zones(client, &vm).await;
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    for b in &blocks {
        let zone = zones.get(&b.phys_index);
        let valid: Vec<String> = zone.map(|z| z.valid_zones.clone()).unwrap_or_default();
        let can_offline = zone.and_then(|z| z.can_offline).or(b.can_offline);
        rows.push(vec![
            b.phys_index.to_string(),
            if b.online { "online" } else { "offline" }.to_string(),
            if valid.is_empty() {
                "-".into()
            } else {
                valid.join(" ")
            },
            can_offline
                .map_or("-", |c| if c { "yes" } else { "no" })
                .to_string(),
        ]);
        docs.push(json!({
            "phys_index": b.phys_index,
            "online": b.online,
            "valid_zones": valid,
            "can_offline": can_offline,
        }));
    }
    Ok(Printed {
        text: table::render(&["INDEX", "STATE", "ZONE", "CAN-OFFLINE"], &rows),
        json: Value::Array(docs),
        ..Printed::default()
    })
}

async fn block_info(client: &Client, vm: String) -> Result<Printed, Status> {
    let mut memory = GuestMemoryClient::new(client.channel.clone());
    let request = client.request(pb::GetMemoryBlockInfoRequest { vm });
    let info = memory.get_memory_block_info(request).await?.into_inner();
    Ok(Printed {
        text: format!("block size: {} ({} bytes)\n", size(info.size), info.size),
        json: json!({ "size": info.size }),
        ..Printed::default()
    })
}

async fn set(client: &Client, vm: String, changes: Vec<(u64, bool)>) -> Result<Printed, Status> {
    let mut memory = GuestMemoryClient::new(client.channel.clone());
    let blocks = changes
        .into_iter()
        .map(|(phys_index, online)| pb::MemoryBlockChange { phys_index, online })
        .collect();
    let request = client.request(pb::SetMemoryBlocksRequest { vm, blocks });
    let results = memory
        .set_memory_blocks(request)
        .await?
        .into_inner()
        .results;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.phys_index.to_string(),
                json::response(r.response()).to_string(),
                r.error_code.map_or("-".into(), |c| c.to_string()),
            ]
        })
        .collect();
    let partial = results
        .iter()
        .any(|r| r.response() != pb::MemoryBlockResponseType::Success);
    Ok(Printed {
        text: table::render(&["INDEX", "RESULT", "ERRNO"], &rows),
        json: Value::Array(results.iter().map(json::block_result).collect()),
        partial,
        ..Printed::default()
    })
}

async fn layout(client: &Client, vm: String) -> Result<Printed, Status> {
    let mut hotplug = MemoryHotplugClient::new(client.channel.clone());
    let request = client.request(pb::GetLayoutRequest { vm });
    let layout = hotplug.get_layout(request).await?.into_inner();
    Ok(Printed {
        text: crate::layout::text(&layout),
        json: json::layout(&layout),
        ..Printed::default()
    })
}

async fn stats(client: &Client, vm: String) -> Result<Printed, Status> {
    let mut signals = MemorySignalsClient::new(client.channel.clone());
    let request = client.request(pb::GetMemoryStatsRequest { vm });
    let stats = signals.get_memory_stats(request).await?.into_inner();
    Ok(Printed {
        text: crate::stats::text(&stats),
        json: crate::stats::json(&stats),
        ..Printed::default()
    })
}

/// The request id to send: the caller's, or a fresh one that is announced so that a
/// retry can reuse it.
fn request_id(given: Option<String>, progress: &mut Vec<String>) -> String {
    given.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let id = format!("qgactl-{now:x}-{:x}", std::process::id());
        progress.push(format!("request-id: {id} (retry with --request-id {id})"));
        id
    })
}

fn online_type(t: Option<OnlineType>) -> pb::OnlineType {
    match t {
        None => pb::OnlineType::Unspecified,
        Some(OnlineType::OnlineMovable) => pb::OnlineType::OnlineMovable,
        Some(OnlineType::Online) => pb::OnlineType::Online,
        Some(OnlineType::OnlineKernel) => pb::OnlineType::OnlineKernel,
    }
}

/// The JSON of an operation's answer: its request id, what it did, its steps.
fn operation_json(request_id: &str, what: Value, steps: &[pb::Step], warnings: &[String]) -> Value {
    let mut doc = json!({
        "request_id": request_id,
        "steps": steps.iter().map(json::step).collect::<Vec<_>>(),
        "warnings": warnings,
    });
    if let (Value::Object(doc), Value::Object(what)) = (&mut doc, what) {
        doc.extend(what);
    }
    doc
}

/// Progress lines for `steps` and `warnings`.
fn progress(steps: &[pb::Step], warnings: &[String], out: &mut Vec<String>) {
    for s in steps {
        out.push(format!(
            "  {:<13} {:>9.1} ms  {}",
            s.name, s.duration_ms, s.detail
        ));
    }
    out.extend(warnings.iter().map(|w| format!("warning: {w}")));
}

async fn plug(
    client: &Client,
    vm: String,
    bytes: u64,
    node: Option<u32>,
    online: Option<OnlineType>,
    id: Option<String>,
) -> Result<Printed, Status> {
    let mut lines = Vec::new();
    let request_id = request_id(id, &mut lines);
    let mut hotplug = MemoryHotplugClient::new(client.channel.clone());
    let request = client.request(pb::PlugRequest {
        vm: vm.clone(),
        size: bytes,
        node,
        online_type: online_type(online) as i32,
        request_id: Some(request_id.clone()),
    });
    let reply = hotplug.plug(request).await?.into_inner();
    progress(&reply.steps, &reply.warnings, &mut lines);
    let text = match &reply.dimm {
        Some(d) => format!(
            "plugged {} into {vm}: {}\n",
            d.id,
            crate::layout::dimm_line(d)
        ),
        None => format!("plugged into {vm}\n"),
    };
    let what = json!({ "dimm": reply.dimm.as_ref().map(json::dimm) });
    Ok(Printed {
        text,
        json: operation_json(&request_id, what, &reply.steps, &reply.warnings),
        progress: lines,
        partial: false,
    })
}

async fn unplug(
    client: &Client,
    vm: String,
    dimm: String,
    id: Option<String>,
) -> Result<Printed, Status> {
    let mut lines = Vec::new();
    let request_id = request_id(id, &mut lines);
    let mut hotplug = MemoryHotplugClient::new(client.channel.clone());
    let request = client.request(pb::UnplugRequest {
        vm: vm.clone(),
        dimm: dimm.clone(),
        request_id: Some(request_id.clone()),
    });
    let reply = hotplug.unplug(request).await?.into_inner();
    progress(&reply.steps, &reply.warnings, &mut lines);
    let freed = reply.dimm.as_ref().map_or(0, |d| d.size);
    let what = json!({ "dimm": reply.dimm.as_ref().map(json::dimm) });
    Ok(Printed {
        text: format!("unplugged {dimm} from {vm}: {} given back\n", size(freed)),
        json: operation_json(&request_id, what, &reply.steps, &reply.warnings),
        progress: lines,
        partial: false,
    })
}

async fn resize(
    client: &Client,
    vm: String,
    bytes: u64,
    id: Option<String>,
) -> Result<Printed, Status> {
    let mut lines = Vec::new();
    let request_id = request_id(id, &mut lines);
    let mut hotplug = MemoryHotplugClient::new(client.channel.clone());
    let request = client.request(pb::ResizeRequest {
        vm: vm.clone(),
        size: bytes,
        request_id: Some(request_id.clone()),
    });
    let r = hotplug.resize(request).await?.into_inner();
    progress(&r.steps, &r.warnings, &mut lines);
    let ids = |d: &[pb::Dimm]| {
        if d.is_empty() {
            "none".to_string()
        } else {
            d.iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut text = format!(
        "resized {vm} from {} to {}: plugged {}; unplugged {}\n",
        size(r.from_bytes),
        size(r.to_bytes),
        ids(&r.plugged),
        ids(&r.unplugged)
    );
    for c in &r.virtio_mem {
        text.push_str(&format!(
            "virtio-mem {}: {} -> {}\n",
            c.id,
            size(c.from_bytes),
            size(c.to_bytes)
        ));
    }
    let what = json!({
        "from_bytes": r.from_bytes,
        "to_bytes": r.to_bytes,
        "plugged": r.plugged.iter().map(json::dimm).collect::<Vec<_>>(),
        "unplugged": r.unplugged.iter().map(json::dimm).collect::<Vec<_>>(),
        "virtio_mem": r.virtio_mem.iter().map(|c| json!({
            "id": c.id, "from_bytes": c.from_bytes, "to_bytes": c.to_bytes,
        })).collect::<Vec<_>>(),
    });
    Ok(Printed {
        text,
        json: operation_json(&request_id, what, &r.steps, &r.warnings),
        progress: lines,
        partial: false,
    })
}

async fn balloon(
    client: &Client,
    vm: String,
    target: u64,
    id: Option<String>,
) -> Result<Printed, Status> {
    let mut lines = Vec::new();
    let request_id = request_id(id, &mut lines);
    let mut hotplug = MemoryHotplugClient::new(client.channel.clone());
    let request = client.request(pb::BalloonRequest {
        vm: vm.clone(),
        target,
        request_id: Some(request_id.clone()),
    });
    let r = hotplug.balloon(request).await?.into_inner();
    progress(&r.steps, &r.warnings, &mut lines);
    let text = format!(
        "ballooned {vm} from {} to {}: the balloon {} holds {}\n",
        size(r.from_bytes),
        size(r.to_bytes),
        r.id,
        size(r.held_bytes)
    );
    let what = json!({
        "id": r.id,
        "from_bytes": r.from_bytes,
        "to_bytes": r.to_bytes,
        "target_bytes": r.target_bytes,
        "held_bytes": r.held_bytes,
        "actual_bytes": r.actual_bytes,
    });
    Ok(Printed {
        text,
        json: operation_json(&request_id, what, &r.steps, &r.warnings),
        progress: lines,
        partial: false,
    })
}
