//! The gRPC services of `qga.bridge.v1`, plus health and reflection.

use std::{sync::Arc, time::Duration};

use qga_proto::v1::{
    self as pb, FILE_DESCRIPTOR_SET,
    guest_agent_server::{GuestAgent, GuestAgentServer},
    guest_memory_server::{GuestMemory, GuestMemoryServer},
    memory_hotplug_server::{MemoryHotplug, MemoryHotplugServer},
    memory_signals_server::MemorySignalsServer,
    vms_server::{Vms, VmsServer},
};
use qga_wire::schema::{
    GuestMemoryBlockResponse, GuestMemoryBlockResponseType, GuestMemoryOnlineType,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status, transport::server::Router};
use tower::layer::util::{Identity, Stack};

use crate::{
    backend::Step,
    call::{BlockChanges, Call, Reply},
    config::LimitsConfig,
    hotplug::{
        Done, Effect, Operation,
        layout::{self, BlockState, Layout},
        plug::PlugArgs,
    },
    net::{Server, gatekeeper::Gatekeeper},
    policy::Caller,
    service::Service,
    session::AgentState,
};

/// Implements all five gRPC services over the bridge's [`Service`] (`MemorySignals` in
/// [`super::signals`]).
#[derive(Debug, Clone)]
pub struct Api {
    service: Arc<Service>,
    /// Block changes one set may carry (`limits.max_set_entries`).
    max_set_entries: usize,
}

impl Api {
    /// The gRPC services over `service`, a set carrying at most `max_set_entries`.
    pub fn new(service: Arc<Service>, max_set_entries: usize) -> Self {
        Self {
            service,
            max_set_entries,
        }
    }

    /// The service it calls.
    pub(super) fn service(&self) -> &Service {
        &self.service
    }

    /// Who sent `req`, as the [`crate::net::gatekeeper`] layer authenticated it.
    pub(super) fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unauthenticated"))
    }

    /// Runs `call` on `vm` under the request's deadline and encodes its reply as `R`.
    async fn run<T, R: FromReply>(
        &self,
        req: &Request<T>,
        vm: &str,
        call: Call,
    ) -> Result<Response<R>, Status> {
        let caller = self.caller(req)?;
        let reply = self.service.call(&caller, vm, call, deadline(req)).await?;
        R::from_reply(reply)
            .map(Response::new)
            .ok_or_else(|| Status::internal("the agent's reply belongs to another call"))
    }
}

/// The gRPC router: our five services behind the [`Gatekeeper`], and health and
/// reflection (public, as health probes expect).
pub async fn router(
    service: &Arc<Service>,
    limits: &LimitsConfig,
) -> Result<Router<Stack<Gatekeeper, Identity>>, String> {
    let api = Api::new(service.clone(), limits.max_set_entries);
    let max = max_request_bytes(limits.max_set_entries);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GuestMemoryServer<Api>>().await;
    health.set_serving::<GuestAgentServer<Api>>().await;
    health.set_serving::<VmsServer<Api>>().await;
    health.set_serving::<MemoryHotplugServer<Api>>().await;
    health.set_serving::<MemorySignalsServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let keeper = service
        .gatekeeper(Server::Grpc)
        .public(&["/grpc.health.v1.Health/", "/grpc.reflection."]);
    let keepalive = Duration::from_millis(limits.keepalive_interval_ms);
    Ok(tonic::transport::Server::builder()
        .layer(keeper)
        .max_concurrent_streams(limits.grpc_max_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.grpc_max_pending_resets))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(GuestMemoryServer::new(api.clone()).max_decoding_message_size(max))
        .add_service(GuestAgentServer::new(api.clone()).max_decoding_message_size(max))
        .add_service(MemoryHotplugServer::new(api.clone()).max_decoding_message_size(max))
        .add_service(MemorySignalsServer::new(api.clone()).max_decoding_message_size(max))
        .add_service(VmsServer::new(api).max_decoding_message_size(max)))
}

/// Serves `router` on `incoming` connections until `shutdown` turns true.
pub async fn serve<I, IO, IE>(
    router: Router<Stack<Gatekeeper, Identity>>,
    incoming: I,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// The largest request message decoded: a `SetMemoryBlocksRequest` of `max_set_entries`
/// changes (at most 15 bytes each on the wire) and a VM name, with room to spare. Larger
/// messages are refused by tonic before they are decoded.
pub fn max_request_bytes(max_set_entries: usize) -> usize {
    max_set_entries.saturating_mul(16).saturating_add(4096)
}

/// A gRPC response made from the typed reply of its call (`None`: another call's reply).
trait FromReply: Sized {
    fn from_reply(reply: Reply) -> Option<Self>;
}

/// The caller's deadline from the `grpc-timeout` header, a little early so that our
/// DEADLINE_EXCEEDED (and the resync it triggers) wins over the transport's own timer.
pub(super) fn deadline<T>(req: &Request<T>) -> Option<Instant> {
    let raw = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(raw)?;
    let margin = (timeout / 20).min(Duration::from_millis(50));
    Some(Instant::now() + timeout.saturating_sub(margin))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn response_type(t: GuestMemoryBlockResponseType) -> pb::MemoryBlockResponseType {
    match t {
        GuestMemoryBlockResponseType::Success => pb::MemoryBlockResponseType::Success,
        GuestMemoryBlockResponseType::NotFound => pb::MemoryBlockResponseType::NotFound,
        GuestMemoryBlockResponseType::OperationNotSupported => {
            pb::MemoryBlockResponseType::OperationNotSupported
        }
        GuestMemoryBlockResponseType::OperationFailed => {
            pb::MemoryBlockResponseType::OperationFailed
        }
    }
}

fn block_result(r: GuestMemoryBlockResponse) -> pb::MemoryBlockResult {
    pb::MemoryBlockResult {
        phys_index: r.phys_index,
        response: response_type(r.response) as i32,
        error_code: r.error_code,
    }
}

impl FromReply for pb::GetMemoryBlocksResponse {
    fn from_reply(reply: Reply) -> Option<Self> {
        let Reply::GetMemoryBlocks(blocks) = reply else {
            return None;
        };
        let blocks = blocks
            .into_iter()
            .map(|b| pb::MemoryBlock {
                phys_index: b.phys_index,
                online: b.online,
                can_offline: b.can_offline,
            })
            .collect();
        Some(Self { blocks })
    }
}

impl FromReply for pb::SetMemoryBlocksResponse {
    fn from_reply(reply: Reply) -> Option<Self> {
        let Reply::SetMemoryBlocks(results) = reply else {
            return None;
        };
        let results = results.into_iter().map(block_result).collect();
        Some(Self { results })
    }
}

impl FromReply for pb::GetMemoryBlockInfoResponse {
    fn from_reply(reply: Reply) -> Option<Self> {
        let Reply::GetMemoryBlockInfo(info) = reply else {
            return None;
        };
        Some(Self { size: info.size })
    }
}

impl FromReply for pb::PingResponse {
    fn from_reply(reply: Reply) -> Option<Self> {
        matches!(reply, Reply::Ping(_)).then_some(Self {})
    }
}

impl FromReply for pb::GetInfoResponse {
    fn from_reply(reply: Reply) -> Option<Self> {
        let Reply::Info(info) = reply else {
            return None;
        };
        let supported_commands = info
            .supported_commands
            .into_iter()
            .map(|c| pb::AgentCommand {
                name: c.name,
                enabled: c.enabled,
                success_response: c.success_response,
            })
            .collect();
        Some(Self {
            version: info.version,
            supported_commands,
        })
    }
}

#[tonic::async_trait]
impl GuestMemory for Api {
    async fn get_memory_blocks(
        &self,
        req: Request<pb::GetMemoryBlocksRequest>,
    ) -> Result<Response<pb::GetMemoryBlocksResponse>, Status> {
        self.run(&req, &req.get_ref().vm, Call::GetMemoryBlocks)
            .await
    }

    async fn set_memory_blocks(
        &self,
        req: Request<pb::SetMemoryBlocksRequest>,
    ) -> Result<Response<pb::SetMemoryBlocksResponse>, Status> {
        // Who asks comes before what is asked: an unauthenticated caller learns nothing.
        self.caller(&req)?;
        let r = req.get_ref();
        let max = self.max_set_entries;
        let changes = BlockChanges::new(r.blocks.iter().map(|b| (b.phys_index, b.online)), max)?;
        self.run(&req, &r.vm, Call::SetMemoryBlocks(changes)).await
    }

    async fn get_memory_block_info(
        &self,
        req: Request<pb::GetMemoryBlockInfoRequest>,
    ) -> Result<Response<pb::GetMemoryBlockInfoResponse>, Status> {
        self.run(&req, &req.get_ref().vm, Call::GetMemoryBlockInfo)
            .await
    }
}

#[tonic::async_trait]
impl GuestAgent for Api {
    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        self.run(&req, &req.get_ref().vm, Call::Ping).await
    }

    async fn get_info(
        &self,
        req: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        self.run(&req, &req.get_ref().vm, Call::Info).await
    }
}

fn layout_block(b: layout::LayoutBlock) -> pb::LayoutBlock {
    let state = match b.state {
        BlockState::Online => pb::BlockState::Online,
        BlockState::Offline => pb::BlockState::Offline,
        BlockState::Absent => pb::BlockState::Absent,
    };
    pb::LayoutBlock {
        phys_index: b.phys_index,
        state: state as i32,
        valid_zones: b.valid_zones,
        can_offline: b.can_offline,
    }
}

fn dimm(d: layout::Dimm) -> pb::Dimm {
    let device = d.device;
    pb::Dimm {
        id: device.id,
        addr: device.addr,
        size: device.size,
        node: device.node,
        slot: device.slot,
        memdev: device.memdev,
        hotplugged: device.hotplugged,
        blocks: d.blocks.into_iter().map(layout_block).collect(),
        removable: d.removable,
    }
}

fn memory_layout(l: Layout) -> pb::MemoryLayout {
    pb::MemoryLayout {
        block_size: l.block_size,
        boot_bytes: l.boot_bytes,
        plugged_bytes: l.plugged_bytes,
        online_bytes: l.online_bytes,
        movable_bytes: l.movable_bytes,
        dimms: l.dimms.into_iter().map(dimm).collect(),
        other_blocks: l.other_blocks.into_iter().map(layout_block).collect(),
        auto_online_blocks: l.auto_online_blocks,
        zones_known: l.zones_known,
        warnings: l.warnings,
        virtio_mem: l.virtio_mem.into_iter().map(virtio_mem).collect(),
        balloon: l.balloon.map(|b| pb::Balloon {
            id: b.id,
            deflate_on_oom: b.deflate_on_oom,
            free_page_reporting: b.free_page_reporting,
            actual_bytes: b.actual_bytes,
            held_bytes: b.held_bytes,
            usable_bytes: b.usable_bytes,
            kept_bytes: b.kept_bytes,
        }),
    }
}

fn virtio_mem(v: layout::VirtioMem) -> pb::VirtioMem {
    let d = v.device;
    pb::VirtioMem {
        id: d.id,
        addr: d.addr,
        node: d.node,
        block_size: d.block_size,
        max_size: d.max_size,
        requested_size: d.requested_size,
        plugged_size: d.plugged_size,
        blocks: v.blocks.into_iter().map(layout_block).collect(),
    }
}

fn steps(steps: Vec<Step>) -> Vec<pb::Step> {
    steps
        .into_iter()
        .map(|s| pb::Step {
            name: s.name.to_string(),
            duration_ms: s.duration_ms,
            detail: s.detail,
        })
        .collect()
}

/// An optional `request_id`: absent or empty (proto3's default) is none.
fn request_id(id: &Option<String>) -> Option<String> {
    id.clone().filter(|id| !id.is_empty())
}

impl Api {
    async fn hotplug(
        &self,
        req: &Request<impl Send>,
        vm: &str,
        op: Operation,
        id: &Option<String>,
    ) -> Result<Done, Status> {
        let caller = self.caller(req)?;
        let id = request_id(id);
        Ok(self
            .service
            .memory_hotplug(&caller, vm, op, id, deadline(req))
            .await?)
    }
}

/// The DIMM of a plug or unplug.
fn the_dimm(done: Done) -> Result<(pb::Dimm, Vec<pb::Step>, Vec<String>), Status> {
    match done.what {
        Effect::Dimm { dimm: d } => Ok((dimm(d), steps(done.steps), done.warnings)),
        Effect::Resized(_) | Effect::Balloon { .. } => Err(Status::internal(
            "a resize or balloon answered a plug or unplug",
        )),
    }
}

#[tonic::async_trait]
impl MemoryHotplug for Api {
    async fn get_layout(
        &self,
        req: Request<pb::GetLayoutRequest>,
    ) -> Result<Response<pb::MemoryLayout>, Status> {
        let caller = self.caller(&req)?;
        let layout = self
            .service
            .memory_layout(&caller, &req.get_ref().vm, deadline(&req))
            .await?;
        Ok(Response::new(memory_layout(layout)))
    }

    async fn plug(
        &self,
        req: Request<pb::PlugRequest>,
    ) -> Result<Response<pb::PlugResponse>, Status> {
        let r = req.get_ref();
        let online_type = match pb::OnlineType::try_from(r.online_type) {
            Ok(pb::OnlineType::Unspecified) => None,
            Ok(pb::OnlineType::Online) => Some(GuestMemoryOnlineType::Online),
            Ok(pb::OnlineType::OnlineMovable) => Some(GuestMemoryOnlineType::OnlineMovable),
            Ok(pb::OnlineType::OnlineKernel) => Some(GuestMemoryOnlineType::OnlineKernel),
            Err(_) => return Err(Status::invalid_argument("unknown online_type")),
        };
        let op = Operation::Plug(PlugArgs {
            size: r.size,
            node: r.node,
            online_type,
        });
        let done = self.hotplug(&req, &r.vm, op, &r.request_id).await?;
        let (dimm, steps, warnings) = the_dimm(done)?;
        Ok(Response::new(pb::PlugResponse {
            dimm: Some(dimm),
            steps,
            warnings,
        }))
    }

    async fn unplug(
        &self,
        req: Request<pb::UnplugRequest>,
    ) -> Result<Response<pb::UnplugResponse>, Status> {
        let r = req.get_ref();
        if r.dimm.is_empty() {
            return Err(Status::invalid_argument("'dimm' is required"));
        }
        let op = Operation::Unplug {
            dimm: r.dimm.clone(),
        };
        let done = self.hotplug(&req, &r.vm, op, &r.request_id).await?;
        let (dimm, steps, warnings) = the_dimm(done)?;
        Ok(Response::new(pb::UnplugResponse {
            dimm: Some(dimm),
            steps,
            warnings,
        }))
    }

    async fn resize(
        &self,
        req: Request<pb::ResizeRequest>,
    ) -> Result<Response<pb::ResizeResponse>, Status> {
        let r = req.get_ref();
        let op = Operation::Resize { size: r.size };
        let done = self.hotplug(&req, &r.vm, op, &r.request_id).await?;
        let Effect::Resized(resized) = done.what else {
            return Err(Status::internal(
                "a plug, unplug or balloon answered a resize",
            ));
        };
        Ok(Response::new(pb::ResizeResponse {
            from_bytes: resized.from_bytes,
            to_bytes: resized.to_bytes,
            plugged: resized.plugged.into_iter().map(dimm).collect(),
            unplugged: resized.unplugged.into_iter().map(dimm).collect(),
            steps: steps(done.steps),
            warnings: done.warnings,
            virtio_mem: resized
                .virtio_mem
                .into_iter()
                .map(|c| pb::VirtioMemChange {
                    id: c.id,
                    from_bytes: c.from_bytes,
                    to_bytes: c.to_bytes,
                })
                .collect(),
        }))
    }

    async fn balloon(
        &self,
        req: Request<pb::BalloonRequest>,
    ) -> Result<Response<pb::BalloonResponse>, Status> {
        let r = req.get_ref();
        let op = Operation::Balloon { target: r.target };
        let done = self.hotplug(&req, &r.vm, op, &r.request_id).await?;
        let Effect::Balloon { balloon: b } = done.what else {
            return Err(Status::internal(
                "a plug, unplug or resize answered a balloon",
            ));
        };
        Ok(Response::new(pb::BalloonResponse {
            id: b.id,
            from_bytes: b.from_bytes,
            to_bytes: b.to_bytes,
            target_bytes: b.target_bytes,
            held_bytes: b.held_bytes,
            actual_bytes: b.actual_bytes,
            steps: steps(done.steps),
            warnings: done.warnings,
        }))
    }
}

/// The protobuf enum for a session state.
pub fn agent_state(s: AgentState) -> pb::AgentState {
    match s {
        AgentState::Disconnected => pb::AgentState::Disconnected,
        AgentState::Connecting => pb::AgentState::Connecting,
        AgentState::Connected => pb::AgentState::Connected,
        AgentState::Busy => pb::AgentState::Busy,
        AgentState::Idle => pb::AgentState::Idle,
    }
}

#[tonic::async_trait]
impl Vms for Api {
    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let caller = self.caller(&req)?;
        let vms = self
            .service
            .visible(&caller)
            .into_iter()
            .map(|s| pb::Vm {
                name: s.name,
                socket: s.socket.display().to_string(),
                state: agent_state(s.state) as i32,
                last_contact: s.last_contact.map(prost_types::Timestamp::from),
                last_error: s.last_error,
                last_write: s.last_write.map(|w| pb::LastWrite {
                    at: Some(prost_types::Timestamp::from(w.at)),
                    command: w.command.to_string(),
                    outcome: w.outcome.to_string(),
                    detail: w.detail,
                    results: w.results.into_iter().map(block_result).collect(),
                    late: w.late,
                }),
            })
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
