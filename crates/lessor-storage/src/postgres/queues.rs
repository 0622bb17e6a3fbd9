//! Queue definitions in the `queues` table.
//!
//! Durations are stored in nanoseconds (as Querator does), timestamps in microseconds, and the partition placement
//! as a JSONB array of `{partition, storage_name, read_only}` objects. The retry backoff is four columns (base, factor,
//! max, jitter); like the other settings added by schema version 3 (dedup window, pause, longest lease), their zero
//! defaults mean "off" or "the default", which is what a queue defined before them had. Names use the "C" collation, so `list` pages
//! in byte order like every other backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::storage::QueuesStore;
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, PartitionInfo, QueueInfo};
use serde_json::{json, Value};
use tokio_postgres::Row;

use super::auth::PgAuth;
use super::pool::{acquire, pg_err, prepare, PgConfig, Shared};
use super::schema;

const COLUMNS: &str = "name, namespace, created_at, updated_at, dead_queue, reference, lease_timeout_ns, \
                       expire_timeout_ns, max_attempts, requested_partitions, partition_info::text, \
                       dedup_window_ns, backoff_base_ns, backoff_factor, backoff_max_ns, backoff_jitter, paused, \
                       max_lease_timeout_ns, restoring";

/// Queue definitions in PostgreSQL.
#[derive(Debug)]
pub struct PgQueues {
    /// The pool; shared with `auth`, so closing this store closes both.
    shared: Arc<Mutex<Option<Arc<Shared>>>>,
    /// Users, keys, roles and bindings, in the same database.
    auth: Arc<PgAuth>,
}

impl PgQueues {
    /// A store on the pool of `cfg.connection_string` (shared with every other store using the same string).
    /// Never connects: the schema is created or migrated on the first call, and calls fail with `Unavailable`
    /// while the database is down. Fails only on an invalid configuration.
    pub fn new(cfg: &PgConfig) -> Result<Self, StorageError> {
        let shared = Arc::new(Mutex::new(Some(acquire(cfg)?)));
        Ok(PgQueues {
            auth: Arc::new(PgAuth::new(shared.clone())),
            shared,
        })
    }

    async fn shared(&self) -> Result<Arc<Shared>, StorageError> {
        let shared = self
            .shared
            .lock()
            .map_err(|_| StorageError::other("postgres queues store lock poisoned"))?
            .clone()
            .ok_or_else(|| StorageError::other("postgres queues store is closed"))?;
        schema::ensure(&shared).await?;
        Ok(shared)
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn from_nanos(n: i64) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

fn partitions_json(parts: &[PartitionInfo]) -> String {
    Value::Array(
        parts
            .iter()
            .map(|p| {
                json!({
                    "partition": p.partition,
                    "storage_name": p.storage_name,
                    "read_only": p.read_only,
                })
            })
            .collect(),
    )
    .to_string()
}

fn parse_partitions(name: &str, text: &str) -> Result<Vec<PartitionInfo>, StorageError> {
    let corrupt = |what: &str| {
        StorageError::new(
            StorageErrorKind::Corrupt,
            format!("postgres: queue '{name}': partition_info {what}"),
        )
    };
    let v: Value = serde_json::from_str(text).map_err(|e| corrupt(&e.to_string()))?;
    let Value::Array(items) = v else {
        return Err(corrupt("is not an array"));
    };
    items
        .iter()
        .map(|p| {
            Ok(PartitionInfo {
                partition: p
                    .get("partition")
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| corrupt("entry without a valid partition number"))?,
                storage_name: p
                    .get("storage_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                read_only: p.get("read_only").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn decode(r: &Row) -> Result<QueueInfo, StorageError> {
    let name: String = r.try_get(0).map_err(pg_err)?;
    let parts: String = r.try_get(10).map_err(pg_err)?;
    Ok(QueueInfo {
        namespace: r.try_get(1).map_err(pg_err)?,
        created_at: Ts(r.try_get(2).map_err(pg_err)?),
        updated_at: Ts(r.try_get(3).map_err(pg_err)?),
        dead_queue: r.try_get(4).map_err(pg_err)?,
        reference: r.try_get(5).map_err(pg_err)?,
        lease_timeout: from_nanos(r.try_get(6).map_err(pg_err)?),
        expire_timeout: from_nanos(r.try_get(7).map_err(pg_err)?),
        max_attempts: to_u32(r.try_get(8).map_err(pg_err)?),
        requested_partitions: to_u32(r.try_get(9).map_err(pg_err)?),
        partitions: parse_partitions(&name, &parts)?,
        name,
        dedup_window: from_nanos(r.try_get(11).map_err(pg_err)?),
        retry_backoff: Backoff {
            base: from_nanos(r.try_get(12).map_err(pg_err)?),
            factor: r.try_get(13).map_err(pg_err)?,
            max: from_nanos(r.try_get(14).map_err(pg_err)?),
            jitter: r.try_get(15).map_err(pg_err)?,
        },
        paused: r.try_get(16).map_err(pg_err)?,
        max_lease_timeout: from_nanos(r.try_get(17).map_err(pg_err)?),
        restoring: r.try_get(18).map_err(pg_err)?,
    })
}

/// Runs `sql` with the nineteen columns of `info` as parameters `$1..$19`.
async fn write(shared: &Shared, sql: &str, info: &QueueInfo) -> Result<(), StorageError> {
    let conn = shared.conn().await?;
    let stmt = prepare(&conn, sql).await?;
    let parts = partitions_json(&info.partitions);
    conn.execute(
        &stmt,
        &[
            &info.name,
            &info.namespace,
            &info.created_at.0,
            &info.updated_at.0,
            &info.dead_queue,
            &info.reference,
            &nanos(info.lease_timeout),
            &nanos(info.expire_timeout),
            &i64::from(info.max_attempts),
            &i64::from(info.requested_partitions),
            &parts,
            &nanos(info.dedup_window),
            &nanos(info.retry_backoff.base),
            &info.retry_backoff.factor,
            &nanos(info.retry_backoff.max),
            &info.retry_backoff.jitter,
            &info.paused,
            &nanos(info.max_lease_timeout),
            &info.restoring,
        ],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

const INSERT: &str = "INSERT INTO queues (name, namespace, created_at, updated_at, dead_queue, reference, \
                      lease_timeout_ns, expire_timeout_ns, max_attempts, requested_partitions, partition_info, \
                      dedup_window_ns, backoff_base_ns, backoff_factor, backoff_max_ns, backoff_jitter, paused, \
                      max_lease_timeout_ns, restoring) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::jsonb, $12, $13, $14, $15, $16, \
                      $17, $18, $19)";

#[async_trait]
impl QueuesStore for PgQueues {
    fn auth(&self) -> Arc<dyn lessor_core::auth::AuthStore> {
        self.auth.clone()
    }

    async fn get(&self, name: &str) -> Result<Option<QueueInfo>, StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, &format!("SELECT {COLUMNS} FROM queues WHERE name = $1")).await?;
        let rows = conn.query(&stmt, &[&name]).await.map_err(pg_err)?;
        rows.first().map(decode).transpose()
    }

    async fn add(&self, info: &QueueInfo) -> Result<(), StorageError> {
        let shared = self.shared().await?;
        write(&shared, INSERT, info).await.map_err(|e| {
            if e.kind == StorageErrorKind::AlreadyExists {
                StorageError::new(
                    StorageErrorKind::AlreadyExists,
                    format!("queue '{}' already exists", info.name),
                )
            } else {
                e
            }
        })
    }

    async fn update(&self, info: &QueueInfo) -> Result<(), StorageError> {
        let shared = self.shared().await?;
        // Replaces the whole definition; an upsert like the other backends, so an update racing a delete on
        // another server leaves the definition the caller meant.
        let sql = format!(
            "{INSERT} ON CONFLICT (name) DO UPDATE SET namespace = EXCLUDED.namespace, \
             created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, dead_queue = EXCLUDED.dead_queue, \
             reference = EXCLUDED.reference, lease_timeout_ns = EXCLUDED.lease_timeout_ns, \
             expire_timeout_ns = EXCLUDED.expire_timeout_ns, max_attempts = EXCLUDED.max_attempts, \
             requested_partitions = EXCLUDED.requested_partitions, partition_info = EXCLUDED.partition_info, \
             dedup_window_ns = EXCLUDED.dedup_window_ns, backoff_base_ns = EXCLUDED.backoff_base_ns, \
             backoff_factor = EXCLUDED.backoff_factor, backoff_max_ns = EXCLUDED.backoff_max_ns, \
             backoff_jitter = EXCLUDED.backoff_jitter, paused = EXCLUDED.paused, \
             max_lease_timeout_ns = EXCLUDED.max_lease_timeout_ns, restoring = EXCLUDED.restoring"
        );
        write(&shared, &sql, info).await
    }

    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, "DELETE FROM queues WHERE name = $1").await?;
        conn.execute(&stmt, &[&name]).await.map_err(pg_err)?;
        Ok(())
    }

    /// One statement: a create of the name on another server cannot slip in between a read and the delete.
    async fn delete_incarnation(&self, name: &str, created_at: Ts) -> Result<(), StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, "DELETE FROM queues WHERE name = $1 AND created_at = $2").await?;
        conn.execute(&stmt, &[&name, &created_at.0])
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn list(&self, pivot: &str, limit: usize) -> Result<Vec<QueueInfo>, StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let stmt = prepare(
            &conn,
            &format!("SELECT {COLUMNS} FROM queues WHERE name >= $1 ORDER BY name LIMIT $2"),
        )
        .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn.query(&stmt, &[&pivot, &limit]).await.map_err(pg_err)?;
        rows.iter().map(decode).collect()
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        conn.simple_query("SELECT 1").await.map_err(pg_err)?;
        Ok(())
    }

    async fn close(&self) {
        // Dropping the last reference to a pool closes its connections.
        if let Ok(mut s) = self.shared.lock() {
            s.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_round_trip_through_json() {
        let parts = vec![
            PartitionInfo {
                partition: 0,
                storage_name: "a\"b".into(),
                read_only: false,
            },
            PartitionInfo {
                partition: u32::MAX,
                storage_name: String::new(),
                read_only: true,
            },
        ];
        let text = partitions_json(&parts);
        assert_eq!(parse_partitions("q", &text).expect("parses"), parts);
        assert_eq!(
            parse_partitions("q", "{}").expect_err("not an array").kind,
            StorageErrorKind::Corrupt
        );
    }
}
