//! Wire messages to and from core types: timestamps, durations, partitions, item ids, items, queue definitions,
//! stats.
//!
//! This is the one wire-to-domain boundary: everything the wire carries in its own shape (signed integers, hex id
//! strings, Go durations, protobuf timestamps) is parsed and checked here, and the engine only ever sees domain
//! types. Messages come from `lessor_core::validate`, so they read the same whichever layer finds the problem.

use std::time::Duration;

use bytes::Bytes;
use lessor_core::engine::{ProduceItem, QueueStats, QueueUpdate};
use lessor_core::time::Ts;
use lessor_core::types::{Item, ItemId, QueueInfo, RetryItem};
use lessor_core::validate;
use lessor_proto::duration::{format_go_duration, parse_go_duration};
use lessor_proto::{self as pb, Timestamp};

use crate::error::ApiError;

/// A wire timestamp as microseconds (unset stays zero).
pub fn ts_from(t: &Option<Timestamp>) -> Ts {
    match t {
        None => Ts::ZERO,
        Some(t) => Ts(i64::try_from(t.unix_nanos() / 1000).unwrap_or(if t.seconds < 0 {
            i64::MIN
        } else {
            i64::MAX
        })),
    }
}

/// Microseconds as a wire timestamp (zero and "never" stay unset).
pub fn ts_to(t: Ts) -> Option<Timestamp> {
    if t.is_zero() || t == Ts::NEVER {
        None
    } else {
        Some(Timestamp::from_unix_nanos(i128::from(t.0) * 1000))
    }
}

/// Parses an optional Go duration field; empty means unset.
pub fn duration(field: &str, s: &str) -> Result<Option<Duration>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    parse_go_duration(s)
        .map(Some)
        .map_err(|e| validate::invalid(field, format!("{e} - expected format: 900ms, 5m or 15m")).into())
}

/// A partition number (signed on the wire).
pub fn partition(p: i32) -> Result<u32, ApiError> {
    Ok(validate::partition(i64::from(p))?)
}

/// Item ids as the wire carries them (16 lowercase hex digits each).
pub fn item_ids(ids: &[String]) -> Result<Vec<ItemId>, ApiError> {
    Ok(validate::item_ids(ids)?)
}

/// How many entries a list returns when the request leaves `limit` at 0 (Querator's default).
const DEFAULT_LIST_LIMIT: usize = 1000;

/// A list limit (signed on the wire; 0 means the default).
pub fn list_limit(limit: i32) -> Result<usize, ApiError> {
    Ok(validate::list_limit(i64::from(limit), DEFAULT_LIST_LIMIT)?)
}

/// A list pivot: empty means "from the start".
pub fn pivot(s: &str) -> Result<Option<ItemId>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(validate::item_id(s)?))
}

/// A lease batch size (signed on the wire). A negative size breaks the same rule as zero, "must be greater than
/// zero", which the engine checks together with the maximum, so it maps to zero here.
pub fn batch_size(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Produce items.
pub fn produce_items(items: Vec<pb::QueueProduceItem>) -> Vec<ProduceItem> {
    items
        .into_iter()
        .map(|i| ProduceItem {
            enqueue_at: ts_from(&i.enqueue_at),
            reference: i.reference,
            encoding: i.encoding,
            kind: i.kind,
            payload: if i.bytes.is_empty() {
                Bytes::from(i.utf8.into_bytes())
            } else {
                Bytes::from(i.bytes)
            },
            ..Default::default() // TODO(issue 10): priority and dedup_id from the wire
        })
        .collect()
}

/// A leased item.
pub fn lease_item(i: Item) -> pb::QueueLeaseItem {
    pb::QueueLeaseItem {
        encoding: i.encoding,
        kind: i.kind,
        reference: i.reference,
        id: i.id.to_string(),
        attempts: i32::try_from(i.attempts).unwrap_or(i32::MAX),
        lease_deadline: ts_to(i.lease_deadline),
        bytes: i.payload.to_vec(),
        ..Default::default() // TODO(issue 10): extension fields
    }
}

/// Retry items; the first bad id fails the request.
pub fn retry_items(items: Vec<pb::QueueRetryItem>) -> Result<Vec<RetryItem>, ApiError> {
    items
        .into_iter()
        .map(|i| {
            Ok(RetryItem {
                id: validate::item_id(&i.id)?,
                retry_at: ts_from(&i.retry_at),
                dead: i.dead,
            })
        })
        .collect()
}

/// A stored item, every field filled (Querator leaves enqueue_at and dead_deadline out).
pub fn storage_item(i: Item) -> pb::StorageItem {
    pb::StorageItem {
        id: i.id.to_string(),
        source_id: i.source_id,
        is_leased: i.is_leased,
        lease_deadline: ts_to(i.lease_deadline),
        expire_deadline: ts_to(i.expire_deadline),
        dead_deadline: None,
        created_at: ts_to(i.created_at),
        updated_at: None,
        enqueue_at: ts_to(i.enqueue_at),
        attempts: i32::try_from(i.attempts).unwrap_or(i32::MAX),
        max_attempts: i32::try_from(i.max_attempts).unwrap_or(i32::MAX),
        reference: i.reference,
        encoding: i.encoding,
        kind: i.kind,
        payload: i.payload.to_vec(),
        ..Default::default() // TODO(issue 10): extension fields
    }
}

/// An imported item.
pub fn import_item(i: pb::StorageItem) -> Result<Item, ApiError> {
    Ok(Item {
        id: ItemId(0),
        source_id: i.source_id,
        is_leased: i.is_leased,
        lease_deadline: ts_from(&i.lease_deadline),
        expire_deadline: ts_from(&i.expire_deadline),
        enqueue_at: ts_from(&i.enqueue_at),
        created_at: ts_from(&i.created_at),
        attempts: validate::not_negative("attempts", i.attempts)?,
        max_attempts: validate::not_negative("max_attempts", i.max_attempts)?,
        reference: i.reference,
        encoding: i.encoding,
        kind: i.kind,
        payload: Bytes::from(i.payload),
        dead: false,
        priority: 0, // TODO(issue 10)
    })
}

/// A queue definition from `queues.create`.
pub fn queue_info_in(q: pb::QueueInfo) -> Result<QueueInfo, ApiError> {
    let max_attempts = validate::not_negative("max_attempts", q.max_attempts)?;
    let requested_partitions = validate::not_negative("requested_partitions", q.requested_partitions)?;
    Ok(QueueInfo {
        name: q.queue_name,
        namespace: q.namespace,
        dead_queue: q.dead_queue,
        reference: q.reference,
        lease_timeout: duration("lease_timeout", &q.lease_timeout)?.unwrap_or_default(),
        expire_timeout: duration("expire_timeout", &q.expire_timeout)?.unwrap_or_default(),
        max_attempts,
        requested_partitions,
        ..Default::default()
    })
}

/// A `queues.update`: only the fields the request sets change. A field at its zero value (empty string, 0) is "not
/// set", because proto3 cannot tell the two apart; Querator instead overwrote max_attempts, reference and dead_queue
/// with whatever was sent, so omitting them reset them.
pub fn queue_update(q: pb::QueueInfo) -> Result<QueueUpdate, ApiError> {
    let max_attempts = validate::not_negative("max_attempts", q.max_attempts)?;
    let requested_partitions = validate::not_negative("requested_partitions", q.requested_partitions)?;
    let opt = |s: String| if s.is_empty() { None } else { Some(s) };
    Ok(QueueUpdate {
        name: q.queue_name,
        lease_timeout: duration("lease_timeout", &q.lease_timeout)?,
        expire_timeout: duration("expire_timeout", &q.expire_timeout)?,
        max_attempts: (max_attempts != 0).then_some(max_attempts),
        dead_queue: opt(q.dead_queue),
        reference: opt(q.reference),
        requested_partitions: (requested_partitions != 0).then_some(requested_partitions),
        ..Default::default() // TODO(issue 10): dedup window, backoff, max lease from the wire
    })
}

/// A queue definition for `queues.info` and `queues.list`.
pub fn queue_info_out(q: QueueInfo) -> pb::QueueInfo {
    pb::QueueInfo {
        queue_name: q.name,
        created_at: ts_to(q.created_at),
        updated_at: ts_to(q.updated_at),
        dead_queue: q.dead_queue,
        reference: q.reference,
        lease_timeout: format_go_duration(q.lease_timeout),
        expire_timeout: format_go_duration(q.expire_timeout),
        max_attempts: i32::try_from(q.max_attempts).unwrap_or(i32::MAX),
        requested_partitions: i32::try_from(q.requested_partitions).unwrap_or(i32::MAX),
        partitions: q
            .partitions
            .iter()
            .map(|p| pb::PartitionInfo {
                partition: i32::try_from(p.partition).unwrap_or(i32::MAX),
            })
            .collect(),
        namespace: q.namespace,
        ..Default::default() // TODO(issue 10): extension fields
    }
}

/// `queue.stats`.
pub fn stats_out(queue: String, s: QueueStats) -> pb::QueueStatsResponse {
    let c = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
    pb::QueueStatsResponse {
        queue_name: queue,
        logical_queues: vec![pb::QueueLogicalStats {
            produce_waiting: c(s.produce_waiting),
            lease_waiting: c(s.lease_waiting),
            complete_waiting: c(s.complete_waiting),
            in_flight: c(s.in_flight),
            partitions: s
                .partitions
                .into_iter()
                .map(|p| pb::QueuePartitionStats {
                    partition: i32::try_from(p.partition).unwrap_or(i32::MAX),
                    total: c(p.total),
                    total_leased: c(p.total_leased),
                    failures: i32::try_from(p.failures).unwrap_or(i32::MAX),
                    average_age: format_go_duration(p.average_age),
                    average_leased_age: format_go_duration(p.average_leased_age),
                    scheduled: c(p.scheduled),
                    // Not Querator's fields: left at zero, so neither encoding carries them and a strict
                    // protojson decoder of Querator's QueuePartitionStats (unknown fields are errors) reads the
                    // reply. `total - total_leased` gives the same figure.
                    un_leased: 0,
                    next_lifecycle_run: String::new(),
                })
                .collect(),
        }],
    }
}

#[cfg(test)]
mod strict_querator_tests {
    use lessor_core::engine::PartitionReport;

    use super::*;

    /// Every key of a JSON object must be one Querator's message has: a strict protojson decoder (unknown fields
    /// are errors, the default of Google's libraries) rejects the whole reply otherwise.
    fn only_keys(v: &serde_json::Value, allowed: &[&str], what: &str) {
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
        for k in obj.keys() {
            assert!(
                allowed.contains(&k.as_str()),
                "{what} has '{k}', which Querator's message lacks: {v}"
            );
        }
    }

    #[test]
    fn queue_stats_json_carries_only_queraters_fields() {
        let stats = QueueStats {
            produce_waiting: 1,
            lease_waiting: 2,
            complete_waiting: 3,
            in_flight: 4,
            partitions: vec![PartitionReport {
                partition: 1,
                total: 10,
                total_leased: 3,
                failures: 0,
                average_age: Duration::from_secs(5),
                average_leased_age: Duration::from_secs(1),
                scheduled: 2,
            }],
        };
        let json = pb::encode(pb::Encoding::Json, &stats_out("q".into(), stats));
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        only_keys(&v, &["queue_name", "logicalQueues"], "QueueStatsResponse");
        let logical = &v["logicalQueues"][0];
        only_keys(
            logical,
            &[
                "produce_waiting",
                "lease_waiting",
                "complete_waiting",
                "in_flight",
                "partitions",
            ],
            "QueueLogicalStats",
        );
        let part = &logical["partitions"][0];
        only_keys(
            part,
            &[
                "partition",
                "total",
                "total_leased",
                "failures",
                "average_age",
                "average_leased_age",
                "scheduled",
            ],
            "QueuePartitionStats",
        );
        assert_eq!(part["total"], 10);
        assert_eq!(part["total_leased"], 3);
    }
}
