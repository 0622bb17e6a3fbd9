//! The log of the log store: numbered segment files of framed records, appended in order, fsynced in groups, read
//! back in order at start, and cut at checkpoints.
//!
//! A frame is `[body length: u32 LE][CRC-32 of the body: u32 LE][body]`. Appends go to the active segment under one
//! lock, so the file order is the order of [`Wal::append`] calls, and each append gets a sequence number. Durability
//! follows the store's mode:
//! - `sync`: [`Wal::durable`] answers once an `fdatasync` that started after the append succeeded. One fsync thread
//!   takes every waiter queued meanwhile and covers them with one fsync (group commit), while appends go on.
//! - `interval`: a background thread fsyncs the active segment at the interval when it was written to.
//! - `none`: fsyncs happen only at open (the last run's last segment), segment rotation, checkpoints and close.
//!
//! A segment is fsynced before the next one is created, so a waiter whose record is in an older segment is covered.
//! A failed write or fsync poisons the log for good (the kernel may have dropped the dirty pages, and the store's
//! memory is already ahead of its disk): every later append and wait fails until the process restarts. fsyncs of
//! segments run one at a time and none starts once one failed (a later one could succeed over the dropped pages).
//!
//! At open, [`Wal::open`] reads every segment in order and hands each record body to the caller. A frame cut short
//! or failing its CRC in the *last* segment is the tail of an append a crash interrupted, never acknowledged: the
//! segment is truncated there. The same in an older segment is corruption, reported, never skipped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use lessor_core::error::{StorageError, StorageErrorKind};
use tokio::sync::oneshot;

use crate::fjall::Durability;

/// A segment is closed and the next one started once it holds this much.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// Largest record body (a change set, a chunk of a checkpoint); a frame's length field could say up to 4 GiB.
pub(crate) const MAX_BODY: usize = 1 << 30;
/// Bytes of a frame before its body: a record's buffer keeps this much room in front (see [`Wal::append`]).
pub(crate) const FRAME_HEADER: usize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (plain counters and file handles).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The segment being appended to.
struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

#[derive(Default)]
struct SyncProgress {
    /// Every append with a sequence up to this one is durable.
    synced: u64,
    /// An fsync is running.
    syncing: bool,
}

type Waiter = (u64, oneshot::Sender<Result<(), StorageError>>);

/// The next fsync of a segment tells `entered`, waits until `release` is sent to or dropped, then fails (tests).
struct SyncFault {
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

/// The log (see the module doc).
pub(crate) struct Wal {
    dir: PathBuf,
    durability: Durability,
    active: Mutex<Active>,
    /// Sequence of the last append (taken under `active`, so sequences follow the file order).
    written: AtomicU64,
    sync: Mutex<SyncProgress>,
    synced_cv: Condvar,
    /// Held by each fsync of a segment from before it starts until its outcome is published (see [`Wal::fsync`]).
    /// Locked after `active` and before `sync`.
    fsync_lock: Mutex<()>,
    poison: OnceLock<StorageError>,
    /// A failure armed for the next fsync of a segment (tests: see [`Wal::fail_next_fsync`]).
    fault: Mutex<Option<SyncFault>>,
    /// The sync thread's inbox (`sync` only); `None` once closed.
    waiters: Mutex<Option<mpsc::Sender<Waiter>>>,
    /// Wakes the interval thread (`interval` only) when dropped, so that a close does not wait for the rest of a
    /// `sync-interval` (which may be long) before that thread sees it; `None` once closed.
    interval_stop: Mutex<Option<mpsc::Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Bytes appended since the last checkpoint began, and the bytes the last checkpoint wrote.
    since_checkpoint: AtomicU64,
    checkpoint_bytes: AtomicU64,
    /// fsyncs made (tests: group commit shares them).
    fsyncs: AtomicU64,
    /// The directory lock, held while the log is open.
    _lock: File,
}

fn segment_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// The segments in `dir`, by id.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            let hex = name.strip_suffix(".seg")?;
            (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Wal {
    /// Opens (creating) the log in `dir`, handing every record body to `replay` in order, and starts its threads.
    /// Fails with `Locked` when another process has the directory open and `Corrupt` when a record before the last
    /// segment's tail is damaged.
    pub(crate) fn open(
        dir: &Path,
        durability: Durability,
        mut replay: impl FnMut(&[u8]) -> Result<(), StorageError>,
    ) -> Result<Arc<Wal>, StorageError> {
        let io_err = |what: &str, e: io::Error| {
            StorageError::new(
                StorageErrorKind::Unavailable,
                format!("{what} in the log at '{}': {e}", dir.display()),
            )
        };
        fs::create_dir_all(dir).map_err(|e| io_err("cannot create the directory", e))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| io_err("cannot open the lock file", e))?;
        if lock_file.try_lock().is_err() {
            return Err(StorageError::new(
                StorageErrorKind::Locked,
                format!("the log at '{}' is in use by another process", dir.display()),
            ));
        }
        let ids = segments(dir).map_err(|e| io_err("cannot list the segments", e))?;
        let mut total = 0u64;
        for (n, &id) in ids.iter().enumerate() {
            let last = n + 1 == ids.len();
            total += read_segment(dir, id, last, &mut replay)?;
        }
        // The last run's last segment may hold records a crash left in the page cache, never fsynced: replay just
        // served them, and from here on that segment is no longer the last one, where a power loss's damage would
        // be refused as corruption. Made durable before anything is appended after it.
        let mut fsyncs = 0;
        if let Some(&last) = ids.last() {
            File::open(dir.join(segment_name(last)))
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("cannot fsync the last segment", e))?;
            fsyncs = 1;
        }
        let id = ids.last().map_or(1, |&id| id + 1);
        // Appends always start a fresh segment: the last one may have been truncated, and its length is not kept.
        let file = create_segment(dir, id).map_err(|e| io_err("cannot create a segment", e))?;
        let wal = Arc::new(Wal {
            dir: dir.to_path_buf(),
            durability,
            active: Mutex::new(Active {
                id,
                file: Arc::new(file),
                len: 0,
            }),
            written: AtomicU64::new(0),
            sync: Mutex::new(SyncProgress::default()),
            synced_cv: Condvar::new(),
            fsync_lock: Mutex::new(()),
            poison: OnceLock::new(),
            fault: Mutex::new(None),
            waiters: Mutex::new(None),
            interval_stop: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            since_checkpoint: AtomicU64::new(total),
            checkpoint_bytes: AtomicU64::new(0),
            fsyncs: AtomicU64::new(fsyncs),
            _lock: lock_file,
        });
        wal.start_threads()
            .map_err(|e| io_err("cannot start the log's threads", e))?;
        Ok(wal)
    }

    fn start_threads(self: &Arc<Self>) -> io::Result<()> {
        match self.durability {
            Durability::Sync => {
                let (tx, rx) = mpsc::channel::<Waiter>();
                let wal = Arc::downgrade(self);
                let t = std::thread::Builder::new()
                    .name("lessor-log-fsync".into())
                    .spawn(move || {
                        while let Ok(first) = rx.recv() {
                            let mut batch = vec![first];
                            batch.extend(rx.try_iter());
                            let top = batch.iter().map(|w| w.0).max().unwrap_or(0);
                            let res = match wal.upgrade() {
                                Some(w) => w.wait_durable(top),
                                None => Err(closed_error()),
                            };
                            for (_, reply) in batch {
                                let _ = reply.send(res.clone());
                            }
                        }
                    })?;
                *lock(&self.waiters) = Some(tx);
                lock(&self.threads).push(t);
            }
            Durability::Interval(every) => {
                let wal = Arc::downgrade(self);
                let (stop, stopped) = mpsc::channel::<()>();
                let t = std::thread::Builder::new()
                    .name("lessor-log-interval".into())
                    .spawn(move || loop {
                        // Not a sleep: close drops `stop` and joins this thread, which must not first sleep out
                        // the rest of the interval (an hour with `sync-interval: 1h`).
                        if !matches!(stopped.recv_timeout(every), Err(mpsc::RecvTimeoutError::Timeout)) {
                            return;
                        }
                        let Some(w) = wal.upgrade() else { return };
                        if w.check().is_err() {
                            return;
                        }
                        let top = w.written.load(Ordering::Acquire);
                        let _ = w.wait_durable(top);
                    })?;
                *lock(&self.waiters) = None;
                *lock(&self.interval_stop) = Some(stop);
                lock(&self.threads).push(t);
            }
            Durability::None => {}
        }
        Ok(())
    }

    /// The error every operation gets once the log is poisoned or closed, if it is.
    pub(crate) fn check(&self) -> Result<(), StorageError> {
        match self.poison.get() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Poisons the log (unless it is already: the first poison stays); the error every operation gets from here.
    pub(crate) fn poison(&self, why: String) -> StorageError {
        let e = StorageError::new(
            StorageErrorKind::Poisoned,
            format!(
                "the log store refuses every operation after a failed write or fsync; restart the server ({why}, log at '{}')",
                self.dir.display()
            ),
        );
        self.poison.get_or_init(|| e).clone()
    }

    /// Appends one record; returns its sequence, for [`Wal::durable`]. `frame` is the record's body after
    /// [`FRAME_HEADER`] bytes of room, which this fills in: the body is written where it was encoded, not copied
    /// into a frame of its own. Starts the next segment when the active one is full (fsyncing it first).
    /// Blocking (one `write`).
    pub(crate) fn append(&self, frame: &mut [u8]) -> Result<u64, StorageError> {
        let Some(len) = frame.len().checked_sub(FRAME_HEADER) else {
            return Err(StorageError::other(
                "a log record without room for its frame header",
            ));
        };
        if len > MAX_BODY {
            return Err(StorageError::new(
                StorageErrorKind::Other,
                format!("a log record of {len} bytes is over the log's limit of {MAX_BODY} bytes"),
            ));
        }
        let crc = crc32fast::hash(&frame[FRAME_HEADER..]);
        frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
        frame[4..FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
        let mut a = lock(&self.active);
        self.check()?;
        if let Err(e) = (&*a.file).write_all(frame) {
            return Err(self.poison(format!("a write failed: {e}")));
        }
        a.len += frame.len() as u64;
        let seq = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.since_checkpoint
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        if a.len >= SEGMENT_BYTES {
            self.rotate_locked(&mut a)?;
        }
        Ok(seq)
    }

    /// Closes the active segment (fsynced) and starts the next; returns the new segment's id.
    pub(crate) fn rotate(&self) -> Result<u64, StorageError> {
        let mut a = lock(&self.active);
        self.check()?;
        self.rotate_locked(&mut a)?;
        Ok(a.id)
    }

    fn rotate_locked(&self, a: &mut Active) -> Result<(), StorageError> {
        // Everything written so far is in this segment (or an older one, fsynced before this one was created).
        let top = self.written.load(Ordering::Acquire);
        self.fsync(&a.file, top, "the fsync of a full segment failed")?;
        let next = a.id + 1;
        let file = match create_segment(&self.dir, next) {
            Ok(f) => f,
            Err(e) => return Err(self.poison(format!("cannot create segment {next}: {e}"))),
        };
        *a = Active {
            id: next,
            file: Arc::new(file),
            len: 0,
        };
        Ok(())
    }

    /// fsyncs `file`, which holds every append up to `target`, and publishes the outcome: `synced` raised to
    /// `target`, or the log poisoned. One at a time, and none once the log is poisoned, the outcome published before
    /// the next may start: on Linux an fsync reports a write-back error once, and the next fsync of the same file
    /// returns success although the pages that failed were dropped, never written. An fsync beside or after a failed
    /// one (the fsync thread's next group, a checkpoint's, a rotation's) would raise `synced` over records that are
    /// not on the disk, and answer their writes as durable. Blocking.
    fn fsync(&self, file: &File, target: u64, what: &str) -> Result<(), StorageError> {
        let _one = lock(&self.fsync_lock);
        self.check()?;
        let res = self.sync_file(file);
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        let mut p = lock(&self.sync);
        let res = match res {
            Ok(()) => {
                p.synced = p.synced.max(target);
                Ok(())
            }
            // Poisoned under the lock of `sync`: a waiter woken next finds the poison, not a lower `synced`.
            Err(e) => Err(self.poison(format!("{what}: {e}"))),
        };
        self.synced_cv.notify_all();
        res
    }

    /// `file.sync_data()`, or the failure a test armed.
    fn sync_file(&self, file: &File) -> io::Result<()> {
        let fault = lock(&self.fault).take();
        if let Some(f) = fault {
            let _ = f.entered.send(());
            let _ = f.release.recv();
            return Err(io::Error::other("a failure injected by a test"));
        }
        file.sync_data()
    }

    /// Makes the next fsync of a segment fail as a write-back error would (tests): it is reported on the returned
    /// receiver when it starts, and fails once the returned sender is sent to or dropped.
    pub(crate) fn fail_next_fsync(&self) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered, started) = mpsc::channel();
        let (release, wait) = mpsc::channel();
        *lock(&self.fault) = Some(SyncFault {
            entered,
            release: wait,
        });
        (started, release)
    }

    /// Waits until an fsync covers the append with sequence `seq`, making that fsync itself when none is running.
    /// Blocking.
    pub(crate) fn wait_durable(&self, seq: u64) -> Result<(), StorageError> {
        let mut p = lock(&self.sync);
        loop {
            // The poison first: once an fsync failed, nothing is answered durable, not even a record `synced`
            // covers (an fsync running beside the failed one may have raised it).
            self.check()?;
            if p.synced >= seq {
                return Ok(());
            }
            if p.syncing {
                p = self.synced_cv.wait(p).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            p.syncing = true;
            drop(p);
            let (target, file) = {
                let a = lock(&self.active);
                (self.written.load(Ordering::Acquire), a.file.clone())
            };
            let res = self.fsync(&file, target, "an fsync failed");
            p = lock(&self.sync);
            p.syncing = false;
            self.synced_cv.notify_all();
            res?;
        }
    }

    /// Waits until the append with sequence `seq` is durable as the mode promises: in `sync` through the fsync
    /// thread's next group, in the other modes at once.
    pub(crate) async fn durable(&self, seq: u64) -> Result<(), StorageError> {
        if self.durability != Durability::Sync {
            return self.check();
        }
        let (tx, rx) = oneshot::channel();
        {
            let w = lock(&self.waiters);
            let Some(w) = w.as_ref() else {
                return Err(closed_error());
            };
            if w.send((seq, tx)).is_err() {
                return Err(closed_error());
            }
        }
        rx.await.map_err(|_| closed_error())?
    }

    /// [`Wal::durable`] as a promise for the queue task's pass (see `lessor_core::durability`), or `None` in the
    /// modes that do not wait.
    pub(crate) fn promise(&self, seq: u64) -> Result<Option<lessor_core::durability::Durable>, StorageError> {
        if self.durability != Durability::Sync {
            return self.check().map(|()| None);
        }
        let (tx, rx) = oneshot::channel();
        let w = lock(&self.waiters);
        let Some(w) = w.as_ref() else {
            return Err(closed_error());
        };
        w.send((seq, tx)).map_err(|_| closed_error())?;
        Ok(Some(rx))
    }

    /// In `sync`, `seq` when no fsync has covered it yet: what a call that logs nothing waits for, since what it
    /// answers may rest on a concurrent caller's record (none in the other modes).
    pub(crate) fn unsynced_at(&self, seq: u64) -> Option<u64> {
        if self.durability != Durability::Sync || seq == 0 {
            return None;
        }
        (lock(&self.sync).synced < seq).then_some(seq)
    }

    /// Makes everything appended so far durable, whatever the mode. Blocking.
    pub(crate) fn sync_all(&self) -> Result<(), StorageError> {
        self.wait_durable(self.written.load(Ordering::Acquire))
    }

    /// Whether enough was appended since the last checkpoint for another: more than 256 MiB and more than twice
    /// what the last checkpoint wrote (so a large live state is not rewritten more often than it is appended).
    pub(crate) fn wants_checkpoint(&self, min_bytes: u64) -> bool {
        let since = self.since_checkpoint.load(Ordering::Relaxed);
        since > min_bytes && since > 2 * self.checkpoint_bytes.load(Ordering::Relaxed)
    }

    /// A checkpoint begins: counts appends from here.
    pub(crate) fn checkpoint_started(&self) {
        self.since_checkpoint.store(0, Ordering::Relaxed);
    }

    /// A checkpoint that wrote `bytes` ended.
    pub(crate) fn checkpoint_ended(&self, bytes: u64) {
        self.checkpoint_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Deletes every segment older than `id` (their records are all covered by a checkpoint written since). The
    /// caller made the checkpoint durable first.
    pub(crate) fn remove_before(&self, id: u64) -> Result<usize, StorageError> {
        let io_err = |e: io::Error| {
            StorageError::new(
                StorageErrorKind::Unavailable,
                format!(
                    "cannot delete old segments of the log at '{}': {e}",
                    self.dir.display()
                ),
            )
        };
        let mut n = 0;
        for old in segments(&self.dir).map_err(io_err)? {
            if old >= id {
                break;
            }
            fs::remove_file(self.dir.join(segment_name(old))).map_err(io_err)?;
            n += 1;
        }
        sync_dir(&self.dir).map_err(io_err)?;
        Ok(n)
    }

    /// Segments on disk now (tests).
    pub(crate) fn segment_count(&self) -> usize {
        segments(&self.dir).map_or(0, |s| s.len())
    }

    /// fsyncs made since open (tests).
    pub(crate) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Makes everything durable and stops the threads; later operations fail as closed.
    pub(crate) fn close(&self) {
        if self.check().is_ok() {
            let _ = self.sync_all();
        }
        let _ = self.poison.set(closed_error());
        drop(lock(&self.waiters).take());
        drop(lock(&self.interval_stop).take());
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn closed_error() -> StorageError {
    StorageError::unavailable("the log store is closed")
}

fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(dir.join(segment_name(id)))?;
    sync_dir(dir)?;
    Ok(f)
}

/// Reads segment `id`, handing each record body to `replay`; returns its valid length. In the last segment a damaged
/// tail is cut off; elsewhere it is corruption.
fn read_segment(
    dir: &Path,
    id: u64,
    last: bool,
    replay: &mut impl FnMut(&[u8]) -> Result<(), StorageError>,
) -> Result<u64, StorageError> {
    let path = dir.join(segment_name(id));
    let io_err = |e: io::Error| {
        StorageError::new(
            StorageErrorKind::Unavailable,
            format!("cannot read log segment '{}': {e}", path.display()),
        )
    };
    let file = File::open(&path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut body = Vec::new();
    let damage = loop {
        if pos == size {
            return Ok(pos);
        }
        let mut header = [0u8; FRAME_HEADER];
        if size - pos < FRAME_HEADER as u64 {
            break "a frame header cut short";
        }
        r.read_exact(&mut header).map_err(io_err)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        // No record is empty: a zero length is a zero-filled tail (a crash that extended the file without its
        // data), whose CRC of 0 would otherwise pass as the CRC of an empty body.
        if len == 0 {
            break "an empty frame (zeros)";
        }
        if len > MAX_BODY || (size - pos - FRAME_HEADER as u64) < len as u64 {
            break "a frame cut short";
        }
        body.resize(len, 0);
        r.read_exact(&mut body).map_err(io_err)?;
        if crc32fast::hash(&body) != crc {
            break "a frame failing its checksum";
        }
        replay(&body).map_err(|e| {
            StorageError::new(
                e.kind,
                format!("{} (log segment '{}', offset {pos})", e.message, path.display()),
            )
        })?;
        pos += (FRAME_HEADER + len) as u64;
    };
    if !last {
        return Err(StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "log segment '{}' has {damage} at offset {pos} of {size} and is not the last one: records after it would be lost; restore from a backup",
                path.display()
            ),
        ));
    }
    tracing::warn!(
        segment = %path.display(),
        offset = pos,
        size,
        "log segment ends with {damage} (an append a crash interrupted, never acknowledged): cut off"
    );
    let f = OpenOptions::new().write(true).open(&path).map_err(io_err)?;
    f.set_len(pos).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    Ok(pos)
}
