//! The journal: what the bridge must not forget across a restart, in an embedded,
//! crash-safe store in the state directory (`state_dir`).
//!
//! It holds the request-ids of hotplug operations. An operation sent with a request-id is
//! written *before* it acts (its intent: method and arguments, state `running`) and again
//! when it ends (its outcome), each in one committed transaction; a retry with the same
//! request-id, by the same identity, after any number of restarts, gets the recorded
//! outcome instead of a second run. An entry still `running` when a bridge opens the
//! journal belongs to a bridge that stopped during the operation: it becomes
//! `interrupted` until the hotplug layer has recovered it and recorded its final outcome
//! ([`Journal::interrupted`], [`Journal::recovered`]); it is never run again.
//!
//! The store is [redb]: a pure-Rust, copy-on-write B-tree file whose commits are atomic
//! and durable (fsync) and which recovers by itself from a crash mid-commit; no C library,
//! no server. One bridge per state directory: an exclusive lock on `lock` beside the
//! store, held while the journal is open. A store that cannot be read stops the bridge
//! ([`JournalError`]) rather than letting it start without its memory.
//!
//! It also holds each VM's desired memory ([`desired`]): the DIMMs the bridge plugged and
//! the online type of their blocks, which the bridge re-applies after a guest reboot.
//!
//! Bounds: per VM at most `hotplug.max_request_ids` entries (oldest dropped first), none
//! older than `hotplug.request_id_ttl_s`, and at most [`Retention::max_entries`] in all.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub mod desired;

use qga_wire::sync::lock;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// A request-id, scoped to the identity that sent it: one caller cannot replay
/// another's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The sender's identity.
    pub identity: Option<String>,
    /// The caller's request-id.
    pub id: String,
}

/// Request-id entries: key [`entry_key`], value JSON [`Entry`].
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("request-ids");

/// The store's file in the state directory.
pub const STORE_FILE: &str = "journal.redb";
/// The lock file in the state directory.
pub const LOCK_FILE: &str = "lock";

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another process holds the state directory.
    #[error(
        "the state directory is in use: {lock} is locked by another qga-bridge{holder}; \
         give each bridge its own --state-dir"
    )]
    Locked {
        /// The lock file.
        lock: PathBuf,
        /// ` (pid N)` when the holder wrote its pid.
        holder: String,
    },
    /// The state directory or a file in it cannot be made or opened.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The store cannot be read: corrupt, or written by an incompatible version.
    #[error(
        "the journal {path} cannot be read ({reason}); the bridge will not start without \
         it: move it away to start with an empty journal (retries of earlier request-ids \
         then run again)"
    )]
    Unreadable {
        /// The store's file.
        path: PathBuf,
        /// What the store said.
        reason: String,
    },
    /// A read or write of the open store failed.
    #[error("journal {path}: {reason}")]
    Store {
        /// The store's file.
        path: PathBuf,
        /// What the store said.
        reason: String,
    },
}

/// The journal's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries kept per VM (`hotplug.max_request_ids`).
    pub per_vm: usize,
    /// Entries older than this are dropped (`hotplug.request_id_ttl_s`).
    pub ttl: Duration,
    /// Entries in all.
    pub max_entries: usize,
}

impl Retention {
    /// Entries in all: enough for 64 VMs' full request-id history at the default
    /// bound, a few MiB of store.
    pub const MAX_ENTRIES: usize = 16_384;
}

/// Where an operation with a request-id stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Running in the bridge that wrote it.
    Running,
    /// Found running by a later bridge: the one that ran it stopped during it.
    Interrupted,
    /// Ended with this outcome (the hotplug layer's, as JSON).
    Ended(serde_json::Value),
}

/// One request-id's entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    /// When it was written, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The operation's method.
    pub method: String,
    /// The operation's arguments, as its audit line shows them.
    pub args: serde_json::Value,
    /// Where it stands.
    pub state: State,
}

/// The journal. See the module docs.
#[derive(Debug, Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
    limits: Retention,
    /// Keys of the operations running in this process.
    live: Mutex<HashSet<String>>,
    /// Interrupted operations not yet recovered: raw key and entry.
    recovering: Mutex<Vec<(String, Entry)>>,
    /// Held open while the journal is: the state directory's lock.
    _lock: File,
}

/// The table key of `key` on VM `vm`: NUL never occurs in VM names, identities or
/// request-ids, so one VM's entries form one key range.
fn entry_key(vm: &str, key: &Key) -> String {
    format!(
        "{vm}\0{}\0{}",
        key.identity.as_deref().unwrap_or(""),
        key.id
    )
}

/// The range of VM `vm`'s keys.
fn vm_range(vm: &str) -> (String, String) {
    (format!("{vm}\0"), format!("{vm}\u{1}"))
}

/// The first character of the ids of [`Journal::own_key`].
const OWN: char = '\u{1}';

/// Milliseconds since the Unix epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Entries written before this are expired.
fn horizon(ttl: Duration) -> u64 {
    now().saturating_sub(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// Takes the state directory's lock, writing our pid into it.
fn take_lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or_else(String::new, |pid| format!(" (pid {pid})"));
            return Err(JournalError::Locked { lock: path, holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

impl Journal {
    /// Opens (creating if need be) the journal in state directory `dir`, taking its lock,
    /// checking every entry reads back and marking entries left running as interrupted.
    pub fn open(dir: &Path, limits: Retention) -> Result<Self, JournalError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| JournalError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let lock = take_lock(dir)?;
        let path = dir.join(STORE_FILE);
        // Made 0600 first (redb would leave it to the umask); an empty file is a new store.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
        let db = Database::create(&path).map_err(|e| JournalError::Unreadable {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let journal = Self {
            inner: Arc::new(Inner {
                db,
                path,
                limits,
                live: Mutex::new(HashSet::new()),
                recovering: Mutex::new(Vec::new()),
                _lock: lock,
            }),
        };
        journal.settle()?;
        Ok(journal)
    }

    fn store(&self, e: impl Into<redb::Error>) -> JournalError {
        JournalError::Store {
            path: self.inner.path.clone(),
            reason: e.into().to_string(),
        }
    }

    fn unreadable(&self, reason: String) -> JournalError {
        JournalError::Unreadable {
            path: self.inner.path.clone(),
            reason,
        }
    }

    /// An entry as stored.
    fn encode(&self, entry: &Entry) -> Result<Vec<u8>, JournalError> {
        serde_json::to_vec(entry).map_err(|e| self.unreadable(e.to_string()))
    }

    /// An entry read back; one that does not decode makes the journal unreadable.
    fn decode(&self, key: &str, bytes: &[u8]) -> Result<Entry, JournalError> {
        serde_json::from_slice(bytes)
            .map_err(|e| self.unreadable(format!("entry {key:?} does not decode: {e}")))
    }

    /// At open: both tables exist from now on and every entry must decode; running ones
    /// become interrupted, expired ones and those past the bound in all go.
    fn settle(&self) -> Result<(), JournalError> {
        let txn = self.inner.db.begin_write().map_err(|e| self.store(e))?;
        {
            txn.open_table(desired::DIMMS).map_err(|e| self.store(e))?;
            let mut table = txn.open_table(REQUESTS).map_err(|e| self.store(e))?;
            let mut entries = Vec::new();
            for item in table.iter().map_err(|e| self.store(e))? {
                let (k, v) = item.map_err(|e| self.store(e))?;
                let entry = self.decode(k.value(), v.value())?;
                entries.push((k.value().to_string(), entry));
            }
            let horizon = horizon(self.inner.limits.ttl);
            entries.sort_by_key(|(_, e)| std::cmp::Reverse(e.at_ms));
            for (i, (k, mut entry)) in entries.into_iter().enumerate() {
                if entry.at_ms < horizon || i >= self.inner.limits.max_entries {
                    table.remove(k.as_str()).map_err(|e| self.store(e))?;
                    continue;
                }
                match entry.state {
                    State::Running => {
                        entry.state = State::Interrupted;
                        let bytes = self.encode(&entry)?;
                        table
                            .insert(k.as_str(), bytes.as_slice())
                            .map_err(|e| self.store(e))?;
                    }
                    State::Interrupted => {}
                    State::Ended(_) => continue,
                }
                lock(&self.inner.recovering).push((k, entry));
            }
        }
        txn.commit().map_err(|e| self.store(e))?;
        // The desired memory must read back too.
        self.wanted::<serde_json::Value>().map(drop)
    }

    /// The entry of `key` on VM `vm`, if it has one (and it has not expired).
    pub fn lookup(&self, vm: &str, key: &Key) -> Result<Option<Entry>, JournalError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.store(e))?;
        let table = txn.open_table(REQUESTS).map_err(|e| self.store(e))?;
        let k = entry_key(vm, key);
        let Some(v) = table.get(k.as_str()).map_err(|e| self.store(e))? else {
            return Ok(None);
        };
        let entry = self.decode(&k, v.value())?;
        let horizon = horizon(self.inner.limits.ttl);
        Ok((entry.at_ms >= horizon).then_some(entry))
    }

    /// Operations an earlier bridge stopped during and that are not recovered yet, by VM:
    /// (VM, raw key, entry).
    pub fn interrupted(&self) -> Vec<(String, String, Entry)> {
        lock(&self.inner.recovering)
            .iter()
            .map(|(k, e)| {
                let vm = k.split('\0').next().unwrap_or_default().to_string();
                (vm, k.clone(), e.clone())
            })
            .collect()
    }

    /// The operations on VM `vm` an earlier bridge stopped during and that are not
    /// recovered yet: (raw key, entry).
    pub fn interrupted_on(&self, vm: &str) -> Vec<(String, Entry)> {
        self.interrupted()
            .into_iter()
            .filter(|(v, _, _)| v == vm)
            .map(|(_, raw, entry)| (raw, entry))
            .collect()
    }

    /// The raw key of `key` on VM `vm`, as [`Journal::interrupted`] names entries.
    pub fn raw_key(vm: &str, key: &Key) -> String {
        entry_key(vm, key)
    }

    /// Records the final outcome of interrupted operation `raw` (from
    /// [`Journal::interrupted`]): a retry of its request-id gets it from now on. Once
    /// only: `false`, and nothing written, when `raw` is not awaiting recovery (any more).
    pub async fn recovered(&self, raw: &str, entry: Entry) -> Result<bool, JournalError> {
        if !lock(&self.inner.recovering).iter().any(|(k, _)| k == raw) {
            return Ok(false);
        }
        // Nobody can retry an operation sent without a request-id: it just goes.
        let own = raw
            .rsplit('\0')
            .next()
            .is_some_and(|id| id.starts_with(OWN));
        self.put_raw(raw.to_string(), (!own).then_some(entry))
            .await?;
        lock(&self.inner.recovering).retain(|(k, _)| k != raw);
        Ok(true)
    }

    /// Whether the operation under `key` on VM `vm` runs in this process.
    pub fn live(&self, vm: &str, key: &Key) -> bool {
        lock(&self.inner.live).contains(&entry_key(vm, key))
    }

    /// Records that operation `method` with `args` runs now on VM `vm` under `key`:
    /// durable when this returns.
    pub async fn begin(
        &self,
        vm: &str,
        key: &Key,
        method: &str,
        args: serde_json::Value,
    ) -> Result<(), JournalError> {
        let entry = Entry {
            at_ms: now(),
            method: method.to_string(),
            args,
            state: State::Running,
        };
        lock(&self.inner.live).insert(entry_key(vm, key));
        let written = self.put_raw(entry_key(vm, key), Some(entry)).await;
        if written.is_err() {
            lock(&self.inner.live).remove(&entry_key(vm, key));
        }
        written
    }

    /// A key for an operation sent without a request-id: its intent is journaled too (a
    /// bridge killed during it must leave a trace for recovery), under an id no caller
    /// can send (request-ids are printable ASCII), and forgotten when it ends.
    pub fn own_key() -> Key {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Key {
            identity: None,
            id: format!("{OWN}op-{}-{n}", now()),
        }
    }

    /// Forgets the operation under `key` on VM `vm` (one without a request-id, ended).
    pub async fn forget(&self, vm: &str, key: &Key) -> Result<(), JournalError> {
        self.finish(vm, key, None).await
    }

    /// Records how operation `method` with `args` under `key` on VM `vm` ended: with
    /// `outcome` if it is final, else its entry goes (a retry runs it again).
    pub async fn end(
        &self,
        vm: &str,
        key: &Key,
        (method, args): (&str, serde_json::Value),
        outcome: Option<serde_json::Value>,
    ) -> Result<(), JournalError> {
        let entry = outcome.map(|outcome| Entry {
            at_ms: now(),
            method: method.to_string(),
            args,
            state: State::Ended(outcome),
        });
        self.finish(vm, key, entry).await
    }

    /// Writes (or removes) the entry of an operation that ended in this process.
    async fn finish(&self, vm: &str, key: &Key, entry: Option<Entry>) -> Result<(), JournalError> {
        let written = self.put_raw(entry_key(vm, key), entry).await;
        lock(&self.inner.live).remove(&entry_key(vm, key));
        written
    }

    /// Runs `change` in one durable write transaction, on the blocking pool (a commit
    /// waits for fsync).
    async fn write<F>(&self, change: F) -> Result<(), JournalError>
    where
        F: FnOnce(&Self, &redb::WriteTransaction) -> Result<(), JournalError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let txn = this.inner.db.begin_write().map_err(|e| this.store(e))?;
            change(&this, &txn)?;
            txn.commit().map_err(|e| this.store(e))
        })
        .await
        .map_err(|e| JournalError::Store {
            path: self.inner.path.clone(),
            reason: format!("the journal's writer failed: {e}"),
        })?
    }

    /// Writes (or with `None` removes) the entry of raw key `k` and applies the bounds of
    /// its VM, in one durable transaction.
    async fn put_raw(&self, k: String, entry: Option<Entry>) -> Result<(), JournalError> {
        let vm = k.split('\0').next().unwrap_or_default().to_string();
        self.write(move |j, txn| {
            let mut table = txn.open_table(REQUESTS).map_err(|e| j.store(e))?;
            match entry {
                Some(entry) => {
                    let bytes = j.encode(&entry)?;
                    table
                        .insert(k.as_str(), bytes.as_slice())
                        .map_err(|e| j.store(e))?;
                }
                None => {
                    table.remove(k.as_str()).map_err(|e| j.store(e))?;
                }
            }
            j.bound(&mut table, &vm)
        })
        .await
    }

    /// Drops VM `vm`'s expired entries and its oldest past the per-VM bound, then the
    /// oldest of all past the bound in all.
    fn bound(&self, table: &mut redb::Table<&str, &[u8]>, vm: &str) -> Result<(), JournalError> {
        let limits = self.inner.limits;
        let horizon = horizon(limits.ttl);
        let (from, to) = vm_range(vm);
        let mut mine = ages(self, table.range(from.as_str()..to.as_str()))?;
        mine.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
        for (i, (k, at)) in mine.iter().enumerate() {
            if *at < horizon || i >= limits.per_vm {
                table.remove(k.as_str()).map_err(|e| self.store(e))?;
            }
        }
        let total = table.len().map_err(|e| self.store(e))?;
        if usize::try_from(total).unwrap_or(usize::MAX) > limits.max_entries {
            let mut all = ages(self, table.iter())?;
            all.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
            for (k, _) in all.iter().skip(limits.max_entries) {
                table.remove(k.as_str()).map_err(|e| self.store(e))?;
            }
        }
        Ok(())
    }
}

/// Keys and write times of the entries `range` yields.
fn ages<'a>(
    journal: &Journal,
    range: Result<redb::Range<'a, &'static str, &'static [u8]>, redb::StorageError>,
) -> Result<Vec<(String, u64)>, JournalError> {
    let mut out = Vec::new();
    for item in range.map_err(|e| journal.store(e))? {
        let (k, v) = item.map_err(|e| journal.store(e))?;
        let at = journal.decode(k.value(), v.value())?.at_ms;
        out.push((k.value().to_string(), at));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits(per_vm: usize, max_entries: usize) -> Retention {
        Retention {
            per_vm,
            ttl: Duration::from_secs(3600),
            max_entries,
        }
    }

    fn key(id: &str) -> Key {
        Key {
            identity: Some("ops".into()),
            id: id.into(),
        }
    }

    fn plug(size: u64) -> (&'static str, serde_json::Value) {
        ("memory-plug", json!({ "size": size }))
    }

    fn missing(dimm: &str) -> Option<serde_json::Value> {
        Some(json!({ "dimm-not-found": { "dimm": dimm } }))
    }

    #[tokio::test]
    async fn outcomes_read_back_after_reopening_and_running_ones_are_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let j = Journal::open(dir.path(), limits(8, 64)).expect("open");
            let (m, a) = plug(1);
            j.begin("vm", &key("a"), m, a).await.expect("begin");
            j.end("vm", &key("a"), plug(1), missing("d1"))
                .await
                .expect("end");
            let (m, a) = plug(2);
            j.begin("vm", &key("b"), m, a).await.expect("begin");
            assert!(j.live("vm", &key("b")));
            // An outcome that is not final is not kept: the retry runs.
            let (m, a) = plug(3);
            j.begin("vm", &key("c"), m, a).await.expect("begin");
            j.end("vm", &key("c"), plug(3), None).await.expect("end");
        }
        let j = Journal::open(dir.path(), limits(8, 64)).expect("reopen");
        let a = j.lookup("vm", &key("a")).expect("read").expect("kept");
        assert_eq!((a.method.as_str(), a.args.clone()), plug(1));
        assert_eq!(
            a.state,
            State::Ended(json!({"dimm-not-found": {"dimm": "d1"}}))
        );
        let b = j.lookup("vm", &key("b")).expect("read").expect("kept");
        assert_eq!(b.state, State::Interrupted);
        assert!(!j.live("vm", &key("b")));
        assert_eq!(j.lookup("vm", &key("c")).expect("read"), None);
        // Scoped per VM and per identity.
        assert_eq!(j.lookup("other", &key("a")).expect("read"), None);
        let anonymous = Key {
            identity: None,
            id: "a".into(),
        };
        assert_eq!(j.lookup("vm", &anonymous).expect("read"), None);
    }

    #[tokio::test]
    async fn an_interrupted_operation_is_recovered_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let j = Journal::open(dir.path(), limits(8, 64)).expect("open");
            let (m, a) = plug(1);
            j.begin("vm", &key("a"), m, a).await.expect("begin");
        }
        let j = Journal::open(dir.path(), limits(8, 64)).expect("reopen");
        let pending = j.interrupted_on("vm");
        assert_eq!(pending.len(), 1);
        assert!(j.interrupted_on("other").is_empty());
        let (raw, entry) = pending[0].clone();
        assert_eq!(raw, Journal::raw_key("vm", &key("a")));
        let first = Entry {
            state: State::Ended(json!({"dimm-not-found": {"dimm": "d1"}})),
            ..entry.clone()
        };
        assert!(j.recovered(&raw, first.clone()).await.expect("recorded"));
        assert!(j.interrupted_on("vm").is_empty());
        // A second recovery (a pass that read the list before) changes nothing.
        let second = Entry {
            state: State::Ended(json!({"dimm-not-found": {"dimm": "d2"}})),
            ..entry
        };
        assert!(!j.recovered(&raw, second).await.expect("read"));
        let kept = j.lookup("vm", &key("a")).expect("read").expect("kept");
        assert_eq!(kept.state, first.state);
    }

    #[tokio::test]
    async fn bounded_per_vm_and_in_all_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path(), limits(3, 5)).expect("open");
        for i in 0..5u64 {
            let id = format!("r{i}");
            j.end("vm", &key(&id), plug(i), missing("x"))
                .await
                .expect("end");
        }
        let kept: Vec<bool> = (0..5)
            .map(|i| {
                j.lookup("vm", &key(&format!("r{i}")))
                    .expect("read")
                    .is_some()
            })
            .collect();
        // Three are kept (entries written within one millisecond may tie on age).
        assert_eq!(kept.iter().filter(|k| **k).count(), 3, "{kept:?}");
        for vm in ["a", "b", "c"] {
            for i in 0..3u64 {
                j.end(vm, &key(&format!("r{i}")), plug(i), missing("x"))
                    .await
                    .expect("end");
            }
        }
        let txn = j.inner.db.begin_read().expect("read");
        let n = txn.open_table(REQUESTS).expect("table").len().expect("len");
        assert!(n <= 5, "{n} entries");
    }

    #[test]
    fn one_journal_per_directory_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Journal::open(dir.path(), limits(8, 64)).expect("open");
        let err = Journal::open(dir.path(), limits(8, 64)).expect_err("locked");
        assert!(
            matches!(&err, JournalError::Locked { holder, .. } if holder.contains(&std::process::id().to_string())),
            "{err}"
        );
        drop(first);
        Journal::open(dir.path(), limits(8, 64)).expect("free again");
        let other = tempfile::tempdir().expect("tempdir");
        std::fs::write(other.path().join(STORE_FILE), vec![0x5a; 8192]).expect("write");
        let err = Journal::open(other.path(), limits(8, 64)).expect_err("unreadable");
        assert!(matches!(err, JournalError::Unreadable { .. }), "{err}");
    }
}
