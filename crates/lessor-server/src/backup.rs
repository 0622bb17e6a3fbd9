//! Online backup and restore: `/v1/storage.backup` streams a backup file (the [`lessor_proto::backup`] format) of
//! a running server, and the `storage.restore.*` routes fill queues from one.
//!
//! A backup takes each partition's snapshot through its queue task (one instant per partition, ordered with the
//! task's other work) just before reading it, then reads the snapshot page by page outside the task, so serving
//! goes on; blocks are encoded on the blocking pool and sent as the response is read, so a slow client slows
//! only its own backup (the channel between producer and response holds a few blocks). A failure mid-way ends the
//! response with an error before the trailer: the client is left with a file that says it is incomplete.
//!
//! An item whose payload is larger than [`fmt::PART_BYTES`] gets a block of its own and its payload follows in
//! part records (format version 2, written to clients that read it), so no record outgrows what a reader takes
//! whatever the item size the server accepted.
//!
//! A restore creates the queue in the restoring state (`QueueInfo::restoring`), imports blocks as the client sends
//! them (each exactly once, see the engine's restore), and finishes. A page is a compressed block as stored
//! (decompressing to at most [`fmt::MAX_RECORD`] bytes) or, for an item larger than that, the block uncompressed:
//! either way a page decodes to little more than its own bytes.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use lessor_core::auth::Permission;
use lessor_core::engine::Engine;
use lessor_core::error::QueueError;
use lessor_core::time::{Clock, SystemClock};
use lessor_core::types::{QueueInfo, DEFAULT_NAMESPACE};
use lessor_proto::backup::{self as fmt, RecordKind};
use lessor_proto::routes::{self, DEFAULT_BODY};
use lessor_proto::{self as pb, Reply};
use prost::Message;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::http::{authenticate, check_head, closing, error_response, header_str, Api, AppState, Ctx};
use crate::metrics::{Metrics, RouteLabels};

/// Blocks waiting between the producer and the response: enough to keep both busy, few enough that a stalled
/// client holds little memory.
const IN_FLIGHT_BLOCKS: usize = 4;
/// While the server answers other requests, a backup pauses after each block for this many times the time the
/// block took to read and encode: it then takes at most a quarter of the time, and serving keeps the rest of the
/// machine. An idle server's backup runs at full speed.
const YIELD_FACTOR: u32 = 3;

/// `POST /v1/storage.backup`.
pub(crate) async fn backup(State(st): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut body = st.body(body, &parts.headers);
    let accept = pb::response_encoding(header_str(&parts.headers, header::ACCEPT));
    let out_enc = *accept.as_ref().unwrap_or(&pb::Encoding::Json);
    let started: Result<Response, ApiError> = async {
        let in_enc = match check_head(&parts, Ok(out_enc)) {
            Ok(enc) => enc,
            Err(e) => {
                body.discard(DEFAULT_BODY).await;
                return Err(e);
            }
        };
        let principal = authenticate(&st.auth, &parts.headers).await?;
        let bytes = body.read(DEFAULT_BODY).await?;
        let msg: pb::StorageBackupRequest = pb::decode(in_enc, &bytes)?;
        if st.auth.enabled() {
            // Checked before the queues are looked up, in `_system` for a queue that does not exist (as every
            // queue route does): otherwise "queue does not exist" against "access denied" told anyone which names
            // exist.
            for n in &msg.queue_names {
                let ns = st.engine.queue_namespace(n).await?;
                let ns = ns.as_deref().unwrap_or(DEFAULT_NAMESPACE);
                st.auth.authorize(&principal, ns, Permission::QueueStats).await?;
            }
        }
        let queues = selected_queues(&st.engine, &msg.queue_names).await?;
        if st.auth.enabled() {
            for q in &queues {
                let ns = if q.namespace.is_empty() {
                    DEFAULT_NAMESPACE
                } else {
                    q.namespace.as_str()
                };
                st.auth.authorize(&principal, ns, Permission::QueueStats).await?;
            }
        }
        if msg.max_items_per_sec < 0 {
            return Err(invalid("max_items_per_sec", "cannot be negative"));
        }
        let rate = u64::try_from(msg.max_items_per_sec).unwrap_or(0);
        // The newest version the client reads, at most this build's: a client that does not say reads version 1.
        let version = u32::try_from(msg.format_version)
            .unwrap_or(0)
            .clamp(1, fmt::FORMAT_VERSION);
        Ok(stream_backup(
            st.engine.clone(),
            st.metrics.clone(),
            queues,
            rate,
            version,
        ))
    }
    .await;
    let (response, code) = match started {
        Ok(r) => (r, 200),
        Err(e) => (error_response(out_enc, &e), e.code()),
    };
    st.metrics
        .requests
        .get_or_create(&RouteLabels {
            route: routes::STORAGE_BACKUP.to_string(),
            code,
        })
        .inc();
    closing(response, body.reusable)
}

/// The queues a backup covers, dead-letter queues first (a restore must create them before the queues naming
/// them). Empty `names`: every queue.
async fn selected_queues(engine: &Engine, names: &[String]) -> Result<Vec<QueueInfo>, ApiError> {
    let mut out = Vec::new();
    if names.is_empty() {
        let mut pivot = String::new();
        loop {
            let page = engine.list_queues(&pivot, 1000, "").await?;
            if let Some(last) = page.queues.last() {
                pivot = format!("{}\0", last.name);
            }
            out.extend(page.queues);
            if !page.more {
                break;
            }
        }
    } else {
        for n in names {
            if out.iter().any(|q: &QueueInfo| &q.name == n) {
                continue;
            }
            out.push(engine.queue_info(n).await?);
        }
    }
    let dead: std::collections::HashSet<String> = out.iter().map(|q| q.dead_queue.clone()).collect();
    out.sort_by_key(|q| !dead.contains(&q.name));
    Ok(out)
}

fn backup_id() -> String {
    let t = SystemClock.now().0;
    format!("{t:x}-{:x}", std::process::id())
}

/// Starts the producer task and answers with the stream it feeds.
fn stream_backup(
    engine: Engine,
    metrics: Arc<Metrics>,
    queues: Vec<QueueInfo>,
    rate: u64,
    version: u32,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(IN_FLIGHT_BLOCKS);
    tokio::spawn(async move {
        metrics.backups_running.inc();
        let started = Instant::now();
        let r = produce_backup(&engine, &metrics, &queues, rate, version, &tx).await;
        metrics.backups_running.dec();
        match r {
            Ok(items) => {
                tracing::info!(queues = queues.len(), items, elapsed = ?started.elapsed(), "backup sent");
            }
            Err(e) => {
                tracing::warn!(error = %e, "backup failed; the client's file ends without a trailer");
                metrics.backups_failed.inc();
                let _ = tx.send(Err(std::io::Error::other(e))).await;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut r = (StatusCode::OK, Body::from_stream(stream)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// Writes the whole backup into `tx` in format `version`; returns the item count. `Err` names what failed.
async fn produce_backup(
    engine: &Engine,
    metrics: &Metrics,
    queues: &[QueueInfo],
    rate: u64,
    version: u32,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<u64, String> {
    let started = Instant::now();
    let send = |chunk: Vec<u8>| async {
        metrics.backup_bytes.inc_by(chunk.len() as u64);
        tx.send(Ok(Bytes::from(chunk)))
            .await
            .map_err(|_| "the client went away".to_string())
    };
    let header = fmt::BackupHeader {
        backup_id: backup_id(),
        created_at: SystemClock.now().0,
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        queues: queues.iter().map(fmt::QueueRecord::from_info).collect(),
    };
    let mut start = fmt::encode_start_as(version);
    start.extend(fmt::encode_record(RecordKind::Header, &header));
    send(start).await?;
    let mut trailer = fmt::BackupTrailer::default();
    let max_bytes = engine.limits().max_lease_bytes;
    // Items: dead-letter queues last. The header lists them first (a restore creates them first), but partitions
    // are read one after the other while the queues keep running, and a dead-letter move writes the item into the
    // dead-letter queue before it removes it from its queue: read in this order, an item moved during the backup
    // is in one of the two (or both), never in neither. The format does not order blocks across queues.
    let dead: std::collections::HashSet<&str> = header.queues.iter().map(|q| q.dead_queue.as_str()).collect();
    let mut order: Vec<&fmt::QueueRecord> = header.queues.iter().collect();
    order.sort_by_key(|q| dead.contains(q.name.as_str()));
    for q in order {
        for partition in 0..q.partitions {
            let mut snap = engine
                .snapshot(&q.name, partition)
                .await
                .map_err(|e| format!("snapshot of partition {partition} of '{}': {e}", q.name))?;
            let mut first = 0u64;
            loop {
                let work = Instant::now();
                let answered = metrics.answered.load(std::sync::atomic::Ordering::Relaxed);
                // A page is held in memory whole: the snapshot stops it at the bound every other bulk read keeps
                // (limits.max-lease-bytes, at least one item), whatever the sizes of the items that follow.
                let items = snap
                    .next_within(fmt::BLOCK_ITEMS, max_bytes)
                    .await
                    .map_err(|e| format!("reading partition {partition} of '{}': {e}", q.name))?;
                if items.is_empty() {
                    break;
                }
                // A page of more than BLOCK_BYTES of payload goes in several blocks of at most BLOCK_BYTES (or one
                // item): a block must stay far below the largest record a reader takes (MAX_RECORD) and the body a
                // restore accepts. An item above BLOCK_BYTES is thus alone in its block, and one above PART_BYTES
                // is then split into part records.
                let mut blocks: Vec<Vec<lessor_core::types::Item>> = Vec::new();
                let mut bytes = 0usize;
                for it in items {
                    let len = it.payload.len();
                    match blocks.last_mut() {
                        Some(b) if bytes + len <= fmt::BLOCK_BYTES => b.push(it),
                        _ => {
                            bytes = 0;
                            blocks.push(vec![it]);
                        }
                    }
                    bytes += len;
                }
                let took = work.elapsed();
                for items in blocks {
                    let work = Instant::now();
                    let n = items.len() as u64;
                    let big = match items.as_slice() {
                        [it] if it.payload.len() > fmt::PART_BYTES => Some((it.id, it.payload.len())),
                        _ => None,
                    };
                    if let Some((id, len)) = big.filter(|&(_, len)| version < 2 && len > fmt::V1_MAX_PAYLOAD)
                    {
                        // A version 1 file carries an item in one record: the client's reader would refuse this
                        // one (and every restore would), so the backup fails here and says why.
                        return Err(format!(
                            "item {id} of partition {partition} of '{}' holds {len} bytes of payload, more than \
                             the {} a version 1 backup carries; back up with a lessor client that reads format \
                             version {} (this server's)",
                            q.name,
                            fmt::V1_MAX_PAYLOAD,
                            fmt::FORMAT_VERSION
                        ));
                    }
                    let split = big.is_some() && version >= 2;
                    let queue = q.name.clone();
                    // Converting and encoding are CPU work: on the blocking pool, off the serving threads.
                    let (record, payload) = tokio::task::spawn_blocking(move || {
                        let block = fmt::ItemBlock {
                            queue,
                            partition,
                            first,
                            items: items.into_iter().map(fmt::ItemRecord::from_owned).collect(),
                            payload_len: 0,
                        };
                        let (block, payload) = if split {
                            fmt::split_item(block)
                        } else {
                            (block, Bytes::new())
                        };
                        (fmt::encode_record(RecordKind::Items, &block), payload)
                    })
                    .await
                    .map_err(|e| format!("encoding a block: {e}"))?;
                    let mut took = took + work.elapsed();
                    send(record).await?;
                    // The parts of a split payload, one record at a time: the item is held once (`payload`, a
                    // shared buffer the parts are slices of) and the channel holds a few parts.
                    for offset in (0..payload.len()).step_by(fmt::PART_BYTES) {
                        let work = Instant::now();
                        let part = fmt::PayloadPart {
                            offset: offset as u64,
                            bytes: payload.slice(offset..payload.len().min(offset + fmt::PART_BYTES)),
                        };
                        let record =
                            tokio::task::spawn_blocking(move || fmt::encode_record(RecordKind::Part, &part))
                                .await
                                .map_err(|e| format!("encoding a payload part: {e}"))?;
                        took += work.elapsed();
                        send(record).await?;
                        trailer.parts += 1;
                    }
                    if metrics.answered.load(std::sync::atomic::Ordering::Relaxed) != answered {
                        tokio::time::sleep(took.saturating_mul(YIELD_FACTOR)).await;
                    }
                    metrics.backup_items.inc_by(n);
                    first += n;
                    trailer.blocks += 1;
                    if rate > 0 {
                        // Paced: no further than `rate` items per second since the start.
                        let due =
                            std::time::Duration::from_secs_f64((trailer.items + first) as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
            trailer.items += first;
            trailer.partitions.push(fmt::PartitionCount {
                queue: q.name.clone(),
                partition,
                items: first,
            });
        }
    }
    let mut end = fmt::encode_record(RecordKind::Trailer, &trailer);
    end.extend(fmt::encode_end());
    send(end).await?;
    Ok(trailer.items)
}

fn invalid(field: &str, rule: impl std::fmt::Display) -> ApiError {
    ApiError::Queue(QueueError::Invalid(format!("{field} is invalid; {rule}")))
}

/// `storage.restore.begin`.
pub(crate) fn restore_begin(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageRestoreBegin,
        |ctx: Ctx, r: pb::RestoreBeginRequest| async move {
            let rec = fmt::QueueRecord::decode(r.queue.as_slice())
                .map_err(|e| invalid("queue", format!("not a protobuf QueueRecord: {e}")))?;
            let ns = |s: &str| {
                if s.is_empty() {
                    DEFAULT_NAMESPACE.to_string()
                } else {
                    s.to_string()
                }
            };
            if ns(&rec.namespace) != ns(&r.namespace) {
                return Err(invalid(
                    "namespace",
                    format!("must be the queue's namespace '{}'", ns(&rec.namespace)),
                ));
            }
            if rec.partitions == 0 {
                return Err(invalid("queue", "a queue has at least one partition"));
            }
            if ctx.auth.enabled() {
                ctx.auth
                    .authorize(&ctx.principal, &ns(&rec.namespace), Permission::QueueProduce)
                    .await?;
                // A queue of that name in another namespace is not the caller's to replace (with `overwrite` it
                // would be deleted and re-created in the caller's namespace) nor to resume: the caller needs the
                // rights to delete it and to write into it there.
                if let Some(existing) = ctx.engine.queue_namespace(&rec.name).await? {
                    let elsewhere = *existing != ns(&rec.namespace);
                    // Replacing a queue deletes it and its items, in the caller's namespace too: as `queues.delete`
                    // does, that takes `queue.delete` (create and produce alone did).
                    if r.overwrite || elsewhere {
                        ctx.auth
                            .authorize(&ctx.principal, &existing, Permission::QueueDelete)
                            .await?;
                    }
                    if elsewhere {
                        ctx.auth
                            .authorize(&ctx.principal, &existing, Permission::QueueProduce)
                            .await?;
                    }
                }
                crate::http::authorize_dead_queue(&ctx.engine, &ctx.auth, &ctx.principal, &rec.dead_queue)
                    .await?;
            }
            let info = ctx.engine.restore_begin(rec.to_info(), r.overwrite).await?;
            let mut counts = Vec::with_capacity(info.partitions.len());
            for p in 0..info.partitions.len() as u32 {
                let have = ctx.engine.restore_import(&info.name, p, 0, Vec::new()).await?;
                counts.push(i64::try_from(have).unwrap_or(i64::MAX));
            }
            Ok(pb::RestoreBeginResponse {
                partition_items: counts,
            })
        },
    )
}

/// `storage.restore.import`.
pub(crate) fn restore_import(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageRestoreImport,
        |ctx: Ctx, r: pb::RestoreImportRequest| async move {
            if i64::from(crc32fast::hash(&r.block)) != r.crc32 {
                return Err(invalid(
                    "block",
                    "it does not match its crc32: the block was damaged",
                ));
            }
            // Counted before it is decoded: see `decode_item_block`. An uncompressed page (an item larger than a
            // compressed page may decompress to) allocates what its body holds, which the route's limit bounds.
            let max = ctx.engine.max_restore_page();
            let block = tokio::task::spawn_blocking(move || {
                if r.uncompressed {
                    fmt::decode_item_block_raw(Bytes::from(r.block), max)
                } else {
                    fmt::decode_item_block(&r.block, max)
                }
            })
            .await
            .map_err(|e| ApiError::Queue(QueueError::StorageFailed(format!("decoding a block: {e}"))))?
            .map_err(|e| invalid("block", e))?;
            let n = block.items.len() as u64;
            let items = block.items.into_iter().map(fmt::ItemRecord::into_item).collect();
            let have = ctx
                .engine
                .restore_import(&r.queue_name, block.partition, block.first, items)
                .await?;
            ctx.metrics.restore_items.inc_by(n);
            Ok(pb::RestoreImportResponse {
                partition_items: i64::try_from(have).unwrap_or(i64::MAX),
            })
        },
    )
}

/// `storage.restore.finish`.
pub(crate) fn restore_finish(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageRestoreFinish,
        |ctx: Ctx, r: pb::RestoreFinishRequest| async move {
            ctx.engine.restore_finish(&r.queue_name).await?;
            Ok(Reply::default())
        },
    )
}
