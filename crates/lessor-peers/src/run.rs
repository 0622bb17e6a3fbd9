//! The workload every system gets: producers and consumers at the same time (a pipeline), for `--duration`,
//! then up to `--drain` more for the consumers to finish the backlog.
//!
//! Each system implements [`Peer`]: how to open a producer or consumer connection, send a batch, and take
//! (lease and complete) up to a batch. Everything else is shared, so the systems differ only in their
//! client code: pacing, counting, end-to-end latency and the CPU window.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::stats::{self, Clock, E2e, Hist};

/// The errors kept for the report (distinct messages).
const KEPT_ERRORS: usize = 5;

/// One queue system under test.
pub trait Peer: Send + Sync + 'static {
    /// A producer's connection.
    type Producer: Send + 'static;
    /// A consumer's connection (and its lease state).
    type Consumer: Send + 'static;

    /// Opens a producer connection.
    fn producer(&self, id: usize) -> impl Future<Output = Result<Self::Producer, String>> + Send;
    /// Opens a consumer connection.
    fn consumer(&self, id: usize) -> impl Future<Output = Result<Self::Consumer, String>> + Send;
    /// Sends `n` items (stamped through `clock`) and returns once the system acknowledged all of them.
    fn produce(
        &self,
        p: &mut Self::Producer,
        n: usize,
        clock: &Clock,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Leases up to `max` items, records their arrival in `e2e`, completes them, and returns how many were
    /// completed (0 when nothing arrived within the system's poll time).
    fn consume(
        &self,
        c: &mut Self::Consumer,
        max: usize,
        e2e: &mut E2e,
    ) -> impl Future<Output = Result<usize, String>> + Send;
    /// Removes what setup created (best effort).
    fn teardown(&self) -> impl Future<Output = ()> + Send;
}

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Producer tasks (each its own connection).
    pub producers: usize,
    /// Consumer tasks (each its own connection).
    pub consumers: usize,
    /// Items per produce and per lease.
    pub batch: usize,
    /// Payload bytes.
    pub size: usize,
    /// How long producers run.
    pub duration: Duration,
    /// How long consumers may go on after the producers stopped.
    pub drain: Duration,
    /// Total produce rate in items/s (None: as fast as possible).
    pub rate: Option<f64>,
}

impl Plan {
    /// Time between two batches of one producer when paced: the total rate is shared by all producers.
    pub fn pace(&self) -> Option<Duration> {
        let rate = self.rate?;
        let per_producer = rate / self.producers.max(1) as f64;
        Some(Duration::from_secs_f64(self.batch as f64 / per_producer))
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Items acknowledged to producers.
    pub produced: u64,
    /// Items completed by consumers.
    pub consumed: u64,
    /// From the start to the last produce acknowledgement.
    pub produce_elapsed: Duration,
    /// From the start to the last completion.
    pub consume_elapsed: Duration,
    /// Acknowledgement latency of each produce batch.
    pub produce_ack: Hist,
    /// Per item, arrival minus send.
    pub e2e: Hist,
    /// Failed calls.
    pub errors: u64,
    /// The first distinct error messages.
    pub first_errors: Vec<String>,
    /// Largest lateness of a paced send behind its schedule.
    pub lag_max: Duration,
}

struct Shared<P> {
    peer: P,
    plan: Plan,
    clock: Clock,
    start: Instant,
    produced: AtomicU64,
    consumed: AtomicU64,
    last_produce_ns: AtomicU64,
    last_consume_ns: AtomicU64,
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl<P> Shared<P> {
    fn error(&self, what: &str, e: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        if let Ok(mut kept) = self.first_errors.lock() {
            if kept.len() < KEPT_ERRORS && !kept.contains(&msg) {
                kept.push(msg);
            }
        }
    }

    fn since_start(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Opens every connection first (so connecting is not measured), then runs the pipeline. `between` is
/// called right before the first send and right after the last completion: the CPU window.
pub async fn run<P: Peer>(peer: P, plan: Plan, mut between: impl FnMut()) -> Result<(Outcome, P), String> {
    let mut producers = Vec::with_capacity(plan.producers);
    for i in 0..plan.producers {
        producers.push(peer.producer(i).await?);
    }
    let mut consumers = Vec::with_capacity(plan.consumers);
    for i in 0..plan.consumers {
        consumers.push(peer.consumer(i).await?);
    }
    let clock = Clock::new(plan.size);
    between();
    let shared = Arc::new(Shared {
        peer,
        plan: plan.clone(),
        clock: clock.clone(),
        start: Instant::now(),
        produced: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        last_produce_ns: AtomicU64::new(0),
        last_consume_ns: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_errors: Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer_tasks: Vec<_> = consumers
        .into_iter()
        .map(|c| {
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            tokio::spawn(consumer(shared, c, stop))
        })
        .collect();
    let deadline = shared.start + plan.duration;
    let pace = plan.pace();
    let producer_tasks: Vec<_> = producers
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let shared = shared.clone();
            // Paced producers are staggered so their batches do not all leave at once.
            let offset = pace
                .map(|p| p.mul_f64(i as f64 / plan.producers.max(1) as f64))
                .unwrap_or_default();
            tokio::spawn(producer(shared, p, deadline, pace, offset))
        })
        .collect();
    let (mut produce_ack, mut lag_max) = (stats::new_hist(), Duration::ZERO);
    for t in producer_tasks {
        let (h, lag) = t.await.map_err(|e| format!("a producer task failed: {e}"))?;
        let _ = produce_ack.add(&h);
        lag_max = lag_max.max(lag);
    }
    // Drain: until everything produced is consumed, or the drain time is up.
    let drain_end = Instant::now() + plan.drain;
    while Instant::now() < drain_end
        && shared.consumed.load(Ordering::Relaxed) < shared.produced.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stop_tx.send(true);
    let mut e2e = stats::new_hist();
    for t in consumer_tasks {
        let h = t.await.map_err(|e| format!("a consumer task failed: {e}"))?;
        let _ = e2e.add(&h);
    }
    between();
    let shared = Arc::into_inner(shared).ok_or("a task still holds the run state")?;
    let outcome = Outcome {
        produced: shared.produced.load(Ordering::Relaxed),
        consumed: shared.consumed.load(Ordering::Relaxed),
        produce_elapsed: Duration::from_nanos(shared.last_produce_ns.load(Ordering::Relaxed)),
        consume_elapsed: Duration::from_nanos(shared.last_consume_ns.load(Ordering::Relaxed)),
        produce_ack,
        e2e,
        errors: shared.errors.load(Ordering::Relaxed),
        first_errors: shared.first_errors.lock().map(|e| e.clone()).unwrap_or_default(),
        lag_max,
    };
    Ok((outcome, shared.peer))
}

async fn producer<P: Peer>(
    shared: Arc<Shared<P>>,
    mut conn: P::Producer,
    deadline: Instant,
    pace: Option<Duration>,
    offset: Duration,
) -> (Hist, Duration) {
    let (mut hist, mut lag) = (stats::new_hist(), Duration::ZERO);
    let first = shared.start + offset;
    let mut tick: u32 = 0;
    loop {
        if let Some(interval) = pace {
            let at = first + interval * tick;
            tick = tick.saturating_add(1);
            tokio::time::sleep_until(at.into()).await;
            lag = lag.max(at.elapsed());
        }
        let t0 = Instant::now();
        if t0 >= deadline {
            break;
        }
        let n = shared.plan.batch;
        match shared.peer.produce(&mut conn, n, &shared.clock).await {
            Ok(()) => {
                stats::record(&mut hist, t0.elapsed());
                shared.produced.fetch_add(n as u64, Ordering::Relaxed);
                shared
                    .last_produce_ns
                    .fetch_max(shared.since_start(), Ordering::Relaxed);
            }
            Err(e) => {
                shared.error("produce", &e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (hist, lag)
}

async fn consumer<P: Peer>(
    shared: Arc<Shared<P>>,
    mut conn: P::Consumer,
    mut stop: watch::Receiver<bool>,
) -> Hist {
    let mut e2e = E2e::new(shared.clock.clone());
    loop {
        if *stop.borrow() {
            break;
        }
        let res = tokio::select! {
            r = shared.peer.consume(&mut conn, shared.plan.batch, &mut e2e) => r,
            _ = stop.changed() => break,
        };
        match res {
            Ok(0) => {}
            Ok(n) => {
                shared.consumed.fetch_add(n as u64, Ordering::Relaxed);
                shared
                    .last_consume_ns
                    .fetch_max(shared.since_start(), Ordering::Relaxed);
            }
            Err(e) => {
                shared.error("consume", &e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    e2e.hist
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory queue: proves the loop counts, paces and drains without any server.
    struct Mem(Mutex<std::collections::VecDeque<Vec<u8>>>);

    impl Peer for Mem {
        type Producer = ();
        type Consumer = ();
        async fn producer(&self, _: usize) -> Result<(), String> {
            Ok(())
        }
        async fn consumer(&self, _: usize) -> Result<(), String> {
            Ok(())
        }
        async fn produce(&self, _: &mut (), n: usize, clock: &Clock) -> Result<(), String> {
            let batch = clock.batch(n);
            self.0.lock().map_err(|e| e.to_string())?.extend(batch);
            Ok(())
        }
        async fn consume(&self, _: &mut (), max: usize, e2e: &mut E2e) -> Result<usize, String> {
            let got: Vec<Vec<u8>> = {
                let mut q = self.0.lock().map_err(|e| e.to_string())?;
                let k = q.len().min(max);
                q.drain(..k).collect()
            };
            let now = Instant::now();
            for p in &got {
                e2e.item(now, p);
            }
            if got.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(got.len())
        }
        async fn teardown(&self) {}
    }

    #[test]
    fn pacing_shares_the_rate_between_producers() {
        let plan = Plan {
            producers: 4,
            consumers: 4,
            batch: 100,
            size: 100,
            duration: Duration::from_secs(1),
            drain: Duration::from_secs(1),
            rate: Some(10_000.0),
        };
        assert_eq!(plan.pace(), Some(Duration::from_millis(40)));
        assert_eq!(Plan { rate: None, ..plan }.pace(), None);
    }

    #[tokio::test]
    async fn a_paced_pipeline_consumes_everything_it_produced() {
        let plan = Plan {
            producers: 2,
            consumers: 2,
            batch: 10,
            size: 16,
            duration: Duration::from_millis(300),
            drain: Duration::from_secs(2),
            rate: Some(1_000.0),
        };
        let mut windows = 0;
        let (out, _) = run(Mem(Mutex::new(Default::default())), plan, || windows += 1)
            .await
            .unwrap();
        assert_eq!(windows, 2);
        assert!(out.produced >= 200 && out.produced <= 400, "{out:?}");
        assert_eq!(out.consumed, out.produced);
        assert_eq!(out.e2e.len(), out.consumed);
        assert_eq!(out.errors, 0);
    }
}
