//! Redis Streams with a consumer group, driven the way Redis users go fast: a producer pipelines a batch of
//! `XADD` in one round trip, a consumer reads with `XREADGROUP ... COUNT n BLOCK 1000` (the group's pending
//! entries list is the lease) and acknowledges the whole read with one `XACK` of n ids.
//!
//! Acknowledged entries stay in the stream (Redis users trim with `MAXLEN` or `XDEL` separately); that only
//! spares Redis work, so it can only flatter Redis in the comparison.

use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::run::Peer;
use crate::stats::{Clock, E2e};

/// The consumer group every consumer reads in.
const GROUP: &str = "workers";
/// The field name of the payload in each entry.
const FIELD: &str = "d";

/// A stream and its consumer group on one Redis server.
pub struct RedisStreams {
    client: redis::Client,
    key: String,
}

/// A connection with its consumer name.
pub struct Conn {
    con: MultiplexedConnection,
    name: String,
}

impl RedisStreams {
    /// Creates the stream `peers-<unique>` and its consumer group at `url` (`redis://127.0.0.1:6379`).
    pub async fn setup(url: &str, unique: &str) -> Result<RedisStreams, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis: {url}: {e}"))?;
        let key = format!("peers-{unique}");
        let peer = RedisStreams { client, key };
        let mut con = peer.connect().await?;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&peer.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| format!("redis: XGROUP CREATE: {e}"))?;
        Ok(peer)
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        // No response timeout: with `appendfsync always` a pipeline waits for its fsync, and XREADGROUP blocks.
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("redis: connect: {e}"))
    }
}

/// The entries of an XREADGROUP reply (RESP2 arrays or RESP3 maps): `(id, payload)` pairs. Parsed by hand
/// rather than through `StreamReadReply`, which builds a HashMap per entry: the driver must stay cheap.
pub fn entries(reply: &Value) -> Vec<(&[u8], Option<&[u8]>)> {
    let mut out = Vec::new();
    // RESP2: an array of [key, entries] pairs; RESP3: a map from key to entries.
    let lists: Vec<&Value> = match reply {
        Value::Array(v) => v
            .iter()
            .filter_map(|pair| match pair {
                Value::Array(kv) => kv.get(1),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        _ => return out,
    };
    for list in lists {
        let Value::Array(list) = list else { continue };
        for e in list {
            let Value::Array(parts) = e else { continue };
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) = (parts.first(), parts.get(1))
            else {
                continue;
            };
            let payload = fields.chunks(2).find_map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] if k == FIELD.as_bytes() => Some(v.as_slice()),
                _ => None,
            });
            out.push((id.as_slice(), payload));
        }
    }
    out
}

impl Peer for RedisStreams {
    type Producer = Conn;
    type Consumer = Conn;

    async fn producer(&self, id: usize) -> Result<Conn, String> {
        Ok(Conn {
            con: self.connect().await?,
            name: format!("p{id}"),
        })
    }

    async fn consumer(&self, id: usize) -> Result<Conn, String> {
        Ok(Conn {
            con: self.connect().await?,
            name: format!("c{id}"),
        })
    }

    async fn produce(&self, p: &mut Conn, n: usize, clock: &Clock) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for payload in clock.batch(n) {
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("*")
                .arg(FIELD)
                .arg(payload)
                .ignore();
        }
        pipe.query_async::<()>(&mut p.con)
            .await
            .map_err(|e| format!("XADD: {e}"))
    }

    async fn consume(&self, c: &mut Conn, max: usize, e2e: &mut E2e) -> Result<usize, String> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&c.name)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut c.con)
            .await
            .map_err(|e| format!("XREADGROUP: {e}"))?;
        let at = Instant::now();
        let got = entries(&reply);
        if got.is_empty() {
            return Ok(0);
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(&self.key).arg(GROUP);
        for (id, payload) in &got {
            if let Some(p) = payload {
                e2e.item(at, p);
            }
            ack.arg(*id);
        }
        ack.query_async::<()>(&mut c.con)
            .await
            .map_err(|e| format!("XACK: {e}"))?;
        Ok(got.len())
    }

    async fn teardown(&self) {
        if let Ok(mut con) = self.connect().await {
            let _ = redis::cmd("DEL").arg(&self.key).query_async::<()>(&mut con).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xreadgroup_replies_parse_in_both_protocols() {
        let entry = |id: &str, p: &[u8]| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"d".to_vec()),
                    Value::BulkString(p.to_vec()),
                ]),
            ])
        };
        let list = Value::Array(vec![entry("1-0", b"aa"), entry("1-1", b"bb")]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"k".to_vec()),
            list.clone(),
        ])]);
        let resp3 = Value::Map(vec![(Value::BulkString(b"k".to_vec()), list)]);
        for reply in [resp2, resp3] {
            let got = entries(&reply);
            assert_eq!(got.len(), 2);
            assert_eq!(got[1].1, Some(&b"bb"[..]));
        }
        assert!(entries(&Value::Nil).is_empty());
    }
}
