//! A QEMU guest with memory hotplug: boot it, talk to it, restart it, clean up.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use serde_json::json;
use tempfile::TempDir;

use crate::{image::GuestImage, qmp::Qmp};

/// How long a TCG boot may take before we give up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the guest's init may take to answer on its control port: first a `PONG`, then
/// the answer to a command. Generous: a TCG guest on a loaded machine is slow to schedule.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// The balloon device a [`GuestConfig::balloon`] guest has (as `tests/guest/run-qemu` with
/// `BALLOON=on`).
pub const BALLOON_DEVICE: &str = "virtio-balloon-pci,id=balloon0,free-page-reporting=on";

/// [`BALLOON_DEVICE`] without free page reporting, for a guest whose
/// [`GuestConfig::free_page_reporting`] is off (benchmarks compare the two).
pub const BALLOON_DEVICE_NO_REPORTING: &str =
    "virtio-balloon-pci,id=balloon0,free-page-reporting=off";

/// Which agent the guest runs, and how it onlines memory.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// `ours` (qga-agent) or `reference` (qemu-ga).
    pub agent: &'static str,
    /// `--online-type` of our agent (ignored by qemu-ga, which always writes `online`).
    pub online_type: &'static str,
    /// More kernel command line, appended as is (e.g. `memhp_default_state=online_movable`
    /// for a guest whose kernel onlines new memory itself); usually empty.
    pub extra_append: &'static str,
    /// A reset or a guest reboot boots the guest again; otherwise (`-no-reboot`) QEMU
    /// exits, so that a guest that panics ends the test instead of looping.
    pub reboot: bool,
    /// A `virtio-mem-pci` device `vmem0` (2 GiB at most, 2 MiB blocks, nothing plugged at
    /// boot) on a RAM backend of its own; the guest loads `virtio_mem`.
    pub virtio_mem: bool,
    /// A `virtio-balloon-pci` device `balloon0` with free page reporting and without
    /// deflate-on-oom (the balloon's pages leave the guest's MemTotal); the guest loads
    /// `virtio_balloon`.
    pub balloon: bool,
    /// The balloon reports the guest's free pages to QEMU, which gives them back to the
    /// host (on by default; off: [`BALLOON_DEVICE_NO_REPORTING`]).
    pub free_page_reporting: bool,
}

impl GuestConfig {
    /// `agent` onlining as `online_type`, with the usual kernel command line.
    pub fn new(agent: &'static str, online_type: &'static str) -> Self {
        Self {
            agent,
            online_type,
            extra_append: "",
            reboot: false,
            virtio_mem: false,
            balloon: false,
            free_page_reporting: true,
        }
    }
}

/// A DIMM as QEMU lists it (`query-memory-devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDevice {
    /// Device id (empty when QEMU has none).
    pub id: String,
    /// The backend's id (QEMU reports its QOM path, `/objects/ID`; this is `ID`).
    pub memdev: String,
    /// Guest physical address.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

/// The host's handles on a running guest: QMP and the init's control port.
#[derive(Debug, Clone)]
pub struct GuestControl {
    /// QMP socket.
    pub qmp: PathBuf,
    /// Control socket (guest ttyS1).
    pub control: PathBuf,
}

/// The guest init's control port: the guest's ttyS1 as a host unix socket. Works for any
/// guest running the end-to-end image, whoever started its QEMU (us or libvirt).
#[derive(Debug, Clone)]
pub struct ControlPort {
    /// The socket.
    pub path: PathBuf,
}

impl ControlPort {
    /// Sends a line to the guest's init and returns the answer line starting with `expect`.
    ///
    /// A serial line has no connection: bytes sent before the guest listens are lost. So
    /// first `ping` until `PONG` comes back, then send the command.
    pub fn control(&self, command: &str, expect: &str) -> anyhow::Result<String> {
        let mut stream = UnixStream::connect(&self.path)
            .with_context(|| format!("connecting {}", self.path.display()))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let mut line = String::new();
        let mut read_until = |reader: &mut BufReader<UnixStream>,
                              want: &str,
                              wait: Duration|
         -> anyhow::Result<Option<String>> {
            reader.get_ref().set_read_timeout(Some(wait))?;
            let until = Instant::now() + wait;
            while Instant::now() < until {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => bail!("control port closed"),
                    Ok(_) if line.trim().starts_with(want) => {
                        return Ok(Some(line.trim().to_string()));
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(None)
        };
        loop {
            writeln!(stream, "ping")?;
            if read_until(&mut reader, "PONG", Duration::from_millis(500))?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the guest's control port does not answer");
            }
        }
        writeln!(stream, "{command}")?;
        read_until(&mut reader, expect, CONTROL_TIMEOUT)?
            .with_context(|| format!("no '{expect}' answer to '{command}'"))
    }

    /// The guest's `MemTotal`, in KiB.
    pub fn mem_total_kib(&self) -> anyhow::Result<u64> {
        let line = self.control("meminfo", "MEMTOTAL ")?;
        line["MEMTOTAL ".len()..]
            .trim()
            .parse()
            .context("parsing MemTotal")
    }

    /// CPU time the guest's agent has used, in clock ticks (1/100 s).
    pub fn agent_cpu_ticks(&self) -> anyhow::Result<u64> {
        let line = self.control("agent-cpu", "AGENTCPU ")?;
        line["AGENTCPU ".len()..]
            .trim()
            .parse()
            .context("parsing agent CPU ticks")
    }

    /// Kills the agent inside the guest; the guest's supervisor starts it again.
    pub fn restart_agent(&self) -> anyhow::Result<()> {
        self.control("restart-agent", "RESTARTED").map(|_| ())
    }

    /// The guest kernel's `auto_online_blocks`: what it does with memory it adds
    /// (`offline`, `online`, `online_kernel` or `online_movable`).
    pub fn auto_online(&self) -> anyhow::Result<String> {
        let line = self.control("auto-online", "AUTOONLINE")?;
        Ok(line["AUTOONLINE".len()..].trim().to_string())
    }

    /// Sets the guest kernel's `auto_online_blocks` to `word`; fails unless the kernel
    /// reads it back.
    pub fn set_auto_online(&self, word: &str) -> anyhow::Result<()> {
        let line = self.control(&format!("auto-online {word}"), "AUTOONLINE")?;
        let now = line["AUTOONLINE".len()..].trim();
        ensure!(
            now == word,
            "the guest kernel did not take auto_online_blocks = {word}: it reads '{now}'"
        );
        Ok(())
    }

    /// Fills a file on the guest's memory-backed root with `mib` MiB, which the guest's
    /// kernel cannot reclaim (no swap): its `MemAvailable` falls by about that much.
    /// The MiB written.
    pub fn hog(&self, mib: u64) -> anyhow::Result<u64> {
        let line = self.control(&format!("hog {mib}"), "HOGGED ")?;
        line["HOGGED ".len()..]
            .trim()
            .parse()
            .context("parsing the MiB written")
    }

    /// Removes the file [`ControlPort::hog`] filled.
    pub fn unhog(&self) -> anyhow::Result<()> {
        self.control("unhog", "UNHOGGED").map(|_| ())
    }
}

impl GuestControl {
    /// The control port alone.
    pub fn port(&self) -> ControlPort {
        ControlPort {
            path: self.control.clone(),
        }
    }

    /// [`ControlPort::control`].
    pub fn control(&self, command: &str, expect: &str) -> anyhow::Result<String> {
        self.port().control(command, expect)
    }

    /// [`ControlPort::mem_total_kib`].
    pub fn mem_total_kib(&self) -> anyhow::Result<u64> {
        self.port().mem_total_kib()
    }

    /// [`ControlPort::agent_cpu_ticks`].
    pub fn agent_cpu_ticks(&self) -> anyhow::Result<u64> {
        self.port().agent_cpu_ticks()
    }

    /// [`ControlPort::restart_agent`].
    pub fn restart_agent(&self) -> anyhow::Result<()> {
        self.port().restart_agent()
    }

    /// [`ControlPort::auto_online`].
    pub fn auto_online(&self) -> anyhow::Result<String> {
        self.port().auto_online()
    }

    /// [`ControlPort::set_auto_online`].
    pub fn set_auto_online(&self, word: &str) -> anyhow::Result<()> {
        self.port().set_auto_online(word)
    }

    fn qmp(&self) -> anyhow::Result<Qmp> {
        Qmp::connect(&self.qmp, Duration::from_secs(10))
    }

    /// The ids of QEMU's memory backends (`query-memdev`), through the test's own QMP
    /// socket.
    pub fn memdev_ids(&self) -> anyhow::Result<Vec<String>> {
        let memdevs = self.qmp()?.execute("query-memdev", None)?;
        Ok(memdevs
            .as_array()
            .context("query-memdev returned no list")?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect())
    }

    /// QEMU's DIMMs (`query-memory-devices`), through the test's own QMP socket.
    pub fn memory_devices(&self) -> anyhow::Result<Vec<MemoryDevice>> {
        let devices = self.qmp()?.execute("query-memory-devices", None)?;
        Ok(devices
            .as_array()
            .context("query-memory-devices returned no list")?
            .iter()
            .filter(|d| d["type"] == "dimm")
            .map(|d| {
                let data = &d["data"];
                let memdev = data["memdev"].as_str().unwrap_or_default();
                MemoryDevice {
                    id: data["id"].as_str().unwrap_or_default().to_string(),
                    memdev: memdev.rsplit('/').next().unwrap_or(memdev).to_string(),
                    addr: data["addr"].as_u64().unwrap_or_default(),
                    size: data["size"].as_u64().unwrap_or_default(),
                }
            })
            .collect())
    }

    /// QEMU's virtio-mem devices (`query-memory-devices`): each one's id and
    /// `(requested-size, size)` in bytes, in QEMU's order.
    pub fn virtio_mem_devices(&self) -> anyhow::Result<Vec<(String, (u64, u64))>> {
        let devices = self.qmp()?.execute("query-memory-devices", None)?;
        devices
            .as_array()
            .context("query-memory-devices returned no list")?
            .iter()
            .filter(|d| d["type"] == "virtio-mem")
            .map(|d| {
                let data = &d["data"];
                let get = |k: &str| {
                    data[k]
                        .as_u64()
                        .with_context(|| format!("no {k} in {data}"))
                };
                let id = data["id"].as_str().unwrap_or_default().to_string();
                Ok((id, (get("requested-size")?, get("size")?)))
            })
            .collect()
    }

    /// QEMU's virtio-mem device `id`: its `(requested-size, size)` in bytes.
    pub fn virtio_mem_sizes(&self, id: &str) -> anyhow::Result<(u64, u64)> {
        let devices = self.virtio_mem_devices()?;
        devices
            .iter()
            .find(|(d, _)| d == id)
            .map(|&(_, sizes)| sizes)
            .with_context(|| format!("QEMU lists no virtio-mem device {id}: {devices:?}"))
    }

    /// QEMU's balloon (`query-balloon`) through the test's own QMP socket: `actual`, the
    /// memory the guest has with the balloon's pages taken out, in bytes.
    pub fn balloon_actual(&self) -> anyhow::Result<u64> {
        let balloon = self.qmp()?.execute("query-balloon", None)?;
        balloon["actual"]
            .as_u64()
            .with_context(|| format!("query-balloon answered no actual: {balloon}"))
    }

    /// Asks the balloon for a logical size of `bytes` (QMP `balloon`: boot memory and
    /// DIMMs, less what the balloon is to hold), through the test's own QMP socket. QEMU
    /// answers at once; the guest's driver inflates or deflates after.
    pub fn set_balloon(&self, bytes: u64) -> anyhow::Result<()> {
        self.qmp()?
            .execute("balloon", Some(json!({"value": bytes})))
            .map(|_| ())
    }

    /// Resets the guest (`system_reset`), as a guest reboot does: QEMU keeps its devices,
    /// hot-plugged DIMMs included, and the guest kernel boots again.
    pub fn system_reset(&self) -> anyhow::Result<()> {
        self.qmp()?.execute("system_reset", None)?;
        Ok(())
    }

    /// Hot-adds a DIMM of `bytes` as `id` (backend `mem-<id>`).
    pub fn hot_add_dimm(&self, id: &str, bytes: u64) -> anyhow::Result<()> {
        self.qmp()?.plug_dimm(id, bytes)
    }

    /// Asks the guest to eject DIMM `id` and waits until QEMU reports it gone; then drops
    /// its backend. Fails when the guest does not release it within `timeout`.
    pub fn unplug_dimm(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        let mut q = self.qmp()?;
        q.execute("device_del", Some(json!({"id": id})))?;
        let deadline = Instant::now() + timeout;
        loop {
            let devices = q.execute("query-memory-devices", None)?;
            let present = devices
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["data"]["id"] == id));
            if !present {
                break;
            }
            if Instant::now() > deadline {
                bail!("DIMM {id} still present after {timeout:?}: the guest did not release it");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        q.execute("object-del", Some(json!({"id": format!("mem-{id}")})))?;
        Ok(())
    }
}

/// A QEMU process running the test guest. Killed and its files removed on drop.
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    dir: TempDir,
    image: GuestImage,
    config: GuestConfig,
    /// Time the last boot took until the agent was running.
    pub boot_time: Duration,
}

impl Guest {
    /// Boots a guest and waits until its agent runs.
    pub fn boot(image: &GuestImage, config: GuestConfig) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("qga-e2e-").tempdir()?;
        let mut guest = Self {
            child: None,
            dir,
            image: image.clone(),
            config,
            boot_time: Duration::ZERO,
        };
        guest.start()?;
        Ok(guest)
    }

    /// The QEMU process's id while it runs (benchmarks read its memory in `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The QGA chardev socket (what the bridge connects to).
    pub fn qga_socket(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    /// The second QMP socket, the bridge's (QEMU serves one client per QMP socket; the
    /// test's own client keeps `qmp.sock`).
    pub fn qmp_bridge_socket(&self) -> PathBuf {
        self.dir.path().join("qmp-bridge.sock")
    }

    /// QMP and control sockets.
    pub fn control(&self) -> GuestControl {
        GuestControl {
            qmp: self.dir.path().join("qmp.sock"),
            control: self.dir.path().join("control.sock"),
        }
    }

    fn console(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    /// How many times the guest's init said it is ready (once per boot).
    pub fn boots(&self) -> usize {
        self.console_text().matches("QGA-E2E READY").count()
    }

    /// The guest console so far (for failure messages).
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(self.console()).unwrap_or_default()
    }

    /// Boots the guest: starts QEMU and waits for the guest's init to say it is ready.
    fn start(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.console());
        let started = Instant::now();
        let child = self
            .qemu_command()
            .spawn()
            .context("starting qemu-system-x86_64 (run ./scripts/setup)")?;
        self.child = Some(child);
        self.wait_for_boot(started + BOOT_TIMEOUT)?;
        self.boot_time = started.elapsed();
        eprintln!(
            "e2e: guest booted ({} agent) in {:.1} s",
            self.config.agent,
            self.boot_time.as_secs_f64()
        );
        Ok(())
    }

    /// The kernel command line: the agent and online type the guest's init runs with,
    /// then the config's extra arguments.
    fn kernel_append(&self) -> String {
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 qga.agent={} qga.online_type={}",
            self.config.agent, self.config.online_type
        );
        if !self.config.extra_append.is_empty() {
            append.push(' ');
            append.push_str(self.config.extra_append);
        }
        append
    }

    /// The balloon device's option, with free page reporting as configured.
    fn balloon_device(&self) -> &'static str {
        if self.config.free_page_reporting {
            BALLOON_DEVICE
        } else {
            BALLOON_DEVICE_NO_REPORTING
        }
    }

    /// The QEMU command for this guest: TCG, room for DIMMs (and a virtio-mem device and a
    /// balloon if configured), the console to a file, and the control, QGA and two QMP sockets.
    fn qemu_command(&self) -> Command {
        let sockets = self.control();
        let balloon: Vec<&str> = if self.config.balloon {
            vec!["-device", self.balloon_device()]
        } else {
            Vec::new()
        };
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", "512M,slots=4,maxmem=4G"])
            .arg("-kernel")
            .arg(&self.image.kernel)
            .arg("-initrd")
            .arg(&self.image.initrd)
            .args(["-append", &self.kernel_append()])
            .args(["-display", "none", "-monitor", "none"])
            .args(if self.config.virtio_mem {
                &[
                    "-object",
                    "memory-backend-ram,id=vmem0-ram,size=2G",
                    "-device",
                    "virtio-mem-pci,id=vmem0,memdev=vmem0-ram,node=0,block-size=2M,requested-size=0",
                ][..]
            } else {
                &[][..]
            })
            .args(&balloon)
            .args(if self.config.reboot {
                &[][..]
            } else {
                &["-no-reboot"][..]
            })
            .arg("-serial")
            .arg(format!("file:{}", self.console().display()))
            .arg("-serial")
            .arg(unix_server(&sockets.control))
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                self.qga_socket().display()
            ))
            .args([
                "-device",
                "virtio-serial",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .arg("-qmp")
            .arg(unix_server(&sockets.qmp))
            // The bridge's own QMP socket: QEMU serves one client per socket.
            .arg("-qmp")
            .arg(unix_server(&self.qmp_bridge_socket()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        qemu
    }

    /// Waits until the console says the guest is ready; fails with the console if QEMU
    /// exits first or `deadline` passes.
    fn wait_for_boot(&mut self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            if self.console_text().contains("QGA-E2E READY") {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "QEMU exited during boot ({status}); console:\n{}",
                    self.console_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "guest did not boot within {BOOT_TIMEOUT:?}; console:\n{}",
                    self.console_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills QEMU and boots the same guest again on the same socket paths.
    pub fn restart_qemu(&mut self) -> anyhow::Result<()> {
        self.stop();
        for s in ["qga.sock", "qmp.sock", "qmp-bridge.sock", "control.sock"] {
            let _ = std::fs::remove_file(self.dir.path().join(s));
        }
        self.start()
    }

    /// The directory holding the sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A QEMU chardev option for a listening unix socket at `path` that does not wait for a
/// client.
fn unix_server(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}
