//! Discovery of VM sockets by glob, made hard to fool.
//!
//! Two sources feed it: the `discover` globs (VM name: the socket's directory) and, with
//! `discover_proxmox`, Proxmox VE's run directory ([`proxmox_patterns`]: `<vmid>.qga` and
//! `<vmid>.qmp`, VM name: the vmid, shared with Proxmox's own tools).
//!
//! [`scan`] walks the globs (blocking: run it off the async workers) and sorts what they
//! match into sockets it takes, matches it refuses (symlinks, regular files, sockets owned
//! by a user not in `discover_owners`) and errors that kept it from seeing everything.
//! [`Discovery::apply`] turns one scan into the VMs to add and remove:
//!
//! - a scan that hit errors removes nothing (it may not have seen what it did not find);
//!   it may still add what it found;
//! - two matches that map to one VM name expose neither (and withdraw the name if it was
//!   exposed): nobody can tell which one callers mean;
//! - a name that is a configured VM is left to the configured one;
//! - no more than `limits.max_vms` VMs in all.
//!
//! Every refusal is logged once, not on every rescan.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::FileType,
    io,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use crate::names::{proxmox_vm, vm_name_for};

/// A discovered VM: its agent socket and, for a Proxmox VM, its QMP socket and shared mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredVm {
    /// The agent's socket.
    pub qga: PathBuf,
    /// The QMP socket, when one was found beside it (Proxmox's `<vmid>.qmp`).
    pub qmp: Option<PathBuf>,
    /// Shared with other tools: released when idle (Proxmox's VMs).
    pub shared: bool,
}

impl DiscoveredVm {
    /// A VM found by a `discover` glob: its agent socket only, held exclusively.
    pub fn agent(qga: PathBuf) -> Self {
        Self {
            qga,
            qmp: None,
            shared: false,
        }
    }
}

/// One pass over the discovery globs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Matches taken: real unix sockets owned by an accepted user.
    pub found: BTreeSet<PathBuf>,
    /// Matches refused, with why.
    pub refused: BTreeMap<PathBuf, String>,
    /// What kept the scan from seeing everything; empty when it is complete.
    pub errors: Vec<String>,
}

impl Scan {
    /// True when the scan saw everything its globs match: only then may vanished
    /// sockets be removed.
    pub fn is_complete(&self) -> bool {
        self.errors.is_empty()
    }

    /// A scan that saw nothing because of `error` (e.g. its task failed).
    pub fn failed(error: String) -> Self {
        Self {
            errors: vec![error],
            ..Self::default()
        }
    }
}

/// Scans `patterns` (blocking). `owners` are the uids a socket may be owned by; `known`
/// are the sockets taken so far, looked at directly when the globs do not return them
/// (the glob walk skips some unreadable paths silently: a known socket that is still
/// there is taken; one that cannot be looked at makes the scan incomplete).
pub fn scan(patterns: &[String], owners: &[u32], known: &BTreeSet<PathBuf>) -> Scan {
    let mut out = Scan::default();
    let mut matched = BTreeSet::new();
    for pattern in patterns {
        let paths = match glob::glob(pattern) {
            Ok(paths) => paths,
            Err(e) => {
                out.errors.push(format!("bad glob '{pattern}': {e}"));
                continue;
            }
        };
        for entry in paths {
            match entry {
                Ok(path) => {
                    matched.insert(path);
                }
                // A directory that vanished (or became a file) between being listed and
                // being read holds no socket: that is not a gap in the scan.
                Err(e) if gone(e.error()) => {}
                Err(e) => {
                    out.errors
                        .push(format!("cannot read {}: {}", e.path().display(), e.error()))
                }
            }
        }
    }
    let unreported: Vec<PathBuf> = known.difference(&matched).cloned().collect();
    for path in unreported {
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                matched.insert(path);
            }
            Err(e) if gone(&e) => {}
            Err(e) => out
                .errors
                .push(format!("cannot look at {}: {e}", path.display())),
        }
    }
    for path in matched {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => {
                let kind = meta.file_type();
                if !kind.is_socket() {
                    out.refused
                        .insert(path, format!("a {}, not a socket", kind_name(kind)));
                } else if !owners.contains(&meta.uid()) {
                    out.refused.insert(
                        path,
                        format!(
                            "owned by uid {}, which is not in discover_owners {owners:?}",
                            meta.uid()
                        ),
                    );
                } else {
                    out.found.insert(path);
                }
            }
            // Removed since the glob saw it.
            Err(e) if gone(&e) => {}
            Err(e) => out
                .errors
                .push(format!("cannot look at {}: {e}", path.display())),
        }
    }
    out
}

/// True when `e` says there is nothing at the path (rather than that it cannot be seen).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn kind_name(kind: FileType) -> &'static str {
    if kind.is_symlink() {
        "symlink"
    } else if kind.is_dir() {
        "directory"
    } else if kind.is_file() {
        "regular file"
    } else if kind.is_fifo() {
        "fifo"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// What one scan changes in the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Names to withdraw, first.
    pub remove: Vec<String>,
    /// Names to expose, or to move to new sockets (or a QMP socket came or went).
    pub add: Vec<(String, DiscoveredVm)>,
}

/// Discovery's state between scans: what it exposes and what it has already logged.
#[derive(Debug, Default)]
pub struct Discovery {
    configured: BTreeSet<String>,
    /// Discovered VMs may fill this many names (`max_vms` less the configured ones).
    capacity: usize,
    /// Proxmox VE's run directory, if its sockets are discovered.
    proxmox: Option<PathBuf>,
    exposed: BTreeMap<String, DiscoveredVm>,
    /// Sockets taken by the last scan (an incomplete scan keeps the earlier ones).
    taken: BTreeSet<PathBuf>,
    // Logged already, so logged once.
    refused: BTreeMap<PathBuf, String>,
    collisions: BTreeMap<String, BTreeSet<PathBuf>>,
    shadowed: BTreeMap<String, BTreeSet<PathBuf>>,
    over_limit: BTreeSet<PathBuf>,
}

impl Discovery {
    /// Discovery alongside the `configured` VM names, with at most `max_vms` VMs in all.
    pub fn new(configured: BTreeSet<String>, max_vms: usize) -> Self {
        Self {
            capacity: max_vms.saturating_sub(configured.len()),
            configured,
            ..Self::default()
        }
    }

    /// Discovers Proxmox VE's sockets in `dir` too (scan [`proxmox_patterns`] as well):
    /// what is in it is named by [`proxmox_vm`], and its VMs are shared.
    pub fn with_proxmox(mut self, dir: Option<PathBuf>) -> Self {
        self.proxmox = dir;
        self
    }

    /// The discovered VMs exposed, by name.
    pub fn exposed(&self) -> &BTreeMap<String, DiscoveredVm> {
        &self.exposed
    }

    /// True when `path` is in the Proxmox directory.
    fn in_proxmox(&self, path: &Path) -> bool {
        self.proxmox
            .as_deref()
            .is_some_and(|dir| path.parent() == Some(dir))
    }

    /// The sockets taken so far (pass them to the next [`scan`]).
    pub fn taken(&self) -> &BTreeSet<PathBuf> {
        &self.taken
    }

    /// Names withheld because two or more sockets map to them, with those sockets.
    #[cfg(test)]
    pub fn collisions(&self) -> &BTreeMap<String, BTreeSet<PathBuf>> {
        &self.collisions
    }

    /// Merges one scan: what to remove and add, logging each new refusal once.
    pub fn apply(&mut self, scan: Scan) -> Changes {
        let complete = scan.is_complete();
        let mut taken = scan.found;
        if !complete {
            tracing::warn!(
                errors = %scan.errors.join("; "),
                "discovery scan incomplete: nothing is removed this round"
            );
            // What it did not see may still be there.
            taken.extend(self.taken.iter().cloned());
        }
        let mut refused = scan.refused;
        let named = self.name(&taken, &mut refused);
        self.note_refused(refused, complete);
        let wanted = self.wanted(named);
        let changes = self.expose(wanted);
        self.taken = taken;
        changes
    }

    /// The sockets of `taken` by VM name, with the QMP sockets found beside Proxmox's;
    /// sockets that name no VM go to `refused`.
    fn name(&self, taken: &BTreeSet<PathBuf>, refused: &mut BTreeMap<PathBuf, String>) -> Named {
        let mut named = Named::default();
        for path in taken {
            let name = if self.in_proxmox(path) {
                match proxmox_vm(path) {
                    Some((name, true)) => {
                        named.qmps.insert(name, path.clone());
                        continue;
                    }
                    Some((name, false)) => Some(name),
                    None => {
                        let why = "not a Proxmox <vmid>.qga or <vmid>.qmp (vmid: decimal digits)";
                        refused.insert(path.clone(), why.into());
                        continue;
                    }
                }
            } else {
                vm_name_for(path)
            };
            match name {
                Some(name) => {
                    named.by_name.entry(name).or_default().insert(path.clone());
                }
                None => {
                    let why = "its directory name is not a valid VM name";
                    refused.insert(path.clone(), why.into());
                }
            }
        }
        named
    }

    /// Logs refusals not logged before, and remembers them (all of them after a complete
    /// scan, in addition to the earlier ones otherwise).
    fn note_refused(&mut self, refused: BTreeMap<PathBuf, String>, complete: bool) {
        for (path, why) in &refused {
            if self.refused.get(path) != Some(why) {
                tracing::warn!(path = %path.display(), "discovered socket refused: {why}");
            }
        }
        if complete {
            self.refused = refused;
        } else {
            self.refused.extend(refused);
        }
    }

    /// The VMs to expose: names of one socket that no configured VM has; shadowed and
    /// ambiguous names are withheld (and logged once).
    fn wanted(&mut self, named: Named) -> BTreeMap<String, DiscoveredVm> {
        let mut wanted = BTreeMap::new();
        let mut collisions = BTreeMap::new();
        let mut shadowed = BTreeMap::new();
        for (name, paths) in named.by_name {
            if self.configured.contains(&name) {
                if self.shadowed.get(&name) != Some(&paths) {
                    tracing::warn!(
                        vm = %name,
                        paths = %list(&paths),
                        "discovered socket has the name of a configured VM: ignored"
                    );
                }
                shadowed.insert(name, paths);
            } else if paths.len() > 1 {
                if self.collisions.get(&name) != Some(&paths) {
                    tracing::error!(
                        vm = %name,
                        paths = %list(&paths),
                        "discovered sockets map to one VM name: exposing none of them"
                    );
                }
                collisions.insert(name, paths);
            } else if let Some(path) = paths.into_iter().next() {
                let vm = if self.in_proxmox(&path) {
                    DiscoveredVm {
                        qmp: named.qmps.get(&name).cloned(),
                        shared: true,
                        qga: path,
                    }
                } else {
                    DiscoveredVm::agent(path)
                };
                wanted.insert(name, vm);
            }
        }
        for name in self.collisions.keys() {
            if !collisions.contains_key(name) {
                tracing::info!(vm = %name, "VM name no longer ambiguous");
            }
        }
        self.collisions = collisions;
        self.shadowed = shadowed;
        wanted
    }

    /// Exposes `wanted` within the capacity left: what to remove and what to add.
    fn expose(&mut self, wanted: BTreeMap<String, DiscoveredVm>) -> Changes {
        let mut changes = Changes::default();
        self.exposed.retain(|name, _| {
            // An incomplete scan keeps every socket taken before, so this only drops
            // names that vanished in a complete scan or have become ambiguous.
            let keep = wanted.contains_key(name);
            if !keep {
                changes.remove.push(name.clone());
            }
            keep
        });
        let mut over_limit = BTreeSet::new();
        for (name, vm) in wanted {
            match self.exposed.get(&name) {
                Some(old) if *old == vm => {}
                // Same name, new socket (libvirt restarted the domain), or its QMP socket
                // came or went: no new slot.
                Some(_) => {
                    self.exposed.insert(name.clone(), vm.clone());
                    changes.add.push((name, vm));
                }
                None if self.exposed.len() < self.capacity => {
                    self.exposed.insert(name.clone(), vm.clone());
                    changes.add.push((name, vm));
                }
                None => {
                    if !self.over_limit.contains(&vm.qga) {
                        tracing::warn!(
                            vm = %name,
                            path = %vm.qga.display(),
                            "discovered socket not added: limits.max_vms reached"
                        );
                    }
                    over_limit.insert(vm.qga);
                }
            }
        }
        self.over_limit = over_limit;
        changes
    }
}

/// One scan's sockets by VM name, and Proxmox's QMP sockets by vmid.
#[derive(Debug, Default)]
struct Named {
    by_name: BTreeMap<String, BTreeSet<PathBuf>>,
    qmps: BTreeMap<String, PathBuf>,
}

fn list(paths: &BTreeSet<PathBuf>) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use crate::names::proxmox_patterns;
    use std::{
        io::Write,
        os::unix::net::UnixListener,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// Runs `f` with tracing captured; returns its result and the log text.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if let Ok(mut v) = self.0.lock() {
                    v.extend_from_slice(b);
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = buf.0.lock().map(|v| v.clone()).unwrap_or_default();
        (out, String::from_utf8_lossy(&text).into_owned())
    }

    fn sock(dir: &str) -> PathBuf {
        PathBuf::from(format!("/run/vms/{dir}/qga.sock"))
    }

    fn found(dirs: &[&str]) -> Scan {
        Scan {
            found: dirs.iter().map(|d| sock(d)).collect(),
            ..Scan::default()
        }
    }

    fn incomplete(dirs: &[&str]) -> Scan {
        Scan {
            errors: vec!["cannot read /run/vms: Too many open files (os error 24)".into()],
            ..found(dirs)
        }
    }

    fn agent(path: PathBuf) -> DiscoveredVm {
        DiscoveredVm::agent(path)
    }

    fn names(d: &Discovery) -> Vec<&str> {
        d.exposed().keys().map(String::as_str).collect()
    }

    fn discovery() -> Discovery {
        Discovery::new(BTreeSet::new(), 4096)
    }

    #[test]
    fn an_incomplete_scan_adds_but_removes_nothing() {
        let mut d = discovery();
        let c = d.apply(found(&["a", "b"]));
        assert_eq!(c.add.len(), 2);
        // The scan ran out of descriptors and saw only `a`, plus a new `c`.
        let (c, log) = logged(|| d.apply(incomplete(&["a", "c"])));
        assert_eq!(c.remove, Vec::<String>::new());
        assert_eq!(c.add, vec![("c".to_string(), agent(sock("c")))]);
        assert_eq!(names(&d), ["a", "b", "c"]);
        assert!(log.contains("WARN"), "{log}");
        assert!(log.contains("Too many open files"), "{log}");
        // A scan that saw nothing at all, or whose task failed, keeps everything too.
        let c = d.apply(incomplete(&[]));
        assert_eq!(c, Changes::default());
        let c = d.apply(Scan::failed("scan task failed: panicked".into()));
        assert_eq!(c, Changes::default());
        assert_eq!(names(&d), ["a", "b", "c"]);
        // The next complete scan removes what really went.
        let c = d.apply(found(&["a"]));
        assert_eq!(c.remove, ["b", "c"]);
        assert_eq!(names(&d), ["a"]);
    }

    #[test]
    fn colliding_names_expose_neither_until_one_goes() {
        let mut d = discovery();
        d.apply(found(&["domain-1-web", "domain-3-db"]));
        assert_eq!(names(&d), ["db", "web"]);
        // A second domain's directory maps to the same name: withdraw it.
        let (c, log) = logged(|| d.apply(found(&["domain-1-web", "domain-2-web", "domain-3-db"])));
        assert_eq!(c.remove, ["web"]);
        assert!(c.add.is_empty());
        assert_eq!(names(&d), ["db"]);
        assert!(log.contains("ERROR"), "{log}");
        assert!(log.contains("domain-1-web/qga.sock"), "{log}");
        assert!(log.contains("domain-2-web/qga.sock"), "{log}");
        // Logged once, not on every rescan; still withheld.
        let (c, log) = logged(|| d.apply(found(&["domain-1-web", "domain-2-web", "domain-3-db"])));
        assert_eq!(c, Changes::default());
        assert!(!log.contains("ERROR"), "{log}");
        // An incomplete scan that saw only one of them does not bring the name back.
        let c = d.apply(incomplete(&["domain-2-web"]));
        assert_eq!(c, Changes::default());
        // One goes: the name comes back, on the socket that is left.
        let c = d.apply(found(&["domain-2-web", "domain-3-db"]));
        assert_eq!(
            c.add,
            vec![("web".to_string(), agent(sock("domain-2-web")))]
        );
        assert!(d.collisions().is_empty());
    }

    #[test]
    fn a_new_collision_seen_by_an_incomplete_scan_still_withdraws_the_name() {
        let mut d = discovery();
        d.apply(found(&["domain-1-web"]));
        // It may not have seen domain-1-web again, but that one may still be there.
        let c = d.apply(incomplete(&["domain-2-web"]));
        assert_eq!(c.remove, ["web"]);
        assert!(names(&d).is_empty());
    }

    #[test]
    fn a_restarted_domain_moves_its_name() {
        let mut d = Discovery::new(BTreeSet::new(), 1);
        d.apply(found(&["domain-1-web"]));
        let c = d.apply(found(&["domain-2-web"]));
        assert!(c.remove.is_empty());
        assert_eq!(
            c.add,
            vec![("web".to_string(), agent(sock("domain-2-web")))]
        );
    }

    #[test]
    fn configured_names_win_and_are_logged_once() {
        let mut d = Discovery::new(["web".to_string()].into(), 4096);
        let (c, log) = logged(|| d.apply(found(&["domain-1-web", "x"])));
        assert_eq!(c.add, vec![("x".to_string(), agent(sock("x")))]);
        assert!(log.contains("configured VM"), "{log}");
        let (_, log) = logged(|| d.apply(found(&["domain-1-web", "x"])));
        assert!(!log.contains("configured VM"), "{log}");
    }

    #[test]
    fn refusals_are_logged_once_while_they_last() {
        let mut d = discovery();
        let refused = || Scan {
            refused: [(sock("evil"), "a symlink, not a socket".to_string())].into(),
            ..Scan::default()
        };
        let (c, log) = logged(|| d.apply(refused()));
        assert_eq!(c, Changes::default());
        assert!(log.contains("symlink"), "{log}");
        let (_, log) = logged(|| d.apply(refused()));
        assert!(log.is_empty(), "{log}");
        // Gone, then back: said again.
        d.apply(Scan::default());
        let (_, log) = logged(|| d.apply(refused()));
        assert!(log.contains("symlink"), "{log}");
        // Unnameable directories are refusals too.
        let (c, log) = logged(|| d.apply(found(&["bad name"])));
        assert_eq!(c, Changes::default());
        assert!(log.contains("not a valid VM name"), "{log}");
        let (_, log) = logged(|| d.apply(found(&["bad name"])));
        assert!(log.is_empty(), "{log}");
    }

    #[test]
    fn max_vms_counts_configured_and_discovered() {
        // One configured VM, three in all: two discovered fit.
        let mut d = Discovery::new(["cfg".to_string()].into(), 3);
        let (c, log) = logged(|| d.apply(found(&["a", "b", "c", "d"])));
        assert_eq!(c.add.len(), 2);
        assert_eq!(names(&d), ["a", "b"]);
        assert_eq!(log.matches("max_vms").count(), 2, "{log}");
        let (_, log) = logged(|| d.apply(found(&["a", "b", "c", "d"])));
        assert!(!log.contains("max_vms"), "{log}");
        // A slot frees up: the next one takes it.
        d.apply(found(&["b", "c", "d"]));
        assert_eq!(names(&d), ["b", "c"]);
    }

    #[test]
    fn scan_takes_only_real_sockets_of_accepted_owners() {
        let root = tempfile::tempdir().expect("tempdir");
        let at = |dir: &str| {
            let d = root.path().join(dir);
            std::fs::create_dir_all(&d).expect("mkdir");
            d.join("qga.sock")
        };
        let good = at("good");
        let _good = UnixListener::bind(&good).expect("bind");
        // A symlink to a real socket, a regular file, a directory.
        std::os::unix::fs::symlink(&good, at("link")).expect("symlink");
        std::fs::write(at("file"), b"").expect("file");
        std::fs::create_dir(at("dir")).expect("dir");
        let pattern = vec![format!("{}/*/qga.sock", root.path().display())];
        let me = rustix::process::geteuid().as_raw();

        let s = scan(&pattern, &[me], &BTreeSet::new());
        assert!(s.is_complete(), "{:?}", s.errors);
        assert_eq!(s.found, [good.clone()].into());
        assert!(s.refused[&at("link")].contains("symlink"), "{s:?}");
        assert!(s.refused[&at("file")].contains("regular file"), "{s:?}");
        assert!(s.refused[&at("dir")].contains("directory"), "{s:?}");

        // Owned by someone not accepted.
        let s = scan(&pattern, &[me.wrapping_add(1)], &BTreeSet::new());
        assert!(s.found.is_empty());
        assert!(s.refused[&good].contains("discover_owners"), "{s:?}");
        if me == 0 {
            let theirs = at("theirs");
            let _theirs = UnixListener::bind(&theirs).expect("bind");
            std::os::unix::fs::lchown(&theirs, Some(12345), None).expect("lchown");
            let s = scan(&pattern, &[0], &BTreeSet::new());
            assert_eq!(s.found, [good.clone()].into());
            assert!(s.refused[&theirs].contains("uid 12345"), "{s:?}");
        }
    }

    #[test]
    fn scan_looks_at_known_sockets_the_glob_did_not_return() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("vm");
        std::fs::create_dir(&dir).expect("mkdir");
        let there = dir.join("qga.sock");
        let _l = UnixListener::bind(&there).expect("bind");
        let vanished = dir.join("gone.sock");
        let me = rustix::process::geteuid().as_raw();
        // A pattern that matches neither: the known socket still there is taken, the
        // vanished one is simply gone (no error).
        let pattern = vec![format!("{}/*/nothing", root.path().display())];
        let s = scan(&pattern, &[me], &[there.clone(), vanished].into());
        assert!(s.is_complete(), "{:?}", s.errors);
        assert_eq!(s.found, [there].into());
    }

    fn pve(file: &str) -> PathBuf {
        PathBuf::from(format!("/var/run/qemu-server/{file}"))
    }

    fn pve_found(files: &[&str]) -> Scan {
        Scan {
            found: files.iter().map(|f| pve(f)).collect(),
            ..Scan::default()
        }
    }

    fn proxmox() -> Discovery {
        Discovery::new(["103".to_string()].into(), 4096)
            .with_proxmox(Some("/var/run/qemu-server".into()))
    }

    #[test]
    fn proxmox_vms_are_shared_and_carry_their_qmp_socket() {
        let mut d = proxmox();
        let (c, log) = logged(|| {
            d.apply(pve_found(&[
                "101.qga", "101.qmp", "102.qga", "abc.qga", "104.qmp", "103.qga",
            ]))
        });
        assert!(c.remove.is_empty());
        let shared = |qga: &str, qmp: Option<&str>| DiscoveredVm {
            qga: pve(qga),
            qmp: qmp.map(pve),
            shared: true,
        };
        assert_eq!(
            c.add,
            vec![
                ("101".to_string(), shared("101.qga", Some("101.qmp"))),
                ("102".to_string(), shared("102.qga", None)),
            ],
            "a .qmp alone is no VM; a configured name wins"
        );
        assert!(log.contains("abc.qga"), "{log}");
        assert!(log.contains("configured VM"), "{log}");
        // 102's QMP socket shows up later: the VM is updated, not duplicated.
        let c = d.apply(pve_found(&["101.qga", "101.qmp", "102.qga", "102.qmp"]));
        assert_eq!(
            c.add,
            vec![("102".to_string(), shared("102.qga", Some("102.qmp")))]
        );
        assert!(c.remove.is_empty());
        // An incomplete scan that missed 101.qmp keeps it.
        let c = d.apply(Scan {
            errors: vec!["EMFILE".into()],
            ..pve_found(&["101.qga", "102.qga", "102.qmp"])
        });
        assert_eq!(c, Changes::default());
        // The VM stops: both files go, and so does the VM.
        let c = d.apply(pve_found(&["102.qga", "102.qmp"]));
        assert_eq!(c.remove, ["101"]);
        assert_eq!(names(&d), ["102"]);
    }

    #[test]
    fn a_proxmox_vmid_and_a_globbed_directory_of_that_name_collide() {
        let mut d = proxmox();
        let mut scan = pve_found(&["101.qga"]);
        scan.found.insert(sock("101"));
        let (c, log) = logged(|| d.apply(scan));
        assert_eq!(c, Changes::default());
        assert!(log.contains("ERROR"), "{log}");
    }

    #[test]
    fn scan_of_a_proxmox_directory_takes_only_sockets() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().to_path_buf();
        let _qga = UnixListener::bind(dir.join("101.qga")).expect("bind");
        let _qmp = UnixListener::bind(dir.join("101.qmp")).expect("bind");
        let _abc = UnixListener::bind(dir.join("abc.qga")).expect("bind");
        std::fs::write(dir.join("102.qga"), b"").expect("file");
        std::fs::write(dir.join("101.conf"), b"").expect("file");
        let me = rustix::process::geteuid().as_raw();
        let patterns = proxmox_patterns(&dir).expect("utf-8");
        let s = scan(&patterns, &[me], &BTreeSet::new());
        assert!(s.is_complete(), "{:?}", s.errors);
        assert!(s.refused[&dir.join("102.qga")].contains("regular file"));
        let mut d = Discovery::new(BTreeSet::new(), 4096).with_proxmox(Some(dir.clone()));
        let c = d.apply(s);
        assert_eq!(
            c.add,
            vec![(
                "101".to_string(),
                DiscoveredVm {
                    qga: dir.join("101.qga"),
                    qmp: Some(dir.join("101.qmp")),
                    shared: true
                }
            )]
        );
    }

    #[test]
    fn a_bad_pattern_makes_the_scan_incomplete() {
        let s = scan(&["/run/[".to_string()], &[0], &BTreeSet::new());
        assert!(!s.is_complete());
    }
}
