//! The server-wide bound on the request bytes held in memory (`limits.max-inflight-bytes`), black-box over HTTP.
//!
//! A produce waits in its queue's inbox (up to `limits.max-requests-per-queue` requests, each holding its decoded
//! items) while the queue's task is busy with a slow storage call. Here the storage call is held by a gate, so
//! requests pile up exactly as behind a slow fsync; the bound must refuse the excess with a retryable 454, and every
//! request it admitted must be stored once the storage moves again.

use std::sync::Arc;
use std::time::Duration;

use lessor_client::{proto as pb, Client};
use lessor_core::engine::{Engine, EngineConfig, NamedStore};
use lessor_core::time::SystemClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_server::{serve, Config, ServeOptions};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;
use lessor_testkit::hooked::{Gate, HookedStore, Op};
use tokio::net::TcpListener;

/// Payload bytes of each produce (its body is a few dozen bytes more).
const PAYLOAD: usize = 10_000;
/// The bound under test.
const BOUND: usize = 100 * 1024;
/// Produces sent while the first one is stuck in the storage.
const CROWD: usize = 40;

/// A server over memory storage whose produces into `q` stop at `gate`, with `yaml`'s limits.
async fn gated_server(gate: &Arc<Gate>, yaml: &str) -> (Client, Engine, tokio::sync::oneshot::Sender<()>) {
    let config = Config::from_yaml(yaml).expect("config");
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), gate.clone())),
        }],
        limits: Limits::default(),
        clock: Arc::new(SystemClock),
    })
    .expect("engine");
    engine
        .create_queue(QueueInfo {
            name: "q".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            max_attempts: 1,
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("queue");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        engine.clone(),
        ServeOptions::from_config(&config),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = Client::new(&format!("http://{addr}")).expect("client");
    (client, engine, stop)
}

fn produce(n: usize) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: "q".into(),
        request_timeout: "1m".into(),
        items: vec![pb::QueueProduceItem {
            reference: format!("r{n}"),
            bytes: vec![b'x'; PAYLOAD],
            ..Default::default()
        }],
    }
}

/// Items stored in `q`.
async fn stored(engine: &Engine) -> u64 {
    let s = engine.stats("q").await.expect("stats");
    s.partitions.iter().map(|p| p.total + p.scheduled).sum()
}

/// With the queue's storage stuck, 41 produces of 10 KB arrive under a 100 KiB bound: about ten are admitted (they
/// wait for the storage), the rest are refused at once with 454 "server is overloaded; ...", and once the storage
/// moves every admitted produce is stored, and none of the refused ones.
///
/// Without a bound all 41 are admitted and wait in the inbox (as 4,096 requests of 5 MB each, 20 GB, would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_bytes_waiting_for_a_stuck_queue_stay_within_max_inflight_bytes() {
    let gate = Gate::on(|c| c.op == Op::Produce && c.queue == "q");
    let yaml = format!("limits:\n  max-inflight-bytes: {BOUND}\n  inflight-wait: 0s\n");
    let (client, engine, _stop) = gated_server(&gate, &yaml).await;
    gate.arm(0);
    let first = {
        let c = client.clone();
        tokio::spawn(async move { c.queue_produce(&produce(0)).await })
    };
    gate.reached().await;
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut crowd = Vec::new();
    for n in 1..=CROWD {
        let c = client.clone();
        let refused = refused.clone();
        crowd.push(tokio::spawn(async move {
            let r = c.queue_produce(&produce(n)).await;
            if r.is_err() {
                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            r
        }));
    }
    // At most BOUND / PAYLOAD of the 41 fit; the others must be refused while the first is still stuck.
    let most = BOUND / PAYLOAD;
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
        let r = refused.load(std::sync::atomic::Ordering::SeqCst);
        if r + most > CROWD {
            Ok(())
        } else {
            Err(format!("{r} of {CROWD} refused while the queue is stuck"))
        }
    })
    .await
    .expect("the excess is refused while the queue is stuck");
    // Let every refusal that is coming arrive, then count what was admitted (the stuck one included).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admitted = CROWD + 1 - refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        admitted * PAYLOAD <= BOUND,
        "{admitted} produces of {PAYLOAD} bytes admitted under a bound of {BOUND}"
    );
    assert!(
        admitted >= 5,
        "only {admitted} admitted: the bound admits far less than it allows"
    );
    gate.release();
    first.await.expect("task").expect("the stuck produce is stored");
    let mut ok = 1;
    for t in crowd {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(454), "{e}");
                assert!(e.to_string().contains("server is overloaded; "), "{e}");
            }
        }
    }
    assert_eq!(ok, admitted, "every request not refused succeeds");
    assert_eq!(
        stored(&engine).await,
        admitted as u64,
        "every admitted item is stored, no refused one"
    );
}
