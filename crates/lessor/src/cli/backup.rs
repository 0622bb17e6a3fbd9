//! `lessor backup`, `lessor restore` and `lessor migrate`: online backups of a running server to a local file or
//! S3-compatible object storage, restores into any server, and offline migration between storage configurations.
//!
//! What makes them safe to interrupt:
//! - a backup is written to `FILE.partial` (or an S3 multipart upload) and verified as it streams in (every
//!   checksum, the trailer, the end marker); only a complete, verified backup is fsynced and renamed to `FILE` (or
//!   has its upload completed). A killed backup leaves at most a `.partial` file, never a file that looks done;
//! - a restore verifies the whole input before it writes anything, then creates each queue in the restoring state
//!   (closed to traffic) and sends blocks the server imports exactly once, so re-running the same command after a
//!   kill (of the client or of the server) resumes where it stopped;
//! - a migration drives the same restore engine calls directly on two storage configurations.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lessor_client::Client;
use lessor_proto::backup::{self as fmt, BackupError, QueueRecord, RecordKind};
use lessor_proto::{self as pb};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, RetryConfig, WriteMultipart};
use prost::Message;
use tokio::io::AsyncWriteExt;

/// Where S3-compatible object storage is and how to sign in (for `s3://` inputs and outputs).
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// S3 endpoint URL (e.g. `http://127.0.0.1:9000` for a local server); empty: AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    /// Region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    s3_access_key: Option<String>,
    /// Secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    s3_secret_key: Option<String>,
    /// Address buckets as `ENDPOINT/BUCKET` (most self-hosted servers) rather than `BUCKET.ENDPOINT`.
    #[arg(long, env = "AWS_S3_FORCE_PATH_STYLE")]
    s3_path_style: bool,
    /// Attempts of each S3 request before giving up.
    #[arg(long, default_value_t = 3)]
    s3_retries: usize,
}

/// `lessor backup` flags.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Where the backup goes: a file path, or `s3://BUCKET/KEY`.
    #[arg(long, short)]
    output: String,
    /// Back up only this queue (repeatable); default: every queue.
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Read at most this many items per second (0: as fast as possible), to leave more of a small machine to the
    /// serving path.
    #[arg(long, default_value_t = 0)]
    max_rate: i64,
    #[command(flatten)]
    s3: S3Args,
}

/// `lessor restore` flags.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup: a file path, or `s3://BUCKET/KEY`.
    #[arg(long, short)]
    input: String,
    /// Restore only this queue (repeatable); default: every queue of the backup.
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Restore the (single) selected queue under this name.
    #[arg(long)]
    rename: Option<String>,
    /// Replace queues that exist on the server (their items are deleted first).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    s3: S3Args,
}

/// `lessor migrate` flags.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Configuration file of the source (its server must be stopped).
    #[arg(long)]
    from: String,
    /// Configuration file of the target.
    #[arg(long)]
    to: String,
    /// Migrate only this queue (repeatable); default: every queue.
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Replace queues that exist in the target.
    #[arg(long)]
    overwrite: bool,
    /// Leave users, keys, roles and bindings out.
    #[arg(long)]
    skip_auth: bool,
}

/// A backup's location.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    File(PathBuf),
    S3 { bucket: String, key: String },
}

fn location(s: &str) -> Result<Location, String> {
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key.is_empty() {
            return Err(format!(
                "'{s}' is not a valid S3 location: expected s3://BUCKET/KEY"
            ));
        }
        return Ok(Location::S3 {
            bucket: bucket.to_string(),
            key: key.to_string(),
        });
    }
    if s.is_empty() {
        return Err("the backup location is empty".into());
    }
    Ok(Location::File(PathBuf::from(s)))
}

fn s3_store(args: &S3Args, bucket: &str) -> Result<Arc<dyn ObjectStore>, String> {
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&args.s3_region)
        .with_virtual_hosted_style_request(!args.s3_path_style)
        .with_retry(RetryConfig {
            max_retries: args.s3_retries.saturating_sub(1),
            retry_timeout: Duration::from_secs(30),
            ..Default::default()
        });
    if let Some(e) = args.s3_endpoint.as_deref().filter(|e| !e.is_empty()) {
        b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
    }
    if let Some(k) = &args.s3_access_key {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &args.s3_secret_key {
        b = b.with_secret_access_key(k);
    }
    Ok(Arc::new(b.build().map_err(|e| format!("S3 configuration: {e}"))?))
}

/// A progress bar on stderr when it is a terminal and output is not JSON (also `lessor rebalance`'s).
pub(super) fn progress(json: bool, total: Option<u64>, what: &str) -> ProgressBar {
    let pb = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    if json {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template = if total.is_some() {
        format!("{what} [{{bar:30}}] {{pos}}/{{len}} items, {{msg}} ({{per_sec}}, ETA {{eta}})")
    } else {
        format!("{what} {{spinner}} {{pos}} items, {{msg}} ({{per_sec}}, {{elapsed}})")
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A [`Read`] over chunks handed in from another thread: lets the verifier check a backup while it streams.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Where backup bytes go while they arrive.
enum Sink {
    File {
        partial: PathBuf,
        target: PathBuf,
        file: tokio::fs::File,
    },
    S3 {
        upload: WriteMultipart,
        key: String,
    },
}

impl Sink {
    async fn open(loc: &Location, s3: &S3Args) -> Result<Sink, String> {
        match loc {
            Location::File(path) => {
                let mut partial = path.clone().into_os_string();
                partial.push(".partial");
                let partial = PathBuf::from(partial);
                let file = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|e| format!("creating '{}': {e}", partial.display()))?;
                Ok(Sink::File {
                    partial,
                    target: path.clone(),
                    file,
                })
            }
            Location::S3 { bucket, key } => {
                let store = s3_store(s3, bucket)?;
                let upload = store
                    .put_multipart(&object_store::path::Path::from(key.as_str()))
                    .await
                    .map_err(|e| format!("starting the upload to s3://{bucket}/{key}: {e}"))?;
                Ok(Sink::S3 {
                    upload: WriteMultipart::new_with_chunk_size(upload, 16 * 1024 * 1024),
                    key: format!("s3://{bucket}/{key}"),
                })
            }
        }
    }

    async fn write(&mut self, chunk: &bytes::Bytes) -> Result<(), String> {
        match self {
            Sink::File { file, partial, .. } => file
                .write_all(chunk)
                .await
                .map_err(|e| format!("writing '{}': {e}", partial.display())),
            Sink::S3 { upload, key } => {
                upload
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| format!("uploading to {key}: {e}"))?;
                upload.write(chunk);
                Ok(())
            }
        }
    }

    /// Makes the backup visible under its name: fsync and rename, or complete the upload.
    async fn commit(self) -> Result<String, String> {
        match self {
            Sink::File {
                partial,
                target,
                mut file,
            } => {
                file.flush()
                    .await
                    .map_err(|e| format!("writing '{}': {e}", partial.display()))?;
                file.sync_all()
                    .await
                    .map_err(|e| format!("syncing '{}': {e}", partial.display()))?;
                drop(file);
                tokio::fs::rename(&partial, &target).await.map_err(|e| {
                    format!("renaming '{}' to '{}': {e}", partial.display(), target.display())
                })?;
                // The rename is durable once the directory is.
                if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Ok(d) = std::fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                Ok(target.display().to_string())
            }
            Sink::S3 { upload, key } => {
                upload
                    .finish()
                    .await
                    .map_err(|e| format!("completing the upload to {key}: {e}"))?;
                Ok(key)
            }
        }
    }

    /// Leaves nothing that looks like a backup: removes the partial file, aborts the upload.
    async fn abort(self) {
        match self {
            Sink::File { partial, file, .. } => {
                drop(file);
                let _ = tokio::fs::remove_file(&partial).await;
            }
            Sink::S3 { upload, .. } => {
                let _ = upload.abort().await;
            }
        }
    }
}

/// `lessor backup`.
pub async fn backup(c: &Client, args: BackupArgs, json: bool) -> Result<(), String> {
    let loc = location(&args.output)?;
    let started = Instant::now();
    let mut stream = c
        .storage_backup(&pb::StorageBackupRequest {
            queue_names: args.queues.clone(),
            max_items_per_sec: args.max_rate,
            // Version 2 carries items larger than a record in parts; a server that predates it writes version 1.
            format_version: i32::try_from(fmt::FORMAT_VERSION).unwrap_or(1),
        })
        .await
        .map_err(|e| format!("starting the backup: {e}"))?;
    let mut sink = Sink::open(&loc, &args.s3).await?;
    let bar = progress(json, None, "backup");
    let items = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(16);
    let verifier = {
        let items = items.clone();
        let bar = bar.clone();
        std::thread::spawn(move || {
            fmt::verify_with(
                ChunkReader {
                    rx,
                    cur: bytes::Bytes::new(),
                },
                fmt::Depth::Blocks,
                |n, _| {
                    items.fetch_add(n, Ordering::Relaxed);
                    bar.inc(n);
                },
            )
        })
    };
    let mut bytes = 0u64;
    let received: Result<(), String> = async {
        while let Some(chunk) = stream
            .chunk()
            .await
            .map_err(|e| format!("the server ended the backup early: {e}"))?
        {
            bytes += chunk.len() as u64;
            bar.set_message(mib(bytes));
            sink.write(&chunk).await?;
            // The verifier went away: it found an error, reported below.
            if tx.send(chunk).is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let verified = verifier
        .join()
        .map_err(|_| "the backup verifier panicked".to_string())?;
    bar.finish_and_clear();
    let summary = match (received, verified) {
        (Ok(()), Ok(s)) => s,
        (Err(e), _) => {
            sink.abort().await;
            return Err(e);
        }
        (Ok(()), Err(e)) => {
            sink.abort().await;
            return Err(format!("the backup received is not valid: {e}"));
        }
    };
    let place = sink.commit().await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "output": place,
                "backup_id": summary.header.backup_id,
                "queues": summary.header.queues.len(),
                "items": summary.items,
                "blocks": summary.blocks,
                "bytes": bytes,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "backup {} written to {place}: {} queues, {} items, {} in {:.1}s ({:.0} items/s)",
            summary.header.backup_id,
            summary.header.queues.len(),
            summary.items,
            mib(bytes),
            secs,
            summary.items as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// Where one block lies in a verified backup file.
#[derive(Debug, Clone)]
struct BlockRef {
    partition: u32,
    first: u64,
    items: u64,
    /// Byte offset of the record's body and its length and checksum.
    offset: u64,
    len: usize,
    crc: u32,
    /// The byte offsets and lengths of the bodies of the part records carrying the payload of the block's one
    /// item, when it was split (format version 2); empty otherwise.
    parts: Vec<(u64, usize)>,
}

/// A verified local backup: its summary and where each queue's blocks are.
struct Verified {
    summary: fmt::Summary,
    blocks: BTreeMap<String, Vec<BlockRef>>,
}

/// Verifies a local backup file and indexes its blocks (a second, cheap pass over record headers and block
/// headers; the first pass checked everything).
fn verify_file(path: &Path, bar: &ProgressBar) -> Result<Verified, String> {
    let open = || std::fs::File::open(path).map_err(|e| format!("opening '{}': {e}", path.display()));
    let reader = std::io::BufReader::with_capacity(1 << 20, open()?);
    let summary = fmt::verify(reader, |n, _| bar.inc(n)).map_err(|e| describe(path, &e))?;
    let mut r = fmt::Reader::new(std::io::BufReader::with_capacity(1 << 20, open()?))
        .map_err(|e| describe(path, &e))?;
    let mut blocks: BTreeMap<String, Vec<BlockRef>> = BTreeMap::new();
    let mut offset = 12u64;
    // The queue of the last block: part records belong to it (the verification checked their order).
    let mut last = String::new();
    while let Some(rec) = r.next_raw().map_err(|e| describe(path, &e))? {
        let body_at = offset + 9;
        offset = body_at + rec.body.len() as u64;
        match rec.kind {
            RecordKind::Items => {}
            RecordKind::Part => {
                if let Some(b) = blocks.get_mut(&last).and_then(|b| b.last_mut()) {
                    b.parts.push((body_at, rec.body.len()));
                }
                continue;
            }
            RecordKind::Header | RecordKind::Trailer => continue,
        }
        let block: fmt::ItemBlockShallow = fmt::decode_body(&rec.body).map_err(|e| describe(path, &e))?;
        last.clone_from(&block.queue);
        blocks.entry(block.queue).or_default().push(BlockRef {
            partition: block.partition,
            first: block.first,
            items: block.items.len() as u64,
            offset: body_at,
            len: rec.body.len(),
            crc: crc32(&rec.body),
            parts: Vec::new(),
        });
    }
    Ok(Verified { summary, blocks })
}

fn crc32(b: &[u8]) -> u32 {
    // The same checksum the file's record headers hold.
    let mut h = crc32fast::Hasher::new();
    h.update(b);
    h.finalize()
}

fn describe(path: &Path, e: &BackupError) -> String {
    format!("'{}': {e}", path.display())
}

/// Downloads an S3 object to a temporary file (restores read their input twice: verify, then restore).
async fn download(
    s3: &S3Args,
    bucket: &str,
    key: &str,
    json: bool,
) -> Result<tempfile::NamedTempFile, String> {
    use futures::StreamExt;
    let store = s3_store(s3, bucket)?;
    let what = format!("s3://{bucket}/{key}");
    let got = store
        .get(&object_store::path::Path::from(key))
        .await
        .map_err(|e| format!("reading {what}: {e}"))?;
    let tmp = tempfile::NamedTempFile::new().map_err(|e| format!("creating a temporary file: {e}"))?;
    let mut file = tokio::fs::File::create(tmp.path())
        .await
        .map_err(|e| format!("creating a temporary file: {e}"))?;
    let bar = progress(json, Some(got.meta.size), "download");
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading {what}: {e}"))?;
        bar.inc(chunk.len() as u64);
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("writing a temporary file: {e}"))?;
    }
    file.flush()
        .await
        .map_err(|e| format!("writing a temporary file: {e}"))?;
    bar.finish_and_clear();
    Ok(tmp)
}

/// `lessor restore`.
pub async fn restore(c: &Client, args: RestoreArgs, json: bool) -> Result<(), String> {
    let started = Instant::now();
    let loc = location(&args.input)?;
    let (_tmp, path) = match &loc {
        Location::File(p) => (None, p.clone()),
        Location::S3 { bucket, key } => {
            let tmp = download(&args.s3, bucket, key, json).await?;
            let p = tmp.path().to_path_buf();
            (Some(tmp), p)
        }
    };
    // 1. Verify everything before writing anything.
    let bar = progress(json, None, "verify");
    let verified = {
        let path = path.clone();
        let bar2 = bar.clone();
        tokio::task::spawn_blocking(move || verify_file(&path, &bar2))
            .await
            .map_err(|e| format!("verifying: {e}"))??
    };
    bar.finish_and_clear();
    let header = &verified.summary.header;
    let mut selected: Vec<QueueRecord> = if args.queues.is_empty() {
        header.queues.clone()
    } else {
        let mut out = Vec::new();
        for name in &args.queues {
            match header.queues.iter().find(|q| &q.name == name) {
                Some(q) => out.push(q.clone()),
                None => return Err(format!("queue '{name}' is not in the backup")),
            }
        }
        out
    };
    let renames: Vec<(String, String)> = match &args.rename {
        Some(new) => {
            if selected.len() != 1 {
                return Err("--rename needs exactly one --queue".into());
            }
            vec![(selected[0].name.clone(), new.clone())]
        }
        None => Vec::new(),
    };
    let target_name = |n: &str| {
        renames
            .iter()
            .find(|(old, _)| old == n)
            .map_or_else(|| n.to_string(), |(_, new)| new.clone())
    };
    // 2. Dead-letter queues are restored too or exist on the server; existing queues need --overwrite.
    let names: HashSet<String> = selected.iter().map(|q| q.name.clone()).collect();
    for q in &selected {
        if q.dead_queue.is_empty() || names.contains(&q.dead_queue) {
            continue;
        }
        match info(c, &q.dead_queue).await? {
            Some(_) => {}
            None => {
                return Err(format!(
                "queue '{}' names '{}' as its dead-letter queue, which is neither restored (add --queue {}) \
                     nor on the server; nothing was written",
                q.name, q.dead_queue, q.dead_queue
            ))
            }
        }
    }
    // A queue that exists is refused (unless --overwrite), except in a resumed run: one the earlier run left
    // restoring is taken up again, and one it already finished (all queues finish together at the end, so the
    // earlier run was killed while finishing) is recognised by its item counts and skipped.
    let mut existing = Vec::new();
    for q in &selected {
        let name = target_name(&q.name);
        if let Some(i) = info(c, &name).await? {
            existing.push((q.name.clone(), name, i.restoring));
        }
    }
    let resuming = existing.iter().any(|(_, _, restoring)| *restoring);
    let mut resumed = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    for (old, name, restoring) in &existing {
        if *restoring {
            resumed.push(name.clone());
        } else if resuming && !args.overwrite && holds_backup(c, name, &verified, old).await? {
            done.insert(name.clone());
        } else if !args.overwrite {
            return Err(format!(
                "queue '{name}' exists on the server; use --overwrite to replace it (or --rename); nothing was \
                 written"
            ));
        }
    }
    // Dead-letter queues first (the header lists them first; a selection keeps that order).
    let dead: HashSet<String> = selected.iter().map(|q| q.dead_queue.clone()).collect();
    selected.sort_by_key(|q| !dead.contains(&q.name));

    // 3. Restore, queue by queue; each is resumable.
    let total: u64 = selected
        .iter()
        .map(|q| {
            verified
                .blocks
                .get(&q.name)
                .map_or(0, |b| b.iter().map(|b| b.items).sum::<u64>())
        })
        .sum();
    let bar = progress(json, Some(total), "restore");
    let mut sent_items = 0u64;
    let mut skipped_items = 0u64;
    for q in &selected {
        let name = target_name(&q.name);
        if done.contains(&name) {
            let n = verified
                .blocks
                .get(&q.name)
                .map_or(0, |b| b.iter().map(|b| b.items).sum::<u64>());
            skipped_items += n;
            bar.inc(n);
            continue;
        }
        let mut rec = q.clone();
        rec.name = name.clone();
        let begin = c
            .call::<pb::routes::StorageRestoreBegin>(&pb::RestoreBeginRequest {
                queue: rec.encode_to_vec(),
                namespace: rec.namespace.clone(),
                overwrite: args.overwrite && !resumed.contains(&name),
            })
            .await
            .map_err(|e| format!("restoring '{name}': {e}"))?;
        let have = begin.partition_items;
        let blocks = verified.blocks.get(&q.name).cloned().unwrap_or_default();
        // Partitions in parallel (each one's blocks in order: the server imports a block only right after the one
        // before it).
        let mut by_part: BTreeMap<u32, Vec<BlockRef>> = BTreeMap::new();
        for b in blocks {
            by_part.entry(b.partition).or_default().push(b);
        }
        let results = futures::future::join_all(by_part.into_iter().map(|(p, blocks)| {
            let have = have
                .get(p as usize)
                .copied()
                .map_or(0, |h| u64::try_from(h).unwrap_or(0));
            restore_partition(c, &path, &name, blocks, have, &bar)
        }))
        .await;
        for r in results {
            let (sent, skipped) = r?;
            sent_items += sent;
            skipped_items += skipped;
        }
    }
    // Every queue opens at once, only when all of them are in: a restore killed earlier leaves them all
    // restoring (closed to traffic), never some open and some half filled.
    for q in &selected {
        let name = target_name(&q.name);
        c.call::<pb::routes::StorageRestoreFinish>(&pb::RestoreFinishRequest {
            queue_name: name.clone(),
        })
        .await
        .map_err(|e| format!("finishing '{name}': {e}"))?;
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let queue_names: Vec<String> = selected.iter().map(|q| target_name(&q.name)).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "backup_id": header.backup_id,
                "queues": queue_names,
                "items": total,
                "items_sent": sent_items,
                "items_already_restored": skipped_items,
                "resumed": resumed,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "restored {} queues ({}), {} items in {:.1}s ({:.0} items/s){}",
            queue_names.len(),
            queue_names.join(", "),
            total,
            secs,
            total as f64 / secs.max(1e-9),
            if skipped_items > 0 {
                format!("; {skipped_items} were already restored by an earlier run")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Whether queue `name` holds exactly the items the backup has for queue `old`, partition by partition (how a
/// resumed restore recognises a queue the interrupted run had finished).
async fn holds_backup(c: &Client, name: &str, verified: &Verified, old: &str) -> Result<bool, String> {
    let stats = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: name.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading the stats of '{name}': {e}"))?;
    let mut want: BTreeMap<u32, u64> = BTreeMap::new();
    for b in verified.blocks.get(old).into_iter().flatten() {
        *want.entry(b.partition).or_default() += b.items;
    }
    let mut have: BTreeMap<u32, u64> = BTreeMap::new();
    for p in stats.logical_queues.iter().flat_map(|l| &l.partitions) {
        let n = u64::try_from(p.total).unwrap_or(0) + u64::try_from(p.scheduled).unwrap_or(0);
        if n > 0 {
            have.insert(u32::try_from(p.partition).unwrap_or(u32::MAX), n);
        }
    }
    Ok(want == have)
}

async fn info(c: &Client, name: &str) -> Result<Option<pb::QueueInfo>, String> {
    match c
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: name.to_string(),
        })
        .await
    {
        Ok(i) => Ok(Some(i)),
        Err(lessor_client::ClientError::Api { message, .. }) if message.contains("does not exist") => {
            Ok(None)
        }
        Err(e) => Err(format!("looking up queue '{name}': {e}")),
    }
}

/// Sends one partition's blocks from item `have` on; returns (items sent, items skipped as already there).
async fn restore_partition(
    c: &Client,
    path: &Path,
    queue: &str,
    blocks: Vec<BlockRef>,
    have: u64,
    bar: &ProgressBar,
) -> Result<(u64, u64), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("opening '{}': {e}", path.display()))?;
    let (mut sent, mut skipped) = (0u64, 0u64);
    for b in blocks {
        if b.first + b.items <= have {
            skipped += b.items;
            bar.inc(b.items);
            continue;
        }
        let mut read = |offset: u64, len: usize| {
            let mut body = vec![0u8; len];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut body))
                .map_err(|e| format!("reading '{}': {e}", path.display()))?;
            Ok::<_, String>(body)
        };
        let body = read(b.offset, b.len)?;
        let request = if b.parts.is_empty() {
            pb::RestoreImportRequest {
                queue_name: queue.to_string(),
                block: body,
                crc32: i64::from(b.crc),
                uncompressed: false,
            }
        } else {
            let parts = b
                .parts
                .iter()
                .map(|&(offset, len)| read(offset, len))
                .collect::<Result<Vec<_>, _>>()?;
            let what = format!("restoring partition {} of '{queue}'", b.partition);
            tokio::task::spawn_blocking(move || whole_item_page(&body, &parts))
                .await
                .map_err(|e| format!("{what}: {e}"))?
                .map_err(|e| format!("{what}: {}", describe(path, &e)))?
                .into_request(queue)
        };
        let r = c
            .call::<pb::routes::StorageRestoreImport>(&request)
            .await
            .map_err(|e| format!("restoring partition {} of '{queue}': {e}", b.partition))?;
        let now = u64::try_from(r.partition_items).unwrap_or(0);
        if now != b.first + b.items {
            return Err(format!(
                "restoring partition {} of '{queue}': the server holds {now} items after a block ending at item {}; \
                 the queue changed during the restore",
                b.partition,
                b.first + b.items
            ));
        }
        sent += b.items;
        bar.inc(b.items);
    }
    Ok((sent, skipped))
}

/// A restore page of one item whose payload a backup carries in parts.
struct WholeItemPage {
    block: Vec<u8>,
    uncompressed: bool,
}

impl WholeItemPage {
    fn into_request(self, queue: &str) -> pb::RestoreImportRequest {
        pb::RestoreImportRequest {
            queue_name: queue.to_string(),
            crc32: i64::from(crc32(&self.block)),
            block: self.block,
            uncompressed: self.uncompressed,
        }
    }
}

/// Joins a split item (its block's stored body and its part records' bodies) into one restore page: compressed,
/// as stored blocks are, when it decompresses within what a server takes of a compressed page (any server
/// version restores it then); else the block uncompressed, which a server decodes without decompressing (it
/// allocates what the body holds, and takes bodies as large as the largest item it accepts).
fn whole_item_page(block: &[u8], parts: &[Vec<u8>]) -> Result<WholeItemPage, BackupError> {
    let block: fmt::ItemBlock = fmt::decode_body(block)?;
    let parts = parts
        .iter()
        .map(|p| fmt::decode_body::<fmt::PayloadPart>(p))
        .collect::<Result<Vec<_>, _>>()?;
    let block = fmt::join_parts(block, parts)?;
    Ok(if block.encoded_len() <= fmt::MAX_RECORD {
        WholeItemPage {
            block: fmt::compress(&block),
            uncompressed: false,
        }
    } else {
        WholeItemPage {
            block: block.encode_to_vec(),
            uncompressed: true,
        }
    })
}

/// `lessor migrate`: copies queue definitions, items and auth data from one storage configuration to another,
/// with no server running. Each queue goes through the restoring state, so an interrupted migration resumes when
/// run again.
pub async fn migrate(args: MigrateArgs, json: bool) -> Result<(), String> {
    let started = Instant::now();
    let load = |p: &str| lessor_server::Config::from_file(p).map_err(|e| format!("'{p}': {e}"));
    let (from_cfg, to_cfg) = (load(&args.from)?, load(&args.to)?);
    // Before either side is opened: opening the target starts its payload sweeper.
    separate_offload_roots(&from_cfg, &to_cfg)?;
    let clock: lessor_core::time::SharedClock = Arc::new(lessor_core::time::SystemClock);
    let src = from_cfg
        .build_engine(clock.clone())
        .await
        .map_err(|e| format!("opening the source '{}': {e}", args.from))?;
    let dst = to_cfg
        .build_engine(clock)
        .await
        .map_err(|e| format!("opening the target '{}': {e}", args.to))?;
    let result = migrate_engines(&src, &dst, &args, json).await;
    src.shutdown().await;
    dst.shutdown().await;
    let (queues, items, auth_keys) = result?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"queues": queues, "items": items, "auth_records": auth_keys, "seconds": secs})
        );
    } else {
        println!(
            "migrated {} queues, {items} items and {auth_keys} auth records in {secs:.1}s",
            queues.len()
        );
    }
    Ok(())
}

/// Refuses a migration whose source and target offload payloads under the same objects: a partition store with
/// `payload-offload` keeps its objects under `<prefix><store name>/` of its bucket, and takes every object there
/// as its own. A target sharing that root with the source (a driver change that keeps the store's name and its
/// object-storage entry) would have its sweeper delete the source's objects, which no item of the target
/// references yet, and a queue deletion under `--overwrite` delete those of the source's queue of the same name.
/// Roots that nest (one a prefix of the other) are refused too: a listing under the outer one is recursive.
fn separate_offload_roots(from: &lessor_server::Config, to: &lessor_server::Config) -> Result<(), String> {
    let roots =
        |c: &lessor_server::Config, which: &str| -> Result<Vec<(String, String, String, String)>, String> {
            let specs = c
                .store_specs()
                .map_err(|e| format!("the {which} configuration: {e}"))?;
            Ok(specs
                .partitions
                .iter()
                .filter_map(|p| {
                    let o = p.spec.offload()?.object_store.as_ref()?;
                    Some((
                        p.name.clone(),
                        o.endpoint.trim_end_matches('/').to_string(),
                        o.bucket.clone(),
                        o.root_of(&p.name),
                    ))
                })
                .collect())
        };
    let (sources, targets) = (roots(from, "source")?, roots(to, "target")?);
    for (s_name, s_endpoint, s_bucket, s_root) in &sources {
        for (t_name, t_endpoint, t_bucket, t_root) in &targets {
            if s_endpoint == t_endpoint
                && s_bucket == t_bucket
                && (s_root.starts_with(t_root.as_str()) || t_root.starts_with(s_root.as_str()))
            {
                let at = if s_endpoint.is_empty() {
                    "AWS"
                } else {
                    s_endpoint.as_str()
                };
                return Err(format!(
                    "the source's partition store '{s_name}' and the target's '{t_name}' offload payloads to the same \
                     objects (bucket '{s_bucket}' at {at}, under '{s_root}' and '{t_root}'): the target would delete \
                     the source's payloads. A payload-offload root belongs to one store of one data directory: give \
                     the target's object-storage entry another prefix, or its partition store another name"
                ));
            }
        }
    }
    Ok(())
}

/// Items per page of a migration (fewer when their payloads reach the source's `limits.max-lease-bytes`).
const MIGRATE_PAGE: usize = 2000;

async fn migrate_engines(
    src: &lessor_core::engine::Engine,
    dst: &lessor_core::engine::Engine,
    args: &MigrateArgs,
    json: bool,
) -> Result<(Vec<String>, u64, u64), String> {
    let e = |what: &str, err: lessor_core::error::QueueError| format!("{what}: {err}");
    let mut queues = Vec::new();
    let mut pivot = String::new();
    loop {
        let page = src
            .list_queues(&pivot, 1000, "")
            .await
            .map_err(|x| e("listing queues", x))?;
        if let Some(l) = page.queues.last() {
            pivot = format!("{}\0", l.name);
        }
        queues.extend(page.queues);
        if !page.more {
            break;
        }
    }
    if !args.queues.is_empty() {
        for n in &args.queues {
            if !queues.iter().any(|q| &q.name == n) {
                return Err(format!("queue '{n}' is not in the source"));
            }
        }
        queues.retain(|q| args.queues.contains(&q.name));
    }
    // Refuse before writing anything.
    for q in &queues {
        match dst.queue_info(&q.name).await {
            Ok(t) if !t.restoring && !args.overwrite => {
                return Err(format!(
                    "queue '{}' exists in the target; use --overwrite to replace it; nothing was written",
                    q.name
                ))
            }
            Ok(_) | Err(lessor_core::error::QueueError::QueueNotFound(_)) => {}
            Err(x) => return Err(e("reading the target", x)),
        }
    }
    let dead: HashSet<String> = queues.iter().map(|q| q.dead_queue.clone()).collect();
    queues.sort_by_key(|q| !dead.contains(&q.name));
    // Every definition first, dead-letter queues before the queues naming them (a queue's dead-letter queue must
    // exist).
    let mut created = Vec::with_capacity(queues.len());
    for q in &queues {
        let resume = matches!(dst.queue_info(&q.name).await, Ok(t) if t.restoring);
        let mut info = q.clone();
        info.restoring = false;
        let stored = dst
            .restore_begin(info, args.overwrite && !resume)
            .await
            .map_err(|x| e(&format!("creating '{}'", q.name), x))?;
        created.push((q, stored.partitions.len()));
    }
    // Then the items, dead-letter queues last: the source runs its lifecycle as it is read, and an item it
    // dead-letters (a lease or an expiry that came due while it was stopped) leaves a queue for its dead-letter
    // queue. Read in this order, the item is in the copy of one or the other; in the opposite order, a move between
    // the two reads put it in neither.
    created.sort_by_key(|(q, _)| dead.contains(&q.name));
    let bar = progress(json, None, "migrate");
    let max_bytes = src.limits().max_lease_bytes;
    let mut items = 0u64;
    for (q, stored_partitions) in &created {
        for p in 0..q.partitions.len() as u32 {
            if p as usize >= *stored_partitions {
                break;
            }
            let mut have = dst
                .restore_import(&q.name, p, 0, Vec::new())
                .await
                .map_err(|x| e(&format!("reading partition {p} of '{}'", q.name), x))?;
            let mut snap = src
                .snapshot(&q.name, p)
                .await
                .map_err(|x| e(&format!("reading partition {p} of '{}'", q.name), x))?;
            let mut offset = 0u64;
            loop {
                // Bounded in bytes as well: a page is held whole, then imported in one call.
                let page = snap
                    .next_within(MIGRATE_PAGE, max_bytes)
                    .await
                    .map_err(|x| format!("reading partition {p} of '{}': {x}", q.name))?;
                if page.is_empty() {
                    break;
                }
                let n = page.len() as u64;
                if offset + n > have {
                    have = dst
                        .restore_import(&q.name, p, offset, page)
                        .await
                        .map_err(|x| e(&format!("writing partition {p} of '{}'", q.name), x))?;
                }
                offset += n;
                items += n;
                bar.inc(n);
            }
        }
    }
    // Every queue opens once all are in (as a restore does).
    for q in &queues {
        dst.restore_finish(&q.name)
            .await
            .map_err(|x| e(&format!("finishing '{}'", q.name), x))?;
    }
    bar.finish_and_clear();
    let auth = if args.skip_auth {
        0
    } else {
        copy_auth(src, dst).await?
    };
    Ok((queues.iter().map(|q| q.name.clone()).collect(), items, auth))
}

/// Copies every auth record (users, keys, roles, bindings) in pages, each page one commit. Re-running copies them
/// again, which writes the same values.
async fn copy_auth(
    src: &lessor_core::engine::Engine,
    dst: &lessor_core::engine::Engine,
) -> Result<u64, String> {
    let (from, to) = (src.auth_store(), dst.auth_store());
    let mut cursor: Vec<u8> = Vec::new();
    let mut n = 0u64;
    loop {
        let page = from
            .scan(b"", &cursor, 500)
            .await
            .map_err(|e| format!("reading auth records: {e}"))?;
        if page.is_empty() {
            return Ok(n);
        }
        let mut commit = lessor_core::auth::store::Commit::default();
        for (k, v) in &page {
            commit.put(k.to_vec(), v.to_vec());
        }
        n += page.len() as u64;
        to.commit(commit)
            .await
            .map_err(|e| format!("writing auth records: {e}"))?
            .map_err(|_| "writing auth records: a precondition failed".to_string())?;
        let Some((last, _)) = page.last() else {
            return Ok(n);
        };
        cursor = last.to_vec();
        cursor.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration between configurations whose partition stores offload payloads to the same root (same bucket,
    /// endpoint, prefix and store name) is refused before anything is opened; another prefix or store name is not.
    #[test]
    fn a_migration_between_stores_sharing_an_offload_root_is_refused() {
        let cfg = |driver: &str, prefix: &str, name: &str| {
            lessor_server::Config::from_yaml(&format!(
                "object-storage:\n  - name: s3-0\n    endpoint: http://127.0.0.1:9000\n    bucket: b\n    \
                 path-style: true\n    prefix: {prefix}\nqueue-storage:\n  driver: memory\npartition-storage:\n  \
                 - name: {name}\n    driver: {driver}\n    config: {{ payload-offload: s3-0 }}\n"
            ))
            .expect("config")
        };
        let e = separate_offload_roots(
            &cfg("memory", "lessor/", "disk-0"),
            &cfg("memory", "lessor/", "disk-0"),
        )
        .expect_err("same root");
        assert!(
            e.contains("'disk-0'") && e.contains("under 'lessor/disk-0/'") && e.contains("another prefix"),
            "{e}"
        );
        // Nested: the source's sweeper lists the target's objects too.
        assert!(separate_offload_roots(
            &cfg("memory", "lessor/", "disk-0"),
            &cfg("memory", "lessor/disk-0/", "x")
        )
        .is_err());
        separate_offload_roots(
            &cfg("memory", "lessor/", "disk-0"),
            &cfg("memory", "new/", "disk-0"),
        )
        .expect("another prefix");
        separate_offload_roots(
            &cfg("memory", "lessor/", "disk-0"),
            &cfg("memory", "lessor/", "pg-0"),
        )
        .expect("another store name");
        separate_offload_roots(
            &cfg("memory", "lessor/", "disk-0"),
            &lessor_server::Config::from_yaml("queue-storage:\n  driver: memory\n").expect("config"),
        )
        .expect("no offload on the target");
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            location("s3://b/k/x.bak").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                key: "k/x.bak".into()
            }
        );
        assert!(location("s3://b").is_err());
        assert!(location("s3:///k").is_err());
        assert_eq!(location("/tmp/x").unwrap(), Location::File("/tmp/x".into()));
    }

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
    use lessor_core::time::SystemClock;
    use lessor_core::types::Limits;
    use lessor_storage::memory::{MemoryQueues, MemoryStore};
    use lessor_testkit::hooked::{Call, Hook, HookedStore, Op};

    /// Three items of 1,000 payload bytes fit in the bound of the migration tests.
    const BOUND: u64 = 3100;

    /// The most bytes one storage call carried, per queue and operation.
    #[derive(Default)]
    struct Carried(Mutex<std::collections::HashMap<(String, Op), u64>>);

    impl Hook for Carried {
        fn carried(&self, call: &Call, _items: usize, bytes: u64) {
            let mut m = self.0.lock().expect("lock");
            let e = m.entry((call.queue.clone(), call.op)).or_default();
            *e = (*e).max(bytes);
        }
    }

    impl Carried {
        fn most(&self, queue: &str, op: Op) -> u64 {
            let m = self.0.lock().expect("lock");
            m.get(&(queue.to_string(), op)).copied().unwrap_or_default()
        }
    }

    /// An engine over one hooked memory store, bounded by [`BOUND`].
    fn engine(carried: &Arc<Carried>) -> Engine {
        Engine::new(EngineConfig {
            queues: Arc::new(MemoryQueues::new()),
            stores: vec![NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), carried.clone())),
            }],
            limits: Limits {
                max_lease_bytes: BOUND,
                ..Limits::default()
            },
            clock: Arc::new(SystemClock),
        })
        .expect("engine")
    }

    /// Every item of partition 0 of `q` as a migration must keep it, in id order.
    async fn contents(e: &Engine, q: &str) -> Vec<(String, bytes::Bytes, bool, bool, u32)> {
        let mut snap = e.snapshot(q, 0).await.expect("snapshot");
        let mut out = Vec::new();
        loop {
            let page = snap.next(1000).await.expect("page");
            if page.is_empty() {
                return out;
            }
            out.extend(
                page.into_iter()
                    .map(|it| (it.reference, it.payload, it.is_leased, it.dead, it.attempts)),
            );
        }
    }

    /// A migration read and imported pages of 2,000 items whatever their size: twenty items of 10 bytes followed
    /// by ten of 1,000 moved in one snapshot read and one import of 10,200 bytes under a bound of 3,100 (at 5 MB,
    /// 10 GB per call). Now each snapshot read and each import stays within the source's
    /// `limits.max-lease-bytes`, and the target holds the same items.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrate_pages_within_the_bound() {
        let (from, to) = (Arc::new(Carried::default()), Arc::new(Carried::default()));
        let (src, dst) = (engine(&from), engine(&to));
        src.create_queue(lessor_core::types::QueueInfo {
            name: "q".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("create");
        let t = Some(Duration::from_secs(5));
        for (tag, n, size) in [("small", 20, 10), ("large", 10, 1000)] {
            let items = (0..n)
                .map(|i| ProduceItem {
                    payload: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; size]),
                    reference: format!("{tag}{i}"),
                    ..Default::default()
                })
                .collect();
            src.produce("q", items, t).await.expect("produce");
        }
        let args = MigrateArgs {
            from: String::new(),
            to: String::new(),
            queues: Vec::new(),
            overwrite: false,
            skip_auth: true,
        };
        let (queues, items, _) = migrate_engines(&src, &dst, &args, true).await.expect("migrate");
        assert_eq!((queues, items), (vec!["q".to_string()], 30));
        let read = from.most("q", Op::SnapshotRead);
        assert!(
            read <= BOUND,
            "one snapshot read carried {read} bytes, over {BOUND}"
        );
        let imported = to.most("q", Op::Import);
        assert!(
            imported <= BOUND,
            "one import carried {imported} bytes, over {BOUND}"
        );
        let want = contents(&src, "q").await;
        assert_eq!(want.len(), 30);
        assert_eq!(contents(&dst, "q").await, want);
        src.shutdown().await;
        dst.shutdown().await;
    }
}
