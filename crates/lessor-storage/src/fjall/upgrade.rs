//! Upgrades a format-1 partition store (one fjall keyspace per partition) into format 2 (every partition a pid
//! prefix of the `items` keyspace, named by the catalog under pid 0). Formats 3 and 4 only add paged records, which a
//! partition writes when it first spills (see the `paging` module), and inline payloads, which an item gets when
//! next written (see the codec), so the marker goes straight to the current format.
//!
//! Crash safety comes from doing it in an order where every interruption leaves a state the next open handles:
//! 1. empty `items` (a previous attempt may have copied part of the data);
//! 2. copy every old keyspace under a fresh pid, in bounded batches, and write its catalog entry;
//! 3. fsync everything, then switch the format marker to 2 (an atomic rename);
//! 4. delete the old keyspaces.
//!
//! Interrupted before 3, the marker still says 1 and the upgrade starts over from 1; interrupted after 3, the data
//! is complete in the new layout and [`drop_leftovers`] finishes step 4 at every open.

use lessor_core::error::StorageError;

use super::engine::{Engine, Unit};
use super::partitions::{catalog_key, item_key, keyspace_options, ITEMS};
use super::PARTITIONS_FORMAT_VERSION;

/// Keys copied per write while upgrading: bounds the memory an upgrade holds at once.
const COPY_BATCH: usize = 16 * 1024;

/// Rewrites a format-1 store in place. Blocking; runs before the store serves anything.
pub(crate) fn from_v1(engine: &Engine) -> Result<(), StorageError> {
    from_v1_until(engine, usize::MAX)
}

/// [`from_v1`], stopping with an error after copying `stop_after` partitions (tests of an interrupted upgrade).
fn from_v1_until(engine: &Engine, stop_after: usize) -> Result<(), StorageError> {
    let db = engine.database()?;
    let old: Vec<String> = old_keyspaces(engine)?;
    tracing::info!(dir = %engine.dir().display(), partitions = old.len(), "upgrading the partition store from format 1 to 2");
    if let Some(ks) = engine.keyspace(ITEMS, true)? {
        ks.clear()
            .map_err(|e| engine_error(engine, e, "clearing a partially upgraded keyspace of"))?;
    }
    let mut copied = 0u64;
    for (pid, (i, name)) in (1u64..).zip(old.iter().enumerate()) {
        if i == stop_after {
            return Err(StorageError::other("upgrade stopped (test)"));
        }
        let ks = db
            .keyspace(name, keyspace_options)
            .map_err(|e| engine_error(engine, e, "opening a format-1 keyspace of"))?;
        let mut puts = Vec::with_capacity(COPY_BATCH);
        for kv in ks.iter() {
            let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
            puts.push((item_key(pid, &k), v.to_vec()));
            if puts.len() == COPY_BATCH {
                copied += puts.len() as u64;
                write(engine, ITEMS, std::mem::take(&mut puts))?;
            }
        }
        copied += puts.len() as u64;
        write(engine, ITEMS, puts)?;
        write(
            engine,
            ITEMS,
            vec![(catalog_key(name), pid.to_be_bytes().to_vec())],
        )?;
    }
    engine.sync_all()?;
    engine.set_format_version("partitions", PARTITIONS_FORMAT_VERSION)?;
    tracing::info!(dir = %engine.dir().display(), partitions = old.len(), keys = copied, "partition store upgraded");
    drop_leftovers(engine)
}

/// Deletes keyspaces that format 2 does not use (format-1 partitions whose upgrade completed). Blocking.
pub(crate) fn drop_leftovers(engine: &Engine) -> Result<(), StorageError> {
    let db = engine.database()?;
    for name in old_keyspaces(engine)? {
        let ks = db
            .keyspace(&name, keyspace_options)
            .map_err(|e| engine_error(engine, e, "opening a format-1 keyspace of"))?;
        db.delete_keyspace(ks)
            .map_err(|e| engine_error(engine, e, "deleting a format-1 keyspace of"))?;
    }
    Ok(())
}

/// Names of the keyspaces other than `items`, in name order.
fn old_keyspaces(engine: &Engine) -> Result<Vec<String>, StorageError> {
    let db = engine.database()?;
    let mut names: Vec<String> = db
        .list_keyspace_names()
        .iter()
        .map(|n| n.to_string())
        .filter(|n| n != ITEMS)
        .collect();
    names.sort();
    Ok(names)
}

fn write(engine: &Engine, keyspace: &str, puts: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), StorageError> {
    if puts.is_empty() {
        return Ok(());
    }
    let mut results = engine.commit_group(vec![Unit {
        keyspace: keyspace.into(),
        puts,
        dels: Vec::new(),
        once_dels: Vec::new(),
    }]);
    results.pop().unwrap_or(Ok(()))
}

fn engine_error(engine: &Engine, e: fjall::Error, doing: &str) -> StorageError {
    StorageError::other(format!(
        "{doing} the partition store at '{}' failed: {e:?}",
        engine.dir().display()
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;
    use fjall::Database;
    use lessor_core::storage::PartitionStore;
    use lessor_core::time::Ts;
    use lessor_core::types::{Item, ItemId};

    use super::*;
    use crate::fjall::codec::{encode_meta, meta_key, payload_key};
    use crate::fjall::engine::{Formats, FORMAT_FILE};
    use crate::fjall::{keyspace_name, Durability, FjallStore, PARTITIONS_DIR};

    /// Writes a format-1 partition store by hand: one keyspace per partition, ids as bare keys.
    fn write_v1(dir: &Path, partitions: &[(&str, u32, u64)]) {
        let db_dir = dir.join(PARTITIONS_DIR);
        std::fs::create_dir_all(&db_dir).expect("dir");
        std::fs::write(db_dir.join(FORMAT_FILE), "lessor-fjall partitions 1\n").expect("marker");
        let db = Database::builder(&db_dir).open().expect("open v1");
        for &(queue, partition, n) in partitions {
            let ks = db
                .keyspace(&keyspace_name(queue, partition), keyspace_options)
                .expect("keyspace");
            for i in 1..=n {
                let it = Item {
                    id: ItemId(1_000 + i),
                    attempts: (i % 3) as u32,
                    is_leased: i.is_multiple_of(5),
                    lease_deadline: if i.is_multiple_of(5) {
                        Ts(2_000_000_000_000_000)
                    } else {
                        Ts::ZERO
                    },
                    expire_deadline: Ts(3_000_000_000_000_000),
                    created_at: Ts(1_000_000_000_000_000),
                    reference: format!("r{i}"),
                    payload: Bytes::from(format!("{queue}/{partition}/{i}")),
                    ..Default::default()
                };
                ks.insert(meta_key(it.id), encode_meta(&it)).expect("meta");
                ks.insert(payload_key(it.id), it.payload.to_vec())
                    .expect("payload");
            }
            ks.insert("hwm", (1_000 + n + 500).to_be_bytes()).expect("hwm");
        }
        db.persist(fjall::PersistMode::SyncAll).expect("sync");
    }

    /// The partition store's engine alone, as `FjallStore::open` opens it, without upgrading anything.
    fn open_engine(dir: &Path) -> (Arc<Engine>, u32) {
        Engine::open(
            dir,
            PARTITIONS_DIR,
            "partitions",
            "partition store",
            Durability::Sync,
            keyspace_options,
            Formats {
                current: PARTITIONS_FORMAT_VERSION,
                upgradable: &[1, 2, 3, 4],
            },
        )
        .expect("open the engine")
    }

    async fn check_upgraded(dir: &Path, partitions: &[(&str, u32, u64)]) {
        let store = FjallStore::open(dir, Durability::Sync).expect("open upgrades");
        let marker = std::fs::read_to_string(dir.join(PARTITIONS_DIR).join(FORMAT_FILE)).expect("marker");
        assert_eq!(
            marker.trim(),
            format!("lessor-fjall partitions {PARTITIONS_FORMAT_VERSION}")
        );
        assert_eq!(store.partition_count().await, partitions.len());
        for &(queue, partition, n) in partitions {
            let p = store.open(queue, partition).await.expect("open partition");
            let items = p.list(None, 100_000, false).await.expect("list");
            assert_eq!(items.len() as u64, n, "{queue}/{partition}");
            for (i, it) in items.iter().enumerate() {
                let i = i as u64 + 1;
                assert_eq!(it.id, ItemId(1_000 + i));
                assert_eq!(it.payload, Bytes::from(format!("{queue}/{partition}/{i}")));
                assert_eq!(it.is_leased, i.is_multiple_of(5));
                assert_eq!(it.reference, format!("r{i}"));
            }
            // The high-water mark came along: new ids stay above every id ever handed out.
            let ids = p
                .produce(vec![lessor_core::types::NewItem {
                    payload: Bytes::from_static(b"new"),
                    expire_deadline: Ts(3_000_000_000_000_000),
                    ..Default::default()
                }])
                .await
                .expect("produce");
            assert!(ids[0].0 > 1_000 + n + 500, "{} after hwm", ids[0].0);
            // Items of the old layout (payload in a record of its own) are rewritten with their payload inline
            // when leased, keep it, and leave no key behind when completed.
            let leased = p.lease(100_000, Ts(2_500_000_000_000_000)).await.expect("lease");
            for it in &leased {
                assert!(!it.payload.is_empty(), "{} kept its payload", it.id);
            }
            let all: Vec<ItemId> = p
                .list(None, 100_000, false)
                .await
                .expect("list")
                .iter()
                .map(|i| i.id)
                .collect();
            assert_eq!(p.complete(vec![all.clone()]).await.expect("complete")[0], Ok(()));
            p.close().await;
            let p = store.open(queue, partition).await.expect("reopen partition");
            let c = p.counts().await.expect("counts");
            assert_eq!((c.ready, c.leased, c.scheduled), (0, 0, 0), "{queue}/{partition}");
        }
        assert!(
            store.stored_keys().expect("keys") <= LAYOUT.len() * 2,
            "only catalog entries and high-water marks are left: {} keys",
            store.stored_keys().expect("keys")
        );
        store.close().await;
        // Only the new layout is left.
        let (engine, version) = open_engine(dir);
        assert_eq!(version, PARTITIONS_FORMAT_VERSION);
        assert!(old_keyspaces(&engine).expect("names").is_empty());
        engine.close();
    }

    const LAYOUT: &[(&str, u32, u64)] = &[
        ("orders", 0, 300),
        ("orders", 1, 7),
        ("mail", 0, 0),
        ("mail", 3, 40),
    ];

    #[tokio::test]
    async fn a_format_1_store_is_upgraded_with_every_item_and_its_state() {
        let dir = tempfile::tempdir().expect("tmp");
        write_v1(dir.path(), LAYOUT);
        check_upgraded(dir.path(), LAYOUT).await;
    }

    #[tokio::test]
    async fn an_interrupted_upgrade_starts_over_and_completes() {
        let dir = tempfile::tempdir().expect("tmp");
        write_v1(dir.path(), LAYOUT);
        {
            let (engine, version) = open_engine(dir.path());
            assert_eq!(version, 1);
            from_v1_until(&engine, 2).expect_err("stopped half-way");
            engine.close();
        }
        let marker =
            std::fs::read_to_string(dir.path().join(PARTITIONS_DIR).join(FORMAT_FILE)).expect("marker");
        assert_eq!(
            marker.trim(),
            "lessor-fjall partitions 1",
            "not switched before the copy is complete"
        );
        check_upgraded(dir.path(), LAYOUT).await;
    }
}
