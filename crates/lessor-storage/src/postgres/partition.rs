//! Partitions as PostgreSQL tables: [`PgStore`] opens them, [`PgPartition`] implements the item state machine in SQL.
//!
//! Several servers may work on one table at once (the store is [`PartitionStore::shared`]). Every call is one
//! statement, or one transaction whose first statement locks the rows it reads, so concurrent servers never lease
//! an item twice or apply a lifecycle action twice, and a call that fails changed nothing (except when the
//! connection dies during `COMMIT`, where no client of any database can know the outcome: the call reports
//! `Unavailable` and the items are leased or moved at most once all the same).
//!
//! Round trips per call (plus one per statement the connection has not prepared yet): produce, lease, delete,
//! clear, counts, stats, next_deadline and lists one each; complete and extend one when every id is leased (else
//! two more: lock and check, then apply and commit); retry two (lock and check, then apply and commit); lifecycle
//! one to three (one per kind of due action, `BEGIN` and `COMMIT` riding along; one more under a backoff policy,
//! whose schedule times are computed here between locking the expired leases and moving them), plus one
//! `next_deadline` when the limit cut the pass short, plus one that drops expired dedup records.
//!
//! # Idempotent produce
//! Dedup records live in one table for the whole database, `lessor_dedup_keys`, keyed by a 128-bit keyed hash of
//! `(queue, dedup_id)` (see `super::dedup`), so every partition and every server checks the same records (the
//! contract's "whole queue" scope for shared stores, and why [`Partition::dedup_records`] returns none). A keyed
//! produce claims its keys and inserts its items in one statement (see `super::sql`); it costs one round trip like any
//! produce, with the statement that drops expired records of the queue (up to twice as many as the calls since the last
//! one added; at most once per `PRUNE_INTERVAL`) pipelined behind it. The claim is a plain insert, which fails when a
//! key has a record, and the batch is then sent again as an upsert (one more round trip, only for batches that meet a
//! record). The records of a queue go when its last partition is destroyed.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::error::{ItemError, StorageError};
use lessor_core::storage::{
    CountsDelta, LifecycleOutcome, LifecyclePolicy, Partition, PartitionSnapshot, PartitionStore,
    RetryAction, RetryOp, RetryOutcome,
};
use lessor_core::time::Ts;
use lessor_core::types::{
    ClearRequest, Item, ItemId, NewItem, PartitionCounts, PartitionStats, TierFigures, TierStats,
};
use tokio_postgres::Row;

use super::dedup::QueueKeys;
use super::pool::{acquire, pg_err, prepare, PgConfig, Shared, Tx};
use super::schema::{self, Ensure};
use super::sql::{Sql, RETRY_DELETE, RETRY_KEEP_DEAD, RETRY_RELEASE, RETRY_REQUEUE, RETRY_SCHEDULE};

/// Partitions in PostgreSQL, one table each.
#[derive(Debug)]
pub struct PgStore {
    shared: Mutex<Option<Arc<Shared>>>,
}

impl PgStore {
    /// A store on the pool of `cfg.connection_string` (shared with every other store using the same string).
    /// Never connects: tables are created by `create` (or by the first open of a partition never created nor
    /// destroyed), and calls fail with `Unavailable` while the database is down. Fails only on an invalid
    /// configuration.
    pub fn new(cfg: &PgConfig) -> Result<Self, StorageError> {
        Ok(PgStore {
            shared: Mutex::new(Some(acquire(cfg)?)),
        })
    }

    fn shared(&self) -> Result<Arc<Shared>, StorageError> {
        current_pool(&self.shared, "store")
    }
}

fn current_pool(m: &Mutex<Option<Arc<Shared>>>, what: &str) -> Result<Arc<Shared>, StorageError> {
    m.lock()
        .map_err(|_| StorageError::other(format!("postgres {what} lock poisoned")))?
        .clone()
        .ok_or_else(|| StorageError::other(format!("postgres {what} is closed")))
}

fn release(m: &Mutex<Option<Arc<Shared>>>) {
    if let Ok(mut s) = m.lock() {
        s.take();
    }
}

/// Most partitions of one queue in one PostgreSQL store: each is a table with a sequence and indexes, created in
/// its own transaction (measured in docs/benchmarks.md), and every server probes every table of a queue it serves.
pub const MAX_PARTITIONS: u32 = 256;
/// Partition tables created (or dropped) at once by `create` (or `destroy_many`).
const CREATE_CONCURRENCY: usize = 8;

#[async_trait]
impl PartitionStore for PgStore {
    fn driver(&self) -> &'static str {
        "postgres"
    }

    fn max_partitions(&self) -> u32 {
        MAX_PARTITIONS
    }

    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.create_incarnation(queue, Ts::ZERO, partitions).await
    }

    /// Tables of the incarnation (see `schema::incarnation_table_name`).
    async fn create_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        let shared = self.shared()?;
        // A table, its sequence and its indexes are one transaction each: a few at a time keeps the pool's other
        // users served while a wide queue is created.
        for chunk in partitions.chunks(CREATE_CONCURRENCY) {
            futures::future::try_join_all(chunk.iter().map(|&p| {
                let shared = shared.clone();
                let first_id = i64::try_from(ItemId::floor_for(p).0).unwrap_or(i64::MAX);
                async move {
                    schema::ensure_partition(&shared, queue, p, incarnation.0, first_id, Ensure::Create)
                        .await
                        .map(|_| ())
                }
            }))
            .await?;
        }
        Ok(())
    }

    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        self.open_incarnation(queue, Ts::ZERO, partition).await
    }

    async fn open_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        let shared = self.shared()?;
        // A new table's ids start at the current time in microseconds, so a queue deleted and created again never
        // reuses an id that a consumer of the old queue may still hold (offset per partition: see `floor_for`).
        let first_id = i64::try_from(ItemId::floor_for(partition).0).unwrap_or(i64::MAX);
        // Never creates a table that a destroy dropped: see `ensure_partition`.
        let table =
            schema::ensure_partition(&shared, queue, partition, incarnation.0, first_id, Ensure::Open)
                .await?;
        let keys = schema::dedup_secret(&shared).await?.queue(queue);
        Ok(Arc::new(PgPartition {
            sql: Sql::new(&table),
            keys,
            last_conflict: Mutex::new(None),
            prune_debt: Mutex::new((0, None)),
            shared: Mutex::new(Some(shared)),
            table,
            queue: queue.to_string(),
            partition,
            announcing: Arc::new(AtomicU8::new(IDLE)),
            lease_hint: Mutex::new(None),
        }))
    }

    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        let shared = self.shared()?;
        schema::drop_partition(&shared, queue, partition, 0).await?;
        schema::purge_tombstones(&shared).await;
        schema::drop_queue_dedup(&shared, queue).await
    }

    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.destroy_many_incarnation(queue, Ts::ZERO, partitions).await
    }

    async fn destroy_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<(), StorageError> {
        self.destroy_many_incarnation(queue, incarnation, &[partition])
            .await
    }

    /// Drops the incarnation's tables only: see `schema::drop_partition`.
    async fn destroy_many_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        let shared = self.shared()?;
        // As in `create`: a few tables at a time, not one after another (1,000 tables took 12 s in sequence).
        for chunk in partitions.chunks(CREATE_CONCURRENCY) {
            futures::future::try_join_all(chunk.iter().map(|&p| {
                let shared = shared.clone();
                async move { schema::drop_partition(&shared, queue, p, incarnation.0).await }
            }))
            .await?;
        }
        schema::purge_tombstones(&shared).await;
        schema::drop_queue_dedup(&shared, queue).await
    }

    fn shared(&self) -> bool {
        true
    }

    fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<lessor_core::storage::Notice>> {
        Some(self.shared().ok()?.notifier.subscribe())
    }

    async fn close(&self) {
        release(&self.shared);
    }
}

/// A point-in-time read of one partition: a read-only REPEATABLE READ transaction paged by id.
struct PgSnapshot {
    /// `None` once every row was read (the transaction is then rolled back and the connection pooled again).
    tx: Option<Tx>,
    sql: String,
    /// The next id to read (inclusive).
    from: i64,
    table: String,
}

impl std::fmt::Debug for PgSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSnapshot").field("table", &self.table).finish()
    }
}

#[async_trait]
impl PartitionSnapshot for PgSnapshot {
    async fn next(&mut self, limit: usize) -> Result<Vec<Item>, StorageError> {
        self.next_within(limit, u64::MAX).await
    }

    /// The database sizes the candidate rows with `octet_length` and fetches only those within the bound, inside
    /// the snapshot's transaction: the rows left out are read by the next call, from the same instant.
    async fn next_within(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        let Some(tx) = self.tx.take() else {
            return Ok(Vec::new());
        };
        let stmt = prepare(tx.conn()?, &self.sql).await?;
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let (tx, rows) = tx
            .query(&stmt, &[&self.from, &limit_param(limit.max(1)), &max_bytes])
            .await?;
        let (items, _) = bounded_rows(&rows)?;
        match items.last() {
            Some(last) => {
                self.from = db_id(last.id).unwrap_or(i64::MAX).saturating_add(1);
                self.tx = Some(tx);
            }
            // The end: nothing to keep the transaction open for.
            None => tx.rollback().await,
        }
        Ok(items)
    }
}

/// One partition: a table `items_<hash>_<partition>`.
#[derive(Debug)]
pub struct PgPartition {
    shared: Mutex<Option<Arc<Shared>>>,
    table: String,
    sql: Sql,
    /// The queue and partition, for the queue-wide dedup records.
    queue: String,
    /// The queue's id in those records and the hashing of its keys.
    keys: QueueKeys,
    /// When a keyed produce of this partition last met an existing record: for [`UPSERT_AFTER_CONFLICT`] after
    /// that, keyed produces claim with the upsert form straight away.
    last_conflict: Mutex<Option<std::time::Instant>>,
    /// Keys produced since this partition's keyed produces last pruned expired records, and when that was.
    prune_debt: Mutex<(usize, Option<std::time::Instant>)>,
    partition: u32,
    /// Whether a notification of ready items is being sent ([`IDLE`], [`SENDING`], [`AGAIN`]).
    announcing: Arc<AtomicU8>,
    /// Where the last lease stopped, so the next one can start there (see [`PgPartition::lease`]).
    lease_hint: Mutex<Option<LeaseHint>>,
}

/// The serving position (priority, id) of the last item a lease of this partition returned, and when the chain of
/// leases started from such positions began.
#[derive(Clone, Copy, Debug)]
struct LeaseHint {
    priority: i16,
    id: i64,
    since: std::time::Instant,
}

/// Longest time leases start from a remembered position before one reads the ready index from its start again.
const LEASE_HINT_TTL: Duration = Duration::from_millis(500);

/// No notification is being sent for the partition.
const IDLE: u8 = 0;
/// One is being sent.
const SENDING: u8 = 1;
/// One is being sent, and another write committed since it started: send one more after it.
const AGAIN: u8 = 2;
/// Shortest time between two notifications of one partition while writes keep coming.
const ANNOUNCE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

/// How long after a keyed produce met an existing record the partition's keyed produces claim with the upsert form
/// (see `super::sql`'s produce): duplicates tend to come in runs (a client retrying a batch), and each plain claim
/// that fails costs a statement that did all its work for nothing.
const UPSERT_AFTER_CONFLICT: Duration = Duration::from_secs(1);

/// Whether `e` is the unique violation of a dedup record that the plain claim reports (the statement changed
/// nothing).
fn is_record_conflict(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        *d.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && d.constraint() == Some("lessor_dedup_keys_pkey")
    })
}

/// Shortest time between two prunes of expired dedup records by one partition's keyed produces.
const PRUNE_INTERVAL: Duration = Duration::from_millis(10);

/// Expired dedup records a lifecycle pass drops at most.
const LIFECYCLE_DEDUP_PRUNE: i64 = 1000;

/// How long a dedup record is kept after its window ended before a prune drops it. A produce is checked against
/// its items' `created_at`, stamped by its server when the pass began, not when the statement reaches the
/// database; a record dropped in between (by another server's prune, whose `now` is later) would let a duplicate
/// stamped within the window be stored. The grace covers a statement that waits that long (a pool waiting for a
/// connection, a database failing over) and servers whose clocks disagree by up to that much; it costs the
/// records of that many minutes of keyed produces, in rows.
const DEDUP_PRUNE_GRACE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The `until` at or before which a prune at `now` may drop a record (see [`DEDUP_PRUNE_GRACE`]). Timestamps are
/// microseconds ([`Ts`]): the grace in nanoseconds kept records 1,000 times as long (83 hours).
fn prune_horizon(now: i64) -> i64 {
    now.saturating_sub(i64::try_from(DEDUP_PRUNE_GRACE.as_micros()).unwrap_or(i64::MAX))
}

/// What complete and retry learn about a live item they name.
#[derive(Clone, Copy)]
struct LiveRow {
    is_leased: bool,
    attempts: u32,
}

/// An item id as stored (`BIGINT`); ids beyond `i64::MAX` cannot exist in a table.
fn db_id(id: ItemId) -> Option<i64> {
    i64::try_from(id.0).ok()
}

fn item_id(v: i64) -> ItemId {
    ItemId(u64::try_from(v).unwrap_or(0))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A count as a change of counts.
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn decode(r: &Row) -> Result<Item, StorageError> {
    let attempts: i64 = r.try_get(7).map_err(pg_err)?;
    let max_attempts: i64 = r.try_get(8).map_err(pg_err)?;
    let source_id: Option<String> = r.try_get(1).map_err(pg_err)?;
    let payload: Vec<u8> = r.try_get(12).map_err(pg_err)?;
    Ok(Item {
        id: item_id(r.try_get(0).map_err(pg_err)?),
        source_id: source_id.unwrap_or_default(),
        is_leased: r.try_get(2).map_err(pg_err)?,
        lease_deadline: Ts(r.try_get(3).map_err(pg_err)?),
        expire_deadline: Ts(r.try_get(4).map_err(pg_err)?),
        enqueue_at: Ts(r.try_get(5).map_err(pg_err)?),
        created_at: Ts(r.try_get(6).map_err(pg_err)?),
        attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
        max_attempts: u32::try_from(max_attempts.max(0)).unwrap_or(u32::MAX),
        reference: r.try_get(9).map_err(pg_err)?,
        encoding: r.try_get(10).map_err(pg_err)?,
        kind: r.try_get(11).map_err(pg_err)?,
        payload: Bytes::from(payload),
        dead: r.try_get(13).map_err(pg_err)?,
        priority: u8::try_from(r.try_get::<_, i16>(14).map_err(pg_err)?.max(0)).unwrap_or(u8::MAX),
    })
}

fn decode_sorted(rows: &[Row]) -> Result<Vec<Item>, StorageError> {
    let mut items = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order; the contract's order is the id order.
    items.sort_unstable_by_key(|i| i.id);
    Ok(items)
}

/// Leased rows in serving order: highest priority first, id order within a priority (RETURNING gives no order).
fn decode_serving_order(rows: &[Row]) -> Result<Vec<Item>, StorageError> {
    let mut items = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    items.sort_unstable_by_key(|i| (Reverse(i.priority), i.id));
    Ok(items)
}

/// The microsecond value of a time, at least 1: a schedule time of 0 would read as "not scheduled".
fn schedule_at(t: Ts) -> i64 {
    t.0.max(1)
}

/// An array column that is NULL when the aggregate had no rows.
fn opt_vec<T>(row: &Row, i: usize) -> Result<Vec<T>, StorageError>
where
    for<'a> T: tokio_postgres::types::FromSql<'a>,
{
    Ok(row
        .try_get::<_, Option<Vec<T>>>(i)
        .map_err(pg_err)?
        .unwrap_or_default())
}

/// Checks one complete or retry request the way the memory backend does, id by id in request order: the first
/// repeated, missing (or already consumed by an earlier request of the batch) or unleased id fails the request.
fn check_request(
    ids: impl Iterator<Item = ItemId>,
    live: &HashMap<u64, LiveRow>,
    gone: &HashSet<u64>,
) -> Result<(), ItemError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(ItemError::Duplicate(id.to_string()));
        }
        match live.get(&id.0) {
            Some(_) if gone.contains(&id.0) => return Err(ItemError::NotFound(id.to_string())),
            None => return Err(ItemError::NotFound(id.to_string())),
            Some(r) if !r.is_leased => return Err(ItemError::NotLeased(id.to_string())),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The distinct storable ids of extension requests in id order, each with its deadline (the last request naming an
/// id wins).
fn deadlines_by_id<'a>(requests: impl Iterator<Item = (&'a Vec<ItemId>, Ts)>) -> (Vec<i64>, Vec<i64>) {
    let mut by_id: HashMap<i64, i64> = HashMap::new();
    for (ids, deadline) in requests {
        for id in ids.iter().filter_map(|id| db_id(*id)) {
            by_id.insert(id, deadline.0);
        }
    }
    let mut pairs: Vec<(i64, i64)> = by_id.into_iter().collect();
    pairs.sort_unstable();
    pairs.into_iter().unzip()
}

/// The distinct storable ids of a batch of requests.
fn distinct_ids<'a>(ids: impl Iterator<Item = &'a ItemId>) -> Vec<i64> {
    let mut v: Vec<i64> = ids.filter_map(|id| db_id(*id)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The live (ready or leased) rows among those `lock_live` locked; scheduled and dead items read as missing.
fn live_rows(rows: &[Row]) -> Result<HashMap<u64, LiveRow>, StorageError> {
    let mut live = HashMap::with_capacity(rows.len());
    for r in rows {
        if !r.try_get::<_, bool>(3).map_err(pg_err)? {
            continue;
        }
        let id: i64 = r.try_get(0).map_err(pg_err)?;
        let attempts: i64 = r.try_get(2).map_err(pg_err)?;
        live.insert(
            item_id(id).0,
            LiveRow {
                is_leased: r.try_get(1).map_err(pg_err)?,
                attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
            },
        );
    }
    Ok(live)
}

impl PgPartition {
    fn shared(&self) -> Result<Arc<Shared>, StorageError> {
        current_pool(&self.shared, "partition")
    }

    /// Tells the other servers on the database that this partition has new ready items (see the `notify`
    /// module); called after the write committed. In the background and coalesced: while a notification is being
    /// sent, later writes ask for one more after it, so every commit is followed by at least one notification and a
    /// burst of writes costs a few.
    fn announce(&self) {
        loop {
            match self
                .announcing
                .compare_exchange(IDLE, SENDING, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(SENDING) => {
                    if self
                        .announcing
                        .compare_exchange(SENDING, AGAIN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        let Ok(shared) = self.shared() else {
            self.announcing.store(IDLE, Ordering::Release);
            return;
        };
        let state = self.announcing.clone();
        let payload = shared.notifier.payload(&self.queue, self.partition);
        tokio::spawn(async move {
            loop {
                let sent = async {
                    let conn = shared.conn().await?;
                    let stmt = prepare(&conn, "SELECT pg_notify($1::text, $2::text)").await?;
                    conn.execute(&stmt, &[&super::notify::CHANNEL, &payload])
                        .await
                        .map_err(pg_err)
                }
                .await;
                if let Err(e) = sent {
                    // Best effort: the other servers' periodic refresh finds the items anyway.
                    tracing::debug!(error = %e, "postgres: cannot notify the other servers");
                }
                if state
                    .compare_exchange(SENDING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return;
                }
                state.store(SENDING, Ordering::Release);
                // Under a stream of writes, at most one notification per partition per interval: the others'
                // consumers wait that much longer at worst, and the database is not sent one per batch.
                tokio::time::sleep(ANNOUNCE_INTERVAL).await;
            }
        });
    }

    /// The table this partition lives in.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Resolves the ids of items skipped as duplicates whose stored row the produce statement could not see
    /// (another server inserted it after the statement's snapshot was taken).
    async fn existing_ids(&self, source_ids: Vec<&str>) -> Result<HashMap<String, i64>, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.source_ids).await?;
        let rows = conn.query(&stmt, &[&source_ids]).await.map_err(pg_err)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?)))
            .collect()
    }

    /// Fills the ids of keyed items the produce statement skipped because their key's record is live, from the
    /// records as committed now (one more round trip, only when the batch held duplicates). The items are stored
    /// by then, so a failed look-up only leaves ids unknown. `hashes` are the sent rows' key hashes.
    async fn resolve_deduplicated(
        &self,
        row: &Row,
        fresh: &[i64],
        hashes: (&[Option<i64>], &[Option<i64>]),
        ids: &mut [Option<i64>],
    ) -> Result<(), StorageError> {
        // A claimed record holds its row's fresh id.
        let claimed: HashSet<i64> = opt_vec::<i64>(row, 4)?.into_iter().collect();
        let later: Vec<usize> = (0..ids.len())
            .filter(|&k| {
                ids[k].is_none()
                    && hashes.0[k].is_some()
                    && !fresh.get(k).is_some_and(|f| claimed.contains(f))
            })
            .collect();
        if later.is_empty() {
            return Ok(());
        }
        let h1: Vec<i64> = later.iter().filter_map(|&k| hashes.0[k]).collect();
        let h2: Vec<i64> = later.iter().filter_map(|&k| hashes.1[k]).collect();
        let found: Result<HashMap<(i64, i64), i64>, StorageError> = async {
            let shared = self.shared()?;
            let conn = shared.conn().await?;
            let stmt = prepare(&conn, &self.sql.dedup_lookup).await?;
            let rows = conn.query(&stmt, &[&h1, &h2]).await.map_err(pg_err)?;
            rows.iter()
                .map(|r| {
                    Ok((
                        (r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?),
                        r.try_get(2).map_err(pg_err)?,
                    ))
                })
                .collect()
        }
        .await;
        match found {
            Ok(found) => {
                for k in later {
                    if let (Some(a), Some(b)) = (hashes.0[k], hashes.1[k]) {
                        ids[k] = found.get(&(a, b)).copied();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(queue = %self.queue, error = %e, "postgres: cannot resolve deduplicated ids")
            }
        }
        Ok(())
    }

    /// The moves of a lifecycle pass, in one transaction; `more` says whether the limit was reached, and
    /// `counts_delta` how the moves changed the partition's counts (each moved row was locked by the statement that
    /// moved it, so the delta is exact for this pass; see `LifecycleOutcome::counts_delta`).
    async fn lifecycle_moves(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        let mut o = LifecycleOutcome {
            counts_delta: Some(CountsDelta::default()),
            ..LifecycleOutcome::default()
        };
        if limit == 0 {
            o.more = true;
            return Ok(o);
        }
        let mut delta = CountsDelta::default();
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let due = prepare(&conn, &self.sql.enqueue_due).await?;
        let expire = prepare(&conn, &self.sql.expire_items).await?;
        let keep = policy.has_dead_queue;
        // The three kinds run in the memory backend's order (lease expiries, schedules, expire deadlines) in one
        // transaction, each seeing the moves before it: an item whose lease expired and whose expire deadline
        // passed is requeued, then dies, exactly as in memory.
        let tx = if policy.backoff.is_on() {
            // Expired leases go into the schedule for a delay that depends on each item's id and attempts, which
            // the statement locking them returns; the moves then go in one statement, like a retry's.
            let lock = prepare(&conn, &self.sql.lock_expired).await?;
            let apply = prepare(&conn, &self.sql.retry_apply).await?;
            let (tx, rows) = Tx::begin(conn, &lock, &[&now.0, &limit_param(limit)]).await?;
            let (mut op_ids, mut op_actions, mut op_at) = (Vec::new(), Vec::new(), Vec::new());
            for r in &rows {
                let id: i64 = r.try_get(0).map_err(pg_err)?;
                let attempts: i64 = r.try_get(1).map_err(pg_err)?;
                let attempts = u32::try_from(attempts.max(0)).unwrap_or(u32::MAX);
                op_ids.push(id);
                if policy.exhausted(attempts) {
                    o.dead += 1;
                    op_actions.push(if keep { RETRY_KEEP_DEAD } else { RETRY_DELETE });
                    op_at.push(0);
                } else {
                    o.lease_expired += 1;
                    op_actions.push(RETRY_SCHEDULE);
                    op_at.push(schedule_at(now.add(policy.backoff.delay(attempts, item_id(id)))));
                }
            }
            // Expired leases went into the schedule, or died.
            delta.leased -= signed(o.lease_expired + o.dead);
            delta.scheduled += signed(o.lease_expired);
            if op_ids.is_empty() {
                tx
            } else {
                tx.query(&apply, &[&op_ids, &op_actions, &op_at]).await?.0
            }
        } else {
            let leases = prepare(&conn, &self.sql.expire_leases).await?;
            let max = i64::from(policy.max_attempts);
            let (tx, rows) = Tx::begin(conn, &leases, &[&now.0, &limit_param(limit), &max, &keep]).await?;
            let row = rows
                .first()
                .ok_or_else(|| StorageError::other("postgres: no lifecycle row"))?;
            o.lease_expired = count(row.try_get(0).map_err(pg_err)?);
            o.dead = count(row.try_get(1).map_err(pg_err)?);
            // Expired leases went to the tail, or died.
            delta.leased -= signed(o.lease_expired + o.dead);
            delta.ready += signed(o.lease_expired);
            tx
        };
        let mut left = limit.saturating_sub(usize::try_from(o.lease_expired + o.dead).unwrap_or(usize::MAX));
        let mut tx = Some(tx);
        if left > 0 {
            let (t, rows) = tx
                .take()
                .ok_or_else(|| StorageError::other("postgres: transaction lost"))?
                .query(&due, &[&now.0, &limit_param(left)])
                .await?;
            tx = Some(t);
            let n = rows
                .first()
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()
                .map_err(pg_err)?;
            o.enqueued = count(n.unwrap_or(0));
            delta.scheduled -= signed(o.enqueued);
            delta.ready += signed(o.enqueued);
            left = left.saturating_sub(usize::try_from(o.enqueued).unwrap_or(usize::MAX));
        }
        let tx = tx.ok_or_else(|| StorageError::other("postgres: transaction lost"))?;
        if left > 0 {
            let rows = tx
                .query_commit(&expire, &[&now.0, &limit_param(left), &keep])
                .await?;
            let (n, ready) = match rows.first() {
                Some(r) => (
                    count(r.try_get(0).map_err(pg_err)?),
                    count(r.try_get(1).map_err(pg_err)?),
                ),
                None => (0, 0),
            };
            o.dead += n;
            // Ready and leased items died (the ready ones may be those the statements above just requeued).
            delta.ready -= signed(ready);
            delta.leased -= signed(n.saturating_sub(ready));
            left = left.saturating_sub(usize::try_from(n).unwrap_or(usize::MAX));
        } else {
            tx.commit().await?;
        }
        o.more = left == 0;
        o.counts_delta = Some(delta);
        Ok(o)
    }

    /// Drops up to `limit` dedup records of the queue that expired by `now` less [`DEDUP_PRUNE_GRACE`]; returns how
    /// many.
    async fn prune_dedup(&self, now: Ts, limit: i64) -> Result<u64, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.prune_dedup).await?;
        let row = conn
            .query_one(&stmt, &[&self.keys.id, &prune_horizon(now.0), &limit])
            .await
            .map_err(pg_err)?;
        Ok(count(row.try_get(0).map_err(pg_err)?))
    }

    async fn next_deadline_now(&self) -> Result<Option<Ts>, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.next_deadline).await?;
        let row = conn.query_one(&stmt, &[]).await.map_err(pg_err)?;
        let dead: bool = row.try_get(0).map_err(pg_err)?;
        if dead {
            return Ok(Some(Ts::ZERO));
        }
        let mut next: Option<i64> = None;
        for i in 1..4 {
            let v: Option<i64> = row.try_get(i).map_err(pg_err)?;
            next = match (next, v) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(next.map(Ts))
    }
}

/// The fields of an item that produce and import both write, borrowed from a [`NewItem`] or an [`Item`].
struct Common<'a> {
    source_id: &'a str,
    priority: u8,
    enqueue_at: Ts,
    expire_deadline: Ts,
    created_at: Ts,
    reference: &'a str,
    encoding: &'a str,
    kind: &'a str,
    payload: &'a [u8],
}

/// `Common` from either item type: they name these fields alike.
macro_rules! common_from {
    ($t:ty) => {
        impl<'a> From<&'a $t> for Common<'a> {
            fn from(i: &'a $t) -> Self {
                Common {
                    source_id: &i.source_id,
                    priority: i.priority,
                    enqueue_at: i.enqueue_at,
                    expire_deadline: i.expire_deadline,
                    created_at: i.created_at,
                    reference: &i.reference,
                    encoding: &i.encoding,
                    kind: &i.kind,
                    payload: &i.payload,
                }
            }
        }
    };
}
common_from!(NewItem);
common_from!(Item);

/// Those fields as one array per column: the produce and import statements `unnest` them, so a whole batch is
/// one statement.
#[derive(Default)]
struct Columns<'a> {
    /// `NULL` for an empty source id (the unique index ignores NULLs).
    source: Vec<Option<&'a str>>,
    enqueue_at: Vec<i64>,
    expire: Vec<i64>,
    created: Vec<i64>,
    reference: Vec<&'a str>,
    encoding: Vec<&'a str>,
    kind: Vec<&'a str>,
    payload: Vec<&'a [u8]>,
    priority: Vec<i16>,
}

impl<'a> Columns<'a> {
    fn of(rows: impl Iterator<Item = Common<'a>>) -> Self {
        let mut c = Columns::default();
        for r in rows {
            c.source.push((!r.source_id.is_empty()).then_some(r.source_id));
            c.enqueue_at.push(r.enqueue_at.0);
            c.expire.push(r.expire_deadline.0);
            c.created.push(r.created_at.0);
            c.reference.push(r.reference);
            c.encoding.push(r.encoding);
            c.kind.push(r.kind);
            c.payload.push(r.payload);
            c.priority.push(i16::from(r.priority));
        }
        c
    }
}

#[async_trait]
impl Partition for PgPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        Ok(self.produce_reporting(items).await?.0)
    }

    async fn produce_reporting(&self, items: Vec<NewItem>) -> Result<(Vec<ItemId>, Vec<bool>), StorageError> {
        if items.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // A source id or dedup key repeated within the batch is sent once; later copies take the first one's id,
        // as if they had been produced one after the other.
        let mut first_source: HashMap<&str, usize> = HashMap::new();
        let mut first_key: HashMap<&str, usize> = HashMap::new();
        let mut slot = Vec::with_capacity(items.len());
        let mut sent: Vec<&NewItem> = Vec::with_capacity(items.len());
        for it in &items {
            let earlier = (!it.source_id.is_empty())
                .then(|| first_source.get(it.source_id.as_str()))
                .flatten()
                .or_else(|| {
                    (!it.dedup_id.is_empty())
                        .then(|| first_key.get(it.dedup_id.as_str()))
                        .flatten()
                });
            if let Some(&k) = earlier {
                slot.push(k);
                continue;
            }
            if !it.source_id.is_empty() {
                first_source.insert(&it.source_id, sent.len());
            }
            if !it.dedup_id.is_empty() {
                first_key.insert(&it.dedup_id, sent.len());
            }
            slot.push(sent.len());
            sent.push(it);
        }
        let c = Columns::of(sent.iter().map(|i| Common::from(*i)));
        let keyed = !first_key.is_empty();

        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let base: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
            &c.source,
            &c.enqueue_at,
            &c.expire,
            &c.created,
            &c.reference,
            &c.encoding,
            &c.kind,
            &c.payload,
            &c.priority,
        ];
        // Each keyed row's hash (see `super::dedup`), NULL for the rows without a key.
        let (h1, h2): (Vec<Option<i64>>, Vec<Option<i64>>) = if keyed {
            sent.iter()
                .map(|i| {
                    if i.dedup_id.is_empty() {
                        (None, None)
                    } else {
                        let (a, b) = self.keys.key(&i.dedup_id);
                        (Some(a), Some(b))
                    }
                })
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        let row = if keyed {
            let until: Vec<i64> = sent.iter().map(|i| i.dedup_until.0).collect();
            let key_count = first_key.len();
            let partition = i64::from(self.partition);
            let mut params = base.to_vec();
            params.extend_from_slice(&[&h1, &h2, &until, &self.keys.id, &partition]);
            // Records expired for every item of the batch; dropping twice as many as the calls since the last
            // prune added keeps their number bounded by the produce rate times the window. At most one prune per
            // [`PRUNE_INTERVAL`] per partition: with small batches the statement cost about as much as the claims.
            let prune_keys = self.prune_debt.lock().ok().and_then(|mut d| {
                d.0 += key_count;
                if d.1.is_some_and(|t| t.elapsed() < PRUNE_INTERVAL) {
                    return None;
                }
                let keys = d.0;
                *d = (0, Some(std::time::Instant::now()));
                Some(keys)
            });
            let now = sent
                .iter()
                .filter(|i| !i.dedup_id.is_empty())
                .map(|i| i.created_at.0)
                .min()
                .map_or(0, prune_horizon);
            let prune_limit = limit_param(2 * prune_keys.unwrap_or(0) + 16);
            // The plain claim while no key of this partition met a record lately, the upsert after (see
            // `super::sql`'s produce).
            let upsert = self
                .last_conflict
                .lock()
                .map(|t| t.is_some_and(|t| t.elapsed() < UPSERT_AFTER_CONFLICT))
                .unwrap_or(true);
            let sql = if upsert {
                &self.sql.produce_dedup
            } else {
                &self.sql.produce_dedup_fresh
            };
            let stmt = prepare(&conn, sql).await?;
            let prune = prepare(&conn, &self.sql.prune_dedup).await?;
            // Pipelined: one round trip. The prune runs after the produce commits, in a statement of its own.
            let prune_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&self.keys.id, &now, &prune_limit];
            let row = if prune_keys.is_some() {
                let (row, pruned) = tokio::join!(
                    conn.query_one(&stmt, &params),
                    conn.query_one(&prune, &prune_params)
                );
                if let Err(e) = pruned {
                    // Housekeeping only: the next call drops them.
                    tracing::warn!(queue = %self.queue, error = %e, "postgres: cannot drop expired dedup records");
                }
                row
            } else {
                conn.query_one(&stmt, &params).await
            };
            match row {
                Err(e) if !upsert && is_record_conflict(&e) => {
                    // The plain claim met a record and changed nothing: the same batch again, as an upsert.
                    if let Ok(mut t) = self.last_conflict.lock() {
                        *t = Some(std::time::Instant::now());
                    }
                    let stmt = prepare(&conn, &self.sql.produce_dedup).await?;
                    conn.query_one(&stmt, &params).await.map_err(pg_err)?
                }
                row => row.map_err(pg_err)?,
            }
        } else {
            let stmt = prepare(&conn, &self.sql.produce).await?;
            conn.query_one(&stmt, &base).await.map_err(pg_err)?
        };
        drop(conn);
        if sent.iter().any(|i| i.enqueue_at.is_zero()) {
            self.announce();
        }
        let fresh: Vec<i64> = row.try_get(0).map_err(pg_err)?;
        let inserted: HashSet<i64> = opt_vec::<i64>(&row, 1)?.into_iter().collect();
        let dup_rn: Vec<i64> = opt_vec(&row, 2)?;
        let dup_id: Vec<i64> = opt_vec(&row, 3)?;
        // Each input row's id: its fresh id when inserted, else the id of the stored copy it duplicates.
        let mut ids: Vec<Option<i64>> = fresh
            .iter()
            .map(|id| inserted.contains(id).then_some(*id))
            .collect();
        ids.resize(sent.len(), None);
        // Which rows this call stored (before the duplicates' slots are filled with their stored copies' ids).
        let stored_rows: Vec<bool> = ids.iter().map(Option::is_some).collect();
        for (rn, id) in dup_rn.into_iter().zip(dup_id) {
            let k = usize::try_from(rn - 1).unwrap_or(usize::MAX);
            if let Some(slot @ None) = ids.get_mut(k) {
                *slot = Some(id);
            }
        }
        if keyed {
            self.resolve_deduplicated(&row, &fresh, (&h1, &h2), &mut ids)
                .await?;
        }
        let unresolved: Vec<&str> = ids
            .iter()
            .zip(&c.source)
            .filter_map(|(id, s)| if id.is_none() { *s } else { None })
            .collect();
        if !unresolved.is_empty() {
            // The items are stored already; a failure here must not report the produce as failed.
            match self.existing_ids(unresolved).await {
                Ok(found) => {
                    for (id, s) in ids.iter_mut().zip(&c.source) {
                        if let (None, Some(s)) = (&id, s) {
                            *id = found.get(*s).copied();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(table = %self.table, error = %e, "postgres: cannot resolve duplicate ids")
                }
            }
        }
        // A duplicate whose stored copy vanished again (completed in between) has no id left to report: 0. A later
        // copy of a key or source id within the batch was not stored by this call: its first copy was.
        let mut seen = vec![false; sent.len()];
        let mut stored = Vec::with_capacity(slot.len());
        let ids = slot
            .into_iter()
            .map(|k| {
                let first = !std::mem::replace(&mut seen[k], true);
                stored.push(first && stored_rows.get(k).copied().unwrap_or(false));
                item_id(ids.get(k).copied().flatten().unwrap_or(0))
            })
            .collect();
        Ok((ids, stored))
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        Ok(self.lease_within(n, lease_deadline, u64::MAX).await?.0)
    }

    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        if n == 0 {
            return Ok((Vec::new(), false));
        }
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        // The rows the statement locked: more than it returned means the byte bound left ready rows behind.
        let locked = |rows: &[Row]| rows.first().map_or(0, |r| r.get::<_, i64>(15));
        // Every lease leaves dead entries at the head of the ready index (the old versions of the rows it
        // updated) until vacuum removes them, and a plain lease walks them all, visiting the heap for each: under
        // steady load that is most of its cost. So a lease starts where the previous one stopped: every ready item
        // of that priority below that point was either returned then or locked by someone else's lease. What the
        // position misses: an item that became ready below it afterwards (a produce or requeue on another
        // connection that took its id earlier and committed later, or a lease of another server that rolled back).
        // Those wait at most LEASE_HINT_TTL, after which a lease reads the index from its start again; and a lease
        // from a position that finds nothing reads from the start at once.
        let hint = {
            let h = self.lease_hint.lock().unwrap_or_else(|p| p.into_inner());
            h.filter(|h| h.since.elapsed() < LEASE_HINT_TTL)
        };
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let mut items = Vec::new();
        let mut capped = false;
        let mut since = std::time::Instant::now();
        if let Some(h) = hint {
            let stmt = prepare(&conn, &self.sql.lease_after).await?;
            let rows = conn
                .query(
                    &stmt,
                    &[&limit_param(n), &lease_deadline.0, &h.priority, &h.id, &max_bytes],
                )
                .await
                .map_err(pg_err)?;
            items = decode_serving_order(&rows)?;
            capped = locked(&rows) > rows.len() as i64;
            since = h.since;
        }
        if items.is_empty() {
            let stmt = prepare(&conn, &self.sql.lease).await?;
            let rows = conn
                .query(&stmt, &[&limit_param(n), &lease_deadline.0, &max_bytes])
                .await
                .map_err(pg_err)?;
            items = decode_serving_order(&rows)?;
            capped = locked(&rows) > rows.len() as i64;
            if hint.is_some() {
                since = std::time::Instant::now();
            }
        }
        if let Some(last) = items.last() {
            let id = db_id(last.id).unwrap_or(i64::MAX);
            *self.lease_hint.lock().unwrap_or_else(|p| p.into_inner()) = Some(LeaseHint {
                priority: i16::from(last.priority),
                id,
                since,
            });
        }
        Ok((items, capped))
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        let total: usize = requests.iter().map(Vec::len).sum();
        if total == 0 {
            return Ok(requests.iter().map(|_| Ok(())).collect());
        }
        let ids = distinct_ids(requests.iter().flatten());
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        if ids.len() == total {
            // Every id is distinct and storable: try the one-statement path, which deletes all of them when every
            // one is leased (the normal case) and nothing otherwise.
            let stmt = prepare(&conn, &self.sql.complete_all).await?;
            let row = conn.query_one(&stmt, &[&ids]).await.map_err(pg_err)?;
            let deleted: i64 = row.try_get(0).map_err(pg_err)?;
            if count(deleted) == total as u64 {
                return Ok(requests.iter().map(|_| Ok(())).collect());
            }
        }
        // Some request fails: lock the named live rows, judge each request in order, delete the valid ones.
        let lock = prepare(&conn, &self.sql.lock_live).await?;
        let delete = prepare(&conn, &self.sql.delete_ids).await?;
        let (tx, rows) = Tx::begin(conn, &lock, &[&ids]).await?;
        let live = live_rows(&rows)?;
        let mut gone = HashSet::new();
        let mut doomed: Vec<i64> = Vec::new();
        let out: Vec<Result<(), ItemError>> = requests
            .iter()
            .map(|req| {
                check_request(req.iter().copied(), &live, &gone)?;
                for id in req {
                    gone.insert(id.0);
                    doomed.extend(db_id(*id));
                }
                Ok(())
            })
            .collect();
        if doomed.is_empty() {
            tx.rollback().await;
        } else {
            tx.query_commit(&delete, &[&doomed]).await?;
        }
        Ok(out)
    }

    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        let total: usize = requests.iter().map(|r| r.0.len()).sum();
        if total == 0 {
            return Ok(requests.iter().map(|_| Ok(())).collect());
        }
        let ids = distinct_ids(requests.iter().flat_map(|r| r.0.iter()));
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.extend_all).await?;
        if ids.len() == total {
            // Every id is distinct and storable: one statement sets all of them when every one is leased (the
            // normal case) and none otherwise.
            let (ids, deadlines) = deadlines_by_id(requests.iter().map(|r| (&r.0, r.1)));
            let row = conn.query_one(&stmt, &[&ids, &deadlines]).await.map_err(pg_err)?;
            let set: i64 = row.try_get(0).map_err(pg_err)?;
            if count(set) == total as u64 {
                return Ok(requests.iter().map(|_| Ok(())).collect());
            }
        }
        // Some request fails (or names an id another request names too): lock the named live rows, judge each
        // request, set the valid ones. An id in two valid requests takes the later one's deadline, as if they had
        // been applied one after the other.
        let lock = prepare(&conn, &self.sql.lock_live).await?;
        let (tx, rows) = Tx::begin(conn, &lock, &[&ids]).await?;
        let live = live_rows(&rows)?;
        let none = HashSet::new();
        let mut valid = Vec::new();
        let out: Vec<Result<(), ItemError>> = requests
            .iter()
            .map(|(req, deadline)| {
                check_request(req.iter().copied(), &live, &none)?;
                valid.push((req, *deadline));
                Ok(())
            })
            .collect();
        if valid.is_empty() {
            tx.rollback().await;
        } else {
            let (ids, deadlines) = deadlines_by_id(valid.into_iter());
            tx.query_commit(&stmt, &[&ids, &deadlines]).await?;
        }
        Ok(out)
    }

    async fn dedup_records(&self, now: Ts) -> Result<Vec<lessor_core::types::DedupRecord>, StorageError> {
        // The database checks the whole queue itself.
        let _ = now;
        Ok(Vec::new())
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        if requests.iter().all(Vec::is_empty) {
            return Ok(requests.iter().map(|_| Ok(RetryOutcome::default())).collect());
        }
        let ids = distinct_ids(requests.iter().flatten().map(|op| &op.id));
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let lock = prepare(&conn, &self.sql.lock_live).await?;
        let apply = prepare(&conn, &self.sql.retry_apply).await?;
        let (tx, rows) = Tx::begin(conn, &lock, &[&ids]).await?;
        let live = live_rows(&rows)?;
        let mut gone = HashSet::new();
        let (mut op_ids, mut op_actions, mut op_at) = (Vec::new(), Vec::new(), Vec::new());
        let mut expected = RetryOutcome::default();
        let out: Vec<Result<RetryOutcome, ItemError>> = requests
            .iter()
            .map(|req| {
                check_request(req.iter().map(|o| o.id), &live, &gone)?;
                let mut o = RetryOutcome::default();
                for op in req {
                    gone.insert(op.id.0);
                    let attempts = live.get(&op.id.0).map_or(0, |r| r.attempts);
                    let action = match op.action {
                        RetryAction::Dead => RetryAction::Dead,
                        RetryAction::Release => RetryAction::Release,
                        _ if policy.exhausted(attempts) => RetryAction::Dead,
                        a => a,
                    };
                    let (code, at) = match action {
                        RetryAction::Requeue => {
                            o.requeued += 1;
                            (RETRY_REQUEUE, 0)
                        }
                        RetryAction::Release => {
                            o.requeued += 1;
                            (RETRY_RELEASE, 0)
                        }
                        RetryAction::Schedule(at) => {
                            o.scheduled += 1;
                            (RETRY_SCHEDULE, at.0)
                        }
                        // The delay depends on the attempts read under the lock, so it is computed here.
                        RetryAction::Backoff(now) if policy.backoff.is_on() => {
                            o.scheduled += 1;
                            (
                                RETRY_SCHEDULE,
                                schedule_at(now.add(policy.backoff.delay(attempts, op.id))),
                            )
                        }
                        RetryAction::Backoff(_) => {
                            o.requeued += 1;
                            (RETRY_REQUEUE, 0)
                        }
                        RetryAction::Dead => {
                            o.dead += 1;
                            (
                                if policy.has_dead_queue {
                                    RETRY_KEEP_DEAD
                                } else {
                                    RETRY_DELETE
                                },
                                0,
                            )
                        }
                    };
                    if let Some(id) = db_id(op.id) {
                        op_ids.push(id);
                        op_actions.push(code);
                        op_at.push(at);
                    }
                }
                expected.requeued += o.requeued;
                expected.scheduled += o.scheduled;
                expected.dead += o.dead;
                Ok(o)
            })
            .collect();
        if op_ids.is_empty() {
            tx.rollback().await;
            return Ok(out);
        }
        let rows = tx.query_commit(&apply, &[&op_ids, &op_actions, &op_at]).await?;
        if expected.requeued > 0 {
            self.announce();
        }
        if let Some(r) = rows.first() {
            let got = (
                count(r.try_get(0).map_err(pg_err)?),
                count(r.try_get(1).map_err(pg_err)?),
                count(r.try_get(2).map_err(pg_err)?),
            );
            // The rows were locked since they were read, so this cannot differ; say so loudly if it ever does.
            if got != (expected.requeued, expected.scheduled, expected.dead) {
                tracing::error!(table = %self.table, ?got, ?expected, "postgres: retry moved other rows than it locked");
            }
        }
        Ok(out)
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        let o = self.lifecycle_moves(now, policy, limit).await?;
        if o.lease_expired + o.enqueued > 0 {
            self.announce();
        }
        // Dedup records are the queue's, not this partition's: any partition's pass may drop some. Housekeeping
        // after the moves committed, so a failure must not fail the call.
        if let Err(e) = self.prune_dedup(now, LIFECYCLE_DEDUP_PRUNE).await {
            tracing::warn!(queue = %self.queue, error = %e, "postgres: cannot drop expired dedup records");
        }
        if !o.more {
            return Ok(o);
        }
        // The limit stopped the pass: is anything else due? The moves are committed, so a failure to ask must
        // not fail the call; assuming more only costs the engine one more pass.
        Ok(LifecycleOutcome {
            more: match self.next_deadline_now().await {
                Ok(d) => d.is_some_and(|d| d <= now),
                Err(_) => true,
            },
            ..o
        })
    }

    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.dead_items).await?;
        let rows = conn.query(&stmt, &[&limit_param(limit)]).await.map_err(pg_err)?;
        rows.iter().map(decode).collect()
    }

    async fn dead_items_within(
        &self,
        limit: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.dead_items_within).await?;
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let rows = conn
            .query(&stmt, &[&limit_param(limit), &max_bytes])
            .await
            .map_err(pg_err)?;
        bounded_rows(&rows)
    }

    async fn dead_count(&self) -> Result<u64, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.dead_count).await?;
        let r = conn.query_one(&stmt, &[]).await.map_err(pg_err)?;
        Ok(count(r.try_get(0).map_err(pg_err)?))
    }

    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        let ids = distinct_ids(ids.iter());
        if ids.is_empty() {
            return Ok(());
        }
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.remove_dead).await?;
        conn.execute(&stmt, &[&ids]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        self.next_deadline_now().await
    }

    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.counts).await?;
        let r = conn.query_one(&stmt, &[]).await.map_err(pg_err)?;
        Ok(PartitionCounts {
            ready: count(r.try_get(0).map_err(pg_err)?),
            leased: count(r.try_get(1).map_err(pg_err)?),
            scheduled: count(r.try_get(2).map_err(pg_err)?),
        })
    }

    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.stats).await?;
        let r = conn.query_one(&stmt, &[]).await.map_err(pg_err)?;
        let mean_created: Option<i64> = r.try_get(3).map_err(pg_err)?;
        let mean_deadline: Option<i64> = r.try_get(4).map_err(pg_err)?;
        let bytes: i64 = r.try_get(5).map_err(pg_err)?;
        // The created_at of the oldest item at the head of a priority: one `_ready_p` index probe per priority.
        let oldest_head: Option<i64> = r.try_get(6).map_err(pg_err)?;
        let counts = PartitionCounts {
            ready: count(r.try_get(0).map_err(pg_err)?),
            leased: count(r.try_get(1).map_err(pg_err)?),
            scheduled: count(r.try_get(2).map_err(pg_err)?),
        };
        // Every item is in the database; nothing is Lessor's memory (the buffer cache is the database's).
        let tiers = TierStats {
            memory: TierFigures::default(),
            disk: TierFigures {
                items: counts.ready + counts.leased + counts.scheduled,
                bytes: count(bytes),
            },
            object: TierFigures {
                items: count(r.try_get(7).map_err(pg_err)?),
                bytes: count(r.try_get(8).map_err(pg_err)?),
            },
        };
        Ok(PartitionStats {
            counts,
            average_age: mean_created.map_or(Duration::ZERO, |c| now.since(Ts(c))),
            average_leased_age: mean_deadline.map_or(Duration::ZERO, |d| Ts(d).since(now)),
            payload_bytes: count(bytes),
            oldest_ready_age: oldest_head.map_or(Duration::ZERO, |c| now.since(Ts(c))),
            tiers,
        })
    }

    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        let Some(from) = db_id(pivot.unwrap_or(ItemId(0))) else {
            // No stored id is that large.
            return Ok(Vec::new());
        };
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let sql = if scheduled {
            &self.sql.list_scheduled
        } else {
            &self.sql.list_live
        };
        let stmt = prepare(&conn, sql).await?;
        let rows = conn
            .query(&stmt, &[&from, &limit_param(limit)])
            .await
            .map_err(pg_err)?;
        rows.iter().map(decode).collect()
    }

    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let Some(from) = db_id(pivot.unwrap_or(ItemId(0))) else {
            return Ok((Vec::new(), false));
        };
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let sql = if scheduled {
            &self.sql.list_scheduled_within
        } else {
            &self.sql.list_live_within
        };
        let stmt = prepare(&conn, sql).await?;
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let rows = conn
            .query(&stmt, &[&from, &limit_param(limit), &max_bytes])
            .await
            .map_err(pg_err)?;
        bounded_rows(&rows)
    }

    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        // Normalised as the memory backend does; a source id repeated within the batch keeps its first item.
        let mut seen = HashSet::new();
        let items: Vec<Item> = items
            .into_iter()
            .filter(|it| it.source_id.is_empty() || seen.insert(it.source_id.clone()))
            .map(|mut it| {
                if !it.is_leased || it.is_scheduled() {
                    it.is_leased = false;
                    it.lease_deadline = Ts::ZERO;
                }
                it
            })
            .collect();
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let c = Columns::of(items.iter().map(Common::from));
        // The state columns only an import sets.
        let leased: Vec<bool> = items.iter().map(|i| i.is_leased).collect();
        let lease_deadline: Vec<i64> = items.iter().map(|i| i.lease_deadline.0).collect();
        let attempts: Vec<i64> = items.iter().map(|i| i64::from(i.attempts)).collect();
        let max_attempts: Vec<i64> = items.iter().map(|i| i64::from(i.max_attempts)).collect();
        let dead: Vec<bool> = items.iter().map(|i| i.dead).collect();
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.import).await?;
        let rows = conn
            .query(
                &stmt,
                &[
                    &c.source,
                    &leased,
                    &lease_deadline,
                    &c.expire,
                    &c.enqueue_at,
                    &c.created,
                    &attempts,
                    &max_attempts,
                    &c.reference,
                    &c.encoding,
                    &c.kind,
                    &c.payload,
                    &c.priority,
                    &dead,
                ],
            )
            .await
            .map_err(pg_err)?;
        decode_sorted(&rows)
    }

    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // A read-only REPEATABLE READ transaction on a connection of its own: its first statement fixes the
        // snapshot, here, while the queue task has no other call on the partition in flight; the pages are read
        // later at the reader's pace while the partition keeps serving on the other connections.
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
            .await
            .map_err(pg_err)?;
        let tx = Tx::from_open(conn);
        Ok(Box::new(PgSnapshot {
            tx: Some(tx),
            sql: self.sql.snapshot_page.clone(),
            from: 0,
            table: self.table.clone(),
        }))
    }

    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        let ids = distinct_ids(ids.iter());
        if ids.is_empty() {
            return Ok(());
        }
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &self.sql.delete_ids).await?;
        conn.execute(&stmt, &[&ids]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        let Some(sql) = self
            .sql
            .clear(request.queue, request.destructive, request.scheduled)
        else {
            return Ok(());
        };
        let shared = self.shared()?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &sql).await?;
        conn.execute(&stmt, &[]).await.map_err(pg_err)?;
        Ok(())
    }

    async fn close(&self) {
        release(&self.shared);
    }
}

/// The items of a byte-bounded page (see `bounded_page` in the SQL module) and whether the bound cut it: its last
/// column counts the candidate rows, more than those returned when it did.
fn bounded_rows(rows: &[Row]) -> Result<(Vec<Item>, bool), StorageError> {
    let candidates = rows.first().map_or(0, |r| r.get::<_, i64>(15));
    let items = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    let cut = usize::try_from(candidates).unwrap_or(usize::MAX) > items.len();
    Ok((items, cut))
}
