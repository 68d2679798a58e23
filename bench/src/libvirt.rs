//! The libvirt backend against the bridge's own socket and against libvirt's own API:
//! `Ping` and `GetMemoryBlocks` (gRPC) through a bridge with `--libvirt qemu:///system` in
//! front of a transient libvirt domain; the same agent commands through
//! `virDomainQemuAgentCommand` called directly from this process on a held domain handle
//! (what a control plane that talks to libvirt itself pays); and through a bridge with
//! `--vm NAME=SOCKET` in front of a plain QEMU guest booted as the hotplug section boots
//! one. Same guest image and agent, both under TCG with one vCPU.
//!
//! Both guests and both bridges run for the whole section; the paths take turns, one
//! block of sequential calls each, so the machine's noise falls on all alike. Only a call
//! that fails is an error, never a timing.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use qga_e2e::{
    guest::{Guest, GuestConfig},
    image::{self, GuestImage},
    libvirt::{Domain, URI},
};
use qga_proto::v1::{
    GetMemoryBlocksRequest, PingRequest, guest_agent_client::GuestAgentClient,
    guest_memory_client::GuestMemoryClient,
};
use qga_testkit::BridgeProcess;
use tonic::transport::Channel;

use crate::{
    hotplug::{kernel_version, qemu_version},
    report::Report,
    stats::{Samples, fmt_duration, ratio},
};

/// The plain guest's name in its bridge.
const DIRECT_VM: &str = "vm1";
/// The gRPC deadline of each call (the libvirt bridge hands it to libvirt as its timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each guest's agent may take to answer through its bridge after the boot.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The two ways to the agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Bridge `--libvirt`, libvirt domain, libvirtd's agent connection.
    Libvirt,
    /// libvirt's API called directly, no bridge.
    Api,
    /// Bridge `--vm NAME=SOCKET` on the plain QEMU guest's chardev.
    Direct,
}

/// Every path, in the order they take turns.
const PATHS: [Path; 3] = [Path::Libvirt, Path::Api, Path::Direct];

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Libvirt => "bridge, libvirt (`--libvirt`)",
            Path::Api => "libvirt's API directly (no bridge)",
            Path::Direct => "bridge, direct socket (`--vm`)",
        }
    }
}

/// The measured calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Ping,
    GetMemoryBlocks,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::Ping => "Ping",
            Method::GetMemoryBlocks => "GetMemoryBlocks",
        }
    }

    /// The agent command behind the gRPC call.
    fn qga(self) -> &'static str {
        match self {
            Method::Ping => r#"{"execute":"guest-ping"}"#,
            Method::GetMemoryBlocks => r#"{"execute":"guest-get-memory-blocks"}"#,
        }
    }
}

/// libvirt's API on a domain handle held for the whole section, from the blocking pool.
struct Api {
    domain: virt::domain::Domain,
    /// Keeps the connection open as long as the handle.
    _conn: virt::connect::Connect,
}

impl Api {
    fn open(name: &str) -> anyhow::Result<Self> {
        let conn = virt::connect::Connect::open(Some(URI)).context("virConnectOpen")?;
        let domain = conn
            .lookup_domain_by_name(name)
            .context("virDomainLookupByName")?;
        Ok(Self {
            domain,
            _conn: conn,
        })
    }

    /// `warm` unrecorded calls, then `n` timed ones, sequentially, on one blocking thread.
    async fn block(self, method: Method, warm: usize, n: usize) -> anyhow::Result<(Self, Samples)> {
        tokio::task::spawn_blocking(move || {
            let mut s = Samples::with_capacity(n);
            for i in 0..warm + n {
                let t = Instant::now();
                let reply = self
                    .domain
                    .qemu_agent_command(method.qga(), 10, 0)
                    .with_context(|| format!("{} through libvirt's API", method.label()))?;
                let d = t.elapsed();
                ensure!(reply.contains("\"return\""), "no return value: {reply}");
                if i >= warm {
                    s.push(d);
                }
            }
            Ok((self, s))
        })
        .await?
    }
}

/// One bridge in front of one guest, with gRPC clients on one HTTP/2 connection.
struct Target {
    path: Path,
    vm: String,
    agent: GuestAgentClient<Channel>,
    memory: GuestMemoryClient<Channel>,
    _bridge: BridgeProcess,
}

impl Target {
    /// Starts the release bridge with `args` and connects to it.
    async fn start(path: Path, vm: &str, args: Vec<String>) -> anyhow::Result<Self> {
        let bridge = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            BridgeProcess::start("", &args)
        })
        .await?
        .with_context(|| format!("starting qga-bridge for the {} path", path.label()))?;
        let channel = Channel::from_shared(bridge.grpc_url())?
            .connect()
            .await
            .context("connecting to the bridge's gRPC port")?;
        Ok(Self {
            path,
            vm: vm.to_string(),
            agent: GuestAgentClient::new(channel.clone()),
            memory: GuestMemoryClient::new(channel),
            _bridge: bridge,
        })
    }

    /// One call; returns the number of memory blocks for `GetMemoryBlocks` (0 for `Ping`).
    async fn call(&mut self, method: Method) -> anyhow::Result<usize> {
        let vm = self.vm.clone();
        match method {
            Method::Ping => {
                let mut req = tonic::Request::new(PingRequest { vm });
                req.set_timeout(CALL_TIMEOUT);
                self.agent.ping(req).await?;
                Ok(0)
            }
            Method::GetMemoryBlocks => {
                let mut req = tonic::Request::new(GetMemoryBlocksRequest { vm });
                req.set_timeout(CALL_TIMEOUT);
                let blocks = self
                    .memory
                    .get_memory_blocks(req)
                    .await?
                    .into_inner()
                    .blocks;
                ensure!(!blocks.is_empty(), "GetMemoryBlocks returned no blocks");
                Ok(blocks.len())
            }
        }
    }

    /// Pings until the agent answers through this bridge (the libvirt bridge learns of the
    /// domain from libvirt; the guest's agent may still be settling).
    async fn until_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.call(Method::Ping).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "the agent of {} did not answer through the {} bridge within {READY_TIMEOUT:?}",
                        self.vm,
                        self.path.label()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `warm` unrecorded calls, then `n` timed ones, sequentially.
    async fn block(&mut self, method: Method, warm: usize, n: usize) -> anyhow::Result<Samples> {
        let mut s = Samples::with_capacity(n);
        for i in 0..warm + n {
            let t = Instant::now();
            self.call(method).await.with_context(|| {
                format!(
                    "{} through the {} path (call {} of the block)",
                    method.label(),
                    self.path.label(),
                    i + 1
                )
            })?;
            let d = t.elapsed();
            if i >= warm {
                s.push(d);
            }
        }
        Ok(s)
    }
}

/// `virsh version`'s library version and hypervisor, e.g. `9.0.0` and `QEMU 7.2.22`.
fn libvirt_version() -> Option<(String, String)> {
    let out = Command::new("virsh")
        .args(["-c", URI, "version"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    Some((
        after("Using library:").map(|v| v.trim_start_matches("libvirt ").to_string())?,
        after("Running hypervisor:").unwrap_or_else(|| "unknown".into()),
    ))
}

/// Figures of one (method, path): all samples, and each round's median.
#[derive(Default)]
struct Figures {
    all: Samples,
    rounds: Vec<Duration>,
}

/// How many calls the section makes: `rounds` rounds, in each a block of `warm` untimed
/// then `calls` timed calls per (method, path).
#[derive(Clone, Copy)]
struct Plan {
    rounds: usize,
    calls: usize,
    warm: usize,
}

/// The versions of what the guests run on, for the report.
struct Versions {
    kernel: String,
    qemu: String,
    libvirt: String,
    hypervisor: String,
}

/// The section.
pub async fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let (rounds, calls, warm) = if quick { (1, 100, 10) } else { (3, 500, 30) };
    let plan = Plan {
        rounds,
        calls,
        warm,
    };
    let image = image::ensure().context("the guest image (tests/guest/build-image)")?;
    let kernel = kernel_version(&image.kernel).unwrap_or_else(|| "unknown".into());
    let qemu = qemu_version().unwrap_or_else(|| "unknown".into());
    let (domain, (libvirt, hypervisor), guest) = start_guests(&image).await?;
    let versions = Versions {
        kernel,
        qemu,
        libvirt,
        hypervisor,
    };

    let measured = measure(&domain, &guest, plan).await;
    // The bridges are gone (dropped in `measure`); now the guests.
    let (figures, blocks) = measured.map_err(|e| with_consoles(e, &domain, &guest))?;
    drop(guest);
    drop(domain);

    intro(report, &versions, plan, blocks);
    report.table(&[
        "call",
        "path",
        "p50",
        "p90",
        "p99",
        "p50 per round",
        "vs libvirt's API (p50)",
        "vs direct socket (p50)",
    ]);
    for method in [Method::Ping, Method::GetMemoryBlocks] {
        method_rows(report, method, &figures)?;
    }
    report.end_table();
    report.para(&format!(
        "Percentiles over all {} timed calls per row. These are TCG figures on a shared 2-core \
         host: the agent's side of each call is emulated, so both paths carry the same slow \
         guest; compare the two rows of a call, not these figures with the fake-agent \
         sections'.",
        rounds * calls
    ));
    Ok(())
}

/// Boots the libvirt domain first (this also starts libvirtd when it is not running),
/// then the plain guest; one boot at a time. Both are torn down on every way out: the
/// domain's drop destroys it, the guest's kills its QEMU. Also returns libvirt's
/// version and hypervisor, asked while only the domain runs.
async fn start_guests(image: &GuestImage) -> anyhow::Result<(Domain, (String, String), Guest)> {
    let domain = tokio::task::spawn_blocking(|| {
        let d = Domain::start("qga-bench", "ours")?;
        d.wait_for_agent(Duration::from_secs(30))?;
        anyhow::Ok(d)
    })
    .await?
    .context("starting the libvirt domain")?;
    let versions = libvirt_version().unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    let guest = {
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            Guest::boot(&image, GuestConfig::new("ours", "online_movable"))
        })
        .await?
        .context("booting the plain QEMU guest")?
    };
    Ok((domain, versions, guest))
}

/// `e` with the last lines of both guests' consoles, which tell why a guest failed.
fn with_consoles(e: anyhow::Error, domain: &Domain, guest: &Guest) -> anyhow::Error {
    let tail = |text: String| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    anyhow::anyhow!(
        "{e:#}\nlibvirt domain console (last lines):\n{}\nplain guest console (last lines):\n{}",
        tail(domain.console_text()),
        tail(guest.console_text())
    )
}

/// The section's heading and how it measures; `blocks` are the guests' memory block
/// counts (libvirt, direct).
fn intro(report: &mut Report, v: &Versions, plan: Plan, blocks: (usize, usize)) {
    let Versions {
        kernel,
        qemu,
        libvirt,
        hypervisor,
    } = v;
    let Plan {
        rounds,
        calls,
        warm,
    } = plan;
    report.heading("libvirt backend against libvirt's API and the direct socket");
    report.para(&format!(
        "The same gRPC calls, `Ping` and `GetMemoryBlocks` (GuestAgent / GuestMemory), through \
         two release bridges on this host, each in front of its own guest: **libvirt**, a bridge \
         started with `--libvirt {URI}` in front of a transient libvirt domain, so each call is \
         `virDomainQemuAgentCommand` and libvirtd holds the agent's socket; **direct socket**, \
         a bridge started with `--vm {DIRECT_VM}=SOCKET` in front of a plain QEMU guest (as the \
         hotplug section boots it) whose agent chardev the bridge holds itself; and **libvirt's \
         API directly**: the same agent commands (`guest-ping`, `guest-get-memory-blocks`) \
         through `virDomainQemuAgentCommand` from the benchmark process itself (the `virt` \
         crate, one connection and one domain handle held for the whole section, timeout \
         10 s), which is what a control plane talking to libvirt itself pays; its time is \
         the call's, without encoding a gRPC reply. Both guests: \
         QEMU {qemu} under TCG (no KVM; `-cpu max`, 1 vCPU, 512 MiB boot memory, 4 DIMM slots), \
         Debian's cloud kernel {kernel}, busybox init and our `qga-agent` (the `qga-e2e` \
         image; the domain's XML mirrors the plain guest's command line). libvirt \
         {libvirt} (`virsh -c {URI} version`; hypervisor {hypervisor}). Both guests and both bridges run \
         during the whole section; {rounds} round(s), and in each round, per call, the \
         bridge's libvirt path, libvirt's API, then the direct path run a block of {warm} warm-up calls (not counted) \
         and {calls} timed ones, sequential on one HTTP/2 connection per bridge (no \
         concurrency, so no read coalescing); the other guest idles meanwhile. Latency is the \
         tonic client's round trip. The guests have {} (libvirt) and {} (direct) memory \
         blocks. Per call the libvirt path adds, beyond the direct one, libvirt's own RPC hop \
         (bridge to libvirtd over its unix socket, and back) and the domain's agent job lock \
         in libvirtd (libvirt serialises agent commands per domain); the bridge keeps each \
         running domain's handle (dropped on its lifecycle events), so no domain lookup is \
         made per call.",
        blocks.0, blocks.1
    ));
}

/// The three rows of `method`, one per path, each compared with the paths after it.
fn method_rows(
    report: &mut Report,
    method: Method,
    figures: &[(Method, Path, Figures)],
) -> anyhow::Result<()> {
    let get = |path: Path| {
        figures
            .iter()
            .find(|(m, p, _)| *m == method && *p == path)
            .map(|(_, _, f)| f)
    };
    let (Some(lv), Some(api), Some(direct)) =
        (get(Path::Libvirt), get(Path::Api), get(Path::Direct))
    else {
        bail!("no figures for {}", method.label());
    };
    let vs = |f: &Figures, base: &Figures| {
        let (a, b) = (f.all.p50(), base.all.p50());
        let sign = if a >= b { "+" } else { "-" };
        format!("{} ({sign}{})", ratio(a, b), fmt_duration(a.abs_diff(b)))
    };
    for (path, f) in [
        (Path::Libvirt, lv),
        (Path::Api, api),
        (Path::Direct, direct),
    ] {
        let per_round: Vec<String> = f.rounds.iter().map(|d| fmt_duration(*d)).collect();
        let (vs_api, vs_direct) = match path {
            Path::Libvirt => (vs(f, api), vs(f, direct)),
            Path::Api => ("-".into(), vs(f, direct)),
            Path::Direct => ("-".into(), "-".into()),
        };
        report.row(&[
            method.label().to_string(),
            path.label().to_string(),
            fmt_duration(f.all.p50()),
            fmt_duration(f.all.quantile(0.90)),
            fmt_duration(f.all.p99()),
            per_round.join(" / "),
            vs_api,
            vs_direct,
        ]);
    }
    Ok(())
}

/// The rounds. Returns the figures per (method, path) and the block counts (libvirt,
/// direct). The bridges live only here, so they are stopped before the guests.
async fn measure(
    domain: &Domain,
    guest: &Guest,
    plan: Plan,
) -> anyhow::Result<(Vec<(Method, Path, Figures)>, (usize, usize))> {
    let Plan {
        rounds,
        calls,
        warm,
    } = plan;
    let (mut lv, mut direct) = start_targets(domain, guest).await?;
    let name = domain.name().to_string();
    let mut api = Some(tokio::task::spawn_blocking(move || Api::open(&name)).await??);
    let blocks = (
        lv.call(Method::GetMemoryBlocks).await?,
        direct.call(Method::GetMemoryBlocks).await?,
    );

    let mut figures: Vec<(Method, Path, Figures)> = Vec::new();
    for method in [Method::Ping, Method::GetMemoryBlocks] {
        for path in PATHS {
            figures.push((method, path, Figures::default()));
        }
    }
    for round in 1..=rounds {
        for method in [Method::Ping, Method::GetMemoryBlocks] {
            for path in PATHS {
                let s = match path {
                    Path::Libvirt => lv.block(method, warm, calls).await,
                    Path::Direct => direct.block(method, warm, calls).await,
                    Path::Api => match api.take() {
                        Some(a) => a.block(method, warm, calls).await.map(|(a, s)| {
                            api = Some(a);
                            s
                        }),
                        None => Err(anyhow::anyhow!("the libvirt API handle was lost")),
                    },
                }
                .with_context(|| format!("round {round}"))?;
                eprintln!(
                    "bench: libvirt round {round}: {} via {}: p50 {}, p99 {}",
                    method.label(),
                    path.label(),
                    fmt_duration(s.p50()),
                    fmt_duration(s.p99())
                );
                if let Some((_, _, f)) = figures
                    .iter_mut()
                    .find(|(m, p, _)| *m == method && *p == path)
                {
                    f.rounds.push(s.p50());
                    f.all.extend(&s);
                }
            }
        }
    }
    Ok((figures, blocks))
}

/// The two bridges, libvirt's (`--libvirt`) in front of `domain` and a direct one (`--vm`)
/// on `guest`'s agent socket, each once its agent answers through it.
async fn start_targets(domain: &Domain, guest: &Guest) -> anyhow::Result<(Target, Target)> {
    let mut lv = Target::start(
        Path::Libvirt,
        domain.name(),
        vec!["--libvirt".into(), URI.into()],
    )
    .await?;
    let mut direct = Target::start(
        Path::Direct,
        DIRECT_VM,
        vec![
            "--vm".into(),
            format!("{DIRECT_VM}={}", guest.qga_socket().display()),
        ],
    )
    .await?;
    lv.until_ready().await?;
    direct.until_ready().await?;
    Ok((lv, direct))
}
