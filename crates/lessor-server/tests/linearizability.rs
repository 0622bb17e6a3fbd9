//! Linearizability of one queue partition under concurrent clients.
//!
//! Several producer and consumer tasks talk to a real server over HTTP while every call is recorded with an
//! invocation and a response tick taken from one shared counter, so the ticks respect real-time order. Lease
//! expiry is an operation too: the test driver records it around `ManualClock::advance` and a `queue.stats`
//! round trip that cannot be answered before the queue task has run its lifecycle at the new time.
//!
//! The history is then checked against a sequential model queue by a small Wing-Gong style search (the idea
//! behind Porcupine): try every order consistent with real time, memoising (state, set of linearized ops).
//! The model's state is the FIFO list of ready item keys plus the set of leased items (id, deadline, key):
//! - produce appends its keys in order;
//! - lease returns items from the head in FIFO order, or is empty (a 454 long-poll timeout) only when the queue
//!   is empty. With [`LeaseRule::Prefix`] the items must be exactly a prefix of the queue; with
//!   [`LeaseRule::HeadSubsequence`] the first item must be the head and the rest must follow in queue order,
//!   because concurrent waiters are served round-robin from one storage call (Querator's documented
//!   distribution), so each of them gets every k-th item of the head;
//! - complete requires every id to be leased and removes them; a failed complete requires some id not leased;
//! - retry (immediate) requires leased ids and appends their keys to the tail, in request order;
//! - lease expiry moves every lease whose deadline is at or before the new time to the tail, in (deadline, id)
//!   order;
//! - priorities (Lessor extension): a key's priority is `key / 1000`; a lease serves the queue in priority order
//!   (highest first, FIFO within a priority), so "the head" above means the head of that order;
//! - idempotent produce (Lessor extension): every item carries its key as its dedup id, so a produce appends only
//!   the keys never produced before (the test's clock never passes the dedup window);
//! - extend (Lessor extension) requires every id to be leased and sets their deadlines to the model's clock plus
//!   the requested lease; a refused extend requires some id not leased. The model's clock is the cutoff of the last
//!   expiry (the manual clock only moves there).
//!
//! Items are tracked by their payload (`k<n>`, also the reference) because ids change when an item re-enters
//! the queue; lease ids are only used to match completes and retries to the lease that handed them out. The
//! negative self-tests feed hand-made non-linearizable histories to the checker to prove it can fail.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lessor_client::proto::{
    QueueCompleteRequest, QueueInfo, QueueLeaseRequest, QueueProduceItem, QueueProduceRequest,
    QueueRetryItem, QueueRetryRequest, QueueStatsRequest,
};
use lessor_client::{Client, ClientError};
use lessor_core::time::Clock;
use lessor_testkit::Rng;

// =============================================================================================================
// The model
// =============================================================================================================

/// An item's identity across lease cycles.
type Key = u32;

/// How strictly a lease's items must come from the head of the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseRule {
    /// The items are exactly the first `len` items of the queue.
    Prefix,
    /// The first item is the head; the others follow in queue order, possibly skipping items that concurrent
    /// leases served in the same round-robin deal take.
    HeadSubsequence,
}

/// One leased item as the lease response reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Lent {
    /// Lease deadline in microseconds (first, so sorting gives the expiry order).
    deadline: i64,
    /// The item id of this lease cycle.
    id: u64,
    /// The item.
    key: Key,
}

/// Priority of a key: keys of priority p are numbered from p * 1000.
fn prio(k: Key) -> u32 {
    k / 1000
}

/// What a client asked for.
#[derive(Clone, Debug)]
enum Call {
    Produce(Vec<Key>),
    /// Extend the leases of the ids by `lease` µs from the current time.
    Extend {
        ids: Vec<u64>,
        lease: i64,
    },
    Lease {
        batch: usize,
    },
    Complete(Vec<u64>),
    Retry(Vec<u64>),
    /// The clock moved to `cutoff` (µs): every lease with a deadline at or before it expires.
    Expire {
        cutoff: i64,
    },
}

/// What the server answered.
#[derive(Clone, Debug)]
enum Ret {
    Ok,
    /// A refused complete or retry (the lease it names is gone).
    Refused,
    Leased(Vec<Lent>),
    /// A lease long-poll that ended with 454 "request timeout".
    Empty,
}

/// One recorded operation.
#[derive(Clone, Debug)]
struct Op {
    client: String,
    call_at: u64,
    ret_at: u64,
    call: Call,
    ret: Ret,
}

/// The sequential queue: ready keys in FIFO order, leased items sorted by (deadline, id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct State {
    queue: Vec<Key>,
    leased: Vec<Lent>,
    /// Every key ever stored (sorted): a produce of one of them again is a duplicate.
    produced: Vec<Key>,
    /// The server's clock (µs) as of the last expiry.
    now: i64,
}

impl State {
    fn lent(&self, id: u64) -> Option<usize> {
        self.leased.iter().position(|l| l.id == id)
    }

    /// Whether every id is leased and none repeats.
    fn all_leased(&self, ids: &[u64]) -> bool {
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        !ids.is_empty() && distinct.len() == ids.len() && ids.iter().all(|id| self.lent(*id).is_some())
    }

    /// Removes the leases of `ids` and returns their keys in request order.
    fn take(&mut self, ids: &[u64]) -> Vec<Key> {
        ids.iter()
            .filter_map(|id| self.lent(*id).map(|i| self.leased.remove(i).key))
            .collect()
    }
}

/// Applies one operation to the model; `None` when the answer is impossible in `s`.
fn step(s: &State, call: &Call, ret: &Ret, rule: LeaseRule) -> Option<State> {
    let mut next = s.clone();
    match (call, ret) {
        (Call::Produce(keys), Ret::Ok) => {
            for k in keys {
                if let Err(at) = next.produced.binary_search(k) {
                    next.produced.insert(at, *k);
                    next.queue.push(*k);
                }
            }
            Some(next)
        }
        (Call::Extend { ids, lease }, Ret::Ok) => {
            if !s.all_leased(ids) {
                return None;
            }
            let deadline = s.now + lease;
            for l in &mut next.leased {
                if ids.contains(&l.id) {
                    l.deadline = deadline;
                }
            }
            next.leased.sort_unstable();
            Some(next)
        }
        (Call::Extend { ids, .. }, Ret::Refused) => (!s.all_leased(ids)).then_some(next),
        (Call::Lease { .. }, Ret::Empty) => s.queue.is_empty().then_some(next),
        (Call::Lease { batch }, Ret::Leased(items)) => {
            if items.is_empty() || items.len() > *batch {
                return None;
            }
            // Fresh ids only: an id names one lease cycle.
            if items.iter().any(|l| s.lent(l.id).is_some()) {
                return None;
            }
            // The serving order: highest priority first, FIFO within one (a stable sort keeps FIFO).
            let mut order = s.queue.clone();
            order.sort_by_key(|k| std::cmp::Reverse(prio(*k)));
            let mut positions = Vec::with_capacity(items.len());
            let mut from = 0;
            for l in items {
                let at = from + order[from..].iter().position(|k| *k == l.key)?;
                positions.push(at);
                from = at + 1;
            }
            let ok = match rule {
                LeaseRule::Prefix => positions.iter().enumerate().all(|(i, p)| i == *p),
                LeaseRule::HeadSubsequence => positions[0] == 0,
            };
            if !ok {
                return None;
            }
            let taken: HashSet<Key> = positions.iter().map(|p| order[*p]).collect();
            next.queue.retain(|k| !taken.contains(k));
            next.leased.extend(items.iter().copied());
            next.leased.sort_unstable();
            Some(next)
        }
        (Call::Complete(ids), Ret::Ok) => {
            if !s.all_leased(ids) {
                return None;
            }
            next.take(ids);
            Some(next)
        }
        (Call::Retry(ids), Ret::Ok) => {
            if !s.all_leased(ids) {
                return None;
            }
            let keys = next.take(ids);
            next.queue.extend(keys);
            Some(next)
        }
        (Call::Complete(ids) | Call::Retry(ids), Ret::Refused) => (!s.all_leased(ids)).then_some(next),
        (Call::Expire { cutoff }, Ret::Ok) => {
            next.now = *cutoff;
            let split = next.leased.partition_point(|l| l.deadline <= *cutoff);
            let expired: Vec<Lent> = next.leased.drain(..split).collect();
            next.queue.extend(expired.iter().map(|l| l.key));
            Some(next)
        }
        _ => None,
    }
}

// =============================================================================================================
// The checker
// =============================================================================================================

/// Most (linearized set, state) pairs the search may visit before it gives up.
const SEARCH_BUDGET: usize = 2_000_000;

struct Search<'a> {
    ops: &'a [Op],
    rule: LeaseRule,
    seen: HashSet<(u128, State)>,
    path: Vec<usize>,
    best: Vec<usize>,
    best_state: State,
    visited: usize,
}

impl Search<'_> {
    fn dfs(&mut self, done: u128, state: &State) -> Result<bool, String> {
        let n = self.ops.len();
        if self.path.len() > self.best.len() {
            self.best = self.path.clone();
            self.best_state = state.clone();
        }
        if done.count_ones() as usize == n {
            return Ok(true);
        }
        self.visited += 1;
        if self.visited > SEARCH_BUDGET {
            return Err(format!(
                "search budget of {SEARCH_BUDGET} states exceeded; keep histories smaller"
            ));
        }
        // An op may go next only if no pending op returned before it was invoked.
        let pending = (0..n).filter(|i| done & (1u128 << i) == 0);
        let horizon = pending
            .clone()
            .map(|i| self.ops[i].ret_at)
            .min()
            .unwrap_or(u64::MAX);
        for i in pending {
            let op = &self.ops[i];
            if op.call_at > horizon {
                continue;
            }
            let Some(next) = step(state, &op.call, &op.ret, self.rule) else {
                continue;
            };
            let done2 = done | (1u128 << i);
            if !self.seen.insert((done2, next.clone())) {
                continue;
            }
            self.path.push(i);
            if self.dfs(done2, &next)? {
                return Ok(true);
            }
            self.path.pop();
        }
        Ok(false)
    }
}

/// Checks that `ops` is linearizable with respect to the model queue starting empty. On failure the message
/// shows the history and the longest order the search could build.
fn check(ops: &[Op], rule: LeaseRule) -> Result<(), String> {
    check_from(ops, rule, State::default())
}

/// [`check`] from a given start state (the server's clock at the start).
fn check_from(ops: &[Op], rule: LeaseRule, start: State) -> Result<(), String> {
    assert!(
        ops.len() <= 128,
        "history of {} ops is too long for the checker",
        ops.len()
    );
    for op in ops {
        assert!(op.call_at < op.ret_at, "op responds before it is invoked: {op:?}");
    }
    let mut search = Search {
        ops,
        rule,
        seen: HashSet::new(),
        path: Vec::new(),
        best: Vec::new(),
        best_state: start.clone(),
        visited: 0,
    };
    if search.dfs(0, &start)? {
        return Ok(());
    }
    let mut msg = format!(
        "history of {} ops is not linearizable ({rule:?})\nhistory:\n",
        ops.len()
    );
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|i| ops[*i].call_at);
    for i in order {
        let o = &ops[i];
        msg.push_str(&format!(
            "  #{i:<3} [{:>4},{:>4}] {:<6} {:?} -> {:?}\n",
            o.call_at, o.ret_at, o.client, o.call, o.ret
        ));
    }
    msg.push_str(&format!("longest linearizable prefix: {:?}\n", search.best));
    msg.push_str(&format!("model state after it: {:?}\n", search.best_state));
    Err(msg)
}

// =============================================================================================================
// Negative and positive self-tests of the checker
// =============================================================================================================

fn op(call_at: u64, ret_at: u64, call: Call, ret: Ret) -> Op {
    Op {
        client: "t".into(),
        call_at,
        ret_at,
        call,
        ret,
    }
}

fn lent(id: u64, key: Key) -> Lent {
    Lent {
        deadline: 100,
        id,
        key,
    }
}

fn lease(batch: usize, items: &[Lent]) -> (Call, Ret) {
    (Call::Lease { batch }, Ret::Leased(items.to_vec()))
}

#[test]
fn checker_rejects_a_lease_that_skips_the_head() {
    let (lc, lr) = lease(1, &[lent(2, 2)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, Call::Produce(vec![2]), Ret::Ok),
        op(4, 5, lc, lr),
    ];
    for rule in [LeaseRule::Prefix, LeaseRule::HeadSubsequence] {
        let err = check(&h, rule).expect_err("skipping the head must be rejected");
        assert!(err.contains("not linearizable"), "{err}");
    }
}

#[test]
fn checker_accepts_concurrent_produces_in_either_order() {
    let (lc, lr) = lease(2, &[lent(1, 2), lent(2, 1)]);
    let h = vec![
        op(0, 3, Call::Produce(vec![1]), Ret::Ok),
        op(1, 2, Call::Produce(vec![2]), Ret::Ok),
        op(4, 5, lc, lr),
    ];
    check(&h, LeaseRule::Prefix).expect("produce 2 may take effect first");
}

#[test]
fn checker_rejects_an_empty_lease_while_items_wait() {
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, Call::Lease { batch: 1 }, Ret::Empty),
    ];
    check(&h, LeaseRule::HeadSubsequence).expect_err("an item was ready");
    // The same answer is fine when the lease may have happened before the produce.
    let h = vec![
        op(0, 3, Call::Produce(vec![1]), Ret::Ok),
        op(1, 2, Call::Lease { batch: 1 }, Ret::Empty),
    ];
    check(&h, LeaseRule::Prefix).expect("the lease overlaps the produce");
}

#[test]
fn checker_rejects_double_delivery_and_unleased_completes() {
    let (lc1, lr1) = lease(1, &[lent(1, 1)]);
    let (lc2, lr2) = lease(1, &[lent(2, 1)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, lc1, lr1),
        op(4, 5, lc2, lr2),
    ];
    check(&h, LeaseRule::HeadSubsequence).expect_err("one item leased twice");

    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, Call::Complete(vec![7]), Ret::Ok),
    ];
    check(&h, LeaseRule::HeadSubsequence).expect_err("id 7 was never leased");

    // A refused complete of a valid lease is wrong too.
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, lc, lr),
        op(4, 5, Call::Complete(vec![1]), Ret::Refused),
    ];
    check(&h, LeaseRule::HeadSubsequence).expect_err("the lease was valid");
}

#[test]
fn checker_tells_round_robin_from_prefix() {
    let (a, ar) = lease(3, &[lent(1, 1), lent(3, 3)]);
    let (b, br) = lease(3, &[lent(2, 2), lent(4, 4)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1, 2, 3, 4]), Ret::Ok),
        op(2, 5, a, ar),
        op(3, 4, b, br),
    ];
    check(&h, LeaseRule::Prefix).expect_err("neither lease got a prefix");
    check(&h, LeaseRule::HeadSubsequence).expect("a round-robin deal of two waiters");
    // Round-robin never hands the later items out first.
    let (a, ar) = lease(3, &[lent(3, 3), lent(1, 1)]);
    let h = vec![op(0, 1, Call::Produce(vec![1, 2, 3]), Ret::Ok), op(2, 3, a, ar)];
    check(&h, LeaseRule::HeadSubsequence).expect_err("out of order");
}

#[test]
fn checker_models_retry_and_expiry_as_tail_appends() {
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let base = vec![
        op(0, 1, Call::Produce(vec![1, 2]), Ret::Ok),
        op(2, 3, lc, lr),
        op(4, 5, Call::Retry(vec![1]), Ret::Ok),
    ];
    let mut bad = base.clone();
    let (c, r) = lease(2, &[lent(3, 1), lent(4, 2)]);
    bad.push(op(6, 7, c, r));
    check(&bad, LeaseRule::HeadSubsequence).expect_err("a retried item goes to the tail");
    let mut good = base;
    let (c, r) = lease(2, &[lent(4, 2), lent(3, 1)]);
    good.push(op(6, 7, c, r));
    check(&good, LeaseRule::Prefix).expect("2 then the retried 1");

    // After an expiry the old id is gone: completing it cannot succeed.
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let (lc2, lr2) = lease(2, &[lent(5, 2), lent(6, 1)]);
    let mut h = vec![
        op(0, 1, Call::Produce(vec![1, 2]), Ret::Ok),
        op(2, 3, lc, lr),
        op(4, 5, Call::Expire { cutoff: 100 }, Ret::Ok),
        op(6, 7, lc2, lr2),
    ];
    check(&h, LeaseRule::Prefix).expect("expiry re-queues item 1 behind item 2");
    h.push(op(8, 9, Call::Complete(vec![1]), Ret::Ok));
    check(&h, LeaseRule::Prefix).expect_err("the lease of id 1 expired");
    h.pop();
    h.push(op(8, 9, Call::Complete(vec![1]), Ret::Refused));
    check(&h, LeaseRule::Prefix).expect("refusing the expired id is right");
    // An expiry whose cutoff is before the deadline changes nothing.
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, lc, lr),
        op(4, 5, Call::Expire { cutoff: 99 }, Ret::Ok),
        op(6, 7, Call::Complete(vec![1]), Ret::Ok),
    ];
    check(&h, LeaseRule::Prefix).expect("the lease had not expired");
}

// =============================================================================================================
// Recording histories against a real server
// =============================================================================================================

/// Lets other tasks run a little, to vary interleavings without depending on wall-clock time.
async fn jitter(rng: &mut Rng) {
    for _ in 0..rng.range_usize(0, 16) {
        tokio::task::yield_now().await;
    }
}

const LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Long enough that no long-poll times out before the driver releases the consumers at the end.
const POLL_TIMEOUT: &str = "10m";
const RELEASE_POLLS: Duration = Duration::from_secs(11 * 60);

/// The shared recording state of one run.
struct Recorder {
    tick: AtomicU64,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::SeqCst)
    }

    fn push(&self, client: &str, call_at: u64, call: Call, ret: Ret) {
        let ret_at = self.now();
        self.ops.lock().expect("recorder lock").push(Op {
            client: client.to_string(),
            call_at,
            ret_at,
            call,
            ret,
        });
    }
}

/// Progress counters shared by the tasks of one run.
#[derive(Default)]
struct Progress {
    completed: AtomicUsize,
    completed_keys: Mutex<HashSet<Key>>,
    retries: Mutex<HashMap<Key, u32>>,
    consumers_done: AtomicUsize,
}

#[derive(Clone)]
struct Ctx {
    client: Client,
    queue: String,
    rec: Arc<Recorder>,
    progress: Arc<Progress>,
    /// Items carry their key as dedup id and their priority (Lessor extensions).
    extensions: bool,
}

fn key_of(payload: &[u8]) -> Key {
    let text = std::str::from_utf8(payload).expect("payload is text");
    text.strip_prefix('k')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad payload {text:?}"))
}

fn micros(t: &Option<lessor_client::proto::Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| {
        i64::try_from(t.unix_nanos() / 1000).expect("deadline fits i64")
    })
}

impl Ctx {
    async fn produce(&self, who: &str, keys: Vec<Key>) {
        let items = keys
            .iter()
            .map(|k| QueueProduceItem {
                reference: format!("k{k}"),
                utf8: format!("k{k}"),
                dedup_id: if self.extensions {
                    format!("k{k}")
                } else {
                    String::new()
                },
                priority: if self.extensions { prio(*k) as i32 } else { 0 },
                ..Default::default()
            })
            .collect();
        let at = self.rec.now();
        let res = self
            .client
            .queue_produce(&QueueProduceRequest {
                queue_name: self.queue.clone(),
                request_timeout: "1m".into(),
                items,
            })
            .await;
        res.unwrap_or_else(|e| panic!("{who}: produce failed: {e}"));
        self.rec.push(who, at, Call::Produce(keys), Ret::Ok);
    }

    /// One long-poll lease; `None` for a 454 timeout.
    async fn lease(&self, who: &str, batch: usize) -> Option<Vec<Lent>> {
        let at = self.rec.now();
        let res = self
            .client
            .queue_lease(&QueueLeaseRequest {
                queue_name: self.queue.clone(),
                batch_size: i32::try_from(batch).expect("small batch"),
                client_id: who.to_string(),
                request_timeout: POLL_TIMEOUT.into(),
            })
            .await;
        match res {
            Ok(r) => {
                assert_eq!(r.partition, 0, "{who}: one partition only");
                let items: Vec<Lent> = r
                    .items
                    .iter()
                    .map(|it| {
                        let key = key_of(&it.bytes);
                        assert_eq!(
                            it.reference,
                            format!("k{key}"),
                            "{who}: reference follows the payload"
                        );
                        Lent {
                            deadline: micros(&it.lease_deadline),
                            id: u64::from_str_radix(&it.id, 16).expect("hex id"),
                            key,
                        }
                    })
                    .collect();
                self.rec
                    .push(who, at, Call::Lease { batch }, Ret::Leased(items.clone()));
                Some(items)
            }
            Err(ClientError::Api {
                code: 454, message, ..
            }) if message.starts_with("request timeout") => {
                self.rec.push(who, at, Call::Lease { batch }, Ret::Empty);
                None
            }
            Err(e) => panic!("{who}: lease failed: {e}"),
        }
    }

    /// Extends the leases of the items by `lease`; returns whether the server accepted.
    async fn extend(&self, who: &str, items: &[Lent], lease: Duration) -> bool {
        let ids: Vec<u64> = items.iter().map(|l| l.id).collect();
        let at = self.rec.now();
        let res = self
            .client
            .call::<lessor_proto::routes::QueueExtend>(&lessor_proto::QueueExtendRequest {
                queue_name: self.queue.clone(),
                partition: 0,
                ids: ids.iter().map(|id| format!("{id:016x}")).collect(),
                lease_timeout: format!("{}s", lease.as_secs()),
                request_timeout: "1m".into(),
            })
            .await;
        let call = Call::Extend {
            ids,
            lease: i64::try_from(lease.as_micros()).expect("lease fits"),
        };
        match res {
            Ok(_) => {
                self.rec.push(who, at, call, Ret::Ok);
                true
            }
            Err(ClientError::Api {
                code: 400, message, ..
            }) if message.contains("does not exist") => {
                self.rec.push(who, at, call, Ret::Refused);
                false
            }
            Err(e) => panic!("{who}: extend failed: {e}"),
        }
    }

    /// Completes (or retries) the items; returns whether the server accepted.
    async fn settle(&self, who: &str, items: &[Lent], retry: bool) -> bool {
        let ids: Vec<u64> = items.iter().map(|l| l.id).collect();
        let wire: Vec<String> = ids.iter().map(|id| format!("{id:016x}")).collect();
        let at = self.rec.now();
        let res = if retry {
            self.client
                .queue_retry(&QueueRetryRequest {
                    queue_name: self.queue.clone(),
                    partition: 0,
                    items: wire
                        .into_iter()
                        .map(|id| QueueRetryItem {
                            id,
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
        } else {
            self.client
                .queue_complete(&QueueCompleteRequest {
                    queue_name: self.queue.clone(),
                    partition: 0,
                    request_timeout: "1m".into(),
                    ids: wire,
                })
                .await
        };
        let call = if retry {
            Call::Retry(ids)
        } else {
            Call::Complete(ids)
        };
        match res {
            Ok(()) => {
                self.rec.push(who, at, call, Ret::Ok);
                true
            }
            // The only refusal a correct run can see: the lease expired, so its id is gone.
            Err(ClientError::Api {
                code: 400, message, ..
            }) if message.contains("does not exist") => {
                self.rec.push(who, at, call, Ret::Refused);
                false
            }
            Err(e) => panic!("{who}: {} failed: {e}", if retry { "retry" } else { "complete" }),
        }
    }
}

/// The shape of one run.
#[derive(Clone, Debug)]
struct Plan {
    name: &'static str,
    producers: usize,
    items_per_producer: usize,
    /// Most items in one produce request.
    max_produce: usize,
    consumers: usize,
    max_batch: usize,
    retry_percent: u32,
    /// Consumers that lease once before the others start and never settle: their leases must expire.
    stallers: usize,
    /// Clock advances past the lease timeout while the consumers work.
    expiries: usize,
    rule: LeaseRule,
    /// Lessor extensions: priorities 0..=2, a dedup id on every item, producers sending some items twice, and
    /// consumers extending some leases (by [`EXTEND_BY`]) before settling them.
    extensions: bool,
}

/// How long an extension makes a lease: longer than one clock advance, so an extended lease outlives an expiry
/// that an unextended one would not.
const EXTEND_BY: Duration = Duration::from_secs(90);

/// Polls `cond` every few milliseconds, up to ~30 s of wall time; false when it never held.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..6000 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}

async fn consumer(ctx: Ctx, who: String, plan: Plan, mut rng: Rng) {
    loop {
        let batch = rng.range_usize(1, plan.max_batch);
        let Some(items) = ctx.lease(&who, batch).await else {
            break;
        };
        jitter(&mut rng).await;
        let items = if plan.extensions && rng.percent(50) {
            // Keep the lease going; when it was refused (the lease ended), nothing of it may be settled.
            if !ctx.extend(&who, &items, EXTEND_BY).await {
                continue;
            }
            jitter(&mut rng).await;
            items
        } else {
            items
        };
        let (mut retry, mut done) = (Vec::new(), Vec::new());
        for l in items {
            let again = rng.percent(plan.retry_percent) && {
                let mut r = ctx.progress.retries.lock().expect("retries lock");
                let n = r.entry(l.key).or_default();
                *n += 1;
                *n <= 2
            };
            if again {
                retry.push(l);
            } else {
                done.push(l);
            }
        }
        let retry_first = rng.percent(50);
        if retry_first && !retry.is_empty() {
            ctx.settle(&who, &retry, true).await;
        }
        if !done.is_empty() && ctx.settle(&who, &done, false).await {
            let mut keys = ctx.progress.completed_keys.lock().expect("keys lock");
            for l in &done {
                assert!(keys.insert(l.key), "{who}: k{} completed twice", l.key);
            }
            ctx.progress.completed.fetch_add(done.len(), Ordering::SeqCst);
        }
        if !retry_first && !retry.is_empty() {
            ctx.settle(&who, &retry, true).await;
        }
    }
    ctx.progress.consumers_done.fetch_add(1, Ordering::SeqCst);
}

async fn run(plan: Plan, seed: u64) {
    let (srv, client, clock) = lessor_testkit::server::memory_with_manual_clock().await;
    let queue = format!("lin-{}-{seed}", plan.name);
    client
        .queues_create(&QueueInfo {
            queue_name: queue.clone(),
            lease_timeout: "30s".into(),
            expire_timeout: "24h".into(),
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("queue created");
    let ctx = Ctx {
        client: client.clone(),
        queue: queue.clone(),
        rec: Arc::new(Recorder {
            tick: AtomicU64::new(0),
            ops: Mutex::new(Vec::new()),
        }),
        progress: Arc::new(Progress::default()),
        extensions: plan.extensions,
    };
    let start = State {
        now: clock.now().0,
        ..Default::default()
    };
    let mut rng = Rng::new(seed);
    let total = plan.producers * plan.items_per_producer;

    let mut producers = Vec::new();
    for p in 0..plan.producers {
        let ctx = ctx.clone();
        let mut rng = rng.fork();
        let first = p * plan.items_per_producer;
        let max_produce = plan.max_produce;
        let extensions = plan.extensions;
        let keys: Vec<Key> = (first..first + plan.items_per_producer)
            .map(|k| {
                // With extensions, a key's thousands digit is its priority (see `prio`).
                let p = if extensions {
                    rng.range_usize(0, 2) as Key
                } else {
                    0
                };
                p * 1000 + k as Key
            })
            .collect();
        producers.push(tokio::spawn(async move {
            let who = format!("p{p}");
            let mut rest = keys.as_slice();
            let mut sent: Vec<Key> = Vec::new();
            while !rest.is_empty() {
                let n = rng.range_usize(1, max_produce.min(rest.len()));
                let mut batch = rest[..n].to_vec();
                // An at-least-once producer: sometimes a key it already sent goes again, alone or with new ones.
                if extensions && !sent.is_empty() && rng.percent(40) {
                    batch.push(sent[rng.range_usize(0, sent.len() - 1)]);
                }
                ctx.produce(&who, batch).await;
                sent.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                jitter(&mut rng).await;
            }
        }));
    }

    // Stallers lease before any consumer runs, so they always get items, and then sit on them.
    let mut held = 0;
    let mut stallers = Vec::new();
    for s in 0..plan.stallers {
        let ctx = ctx.clone();
        let batch = rng.range_usize(1, 2);
        stallers.push(tokio::spawn(async move {
            let who = format!("s{s}");
            ctx.lease(&who, batch).await.map_or(0, |items| items.len())
        }));
    }
    for s in stallers {
        held += s.await.expect("staller joined");
    }
    assert!(held <= total);

    let mut consumers = Vec::new();
    for c in 0..plan.consumers {
        let who = format!("c{c}");
        consumers.push(tokio::spawn(consumer(ctx.clone(), who, plan.clone(), rng.fork())));
    }

    // Expiries at random points of the consumers' progress; the first one must come before the consumers run
    // out of items they can finish on their own.
    let mut threshold = 0;
    for e in 0..plan.expiries {
        let cap = if e == 0 { (total - held) / 2 } else { total - 1 };
        threshold = rng.range_usize(threshold.min(cap), cap);
        let progress = ctx.progress.clone();
        assert!(
            eventually(|| progress.completed.load(Ordering::SeqCst) >= threshold).await,
            "seed {seed}: consumers stalled before {threshold} completions"
        );
        let at = ctx.rec.now();
        clock.advance(LEASE_TIMEOUT + Duration::from_secs(1));
        let cutoff = clock.now().0;
        // Any queue request sent after the advance is handled in a pass that first runs the lifecycle at the
        // new time, so its answer proves the expiry happened.
        client
            .queue_stats(&QueueStatsRequest {
                queue_name: queue.clone(),
                ..Default::default()
            })
            .await
            .expect("stats");
        ctx.rec.push("clock", at, Call::Expire { cutoff }, Ret::Ok);
    }

    for p in producers {
        p.await.expect("producer joined");
    }
    let progress = ctx.progress.clone();
    assert!(
        eventually(|| progress.completed.load(Ordering::SeqCst) == total).await,
        "seed {seed}: only {} of {total} items completed",
        ctx.progress.completed.load(Ordering::SeqCst)
    );
    // Everything is done: time out the consumers' long-polls so each records an empty lease and stops.
    let mut released = false;
    for _ in 0..2000 {
        if ctx.progress.consumers_done.load(Ordering::SeqCst) == plan.consumers {
            released = true;
            break;
        }
        clock.advance(RELEASE_POLLS);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        released,
        "seed {seed}: consumers never saw their long-poll time out"
    );
    for c in consumers {
        c.await.expect("consumer joined");
    }

    let stats = client
        .queue_stats(&QueueStatsRequest {
            queue_name: queue.clone(),
            ..Default::default()
        })
        .await
        .expect("stats");
    let part = &stats.logical_queues[0].partitions[0];
    assert_eq!(
        (part.total, part.total_leased),
        (0, 0),
        "seed {seed}: queue ends empty"
    );

    let ops = ctx.rec.ops.lock().expect("ops lock").clone();
    if let Err(e) = check_from(&ops, plan.rule, start) {
        panic!("{} seed {seed}: {e}", plan.name);
    }
    srv.stop().await;
}

/// Runs `plan` with a few seeds, each against a fresh server, failing after a wall-clock bound instead of hanging.
async fn run_seeds(plan: Plan, seeds: &[u64]) {
    for &seed in seeds {
        let name = plan.name;
        tokio::time::timeout(Duration::from_secs(60), run(plan.clone(), seed))
            .await
            .unwrap_or_else(|_| panic!("{name} seed {seed}: run did not finish within 60 s"));
    }
}

const SEEDS: [u64; 8] = [1, 2, 3, 0xfeed, 0x5eed_0003, 0xdead_beef, 0x1234_5678_9abc, 42];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_lease_complete_single_item_leases() {
    let plan = Plan {
        name: "plc1",
        max_produce: 2,
        producers: 3,
        items_per_producer: 5,
        consumers: 3,
        max_batch: 1,
        retry_percent: 0,
        stallers: 0,
        expiries: 0,
        rule: LeaseRule::Prefix,
        extensions: false,
    };
    run_seeds(plan, &SEEDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_lease_complete() {
    let plan = Plan {
        name: "plc",
        max_produce: 4,
        producers: 2,
        items_per_producer: 8,
        consumers: 4,
        max_batch: 3,
        retry_percent: 0,
        stallers: 0,
        expiries: 0,
        rule: LeaseRule::HeadSubsequence,
        extensions: false,
    };
    run_seeds(plan, &SEEDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_lease_retry_complete() {
    let plan = Plan {
        name: "plrc",
        max_produce: 3,
        producers: 2,
        items_per_producer: 6,
        consumers: 3,
        max_batch: 2,
        retry_percent: 40,
        stallers: 0,
        expiries: 0,
        rule: LeaseRule::HeadSubsequence,
        extensions: false,
    };
    run_seeds(plan, &SEEDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry() {
    let plan = Plan {
        name: "exp",
        max_produce: 2,
        producers: 2,
        items_per_producer: 6,
        consumers: 2,
        max_batch: 2,
        retry_percent: 20,
        stallers: 3,
        expiries: 2,
        rule: LeaseRule::HeadSubsequence,
        extensions: false,
    };
    run_seeds(plan, &SEEDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_priorities_dedup_and_extend() {
    let plan = Plan {
        name: "ext",
        max_produce: 3,
        producers: 2,
        items_per_producer: 6,
        consumers: 2,
        max_batch: 2,
        retry_percent: 20,
        stallers: 2,
        expiries: 2,
        rule: LeaseRule::HeadSubsequence,
        extensions: true,
    };
    run_seeds(plan, &SEEDS).await;
}

#[test]
fn checker_rejects_a_lower_priority_served_first() {
    // k1000 has priority 1, k1 priority 0: the lease must take k1000 although k1 came first.
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let h = vec![op(0, 1, Call::Produce(vec![1, 1000]), Ret::Ok), op(2, 3, lc, lr)];
    assert!(check(&h, LeaseRule::Prefix).is_err());
    let (lc, lr) = lease(1, &[lent(1, 1000)]);
    let h = vec![op(0, 1, Call::Produce(vec![1, 1000]), Ret::Ok), op(2, 3, lc, lr)];
    check(&h, LeaseRule::Prefix).expect("highest priority first");
}

#[test]
fn checker_rejects_a_duplicate_stored_twice() {
    let (lc1, lr1) = lease(1, &[lent(1, 5)]);
    let (lc2, lr2) = lease(1, &[lent(2, 5)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![5]), Ret::Ok),
        op(2, 3, Call::Produce(vec![5]), Ret::Ok),
        op(4, 5, lc1, lr1),
        op(6, 7, Call::Complete(vec![1]), Ret::Ok),
        op(8, 9, lc2, lr2),
    ];
    assert!(
        check(&h, LeaseRule::Prefix).is_err(),
        "a key produced twice is stored once"
    );
}

#[test]
fn checker_rejects_an_extended_lease_that_expires_early() {
    // Leased at 0 (deadline 100), extended by 500 at time 0: an expiry at 200 must not take it back.
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let (lc2, lr2) = lease(1, &[lent(2, 1)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, lc, lr),
        op(
            4,
            5,
            Call::Extend {
                ids: vec![1],
                lease: 500,
            },
            Ret::Ok,
        ),
        op(6, 7, Call::Expire { cutoff: 200 }, Ret::Ok),
        op(8, 9, lc2, lr2),
    ];
    assert!(check(&h, LeaseRule::Prefix).is_err());
    // Without the extension the same expiry does take it back.
    let (lc, lr) = lease(1, &[lent(1, 1)]);
    let (lc2, lr2) = lease(1, &[lent(2, 1)]);
    let h = vec![
        op(0, 1, Call::Produce(vec![1]), Ret::Ok),
        op(2, 3, lc, lr),
        op(6, 7, Call::Expire { cutoff: 200 }, Ret::Ok),
        op(8, 9, lc2, lr2),
    ];
    check(&h, LeaseRule::Prefix).expect("expired and leased again");
}
