//! A real libvirt: the daemon (started by hand when it is not running; CI runs as root
//! without systemd) and the test guest as a transient libvirt domain, for the bridge's
//! libvirt backend.
//!
//! Everything goes through `virsh -c qemu:///system`, as an operator would.

use std::{
    ffi::OsStr,
    fs::{self, File},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use rustix::{
    fs::{FlockOperation, flock},
    process::{Pid, Signal, kill_process},
};
use serde_json::Value;
use tempfile::TempDir;

use crate::{guest::ControlPort, image};

/// The libvirt connection every helper uses.
pub const URI: &str = "qemu:///system";

/// How long the daemon may take to answer after being started, or to exit when stopped.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a TCG boot may take under libvirt (about 5 s when the machine is idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one `guest-ping` through libvirt may wait for the agent's answer, in seconds:
/// a TCG guest on a loaded machine may take seconds to answer.
const PING_TIMEOUT_S: u32 = 10;

/// Serialises starting and stopping the daemon between threads and test processes (nextest
/// runs each test in its own process). `flock` locks belong to the open file, so two
/// threads of one process that each open the file exclude each other too.
const LOCK: &str = "/run/qga-e2e-libvirtd.lock";

/// Runs `virsh -c qemu:///system ARGS` and returns its stdout; fails with its stderr.
pub fn virsh<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(&args)
        .output()
        .context("running virsh (install libvirt-clients)")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(OsStr::new(" ")).to_string_lossy(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The libvirt daemon (`libvirtd`, with `virtlogd` for the domains' logs).
#[derive(Debug)]
pub struct Libvirtd;

impl Libvirtd {
    /// Makes sure libvirtd answers, starting it when it does not; fails (never skips)
    /// when it cannot.
    pub fn ensure() -> anyhow::Result<()> {
        if answers() {
            return kvm_node_as_udev_would();
        }
        Self::start()
    }

    /// Starts `virtlogd` and `libvirtd` (those not running) and waits until libvirtd
    /// answers.
    pub fn start() -> anyhow::Result<()> {
        let _lock = lock()?;
        kvm_node_as_udev_would()?;
        if answers() {
            return Ok(());
        }
        for daemon in ["virtlogd", "libvirtd"] {
            if running_pid(daemon).is_none() {
                let status = Command::new(daemon).arg("-d").status().with_context(|| {
                    format!("starting {daemon} (install libvirt-daemon-system)")
                })?;
                ensure!(status.success(), "{daemon} -d failed: {status}");
            }
        }
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        while !answers() {
            if Instant::now() > deadline {
                bail!(
                    "libvirtd started but does not answer on {URI} within {DAEMON_TIMEOUT:?}; \
                     see /var/log/libvirt/libvirtd.log"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops libvirtd (SIGTERM) and waits until it is gone. Running domains keep running:
    /// their QEMU processes do not belong to the daemon, and a restarted daemon reconnects
    /// to them. Clients connected to it (`virsh event --loop`) fail and exit.
    pub fn stop() -> anyhow::Result<()> {
        let _lock = lock()?;
        let Some(pid) = running_pid("libvirtd") else {
            return Ok(());
        };
        match kill_process(pid, Signal::TERM) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => return Err(e).context("signalling libvirtd"),
        }
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        while alive(pid) {
            if Instant::now() > deadline {
                bail!("libvirtd (pid {pid:?}) still running {DAEMON_TIMEOUT:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// [`Libvirtd::stop`], then [`Libvirtd::start`].
    pub fn restart() -> anyhow::Result<()> {
        Self::stop()?;
        Self::start()
    }
}

fn answers() -> bool {
    virsh(["version"]).is_ok()
}

fn lock() -> anyhow::Result<File> {
    let file = File::create(LOCK).with_context(|| format!("creating {LOCK}"))?;
    flock(&file, FlockOperation::LockExclusive).with_context(|| format!("locking {LOCK}"))?;
    Ok(file)
}

/// The pid of the running daemon `name`, from its pid file (`/run/NAME.pid`).
fn running_pid(name: &str) -> Option<Pid> {
    let pid = fs::read_to_string(format!("/run/{name}.pid")).ok()?;
    let pid = Pid::from_raw(pid.trim().parse().ok()?)?;
    let comm = fs::read_to_string(format!("/proc/{}/comm", pid.as_raw_nonzero())).ok()?;
    (comm.trim() == name && alive(pid)).then_some(pid)
}

/// Whether `pid` exists and is no zombie (a daemon's parent is init, which may be slow to
/// reap it or, in a container, not reap it at all).
fn alive(pid: Pid) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}

/// Gives `/dev/kvm` the owner and mode Debian's udev rule gives it (`root:kvm 0660`).
///
/// Without udev (containers) it is `root:root 0600`. The QEMU capability probe runs as root
/// and sees KVM, but libvirt then checks `/dev/kvm` as its QEMU user (`libvirt-qemu`, in
/// group `kvm`), finds it unusable, throws the probe away and probes again: on every
/// lookup, so each `virsh create` took about 55 s. Our domains use TCG all the same.
fn kvm_node_as_udev_would() -> anyhow::Result<()> {
    let kvm = Path::new("/dev/kvm");
    let Ok(meta) = fs::metadata(kvm) else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o060 == 0o060 {
        return Ok(());
    }
    let status = Command::new("chgrp")
        .args(["kvm", "/dev/kvm"])
        .status()
        .context("running chgrp")?;
    ensure!(status.success(), "chgrp kvm /dev/kvm failed: {status}");
    fs::set_permissions(kvm, fs::Permissions::from_mode(0o660)).context("chmod 0660 /dev/kvm")
}

/// The devices a domain has beyond the usual ones.
#[derive(Debug, Clone, Copy, Default)]
struct Devices {
    /// A virtio-mem device ([`Domain::start_virtio_mem`]).
    virtio_mem: bool,
    /// A virtio balloon ([`Domain::start_balloon`]); `<memballoon model='none'/>` otherwise.
    balloon: bool,
}

/// A transient libvirt domain running the end-to-end guest image (TCG, 1 vCPU, 512 MiB
/// boot memory, 4 DIMM slots up to 4 GiB, ACPI). Destroyed on drop.
#[derive(Debug)]
pub struct Domain {
    name: String,
    dir: TempDir,
    /// Time from `virsh create` until the guest's agent was running.
    pub boot_time: Duration,
}

impl Domain {
    /// Starts a domain whose guest runs `agent` (`ours` or `reference`), our agent onlining
    /// as `online_movable`, and waits until the guest has booted.
    pub fn start(name_prefix: &str, agent: &str) -> anyhow::Result<Self> {
        Self::start_with(name_prefix, agent, "online_movable")
    }

    /// [`Domain::start`] with our agent's `--online-type` (`online`, `online_kernel`,
    /// `online_movable`).
    pub fn start_with(name_prefix: &str, agent: &str, online_type: &str) -> anyhow::Result<Self> {
        Self::start_full(name_prefix, agent, online_type, Devices::default())
    }

    /// [`Domain::start`] with a `<memory model='virtio-mem'>` device (2 GiB at most, 2 MiB
    /// blocks, nothing requested at boot), alias `virtiomem0`.
    pub fn start_virtio_mem(name_prefix: &str) -> anyhow::Result<Self> {
        let devices = Devices {
            virtio_mem: true,
            ..Devices::default()
        };
        Self::start_full(name_prefix, "ours", "online_movable", devices)
    }

    /// [`Domain::start`] with a virtio balloon: `<memballoon model='virtio'
    /// freePageReporting='on'>` without autodeflate (the balloon's pages leave the guest's
    /// MemTotal), its statistics every second; libvirt names it `balloon0`.
    pub fn start_balloon(name_prefix: &str) -> anyhow::Result<Self> {
        let devices = Devices {
            balloon: true,
            ..Devices::default()
        };
        Self::start_full(name_prefix, "ours", "online_movable", devices)
    }

    fn start_full(
        name_prefix: &str,
        agent: &str,
        online_type: &str,
        devices: Devices,
    ) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        ensure!(
            matches!(agent, "ours" | "reference"),
            "unknown agent '{agent}'"
        );
        ensure!(
            name_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "domain name prefix '{name_prefix}': letters, digits, - and _ only"
        );
        Libvirtd::ensure()?;
        let image = image::ensure()?;
        let name = format!(
            "{name_prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // QEMU runs as libvirt-qemu: it must reach the kernel and initramfs. Private
        // copies in a world-searchable directory: libvirt's DAC driver chowns them to
        // libvirt-qemu for the domain's lifetime (and back after), which must not happen
        // to the shared image that other tests use or rebuild. The sockets and the
        // console file need nothing: libvirt opens them itself and passes QEMU the fds.
        let dir = tempfile::Builder::new()
            .prefix("qga-e2e-libvirt-")
            .tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        for (from, to) in [(&image.kernel, "vmlinuz"), (&image.initrd, "initrd")] {
            fs::copy(from, dir.path().join(to))
                .with_context(|| format!("copying {}", from.display()))?;
        }
        let mut domain = Self {
            name,
            dir,
            boot_time: Duration::ZERO,
        };
        let xml = domain.path("domain.xml");
        fs::write(&xml, domain.xml(agent, online_type, devices))?;
        domain.create()?;
        eprintln!(
            "e2e: libvirt domain {} booted ({agent} agent) in {:.1} s",
            domain.name,
            domain.boot_time.as_secs_f64()
        );
        Ok(domain)
    }

    /// `virsh create` of the domain's XML, then waits until the guest has booted.
    fn create(&mut self) -> anyhow::Result<()> {
        // A fresh console: the boot is told by what this run prints.
        let _ = fs::remove_file(self.path("console.log"));
        let started = Instant::now();
        virsh([OsStr::new("create"), self.path("domain.xml").as_os_str()])?;
        let deadline = started + BOOT_TIMEOUT;
        while !self.console_text().contains("QGA-E2E READY") {
            if Instant::now() > deadline {
                bail!(
                    "domain {} did not boot within {BOOT_TIMEOUT:?}; console:\n{}",
                    self.name,
                    self.console_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.boot_time = started.elapsed();
        Ok(())
    }

    /// Destroys the domain and creates it again under the same name: a new run, with a
    /// new libvirt id; waits until the guest has booted.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.virsh("destroy", &[])?;
        self.create()
    }

    /// libvirt's id of the domain's current run.
    pub fn id(&self) -> anyhow::Result<u32> {
        let out = self.virsh("domid", &[])?;
        out.trim()
            .parse()
            .with_context(|| format!("virsh domid said '{}'", out.trim()))
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn xml(&self, agent: &str, online_type: &str, devices: Devices) -> String {
        let vmem = if devices.virtio_mem {
            "<memory model='virtio-mem'><target><size unit='MiB'>2048</size><node>0</node>\
             <block unit='MiB'>2</block><requested unit='MiB'>0</requested></target></memory>"
        } else {
            ""
        };
        let balloon = if devices.balloon {
            "<memballoon model='virtio' freePageReporting='on'><stats period='1'/></memballoon>"
        } else {
            "<memballoon model='none'/>"
        };
        let (name, kernel, initrd, console, control) = (
            &self.name,
            self.path("vmlinuz").display().to_string(),
            self.path("initrd").display().to_string(),
            self.path("console.log").display().to_string(),
            self.path("control.sock").display().to_string(),
        );
        // `maximum` is `-cpu max`, as the plain QEMU guest uses; `host-model` needs KVM
        // and a `<model>max</model>` is unknown to libvirt.
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <maxMemory slots='4' unit='GiB'>4</maxMemory>
  <vcpu>1</vcpu>
  <cpu mode='maximum'>
    <numa><cell id='0' cpus='0' memory='512' unit='MiB'/></numa>
  </cpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 qga.agent={agent} qga.online_type={online_type}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{control}'/><target port='1'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    {balloon}
    {vmem}
  </devices>
</domain>
"
        )
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest init's control port (`MemTotal` and friends).
    pub fn control(&self) -> ControlPort {
        ControlPort {
            path: self.path("control.sock"),
        }
    }

    /// The guest console so far (for failure messages).
    pub fn console_text(&self) -> String {
        fs::read_to_string(self.path("console.log")).unwrap_or_default()
    }

    /// Runs `virsh COMMAND NAME ARGS` on this domain.
    pub fn virsh(&self, command: &str, args: &[&str]) -> anyhow::Result<String> {
        virsh([command, self.name.as_str()].iter().chain(args))
    }

    /// Sends `command` to the guest agent through libvirt (`virsh qemu-agent-command`,
    /// waiting `timeout_s` seconds) and returns the agent's whole reply object
    /// (`{"return": ...}`).
    pub fn agent_command(&self, command: &Value, timeout_s: u32) -> anyhow::Result<Value> {
        let reply = self.virsh(
            "qemu-agent-command",
            &[&command.to_string(), "--timeout", &timeout_s.to_string()],
        )?;
        serde_json::from_str(&reply).with_context(|| format!("agent reply '{reply}'"))
    }

    /// Pings the agent through libvirt until it answers; fails after `timeout`.
    pub fn wait_for_agent(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.agent_command(
                &serde_json::json!({"execute": "guest-ping"}),
                PING_TIMEOUT_S,
            ) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("agent of {} silent for {timeout:?}", self.name)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Attaches a device to the running domain (`virsh attach-device --live`).
    pub fn attach_live(&self, device_xml: &str) -> anyhow::Result<()> {
        let file = self.path("device.xml");
        fs::write(&file, device_xml)?;
        let file = file.display().to_string();
        self.virsh("attach-device", &[&file, "--live"]).map(|_| ())
    }

    /// The live domain XML.
    pub fn dumpxml(&self) -> anyhow::Result<String> {
        self.virsh("dumpxml", &[])
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Fails only when the domain is already gone; nothing to clean up then.
        let _ = self.virsh("destroy", &[]);
    }
}
