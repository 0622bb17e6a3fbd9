//! [`PgAuth`]: the auth records in the `lessor_auth` table (`key BYTEA` primary key, `value BYTEA`), and the store's
//! generation in `lessor_auth_generation`, shared by every server on the database.
//!
//! A commit is one transaction that first takes an advisory lock all auth commits share, so between its checks and
//! its writes no other server commits: uniqueness (usernames, role names) and cascades hold across servers. The
//! generation row is bumped in the same transaction, which is how other servers learn, at their next poll, that
//! something may have been revoked. Auth changes are rare, so serialising them costs nothing that matters; reads
//! take no lock. `bytea` compares bytewise, which is the order the trait promises.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::auth::{AuthStore, Check, CheckFailed, Commit, Write};
use lessor_core::error::{StorageError, StorageErrorKind};

use super::pool::{pg_err, prepare, Shared, Tx};
use super::schema;

/// Advisory lock of auth commits (a single-bigint lock, distinct from the migration lock).
const AUTH_LOCK: i64 = 0x6c65_7373_6175;

/// The auth store of a PostgreSQL queue store.
#[derive(Debug)]
pub struct PgAuth {
    shared: Arc<Shared>,
}

impl PgAuth {
    /// The auth store on `shared`'s pool.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        PgAuth { shared }
    }

    async fn ready(&self) -> Result<(), StorageError> {
        schema::ensure(&self.shared).await
    }
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` when there is none (an
/// empty prefix, or one of only 0xff bytes).
fn upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[async_trait]
impl AuthStore for PgAuth {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        self.ready().await?;
        let conn = self.shared.conn().await?;
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
        self.ready().await?;
        let start = if from > prefix { from } else { prefix };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.shared.conn().await?;
        let rows = match upper_bound(prefix) {
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
        rows.iter()
            .map(|r| {
                let k: Vec<u8> = r.try_get(0).map_err(pg_err)?;
                let v: Vec<u8> = r.try_get(1).map_err(pg_err)?;
                Ok((Bytes::from(k), Bytes::from(v)))
            })
            .collect()
    }

    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError> {
        self.ready().await?;
        let conn = self.shared.conn().await?;
        let mut tx = Tx::begin_simple(conn, &format!("SELECT pg_advisory_xact_lock({AUTH_LOCK});")).await?;
        if !commit.checks.is_empty() {
            let keys: Vec<&[u8]> = commit.checks.iter().map(Check::key).collect();
            let stmt = prepare(tx.conn()?, "SELECT key FROM lessor_auth WHERE key = ANY($1)").await?;
            let (next, rows) = tx.query(&stmt, &[&keys]).await?;
            tx = next;
            let existing: HashSet<Vec<u8>> = rows
                .iter()
                .map(|r| r.try_get::<_, Vec<u8>>(0).map_err(pg_err))
                .collect::<Result<_, _>>()?;
            for (index, check) in commit.checks.iter().enumerate() {
                let exists = existing.contains(check.key());
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
        // Later writes of a key win.
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for w in commit.writes {
            match w {
                Write::Put(k, v) => last.insert(k, Some(v)),
                Write::Delete(k) => last.insert(k, None),
            };
        }
        let mut dels: Vec<Vec<u8>> = Vec::new();
        let (mut put_keys, mut put_values): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
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
        if !put_keys.is_empty() {
            let stmt = prepare(
                tx.conn()?,
                "INSERT INTO lessor_auth (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            )
            .await?;
            tx = tx.query(&stmt, &[&put_keys, &put_values]).await?.0;
        }
        let bump = prepare(
            tx.conn()?,
            "UPDATE lessor_auth_generation SET generation = generation + 1",
        )
        .await?;
        tx.query_commit(&bump, &[]).await?;
        Ok(Ok(()))
    }

    async fn generation(&self) -> Result<u64, StorageError> {
        self.ready().await?;
        let conn = self.shared.conn().await?;
        let stmt = prepare(&conn, "SELECT generation FROM lessor_auth_generation").await?;
        let row = conn.query_opt(&stmt, &[]).await.map_err(pg_err)?;
        let g: i64 = match row {
            Some(r) => r.try_get(0).map_err(pg_err)?,
            None => {
                return Err(StorageError::new(
                    StorageErrorKind::Corrupt,
                    "postgres: lessor_auth_generation has no row",
                ))
            }
        };
        Ok(u64::try_from(g).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::upper_bound;

    #[test]
    fn prefix_upper_bounds() {
        assert_eq!(upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(upper_bound(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(upper_bound(&[0xff, 0xff]), None);
        assert_eq!(upper_bound(b""), None);
    }
}
