//! The database schema: versioned migrations of the shared tables, and the per-partition item tables.
//!
//! Several servers may start against one database at once, so every schema change runs inside a transaction that
//! first takes a transaction-scoped advisory lock: `CREATE ... IF NOT EXISTS` alone is not safe under concurrency
//! (two sessions can both pass the existence check and one then fails on a catalog unique index).
//!
//! - `lessor_schema(version)`: one row, the number of migrations applied. A database migrated by a newer build is
//!   refused with [`StorageErrorKind::Corrupt`] instead of being misread.
//! - `queues`: queue definitions ([`super::PgQueues`]).
//! - `lessor_auth`, `lessor_auth_generation` (version 2): the auth store ([`super::PgAuth`]).
//! - `lessor_partitions`: which queue and partition owns each item table, so a hash collision between two queue names
//!   is reported instead of silently mixing their items, and operators can map a table back to its queue; and
//!   (version 3) the table's layout, so a table made by an older build is upgraded when it is next opened.
//! - `lessor_dedup` (version 3, replaced in version 5 by `lessor_dedup_keys` and `lessor_dedup_secret`): the dedup
//!   records of every queue, keyed by a 128-bit keyed hash of `(queue, dedup_id)` (see [`super::dedup`]), so that
//!   servers producing into different partitions of one queue agree on which item a key stored.
//! - `lessor_dropped_partitions` (version 6): the item tables dropped by a destroy, so that a server which still
//!   serves the queue (or loads it while the delete runs) cannot create them again by opening them: only
//!   [`PartitionStore::create`](lessor_core::storage::PartitionStore::create) does (see [`ensure_partition`]).
//! - (version 7) the incarnation of each registered and each dropped table (see [`incarnation_table_name`]).
//! - `items_<12 hex digits of md5(queue)>_<incarnation, hex>_<partition, 6 digits>` and its id sequence: one
//!   partition's items, of one incarnation of the queue, created when the queue or partition is created (see
//!   [`partition_ddl`]); `items_<12 hex digits>_<partition>` for the tables made before incarnations (version 6 and
//!   earlier), which are used on as they are.
//!
//! Timestamps are `BIGINT` microseconds since the Unix epoch (exactly [`lessor_core::time::Ts`]), 0 meaning unset,
//! so values round-trip bit for bit and the partial-index predicates compare integers.

use lessor_core::error::{StorageError, StorageErrorKind};
use std::collections::HashMap;

use md5::{Digest, Md5};
use tokio_postgres::error::SqlState;

use super::pool::{pg_err, prepare, Shared, Tx};

/// Lock key of the migrations (a single-bigint advisory lock; "lessor" in ASCII).
const MIGRATION_LOCK: i64 = 0x6c65_7373_6f72;
/// First key of the per-table DDL locks (two-int advisory locks, a key space apart from the single-bigint one);
/// the second key is `hashtext(table name)`.
const TABLE_LOCK_CLASS: i32 = 0x6c73_7372;

/// The migrations, in order; `lessor_schema.version` counts how many ran. Append only: never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: queue definitions and the partition table registry. Plain CREATE TABLE: a `queues` table that exists
    // without a schema version belongs to someone else (Querator's has other columns), and must stop us loudly.
    r#"
    CREATE TABLE queues (
        name TEXT COLLATE "C" PRIMARY KEY,
        namespace TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        dead_queue TEXT NOT NULL DEFAULT '',
        reference TEXT NOT NULL DEFAULT '',
        lease_timeout_ns BIGINT NOT NULL,
        expire_timeout_ns BIGINT NOT NULL,
        max_attempts BIGINT NOT NULL DEFAULT 0,
        requested_partitions BIGINT NOT NULL DEFAULT 0,
        partition_info JSONB NOT NULL DEFAULT '[]'::jsonb
    );
    CREATE TABLE lessor_partitions (
        table_name TEXT PRIMARY KEY,
        queue TEXT NOT NULL,
        partition BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    "#,
    // 2: the auth store (see `super::auth`): ordered keys and values, and the generation every server polls.
    r#"
    CREATE TABLE lessor_auth (
        key BYTEA PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE lessor_auth_generation (
        singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
        generation BIGINT NOT NULL
    );
    INSERT INTO lessor_auth_generation (singleton, generation) VALUES (true, 0);
    "#,
    // 3: issue 10. Queue settings for dedup, retry backoff, pause and the longest lease extension (zero values
    // mean "off" or "the default", so existing queues keep their behaviour); the layout version of each item table
    // (1: before priorities, see `partition_ddl`), looked up by queue when a queue's last table goes; and the
    // queue-wide dedup records (see `super::partition`), expired ones found by `(queue, until)`.
    r#"
    ALTER TABLE queues
        ADD COLUMN dedup_window_ns BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN backoff_base_ns BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN backoff_factor DOUBLE PRECISION NOT NULL DEFAULT 0,
        ADD COLUMN backoff_max_ns BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN backoff_jitter DOUBLE PRECISION NOT NULL DEFAULT 0,
        ADD COLUMN paused BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN max_lease_timeout_ns BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE lessor_partitions ADD COLUMN layout INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX lessor_partitions_queue ON lessor_partitions (queue);
    CREATE TABLE lessor_dedup (
        queue TEXT COLLATE "C" NOT NULL,
        dedup_id TEXT COLLATE "C" NOT NULL,
        item_id BIGINT NOT NULL,
        partition BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        until BIGINT NOT NULL,
        PRIMARY KEY (queue, dedup_id)
    ) WITH (
        autovacuum_vacuum_scale_factor = 0.02,
        autovacuum_analyze_scale_factor = 0.05
    );
    CREATE INDEX lessor_dedup_until ON lessor_dedup (queue, until);
    "#,
    // 4: issue 11. A queue being filled by a restore (`QueueInfo::restoring`).
    r#"
    ALTER TABLE queues ADD COLUMN restoring BOOLEAN NOT NULL DEFAULT false;
    "#,
    // 5: dedup records keyed by a 128-bit keyed hash of (queue, key) (see `super::dedup`), and the queue's 64-bit
    // id instead of its name: 16 bytes of integers in the unique index instead of two strings, 16 in the prune index
    // instead of a string and 8. The secret row is written by `migrate` (from the operating system's random source)
    // and the version-3 records are moved over by `convert_dedup_records`, which then drops `lessor_dedup`.
    r#"
    CREATE TABLE lessor_dedup_secret (
        singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
        secret BYTEA NOT NULL
    );
    CREATE TABLE lessor_dedup_keys (
        h1 BIGINT NOT NULL,
        h2 BIGINT NOT NULL,
        queue_id BIGINT NOT NULL,
        item_id BIGINT NOT NULL,
        partition BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        until BIGINT NOT NULL,
        PRIMARY KEY (h1, h2)
    ) WITH (
        autovacuum_vacuum_scale_factor = 0.02,
        autovacuum_analyze_scale_factor = 0.05
    );
    CREATE INDEX lessor_dedup_keys_until ON lessor_dedup_keys (queue_id, until);
    "#,
    // 6: tombstones of dropped item tables (see `ensure_partition`): a table named here is made again only by the
    // create of its queue or partition, never by an open. `dropped_at` (microseconds) lets old tombstones go
    // (`purge_tombstones`).
    r#"
    CREATE TABLE lessor_dropped_partitions (
        table_name TEXT PRIMARY KEY,
        queue TEXT NOT NULL,
        partition BIGINT NOT NULL,
        dropped_at BIGINT NOT NULL
    );
    CREATE INDEX lessor_dropped_partitions_at ON lessor_dropped_partitions (dropped_at);
    "#,
    // 7: the incarnation (the queue definition's `created_at`, see `incarnation_table_name`) each item table and
    // tombstone belongs to; 0 for those of the earlier versions, which named no incarnation.
    r#"
    ALTER TABLE lessor_partitions ADD COLUMN incarnation BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE lessor_dropped_partitions ADD COLUMN incarnation BIGINT NOT NULL DEFAULT 0;
    "#,
];

/// The version whose migration creates `lessor_dedup_keys` (and after which version-3 records are converted).
const DEDUP_KEYS_VERSION: usize = 5;

/// The DDL of migrations 1 to `version`, for tests that build a database as an older build left it.
#[doc(hidden)]
pub fn migrations_up_to(version: usize) -> String {
    MIGRATIONS[..version.min(MIGRATIONS.len())].concat()
}

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Runs the migrations once per pool; a failure is not remembered, so the next call tries again.
pub(crate) async fn ensure(shared: &Shared) -> Result<(), StorageError> {
    shared
        .schema
        .get_or_try_init(|| migrate(shared))
        .await
        .map(|_| ())
}

async fn migrate(shared: &Shared) -> Result<(), StorageError> {
    let conn = shared.conn().await?;
    // Fast path without locks or DDL: a database already at this version needs nothing, and a role without CREATE
    // rights can then run on a schema an administrator migrated.
    match conn.query_opt("SELECT version FROM lessor_schema", &[]).await {
        Ok(Some(r)) => {
            let v: i32 = r.try_get(0).map_err(pg_err)?;
            if v == SCHEMA_VERSION {
                return Ok(());
            }
        }
        Ok(None) => {}
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {}
        Err(e) => return Err(pg_err(e)),
    }
    let setup = format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
         CREATE TABLE IF NOT EXISTS lessor_schema (
             singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
             version INTEGER NOT NULL
         );"
    );
    let tx = Tx::begin_simple(conn, &setup).await?;
    let read = prepare(tx.conn()?, "SELECT version FROM lessor_schema").await?;
    let (tx, rows) = tx.query(&read, &[]).await?;
    let current: i32 = match rows.first() {
        Some(r) => r.try_get(0).map_err(pg_err)?,
        None => 0,
    };
    if current > SCHEMA_VERSION {
        tx.rollback().await;
        return Err(StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "postgres: the database schema is at version {current}, newer than this build's {SCHEMA_VERSION}; \
                 upgrade lessor"
            ),
        ));
    }
    if current == SCHEMA_VERSION {
        return tx.commit().await;
    }
    let mut tx = tx;
    for (i, ddl) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        tracing::info!(version = i + 1, "postgres: migrating the schema");
        tx = tx.batch(ddl).await?;
        if i + 1 == DEDUP_KEYS_VERSION {
            let mut secret = [0u8; super::dedup::SECRET_LEN];
            getrandom::fill(&mut secret).map_err(|e| {
                StorageError::other(format!("postgres: no OS randomness for the dedup secret: {e}"))
            })?;
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            tx = tx
                .batch(&format!(
                    "INSERT INTO lessor_dedup_secret (singleton, secret) VALUES (true, '\\x{hex}'::bytea)"
                ))
                .await?;
            tx = convert_dedup_records(tx, &super::dedup::DedupSecret::new(&secret)).await?;
        }
    }
    let write = prepare(
        tx.conn()?,
        "INSERT INTO lessor_schema (singleton, version) VALUES (true, $1)
         ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version",
    )
    .await?;
    tx.query_commit(&write, &[&SCHEMA_VERSION]).await?;
    Ok(())
}

/// Records moved per statement by [`convert_dedup_records`].
const CONVERT_BATCH: i64 = 10_000;

/// Moves the dedup records of `lessor_dedup` (version 3) to `lessor_dedup_keys` under their hashes, in pages of
/// [`CONVERT_BATCH`] records, then drops the old table; inside the migration's transaction, so a failure leaves the
/// database at the old version with its records. A server of an older build still running on the database then
/// fails its keyed produces (the table it writes is gone) instead of storing duplicates that the new records would
/// not know about.
async fn convert_dedup_records(tx: Tx, secret: &super::dedup::DedupSecret) -> Result<Tx, StorageError> {
    let page = prepare(
        tx.conn()?,
        "DELETE FROM lessor_dedup d
         WHERE (d.queue, d.dedup_id) IN (SELECT queue, dedup_id FROM lessor_dedup ORDER BY queue, dedup_id LIMIT $1)
         RETURNING d.queue, d.dedup_id, d.item_id, d.partition, d.created_at, d.until",
    )
    .await?;
    let insert = prepare(
        tx.conn()?,
        "INSERT INTO lessor_dedup_keys (h1, h2, queue_id, item_id, partition, created_at, until)
         SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
         ON CONFLICT (h1, h2) DO NOTHING",
    )
    .await?;
    let mut tx = tx;
    let mut moved = 0u64;
    let mut keys: HashMap<String, super::dedup::QueueKeys> = HashMap::new();
    loop {
        let (next, rows) = tx.query(&page, &[&CONVERT_BATCH]).await?;
        tx = next;
        if rows.is_empty() {
            break;
        }
        let mut cols: [Vec<i64>; 7] = Default::default();
        for r in &rows {
            let queue: String = r.try_get(0).map_err(pg_err)?;
            let key: String = r.try_get(1).map_err(pg_err)?;
            let q = keys.entry(queue).or_insert_with_key(|queue| secret.queue(queue));
            let (h1, h2) = q.key(&key);
            cols[0].push(h1);
            cols[1].push(h2);
            cols[2].push(q.id);
            for (c, i) in (3..7).zip(2..6) {
                cols[c].push(r.try_get(i).map_err(pg_err)?);
            }
        }
        moved += rows.len() as u64;
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = cols
            .iter()
            .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let (next, _) = tx.query(&insert, &params).await?;
        tx = next;
    }
    if moved > 0 {
        tracing::info!(
            records = moved,
            "postgres: moved the dedup records to their hashed table"
        );
    }
    tx.batch("DROP TABLE lessor_dedup").await
}

/// The database's dedup secret, read once per pool (after the migrations, which write it).
pub(crate) async fn dedup_secret(shared: &Shared) -> Result<super::dedup::DedupSecret, StorageError> {
    ensure(shared).await?;
    shared
        .dedup
        .get_or_try_init(|| async {
            let conn = shared.conn().await?;
            let row = conn
                .query_opt("SELECT secret FROM lessor_dedup_secret", &[])
                .await
                .map_err(pg_err)?
                .ok_or_else(|| {
                    StorageError::new(
                        StorageErrorKind::Corrupt,
                        "postgres: lessor_dedup_secret has no row",
                    )
                })?;
            let secret: Vec<u8> = row.try_get(0).map_err(pg_err)?;
            if secret.len() != super::dedup::SECRET_LEN {
                return Err(StorageError::new(
                    StorageErrorKind::Corrupt,
                    format!(
                        "postgres: the dedup secret has {} bytes, not {}",
                        secret.len(),
                        super::dedup::SECRET_LEN
                    ),
                ));
            }
            Ok(super::dedup::DedupSecret::new(&secret))
        })
        .await
        .cloned()
}

/// The item table of partition `partition` of `queue`: `items_<first 12 hex digits of md5(queue)>_<partition>`, the
/// partition zero-padded to 6 digits (`hello`, 0 -> `items_5d41402abc4b_000000`). Only `[a-z0-9_]`, so the name is
/// safe to splice into SQL unquoted.
pub fn table_name(queue: &str, partition: u32) -> String {
    format!("items_{}_{partition:06}", queue_hash(queue))
}

fn queue_hash(queue: &str) -> String {
    let digest = Md5::digest(queue.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The item table of partition `partition` of the incarnation `incarnation` of `queue` (the `created_at` of its
/// definition, in microseconds): `items_<12 hex digits of md5(queue)>_<incarnation, hex>_<partition, 6 digits>`, or
/// [`table_name`] for incarnation 0 (the tables made before incarnations, and stores used without them).
///
/// A queue deleted and created again under its name is another incarnation, so its tables are others: a delete of
/// the old one that another server runs late (it read the old definition before the delete and the create) drops
/// the old tables only, and a server still serving the old queue finds its tables gone (its calls fail) instead of
/// storing into the new queue's. At most 46 characters, 53 with the sequence's suffix: within PostgreSQL's 63.
pub fn incarnation_table_name(queue: &str, partition: u32, incarnation: i64) -> String {
    if incarnation == 0 {
        return table_name(queue, partition);
    }
    // As unsigned: a creation time before 1970 (a restored definition's) still names one table.
    let inc = incarnation as u64;
    format!("items_{}_{inc:x}_{partition:06}", queue_hash(queue))
}

/// The layout of item tables this build creates: 2 added `priority` and the `_ready_p` index (replacing `_ready`).
/// Tables registered with an older layout are upgraded by [`ensure_partition`] (see [`upgrade_ddl`]).
pub const PARTITION_LAYOUT: i32 = 2;

/// DDL of one item table, its id sequence and its indexes; idempotent.
///
/// Columns follow Querator's layout, adapted: `id` is a `BIGINT` from the table's own sequence (started at the
/// current time in microseconds, so a deleted and re-created queue never hands out an id an old consumer may still
/// hold), timestamps are `BIGINT` microseconds with 0 for unset, `dead` marks items waiting for the dead-letter
/// queue, and `payload_len` keeps stats from reading payloads (negative for an offloaded payload: minus the length of
/// the payload its object reference stands for, so stats count the object tier apart; see `sql::payload_len`).
///
/// Each partial index serves one state, so every hot query reads the head of one index:
/// - `_src`: unique source ids (idempotent dead-letter moves, `ON CONFLICT`);
/// - `_ready_p`: lease order, highest priority first then FIFO (covers created_at and payload_len, for counts and
///   stats);
/// - `_leased`: lease expiry order;
/// - `_sched`: schedule order (FIFO among equal times);
/// - `_expire`: expire-deadline order of ready and leased items;
/// - `_dead`: items waiting for transfer.
pub(crate) fn partition_ddl(table: &str, first_id: i64) -> String {
    format!(
        r#"
        CREATE SEQUENCE IF NOT EXISTS {table}_id_seq START WITH {first_id};
        CREATE TABLE IF NOT EXISTS {table} (
            id BIGINT PRIMARY KEY DEFAULT nextval('{table}_id_seq'),
            source_id TEXT,
            is_leased BOOLEAN NOT NULL DEFAULT false,
            lease_deadline BIGINT NOT NULL DEFAULT 0,
            expire_deadline BIGINT NOT NULL,
            enqueue_at BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            max_attempts BIGINT NOT NULL DEFAULT 0,
            reference TEXT NOT NULL DEFAULT '',
            encoding TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL DEFAULT '',
            payload BYTEA NOT NULL,
            payload_len BIGINT NOT NULL DEFAULT 0,
            dead BOOLEAN NOT NULL DEFAULT false,
            priority SMALLINT NOT NULL DEFAULT 0
        ) WITH (
            -- Every item is inserted, updated and deleted within minutes: vacuum well before the default 20%
            -- of dead rows, so index heads stay short.
            autovacuum_vacuum_scale_factor = 0.02,
            autovacuum_analyze_scale_factor = 0.05
        );
        ALTER SEQUENCE {table}_id_seq OWNED BY {table}.id;
        CREATE UNIQUE INDEX IF NOT EXISTS {table}_src ON {table} (source_id) WHERE source_id IS NOT NULL;
        CREATE INDEX IF NOT EXISTS {table}_ready_p ON {table} (priority DESC, id) INCLUDE (created_at, payload_len)
            WHERE {ready};
        CREATE INDEX IF NOT EXISTS {table}_leased ON {table} (lease_deadline, id) INCLUDE (created_at, payload_len)
            WHERE is_leased AND NOT dead;
        CREATE INDEX IF NOT EXISTS {table}_sched ON {table} (enqueue_at, id) INCLUDE (payload_len)
            WHERE enqueue_at <> 0 AND NOT dead;
        CREATE INDEX IF NOT EXISTS {table}_expire ON {table} (expire_deadline, id)
            WHERE enqueue_at = 0 AND NOT dead;
        CREATE INDEX IF NOT EXISTS {table}_dead ON {table} (id) WHERE dead;
        "#,
        ready = super::sql::READY,
    )
}

/// DDL that brings a table of layout 1 to [`PARTITION_LAYOUT`]; idempotent.
///
/// Adding a column with a constant default only writes the catalog. The new ready index is built inside the same
/// transaction, so the table is locked for the time of one pass over it (measured in docs/benchmarks.md): item
/// tables are queues, mostly small. `CREATE INDEX CONCURRENTLY` would not block, but it cannot run inside the
/// transaction that holds the table's advisory lock, and concurrent builds on several tables wait for each other.
/// The old `_ready` index goes, so that produce and requeue do not maintain two ready indexes.
pub(crate) fn upgrade_ddl(table: &str) -> String {
    format!(
        r#"
        ALTER TABLE {table} ADD COLUMN IF NOT EXISTS priority SMALLINT NOT NULL DEFAULT 0;
        CREATE INDEX IF NOT EXISTS {table}_ready_p ON {table} (priority DESC, id) INCLUDE (created_at, payload_len)
            WHERE {ready};
        DROP INDEX IF EXISTS {table}_ready;
        "#,
        ready = super::sql::READY,
    )
}

fn owner_mismatch(table: &str, queue: &str, partition: u32, owner: &Owner) -> StorageError {
    StorageError::new(
        StorageErrorKind::Config,
        format!(
            "postgres: table {table} for queue '{queue}' partition {partition} already holds queue '{}' \
             partition {} (the queue names' md5 prefixes collide; rename one queue)",
            owner.queue, owner.partition
        ),
    )
}

/// Why [`ensure_partition`] is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ensure {
    /// The queue or partition is being created (`PartitionStore::create`, before its definition is stored): the
    /// table is made, fresh if a destroy dropped it before.
    Create,
    /// A server opens a partition it serves (`PartitionStore::open`): an existing table is used (and upgraded); a
    /// dropped one is refused, never made again.
    Open,
}

/// How long the tombstone of a dropped table is kept (see [`purge_tombstones`]).
///
/// A tombstone only has to outlive the servers that may still open the partition after its queue was deleted (or
/// its partition moved): those that loaded the definition before the delete. Each of them re-reads the definition
/// every `shared_refresh` (half a second) before it opens anything, and stops serving a queue whose definition is
/// gone, so a day is ample even for a server whose queue store was unreachable meanwhile. A queue whose definition
/// outlived its partitions (its delete failed after the drops, and was not retried) serves again, empty, after that
/// long, as before tombstones. A queue created again under the name is another incarnation with other tables (see
/// [`incarnation_table_name`]): no tombstone of the old one ever refuses it.
const TOMBSTONE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Whom a registered table belongs to.
struct Owner {
    queue: String,
    partition: i64,
    incarnation: i64,
}

/// The state of an item table as [`ensure_partition`] reads it.
struct TableState {
    /// The registration, when the table is registered.
    owner: Option<Owner>,
    layout: Option<i32>,
    exists: bool,
    /// A destroy of this incarnation of the queue's partition dropped the table, and no create made it again since.
    dropped: bool,
}

/// The query behind [`TableState`]: one row for any table name.
const TABLE_STATE: &str =
    "SELECT p.queue, p.partition, p.incarnation, p.layout, to_regclass(x.t) IS NOT NULL,
            d.queue IS NOT NULL AND d.queue = $2 AND d.partition = $3 AND d.incarnation = $4
     FROM (SELECT $1::text AS t) x
     LEFT JOIN lessor_partitions p ON p.table_name = x.t
     LEFT JOIN lessor_dropped_partitions d ON d.table_name = x.t";

fn table_state(r: &tokio_postgres::Row) -> Result<TableState, StorageError> {
    let queue: Option<String> = r.try_get(0).map_err(pg_err)?;
    let partition: Option<i64> = r.try_get(1).map_err(pg_err)?;
    let incarnation: Option<i64> = r.try_get(2).map_err(pg_err)?;
    Ok(TableState {
        owner: queue.zip(partition).map(|(queue, partition)| Owner {
            queue,
            partition,
            incarnation: incarnation.unwrap_or(0),
        }),
        layout: r.try_get(3).map_err(pg_err)?,
        exists: r.try_get(4).map_err(pg_err)?,
        dropped: r.try_get(5).map_err(pg_err)?,
    })
}

impl TableState {
    /// The registration names another queue, partition or incarnation: a hash collision of two queue names.
    fn foreign(&self, queue: &str, partition: i64, incarnation: i64) -> Option<&Owner> {
        self.owner
            .as_ref()
            .filter(|o| o.queue != queue || o.partition != partition || o.incarnation != incarnation)
    }
}

fn dropped_error(table: &str, queue: &str, partition: u32) -> StorageError {
    StorageError::other(format!(
        "postgres: partition {partition} of queue '{queue}' (table {table}) was destroyed (the queue was deleted or \
         the partition moved); only creating the queue or partition again makes it"
    ))
}

/// Reads the state of `table` (registered, if at all, to `queue`, `partition`, `incarnation`) outside any lock.
async fn read_state(
    conn: &deadpool_postgres::Object,
    table: &str,
    queue: &str,
    part: i64,
    incarnation: i64,
) -> Result<TableState, StorageError> {
    let check = prepare(conn, TABLE_STATE).await?;
    let rows = conn
        .query(&check, &[&table, &queue, &part, &incarnation])
        .await
        .map_err(pg_err)?;
    let r = rows
        .first()
        .ok_or_else(|| StorageError::other("postgres: no partition state row"))?;
    table_state(r)
}

/// Makes partition `partition` of the incarnation `incarnation` of `queue` ready to use, and returns its table:
/// creates the table when `why` is [`Ensure::Create`] (fresh when a destroy dropped it), and upgrades a table an
/// older build made.
///
/// An open never makes a table a destroy dropped. The engine deletes a queue's partitions before its definition, and
/// another server may still serve the queue (it notices the delete within `shared_refresh`) or load it from the
/// definition meanwhile; when an open created missing tables, such a server made the deleted queue's tables again,
/// stored items into them (acknowledged), and a queue created later under the name found them (with their dedup
/// records kept). The tombstone in `lessor_dropped_partitions`, written in the drop's transaction and cleared in
/// the create's, under the table's advisory lock, makes the open fail instead (the server's produce fails, nothing is
/// acknowledged), and a create after it starts from an empty table. An open of a table never created nor dropped
/// still creates it (a queue defined by a build from before `create`, and tests that open without creating).
///
/// Tombstones and tables are per incarnation (see [`incarnation_table_name`]): when the tables were named by queue
/// and partition alone, a delete of the old queue still running on another server (it read the old definition)
/// dropped and tombstoned the tables that a create of the name had just made, and the new queue's opens were refused
/// for a day, or its acknowledged items dropped. An open of an incarnation that has no table of its name (a queue
/// created before incarnations) uses the partition's table of incarnation 0, unless a destroy dropped that one.
///
/// Checks first without locking, so opening an existing, current partition costs one query; several servers
/// opening it at once serialise on the table's advisory lock, and the later ones find the work done.
pub(crate) async fn ensure_partition(
    shared: &Shared,
    queue: &str,
    partition: u32,
    incarnation: i64,
    first_id: i64,
    why: Ensure,
) -> Result<String, StorageError> {
    ensure(shared).await?;
    let table = incarnation_table_name(queue, partition, incarnation);
    let conn = shared.conn().await?;
    let part = i64::from(partition);
    let s = read_state(&conn, &table, queue, part, incarnation).await?;
    if let Some(owner) = s.foreign(queue, part, incarnation) {
        return Err(owner_mismatch(&table, queue, partition, owner));
    }
    if s.dropped && why == Ensure::Open {
        return Err(dropped_error(&table, queue, partition));
    }
    if !s.dropped && s.exists && s.owner.is_some() && s.layout.is_some_and(|l| l >= PARTITION_LAYOUT) {
        return Ok(table);
    }
    if why == Ensure::Open && incarnation != 0 && !s.dropped && !s.exists && s.owner.is_none() {
        // A queue created before incarnations keeps its tables of incarnation 0; one a destroy dropped is refused
        // as any other (a delete by a build from before incarnations tombstoned that name only).
        let legacy = table_name(queue, partition);
        let l = read_state(&conn, &legacy, queue, part, 0).await?;
        if l.dropped {
            return Err(dropped_error(&legacy, queue, partition));
        }
        if l.exists && l.foreign(queue, part, 0).is_none() {
            drop(conn);
            return Box::pin(ensure_partition(shared, queue, partition, 0, first_id, why)).await;
        }
    }
    let lock = format!("SELECT pg_advisory_xact_lock({TABLE_LOCK_CLASS}, hashtext('{table}'))");
    let tx = Tx::begin_simple(conn, &lock).await?;
    // Read again under the lock: another server may have created, upgraded or dropped the table meanwhile.
    let state = prepare(tx.conn()?, TABLE_STATE).await?;
    let (tx, rows) = tx.query(&state, &[&table, &queue, &part, &incarnation]).await?;
    let r = rows
        .first()
        .ok_or_else(|| StorageError::other("postgres: no partition state row"))?;
    let s = table_state(r)?;
    if let Some(owner) = s.foreign(queue, part, incarnation) {
        let e = owner_mismatch(&table, queue, partition, owner);
        tx.rollback().await;
        return Err(e);
    }
    let ddl = if s.dropped {
        if why == Ensure::Open {
            tx.rollback().await;
            return Err(dropped_error(&table, queue, partition));
        }
        // A table that exists in spite of the tombstone was made by a build from before tombstones while the
        // queue was being deleted: what it holds belongs to the deleted queue, and the new one starts empty.
        format!(
            "DROP TABLE IF EXISTS {table}; DROP SEQUENCE IF EXISTS {table}_id_seq;
             DELETE FROM lessor_dropped_partitions WHERE table_name = '{table}';
             {}",
            partition_ddl(&table, first_id)
        )
    } else if !s.exists {
        partition_ddl(&table, first_id)
    } else if s.owner.is_none() || s.layout.is_none_or(|l| l < PARTITION_LAYOUT) {
        // A table without a registration row can only be ours from before registration was atomic; upgrading
        // it is idempotent either way.
        upgrade_ddl(&table)
    } else {
        tx.commit().await?;
        return Ok(table);
    };
    let tx = tx.batch(&ddl).await?;
    // A new registration, or a layout upgrade of the existing one (which keeps its creation time).
    let register = prepare(
        tx.conn()?,
        "INSERT INTO lessor_partitions (table_name, queue, partition, created_at, layout, incarnation)
         VALUES ($1, $2, $3, $4, $5, $7)
         ON CONFLICT (table_name) DO UPDATE SET layout = EXCLUDED.layout,
            created_at = CASE WHEN $6::bool THEN EXCLUDED.created_at ELSE lessor_partitions.created_at END",
    )
    .await?;
    // The registration's creation time, in microseconds (the first id is that plus the partition's offset).
    let created_at = i64::try_from(lessor_core::types::ItemId::floor_now().0).unwrap_or(i64::MAX);
    let fresh = s.dropped || !s.exists;
    tx.query_commit(
        &register,
        &[
            &table,
            &queue,
            &part,
            &created_at,
            &PARTITION_LAYOUT,
            &fresh,
            &incarnation,
        ],
    )
    .await?;
    if fresh {
        tracing::info!(
            queue,
            partition,
            incarnation,
            table,
            "postgres: created partition table"
        );
    } else {
        tracing::info!(
            queue,
            partition,
            incarnation,
            table,
            layout = PARTITION_LAYOUT,
            "postgres: upgraded partition table"
        );
    }
    Ok(table)
}

/// Destroys partition `partition` of the incarnation `incarnation` of `queue`: drops its table and leaves the
/// table's tombstone (see [`drop_table`]). Another incarnation's table stays: a delete of the old queue that runs
/// late never touches a queue created again under the name. A partition of an incarnation other than 0 may still
/// live in its table of incarnation 0 (a queue created before incarnations, see [`ensure_partition`]), which is
/// dropped too: only such a queue, the oldest of its name since the upgrade, ever has one (no build that knows
/// incarnations makes a table of incarnation 0 for the engine), so it is this delete's or was dropped already.
pub(crate) async fn drop_partition(
    shared: &Shared,
    queue: &str,
    partition: u32,
    incarnation: i64,
) -> Result<(), StorageError> {
    drop_table(shared, queue, partition, incarnation).await?;
    if incarnation != 0 {
        drop_table(shared, queue, partition, 0).await?;
    }
    Ok(())
}

/// Drops a partition's table of one incarnation and its sequence, and leaves its tombstone (see
/// [`ensure_partition`]), in one transaction under the table's advisory lock. A table registered to another queue
/// (a hash collision) is left alone. A partition that has no table gets its tombstone all the same: a server may be
/// about to open it.
async fn drop_table(
    shared: &Shared,
    queue: &str,
    partition: u32,
    incarnation: i64,
) -> Result<(), StorageError> {
    ensure(shared).await?;
    let table = incarnation_table_name(queue, partition, incarnation);
    let conn = shared.conn().await?;
    let lock = format!("SELECT pg_advisory_xact_lock({TABLE_LOCK_CLASS}, hashtext('{table}'))");
    let tx = Tx::begin_simple(conn, &lock).await?;
    let owner = prepare(
        tx.conn()?,
        "SELECT queue, partition, incarnation FROM lessor_partitions WHERE table_name = $1",
    )
    .await?;
    let (tx, rows) = tx.query(&owner, &[&table]).await?;
    if let Some(r) = rows.first() {
        let owner: String = r.try_get(0).map_err(pg_err)?;
        let owner_part: i64 = r.try_get(1).map_err(pg_err)?;
        let owner_inc: i64 = r.try_get(2).map_err(pg_err)?;
        if owner != queue || owner_part != i64::from(partition) || owner_inc != incarnation {
            tx.rollback().await;
            return Ok(());
        }
    }
    let tx = tx
        .batch(&format!(
            "DROP TABLE IF EXISTS {table}; DROP SEQUENCE IF EXISTS {table}_id_seq;"
        ))
        .await?;
    let unregister = prepare(
        tx.conn()?,
        "WITH gone AS (DELETE FROM lessor_partitions WHERE table_name = $1)
         INSERT INTO lessor_dropped_partitions (table_name, queue, partition, dropped_at, incarnation)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (table_name) DO UPDATE
            SET queue = EXCLUDED.queue, partition = EXCLUDED.partition, dropped_at = EXCLUDED.dropped_at,
                incarnation = EXCLUDED.incarnation",
    )
    .await?;
    tx.query_commit(
        &unregister,
        &[&table, &queue, &i64::from(partition), &now_micros(), &incarnation],
    )
    .await?;
    Ok(())
}

fn now_micros() -> i64 {
    i64::try_from(lessor_core::types::ItemId::floor_now().0).unwrap_or(i64::MAX)
}

/// Forgets the tombstones older than [`TOMBSTONE_TTL`], so that a database whose queues come and go under ever new
/// names keeps a bounded number of them. After a destroy; a failure is only logged.
pub(crate) async fn purge_tombstones(shared: &Shared) {
    let purged = async {
        let conn = shared.conn().await?;
        let stmt = prepare(
            &conn,
            "DELETE FROM lessor_dropped_partitions WHERE dropped_at < $1",
        )
        .await?;
        let horizon =
            now_micros().saturating_sub(i64::try_from(TOMBSTONE_TTL.as_micros()).unwrap_or(i64::MAX));
        conn.execute(&stmt, &[&horizon]).await.map_err(pg_err)
    }
    .await;
    if let Err(e) = purged {
        tracing::debug!(error = %e, "postgres: old tombstones of dropped tables not purged");
    }
}

/// Rows deleted per statement when a queue's dedup records go.
const DEDUP_DROP_BATCH: i64 = 10_000;

/// Deletes the dedup records of `queue` once no table of it is registered (its last partition was destroyed), in
/// bounded statements so no transaction grows with the number of keys. Called after partitions are dropped, not
/// in the drops' transactions: concurrent drops of a queue's last tables would each still see the others.
pub(crate) async fn drop_queue_dedup(shared: &Shared, queue: &str) -> Result<(), StorageError> {
    let queue_id = dedup_secret(shared).await?.queue(queue).id;
    let conn = shared.conn().await?;
    let stmt = prepare(
        &conn,
        "WITH d AS MATERIALIZED (
            SELECT ctid FROM lessor_dedup_keys
            WHERE queue_id = $1 AND NOT EXISTS (SELECT 1 FROM lessor_partitions WHERE queue = $3)
            ORDER BY until LIMIT $2 FOR UPDATE SKIP LOCKED),
         gone AS (
            DELETE FROM lessor_dedup_keys x WHERE x.ctid = ANY(ARRAY(SELECT ctid FROM d)) RETURNING 1)
         SELECT count(*) FROM gone",
    )
    .await?;
    loop {
        let row = conn
            .query_one(&stmt, &[&queue_id, &DEDUP_DROP_BATCH, &queue])
            .await
            .map_err(pg_err)?;
        let n: i64 = row.try_get(0).map_err(pg_err)?;
        if n < DEDUP_DROP_BATCH {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_follow_the_documented_scheme() {
        assert_eq!(table_name("hello", 0), "items_5d41402abc4b_000000");
        assert_eq!(table_name("hello", 1), "items_5d41402abc4b_000001");
        assert_eq!(table_name("hello", 1_234_567), "items_5d41402abc4b_1234567");
    }
}
