//! Paths of the v1 API, as routed by Querator (`transport/http.go`).

/// `GET`: health document.
pub const HEALTH: &str = "/health";
/// `GET`: Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// Produce items.
pub const QUEUE_PRODUCE: &str = "/v1/queue.produce";
/// Lease items (long-poll).
pub const QUEUE_LEASE: &str = "/v1/queue.lease";
/// Complete leased items.
pub const QUEUE_COMPLETE: &str = "/v1/queue.complete";
/// Retry or dead-letter leased items.
pub const QUEUE_RETRY: &str = "/v1/queue.retry";
/// Queue statistics.
pub const QUEUE_STATS: &str = "/v1/queue.stats";
/// Clear a queue.
pub const QUEUE_CLEAR: &str = "/v1/queue.clear";
/// Reload a queue's partitions.
pub const QUEUE_RELOAD: &str = "/v1/queue.reload";
/// Create a queue.
pub const QUEUES_CREATE: &str = "/v1/queues.create";
/// List queues.
pub const QUEUES_LIST: &str = "/v1/queues.list";
/// Update a queue.
pub const QUEUES_UPDATE: &str = "/v1/queues.update";
/// Delete a queue.
pub const QUEUES_DELETE: &str = "/v1/queues.delete";
/// One queue's configuration.
pub const QUEUES_INFO: &str = "/v1/queues.info";
/// List raw items of a partition.
pub const STORAGE_ITEMS_LIST: &str = "/v1/storage/items.list";
/// List scheduled items of a partition.
pub const STORAGE_SCHEDULED_LIST: &str = "/v1/storage/scheduled.list";
/// Import raw items.
pub const STORAGE_ITEMS_IMPORT: &str = "/v1/storage/items.import";
/// Delete raw items.
pub const STORAGE_ITEMS_DELETE: &str = "/v1/storage/items.delete";
