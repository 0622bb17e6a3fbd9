//! The JSON keys of Querator's own messages. A Querator client decodes replies with a strict protojson decoder
//! (unknown fields are errors), so every reply Lessor sends on Querator's routes must stay within these; the tests
//! of the wire, the server's conversions and the extensions check it against this one list.

/// `QueueInfo`.
pub const QUEUE_INFO: &[&str] = &[
    "queue_name",
    "created_at",
    "updated_at",
    "dead_queue",
    "reference",
    "lease_timeout",
    "expire_timeout",
    "max_attempts",
    "requested_partitions",
    "partitions",
    "namespace",
];

/// `QueueLeaseItem`.
pub const LEASE_ITEM: &[&str] = &[
    "encoding",
    "kind",
    "reference",
    "id",
    "attempts",
    "lease_deadline",
    "bytes",
];

/// `StorageItem`.
pub const STORAGE_ITEM: &[&str] = &[
    "id",
    "source_id",
    "is_leased",
    "lease_deadline",
    "expire_deadline",
    "dead_deadline",
    "created_at",
    "updated_at",
    "enqueue_at",
    "attempts",
    "max_attempts",
    "reference",
    "encoding",
    "kind",
    "payload",
];
