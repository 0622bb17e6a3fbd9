//! Connection pools shared by every postgres store of the process, the error mapping, and the transaction helper.
//!
//! Stores built from the same connection string share one pool (a registry keyed by the string holds weak
//! references, so a pool closes when its last store lets go). Pools connect lazily: building one never touches the
//! network, so the server starts while the database is down, and every call made while it is down fails with
//! [`StorageErrorKind::Unavailable`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use lessor_core::error::{StorageError, StorageErrorKind};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

/// Settings of one postgres store (`config:` of a `queue-storage` or `partition-storage` entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgConfig {
    /// libpq URI or key=value string (`connection-string`). TLS follows libpq's `sslmode` (`disable`, `prefer`
    /// (the default), `require`, `verify-ca`, `verify-full`) and `sslrootcert`: see [`super::tls`].
    pub connection_string: String,
    /// Most connections the pool opens (`max-conns`); `None` or 0 means [`PgConfig::DEFAULT_MAX_CONNS`]. When
    /// several stores share a connection string, the first one to build the pool sets its size.
    pub max_conns: Option<u32>,
}

impl PgConfig {
    /// Pool size when `max-conns` is not given: enough for a few busy partitions per server without crowding
    /// PostgreSQL's default `max_connections` of 100 when several servers share it.
    pub const DEFAULT_MAX_CONNS: u32 = 10;

    /// A configuration with the default pool size.
    pub fn new(connection_string: impl Into<String>) -> Self {
        PgConfig {
            connection_string: connection_string.into(),
            max_conns: None,
        }
    }

    /// Sets `max-conns`.
    pub fn with_max_conns(mut self, max_conns: u32) -> Self {
        self.max_conns = Some(max_conns);
        self
    }
}

/// How long a connection attempt may take when the connection string does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for a free pooled connection before reporting the store unavailable.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait of one statement for a lock (`lock_timeout`, in milliseconds), unless the connection string's
/// `options` set another. Lessor's own statements hold their row and table locks for milliseconds, so a longer wait
/// means someone else holds the table: an operator's `LOCK TABLE`, a `VACUUM FULL`, an `ALTER TABLE` queued behind
/// a long transaction. Without a bound the statement waited for as long as that lasted, and with it the queue's
/// task, whose lease and complete requests then went unanswered past their request timeout (and a lock on
/// `queues`, which every queue re-reads, stalled every queue). Past the bound the statement fails with
/// `lock_not_available`, which is transient: the request gets a 454 and the partition is probed again on its
/// backoff.
const LOCK_TIMEOUT_MS: u32 = 1000;
/// Unacknowledged data older than this makes the kernel drop the connection, so a database that vanished from the
/// network fails calls instead of hanging them for the default TCP retransmission time (about 15 minutes).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// One pool and what the stores on it learned once for all of them.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    /// Set once the schema migrations ran on this database; not set on failure, so the next call retries.
    pub(crate) schema: tokio::sync::OnceCell<()>,
    /// Notifications to and from the other servers on this database.
    pub(crate) notifier: Arc<super::notify::Notifier>,
    /// The database's dedup secret (see `super::dedup`), read once after the migrations.
    pub(crate) dedup: tokio::sync::OnceCell<super::dedup::DedupSecret>,
}

impl Shared {
    /// A pooled connection, or `Unavailable` when none can be had.
    pub(crate) async fn conn(&self) -> Result<Object, StorageError> {
        self.pool.get().await.map_err(pool_err)
    }
}

fn registry() -> &'static Mutex<HashMap<String, Weak<Shared>>> {
    static POOLS: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

/// The pool for `cfg.connection_string`, built on first use. Never connects.
pub(crate) fn acquire(cfg: &PgConfig) -> Result<Arc<Shared>, StorageError> {
    let mut pools = registry()
        .lock()
        .map_err(|_| StorageError::other("postgres pool registry poisoned by a panic"))?;
    pools.retain(|_, w| w.strong_count() > 0);
    if let Some(shared) = pools.get(&cfg.connection_string).and_then(Weak::upgrade) {
        if shared.pool.status().max_size != pool_size(cfg) {
            tracing::warn!(
                max_conns = shared.pool.status().max_size,
                "postgres: stores share a connection string but ask for different max-conns; the first one applies"
            );
        }
        return Ok(shared);
    }
    let (pool, config, connector) = build_pool(cfg)?;
    let shared = Arc::new(Shared {
        pool,
        schema: tokio::sync::OnceCell::new(),
        notifier: Arc::new(super::notify::Notifier::new(config, connector)),
        dedup: tokio::sync::OnceCell::new(),
    });
    pools.insert(cfg.connection_string.clone(), Arc::downgrade(&shared));
    Ok(shared)
}

fn pool_size(cfg: &PgConfig) -> usize {
    let n = match cfg.max_conns {
        None | Some(0) => PgConfig::DEFAULT_MAX_CONNS,
        Some(n) => n,
    };
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The pool, and the connection settings it uses (for the listening connection, which is not pooled).
fn build_pool(
    cfg: &PgConfig,
) -> Result<(Pool, tokio_postgres::Config, super::tls::RustlsConnect), StorageError> {
    // The driver knows neither verify-ca/verify-full nor sslrootcert: those are taken out here and enforced by the
    // rustls connector.
    let (conn, tls) = super::tls::split(&cfg.connection_string)?;
    let connector = super::tls::connector(&tls)?;
    let mut pg: tokio_postgres::Config = conn.parse().map_err(|e| {
        // The parse error may quote the string, which can hold a password: say only what is wrong.
        StorageError::new(
            StorageErrorKind::Config,
            format!("invalid connection-string: {e}"),
        )
    })?;
    pg.ssl_mode(tls.mode.driver_mode());
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // Every statement of this backend is written to be served by an index. A queue table swings between empty
    // and large faster than autovacuum re-analyses it, and a plan made while statistics said "empty" would read
    // the whole table on every call of the next burst; disabling sequential scans makes the planner take the index
    // path whatever the statistics say (it remains a cost penalty, not a hard ban).
    //
    // Generic plans always: every statement is prepared once per connection and written (and tested, see
    // `sql::tests`) to be served by its indexes whatever its parameters. Left to choose, PostgreSQL plans a statement
    // anew on each call when the generic plan's estimate looks worse than the custom ones, which the keyed produce's
    // does (array parameters of unknown length): planning it cost more than running it (0.45 ms of 0.65 ms).
    let session = "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan";
    // The lock wait bound goes first, so that a `-c lock_timeout=...` in the connection string's own options
    // (PostgreSQL applies them in order) replaces it.
    let opts = match pg.get_options() {
        Some(o) if !o.is_empty() => format!("-c lock_timeout={LOCK_TIMEOUT_MS} {o} {session}"),
        _ => format!("-c lock_timeout={LOCK_TIMEOUT_MS} {session}"),
    };
    pg.options(opts);
    if pg.get_application_name().is_none() {
        pg.application_name("lessor");
    }
    let listen = (pg.clone(), connector.clone());
    let manager = Manager::from_config(
        pg,
        connector,
        ManagerConfig {
            // `Fast` only checks that the socket is open; a connection broken since then fails its next call
            // with `Unavailable`, and the pool drops it on return.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(pool_size(cfg))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(WAIT_TIMEOUT))
        // Bounded by connect_timeout too; this also covers the authentication exchange.
        .create_timeout(Some(CONNECT_TIMEOUT * 2))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StorageError::new(StorageErrorKind::Config, format!("postgres pool: {e}")))?;
    Ok((pool, listen.0, listen.1))
}

/// Maps a pool failure: timeouts and a closed pool are transient, a backend error is classified by
/// [`pg_err`].
pub(crate) fn pool_err(e: PoolError) -> StorageError {
    match e {
        PoolError::Backend(e) => pg_err(e),
        PoolError::Timeout(t) => {
            StorageError::unavailable(format!("postgres: timed out ({t:?}) getting a connection"))
        }
        PoolError::Closed => StorageError::unavailable("postgres: pool closed"),
        PoolError::NoRuntimeSpecified => StorageError::new(StorageErrorKind::Config, "postgres: no runtime"),
        PoolError::PostCreateHook(e) => StorageError::unavailable(format!("postgres: {e}")),
    }
}

/// Maps a driver error to the kind the engine branches on.
///
/// Connection failures, timeouts, shutdowns and other conditions a later try can outlive are `Unavailable`; a full
/// disk is `NoSpace`; a unique violation is `AlreadyExists`; anything else is `Other` with the server's message.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StorageError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let msg = format!("postgres: {} ({})", db.message(), code.code());
        let kind = if *code == SqlState::DISK_FULL {
            StorageErrorKind::NoSpace
        } else if *code == SqlState::UNIQUE_VIOLATION {
            StorageErrorKind::AlreadyExists
        } else if transient_state(code) {
            StorageErrorKind::Unavailable
        } else {
            StorageErrorKind::Other
        };
        return StorageError::new(kind, msg).with_source(e);
    }
    // The driver's other errors carry no code; their kinds are private, but the connection-level ones are closed
    // connections, I/O failures (the source is an io::Error) and the few messages matched here.
    let text = e.to_string();
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let connection = e.is_closed()
        || io
        || [
            "error connecting",
            "error communicating",
            "timeout",
            "unexpected message",
            "error parsing response",
        ]
        .iter()
        .any(|p| text.starts_with(p));
    let detail = match std::error::Error::source(&e) {
        Some(s) => format!("postgres: {text}: {s}"),
        None => format!("postgres: {text}"),
    };
    let err = if connection {
        StorageError::unavailable(detail)
    } else {
        StorageError::other(detail)
    };
    err.with_source(e)
}

/// SQLSTATEs after which trying again later may work.
fn transient_state(code: &SqlState) -> bool {
    let c = code.code();
    // Class 08: connection exceptions.
    c.starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::OUT_OF_MEMORY,
            SqlState::QUERY_CANCELED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            // A failover can leave us connected to a standby for a moment.
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code)
}

/// Query parameters.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Most statements one connection keeps prepared. Statements name per-partition tables, so a server with many
/// partitions would otherwise keep (number of partitions x ~20) prepared plans alive in every backend process.
/// Past the bound the connection's cache is emptied (dropping a statement deallocates it on the server) and refills
/// with what is in use.
const MAX_PREPARED_PER_CONN: usize = 2000;

/// A prepared statement, cached per connection.
pub(crate) async fn prepare(conn: &Object, sql: &str) -> Result<Statement, StorageError> {
    if conn.statement_cache.size() >= MAX_PREPARED_PER_CONN {
        conn.statement_cache.clear();
    }
    conn.prepare_cached(sql).await.map_err(pg_err)
}

/// A connection inside an explicit transaction.
///
/// `BEGIN` and `COMMIT` travel pipelined with the first and last statement, so a read-lock-then-write transaction
/// costs two round trips. Dropping a `Tx` before [`Tx::commit`]/[`Tx::rollback`] (a cancelled call) takes the
/// connection out of the pool and closes it, which rolls the transaction back on the server: a pooled connection is
/// never left inside a transaction.
pub(crate) struct Tx {
    conn: Option<Object>,
}

impl Tx {
    /// Starts a transaction and runs its first statement in the same round trip.
    pub(crate) async fn begin(
        conn: Object,
        stmt: &Statement,
        params: &Params<'_>,
    ) -> Result<(Tx, Vec<Row>), StorageError> {
        let tx = Tx { conn: Some(conn) };
        let c = tx.client()?;
        let (begin, rows) = tokio::join!(c.batch_execute("BEGIN"), c.query(stmt, params));
        // A failed BEGIN means a broken connection: dropping `tx` discards it.
        begin.map_err(pg_err)?;
        match rows {
            Ok(rows) => Ok((tx, rows)),
            Err(e) => {
                tx.rollback().await;
                Err(pg_err(e))
            }
        }
    }

    /// Wraps a connection on which the caller has already started a transaction (a `BEGIN` with options).
    pub(crate) fn from_open(conn: Object) -> Tx {
        Tx { conn: Some(conn) }
    }

    /// Starts a transaction with a batch of simple statements (DDL, advisory locks), in one round trip.
    pub(crate) async fn begin_simple(conn: Object, sql: &str) -> Result<Tx, StorageError> {
        let tx = Tx { conn: Some(conn) };
        tx.batch(&format!("BEGIN; {sql}")).await
    }

    /// Runs a batch of simple statements inside the transaction; on failure the transaction is rolled back.
    pub(crate) async fn batch(self, sql: &str) -> Result<Tx, StorageError> {
        match self.client()?.batch_execute(sql).await {
            Ok(()) => Ok(self),
            Err(e) => {
                self.rollback().await;
                Err(pg_err(e))
            }
        }
    }

    fn client(&self) -> Result<&Object, StorageError> {
        self.conn
            .as_ref()
            .ok_or_else(|| StorageError::other("postgres: transaction already finished"))
    }

    /// The connection, for preparing statements.
    pub(crate) fn conn(&self) -> Result<&Object, StorageError> {
        self.client()
    }

    /// Runs a statement inside the transaction; on failure the transaction is rolled back.
    pub(crate) async fn query(
        self,
        stmt: &Statement,
        params: &Params<'_>,
    ) -> Result<(Tx, Vec<Row>), StorageError> {
        match self.client()?.query(stmt, params).await {
            Ok(rows) => Ok((self, rows)),
            Err(e) => {
                self.rollback().await;
                Err(pg_err(e))
            }
        }
    }

    /// Runs the last statement and commits, in one round trip. When the statement fails, the server answers the
    /// COMMIT with a rollback, so an `Err` changed nothing; only a failure of the COMMIT itself (a lost connection)
    /// leaves the outcome unknown.
    pub(crate) async fn query_commit(
        mut self,
        stmt: &Statement,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, StorageError> {
        let c = self.client()?;
        let (rows, commit) = tokio::join!(c.query(stmt, params), c.batch_execute("COMMIT"));
        if commit.is_ok() {
            // Both answered: the connection is idle again and may go back to the pool.
            self.conn.take();
        }
        let rows = rows.map_err(pg_err)?;
        commit.map_err(pg_err)?;
        Ok(rows)
    }

    /// Commits.
    pub(crate) async fn commit(mut self) -> Result<(), StorageError> {
        self.client()?.batch_execute("COMMIT").await.map_err(pg_err)?;
        self.conn.take();
        Ok(())
    }

    /// Rolls back. A failed rollback leaves the connection to `Drop`, which discards it.
    pub(crate) async fn rollback(mut self) {
        if let Some(c) = &self.conn {
            if c.batch_execute("ROLLBACK").await.is_ok() {
                self.conn.take();
            }
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Detach from the pool and close: the server rolls back whatever the transaction did.
            drop(Object::take(conn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_on_one_connection_string_share_a_pool_until_the_last_lets_go() {
        let a = PgConfig::new("postgres://u@127.0.0.1:1/pool_share_a");
        let b = PgConfig::new("postgres://u@127.0.0.1:1/pool_share_b").with_max_conns(3);
        let a1 = acquire(&a).expect("pool");
        let a2 = acquire(&a).expect("pool");
        let b1 = acquire(&b).expect("pool");
        assert!(Arc::ptr_eq(&a1, &a2));
        assert!(!Arc::ptr_eq(&a1, &b1));
        assert_eq!(b1.pool.status().max_size, 3);
        assert_eq!(a1.pool.status().max_size, PgConfig::DEFAULT_MAX_CONNS as usize);
        let weak = Arc::downgrade(&a1);
        drop((a1, a2));
        assert!(weak.upgrade().is_none(), "the registry holds no strong reference");
        let e = acquire(&PgConfig::new("postgres://u@h:port/x")).expect_err("bad string");
        assert_eq!(e.kind, StorageErrorKind::Config);
        let e = acquire(&PgConfig::new("postgres://u@h/x?sslmode=verify-full")).expect_err("no sslrootcert");
        assert_eq!(e.kind, StorageErrorKind::Config);
        let e = acquire(&PgConfig::new("postgres://u@h/x?sslmode=bogus")).expect_err("bad sslmode");
        assert_eq!(e.kind, StorageErrorKind::Config);
        assert!(acquire(&PgConfig::new("postgres://u@h/x?sslmode=require")).is_ok());
    }
}
