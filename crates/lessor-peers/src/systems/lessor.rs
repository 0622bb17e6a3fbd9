//! Lessor through `lessor-client` over HTTP with protobuf bodies: `queue.produce` of a batch, `queue.lease` of up
//! to a batch (long poll), `queue.complete` of the leased ids. The same calls `lessor bench` makes, against a
//! separate `lessor server` process so its CPU can be measured apart from the driver's.

use std::time::Instant;

use lessor_client::{Client, Encoding};
use lessor_proto::{
    QueueCompleteRequest, QueueInfo, QueueLeaseRequest, QueueProduceItem, QueueProduceRequest,
    QueuesDeleteRequest,
};

use crate::run::Peer;
use crate::stats::{Clock, E2e};

/// Request timeout of produce and complete (they wait for the fsync that covers them).
const CALL_TIMEOUT: &str = "30s";

/// A queue on one Lessor server.
pub struct Lessor {
    client: Client,
    queue: String,
}

impl Lessor {
    /// Creates a queue with a unique name (1 partition, lease timeout 1 min) on the server at `endpoint`.
    pub async fn setup(endpoint: &str, unique: &str) -> Result<Lessor, String> {
        let client = Client::new(endpoint)
            .map_err(|e| format!("lessor: {e}"))?
            .with_encoding(Encoding::Protobuf);
        let queue = format!("peers-{unique}");
        client
            .queues_create(&QueueInfo {
                queue_name: queue.clone(),
                lease_timeout: "1m".into(),
                expire_timeout: "24h".into(),
                requested_partitions: 1,
                reference: "lessor-peers".into(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("lessor: cannot create queue '{queue}' at {endpoint}: {e}"))?;
        Ok(Lessor { client, queue })
    }
}

impl Peer for Lessor {
    // reqwest keeps a pool of keep-alive connections in the shared client: each task that has a request in
    // flight holds one of them, so N tasks use N connections.
    type Producer = ();
    type Consumer = String;

    async fn producer(&self, _: usize) -> Result<(), String> {
        Ok(())
    }

    async fn consumer(&self, id: usize) -> Result<String, String> {
        Ok(format!("{}-consumer-{id}", self.queue))
    }

    async fn produce(&self, _: &mut (), n: usize, clock: &Clock) -> Result<(), String> {
        let items = clock
            .batch(n)
            .into_iter()
            .map(|bytes| QueueProduceItem {
                bytes,
                ..Default::default()
            })
            .collect();
        let req = QueueProduceRequest {
            queue_name: self.queue.clone(),
            request_timeout: CALL_TIMEOUT.into(),
            items,
        };
        loop {
            match self.client.queue_produce(&req).await {
                Ok(()) => return Ok(()),
                // 454: the server asks for a retry (e.g. a partition moving); nothing was stored.
                Err(e) if e.is_retryable() => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn consume(&self, client_id: &mut String, max: usize, e2e: &mut E2e) -> Result<usize, String> {
        let req = QueueLeaseRequest {
            queue_name: self.queue.clone(),
            batch_size: i32::try_from(max).unwrap_or(1000),
            client_id: client_id.clone(),
            request_timeout: "1s".into(),
        };
        let resp = match self.client.queue_lease(&req).await {
            Ok(r) => r,
            // 454: the long poll ended with nothing to lease.
            Err(e) if e.is_retryable() => return Ok(0),
            Err(e) => return Err(e.to_string()),
        };
        let at = Instant::now();
        for item in &resp.items {
            e2e.item(at, &item.bytes);
        }
        let n = resp.items.len();
        if n == 0 {
            return Ok(0);
        }
        let done = QueueCompleteRequest {
            queue_name: self.queue.clone(),
            partition: resp.partition,
            request_timeout: CALL_TIMEOUT.into(),
            ids: resp.items.into_iter().map(|i| i.id).collect(),
        };
        self.client
            .queue_complete(&done)
            .await
            .map_err(|e| e.to_string())?;
        Ok(n)
    }

    async fn teardown(&self) {
        let _ = self
            .client
            .queues_delete(&QueuesDeleteRequest {
                queue_name: self.queue.clone(),
                force: true,
            })
            .await;
    }
}
