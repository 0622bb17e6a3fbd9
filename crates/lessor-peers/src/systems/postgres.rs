//! A plain PostgreSQL table queue, the `FOR UPDATE SKIP LOCKED` pattern, driven with batched statements and
//! one connection per producer and consumer:
//!
//! * produce: one `INSERT ... SELECT unnest($1::bytea[])` per batch (one statement, one commit);
//! * lease + complete: in one transaction, `DELETE ... WHERE id IN (SELECT id ... ORDER BY id LIMIT n FOR
//!   UPDATE SKIP LOCKED) RETURNING payload`, then `COMMIT`. The uncommitted delete is the lease (a consumer
//!   that dies rolls back and the rows come back), the commit is the completion: one commit per batch.
//!
//! A table has no long poll: a consumer that found nothing sleeps 1 ms before it asks again.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, Statement};

use crate::run::Peer;
use crate::stats::{Clock, E2e};

/// A queue table in one database.
pub struct Postgres {
    conninfo: String,
    table: String,
}

/// A connection with its prepared statement.
pub struct Conn {
    client: Client,
    statement: Statement,
}

impl Postgres {
    /// Creates the table `peers_<unique>` through `conninfo` (`host=127.0.0.1 port=5432 user=postgres dbname=x`).
    pub async fn setup(conninfo: &str, unique: &str) -> Result<Postgres, String> {
        let peer = Postgres {
            conninfo: conninfo.to_string(),
            table: format!("peers_{}", unique.replace('-', "_")),
        };
        let client = peer.connect().await?;
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id bigserial PRIMARY KEY, payload bytea NOT NULL)",
                t = peer.table
            ))
            .await
            .map_err(|e| format!("postgres: create table: {e}"))?;
        Ok(peer)
    }

    async fn connect(&self) -> Result<Client, String> {
        let (client, connection) = tokio_postgres::connect(&self.conninfo, NoTls)
            .await
            .map_err(|e| format!("postgres: connect '{}': {e}", self.conninfo))?;
        // The connection object does the I/O; it ends when the client is dropped.
        tokio::spawn(connection);
        Ok(client)
    }

    async fn conn(&self, sql: &str) -> Result<Conn, String> {
        let client = self.connect().await?;
        let statement = client
            .prepare(sql)
            .await
            .map_err(|e| format!("postgres: prepare: {e}"))?;
        Ok(Conn { client, statement })
    }
}

impl Peer for Postgres {
    type Producer = Conn;
    type Consumer = Conn;

    async fn producer(&self, _: usize) -> Result<Conn, String> {
        self.conn(&format!(
            "INSERT INTO {} (payload) SELECT unnest($1::bytea[])",
            self.table
        ))
        .await
    }

    async fn consumer(&self, _: usize) -> Result<Conn, String> {
        self.conn(&format!(
            "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING payload",
            t = self.table
        ))
        .await
    }

    async fn produce(&self, p: &mut Conn, n: usize, clock: &Clock) -> Result<(), String> {
        let batch = clock.batch(n);
        p.client
            .execute(&p.statement, &[&batch])
            .await
            .map(|_| ())
            .map_err(|e| format!("insert: {e}"))
    }

    async fn consume(&self, c: &mut Conn, max: usize, e2e: &mut E2e) -> Result<usize, String> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let tx = c.client.transaction().await.map_err(|e| format!("begin: {e}"))?;
        let rows = tx
            .query(&c.statement, &[&limit])
            .await
            .map_err(|e| format!("lease: {e}"))?;
        let at = Instant::now();
        for row in &rows {
            let payload: &[u8] = row.try_get(0).map_err(|e| format!("payload: {e}"))?;
            e2e.item(at, payload);
        }
        tx.commit().await.map_err(|e| format!("commit: {e}"))?;
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(rows.len())
    }

    async fn teardown(&self) {
        if let Ok(client) = self.connect().await {
            let _ = client
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.table))
                .await;
        }
    }
}
