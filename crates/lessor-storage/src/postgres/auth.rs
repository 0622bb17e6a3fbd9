//! [`PgAuth`]: the auth store of the PostgreSQL backend, shared by every server on the database.
//!
//! - `lessor_auth(key BYTEA PRIMARY KEY, value BYTEA)`: the auth model's keys and values. `bytea` compares
//!   bytewise (then by length), which is the order [`AuthStore::scan`] promises, and a prefix scan is a range of
//!   the primary key.
//! - `lessor_auth_generation`: one row, the generation.
//!
//! A commit is one transaction that first bumps the generation row: the row lock it takes makes every other auth
//! commit, on any server, wait until this one ends, so the checks that follow (each statement of a `READ
//! COMMITTED` transaction reads the latest committed state) see no concurrent change. A failed check rolls back,
//! generation included.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::auth::{AuthStore, Check, CheckFailed, Commit, Write};
use lessor_core::error::StorageError;

use super::pool::{pg_err, prepare, Shared, Tx};
use super::schema;

/// The auth store on a PostgreSQL database (a handle of [`super::PgQueues`]'s pool: closing the queue store
/// closes this too).
#[derive(Debug)]
pub struct PgAuth {
    shared: Arc<Mutex<Option<Arc<Shared>>>>,
}

/// The smallest key greater than every key starting with `prefix`, or `None` when there is none (an empty
/// prefix, or one made only of `0xff` bytes).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl PgAuth {
    pub(crate) fn new(shared: Arc<Mutex<Option<Arc<Shared>>>>) -> Self {
        PgAuth { shared }
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

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl AuthStore for PgAuth {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, "SELECT value FROM lessor_auth WHERE key = $1").await?;
        let row = conn.query_opt(&stmt, &[&key]).await.map_err(pg_err)?;
        row.map(|r| r.try_get::<_, Vec<u8>>(0).map(Bytes::from).map_err(pg_err))
            .transpose()
    }

    async fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = if from > prefix { from } else { prefix };
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let limit = to_i64(limit);
        let rows = match prefix_end(prefix) {
            Some(end) => {
                let stmt = prepare(
                    &conn,
                    "SELECT key, value FROM lessor_auth WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3",
                )
                .await?;
                conn.query(&stmt, &[&start, &end, &limit]).await
            }
            None => {
                let stmt = prepare(
                    &conn,
                    "SELECT key, value FROM lessor_auth WHERE key >= $1 ORDER BY key LIMIT $2",
                )
                .await?;
                conn.query(&stmt, &[&start, &limit]).await
            }
        }
        .map_err(pg_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let k: Vec<u8> = r.try_get(0).map_err(pg_err)?;
            let v: Vec<u8> = r.try_get(1).map_err(pg_err)?;
            // The prefix check guards the unbounded form (a prefix of only 0xff bytes).
            if !k.starts_with(prefix) {
                break;
            }
            out.push((Bytes::from(k), Bytes::from(v)));
        }
        Ok(out)
    }

    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        // Locking the generation row serialises auth commits across servers; a silent commit locks it without
        // moving it.
        let bump = prepare(
            &conn,
            if commit.silent {
                "SELECT generation FROM lessor_auth_generation FOR UPDATE"
            } else {
                "UPDATE lessor_auth_generation SET generation = generation + 1 RETURNING generation"
            },
        )
        .await?;
        let (mut tx, rows) = Tx::begin(conn, &bump, &[]).await?;
        if rows.is_empty() {
            tx.rollback().await;
            return Err(StorageError::new(
                lessor_core::error::StorageErrorKind::Corrupt,
                "postgres: the lessor_auth_generation row is missing",
            ));
        }
        if !commit.checks.is_empty() {
            let keys: Vec<&[u8]> = commit.checks.iter().map(Check::key).collect();
            let stmt = prepare(tx.conn()?, "SELECT key FROM lessor_auth WHERE key = ANY($1)").await?;
            let (next, rows) = tx.query(&stmt, &[&keys]).await?;
            tx = next;
            let mut present = std::collections::HashSet::with_capacity(rows.len());
            for r in rows {
                present.insert(r.try_get::<_, Vec<u8>>(0).map_err(pg_err)?);
            }
            for (index, check) in commit.checks.iter().enumerate() {
                let exists = present.contains(check.key());
                let holds = match check {
                    Check::Absent(_) => !exists,
                    Check::Present(_) => exists,
                };
                if !holds {
                    tx.rollback().await;
                    return Ok(Err(CheckFailed { index }));
                }
            }
        }
        // Each key's last write, as applying them in order would leave it (an upsert may not touch a row twice).
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for write in commit.writes {
            match write {
                Write::Put(k, v) => last.insert(k, Some(v)),
                Write::Delete(k) => last.insert(k, None),
            };
        }
        let (mut put_keys, mut put_values, mut dels) = (Vec::new(), Vec::new(), Vec::new());
        for (k, v) in last {
            match v {
                Some(v) => {
                    put_keys.push(k);
                    put_values.push(v);
                }
                None => dels.push(k),
            }
        }
        if !dels.is_empty() {
            let stmt = prepare(tx.conn()?, "DELETE FROM lessor_auth WHERE key = ANY($1)").await?;
            tx = tx.query(&stmt, &[&dels]).await?.0;
        }
        if put_keys.is_empty() {
            return tx.commit().await.map(Ok);
        }
        let upsert = prepare(
            tx.conn()?,
            "INSERT INTO lessor_auth (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .await?;
        tx.query_commit(&upsert, &[&put_keys, &put_values]).await?;
        Ok(Ok(()))
    }

    async fn generation(&self) -> Result<u64, StorageError> {
        let shared = self.shared().await?;
        let conn = shared.conn().await?;
        let stmt = prepare(&conn, "SELECT generation FROM lessor_auth_generation").await?;
        let row = conn.query_opt(&stmt, &[]).await.map_err(pg_err)?;
        let g: i64 = match row {
            Some(r) => r.try_get(0).map_err(pg_err)?,
            None => 0,
        };
        Ok(u64::try_from(g).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_skips_trailing_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff, 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0x00]), Some(vec![0x01]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }
}
