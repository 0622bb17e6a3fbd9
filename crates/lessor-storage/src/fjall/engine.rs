//! One fjall database in one directory, as both fjall stores use it: opening (format marker, lock, version
//! checks), atomic group writes with the configured [`Durability`], and the failure rules.
//!
//! Failure rules, in the order the issue asks for them:
//! - A failed fsync poisons the engine for good: the kernel may have dropped the dirty pages, so a later fsync that
//!   succeeds proves nothing. Every later write gets [`StorageErrorKind::Poisoned`] until the process restarts.
//! - A failed write (disk full, an I/O error on `write`) leaves fjall refusing writes too, but nothing is lost: the
//!   journal on disk holds every acknowledged batch. The engine marks itself broken and reopens the database
//!   (replaying the journal) before the next write, at most once per [`REOPEN_BACKOFF`], so writes resume by
//!   themselves once space is back. Disk full maps to [`StorageErrorKind::NoSpace`].
//! - fjall also stops writing when one of its background threads fails (a flush or compaction). The engine cannot
//!   see why; when the disk is nearly full it treats the stop as "disk full" (reopen later), otherwise as poison,
//!   because the background failure may have been a journal fsync.
//!
//! Pipelined group commit (durability `sync`): a group is written and handed to the OS under the write lock and
//! gets a sequence number ([`Engine::write_group`]); it is acknowledged only once an fsync that started after it
//! was written has succeeded ([`Engine::wait_durable`]). The fsync runs on the journal file through a descriptor of
//! our own, outside fjall's journal lock, so the next group is written while the previous fsync runs: throughput is
//! bounded by fsync bandwidth, not by fsync latency times rounds. Whoever waits first becomes the one who fsyncs,
//! up to the highest sequence written at that moment, and releases every waiter it covers. A failed fsync poisons:
//! every waiter not covered by an earlier successful fsync gets the error.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use lessor_core::error::{StorageError, StorageErrorKind};

use super::Durability;

/// The marker file naming what a database directory holds and in which format.
pub(crate) const FORMAT_FILE: &str = "LESSOR-FORMAT";
/// Shortest pause between two reopen attempts for writes after a failed write.
pub(crate) const REOPEN_BACKOFF: Duration = Duration::from_secs(1);
/// A write or fsync taking this long is logged (at debug level) with what it spent the time on.
const SLOW_WRITE: Duration = Duration::from_millis(10);
/// Free space under which a background failure of fjall is taken for a full disk.
const LOW_SPACE: u64 = 64 * 1024 * 1024;

/// A failure to inject, for tests of the failure rules (see [`super::FjallStore::inject_fault`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every write fails as if the disk were full, before anything reaches the journal, until cleared.
    NoSpace,
    /// The next fsync fails with an I/O error.
    SyncFails,
}

/// One atomic change to one keyspace: `puts`, then `dels` and `once_dels`, each key at most once.
pub(crate) struct Unit {
    pub(crate) keyspace: Arc<str>,
    pub(crate) puts: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) dels: Vec<Vec<u8>>,
    /// Deletions of keys that are written at most once in the store's life (an item's payload). They are written
    /// as fjall's weak tombstones, which vanish together with the value they meet in a flush or compaction: an
    /// item produced and completed within one memtable leaves nothing of its payload on disk, where a tombstone
    /// would be flushed and carried down every level. On a key written twice, a weak tombstone could bring the
    /// older value back, hence the rule.
    pub(crate) once_dels: Vec<Vec<u8>>,
}

struct State {
    /// The open database; `None` after a failed reopen or after close.
    db: Option<Database>,
    /// Keyspace handles of `db`, so writes do not look them up each time. Cleared whenever `db` is.
    keyspaces: HashMap<Arc<str>, Keyspace>,
    /// Why the database must be reopened before the next write.
    broken: Option<StorageError>,
    /// No reopen for writes before this instant.
    retry_at: Option<Instant>,
    closed: bool,
}

/// A test hook run before each pipelined fsync.
#[cfg(test)]
type FsyncHook = Box<dyn Fn(u64) + Send>;

/// Progress of the pipelined fsyncs (see the module doc).
#[derive(Default)]
struct SyncProgress {
    /// Every group with a sequence up to this one is covered by a successful fsync.
    synced: u64,
    /// An fsync is running (its caller updates `synced` and wakes the others).
    syncing: bool,
}

/// What [`Engine::write_group`] did: one result per unit, and the sequence to wait for before acknowledging the
/// successful ones (`None`: nothing needs an fsync, answer now).
pub(crate) struct Written {
    pub(crate) results: Vec<Result<(), StorageError>>,
    pub(crate) seq: Option<u64>,
}

/// A reference to a memtable of fjall, held so that Lessor, not fjall, frees it (see [`Memtables`]).
type HeldMemtable = Arc<dyn std::any::Any + Send + Sync>;

/// The memtables Lessor holds on to. fjall frees a flushed memtable when the last version that names it is
/// dropped, and it drops old versions while holding a keyspace's version lock during the next memtable rotation;
/// every write needs that lock, so freeing a 64 MiB memtable (millions of small allocations) stopped every write
/// for 50 ms to more than a second (docs/benchmarks.md, "fjall: CPU per item and stalls"). Holding one more
/// reference to each memtable until fjall has let go of it moves that work to the `lessor-memfree` thread,
/// outside every lock of fjall.
#[derive(Default)]
struct Memtables {
    /// Per keyspace: the id of the active memtable seen after the last write, and the memtable.
    active: HashMap<Arc<str>, (u64, HeldMemtable)>,
    /// Memtables that have been rotated out; freed once nobody else holds them.
    retired: Vec<HeldMemtable>,
}

/// How often the reaper looks for retired memtables that fjall has let go of.
const REAP_EVERY: Duration = Duration::from_millis(50);

/// The interval fsync thread: dropping the sender wakes and stops it.
struct Syncer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// One fjall database and its failure state.
pub(crate) struct Engine {
    /// What this engine serves, for messages ("partition store", "queue store").
    label: &'static str,
    /// The configured storage-dir, for messages.
    storage_dir: PathBuf,
    /// The database directory inside it.
    dir: PathBuf,
    durability: Durability,
    keyspace_options: fn() -> KeyspaceCreateOptions,
    state: Mutex<State>,
    /// Serialises write groups, so a failure is classified before the next group starts.
    write_lock: Mutex<()>,
    /// Set once after a failed fsync; every later write gets this error.
    poison: OnceLock<StorageError>,
    /// Mirrors `state.broken.is_some()` for a lock-free check on the hot path.
    broken: AtomicBool,
    /// Writes handed to the OS since the last fsync (interval mode).
    dirty: AtomicBool,
    /// fsyncs done, to show that concurrent writes share them.
    fsyncs: AtomicU64,
    /// Sequence of the last group handed to the OS (durability `sync`); assigned under `write_lock`.
    written: AtomicU64,
    sync: Mutex<SyncProgress>,
    /// Signalled whenever an fsync ends.
    synced_cv: Condvar,
    /// The journal file being fsynced (its id and our descriptor), used only by the one fsyncing.
    journal: Mutex<Option<(u64, fs::File)>>,
    /// Test hook, called just before each pipelined fsync with the sequence it will cover.
    #[cfg(test)]
    before_fsync: Mutex<Option<FsyncHook>>,
    fault: Mutex<Option<Fault>>,
    syncer: Mutex<Option<Syncer>>,
    /// Memtables held so that they are freed outside fjall's locks.
    memtables: Mutex<Memtables>,
    /// The thread that frees them (same shape as the interval fsync thread).
    reaper: Mutex<Option<Syncer>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("label", &self.label)
            .field("dir", &self.dir)
            .field("durability", &self.durability)
            .field("poisoned", &self.poison.get().is_some())
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .finish()
    }
}

/// A tuning override from the environment, for benchmarks of fjall's settings (docs/benchmarks.md, "fjall: CPU
/// per item and stalls"): not a supported setting. `None` when unset or not a number.
/// fjall worker threads (see `Engine::open_db`).
const FJALL_WORKERS: usize = 4;

pub(crate) fn tuning(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, never a half-done fjall call: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Opens (creating on first use) the database `<storage_dir>/<sub>` holding a `kind` store. A new directory
    /// gets `format.current`; an existing one must be at `format.current` or one of `format.upgradable`. Returns
    /// the engine and the version found on disk, so the caller can upgrade an older layout.
    pub(crate) fn open(
        storage_dir: &Path,
        sub: &str,
        kind: &'static str,
        label: &'static str,
        durability: Durability,
        keyspace_options: fn() -> KeyspaceCreateOptions,
        format: Formats,
    ) -> Result<(Arc<Engine>, u32), StorageError> {
        let dir = storage_dir.join(sub);
        fs::create_dir_all(&dir).map_err(|e| {
            let kind = if is_no_space(&e) {
                StorageErrorKind::NoSpace
            } else {
                StorageErrorKind::Config
            };
            StorageError::new(
                kind,
                format!("cannot create storage-dir '{}': {e}", dir.display()),
            )
        })?;
        let found = check_format(&dir, kind, format)?;
        let engine = Engine {
            label,
            storage_dir: storage_dir.to_path_buf(),
            dir,
            durability,
            keyspace_options,
            state: Mutex::new(State {
                db: None,
                keyspaces: HashMap::new(),
                broken: None,
                retry_at: None,
                closed: false,
            }),
            write_lock: Mutex::new(()),
            poison: OnceLock::new(),
            broken: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            written: AtomicU64::new(0),
            sync: Mutex::new(SyncProgress::default()),
            synced_cv: Condvar::new(),
            journal: Mutex::new(None),
            #[cfg(test)]
            before_fsync: Mutex::new(None),
            fault: Mutex::new(None),
            syncer: Mutex::new(None),
            memtables: Mutex::new(Memtables::default()),
            reaper: Mutex::new(None),
        };
        let db = engine.open_db()?;
        lock(&engine.state).db = Some(db);
        let engine = Arc::new(engine);
        if let Durability::Interval(every) = durability {
            start_syncer(&engine, every)?;
        }
        start_reaper(&engine)?;
        Ok((engine, found))
    }

    /// Records that the directory now holds `version` of its format (after an upgrade). Atomic.
    pub(crate) fn set_format_version(&self, kind: &str, version: u32) -> Result<(), StorageError> {
        write_marker(&self.dir, kind, version).map_err(|e| io_error(&self.dir, &e))
    }

    /// The open database, for whole-store maintenance (upgrades). Blocking callers only.
    pub(crate) fn database(&self) -> Result<Database, StorageError> {
        let mut st = lock(&self.state);
        self.reopen_if_broken(&mut st, false)?;
        st.db.clone().ok_or_else(|| self.closed_error())
    }

    /// fsyncs everything written so far (journal and data), whatever the durability mode. Blocking.
    pub(crate) fn sync_all(&self) -> Result<(), StorageError> {
        let db = self.database()?;
        db.persist(PersistMode::SyncAll).map_err(|e| self.write_failed(e))
    }

    /// Drops the on-disk tables of keyspace `name` that hold only keys in `[lo, hi)`: whole files go at once,
    /// without writing a tombstone per key. Only for key ranges nothing reads or writes any more. Blocking.
    pub(crate) fn drop_range(&self, name: &str, lo: &[u8], hi: &[u8]) -> Result<(), StorageError> {
        let Some(ks) = self.keyspace(name, false)? else {
            return Ok(());
        };
        ks.tree
            .drop_range(lo..hi)
            .map_err(|e| self.error(fjall::Error::Storage(e), "dropping a key range of"))
    }

    /// The configured durability mode.
    pub(crate) fn durability(&self) -> Durability {
        self.durability
    }

    /// fsyncs the journal now, whatever the durability mode (writes that must be durable at once, such as auth
    /// changes, in the modes that do not fsync each write). A failure poisons the engine, as in `commit_group`.
    /// Blocking.
    pub(crate) fn sync_journal(&self) -> Result<(), StorageError> {
        let _w = lock(&self.write_lock);
        if let Some(e) = self.poison.get() {
            return Err(e.clone());
        }
        let db = self.database()?;
        db.persist(PersistMode::Buffer)
            .map_err(|e| self.write_failed(e))?;
        self.fsync(&db)
    }

    /// The database directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn open_db(&self) -> Result<Database, StorageError> {
        // fjall's worker pool: 4 threads whatever the machine, where fjall's own default is one per core up to 4.
        // Its worker 0 hands every compaction request it receives back to the pool, to stay free for flushes, and
        // with two workers it takes that request straight back while the other one compacts: a busy loop for as
        // long as the compaction runs, 5 % of a 10-s pipeline's CPU on 2 cores and up to 18 % in longer runs
        // (docs/benchmarks.md, "fjall's worker pool"). With three others to take the request, it goes on at once.
        // The extra threads sleep when there is nothing to flush or compact. LESSOR_FJALL_WORKERS overrides this
        // for measurements.
        let workers =
            tuning("LESSOR_FJALL_WORKERS").map_or(FJALL_WORKERS, |n| usize::try_from(n).unwrap_or(1).max(1));
        Database::builder(&self.dir)
            .worker_threads(workers)
            // Lessor decides when the journal is flushed and fsynced (see `commit_group`).
            .manual_journal_persist(true)
            // Reads happen once per partition open (a scan): a large block cache would only hold cold data.
            .cache_size(8 * 1024 * 1024)
            // The journal is replayed at start-up: keep it short. Reaching this size also makes fjall flush the
            // memtables that pin the oldest journal, which bounds the second copy of the items (the first is in
            // PartitionState) held in memtables.
            .max_journaling_size(128 * 1024 * 1024)
            .open()
            .map_err(|e| self.open_error(e))
    }

    /// Maps an error of opening or reading.
    fn open_error(&self, e: fjall::Error) -> StorageError {
        match e {
            fjall::Error::Locked => StorageError::new(
                StorageErrorKind::Locked,
                format!(
                    "storage-dir '{}' is in use: another process holds the lock of the {} at '{}' (is another \
                     lessor server running on this storage-dir?)",
                    self.storage_dir.display(),
                    self.label,
                    self.dir.join("lock").display()
                ),
            ),
            fjall::Error::InvalidVersion(v) => StorageError::new(
                StorageErrorKind::Corrupt,
                format!(
                    "the {} at '{}' has fjall disk format {v:?}, this build reads fjall format V3",
                    self.label,
                    self.dir.display()
                ),
            ),
            other => self.error(other, "reading"),
        }
    }

    /// Maps an error by what it says, without changing the engine's state.
    fn error(&self, e: fjall::Error, doing: &str) -> StorageError {
        let what = format!("{} at '{}'", self.label, self.dir.display());
        let io = find_io(&e).map(|io| {
            let kind = if is_no_space(io) {
                StorageErrorKind::NoSpace
            } else {
                StorageErrorKind::Unavailable
            };
            let hint = if kind == StorageErrorKind::NoSpace {
                "disk full; writes resume once space is freed"
            } else {
                "I/O error"
            };
            (kind, format!("{hint} {doing} the {what}: {io}"))
        });
        if let Some((kind, message)) = io {
            return StorageError::new(kind, message).with_source(e);
        }
        let kind = match e {
            fjall::Error::Poisoned => StorageErrorKind::Poisoned,
            fjall::Error::Locked => StorageErrorKind::Locked,
            fjall::Error::JournalRecovery(_)
            | fjall::Error::InvalidVersion(_)
            | fjall::Error::Decompress(_)
            | fjall::Error::InvalidTrailer
            | fjall::Error::InvalidTag(_)
            | fjall::Error::Unrecoverable
            | fjall::Error::Storage(_) => StorageErrorKind::Corrupt,
            _ => StorageErrorKind::Other,
        };
        StorageError::new(kind, format!("{doing} the {what} failed: {e}")).with_source(e)
    }

    /// Maps an error of reading stored records.
    pub(crate) fn read_error(&self, e: fjall::Error) -> StorageError {
        self.error(e, "reading")
    }

    fn closed_error(&self) -> StorageError {
        StorageError::unavailable(format!(
            "the {} at '{}' is closed",
            self.label,
            self.dir.display()
        ))
    }

    /// Whether writes need the slow path of [`Engine::check_writable`].
    pub(crate) fn needs_check(&self) -> bool {
        self.poison.get().is_some() || self.broken.load(Ordering::Acquire)
    }

    /// Fails when writes are refused now: after a failed fsync, or while a broken database cannot be reopened yet.
    /// Blocking (it may reopen the database).
    pub(crate) fn check_writable(&self) -> Result<(), StorageError> {
        if let Some(e) = self.poison.get() {
            return Err(e.clone());
        }
        let mut st = lock(&self.state);
        self.reopen_if_broken(&mut st, true)
    }

    /// Reopens the database when a failed write broke it. `backoff`: honour [`REOPEN_BACKOFF`] (writes do; reads,
    /// which need a database that matches the disk, do not).
    fn reopen_if_broken(&self, st: &mut State, backoff: bool) -> Result<(), StorageError> {
        if st.closed {
            return Err(self.closed_error());
        }
        let Some(why) = st.broken.clone() else {
            return Ok(());
        };
        if backoff && st.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(why);
        }
        // Every handle must go before fjall releases its lock file and a new instance can take it.
        st.keyspaces.clear();
        st.db = None;
        *lock(&self.memtables) = Memtables::default();
        // The reopened database may start a new journal file, and our fsyncs cover only the newest one (fjall syncs
        // a journal before it rotates, not before a reopen): groups written before the failure and still waiting for
        // their fsync would then be acknowledged by an fsync of the new file. Every journal file is synced here
        // first; if that fails, nothing written can be vouched for any more.
        if let Err(e) = sync_journals(&self.dir) {
            return Err(self.poison(format!("fsync of the journal before a reopen failed ({e})")));
        }
        *lock(&self.journal) = None;
        match self.open_db() {
            Ok(db) => {
                st.db = Some(db);
                st.broken = None;
                st.retry_at = None;
                self.broken.store(false, Ordering::Release);
                tracing::info!(dir = %self.dir.display(), store = self.label, "storage reopened after a failed write");
                Ok(())
            }
            Err(e) => {
                st.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
                tracing::warn!(dir = %self.dir.display(), store = self.label, error = %e, "storage reopen failed");
                if e.kind == StorageErrorKind::Locked {
                    // Our own readers still hold the old instance: a later attempt will do.
                    return Err(StorageError::unavailable(format!(
                        "the {} at '{}' is reopening after a failed write ({}); try again",
                        self.label,
                        self.dir.display(),
                        why.message
                    )));
                }
                Err(e)
            }
        }
    }

    /// The handle of keyspace `name`, creating it when `create` is set; `None` when it does not exist. Blocking.
    pub(crate) fn keyspace(&self, name: &str, create: bool) -> Result<Option<Keyspace>, StorageError> {
        let db = {
            let mut st = lock(&self.state);
            self.reopen_if_broken(&mut st, false)?;
            if let Some(ks) = st.keyspaces.get(name) {
                return Ok(Some(ks.clone()));
            }
            let Some(db) = st.db.clone() else {
                return Err(self.closed_error());
            };
            db
        };
        if !create && !db.keyspace_exists(name) {
            return Ok(None);
        }
        // Creating a keyspace fsyncs: do it without holding the state lock.
        let ks = db
            .keyspace(name, self.keyspace_options)
            .map_err(|e| self.error(e, "opening a keyspace of"))?;
        Ok(Some(ks))
    }

    /// Writes `units` as one atomic batch and makes it as durable as the configured mode says. Returns one result
    /// per unit: units whose keyspace no longer exists fail alone, everything else shares the batch's fate.
    /// Blocking.
    pub(crate) fn commit_group(&self, units: Vec<Unit>) -> Vec<Result<(), StorageError>> {
        let Written { mut results, seq } = self.write_group(units);
        if let Some(seq) = seq {
            if let Err(e) = self.wait_durable(seq) {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(e.clone());
                }
            }
        }
        results
    }

    /// Writes `units` as one atomic batch and hands it to the OS, without waiting for an fsync: in durability
    /// `sync` the successful results may be acknowledged only after [`Engine::wait_durable`] of the returned
    /// sequence succeeds. The next group can be written while that fsync runs. Blocking.
    pub(crate) fn write_group(&self, units: Vec<Unit>) -> Written {
        let _w = lock(&self.write_lock);
        let n = units.len();
        let names: Vec<Arc<str>> = units.iter().map(|u| u.keyspace.clone()).collect();
        let now = |results| Written { results, seq: None };
        if let Some(e) = self.poison.get() {
            return now(vec![Err(e.clone()); n]);
        }
        let (db, handles) = {
            let mut st = lock(&self.state);
            if let Err(e) = self.reopen_if_broken(&mut st, true) {
                return now(vec![Err(e); n]);
            }
            let Some(db) = st.db.clone() else {
                return now(vec![Err(self.closed_error()); n]);
            };
            let mut handles = Vec::with_capacity(n);
            for u in &units {
                handles.push(self.resolve(&mut st, &db, &u.keyspace));
            }
            (db, handles)
        };
        let mut results: Vec<Result<(), StorageError>> = Vec::with_capacity(n);
        let mut batch = db.batch().durability(None);
        for (u, h) in units.into_iter().zip(&handles) {
            match h {
                Ok(ks) => {
                    for (k, v) in u.puts {
                        batch.insert(ks, k, v);
                    }
                    for k in u.dels {
                        batch.remove(ks, k);
                    }
                    for k in u.once_dels {
                        batch.remove_weak(ks, k);
                    }
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e.clone())),
            }
        }
        if batch.is_empty() {
            return now(results);
        }
        let outcome = self.commit_and_persist(&db, batch);
        if outcome.is_ok() {
            self.hold_memtables(&names, &handles);
        }
        drop(handles);
        drop(db);
        match outcome {
            Ok(seq) => Written { results, seq },
            Err(e) => {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(e.clone());
                }
                now(results)
            }
        }
    }

    /// Waits until an fsync covers the group written with sequence `seq`, doing the fsync itself when none is
    /// running. Fails when the engine is poisoned before such an fsync succeeded. Blocking.
    pub(crate) fn wait_durable(&self, seq: u64) -> Result<(), StorageError> {
        let mut p = lock(&self.sync);
        loop {
            if p.synced >= seq {
                return Ok(());
            }
            if let Some(e) = self.poison.get() {
                return Err(e.clone());
            }
            if p.syncing {
                p = self.synced_cv.wait(p).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            p.syncing = true;
            // Every group up to `target` is in the OS already (the sequence is taken after the hand-over).
            let target = self.written.load(Ordering::Acquire);
            drop(p);
            let res = self.fsync_journal_file(target);
            p = lock(&self.sync);
            p.syncing = false;
            if res.is_ok() {
                p.synced = p.synced.max(target);
            }
            self.synced_cv.notify_all();
        }
    }

    /// fsyncs the active journal file through our own descriptor, outside fjall's journal lock. Older journal
    /// files need nothing: fjall fsyncs a journal fully before it rotates to the next one. A failure poisons.
    fn fsync_journal_file(&self, target: u64) -> Result<(), StorageError> {
        #[cfg(test)]
        if let Some(hook) = &*lock(&self.before_fsync) {
            hook(target);
        }
        #[cfg(not(test))]
        let _ = target;
        let injected = self.take_sync_fault();
        let started = Instant::now();
        let res = if injected {
            Err(io::Error::other("injected fsync failure"))
        } else {
            self.sync_active_journal()
        };
        let took = started.elapsed();
        if took >= SLOW_WRITE {
            tracing::debug!(
                store = self.label,
                fsync_ms = took.as_secs_f64() * 1000.0,
                "slow fsync"
            );
        }
        res.map_err(|e| self.poison(format!("fsync of the journal failed ({e})")))
    }

    fn sync_active_journal(&self) -> io::Result<()> {
        let mut j = lock(&self.journal);
        // Looked at after the writes to cover were handed over: they are in the newest file or in an older, sealed
        // one. fjall names journals by increasing id, so the cached file is still the newest while no `<id+1>.jnl`
        // exists (one stat instead of a directory listing per fsync).
        let current = match &*j {
            Some((id, _)) if !self.dir.join(format!("{}.jnl", id + 1)).exists() => Some(*id),
            _ => None,
        };
        let newest = match current {
            Some(id) => id,
            None => newest_journal(&self.dir)?,
        };
        if j.as_ref().map(|(id, _)| *id) != Some(newest) {
            let f = fs::File::open(self.dir.join(format!("{newest}.jnl")))?;
            *j = Some((newest, f));
        }
        match &*j {
            Some((_, f)) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Notes the active memtable of every keyspace just written; one that changed since the last write was rotated
    /// out, and the reference held to it moves to the retired list (see [`Memtables`]).
    fn hold_memtables(&self, names: &[Arc<str>], handles: &[Result<Keyspace, StorageError>]) {
        let mut m = lock(&self.memtables);
        let mut checked: Vec<&Arc<str>> = Vec::new();
        for (name, h) in names.iter().zip(handles) {
            let Ok(ks) = h else { continue };
            // A group usually writes one keyspace many times: look at each once.
            if checked.contains(&name) {
                continue;
            }
            checked.push(name);
            let memtable = ks.tree.active_memtable();
            let id = memtable.id();
            if m.active.get(name).is_some_and(|(seen, _)| *seen == id) {
                continue;
            }
            if let Some((_, old)) = m.active.insert(name.clone(), (id, memtable)) {
                m.retired.push(old);
            }
        }
    }

    /// Frees the retired memtables nobody but Lessor holds any more, outside every lock. Called by the reaper.
    fn reap_memtables(&self) {
        let free: Vec<HeldMemtable> = {
            let mut m = lock(&self.memtables);
            let (free, keep) = std::mem::take(&mut m.retired)
                .into_iter()
                .partition(|held| Arc::strong_count(held) == 1);
            m.retired = keep;
            free
        };
        drop(free);
    }

    /// A cached keyspace handle; never creates one (a missing keyspace was destroyed).
    fn resolve(&self, st: &mut State, db: &Database, name: &Arc<str>) -> Result<Keyspace, StorageError> {
        if let Some(ks) = st.keyspaces.get(name) {
            return Ok(ks.clone());
        }
        if !db.keyspace_exists(name) {
            return Err(StorageError::other(format!(
                "keyspace '{name}' of the {} at '{}' no longer exists (destroyed)",
                self.label,
                self.dir.display()
            )));
        }
        let ks = db
            .keyspace(name, self.keyspace_options)
            .map_err(|e| self.error(e, "opening a keyspace of"))?;
        st.keyspaces.insert(name.clone(), ks.clone());
        Ok(ks)
    }

    /// Writes the batch and hands it to the OS; in durability `sync`, returns the sequence to wait for.
    fn commit_and_persist(
        &self,
        db: &Database,
        batch: fjall::OwnedWriteBatch,
    ) -> Result<Option<u64>, StorageError> {
        if *lock(&self.fault) == Some(Fault::NoSpace) {
            let e = StorageError::new(
                StorageErrorKind::NoSpace,
                format!(
                    "disk full; writes resume once space is freed (injected) writing the {} at '{}'",
                    self.label,
                    self.dir.display()
                ),
            );
            self.mark_broken(&e);
            return Err(e);
        }
        let started = Instant::now();
        let entries = batch.len();
        batch.commit().map_err(|e| self.write_failed(e))?;
        let committed = started.elapsed();
        // Hand the journal to the OS in every mode: after this a process crash loses nothing.
        db.persist(PersistMode::Buffer)
            .map_err(|e| self.write_failed(e))?;
        let total = started.elapsed();
        if total >= SLOW_WRITE {
            // The stall hunt (docs/benchmarks.md): a commit waits for fjall's journal lock (held by a memtable
            // rotation or a flush worker's journal fsync and rotation) and sleeps while 4 sealed memtables wait
            // for their flush; `RUST_LOG=fjall=debug` shows which of these fjall was doing.
            tracing::debug!(
                store = self.label,
                entries,
                commit_ms = committed.as_secs_f64() * 1000.0,
                total_ms = total.as_secs_f64() * 1000.0,
                "slow write"
            );
        }
        match self.durability {
            // Under the write lock: sequences follow the journal order.
            Durability::Sync => Ok(Some(self.written.fetch_add(1, Ordering::AcqRel) + 1)),
            Durability::Interval(_) | Durability::None => {
                self.dirty.store(true, Ordering::Release);
                Ok(None)
            }
        }
    }

    /// Counts an fsync about to run and says whether a test injected its failure (the fault fires once).
    fn take_sync_fault(&self) -> bool {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        let mut f = lock(&self.fault);
        let injected = *f == Some(Fault::SyncFails);
        if injected {
            *f = None;
        }
        injected
    }

    /// fsyncs the journal; a failure poisons the engine.
    fn fsync(&self, db: &Database) -> Result<(), StorageError> {
        let injected = self.take_sync_fault();
        let res = if injected {
            Err(fjall::Error::Io(io::Error::other("injected fsync failure")))
        } else {
            db.persist(PersistMode::SyncData)
        };
        match res {
            Ok(()) => Ok(()),
            Err(fjall::Error::Poisoned) => Err(self.write_failed(fjall::Error::Poisoned)),
            Err(e) => Err(self.poison(format!("fsync of the journal failed ({e})"))),
        }
    }

    /// Classifies a failed write (the journal append or its hand-over to the OS) and records it.
    fn write_failed(&self, e: fjall::Error) -> StorageError {
        if matches!(e, fjall::Error::Poisoned) {
            // fjall stopped on its own: one of its background threads failed and we cannot see why.
            if low_space(&self.dir) {
                let err = StorageError::new(
                    StorageErrorKind::NoSpace,
                    format!(
                        "disk full; writes resume once space is freed (the {} at '{}' stopped writing while the \
                         disk is nearly full)",
                        self.label,
                        self.dir.display()
                    ),
                );
                self.mark_broken(&err);
                return err;
            }
            return self
                .poison("the storage engine stopped writing after a background I/O failure".to_string());
        }
        let err = self.error(e, "writing");
        tracing::error!(dir = %self.dir.display(), store = self.label, error = %err, "write failed");
        self.mark_broken(&err);
        err
    }

    fn mark_broken(&self, e: &StorageError) {
        let mut st = lock(&self.state);
        st.broken = Some(e.clone());
        st.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
        self.broken.store(true, Ordering::Release);
    }

    /// Poisons the engine for good and returns the error every later write gets.
    fn poison(&self, why: String) -> StorageError {
        let e = StorageError::new(
            StorageErrorKind::Poisoned,
            format!(
                "store refuses writes after a failed fsync; restart the server ({} at '{}': {why})",
                self.label,
                self.dir.display()
            ),
        );
        tracing::error!(dir = %self.dir.display(), store = self.label, error = %e, "storage poisoned");
        self.poison.get_or_init(|| e).clone()
    }

    /// fsyncs if anything was written since the last fsync (the interval thread).
    fn sync_if_dirty(&self) {
        if self.needs_check() || !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let db = lock(&self.state).db.clone();
        if let Some(db) = db {
            if let Err(e) = db.persist(PersistMode::Buffer) {
                self.write_failed(e);
                return;
            }
            // Through our own descriptor, as in `sync` mode: fjall's own fsync holds its journal lock, and every
            // write waited behind it (produce p99 6.3 ms, p99.9 28.8 ms in a paced run at 10,000 items/s, against
            // 1.0 and 7.5 ms on the memory backend). The error is recorded; the next write reports it.
            let _ = self.fsync_journal_file(0);
        }
    }

    /// fsyncs done so far.
    pub(crate) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Sets or clears an injected fault.
    pub(crate) fn inject(&self, fault: Option<Fault>) {
        *lock(&self.fault) = fault;
    }

    /// Stops the interval thread, fsyncs what is pending and releases the database (and its lock). Blocking.
    pub(crate) fn close(&self) {
        for thread in [&self.syncer, &self.reaper] {
            if let Some(s) = lock(thread).take() {
                drop(s.stop);
                let _ = s.thread.join();
            }
        }
        *lock(&self.memtables) = Memtables::default();
        let _w = lock(&self.write_lock);
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        if let Some(db) = &st.db {
            if !self.needs_check() {
                if let Err(e) = db.persist(PersistMode::SyncAll) {
                    tracing::warn!(dir = %self.dir.display(), error = ?e, "final fsync at close failed");
                }
            }
        }
        st.keyspaces.clear();
        st.db = None;
        st.closed = true;
    }
}

fn start_syncer(engine: &Arc<Engine>, every: Duration) -> Result<(), StorageError> {
    let syncer = start_periodic(engine, "lessor-fjall-sync", "fsync", every, Engine::sync_if_dirty)?;
    *lock(&engine.syncer) = Some(syncer);
    Ok(())
}

fn start_reaper(engine: &Arc<Engine>) -> Result<(), StorageError> {
    let reaper = start_periodic(
        engine,
        "lessor-memfree",
        "memtable reaper",
        REAP_EVERY,
        Engine::reap_memtables,
    )?;
    *lock(&engine.reaper) = Some(reaper);
    Ok(())
}

/// Starts thread `name`, which calls `work` on the engine every `every` until told to stop (a message or a dropped
/// sender) or the engine is gone; it holds only a weak reference, so it never keeps a closed store alive.
fn start_periodic(
    engine: &Arc<Engine>,
    name: &str,
    what: &str,
    every: Duration,
    work: fn(&Engine),
) -> Result<Syncer, StorageError> {
    let weak = Arc::downgrade(engine);
    let (stop, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                let Some(engine) = weak.upgrade() else { break };
                work(&engine);
            }
        })
        .map_err(|e| StorageError::other(format!("cannot start the {what} thread: {e}")))?;
    Ok(Syncer { stop, thread })
}

/// fsyncs every journal file (`<id>.jnl`) of the database directory; returns how many. Blocking.
fn sync_journals(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_journal = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .is_some_and(|n| n.parse::<u64>().is_ok());
        if is_journal {
            fs::File::open(entry.path())?.sync_data()?;
            n += 1;
        }
    }
    Ok(n)
}

/// The id of the newest journal file (`<id>.jnl`) in the database directory.
fn newest_journal(dir: &Path) -> io::Result<u64> {
    let mut newest = None;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok());
        newest = newest.max(id);
    }
    newest.ok_or_else(|| io::Error::other("no journal file in the database directory"))
}

/// The format versions a store reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Formats {
    /// What this build writes.
    pub(crate) current: u32,
    /// Older versions the store upgrades on open.
    pub(crate) upgradable: &'static [u32],
}

/// Checks the format marker of `dir`, writing the current one into a new, empty directory. Returns the version.
fn check_format(dir: &Path, kind: &str, format: Formats) -> Result<u32, StorageError> {
    let path = dir.join(FORMAT_FILE);
    let corrupt = |m: String| StorageError::new(StorageErrorKind::Corrupt, m);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let words: Vec<&str> = text.split_whitespace().collect();
            let [magic, found_kind, version] = words[..] else {
                return Err(corrupt(format!(
                    "'{}' is not a lessor format marker",
                    path.display()
                )));
            };
            if magic != "lessor-fjall" {
                return Err(corrupt(format!(
                    "'{}' is not a lessor format marker",
                    path.display()
                )));
            }
            if found_kind != kind {
                return Err(corrupt(format!(
                    "'{}' holds a lessor {found_kind} store, not a {kind} store",
                    dir.display()
                )));
            }
            match version.parse::<u32>() {
                Ok(v) if v == format.current || format.upgradable.contains(&v) => Ok(v),
                _ => Err(corrupt(format!(
                    "'{}' was written in storage format version {version}; this build reads version {}{} \
                     (use the lessor release that wrote it, or move the directory away)",
                    dir.display(),
                    format.current,
                    if format.upgradable.is_empty() {
                        " only".to_string()
                    } else {
                        format!(" and upgrades {:?}", format.upgradable)
                    }
                ))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let not_empty = fs::read_dir(dir).map_err(|e| io_error(dir, &e))?.next().is_some();
            if not_empty {
                // Data without a marker was not written by lessor (or lost its marker): refuse rather than guess.
                return Err(corrupt(format!(
                    "'{}' is not empty but has no {FORMAT_FILE} marker: it is not a lessor {kind} store",
                    dir.display()
                )));
            }
            write_marker(dir, kind, format.current).map_err(|e| io_error(dir, &e))?;
            Ok(format.current)
        }
        Err(e) => Err(io_error(dir, &e)),
    }
}

/// Writes the marker atomically: a temporary file, fsynced, renamed, then the directory fsynced.
fn write_marker(dir: &Path, kind: &str, version: u32) -> io::Result<()> {
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "lessor-fjall {kind} {version}")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(FORMAT_FILE))?;
    fs::File::open(dir)?.sync_all()
}

fn io_error(dir: &Path, e: &io::Error) -> StorageError {
    let kind = if is_no_space(e) {
        StorageErrorKind::NoSpace
    } else {
        StorageErrorKind::Unavailable
    };
    StorageError::new(kind, format!("I/O error on '{}': {e}", dir.display()))
}

/// The I/O error at the root of a fjall error, if any.
fn find_io(e: &fjall::Error) -> Option<&io::Error> {
    match e {
        fjall::Error::Io(io) => Some(io),
        fjall::Error::Storage(fjall::LsmError::Io(io)) => Some(io),
        _ => None,
    }
}

/// Whether an I/O error means "no space left" (disk full or quota).
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// Whether the filesystem holding `dir` is nearly full.
#[cfg(unix)]
fn low_space(dir: &Path) -> bool {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize) < LOW_SPACE)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn low_space(_dir: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::RecvTimeoutError;

    const WAIT: Duration = Duration::from_secs(10);

    fn open(dir: &Path) -> Arc<Engine> {
        let (engine, _) = Engine::open(
            dir,
            "db",
            "test",
            "test store",
            Durability::Sync,
            KeyspaceCreateOptions::default,
            Formats {
                current: 1,
                upgradable: &[],
            },
        )
        .expect("open");
        engine.keyspace("k", true).expect("keyspace");
        engine
    }

    fn unit(key: &str) -> Vec<Unit> {
        vec![Unit {
            keyspace: Arc::from("k"),
            puts: vec![(key.as_bytes().to_vec(), b"v".to_vec())],
            dels: Vec::new(),
            once_dels: Vec::new(),
        }]
    }

    /// Before a reopen every journal file is synced, not only the newest: `sync_journals` finds each one.
    #[test]
    fn sync_journals_syncs_every_journal_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["7.jnl", "8.jnl", "9.jnl", "lock", "x.jnl.tmp", "v.jnl"] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        assert_eq!(sync_journals(dir.path()).expect("sync"), 3);
        // And a database of our own has at least its active journal.
        let engine = open(dir.path());
        engine
            .commit_group(unit("a"))
            .into_iter()
            .for_each(|r| r.expect("write"));
        assert!(sync_journals(&engine.dir).expect("sync") >= 1);
    }

    /// A deletion in `once_dels` (a weak tombstone) hides its key at once, after a flush that meets the value and
    /// after one that does not (the value was in an older table), and after a restart that replays the journal.
    #[test]
    fn once_dels_delete_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let del = |keys: &[&str]| {
            vec![Unit {
                keyspace: Arc::from("k"),
                puts: Vec::new(),
                dels: Vec::new(),
                once_dels: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            }]
        };
        let ok = |rs: Vec<Result<(), StorageError>>| rs.into_iter().for_each(|r| r.expect("write"));
        let present = |engine: &Engine, key: &str| {
            let ks = engine.keyspace("k", false).expect("keyspace").expect("exists");
            ks.get(key).expect("get").is_some()
        };
        let engine = open(dir.path());
        let ks = engine.keyspace("k", false).expect("keyspace").expect("exists");
        ok(engine.commit_group(unit("flushed")));
        ks.rotate_memtable_and_wait().expect("flush");
        ok(engine.commit_group(unit("in-memtable")));
        ok(engine.commit_group(unit("kept")));
        ok(engine.commit_group(del(&["flushed", "in-memtable"])));
        for key in ["flushed", "in-memtable"] {
            assert!(!present(&engine, key), "{key} deleted");
        }
        ks.rotate_memtable_and_wait().expect("flush");
        for key in ["flushed", "in-memtable"] {
            assert!(!present(&engine, key), "{key} stays deleted after a flush");
        }
        ok(engine.commit_group(unit("journal-only")));
        ok(engine.commit_group(del(&["journal-only"])));
        drop(ks);
        engine.close();
        drop(engine);
        let engine = open(dir.path());
        for key in ["flushed", "in-memtable", "journal-only"] {
            assert!(!present(&engine, key), "{key} stays deleted after a restart");
        }
        assert!(present(&engine, "kept"));
    }

    /// A memtable rotated out is held by the engine (so fjall never frees it under its version lock) and freed by
    /// the reaper once fjall has let go of it: nothing leaks.
    #[test]
    fn rotated_memtables_are_held_then_freed_by_the_reaper() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open(dir.path());
        let ks = engine.keyspace("k", false).expect("keyspace").expect("exists");
        let ok = |rs: Vec<Result<(), StorageError>>| rs.into_iter().for_each(|r| r.expect("write"));
        ok(engine.commit_group(unit("a")));
        let first = {
            let m = lock(&engine.memtables);
            Arc::downgrade(&m.active.get("k").expect("the written keyspace is tracked").1)
        };
        ks.rotate_memtable_and_wait().expect("flush");
        ok(engine.commit_group(unit("b")));
        {
            let m = lock(&engine.memtables);
            let retired: Vec<_> = m.retired.iter().map(Arc::downgrade).collect();
            assert!(
                retired.iter().any(|w| w.ptr_eq(&first)) || first.strong_count() == 0,
                "the rotated memtable moved to the retired list"
            );
        }
        // The next rotation drops fjall's old versions, and with them its last reference.
        ks.rotate_memtable_and_wait().expect("flush");
        ok(engine.commit_group(unit("c")));
        let deadline = Instant::now() + WAIT;
        while first.strong_count() > 0 {
            assert!(Instant::now() < deadline, "the retired memtable was never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(ks.get("a").expect("get").is_some(), "the data is in the tables");
    }

    /// The first fsync is held until the test releases it; every fsync reports the sequence it covers.
    fn gate_first_fsync(engine: &Engine) -> (mpsc::Receiver<u64>, mpsc::Sender<()>) {
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(Some(release_rx));
        *lock(&engine.before_fsync) = Some(Box::new(move |target| {
            let _ = started_tx.send(target);
            if let Some(rx) = lock(&release_rx).take() {
                let _ = rx.recv_timeout(WAIT);
            }
        }));
        (started_rx, release_tx)
    }

    /// Writes one group on a thread and waits for its fsync; reports the sequence once written, then the result.
    fn write_and_wait(
        engine: &Arc<Engine>,
        key: &'static str,
    ) -> (mpsc::Receiver<u64>, mpsc::Receiver<Result<(), StorageError>>) {
        let (written_tx, written_rx) = mpsc::channel();
        let (acked_tx, acked_rx) = mpsc::channel();
        let engine = engine.clone();
        std::thread::spawn(move || {
            let w = engine.write_group(unit(key));
            assert!(w.results.iter().all(|r| r.is_ok()), "{:?}", w.results);
            let seq = w.seq.expect("durability sync gives a sequence");
            let _ = written_tx.send(seq);
            let _ = acked_tx.send(engine.wait_durable(seq));
        });
        (written_rx, acked_rx)
    }

    #[test]
    fn no_write_is_acknowledged_before_an_fsync_covering_it_and_writes_overlap_the_fsync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open(dir.path());
        let (started, release) = gate_first_fsync(&engine);

        let (w1, a1) = write_and_wait(&engine, "a");
        let seq1 = w1.recv_timeout(WAIT).expect("first write");
        assert_eq!(started.recv_timeout(WAIT).expect("first fsync starts"), seq1);

        // The first fsync is still running: the next group is written meanwhile (the pipeline) ...
        let (w2, a2) = write_and_wait(&engine, "b");
        let seq2 = w2
            .recv_timeout(WAIT)
            .expect("a write goes through while an fsync runs");
        assert!(seq2 > seq1);
        // ... but nothing is acknowledged before an fsync covering it has ended.
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(a1.try_recv(), Err(mpsc::TryRecvError::Empty)));
        assert!(matches!(a2.try_recv(), Err(mpsc::TryRecvError::Empty)));

        release.send(()).expect("release");
        assert!(a1.recv_timeout(WAIT).expect("first ack").is_ok());
        // The first fsync began before the second group was written: a second fsync must cover it.
        assert!(a2.recv_timeout(WAIT).expect("second ack").is_ok());
        assert_eq!(started.recv_timeout(WAIT).expect("second fsync"), seq2);
        assert_eq!(engine.fsyncs(), 2);
        assert!(matches!(
            started.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout)
        ));
        engine.close();
    }

    #[test]
    fn a_failed_fsync_fails_every_waiter_it_does_not_cover_and_poisons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open(dir.path());
        assert!(engine.commit_group(unit("before")).iter().all(|r| r.is_ok()));
        let (started, release) = gate_first_fsync(&engine);

        let (w1, a1) = write_and_wait(&engine, "a");
        w1.recv_timeout(WAIT).expect("first write");
        started.recv_timeout(WAIT).expect("fsync starts");
        let (w2, a2) = write_and_wait(&engine, "b");
        w2.recv_timeout(WAIT).expect("second write");
        engine.inject(Some(Fault::SyncFails));
        release.send(()).expect("release");

        for a in [a1, a2] {
            let e = a.recv_timeout(WAIT).expect("answer").expect_err("not durable");
            assert_eq!(e.kind, StorageErrorKind::Poisoned);
        }
        let later = engine.commit_group(unit("after"));
        assert!(matches!(&later[0], Err(e) if e.kind == StorageErrorKind::Poisoned));
        engine.close();
    }
}
