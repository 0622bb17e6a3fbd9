//! A redrive survives SIGKILL of the real binary (fjall, `durability: sync`): items are moved from the dead-letter
//! queue back to their source while the server is killed several times mid-move; after each restart the task is
//! taken over and finishes, and in the end every item is in the source queue exactly once and the dead-letter
//! queue is empty: nothing lost, nothing doubled.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client};
use lessor_proto::routes::{QueueRedrive, RedriveGet};
use lessor_testkit::process::ServerCommand;

const ITEMS: usize = 3000;
/// Moved per second: slow enough that the kills land mid-move.
const RATE: i32 = 600;

fn server(data: &Path, log: &Path) -> ServerCommand {
    ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), log)
        .startup_limit(Duration::from_secs(20))
        .data_dir(data)
        .arg("--log-level")
        .arg("info")
}

async fn depth(c: &Client, q: &str) -> i64 {
    let s = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: q.into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    s.logical_queues
        .iter()
        .flat_map(|l| &l.partitions)
        .map(|p| i64::from(p.total) + i64::from(p.scheduled))
        .sum()
}

async fn task(c: &Client, id: &str) -> pb::RedriveTask {
    c.call::<RedriveGet>(&pb::RedriveTaskRequest {
        task_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("redrive.get")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_killed_mid_move_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let cmd = server(&data, &log);
    let mut srv = cmd.start().await;
    let c = srv.client().clone();
    for (name, dead, partitions) in [("dlq", "", 1), ("jobs", "dlq", 2)] {
        c.queues_create(&pb::QueueInfo {
            queue_name: name.into(),
            dead_queue: dead.into(),
            lease_timeout: "1m".into(),
            expire_timeout: "24h".into(),
            max_attempts: 1,
            requested_partitions: partitions,
            ..Default::default()
        })
        .await
        .expect("create");
    }
    // Every item dies once: produced, leased, retried as dead, so it lands in the dead-letter queue.
    for chunk in 0..ITEMS / 500 {
        c.queue_produce(&pb::QueueProduceRequest {
            queue_name: "jobs".into(),
            request_timeout: "1m".into(),
            items: (0..500)
                .map(|i| pb::QueueProduceItem {
                    utf8: format!("item-{}", chunk * 500 + i),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("produce");
    }
    let mut dead = 0;
    while dead < ITEMS {
        let l = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: "jobs".into(),
                batch_size: 500,
                client_id: "killer".into(),
                request_timeout: "10s".into(),
            })
            .await
            .expect("lease");
        dead += l.items.len();
        c.queue_retry(&pb::QueueRetryRequest {
            queue_name: "jobs".into(),
            partition: l.partition,
            items: l
                .items
                .iter()
                .map(|it| pb::QueueRetryItem {
                    id: it.id.clone(),
                    dead: true,
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("retry dead");
    }
    let t0 = Instant::now();
    while depth(&c, "dlq").await < ITEMS as i64 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "dead items reach the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = c
        .call::<QueueRedrive>(&pb::QueueRedriveRequest {
            dead_queue: "dlq".into(),
            rate_per_sec: RATE,
            ..Default::default()
        })
        .await
        .expect("redrive");
    let id = started.task_id.clone();
    // Kill it three times while it moves: the first time during the first batches, then each time once the
    // restarted server has taken the task over (it waits until the task has been silent for a while) and moved
    // some more.
    let mut moved = 0;
    for (round, extra_ms) in [(1, 700u64), (2, 230), (3, 410)] {
        let t0 = Instant::now();
        loop {
            let t = task(srv.client(), &id).await;
            if t.moved > moved || round == 1 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the task is taken over: {t:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(extra_ms)).await;
        srv.kill();
        srv = cmd.start().await;
        let t = task(srv.client(), &id).await;
        println!(
            "round {round}: killed and restarted; task {} moved {} remaining {}",
            t.status, t.moved, t.remaining
        );
        assert_eq!(t.status, "running", "the task survives the kill");
        assert!(t.moved < ITEMS as i64, "killed mid-move");
        moved = t.moved;
    }
    let c = srv.client().clone();
    // The restarted server takes the task over once it has been silent for a while, then finishes it.
    let t0 = Instant::now();
    let done = loop {
        let t = task(&c, &id).await;
        if t.status != "running" {
            break t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the task finishes after the kills: {t:?}\n{}",
            srv.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done.status, "completed", "{done:?}");
    assert_eq!(depth(&c, "dlq").await, 0, "the dead-letter queue is empty");
    assert_eq!(
        depth(&c, "jobs").await,
        ITEMS as i64,
        "every item is back exactly once"
    );
    // Read every item back: distinct payloads, each one once, attempts reset.
    let mut seen = HashSet::new();
    while seen.len() < ITEMS {
        let l = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: "jobs".into(),
                batch_size: 1000,
                client_id: "reader".into(),
                request_timeout: "5s".into(),
            })
            .await
            .expect("lease back");
        for it in &l.items {
            assert_eq!(it.attempts, 1, "attempts start again");
            let p = String::from_utf8_lossy(&it.bytes).into_owned();
            assert!(seen.insert(p.clone()), "{p} came back twice");
        }
        c.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "jobs".into(),
            partition: l.partition,
            request_timeout: "5s".into(),
            ids: l.items.iter().map(|it| it.id.clone()).collect(),
        })
        .await
        .expect("complete");
    }
    let want: HashSet<String> = (0..ITEMS).map(|i| format!("item-{i}")).collect();
    assert_eq!(seen, want);
    srv.kill();
}
