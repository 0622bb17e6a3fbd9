//! NATS JetStream work-queue stream on file storage, driven the way async-nats users go fast: a producer sends
//! a batch of asynchronous publishes and then awaits all their acks; a consumer reads a pull consumer's
//! message stream (batched pull requests of `n`, refilled in the background by the client) and acks each
//! message it took (acks are fire-and-forget publishes, so n acks cost no round trip).
//!
//! The fsync mode is a server setting (`sync_interval: always` in the jetstream block), not a client one.

use std::pin::Pin;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};

use crate::run::Peer;
use crate::stats::{Clock, E2e};

/// The durable pull consumer all consumers share.
const CONSUMER: &str = "workers";

/// A work-queue stream on one NATS server.
pub struct Nats {
    url: String,
    name: String,
    batch: usize,
}

/// A producer's JetStream context on its own connection.
pub struct Producer {
    js: jetstream::Context,
}

/// A consumer's message stream on its own connection.
pub struct Consumer {
    messages: Pin<Box<consumer::pull::Stream>>,
}

impl Nats {
    /// Creates the stream `peers-<unique>` (subject of the same name, work-queue retention, file storage) and
    /// its durable pull consumer at `url` (`nats://127.0.0.1:4222`).
    pub async fn setup(url: &str, unique: &str, batch: usize, consumers: usize) -> Result<Nats, String> {
        let peer = Nats {
            url: url.to_string(),
            name: format!("peers-{unique}"),
            batch,
        };
        let js = peer.context().await?;
        let _ = js.delete_stream(&peer.name).await;
        let s = js
            .create_stream(stream::Config {
                name: peer.name.clone(),
                subjects: vec![peer.name.clone()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("nats: create stream: {e}"))?;
        s.create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            // Room for every consumer's prefetched batches: the default (1,000) would throttle the pull.
            max_ack_pending: i64::try_from(batch * consumers.max(1) * 8).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("nats: create consumer: {e}"))?;
        Ok(peer)
    }

    async fn context(&self) -> Result<jetstream::Context, String> {
        let client = async_nats::connect(&self.url)
            .await
            .map_err(|e| format!("nats: connect {}: {e}", self.url))?;
        Ok(jetstream::new(client))
    }
}

impl Peer for Nats {
    type Producer = Producer;
    type Consumer = Consumer;

    async fn producer(&self, _: usize) -> Result<Producer, String> {
        Ok(Producer {
            js: self.context().await?,
        })
    }

    async fn consumer(&self, _: usize) -> Result<Consumer, String> {
        let js = self.context().await?;
        let c: consumer::PullConsumer = js
            .get_consumer_from_stream(CONSUMER, &self.name)
            .await
            .map_err(|e| format!("nats: get consumer: {e}"))?;
        let messages = c
            .stream()
            .max_messages_per_batch(self.batch)
            .messages()
            .await
            .map_err(|e| format!("nats: pull stream: {e}"))?;
        Ok(Consumer {
            messages: Box::pin(messages),
        })
    }

    async fn produce(&self, p: &mut Producer, n: usize, clock: &Clock) -> Result<(), String> {
        let mut acks = Vec::with_capacity(n);
        for payload in clock.batch(n) {
            acks.push(
                p.js.publish(self.name.clone(), Bytes::from(payload))
                    .await
                    .map_err(|e| format!("publish: {e}"))?,
            );
        }
        // Every publish is already on the wire: awaiting the acks in order costs no extra round trips.
        for ack in acks {
            ack.await.map_err(|e| format!("publish ack: {e}"))?;
        }
        Ok(())
    }

    async fn consume(&self, c: &mut Consumer, max: usize, e2e: &mut E2e) -> Result<usize, String> {
        let first = match tokio::time::timeout(Duration::from_secs(1), c.messages.next()).await {
            Err(_) | Ok(None) => return Ok(0),
            Ok(Some(m)) => m.map_err(|e| format!("pull: {e}"))?,
        };
        let mut got = vec![first];
        // Whatever else has already arrived, up to the batch.
        while got.len() < max {
            match c.messages.next().now_or_never() {
                Some(Some(m)) => got.push(m.map_err(|e| format!("pull: {e}"))?),
                _ => break,
            }
        }
        let at = Instant::now();
        for m in &got {
            e2e.item(at, &m.payload);
        }
        for m in &got {
            m.ack().await.map_err(|e| format!("ack: {e}"))?;
        }
        Ok(got.len())
    }

    async fn teardown(&self) {
        if let Ok(js) = self.context().await {
            let _ = js.delete_stream(&self.name).await;
        }
    }
}
