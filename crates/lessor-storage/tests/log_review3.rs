//! Review of the log store's replay of item records (`Replayed::items`, `PartitionState::load_sorted`) and of its
//! memory budget (`max-memory`, `MemoryBudget`): the budget's estimate must follow every call that changes a
//! partition and agree with what replay counts, and a refusal must lose nothing.
#![cfg(feature = "fjall")]

use std::sync::Arc;

use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{ClearRequest, DedupRecord, NewItem};
use lessor_storage::fjall::Durability;
use lessor_storage::log::LogStore;
use lessor_storage::state::{DEDUP_COST, ITEM_COST};

#[path = "support/log.rs"]
mod support;

use support::{item, SEC, T0};

const BUDGET: u64 = 64 << 20;

/// What the budget should hold for `parts`, from what they report: payload bytes, items (dead ones included) and
/// dedup records (ended ones not yet dropped included).
async fn expected(parts: &[&Arc<dyn Partition>]) -> u64 {
    let mut sum = 0;
    for p in parts {
        let s = p.stats(T0).await.expect("stats");
        let dead = p.dead_count().await.expect("dead count");
        let dedup = p.dedup_records(Ts(i64::MIN)).await.expect("dedup").len() as u64;
        let items = s.counts.ready + s.counts.leased + s.counts.scheduled + dead;
        sum += s.payload_bytes + items * ITEM_COST + dedup * DEDUP_COST;
    }
    sum
}

fn keyed(tag: &str, n: usize, until: Ts) -> Vec<NewItem> {
    (0..n)
        .map(|i| {
            let mut it = item(&format!("{tag}-{i}-{}", "p".repeat(i * 7)));
            it.dedup_id = format!("{tag}-{i}");
            it.dedup_until = until;
            it
        })
        .collect()
}

/// Every kind of call, each followed by a check that the budget's estimate is what the partitions hold; then a
/// checkpoint, changes after it, and a restart, whose replay must count the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_follows_every_call_and_replay_counts_the_same() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open_with(tmp.path(), Durability::None, Some(BUDGET)).expect("open");
    let p = store.open("q", 0).await.expect("partition 0");
    let q = store.open("q", 1).await.expect("partition 1");
    let used = |s: &LogStore| s.memory().expect("a budget").0;
    macro_rules! check {
        ($what:expr) => {
            assert_eq!(used(&store), expected(&[&p, &q]).await, "after {}", $what);
        };
    }
    check!("open");
    p.produce(keyed("a", 40, T0.add(SEC * 10)))
        .await
        .expect("produce");
    check!("produce with keys");
    let mut later = keyed("s", 10, T0.add(SEC * 10));
    for it in &mut later {
        it.enqueue_at = T0.add(SEC * 5);
    }
    p.produce(later).await.expect("produce scheduled");
    check!("produce scheduled");
    let got = p.lease(30, T0.add(SEC * 60)).await.expect("lease");
    check!("lease");
    let policy = LifecyclePolicy {
        max_attempts: 3,
        has_dead_queue: true,
        ..Default::default()
    };
    let ops: Vec<Vec<RetryOp>> = got[..15]
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let action = match i % 3 {
                0 => RetryAction::Requeue,
                1 => RetryAction::Dead,
                _ => RetryAction::Schedule(T0.add(SEC * 2)),
            };
            vec![RetryOp { id: it.id, action }]
        })
        .collect();
    p.retry(ops, policy).await.expect("retry");
    check!("retry");
    p.complete(vec![got[15..25].iter().map(|it| it.id).collect()])
        .await
        .expect("complete");
    check!("complete");
    p.lifecycle(T0.add(SEC * 30), policy, 1000)
        .await
        .expect("lifecycle");
    check!("lifecycle (schedules due, dedup records ended)");
    let dead = p.dead_items(3).await.expect("dead items");
    p.remove_dead(dead.iter().map(|it| it.id).collect())
        .await
        .expect("remove dead");
    check!("remove dead");
    let some = p.list(None, 5, false).await.expect("list");
    p.delete(some.iter().map(|it| it.id).collect())
        .await
        .expect("delete");
    check!("delete");
    let moved = p.list(None, 8, false).await.expect("list");
    q.import(moved.clone()).await.expect("import");
    check!("import");
    q.import_dedup(vec![DedupRecord {
        dedup_id: "moved".into(),
        id: moved[0].id,
        until: T0.add(SEC * 3600),
    }])
    .await
    .expect("import dedup");
    check!("import dedup");
    q.produce(keyed("b", 20, T0.add(SEC * 3600)))
        .await
        .expect("produce");
    q.clear(ClearRequest {
        queue: true,
        scheduled: true,
        destructive: true,
    })
    .await
    .expect("clear");
    check!("clear");

    // A checkpoint, then changes that replay applies after its copy.
    tokio::task::block_in_place(|| store.checkpoint_now()).expect("checkpoint");
    check!("checkpoint");
    p.produce(keyed("c", 10, T0.add(SEC * 3600)))
        .await
        .expect("produce");
    let got = p.lease(4, T0.add(SEC * 60)).await.expect("lease");
    p.complete(vec![got.iter().map(|it| it.id).collect()])
        .await
        .expect("complete");
    check!("changes after the checkpoint");

    let before = used(&store);
    drop((p, q));
    store.close().await;
    drop(store);
    let store = LogStore::open_with(tmp.path(), Durability::None, Some(BUDGET)).expect("reopen");
    let p = store.open("q", 0).await.expect("partition 0");
    let q = store.open("q", 1).await.expect("partition 1");
    assert_eq!(used(&store), before, "replay counts what the store held");
    assert_eq!(used(&store), expected(&[&p, &q]).await);
    drop((p, q));
    store.close().await;
}

/// A directory made to look like a Linux root: `/proc/meminfo` of 16 GiB, `/proc/self/cgroup` as given, and
/// `files` (paths under `/sys/fs/cgroup`, contents).
fn linux_root(self_cgroup: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let write = |path: &str, text: &str| {
        let p = root.path().join(path);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    };
    write("proc/meminfo", "MemTotal:       16777216 kB\nMemFree:  1024 kB\n");
    write("proc/self/cgroup", self_cgroup);
    for (path, text) in files {
        write(&format!("sys/fs/cgroup/{path}"), text);
    }
    root
}

/// The default `max-memory` is half the memory the process may use, its cgroup's limit when that is lower than
/// the machine's. The limit is the process's own cgroup's (and its parents'), as `/proc/self/cgroup` names it:
/// `/sys/fs/cgroup/memory.max` alone is the root cgroup's, which has no limit on a host (a systemd service's
/// `MemoryMax=` is in `/sys/fs/cgroup/system.slice/<unit>/memory.max`), and cgroup v1 keeps its limit in
/// `memory.limit_in_bytes` under `/sys/fs/cgroup/memory`. Missing either left the budget at half the machine in a
/// cgroup of less, and the OOM killer stopped the server again.
#[test]
fn the_default_budget_follows_the_process_cgroup_limit() {
    use lessor_storage::registry::memory_limit_within;
    const GIB: u64 = 1 << 30;
    let machine = 16 * GIB;
    // A container with its own cgroup namespace (cgroup v2): its cgroup is the root of the mount.
    let r = linux_root("0::/\n", &[("memory.max", "536870912\n")]);
    assert_eq!(
        memory_limit_within(r.path()),
        Some(GIB / 2),
        "container, cgroup v2"
    );
    // No limit anywhere: the machine's memory.
    let r = linux_root("0::/user.slice\n", &[("user.slice/memory.max", "max\n")]);
    assert_eq!(memory_limit_within(r.path()), Some(machine), "no limit");
    // A systemd service with MemoryMax=2G on a cgroup v2 host.
    let r = linux_root(
        "0::/system.slice/lessor.service\n",
        &[("system.slice/lessor.service/memory.max", "2147483648\n")],
    );
    assert_eq!(
        memory_limit_within(r.path()),
        Some(2 * GIB),
        "systemd service, cgroup v2"
    );
    // A limit on a parent applies to its children.
    let r = linux_root(
        "0::/lessor.slice/lessor.service\n",
        &[
            ("lessor.slice/memory.max", "1073741824\n"),
            ("lessor.slice/lessor.service/memory.max", "max\n"),
        ],
    );
    assert_eq!(memory_limit_within(r.path()), Some(GIB), "a parent's limit");
    // cgroup v1 (hybrid hosts, older container runtimes).
    let r = linux_root(
        "4:memory:/lessor\n1:cpu,cpuacct:/\n0::/\n",
        &[
            ("memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory/lessor/memory.limit_in_bytes", "1073741824\n"),
        ],
    );
    assert_eq!(memory_limit_within(r.path()), Some(GIB), "cgroup v1");
    // cgroup v1 in a container without a cgroup namespace: the path names the host's cgroup, the mount is the
    // container's own.
    let r = linux_root(
        "4:memory:/docker/0123abcd\n",
        &[("memory/memory.limit_in_bytes", "268435456\n")],
    );
    assert_eq!(
        memory_limit_within(r.path()),
        Some(GIB / 4),
        "cgroup v1, container"
    );
}

/// Items of 1,000 bytes, as many as `n`.
fn big(n: usize, tag: &str) -> Vec<NewItem> {
    (0..n)
        .map(|i| {
            let mut it = item(&format!("{tag}-{i}"));
            it.payload = bytes::Bytes::from(vec![b'x'; 1000]);
            it
        })
        .collect()
}

/// A full store whose items all died must still move them to its dead-letter queue: a move (the engine's
/// dead-letter transfer, a redrive) writes items that the store holds already, and removes them from their source
/// once written, so it adds nothing that stays. Refused as new items, the dead items stayed in their source for
/// good: consumers could not take them (dead), the dead-letter queue had nothing to serve, and every produce was
/// refused; the store was wedged until an operator stepped in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_whose_items_died_still_moves_them_to_its_dead_letter_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open_with(tmp.path(), Durability::None, Some(1 << 20)).expect("open");
    let p = store.open("q", 0).await.expect("partition");
    let dlq = store.open("q-dead", 0).await.expect("dead-letter partition");
    let mut stored = 0;
    loop {
        match p.produce(big(50, &format!("r{stored}"))).await {
            Ok(ids) => stored += ids.len(),
            Err(e) => {
                assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
                break;
            }
        }
    }
    // Every item fails: leased, and retried as dead.
    let policy = LifecyclePolicy {
        max_attempts: 1,
        has_dead_queue: true,
        ..Default::default()
    };
    let got = p.lease(stored, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(got.len(), stored);
    let ops = got
        .iter()
        .map(|it| {
            vec![RetryOp {
                id: it.id,
                action: RetryAction::Dead,
            }]
        })
        .collect();
    p.retry(ops, policy).await.expect("retry");
    let used = store.memory().expect("a budget").0;

    // The engine's transfer (`dead_letter.rs`): a copy carrying a source id into the dead-letter queue, then the
    // removal from the source.
    let dead = p.dead_items(stored).await.expect("dead items");
    assert_eq!(dead.len(), stored);
    let copies: Vec<NewItem> = dead
        .iter()
        .map(|it| NewItem {
            source_id: format!("q/0/{}", it.id),
            created_at: it.created_at,
            expire_deadline: T0.add(SEC * 3600),
            reference: it.reference.clone(),
            encoding: it.encoding.clone(),
            kind: it.kind.clone(),
            payload: it.payload.clone(),
            ..Default::default()
        })
        .collect();
    dlq.produce(copies)
        .await
        .expect("a move into the dead-letter queue of a full store");
    p.remove_dead(dead.iter().map(|it| it.id).collect())
        .await
        .expect("remove dead");
    assert_eq!(store.memory().expect("a budget").0, used, "a move adds nothing");
    // The dead-letter queue's consumers make room.
    let got = dlq.lease(stored, T0.add(SEC * 60)).await.expect("lease");
    dlq.complete(vec![got.iter().map(|it| it.id).collect()])
        .await
        .expect("complete");
    p.produce(big(50, "after")).await.expect("room again");
    drop((p, dlq));
    store.close().await;
}

/// A store whose log is poisoned answers every call with the poison, produce included: a produce that the budget
/// would refuse must not answer `Full` (transient: the client retries for ever) when the store can serve nothing
/// until a restart. (The budget used to be checked first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_store_answers_a_produce_past_its_budget_with_the_poison() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open_with(dir.path(), Durability::Sync, Some(70 << 20)).expect("open");
    let p = store.open("poison", 0).await.expect("open");
    // The next segment's file is in the way: the rotation after 65 MiB of records fails and poisons the log.
    let mut segs: Vec<_> = std::fs::read_dir(dir.path().join(lessor_storage::log::LOG_DIR))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let last = segs.pop().expect("a segment");
    let id = u64::from_str_radix(last.file_stem().and_then(|s| s.to_str()).expect("name"), 16).expect("hex");
    std::fs::write(last.with_file_name(format!("{:016x}.seg", id + 1)), b"").expect("block the next segment");
    let big = |tag: &str| -> Vec<NewItem> {
        let payload = bytes::Bytes::from(vec![b'p'; 256 << 10]);
        (0..260)
            .map(|i| NewItem {
                payload: payload.clone(),
                ..item(&format!("{tag}-{i}"))
            })
            .collect()
    };
    let e = p.produce(big("a")).await.expect_err("the rotation fails");
    assert_eq!(e.kind, StorageErrorKind::Poisoned, "{e}");
    // 65 MiB are held (in RAM, not in the log): another 65 MiB would pass the budget.
    let e = p
        .produce(big("b"))
        .await
        .expect_err("a poisoned store stores nothing");
    assert_eq!(
        e.kind,
        StorageErrorKind::Poisoned,
        "the poison comes before the budget: {e}"
    );
    let e = p
        .import(vec![lessor_core::types::Item {
            payload: bytes::Bytes::from(vec![b'i'; 8 << 20]),
            ..Default::default()
        }])
        .await
        .expect_err("a poisoned store imports nothing");
    assert_eq!(e.kind, StorageErrorKind::Poisoned, "{e}");
    store.close().await;
}
