//! Wire messages to and from core types: timestamps, durations, partitions, item ids, items, queue definitions,
//! stats.
//!
//! This is the one wire-to-domain boundary: everything the wire carries in its own shape (signed integers, hex id
//! strings, Go durations, protobuf timestamps) is parsed and checked here, and the engine only ever sees domain
//! types. Messages come from `lessor_core::validate`, so they read the same whichever layer finds the problem.

use std::time::Duration;

use bytes::Bytes;
use lessor_core::engine::{
    BrowsePage, BrowseRequest, BrowseState, PartitionMove, ProduceItem, QueueStats, QueueUpdate,
    RebalanceRequest, RebalanceTask, RedriveRequest, RedriveTask,
};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, Item, ItemId, QueueInfo, RetryItem};
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

/// Produce items. The priority is checked here, where the wire's signed value still exists: a negative one cannot
/// reach the engine's `u8`. Errors name the item (`items[3].priority`). Dedup keys are checked once, by the engine.
pub fn produce_items(items: Vec<pb::QueueProduceItem>) -> Result<Vec<ProduceItem>, ApiError> {
    items
        .into_iter()
        .enumerate()
        .map(|(n, i)| {
            let priority = validate::priority(|| format!("items[{n}].priority"), i64::from(i.priority))?;
            Ok(ProduceItem {
                enqueue_at: ts_from(&i.enqueue_at),
                reference: i.reference,
                encoding: i.encoding,
                kind: i.kind,
                payload: if i.bytes.is_empty() {
                    Bytes::from(i.utf8.into_bytes())
                } else {
                    Bytes::from(i.bytes)
                },
                priority,
                dedup_id: i.dedup_id,
            })
        })
        .collect()
}

/// `msg` as the caller may see it: with Lessor's extension fields when it reads them, otherwise cleared by `clear`
/// (see `Ctx::extensions`).
pub fn view<T>(mut msg: T, extensions: bool, clear: fn(&mut T)) -> T {
    if !extensions {
        clear(&mut msg);
    }
    msg
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
        priority: i32::from(i.priority),
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
        priority: i32::from(i.priority),
    }
}

/// Imported items (`items[n].priority` names a bad priority).
pub fn import_items(items: Vec<pb::StorageItem>) -> Result<Vec<Item>, ApiError> {
    items
        .into_iter()
        .enumerate()
        .map(|(n, i)| import_item(n, i))
        .collect()
}

/// The `n`-th imported item.
fn import_item(n: usize, i: pb::StorageItem) -> Result<Item, ApiError> {
    let priority = validate::priority(|| format!("items[{n}].priority"), i64::from(i.priority))?;
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
        priority,
    })
}

/// A queue definition from `queues.create`. Lessor's extension fields keep their zero value when absent: the
/// definition stores "not set" (an empty `dedup_window` is the 5-minute default), so `queues.info` answers with
/// what was sent and a Querator client never sees a field it did not ask for.
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
        dedup_window: duration("dedup_window", &q.dedup_window)?.unwrap_or_default(),
        retry_backoff: q
            .retry_backoff
            .map(|b| backoff_in(&b))
            .transpose()?
            .unwrap_or(Backoff::OFF),
        paused: q.paused,
        max_lease_timeout: duration("max_lease_timeout", &q.max_lease_timeout)?.unwrap_or_default(),
        ..Default::default()
    })
}

/// A `queues.update`: only the fields the request sets change. A field at its zero value (empty string, 0) is "not
/// set", because proto3 cannot tell the two apart; Querator instead overwrote max_attempts, reference and dead_queue
/// with whatever was sent, so omitting them reset them.
///
/// Lessor's extensions: `dedup_window` and `max_lease_timeout` change when the string is not empty (`"0s"` sets
/// zero: the default window, or the expire timeout as the longest lease); `retry_backoff` changes when the
/// message is present, and an empty one (`{}`) turns backoff off; `paused` is ignored (`queue.pause` and
/// `queue.resume` change it), so writing back what `queues.info` returned changes nothing.
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
        dedup_window: duration("dedup_window", &q.dedup_window)?,
        retry_backoff: q.retry_backoff.map(|b| backoff_in(&b)).transpose()?,
        max_lease_timeout: duration("max_lease_timeout", &q.max_lease_timeout)?,
    })
}

/// A retry backoff policy from the wire; the engine checks the ranges (`retry_backoff.factor is invalid; ...`).
fn backoff_in(b: &pb::RetryBackoff) -> Result<Backoff, ApiError> {
    Ok(Backoff {
        base: duration("retry_backoff.base", &b.base)?.unwrap_or_default(),
        max: duration("retry_backoff.max", &b.max)?.unwrap_or_default(),
        factor: b.factor,
        jitter: b.jitter,
    })
}

/// A duration the definition may leave unset: zero goes out as the empty string (omitted from JSON), unlike
/// Querator's own timeouts, which are always set.
fn optional_duration(d: Duration) -> String {
    if d.is_zero() {
        String::new()
    } else {
        format_go_duration(d)
    }
}

/// A queue definition for `queues.info` and `queues.list`, with the stored values: an extension left unset stays
/// absent on the wire (never the default it stands for), so a Querator client reads only Querator's fields.
pub fn queue_info_out(q: QueueInfo) -> pb::QueueInfo {
    let b = q.retry_backoff;
    let retry_backoff = (b != Backoff::OFF).then(|| pb::RetryBackoff {
        base: optional_duration(b.base),
        max: optional_duration(b.max),
        factor: b.factor,
        jitter: b.jitter,
    });
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
        dedup_window: optional_duration(q.dedup_window),
        retry_backoff,
        paused: q.paused,
        max_lease_timeout: optional_duration(q.max_lease_timeout),
        restoring: q.restoring,
    }
}

/// How many items a browse returns when the request leaves `limit` at 0: a screenful, not a dump.
const DEFAULT_BROWSE_LIMIT: usize = 100;

/// A browse request: the state word, the optional priority filter, the pivot and the limit.
pub fn browse_request(r: &pb::QueueBrowseRequest, partition: u32) -> Result<BrowseRequest, ApiError> {
    let state = match r.state.as_str() {
        "" => BrowseState::Queued,
        "ready" => BrowseState::Ready,
        "leased" => BrowseState::Leased,
        "scheduled" => BrowseState::Scheduled,
        other => {
            return Err(validate::invalid(
                "state",
                format!("must be one of 'ready', 'leased', 'scheduled' or empty, got '{other}'"),
            )
            .into())
        }
    };
    let priority = r
        .priority
        .map(|p| validate::priority("priority", i64::from(p)))
        .transpose()?;
    let limit = match r.limit {
        0 => DEFAULT_BROWSE_LIMIT,
        n => usize::try_from(n)
            .ok()
            .filter(|&n| n <= validate::MAX_BROWSE)
            .ok_or_else(|| {
                validate::invalid(
                    "limit",
                    format!(
                        "must be between 1 and {} (0 means {DEFAULT_BROWSE_LIMIT}), got '{n}'",
                        validate::MAX_BROWSE
                    ),
                )
            })?,
    };
    Ok(BrowseRequest {
        partition,
        state,
        priority,
        pivot: pivot(&r.pivot)?,
        limit,
    })
}

/// A browse page; `scheduled` says whether the page lists the schedule (storage keeps scheduled items apart, so
/// the request, not a field of the item, says which they are).
pub fn browse_out(page: BrowsePage, scheduled: bool) -> pb::QueueBrowseResponse {
    pb::QueueBrowseResponse {
        items: page
            .items
            .into_iter()
            .map(|b| {
                let i = b.item;
                let state = if scheduled {
                    "scheduled"
                } else if i.is_leased {
                    "leased"
                } else {
                    "ready"
                };
                pb::BrowseItem {
                    id: i.id.to_string(),
                    state: state.to_string(),
                    holder: b.holder,
                    lease_deadline: if i.is_leased {
                        ts_to(i.lease_deadline)
                    } else {
                        None
                    },
                    priority: i32::from(i.priority),
                    attempts: i32::try_from(i.attempts).unwrap_or(i32::MAX),
                    enqueue_at: ts_to(i.enqueue_at),
                    expire_deadline: ts_to(i.expire_deadline),
                    created_at: ts_to(i.created_at),
                    reference: i.reference,
                    encoding: i.encoding,
                    kind: i.kind,
                    payload: i.payload.to_vec(),
                    source_id: i.source_id,
                }
            })
            .collect(),
        next_pivot: page.next_pivot.map(|p| p.to_string()).unwrap_or_default(),
    }
}

/// A redrive request; negative limits break the rule they would break at zero's other side.
pub fn redrive_request(r: pb::QueueRedriveRequest) -> Result<RedriveRequest, ApiError> {
    let rate_per_sec = u32::try_from(r.rate_per_sec)
        .map_err(|_| validate::invalid("rate_per_sec", "cannot be negative (0 means no limit)"))?;
    let max_items = u64::try_from(r.max_items)
        .map_err(|_| validate::invalid("max_items", "cannot be negative (0 means no limit)"))?;
    Ok(RedriveRequest {
        dead_queue: r.dead_queue,
        target_queue: r.target_queue,
        source_queue: r.source_queue,
        kind: r.kind,
        rate_per_sec,
        max_items,
    })
}

/// A redrive task.
pub fn redrive_out(t: RedriveTask) -> pb::RedriveTask {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::RedriveTask {
        task_id: t.id,
        dead_queue: t.request.dead_queue,
        target_queue: t.request.target_queue,
        source_queue: t.request.source_queue,
        kind: t.request.kind,
        rate_per_sec: i32::try_from(t.request.rate_per_sec).unwrap_or(i32::MAX),
        max_items: n(t.request.max_items),
        status: t.status.as_str().to_string(),
        moved: n(t.moved),
        skipped: n(t.skipped),
        remaining: n(t.remaining),
        error: t.error,
        created_at: ts_to(t.created_at),
        updated_at: ts_to(t.updated_at),
    }
}

/// A rebalance request; negative numbers are refused naming the field.
pub fn rebalance_request(r: pb::QueueRebalanceRequest) -> Result<RebalanceRequest, ApiError> {
    let partitions = u32::try_from(r.partitions)
        .map_err(|_| validate::invalid("partitions", "cannot be negative (0 means unchanged)"))?;
    let mut moves = Vec::with_capacity(r.moves.len());
    for (i, m) in r.moves.into_iter().enumerate() {
        let partition = u32::try_from(m.partition)
            .map_err(|_| validate::invalid(&format!("moves[{i}].partition"), "cannot be negative"))?;
        if m.to_store.is_empty() {
            return Err(validate::invalid(&format!("moves[{i}].to_store"), "cannot be empty").into());
        }
        moves.push(PartitionMove {
            partition,
            to_store: m.to_store,
        });
    }
    let max_items_per_sec = u32::try_from(r.max_items_per_sec).map_err(|_| {
        validate::invalid(
            "max_items_per_sec",
            format!("must be between 0 (no limit) and {}", u32::MAX),
        )
    })?;
    Ok(RebalanceRequest {
        queue: r.queue_name,
        moves,
        spread: r.spread,
        partitions,
        max_items_per_sec,
    })
}

/// A rebalance task.
pub fn rebalance_out(t: RebalanceTask) -> pb::RebalanceTask {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::RebalanceTask {
        task_id: t.id,
        queue_name: t.queue,
        moves: t
            .moves
            .into_iter()
            .map(|m| pb::PartitionMove {
                partition: i32::try_from(m.partition).unwrap_or(i32::MAX),
                to_store: m.to_store,
            })
            .collect(),
        partitions: i32::try_from(t.partitions).unwrap_or(i32::MAX),
        status: t.status.as_str().to_string(),
        moved: n(t.moved),
        remaining: n(t.remaining),
        error: t.error,
        created_at: ts_to(t.created_at),
        updated_at: ts_to(t.updated_at),
        max_items_per_sec: i64::from(t.max_items_per_sec),
    }
}

/// `queue.stats`. `oldest` adds each partition's `oldest_ready_age` and `tiers` its per-tier figures (Lessor
/// extensions the request asks for; a Querator client never does, so its strict decoder never meets the fields).
pub fn stats_out(queue: String, s: QueueStats, oldest: bool, tiers: bool) -> pb::QueueStatsResponse {
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
                    oldest_ready_age: if oldest && !p.oldest_ready_age.is_zero() {
                        format_go_duration(p.oldest_ready_age)
                    } else {
                        String::new()
                    },
                    tiers: tiers.then(|| tiers_out(&p.tiers)),
                })
                .collect(),
        }],
    }
}

/// A partition's (or a queue's) per-tier figures on the wire.
pub fn tiers_out(t: &lessor_core::types::TierStats) -> pb::QueueTierStats {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::QueueTierStats {
        memory_items: n(t.memory.items),
        memory_bytes: n(t.memory.bytes),
        disk_items: n(t.disk.items),
        disk_bytes: n(t.disk.bytes),
        object_items: n(t.object.items),
        object_bytes: n(t.object.bytes),
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
    fn queue_info_and_lease_items_without_extensions_carry_only_queraters_fields() {
        let info = QueueInfo {
            name: "q".into(),
            namespace: "ns".into(),
            dead_queue: "dlq".into(),
            reference: "r".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            max_attempts: 3,
            requested_partitions: 2,
            created_at: Ts(1_000_000),
            updated_at: Ts(2_000_000),
            ..Default::default()
        };
        // The stored zero goes out, not the 5-minute window it stands for.
        assert!(!info.effective_dedup_window().is_zero());
        let json = pb::encode(pb::Encoding::Json, &queue_info_out(info));
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        only_keys(&v, lessor_proto::querator_keys::QUEUE_INFO, "QueueInfo");
        let item = Item {
            id: ItemId(7),
            attempts: 1,
            lease_deadline: Ts(5_000_000),
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        };
        let json = pb::encode(pb::Encoding::Json, &lease_item(item));
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        only_keys(&v, lessor_proto::querator_keys::LEASE_ITEM, "QueueLeaseItem");
    }

    #[test]
    fn queue_info_round_trips_the_extension_fields() {
        let wire = pb::QueueInfo {
            queue_name: "q".into(),
            dedup_window: "90s".into(),
            retry_backoff: Some(pb::RetryBackoff {
                base: "2s".into(),
                max: String::new(),
                factor: 1.5,
                jitter: 0.1,
            }),
            paused: true,
            max_lease_timeout: "1h".into(),
            ..Default::default()
        };
        let out = queue_info_out(queue_info_in(wire).expect("in"));
        assert_eq!(out.dedup_window, "1m30s");
        assert_eq!(out.max_lease_timeout, "1h0m0s");
        assert!(out.paused);
        assert_eq!(
            out.retry_backoff,
            Some(pb::RetryBackoff {
                base: "2s".into(),
                max: String::new(),
                factor: 1.5,
                jitter: 0.1,
            })
        );
        // An update: empty means unchanged, an empty backoff message turns backoff off, "0s" sets zero.
        let u = queue_update(pb::QueueInfo {
            queue_name: "q".into(),
            retry_backoff: Some(pb::RetryBackoff::default()),
            max_lease_timeout: "0s".into(),
            paused: true,
            ..Default::default()
        })
        .expect("update");
        assert_eq!(u.dedup_window, None);
        assert_eq!(u.retry_backoff, Some(Backoff::OFF));
        assert_eq!(u.max_lease_timeout, Some(Duration::ZERO));
        let e = queue_update(pb::QueueInfo {
            dedup_window: "-1s".into(),
            ..Default::default()
        })
        .expect_err("negative");
        assert!(e.to_string().starts_with("dedup_window is invalid; "), "{e}");
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
                oldest_ready_age: Duration::from_secs(9),
                tiers: lessor_core::types::TierStats {
                    memory: lessor_core::types::TierFigures { items: 10, bytes: 70 },
                    object: lessor_core::types::TierFigures {
                        items: 2,
                        bytes: 3 << 20,
                    },
                    ..Default::default()
                },
            }],
        };
        // Asked for, the extension fields are there (numbered 100 and 101); a Querator client never asks.
        let with = stats_out("q".into(), stats.clone(), true, true);
        assert_eq!(with.logical_queues[0].partitions[0].oldest_ready_age, "9s");
        let json = pb::encode(pb::Encoding::Json, &with);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        let tiers = &v["logicalQueues"][0]["partitions"][0]["tiers"];
        assert_eq!(
            tiers["memory_items"], "10",
            "int64 is a string in protojson: {tiers}"
        );
        assert_eq!(tiers["object_bytes"], (3u64 << 20).to_string());
        assert!(
            tiers.get("disk_items").is_none(),
            "zero figures are omitted: {tiers}"
        );
        // Each asked for alone.
        let only_tiers = stats_out("q".into(), stats.clone(), false, true);
        assert_eq!(only_tiers.logical_queues[0].partitions[0].oldest_ready_age, "");
        assert!(only_tiers.logical_queues[0].partitions[0].tiers.is_some());
        let only_oldest = stats_out("q".into(), stats.clone(), true, false);
        assert!(only_oldest.logical_queues[0].partitions[0].tiers.is_none());
        // Not asked for (a Querator client): every key is one Querator's messages have, in both encodings.
        let plain = stats_out("q".into(), stats, false, false);
        assert!(plain.logical_queues[0].partitions[0].tiers.is_none());
        let json = pb::encode(pb::Encoding::Json, &plain);
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
